"""ELF output: a byte-identical copy (level 0) or an ELF with zero pages left out (level 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..elf import PT_LOAD, PT_NOTE, Ehdr, Phdr
from ..errors import VmcoreError
from ..vmcore import Vmcore
from . import CHUNK, FormatWriter, Monitor, WriteResult
from .filter import build_bitmaps, clear_range, iter_runs

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

    def lower_bound(self) -> int:
        return self.vm.size or 0  # a copy: exactly the source

    def write(self, sink, monitor: Monitor) -> WriteResult:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        off = 0
        total = self.vm.size
        if total is None:
            raise VmcoreError(f"{self.vm.path}: the size of the source is unknown")
        incomplete = None
        while off < total:
            want = min(CHUNK, total - off)
            try:
                n = self.vm.read_data(view[:want], off)
            except VmcoreError as e:
                incomplete = str(e)
                break
            if n:
                sink.write(view[:n])
                off += n
                monitor.advance(n, n)
            if n < want:
                incomplete = _ended(self.vm.path, off, total)
                break
        pages = off // PAGE
        kind = "ELF" if self.vm.kind == "elf" else "raw memory image"
        return WriteResult(
            format=kind,
            dump_level=0,
            pages_total=-(-total // PAGE),
            pages_written=pages,
            incomplete=incomplete,
        )


def _ended(path: str, off: int, total: int) -> str:
    return f"{path}: the source ended at offset {off:#x}; {total:#x} bytes were expected"


class ElfWriter(RawWriter):
    """ELF vmcore; at levels > 0, runs of >= MIN_EXCLUDED_RUN excluded pages leave the PT_LOADs.

    Pages are excluded as makedumpfile -E does: bits 2-16 from struct page (``filter.py``),
    bit 1 by content (a scan pass before the copy pass, since the program headers come first).
    """

    def input_size(self) -> int | None:
        if not self.level:
            return self.vm.size
        data = sum(p.filesz for p in self.vm.loads)
        return 2 * data if self.level & 1 else data  # scan pass + copy pass (upper bound)

    def lower_bound(self) -> int:
        if not self.level:
            return super().lower_bound()
        # Which pages a level leaves out is known only after reading them: headers and
        # notes are certain (the ELF header with the PT_NOTE header fills the first page).
        return PAGE + _page_up(len(self.vm.notes_blob))

    def write(self, sink, monitor: Monitor) -> WriteResult:
        if not self.level:
            return super().write(sink, monitor)
        bm = build_bitmaps(self.vm, self.level)
        keep = bytearray(bm.second)
        if self.level & 1:
            clear_zero_pages(self.vm, keep, bm.max_mapnr, monitor)
        plan = plan_exclusion(self.vm, keep)
        result = write_elf_segments(self.vm, plan, sink, monitor, bm.level)
        result.notes.extend(bm.notes)
        return result


@dataclass(frozen=True)
class OutSeg:
    """A PT_LOAD of the output: ``filesz`` bytes copied from source offset ``src``."""

    vaddr: int
    paddr: int
    src: int
    filesz: int
    memsz: int
    flags: int


def clear_zero_pages(vm: Vmcore, keep: bytearray, max_mapnr: int, monitor: Monitor) -> None:
    """Clear the bits of all-zero pages among the kept ones (reads each kept page once)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    per = CHUNK // PAGE
    for p in vm.loads:
        if p.filesz == 0 or p.paddr % PAGE or p.offset % PAGE:
            continue
        first = p.paddr // PAGE
        last = first + p.filesz // PAGE
        for start, end in iter_runs(keep, min(last, max_mapnr)):
            start = max(start, first)
            pfn = start
            while pfn < end:
                n = min(per, end - pfn)
                nbytes = n * PAGE
                off = p.offset + (pfn - first) * PAGE
                try:
                    got = vm.read_data(view[:nbytes], off)
                except VmcoreError:
                    got = -1
                if got != nbytes:
                    return  # the source ended or failed: the copy pass finds out and says so
                if n == per and buf == ZERO_CHUNK:
                    clear_range(keep, pfn, pfn + n)
                else:
                    for i in range(n):
                        if view[i * PAGE : (i + 1) * PAGE] == ZERO_PAGE:
                            clear_range(keep, pfn + i, pfn + i + 1)
                pfn += n
                monitor.advance(nbytes, 0)


def plan_exclusion(vm: Vmcore, keep: bytes | bytearray) -> list[OutSeg]:
    """Split every PT_LOAD around runs of >= MIN_EXCLUDED_RUN pages whose ``keep`` bit is 0.

    Each output segment holds a stretch of data followed by the excluded run it precedes
    (memsz > filesz), so readers still find those addresses and read them as zeros.
    Shorter excluded runs are copied, as makedumpfile does (PFN_EXCLUDED).
    """
    out: list[OutSeg] = []
    nbits = len(keep) * 8
    for p in vm.loads:
        if p.filesz == 0 or p.paddr % PAGE or p.offset % PAGE:
            out.append(OutSeg(p.vaddr, p.paddr, p.offset, p.filesz, p.memsz, p.flags))
            continue
        first = p.paddr // PAGE
        npages = p.filesz // PAGE
        gaps = []
        prev = first
        for start, end in iter_runs(keep, min(first + npages, nbits)):
            if end <= first:
                continue
            start = max(start, first)
            if start - prev >= MIN_EXCLUDED_RUN:
                gaps.append((prev - first, start - prev))
            prev = end
        if first + npages - prev >= MIN_EXCLUDED_RUN:
            gaps.append((prev - first, first + npages - prev))
        pos = 0  # page index where the current output segment starts
        for zstart, zlen in gaps:
            out.append(_seg(p, pos, zstart - pos, zstart + zlen - pos))
            pos = zstart + zlen
        tail_file = p.filesz - pos * PAGE
        tail_mem = p.memsz - pos * PAGE
        if tail_mem > 0 or not gaps:
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
    incomplete = None
    for s in segs:
        done = 0
        while done < s.filesz:
            want = min(CHUNK, s.filesz - done)
            try:
                n = vm.read_data(view[:want], s.src + done)
            except VmcoreError as e:
                incomplete, n = str(e), 0
            if n:
                sink.write(view[:n])
                done += n
                monitor.advance(n, n)
            if n < want:
                incomplete = incomplete or _ended(vm.path, s.src + done, s.src + s.filesz)
                break
        written_pages += -(-done // PAGE)
        if incomplete:
            break
        pad = _page_up(s.filesz) - s.filesz
        if pad:
            sink.write(bytes(pad))
            monitor.advance(0, pad)
    total_pages = sum(_page_up(p.filesz) // PAGE for p in vm.loads)
    return WriteResult(
        format="ELF",
        dump_level=level,
        pages_total=total_pages,
        pages_written=written_pages,
        incomplete=incomplete,
    )


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class NoneWriter(FormatWriter):
    """KDUMP_DUMPFORMAT=none: no vmcore file at all (the engine still saves dmesg.txt)."""

    produces_file = False

    def input_size(self) -> int | None:
        return 0

    def estimate(self) -> int | None:
        return 0

    def write(self, sink, monitor: Monitor) -> WriteResult:
        return WriteResult(format="none (dmesg only)", dump_level=self.level)
