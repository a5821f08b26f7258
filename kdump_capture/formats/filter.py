"""Dump-level page filtering: which page frames a dump keeps, as makedumpfile 1.7.2 decides it.

Bits of the dump level: 1 zero pages (decided by content while copying, not here), 2 cache
pages without private data, 4 all cache pages, 8 user (anonymous and hugetlbfs) pages,
16 free pages. Bits 2-16 are decided from each page's ``struct page``, read from the dump
itself through VMCOREINFO and the kernel's page tables (``__exclude_unnecessary_pages()``).

Bitmaps are makedumpfile's: bit ``pfn & 7`` of byte ``pfn >> 3``, LSB first.
"""

from __future__ import annotations

import array
import bisect
import logging
import os
import re
import struct
import time
from collections.abc import Iterator

from .. import speedups
from ..elf import PT_LOAD
from ..errors import VmcoreError
from ..kernel import (
    PAGE,
    PAGE_SHIFT,
    U64_MASK,
    AddressError,
    ElfPhysMemory,
    Kernel,
    KernelInfoError,
    MemMaps,
    VmcoreInfo,
    max_mapnr_of,
    merge_spans,
)
from ..record import Record
from ..vmcore import Vmcore

log = logging.getLogger(__name__)

DL_EXCLUDE_ZERO = 1
DL_EXCLUDE_CACHE = 2
DL_EXCLUDE_CACHE_PRI = 4
DL_EXCLUDE_USER_DATA = 8
DL_EXCLUDE_FREE = 16
STRUCT_PAGE_BITS = DL_EXCLUDE_CACHE | DL_EXCLUDE_CACHE_PRI | DL_EXCLUDE_USER_DATA | DL_EXCLUDE_FREE
MAX_DUMP_LEVEL = 31
# makedumpfile reads struct pages in blocks of PGMM_CACHED; a compound head in the last slot
# of a block never has its order read (harmless: heads are aligned to their order).
PGMM_CACHED = 512
PAGE_MAPPING_ANON = 1


# -- bitmaps ------------------------------------------------------------------------------
def bitmap_half_len(max_mapnr: int, block: int = PAGE) -> int:
    """Bytes of one bitmap in a kdump file: ``ceil(ceil(max_mapnr/8)/block)*block``."""
    nbytes = (max_mapnr + 7) // 8
    return (nbytes + block - 1) // block * block


