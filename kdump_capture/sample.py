"""Synthetic ELF vmcores laid out like /proc/vmcore: for the demo, unit tests and scale tests.

They carry real-looking notes (per-CPU NT_PRSTATUS, VMCOREINFO with OSRELEASE, PAGESIZE and
CRASHTIME) and PT_LOADs whose pages mix zero pages, compressible text and random bytes. They
have no kernel data structures (page tables, struct page, printk buffer): tools that need
those are tested with the real samples the VM harness makes (tests/vmkit).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from .elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note

PAGE = 4096
PRSTATUS_SIZE = 336  # sizeof(struct elf_prstatus) on x86_64
PAGE_OFFSET = 0xFFFF888000000000  # x86_64 direct map base without KASLR
CHUNK_PAGES = 256


@dataclass(frozen=True)
class SampleSpec:
    """What to generate. ``ram_mib`` of RAM split into ``segments`` PT_LOADs with holes."""

    ram_mib: int = 64
    segments: int = 3
    cpus: int = 2
    zero_percent: int = 40
    sparse: bool = False  # all-zero RAM written as file holes (fast multi-GB inputs)
    seed: int = 1
    release: str = "6.1.0-sample-amd64"
    crash_time: int = 1764000000


def _vmcoreinfo(spec: SampleSpec) -> bytes:
    lines = [
        f"OSRELEASE={spec.release}",
        f"BUILD-ID={'ab' * 20}",
        f"PAGESIZE={PAGE}",
        "SYMBOL(init_uts_ns)=ffffffff82a13540",
        "OFFSET(uts_namespace.name)=4",
        "NUMBER(phys_base)=0",
        "KERNELOFFSET=0",
        f"CRASHTIME={spec.crash_time}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _prstatus(pid: int) -> bytes:
    desc = bytearray(PRSTATUS_SIZE)
    desc[32:36] = pid.to_bytes(4, "little")  # pr_pid
    return bytes(desc)


def _page_kind(rng: random.Random, zero_percent: int) -> int:
    r = rng.randrange(100)
    if r < zero_percent:
        return 0
    return 1 if r < zero_percent + (100 - zero_percent) // 2 else 2


def write_sample(path: str, spec: SampleSpec = SampleSpec()) -> int:
    """Write a synthetic vmcore to ``path`` (mode 0600); returns its size in bytes."""
    total_pages = spec.ram_mib * 256
    per_seg = max(1, total_pages // spec.segments)
    # RAM ranges with a 1 MiB hole between them, starting at 1 MiB like real x86 RAM maps.
    ranges = []
    paddr = 0x100000
    left = total_pages
    for i in range(spec.segments):
        n = per_seg if i < spec.segments - 1 else left
        ranges.append((paddr, n))
        paddr += n * PAGE + 0x100000
        left -= n
    notes = b"".join(pack_note(b"CORE", NT_PRSTATUS, _prstatus(100 + c)) for c in range(spec.cpus))
    notes += pack_note(b"VMCOREINFO", 0, _vmcoreinfo(spec))
    phnum = 1 + len(ranges)
    hdr_len = 64 + 56 * phnum
    notes_off = (hdr_len + PAGE - 1) // PAGE * PAGE
    data_off = notes_off + (len(notes) + PAGE - 1) // PAGE * PAGE
    phdrs = [Phdr(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0)]
    off = data_off
    for start, n in ranges:
        phdrs.append(Phdr(PT_LOAD, 7, off, PAGE_OFFSET + start, start, n * PAGE, n * PAGE, 0))
        off += n * PAGE
    size = off
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Ehdr.core(phnum).pack())
            for p in phdrs:
                f.write(p.pack())
            f.write(bytes(notes_off - f.tell()))
            f.write(notes)
            f.write(bytes(data_off - f.tell()))
            if spec.sparse:
                f.truncate(size)
            else:
                _write_pages(f, total_pages, spec)
    except BaseException:
        os.unlink(path)
        raise
    return size


def _write_pages(f, total_pages: int, spec: SampleSpec) -> None:
    rng = random.Random(spec.seed)
    chunk = bytearray(CHUNK_PAGES * PAGE)
    page_no = 0
    while page_no < total_pages:
        n = min(CHUNK_PAGES, total_pages - page_no)
        noise = rng.randbytes(n * PAGE)
        for i in range(n):
            kind = _page_kind(rng, spec.zero_percent)
            lo = i * PAGE
            if kind == 0:
                chunk[lo : lo + PAGE] = bytes(PAGE)
            elif kind == 1:
                line = b"page %9d: kdump-capture synthetic text, compresses well.\n" % (page_no + i)
                chunk[lo : lo + PAGE] = (line * (PAGE // len(line) + 1))[:PAGE]
            else:
                chunk[lo : lo + PAGE] = noise[lo : lo + PAGE]
        f.write(memoryview(chunk)[: n * PAGE])
        page_no += n
