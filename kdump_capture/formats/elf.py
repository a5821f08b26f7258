"""ELF output: a byte-identical copy (level 0) or an ELF with zero pages left out (level 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..elf import PT_LOAD, PT_NOTE, Ehdr, Phdr
from ..errors import VmcoreError
from ..vmcore import Vmcore
from . import CHUNK, FormatWriter, Monitor, WriteResult

PAGE = 4096
# Runs of zero pages shorter than this are written as data: each excluded run costs a
# program header, and makedumpfile uses the same threshold (PFN_EXCLUDED) for -E.
MIN_EXCLUDED_RUN = 256
ZERO_PAGE = bytes(PAGE)
ZERO_CHUNK = bytes(CHUNK)


class RawWriter(FormatWriter):
    """Copies the source byte for byte (ELF level 0, or /dev/oldmem)."""

    def input_size(self) -> int | None:
        return self.vm.size

    def estimate(self) -> int | None:
        return self.vm.size

    def write(self, sink, monitor: Monitor) -> WriteResult:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        off = 0
        total = self.vm.size
        while total is None or off < total:
            want = CHUNK if total is None else min(CHUNK, total - off)
            n = self.vm.readinto(view[:want], off)
            if n == 0:
                if total is not None:
                    raise VmcoreError(
                        f"{self.vm.path}: offset {off:#x}: unexpected end of file "
                        f"(expected {total:#x} bytes)"
                    )
                break
            sink.write(view[:n])
            off += n
            monitor.advance(n, n)
        pages = off // PAGE
        kind = "ELF" if self.vm.kind == "elf" else "raw memory image"
        return WriteResult(format=kind, dump_level=0, pages_total=pages, pages_written=pages)


class ElfWriter(RawWriter):
    """ELF vmcore; with level bit 1, long runs of zero pages leave the PT_LOADs."""

    def input_size(self) -> int | None:
        if not self.level & 1:
            return self.vm.size
        data = sum(p.filesz for p in self.vm.loads)
        return 2 * data  # scan pass + copy pass (upper bound: the copy skips excluded runs)

    def write(self, sink, monitor: Monitor) -> WriteResult:
        if not self.level & 1:
            return super().write(sink, monitor)
        plan = plan_zero_exclusion(self.vm, monitor)
        return write_elf_segments(self.vm, plan, sink, monitor, self.level)


@dataclass(frozen=True)
class OutSeg:
    """A PT_LOAD of the output: ``filesz`` bytes copied from source offset ``src``."""

    vaddr: int
    paddr: int
    src: int
    filesz: int
    memsz: int
    flags: int


def plan_zero_exclusion(vm: Vmcore, monitor: Monitor) -> list[OutSeg]:
    """Scan every PT_LOAD and split it around runs of >= MIN_EXCLUDED_RUN zero pages.

    Each output segment holds a stretch of data followed by the zero run it precedes
    (memsz > filesz), so readers still find those addresses and read them as zeros.
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    out: list[OutSeg] = []
    for p in vm.loads:
        if p.filesz == 0 or p.paddr % PAGE or p.offset % PAGE:
            out.append(OutSeg(p.vaddr, p.paddr, p.offset, p.filesz, p.memsz, p.flags))
            continue
        npages = p.filesz // PAGE
        zero = _zero_runs(vm, p, npages, view, buf, monitor)
        pos = 0  # page index where the current output segment starts
        for zstart, zlen in zero:
            out.append(_seg(p, pos, zstart - pos, zstart + zlen - pos))
            pos = zstart + zlen
        tail_file = p.filesz - pos * PAGE
        tail_mem = p.memsz - pos * PAGE
        if tail_mem > 0 or not out:
            out.append(
                OutSeg(
                    p.vaddr + pos * PAGE,
                    p.paddr + pos * PAGE,
                    p.offset + pos * PAGE,
                    max(tail_file, 0),
                    tail_mem,
                    p.flags,
                )
            )
    return out


def _seg(p: Phdr, start: int, data_pages: int, mem_pages: int) -> OutSeg:
    return OutSeg(
        p.vaddr + start * PAGE,
        p.paddr + start * PAGE,
        p.offset + start * PAGE,
        data_pages * PAGE,
        mem_pages * PAGE,
        p.flags,
    )


def _zero_runs(vm, p, npages, view, buf, monitor) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    run_start = -1
    page = 0
    while page < npages:
        n_pages = min(CHUNK // PAGE, npages - page)
        nbytes = n_pages * PAGE
        got = vm.readinto(view[:nbytes], p.offset + page * PAGE)
        if got != nbytes:
            raise VmcoreError(f"{vm.path}: offset {p.offset + page * PAGE + got:#x}: short read")
        if nbytes == CHUNK and buf == ZERO_CHUNK:
            if run_start < 0:
                run_start = page
        else:
            for i in range(n_pages):
                lo = i * PAGE
                if buf[lo : lo + PAGE] == ZERO_PAGE:
                    if run_start < 0:
                        run_start = page + i
                elif run_start >= 0:
                    if page + i - run_start >= MIN_EXCLUDED_RUN:
                        runs.append((run_start, page + i - run_start))
                    run_start = -1
        page += n_pages
        monitor.advance(nbytes, 0)
    if run_start >= 0 and npages - run_start >= MIN_EXCLUDED_RUN:
        runs.append((run_start, npages - run_start))
    return runs


def write_elf_segments(
    vm: Vmcore, segs: list[OutSeg], sink, monitor: Monitor, level: int
) -> WriteResult:
    """Write ELF header, PT_NOTE + ``segs`` program headers, the notes and segment data."""
    phnum = 1 + len(segs)
    if phnum > 0xFFFF:
        raise VmcoreError(f"{vm.path}: {phnum} output segments exceed the ELF limit")
    hdr_len = 64 + 56 * phnum
    notes_off = _page_up(hdr_len)
    data_off = notes_off + _page_up(len(vm.notes_blob))
    phdrs = [Phdr(PT_NOTE, 0, notes_off, 0, 0, len(vm.notes_blob), len(vm.notes_blob), 0)]
    off = data_off
    for s in segs:
        phdrs.append(Phdr(PT_LOAD, s.flags, off, s.vaddr, s.paddr, s.filesz, s.memsz, 0))
        off += _page_up(s.filesz)
    machine = vm.ehdr.machine if vm.ehdr else 62
    head = bytearray(Ehdr.core(phnum, machine).pack())
    for p in phdrs:
        head += p.pack()
    head += bytes(notes_off - len(head))
    head += vm.notes_blob
    head += bytes(data_off - len(head))
    sink.write(head)
    monitor.advance(0, len(head))

    buf = bytearray(CHUNK)
    view = memoryview(buf)
    written_pages = 0
    for s in segs:
        done = 0
        while done < s.filesz:
            want = min(CHUNK, s.filesz - done)
            n = vm.readinto(view[:want], s.src + done)
            if n != want:
                raise VmcoreError(f"{vm.path}: offset {s.src + done + n:#x}: short read")
            sink.write(view[:n])
            done += n
            monitor.advance(n, n)
        pad = _page_up(s.filesz) - s.filesz
        if pad:
            sink.write(bytes(pad))
            monitor.advance(0, pad)
        written_pages += _page_up(s.filesz) // PAGE
    total_pages = sum(_page_up(p.filesz) // PAGE for p in vm.loads)
    return WriteResult(
        format="ELF",
        dump_level=level,
        pages_total=total_pages,
        pages_written=written_pages,
    )


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE
