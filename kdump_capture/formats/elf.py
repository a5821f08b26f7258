"""ELF output: a byte-identical copy (level 0) or an ELF with zero pages left out (level 1)."""

from __future__ import annotations

import array
import logging
from collections.abc import Iterable, Iterator

from .. import speedups
from ..elf import (
    EHDR,
    MAX_XNUM_PHNUM,
    PHDR,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR,
    Ehdr,
    Phdr,
    xnum_section,
)
from ..errors import VmcoreError
from ..record import Record
from ..vmcore import Vmcore
from . import CHUNK, FormatWriter, WriteResult
from .filter import PageFilter, Window, clear_range, iter_runs
from .pages import zero_mask_py

log = logging.getLogger(__name__)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from . import Monitor

PAGE = 4096
# Runs of zero pages shorter than this are written as data: each excluded run costs a
# program header, and makedumpfile uses the same threshold (PFN_EXCLUDED) for -E.
MIN_EXCLUDED_RUN = 256
ZERO_CHUNK = bytes(CHUNK)
SEQ_OFFSETS = array.array("Q", range(0, CHUNK, PAGE))
FULL_MASK = b"\xff" * (CHUNK // PAGE // 8)
# Program headers are written in pieces of this size (extended numbering: up to 14 MiB).
HEAD_CHUNK = 1 << 16


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
        off = 0
        total = self.vm.size
        if total is None:
            raise VmcoreError(f"{self.vm.path}: the size of the source is unknown")
        incomplete = None
        while off < total:
            want = min(CHUNK, total - off)
            data = self.vm.view(off, want)
            if data is None:
                data = memoryview(buf)[:want]
                try:
                    n = self.vm.read_data(data, off)
                except VmcoreError as e:
                    incomplete = str(e)
                    break
                data = data[:n]
            else:
                n = want
            if n:
                sink.write(data)
                off += n
                monitor.advance(n, n)
            del data
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
    Both work on one bitmap window at a time; what is kept is the list of output segments.
    """

    def input_size(self) -> int | None:
        if not self.level:
            return self.vm.size
        data = sum(p.filesz for p in self.vm.loads)
        # The scan pass, then the copy pass: each reports the whole source as it moves
        # through it (what a level leaves out counts as done), so the total is exact.
        return 2 * data if self.level & 1 else data

    def __init__(self, vm: Vmcore, level: int, accelerated: bool | None = None) -> None:
        super().__init__(vm, level)
        self.accelerated = accelerated

    def lower_bound(self) -> int:
        if not self.level:
            return super().lower_bound()
        # Which pages a level leaves out is known only after reading them: headers and
        # notes are certain (the ELF header with the PT_NOTE header fills the first page).
        return PAGE + _page_up(len(self.vm.notes_blob))

    def write(self, sink, monitor: Monitor) -> WriteResult:
        if not self.level:
            return super().write(sink, monitor)
        pf = PageFilter(self.vm, self.level, accelerated=self.accelerated)
        planner = SegmentPlanner(self.vm)
        accel = None if self.accelerated is False else speedups.module()
        data = sum(p.filesz for p in self.vm.loads)
        scanned = 0
        for win in pf.windows():
            if self.level & 1:
                read = clear_zero_pages(self.vm, win, pf.max_mapnr, monitor, accel)
                # the rest of the window's share of the source: the pages the struct-page
                # walk left out are done too
                n = max(0, min(_window_bytes(self.vm, win), data - scanned) - read)
                scanned += read + n
                monitor.advance(n, 0)
            planner.add(win)
        if self.level & 1:
            monitor.advance(max(0, data - scanned), 0)
        summ = pf.summary()
        log.info("%s", pf.walk_report())
        planner.finish()
        result = write_elf_segments(self.vm, planner, sink, monitor, summ.level, data)
        result.notes.extend(summ.notes)
        if planner.note:
            result.notes.append(planner.note)
        return result


class OutSeg(Record):
    """A PT_LOAD of the output: ``filesz`` bytes copied from source offset ``src``."""

    __slots__ = ("vaddr", "paddr", "src", "filesz", "memsz", "flags")

    def __init__(
        self, vaddr: int, paddr: int, src: int, filesz: int, memsz: int, flags: int
    ) -> None:
        self.vaddr = vaddr
        self.paddr = paddr
        self.src = src
        self.filesz = filesz
        self.memsz = memsz
        self.flags = flags


def _aligned(p: Phdr) -> bool:
    """PT_LOADs that can be split by pages (others are copied whole)."""
    return bool(p.filesz) and not p.paddr % PAGE and not p.offset % PAGE


def _window_bytes(vm: Vmcore, win: Window) -> int:
    """Bytes of the segments' data in the window's page frames."""
    total = 0
    for p in vm.loads:
        first = p.paddr // PAGE
        lo = max(first, win.start)
        hi = min(first + -(-p.filesz // PAGE), win.end)
        if hi > lo:
            total += (hi - lo) * PAGE
    return total


def clear_zero_pages(vm: Vmcore, win: Window, max_mapnr: int, monitor: Monitor, accel=None) -> int:
    """Clear the window's 2nd-bitmap bits of all-zero pages (reads each kept page once).

    Returns the bytes read (and reported to ``monitor``)."""
    read = 0
    buf = bytearray(CHUNK)
    per = CHUNK // PAGE
    keep = win.second
    ws = win.start
    for p in vm.loads:
        if not _aligned(p):
            continue
        first = p.paddr // PAGE
        last = first + p.filesz // PAGE
        limit = min(last, max_mapnr, win.end) - ws
        if limit <= 0 or first >= win.end:
            continue
        for start, end in iter_runs(keep, limit):
            pfn = max(start + ws, first)
            end += ws
            while pfn < end:
                n = min(per, end - pfn)
                nbytes = n * PAGE
                off = p.offset + (pfn - first) * PAGE
                data = vm.view(off, nbytes)
                if data is None:
                    data = memoryview(buf)[:nbytes]
                    try:
                        got = vm.read_data(data, off)
                    except VmcoreError:
                        got = -1
                    if got != nbytes:
                        return read  # the source ended or failed: the copy pass says so
                offsets = SEQ_OFFSETS[:n]
                if accel is not None:
                    mask = accel.zero_pages(data, offsets)
                elif n == per and bytes(data) == ZERO_CHUNK:  # bytes: see zero_mask_py
                    mask = FULL_MASK
                else:
                    mask = zero_mask_py(data, offsets)
                if mask == FULL_MASK:
                    clear_range(keep, pfn - ws, pfn - ws + n)
                else:
                    for i in _set_bits(mask, n):
                        clear_range(keep, pfn - ws + i, pfn - ws + i + 1)
                del data
                pfn += n
                read += nbytes
                monitor.advance(nbytes, 0)
    return read


def _set_bits(mask: bytes, n: int) -> Iterator[int]:
    for i, b in enumerate(mask):
        while b:
            low = b & -b
            j = i * 8 + low.bit_length() - 1
            if j < n:
                yield j
            b ^= low


class SegmentPlanner:
    """Output segments from the kept pages, fed one bitmap window at a time.

    Splits every PT_LOAD around runs of >= MIN_EXCLUDED_RUN pages whose bit is 0. Each
    output segment holds a stretch of data followed by the excluded run it precedes
    (memsz > filesz), so readers still find those addresses and read them as zeros.
    Shorter excluded runs are copied, as makedumpfile does (PFN_EXCLUDED). Only the gaps
    are kept, as two u64 each (at most MAX_XNUM_PHNUM of them: 4 MiB), and the segments
    are made from them each time the planner is iterated: a list of segment objects grew
    the save by 9 MiB at level 1 on a 64 GiB machine.

    Past 0xFFFE segments the file uses extended numbering (PN_XNUM), as makedumpfile -E
    does. A machine whose kept pages are so scattered that even that is not enough gets
    its shortest excluded runs copied after all (the run length needed doubles until the
    gaps fit): the dump is larger, but it is saved.
    """

    def __init__(self, vm: Vmcore, max_gaps: int | None = None) -> None:
        self.vm = vm
        self.loads = vm.loads
        # one program header for the notes and one for each segment: a PT_LOAD's gaps plus
        # its tail (at most MAX_XNUM_PHNUM in all)
        self.max_gaps = MAX_XNUM_PHNUM - 1 - len(vm.loads) if max_gaps is None else max_gaps
        if self.max_gaps < 1:
            raise VmcoreError(f"{vm.path}: {len(vm.loads)} PT_LOADs leave no program headers")
        self.min_run = MIN_EXCLUDED_RUN
        # per aligned PT_LOAD: [first pfn, end pfn, end of the last kept run, gaps]
        self.state: list[list] = []
        for p in self.loads:
            if _aligned(p):
                first = p.paddr // PAGE
                self.state.append([first, first + p.filesz // PAGE, first, array.array("Q")])
            else:
                self.state.append([])
        self.ngaps = 0

    def add(self, win: Window) -> None:
        for st in self.state:
            if not st:
                continue
            first, stop, prev, gaps = st
            limit = min(stop, win.end) - win.start
            if limit <= 0 or first >= win.end:
                continue
            for start, end in iter_runs(win.second, limit):
                start += win.start
                end += win.start
                if end <= first:
                    continue
                start = max(start, first)
                if start - prev >= self.min_run:
                    self._gap(gaps, prev - first, start - prev)
                prev = end
            st[2] = prev

    def _gap(self, gaps: array.array, start: int, n: int) -> None:
        gaps.append(start)
        gaps.append(n)
        self.ngaps += 1
        while self.ngaps > self.max_gaps:
            self._coarsen()

    def _coarsen(self) -> None:
        """Copy the excluded runs shorter than twice the current length, from now on too."""
        self.min_run *= 2
        self.ngaps = 0
        for st in self.state:
            if st:
                gaps = st[3]
                kept = array.array("Q")
                for i in range(0, len(gaps), 2):
                    if gaps[i + 1] >= self.min_run:
                        kept.append(gaps[i])
                        kept.append(gaps[i + 1])
                gaps[:] = kept  # in place: add() holds this array while it runs
                self.ngaps += len(gaps) // 2
        log.info(
            "more excluded runs than ELF program headers can describe: runs shorter than "
            "%d pages are copied",
            self.min_run,
        )

    @property
    def note(self) -> str | None:
        """What the README says when short excluded runs were copied."""
        if self.min_run == MIN_EXCLUDED_RUN:
            return None
        return (
            f"the kept pages are scattered: excluded runs shorter than {self.min_run} pages "
            f"(not {MIN_EXCLUDED_RUN}) are copied, so that the segments fit the ELF "
            "program headers"
        )

    def finish(self) -> None:
        """After the last window: the excluded run that ends each PT_LOAD (once), however
        short: makedumpfile copies only the short runs that kept pages follow."""
        for st in self.state:
            if st:
                first, stop, prev, gaps = st
                if stop > prev:
                    self._gap(gaps, prev - first, stop - prev)
                st[2] = stop

    def __iter__(self) -> Iterator[OutSeg]:
        """The output segments in file order (call ``finish`` first; each pass makes them anew)."""
        for p, st in zip(self.loads, self.state, strict=True):
            if not st:
                yield OutSeg(p.vaddr, p.paddr, p.offset, p.filesz, p.memsz, p.flags)
                continue
            gaps = st[3]
            pos = 0  # page index where the current output segment starts
            for i in range(0, len(gaps), 2):
                zstart, zlen = gaps[i], gaps[i + 1]
                yield _seg(p, pos, zstart - pos, zstart + zlen - pos)
                pos = zstart + zlen
            tail_file = p.filesz - pos * PAGE
            tail_mem = p.memsz - pos * PAGE
            if tail_mem > 0 or not gaps:
                yield OutSeg(
                    p.vaddr + pos * PAGE,
                    p.paddr + pos * PAGE,
                    p.offset + pos * PAGE,
                    max(tail_file, 0),
                    tail_mem,
                    p.flags,
                )


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
    vm: Vmcore,
    segs: Iterable[OutSeg],
    sink,
    monitor: Monitor,
    level: int,
    source: int | None = None,
) -> WriteResult:
    """Write ELF header, PT_NOTE + ``segs`` program headers, the notes and segment data.

    ``segs`` is iterated twice (headers, then data): a list, or a finished SegmentPlanner.
    With ``source`` (bytes of the segments' data in ``vm``), progress counts what lies
    between the output's segments as done when passing it, and reaches ``source`` in all.
    """
    phnum = 1 + sum(1 for _ in segs)
    if phnum > MAX_XNUM_PHNUM:
        raise VmcoreError(f"{vm.path}: {phnum} output segments exceed the ELF limit")
    xnum = phnum >= PN_XNUM  # extended numbering: section 0 follows the program headers
    hdr_len = EHDR.size + PHDR.size * phnum + (SHDR.size if xnum else 0)
    notes_off = _page_up(hdr_len)
    data_off = notes_off + _page_up(len(vm.notes_blob))
    machine = vm.ehdr.machine if vm.ehdr else 62
    head = bytearray(Ehdr.core(phnum, machine).pack())
    nlen = len(vm.notes_blob)
    head += Phdr(PT_NOTE, 0, notes_off, 0, 0, nlen, nlen, 0).pack()
    off = data_off
    for s in segs:
        head += Phdr(PT_LOAD, s.flags, off, s.vaddr, s.paddr, s.filesz, s.memsz, 0).pack()
        off += _page_up(s.filesz)
        if len(head) >= HEAD_CHUNK:  # up to 14 MiB of headers: written as they are made
            sink.write(head)
            head = bytearray()
    if xnum:
        head += xnum_section(phnum)
    head += bytes(notes_off - hdr_len)
    # The notes straight from where they are held: a device-dump note can be tens of MiB,
    # and each copy of it counted against the capture kernel's memory.
    sink.write(head)
    del head
    sink.write(vm.notes_blob)
    pad = data_off - notes_off - nlen
    sink.write(bytes(pad))
    monitor.advance(0, data_off)

    buf = bytearray(CHUNK)
    written_pages = 0
    incomplete = None
    passed = 0  # source bytes progress has counted
    at = min((p.offset for p in vm.loads), default=0)  # where the last segment ended
    for s in segs:
        if source is not None and s.src > at:
            skip = min(s.src - at, source - passed)
            passed += skip
            monitor.advance(skip, 0)
        at = s.src + s.filesz
        done = 0
        while done < s.filesz:
            want = min(CHUNK, s.filesz - done)
            data = vm.view(s.src + done, want)
            if data is None:
                data = memoryview(buf)[:want]
                try:
                    n = vm.read_data(data, s.src + done)
                except VmcoreError as e:
                    incomplete, n = str(e), 0
                data = data[:n]
            else:
                n = want
            if n:
                sink.write(data)
                done += n
                passed += n
                monitor.advance(n, n)
            del data
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
    if source is not None and not incomplete and passed < source:
        monitor.advance(source - passed, 0)
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