def bitmap_memory(max_mapnr: int) -> int:
    """Bytes the filter holds for a machine of ``max_mapnr`` page frames, for the memory
    budget and ``kdump-capture estimate``; follows how bitmaps are kept: one window of both
    bitmaps, plus the 2nd bitmap's windows of the first pass while they fit CACHE_BYTES."""
    half = bitmap_half_len(max_mapnr)
    window = min(half, WINDOW_PFNS // 8)
    cached = half if half <= CACHE_BYTES else 0
    return 2 * window + cached


def set_range(bm: bytearray, start: int, end: int) -> None:
    """Set bits ``start <= pfn < end``."""
    _fill_range(bm, start, end, True)


def clear_range(bm: bytearray, start: int, end: int) -> None:
    """Clear bits ``start <= pfn < end`` (clipped to the bitmap)."""
    _fill_range(bm, start, min(end, len(bm) * 8), False)


def _fill_range(bm: bytearray, start: int, end: int, value: bool) -> None:
    if start >= end:
        return
    first, last = start >> 3, (end - 1) >> 3
    lo_mask = (0xFF << (start & 7)) & 0xFF
    hi_mask = 0xFF >> (7 - ((end - 1) & 7))
    if first == last:
        m = lo_mask & hi_mask
        bm[first] = bm[first] | m if value else bm[first] & ~m
        return
    if value:
        bm[first] |= lo_mask
        bm[last] |= hi_mask
        bm[first + 1 : last] = b"\xff" * (last - first - 1)
    else:
        bm[first] &= ~lo_mask & 0xFF
        bm[last] &= ~hi_mask & 0xFF
        bm[first + 1 : last] = bytes(last - first - 1)


def test_bit(bm: bytes | bytearray, pfn: int) -> bool:
    return bool(bm[pfn >> 3] >> (pfn & 7) & 1)


_POPCOUNT = bytes(bin(i).count("1") for i in range(256))  # byte -> its set bits (translate)
_COUNT_PIECE = 1 << 16  # bytes per int.bit_count(): its copy stays this small


def count_bits(bm: bytes | bytearray | memoryview) -> int:
    """Number of set bits (``int.bit_count`` over pieces of the bitmap, in C)."""
    view = memoryview(bm).cast("B")
    return sum(
        int.from_bytes(view[i : i + _COUNT_PIECE], "little").bit_count()
        for i in range(0, len(view), _COUNT_PIECE)
    )


def _byte_runs() -> list[tuple[tuple[int, int], ...]]:
    out = []
    for v in range(256):
        runs = []
        b = 0
        while b < 8:
            if v >> b & 1:
                s = b
                while b < 8 and v >> b & 1:
                    b += 1
                runs.append((s, b))
            else:
                b += 1
        out.append(tuple(runs))
    return out


_RUNS = _byte_runs()
_NONZERO = re.compile(rb"\xff+|[^\x00\xff]")


def iter_runs(bm: bytes | bytearray, limit: int | None = None) -> Iterator[tuple[int, int]]:
    """Maximal runs ``(start, end)`` of set bits in ascending order, below ``limit``."""
    run_s = run_e = -1
    for m in _NONZERO.finditer(bm):
        base = m.start() * 8
        if bm[m.start()] == 0xFF:
            pieces: tuple[tuple[int, int], ...] = ((0, (m.end() - m.start()) * 8),)
        else:
            pieces = _RUNS[bm[m.start()]]
        for s, e in pieces:
            s += base
            e += base
            if s == run_e:
                run_e = e
                continue
            if run_e > run_s:
                yield from _clip(run_s, run_e, limit)
            run_s, run_e = s, e
    if run_e > run_s:
        yield from _clip(run_s, run_e, limit)


def _clip(s: int, e: int, limit: int | None) -> Iterator[tuple[int, int]]:
    if limit is not None:
        e = min(e, limit)
    if s < e:
        yield s, e


# -- struct page rules ----------------------------------------------------------------------
def _test_bit_mask(nr: int | None) -> int:
    """makedumpfile's ``test_bit(nr, flags)`` as a mask: ``int mask = 1 << (nr & 31)``.

    Bit 31 makes a negative int that sign-extends to all upper bits; kept for fidelity.
    """
    if nr is None:
        return 0
    b = nr & 0x1F
    return 0xFFFFFFFF80000000 if b == 31 else 1 << b


def _u32(v: int | None) -> int | None:
    return None if v is None else v & 0xFFFFFFFF


class PageRules(Record):
    """Struct page layout and flag values from VMCOREINFO, for ``exclude_pages``."""

    __slots__ = (
        "size",
        "off_flags",
        "off_mapping",
        "off_mapcount",
        "off_private",
        "off_chead",
        "off_order",
        "off_dtor",
        "lru",
        "private",
        "swapcache",
        "swapbacked",
        "head_mask",
        "hwpoison",
        "slab_bit",
        "slab_mapcount",
        "buddy",
        "offline",
        "hugetlb_dtor",
        "nr_free_area",
    )

    def __init__(
        self,
        size: int,
        off_flags: int,
        off_mapping: int,
        off_mapcount: int | None,
        off_private: int | None,
        off_chead: int | None,
        off_order: int,  # in the struct page after a head page; 0 = unknown (order 0)
        off_dtor: int,  # likewise; 0 = unknown
        lru: int,
        private: int,
        swapcache: int,
        swapbacked: int | None,  # None: kernel before 4.10 (no PG_swapbacked)
        head_mask: int,
        hwpoison: int,  # 0 when not exported
        slab_bit: int,  # full 64-bit mask of PG_slab (0 if unknown)
        slab_mapcount: int | None,  # 6.10+ page type value, as u32
        buddy: int | None,  # PAGE_BUDDY_MAPCOUNT_VALUE as u32; None: cannot identify free pages
        offline: int | None,
        hugetlb_dtor: int | None,
        nr_free_area: int | None,
    ) -> None:
        self.size = size
        self.off_flags = off_flags
        self.off_mapping = off_mapping
        self.off_mapcount = off_mapcount
        self.off_private = off_private
        self.off_chead = off_chead
        self.off_order = off_order
        self.off_dtor = off_dtor
        self.lru = lru
        self.private = private
        self.swapcache = swapcache
        self.swapbacked = swapbacked
        self.head_mask = head_mask
        self.hwpoison = hwpoison
        self.slab_bit = slab_bit
        self.slab_mapcount = slab_mapcount
        self.buddy = buddy
        self.offline = offline
        self.hugetlb_dtor = hugetlb_dtor
        self.nr_free_area = nr_free_area

    @classmethod
    def from_info(cls, info: VmcoreInfo) -> PageRules:
        size = info.need_size("page")
        off_order = info.offset("page.compound_order")
        off_dtor = info.offset("page.compound_dtor")
        if off_order is None:
            folio_order = info.offset("folio._folio_order")
            off_order = folio_order - size if folio_order is not None else 0
        if off_dtor is None:
            folio_dtor = info.offset("folio._folio_dtor")
            off_dtor = folio_dtor - size if folio_dtor is not None else 0
        slab = info.number("PG_slab")
        for name in ("PG_lru", "PG_private", "PG_swapcache", "PG_head_mask"):
            info.need_number(name)
        if not 0 < size <= 256:
            raise KernelInfoError(f"VMCOREINFO: implausible SIZE(page)={size}")
        # Order and destructor are single bytes of the struct page after a head page.
        for what, off in (("compound order", off_order), ("compound dtor", off_dtor)):
            if not 0 <= off < size:
                raise KernelInfoError(f"VMCOREINFO: implausible offset {off} of the {what}")
        return cls(
            size=size,
            off_flags=info.need_offset("page.flags"),
            off_mapping=info.need_offset("page.mapping"),
            off_mapcount=info.offset("page._mapcount"),
            off_private=info.offset("page.private"),
            off_chead=info.offset("page.compound_head"),
            off_order=off_order,
            off_dtor=off_dtor,
            lru=_test_bit_mask(info.number("PG_lru")),
            private=_test_bit_mask(info.number("PG_private")),
            swapcache=_test_bit_mask(info.number("PG_swapcache")),
            swapbacked=(
                None
                if info.number("PG_swapbacked") is None
                else _test_bit_mask(info.number("PG_swapbacked"))
            ),
            head_mask=info.need_number("PG_head_mask") & U64_MASK,
            hwpoison=_test_bit_mask(info.number("PG_hwpoison")),
            slab_bit=(1 << slab) & U64_MASK if slab is not None and 0 <= slab < 64 else 0,
            slab_mapcount=_u32(info.number("PAGE_SLAB_MAPCOUNT_VALUE")),
            buddy=(
                _u32(info.number("PAGE_BUDDY_MAPCOUNT_VALUE"))
                if info.offset("page.private") is not None
                and info.offset("page._mapcount") is not None
                else None
            ),
            offline=_u32(info.number("PAGE_OFFLINE_MAPCOUNT_VALUE")),
            hugetlb_dtor=info.number("HUGETLB_PAGE_DTOR"),
            nr_free_area=info.length("zone.free_area"),
        )

    def unpacker(self) -> struct.Struct:
        """A Struct pulling (flags, mapping, chead, mapcount, private) out of one struct page."""
        fields = [("flags", self.off_flags, "Q"), ("mapping", self.off_mapping, "Q")]
        fields.append(("chead", self.off_chead, "Q") if self.off_chead is not None else None)
        fields.append(
            ("mapcount", self.off_mapcount, "I") if self.off_mapcount is not None else None
        )
        fields.append(("private", self.off_private, "Q") if self.off_private is not None else None)
        present = sorted((f for f in fields if f), key=lambda f: f[1])
        fmt = "<"
        pos = 0
        for _, off, code in present:
            if off < pos:
                raise KernelInfoError("VMCOREINFO: overlapping struct page field offsets")
            fmt += f"{off - pos}x{code}" if off > pos else code
            pos = off + struct.calcsize("<" + code)
        if pos > self.size:
            raise KernelInfoError("VMCOREINFO: struct page fields run past SIZE(page)")
        fmt += f"{self.size - pos}x"
        return struct.Struct(fmt)

    def field_order(self) -> list[str]:
        names = [("flags", self.off_flags), ("mapping", self.off_mapping)]
        for name, off in (
            ("chead", self.off_chead),
            ("mapcount", self.off_mapcount),
            ("private", self.off_private),
        ):
            if off is not None:
                names.append((name, off))
        return [n for n, _ in sorted(names, key=lambda x: x[1])]


COUNTERS = ("free", "cache", "cache_private", "user", "hwpoison", "offline")

# Bitmaps are made and used one window of page frames at a time, never whole: 2^21 frames
# (8 GiB of RAM) make 256 KiB per bitmap window, so memory for bitmaps stays a few windows
# at any RAM size, as in makedumpfile's cyclic mode. A multiple of PGMM_CACHED, of 8 (whole
# bitmap bytes) and of x86_64's section size (2^15 frames).
WINDOW_PFNS = 1 << 21
# Writers that need the 2nd bitmap twice (kdump: count, then write) keep the windows of the
# first pass when they all fit in this much; beyond it they are computed again, as
# makedumpfile does. 1 MiB holds four windows (32 GiB of RAM).
CACHE_BYTES = 1 << 20
# File offsets in struct-page extents that are not offsets.
UNREADABLE = U64_MASK
ZERO_FILL = U64_MASK - 1
# Buddy orders and compound orders at or above this cannot be real (and would make
# ranges of 2^64 pages); a buddy page claiming one is kept and counted as invalid.
MAX_ORDER_BITS = 64


class Window(Record):
    """Both bitmaps for page frames ``start <= pfn < end`` (bit ``pfn - start``)."""

    __slots__ = ("start", "end", "first", "second")

    def __init__(self, start: int, end: int, first: bytearray, second: bytearray) -> None:
        self.start = start
        self.end = end
        self.first = first
        self.second = second


class ScanState:
    """What the struct-page walk carries from one window into the next."""

    __slots__ = ("skip_sec", "skip_to", "carry_end", "counts", "unreadable", "bad_order")

    def __init__(self) -> None:
        self.skip_sec = -1  # the section whose walk continues into the next window ...
        self.skip_to = 0  # ... and the pfn it resumes at (after a compound or buddy range)
        self.carry_end = 0  # an excluded range that reaches past the window ends here
        self.counts = [0] * len(COUNTERS)
        self.unreadable = 0
        self.bad_order = 0


class Summary(Record):
    """What a whole pass over the windows found (for headers, estimates and README)."""

    __slots__ = ("max_mapnr", "level", "pages_total", "num_dumpable", "excluded", "notes")

    def __init__(
        self,
        max_mapnr: int,
        level: int,  # the level applied (bits that could not be applied are cleared)
        pages_total: int,  # bits set in the 1st bitmap
        num_dumpable: int,  # bits set in the 2nd bitmap
        excluded: dict[str, int] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.max_mapnr = max_mapnr
        self.level = level
        self.pages_total = pages_total
        self.num_dumpable = num_dumpable
        self.excluded = {} if excluded is None else excluded
        self.notes = [] if notes is None else notes


def needs_struct_pages(level: int, info: VmcoreInfo) -> bool:
    """Whether makedumpfile would walk struct pages at ``level`` (create_2nd_bitmap())."""
    if level & (DL_EXCLUDE_CACHE | DL_EXCLUDE_CACHE_PRI | DL_EXCLUDE_USER_DATA):
        return True
    if info.number("PG_hwpoison") is not None:
        return True
    return bool(level & DL_EXCLUDE_FREE)


def _in_window(spans: list[tuple[int, int]], ws: int, we: int) -> Iterator[tuple[int, int]]:
    """The parts of sorted, disjoint pfn ``spans`` inside the window ``ws..we``, as bit
    ranges of the window."""
    i = bisect.bisect_right(spans, (ws, U64_MASK)) - 1
    for s, e in spans[max(i, 0) :]:
        if s >= we:
            break
        if e > ws:
            yield max(s, ws) - ws, min(e, we) - ws


class PageFilter:
    """The bitmaps of one vmcore at one dump level, produced window by window.

    Never raises for filtering problems: what cannot be applied is kept in the dump and
    explained in the notes. ``windows()`` may be called again; it gives the same windows.
    """

    def __init__(
        self,
        vm: Vmcore,
        level: int,
        window_pfns: int | None = None,
        cache_bytes: int | None = None,
        accelerated: bool | None = None,
    ) -> None:
        window_pfns = WINDOW_PFNS if window_pfns is None else window_pfns
        cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
        if window_pfns <= 0 or window_pfns % PGMM_CACHED:
            raise ValueError("window_pfns must be a positive multiple of PGMM_CACHED")
        self.vm = vm
        self.level = level
        self.window_pfns = window_pfns
        self.cache_bytes = cache_bytes
        self._accel = speedups.module() if accelerated is None or accelerated else None
        if accelerated and self._accel is None:
            raise RuntimeError("the compiled accelerator is not available")
        loads = vm.loads
        max_mapnr = max_mapnr_of(loads)
        # RAM is what the file holds data for (see max_mapnr_of)
        ram = merge_spans(
            (p.paddr >> PAGE_SHIFT, (p.paddr + p.filesz + PAGE - 1) >> PAGE_SHIFT)
            for p in loads
            if p.type == PT_LOAD and p.filesz
        )
        notes: list[str] = []
        applied = level
        self.kernel: Kernel | None = None
        self.mem_maps: MemMaps | None = None
        self.rules: PageRules | None = None
        info = VmcoreInfo(vm.vmcoreinfo)
        try:
            want_pages = needs_struct_pages(level, info)
        except VmcoreError as e:
            want_pages = False
            notes.append(_fallback_note(level, e))
        kernel = None
        if want_pages:
            try:
                kernel = Kernel(info, ElfPhysMemory(loads, vm.pread, vm.path))
                self.mem_maps = kernel.mem_maps(max_mapnr, ram)
                if self.mem_maps.ranges:
                    max_mapnr = min(max_mapnr, self.mem_maps.end)
            except VmcoreError as e:
                kernel = None
                notes.append(_fallback_note(level, e))
        if kernel is not None:
            try:
                rules = PageRules.from_info(info)
                if level & DL_EXCLUDE_FREE and rules.buddy is None:
                    notes.append(
                        "dump level bit 16 (free pages) needs PAGE_BUDDY_MAPCOUNT_VALUE in "
                        "VMCOREINFO; free pages were kept"
                    )
                    applied &= ~DL_EXCLUDE_FREE
                rules.unpacker()  # checks the field offsets now, not halfway through
                self.kernel, self.rules = kernel, rules
            except VmcoreError as e:
                notes.append(_fallback_note(level, e))
                applied &= ~STRUCT_PAGE_BITS
        elif level & STRUCT_PAGE_BITS:
            applied &= ~STRUCT_PAGE_BITS
        self.max_mapnr = max_mapnr
        self.applied = applied
        self.notes = notes
        self.half_len = bitmap_half_len(max_mapnr)
        self._mem = ElfPhysMemory(loads, vm.pread, vm.path)
        self._ram = [(s, min(e, max_mapnr)) for s, e in ram if s < max_mapnr]
        # Pages a PT_LOAD's file data does not fill, from the one its data ends in (p_filesz
        # mid-page or short of p_memsz) to its end: never dumped, as makedumpfile's
        # exclude_nodata_pages() has it, even where another PT_LOAD covers them. Dumped,
        # they held zeros for bytes the vmcore has (or lacks): not what memory held.
        # Page frames whose first byte has file data (is_in_segs()): the struct-page walk
        # looks at no others. Where a PT_LOAD starts mid-page, that page is in the 1st
        # bitmap but not here, and makedumpfile keeps it whatever its struct page says.
        in_segs = merge_spans(
            (-(-p.paddr // PAGE), min(max_mapnr, -(-(p.paddr + p.filesz) // PAGE)))
            for p in loads
            if p.type == PT_LOAD
        )
        self._in_segs = None if in_segs == self._ram else in_segs
        self._nodata = merge_spans(
            ((p.paddr + p.filesz) >> PAGE_SHIFT, min(max_mapnr, -(-(p.paddr + p.memsz) // PAGE)))
            for p in loads
            if p.type == PT_LOAD
        )
        self._params = _rule_params(self.rules, level) if self.rules else None
        self._cache: list[bytes] | None = None
        self._summary: Summary | None = None
        self.walk_seconds = 0.0  # struct-page walk, all passes (reported like makedumpfile's
        self.walks = 0  # "STEP [Excluding unnecessary pages]" times)

    # -- windows ----------------------------------------------------------------------
    def window_spans(self) -> list[tuple[int, int]]:
        """Runs ``(first, last + 1)`` of the window numbers that hold RAM, and the last one
        of the bitmap (written even when empty, so a file always reaches its end)."""
        w = self.window_pfns
        spans = [(s // w, (e - 1) // w + 1) for s, e in self._ram]
        last = max(0, (self.half_len * 8 - 1) // w)
        spans.append((last, last + 1))
        return merge_spans(spans)

    def windows(self) -> Iterator[Window]:
        """Every window with RAM in it (and the last), in ascending order.

        The consumer may change a window's bitmaps; the next window is made afresh.
        """
        cache = self._cache
        spans = self.window_spans()
        # The 2nd bitmap's windows are kept only when all of them fit: known before the
        # first one is made, so a larger machine never holds part of a cache it drops.
        whole = sum(
            (min(hi * self.window_pfns, self.half_len * 8) - lo * self.window_pfns) >> 3
            for lo, hi in spans
        )
        keep: list[bytes] | None = None
        if cache is None and 0 < whole <= self.cache_bytes:
            keep = []
        state = ScanState()
        total = dumpable = 0
        i = 0
        for lo, hi in spans:
            for idx in range(lo, hi):
                ws = idx * self.window_pfns
                we = min(ws + self.window_pfns, self.half_len * 8)
                first = self._first_window(ws, we)
                if cache is not None:
                    second = bytearray(cache[i])
                else:
                    second = bytearray(first)
                    self._clear_nodata(ws, we, second)
                    if self.rules is not None:
                        self._exclude(ws, we, first, second, state)
                    if keep is not None:
                        keep.append(bytes(second))
                i += 1
                if self._summary is None:
                    total += count_bits(first)
                    dumpable += count_bits(second)
                yield Window(ws, we, first, second)
        if cache is None:
            self._cache = keep
            self.walks += self.rules is not None
        if self._summary is None:
            self._summary = self._finish(state, total, dumpable)

    def walk_report(self) -> str:
        """How long the struct-page walk took, for the log."""
        if not self.walks:
            return "no struct-page walk at this level"
        return (
            f"struct-page walk {self.walk_seconds:.3f} s in {self.walks} pass(es) "
            f"({'compiled' if self._accel is not None else 'pure Python'})"
        )

    def summary(self) -> Summary:
        """Counts over all windows: from the first whole pass, or one made now."""
        if self._summary is None:
            for _ in self.windows():
                pass
        assert self._summary is not None
        return self._summary

    def _finish(self, st: ScanState, total: int, dumpable: int) -> Summary:
        excluded = dict(zip(COUNTERS, st.counts, strict=True)) if self.rules else {}
        if st.unreadable:
            self.notes.append(
                f"struct pages of {st.unreadable} page frames could not be read; "
                "those pages were kept"
            )
        if st.bad_order:
            self.notes.append(f"{st.bad_order} free pages had an invalid buddy order and were kept")
        return Summary(self.max_mapnr, self.applied, total, dumpable, excluded, list(self.notes))

    def _first_window(self, ws: int, we: int, spans: list[tuple[int, int]] | None = None):
        """1 = the pfn lies in a PT_LOAD (``create_1st_bitmap()``): end rounded up, clipped."""
        bm = bytearray((we - ws) >> 3)
        for s, e in _in_window(self._ram if spans is None else spans, ws, we):
            set_range(bm, s, e)
        return bm

    def _clear_nodata(self, ws: int, we: int, second: bytearray) -> None:
        for s, e in _in_window(self._nodata, ws, we):
            clear_range(second, s, e)

    def _exclude(self, ws: int, we: int, first: bytearray, second: bytearray, st: ScanState):
        assert self.mem_maps is not None and self._params is not None
        size = self.mem_maps.page_size
        sections = []
        spans = []
        for s, e, mem_map in self.mem_maps.sections(ws, we):
            lo, hi = max(s, ws), min(e, we)
            a, b = (lo - ws) >> 3, (hi - ws + 7) >> 3
            if first.count(0, a, b) == b - a:  # no RAM in this section (no slice copied)
                continue
            sections.append((s, e, mem_map))
            spans.append((mem_map + (lo - s) * size, mem_map + (hi - s) * size))
        if st.carry_end > ws:
            clear_range(second, 0, min(st.carry_end, we) - ws)
        if not sections:
            return
        if self._in_segs is not None:
            first = self._first_window(ws, we, self._in_segs)
        t0 = time.perf_counter()
        extents = self._extents(spans)
        fd, base = self.vm.fd, self.vm.base
        if self._accel is not None:
            out = self._accel.scan_window(
                fd, base, _pack(extents), _pack(sections), self._params, ws, we, first, second,
                (st.skip_sec, st.skip_to, st.carry_end),
            )  # fmt: skip
            st.skip_sec, st.skip_to, st.carry_end, st.unreadable, st.bad_order = (
                out[0],
                out[1],
                out[2],
                st.unreadable + out[3],
                st.bad_order + out[4],
            )
            for k in range(len(COUNTERS)):
                st.counts[k] = min(st.counts[k] + out[5 + k], U64_MASK)
        else:
            scan_window(fd, base, extents, sections, self._params, ws, we, first, second, st)
        self.walk_seconds += time.perf_counter() - t0

    def _extents(self, spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """Where the struct pages in ``spans`` (virtual) are in the vmcore file."""
        assert self.kernel is not None
        out: list[tuple[int, int, int]] = []

        def add(va: int, end: int, off: int) -> None:
            if out:
                p_va, p_end, p_off = out[-1]
                same = off == p_off if off >= ZERO_FILL else off == p_off + (va - p_va)
                if p_end == va and same:
                    out[-1] = (p_va, end, p_off)
                    return
            out.append((va, end, off))

        for va, end in sorted(spans):
            while va < end:
                try:
                    pa, left = self.kernel.translate(va)
                except AddressError:
                    n = min(end - va, PAGE - (va & (PAGE - 1)))
                    add(va, va + n, UNREADABLE)
                    va += n
                    continue
                n = min(left, end - va)
                while n > 0:
                    seg = self._mem.find(pa)
                    if seg is None:
                        k = min(n, self._mem.next_start(pa) - pa)
                        add(va, va + k, UNREADABLE)
                    else:
                        k = min(n, seg.end - pa)
                        fk = max(0, min(k, seg.file_end - pa))
                        if fk:
                            add(va, va + fk, seg.offset + (pa - seg.paddr))
                        if k > fk:
                            add(va + fk, va + k, ZERO_FILL)
                    va += k
                    pa += k
                    n -= k
        return out


def _pack(rows: list[tuple[int, int, int]]) -> bytes:
    return array.array("Q", [v for row in rows for v in row]).tobytes()


# -- the struct-page walk over one window (the reference; _speedups.c mirrors it) -------------
# Indexes into the parameter tuple that _rule_params() builds.
(P_SIZE, P_FLAGS, P_MAPPING, P_MAPCOUNT, P_PRIVATE, P_CHEAD, P_ORDER, P_DTOR, P_LRU, P_PRIV,
 P_SWAPCACHE, P_SWAPBACKED, P_HAS_SWAPBACKED, P_HEAD, P_HWPOISON, P_SLAB_BIT, P_SLAB_MC,
 P_HAS_SLAB_MC, P_BUDDY, P_OFFLINE, P_HAS_OFFLINE, P_DTOR_HUGETLB, P_HAS_DTOR_HUGETLB,
 P_NR_FREE_AREA, P_HAS_NR_FREE_AREA, P_EX_FREE, P_EX_CACHE, P_EX_CACHE_PRI,
 P_EX_USER, P_COUNT) = range(30)  # fmt: skip
NO_OFFSET = U64_MASK


def _rule_params(r: PageRules, level: int) -> tuple[int, ...]:
    """The rules and level as a flat tuple of unsigned 64-bit numbers (for either walk)."""

    def off(v: int | None) -> int:
        return NO_OFFSET if v is None else v

    p = [0] * P_COUNT
    p[P_SIZE] = r.size
    p[P_FLAGS], p[P_MAPPING] = r.off_flags, r.off_mapping
    p[P_MAPCOUNT], p[P_PRIVATE] = off(r.off_mapcount), off(r.off_private)
    p[P_CHEAD] = off(r.off_chead)
    p[P_ORDER], p[P_DTOR] = r.off_order, r.off_dtor
    p[P_LRU], p[P_PRIV], p[P_SWAPCACHE] = r.lru, r.private, r.swapcache
    p[P_SWAPBACKED] = r.swapbacked or 0
    p[P_HAS_SWAPBACKED] = int(r.swapbacked is not None)
    p[P_HEAD], p[P_HWPOISON], p[P_SLAB_BIT] = r.head_mask, r.hwpoison, r.slab_bit
    p[P_SLAB_MC] = r.slab_mapcount or 0
    p[P_HAS_SLAB_MC] = int(r.slab_mapcount is not None)
    p[P_BUDDY] = r.buddy or 0
    p[P_OFFLINE] = r.offline or 0
    p[P_HAS_OFFLINE] = int(r.offline is not None)
    dtor = r.hugetlb_dtor
    # The order byte read from memory is 0-255: other values never match.
    p[P_DTOR_HUGETLB] = dtor if dtor is not None and 0 <= dtor <= 255 else 0
    p[P_HAS_DTOR_HUGETLB] = int(dtor is not None and 0 <= dtor <= 255)
    nfa = r.nr_free_area
    # A negative length makes every buddy order invalid, as ``private >= nfa`` does.
    p[P_NR_FREE_AREA] = max(nfa, 0) if nfa is not None else 0
    p[P_HAS_NR_FREE_AREA] = int(nfa is not None and nfa <= U64_MASK)
    p[P_EX_FREE] = int(bool(level & DL_EXCLUDE_FREE) and r.buddy is not None)
    p[P_EX_CACHE] = int(bool(level & DL_EXCLUDE_CACHE))
    p[P_EX_CACHE_PRI] = int(bool(level & DL_EXCLUDE_CACHE_PRI))
    p[P_EX_USER] = int(bool(level & DL_EXCLUDE_USER_DATA))
    for v in p:
        assert 0 <= v <= U64_MASK
    return tuple(p)


class _ExtentReader:
    """Reads struct pages at kernel virtual addresses through precomputed extents."""

    def __init__(self, fd: int, base: int, extents: list[tuple[int, int, int]]) -> None:
        self.fd, self.base, self.ext = fd, base, sorted(extents)
        self.starts = [e[0] for e in self.ext]

    def read(self, va: int, n: int) -> bytes | None:
        """``n`` bytes at ``va``, or None if any of them cannot be read."""
        i = bisect.bisect_right(self.starts, va) - 1
        parts = []
        while n > 0:
            if i < 0 or i >= len(self.ext):
                return None
            s, e, off = self.ext[i]
            if not s <= va < e or off == UNREADABLE:
                return None
            k = min(n, e - va)
            if off == ZERO_FILL:
                parts.append(bytes(k))
            else:
                try:
                    data = os.pread(self.fd, k, self.base + off + (va - s))
                except OSError:
                    return None
                if len(data) != k:
                    return None
                parts.append(data)
            va += k
            n -= k
            i += 1
        return b"".join(parts)


def scan_window(
    fd: int,
    base: int,
    extents: list[tuple[int, int, int]],
    sections: list[tuple[int, int, int]],
    p: tuple[int, ...],
    ws: int,
    we: int,
    in_segs: bytes | bytearray,
    bitmap2: bytearray,
    st: ScanState,
) -> None:
    """Clear 2nd-bitmap bits of the pages the level excludes, for pfns ``ws <= pfn < we``.

    A mirror of makedumpfile 1.7.2 ``__exclude_unnecessary_pages()``: first match wins,
    compound and buddy ranges are excluded as a whole and skipped, tail pages are skipped,
    each section is walked on its own in blocks of PGMM_CACHED struct pages. Blocks of
    struct pages that cannot be read leave their pages in the dump (counted). Ranges that
    reach past ``we`` are finished in the next window through ``st``.
    """
    reader = _ExtentReader(fd, base, extents)
    size = p[P_SIZE]
    fields = [("flags", p[P_FLAGS], "Q"), ("mapping", p[P_MAPPING], "Q")]
    for name, o, code in (
        ("chead", p[P_CHEAD], "Q"),
        ("mapcount", p[P_MAPCOUNT], "I"),
        ("private", p[P_PRIVATE], "Q"),
    ):
        if o != NO_OFFSET:
            fields.append((name, o, code))
    fields.sort(key=lambda f: f[1])
    fmt = "<"
    pos = 0
    for _, o, code in fields:
        fmt += f"{o - pos}x{code}" if o > pos else code
        pos = o + struct.calcsize("<" + code)
    unpack = struct.Struct(fmt + f"{size - pos}x").iter_unpack
    ix = {f[0]: i for i, f in enumerate(fields)}
    i_flags, i_mapping = ix["flags"], ix["mapping"]
    i_chead, i_mapcount, i_private = ix.get("chead"), ix.get("mapcount"), ix.get("private")
    ex_free, ex_cache, ex_cache_pri, ex_user = (
        p[P_EX_FREE], p[P_EX_CACHE], p[P_EX_CACHE_PRI], p[P_EX_USER],
    )  # fmt: skip
    lru, priv, swapcache = p[P_LRU], p[P_PRIV], p[P_SWAPCACHE]
    swapbacked = p[P_SWAPBACKED] if p[P_HAS_SWAPBACKED] else None
    head_mask, hwpoison, slab_bit = p[P_HEAD], p[P_HWPOISON], p[P_SLAB_BIT]
    slab_mc = p[P_SLAB_MC] if p[P_HAS_SLAB_MC] else None
    buddy = p[P_BUDDY]
    offline = p[P_OFFLINE] if p[P_HAS_OFFLINE] else None
    hugetlb_dtor = p[P_DTOR_HUGETLB] if p[P_HAS_DTOR_HUGETLB] else None
    nr_free_area = p[P_NR_FREE_AREA] if p[P_HAS_NR_FREE_AREA] else MAX_ORDER_BITS
    off_order, off_dtor = p[P_ORDER], p[P_DTOR]
    counts = st.counts

    def exclude(pfn: int, n: int) -> None:
        end = pfn + n
        clear_range(bitmap2, pfn - ws, min(end, we) - ws)
        if end > we:
            st.carry_end = max(st.carry_end, end)

    for sec_start, sec_end, mem_map in sections:
        skip_to = st.skip_to if st.skip_sec == sec_start else sec_start
        lo, hi = max(sec_start, ws), min(sec_end, we)
        # Blocks aligned like makedumpfile's PGMM_CACHED reads.
        blk = lo - lo % PGMM_CACHED
        while blk < hi:
            b_start = max(blk, lo, skip_to)
            b_end = min(blk + PGMM_CACHED, hi)
            blk += PGMM_CACHED
            if b_start >= b_end:
                continue
            seg_bytes = in_segs[(b_start - ws) >> 3 : (b_end - ws + 7) >> 3]
            if not any(seg_bytes):
                continue
            raw = reader.read(mem_map + (b_start - sec_start) * size, (b_end - b_start) * size)
            if raw is None:
                st.unreadable += b_end - b_start
                continue
            all_in = b_start & 7 == 0 and b_end & 7 == 0 and seg_bytes.count(255) == len(seg_bytes)
            pfn = b_start - 1
            for rec in unpack(raw):
                pfn += 1
                if pfn < skip_to:
                    continue
                rel = pfn - ws
                if not all_in and not in_segs[rel >> 3] >> (rel & 7) & 1:
                    continue
                if i_chead is not None and rec[i_chead] & 1:
                    continue
                flags = rec[i_flags]
                mapping = rec[i_mapping]
                mapcount = rec[i_mapcount] if i_mapcount is not None else 0
                if slab_mc is not None:
                    is_slab = mapcount == slab_mc
                else:
                    is_slab = bool(flags & slab_bit)
                nr_order = 0
                dtor = 0
                if flags & head_mask and pfn % PGMM_CACHED < PGMM_CACHED - 1:
                    nxt = (pfn - b_start + 1) * size
                    if nxt < len(raw):
                        if off_order:
                            nr_order = raw[nxt + off_order]
                        if off_dtor:
                            dtor = raw[nxt + off_dtor]
                    if nr_order >= MAX_ORDER_BITS or pfn & ((1 << nr_order) - 1):
                        nr_order = 0
                if ex_free and not is_slab and mapcount == buddy:
                    private = rec[i_private]
                    if private >= nr_free_area or private >= MAX_ORDER_BITS:
                        st.bad_order += 1
                        continue
                    nr_order = private
                    reason = 0
                elif (
                    (ex_cache or ex_cache_pri)
                    and (
                        flags & lru
                        or ((swapbacked is None or flags & swapbacked) and flags & swapcache)
                    )
                    and not mapping & PAGE_MAPPING_ANON
                    and (ex_cache_pri or not flags & priv)
                ):
                    reason = 2 if flags & priv else 1
                elif ex_user and (mapping & PAGE_MAPPING_ANON or dtor == hugetlb_dtor):
                    reason = 3
                elif hwpoison and flags & hwpoison:
                    reason = 4
                elif offline is not None and not flags & slab_bit and mapcount == offline:
                    reason = 5
                else:
                    continue
                n = 1 << nr_order
                exclude(pfn, n)
                counts[reason] = min(counts[reason] + n, U64_MASK)
                if n > 1:
                    skip_to = pfn + n
        if sec_end > we:
            st.skip_sec, st.skip_to = sec_start, skip_to


# -- whole bitmaps (tests and small tools; the writers use windows) ----------------------------
class Bitmaps(Record):
    """Both bitmaps of a dump, whole: memory grows with RAM, so only for tests and tools."""

    __slots__ = ("max_mapnr", "first", "second", "level", "excluded", "notes")

    def __init__(
        self,
        max_mapnr: int,
        first: bytearray,
        second: bytearray,
        level: int,
        excluded: dict[str, int] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.max_mapnr = max_mapnr
        self.first = first
        self.second = second
        self.level = level
        self.excluded = {} if excluded is None else excluded
        self.notes = [] if notes is None else notes

    @property
    def num_dumpable(self) -> int:
        return count_bits(self.second)


def build_bitmaps(vm: Vmcore, level: int, **kw) -> Bitmaps:
    """Both bitmaps for ``vm`` at ``level``, assembled from the windows of a PageFilter."""
    pf = PageFilter(vm, level, **kw)
    first = bytearray(pf.half_len)
    second = bytearray(pf.half_len)
    for w in pf.windows():
        first[w.start >> 3 : w.end >> 3] = w.first
        second[w.start >> 3 : w.end >> 3] = w.second
    s = pf.summary()
    return Bitmaps(s.max_mapnr, first, second, s.level, s.excluded, s.notes)


def _fallback_note(level: int, err: Exception) -> str:
    kept = level & DL_EXCLUDE_ZERO
    return (
        f"dump level {level}: cannot read struct pages ({err}); cache, user and free pages "
        f"were kept (effective dump level {kept})"
    )
