"""Fuzz targets: the crashed kernel's data (ELF headers and notes, VMCOREINFO, printk ring).

``elf``: the input is a whole ELF vmcore. ``vmcoreinfo``: the input is VMCOREINFO text.
``printk``: a small synthetic kernel with a valid printk ring (kdump_capture.sample); the
input's first byte says how many VMCOREINFO values it overrides (9 bytes each: key index,
signed 64-bit value), the rest overwrites the ring's memory (descriptors, infos, text, the
ring structure) from its start. Each input is written to a memfd and read by path, as the
engine reads /proc/vmcore.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, wraps

from kdump_capture import dmesg
from kdump_capture.elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note
from kdump_capture.kernel import KernelInfoError, VmcoreInfo
from kdump_capture.sample import PAGE, PAGE_OFFSET, RAM_START, KernelImage
from kdump_capture.vmcore import check_crash_time, open_vmcore, parse_vmcoreinfo


class MemFile:
    """An anonymous in-memory file with a path (/proc/self/fd/N), reused for every input."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name)
        self.path = f"/proc/self/fd/{self.fd}"

    def put(self, data: bytes) -> str:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        return self.path


@cache
def _memfile(name: str) -> MemFile:
    return MemFile(name)


@contextmanager
def _quiet() -> Iterator[None]:
    """No log output while a target runs: the engine warns about every odd input."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quiet(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
    @wraps(fn)
    def run(data: bytes) -> None:
        with _quiet():
            fn(data)

    return run


def _elf(data: bytes) -> None:
    with open_vmcore(_memfile("elf").put(data)) as vm:
        _ = (vm.crash_time, vm.crash_time_problem, vm.nr_cpus, vm.release, vm.page_size)
        _ = (vm.header_size, vm.paddr_of(vm.header_size))
        vm.pread(4096, vm.header_size)


# Keys read as numbers somewhere in the engine; the rest of a VMCOREINFO is kept as text.
_INFO_KEYS = (
    "SYMBOL(prb)",
    "SIZE(printk_ringbuffer)",
    "OFFSET(printk_ringbuffer.desc_ring)",
    "OFFSET(printk_ringbuffer.text_data_ring)",
    "OFFSET(prb_desc_ring.count_bits)",
    "OFFSET(prb_desc_ring.descs)",
    "OFFSET(prb_desc_ring.infos)",
    "OFFSET(prb_desc_ring.head_id)",
    "OFFSET(prb_desc_ring.tail_id)",
    "SIZE(prb_desc)",
    "OFFSET(prb_desc.state_var)",
    "OFFSET(prb_desc.text_blk_lpos)",
    "OFFSET(prb_data_blk_lpos.begin)",
    "OFFSET(prb_data_blk_lpos.next)",
    "SIZE(printk_info)",
    "OFFSET(printk_info.ts_nsec)",
    "OFFSET(printk_info.text_len)",
    "OFFSET(prb_data_ring.size_bits)",
    "OFFSET(prb_data_ring.data)",
    "OFFSET(atomic_long_t.counter)",
    "SYMBOL(init_top_pgt)",
    "NUMBER(phys_base)",
    "NUMBER(pgtable_l5_enabled)",
    "NUMBER(sme_mask)",
    "CRASHTIME",
)


def _vmcoreinfo(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    entries = parse_vmcoreinfo(text)
    info = VmcoreInfo(entries)
    for key in entries:
        kind, _, name = key.partition("(")
        getter = {
            "SYMBOL": info.symbol,
            "SIZE": info.size,
            "OFFSET": info.offset,
            "LENGTH": info.length,
            "NUMBER": info.number,
        }.get(kind)
        try:
            if getter is not None:
                getter(name.rstrip(")"))
            elif key == "KERNELOFFSET":
                info.kerneloffset()
        except KernelInfoError:
            pass
    check_crash_time(entries.get("CRASHTIME"), 1764000000)


# The ring's memory the input overwrites, in this order: the start of struct
# printk_ringbuffer (the fields the reader uses: count_bits, pointers, ids, size_bits), then
# the descriptor, info and text pages. Short inputs mutate the structure first.
RING_STRUCT = 128


@cache
def _kernel() -> tuple[KernelImage, list[tuple[int, int]]]:
    """The synthetic kernel and the (physical address, size) pieces the input overwrites."""
    k = KernelImage(64)
    k.build([(0, b"Linux version 6.1.0-fuzz"), (1500, b"two\nlines"), (9000, b"\xe2 last")])
    ring = k.get_u64(k.symbols["prb"] - PAGE_OFFSET) - PAGE_OFFSET
    # _build_prb allocates descs, infos, text and the ring structure on consecutive pages.
    pieces = [(ring, RING_STRUCT)] + [(ring - i * PAGE, PAGE) for i in (3, 2, 1)]
    return k, pieces


def _printk_image(data: bytes) -> bytes:
    k, pieces = _kernel()
    n = data[0] & 3 if data else 0
    extra: dict[str, str] = {}
    pos = 1
    for _ in range(n):
        if pos + 9 > len(data):
            break
        key = _INFO_KEYS[data[pos] % len(_INFO_KEYS)]
        value = struct.unpack_from("<q", data, pos + 1)[0]
        extra[key] = f"{value & (1 << 64) - 1:x}" if key.startswith("SYMBOL") else str(value)
        pos += 9
    mem = bytearray(k.mem)
    for pa, size in pieces:
        chunk = data[pos : pos + size]
        off = pa - RAM_START
        mem[off : off + len(chunk)] = chunk
        pos += size
    notes = pack_note(b"CORE", NT_PRSTATUS, bytes(336))
    notes += pack_note(b"VMCOREINFO", 0, k.vmcoreinfo(extra).encode())
    data_off = PAGE + -(-len(notes) // PAGE) * PAGE
    size = len(mem)
    phdrs = [
        Phdr(PT_NOTE, 0, PAGE, 0, 0, len(notes), len(notes), 0),
        Phdr(PT_LOAD, 7, data_off, k.va(RAM_START), RAM_START, size, size, 0),
    ]
    head = Ehdr.core(len(phdrs)).pack() + b"".join(p.pack() for p in phdrs)
    return head.ljust(PAGE, b"\0") + notes.ljust(data_off - PAGE, b"\0") + mem


def _printk(data: bytes) -> None:
    with open_vmcore(_memfile("printk").put(_printk_image(data))) as vm:
        dmesg.extract(vm)


def printk_seed(ring: bytes = b"", overrides: dict[int, int] | None = None) -> bytes:
    """An input for ``printk``: the given overrides (key index -> value), then ring bytes."""
    ov = overrides or {}
    out = bytes([len(ov)]) + b"".join(struct.pack("<Bq", k, v) for k, v in ov.items())
    return out + ring


def original_ring() -> bytes:
    """The bytes ``printk`` overwrites, as the valid synthetic kernel has them."""
    k, pieces = _kernel()
    return b"".join(bytes(k.mem[pa - RAM_START : pa - RAM_START + n]) for pa, n in pieces)


TARGETS = {"elf": quiet(_elf), "vmcoreinfo": quiet(_vmcoreinfo), "printk": quiet(_printk)}
