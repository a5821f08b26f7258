"""Dump-level page filtering: which page frames a dump keeps, as makedumpfile 1.7.2 decides it.

Bits of the dump level: 1 zero pages (decided by content while copying, not here), 2 cache
pages without private data, 4 all cache pages, 8 user (anonymous and hugetlbfs) pages,
16 free pages. Bits 2-16 are decided from each page's ``struct page``, read from the dump
itself through VMCOREINFO and the kernel's page tables (``__exclude_unnecessary_pages()``).

Bitmaps are makedumpfile's: bit ``pfn & 7`` of byte ``pfn >> 3``, LSB first.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..elf import PT_LOAD, Phdr
from ..errors import VmcoreError
from ..kernel import (
    PAGE,
    PAGE_SHIFT,
    ElfPhysMemory,
    Kernel,
    KernelInfoError,
    VmcoreInfo,
    max_mapnr_of,
)
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
U64_MASK = 0xFFFFFFFFFFFFFFFF


# -- bitmaps ------------------------------------------------------------------------------
def bitmap_half_len(max_mapnr: int, block: int = PAGE) -> int:
    """Bytes of one bitmap in a kdump file: ``ceil(ceil(max_mapnr/8)/block)*block``."""
    nbytes = (max_mapnr + 7) // 8
    return (nbytes + block - 1) // block * block


def bitmap_memory(max_mapnr: int) -> int:
    """Bytes the filter holds for a machine of ``max_mapnr`` page frames (both bitmaps), for
    the memory budget and ``kdump-capture estimate``; follows how bitmaps are kept."""
    return 2 * bitmap_half_len(max_mapnr)


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


_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


def count_bits(bm: bytes | bytearray) -> int:
    """Number of set bits (``bytes.translate`` maps each byte to its popcount, in C)."""
    table = bm.translate(_POPCOUNT) if isinstance(bm, bytes) else bytes(bm).translate(_POPCOUNT)
    return sum(table)


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


def first_bitmap(loads: list[Phdr], max_mapnr: int) -> bytearray:
    """1 = the pfn lies in a PT_LOAD (``create_1st_bitmap()``): end rounded up, clipped."""
    bm = bytearray(bitmap_half_len(max_mapnr))
    for p in loads:
        if p.type != PT_LOAD or not p.memsz:
            continue
        start = p.paddr >> PAGE_SHIFT
        end = (p.paddr + p.memsz + PAGE - 1) >> PAGE_SHIFT
        set_range(bm, start, min(end, max_mapnr))
    return bm


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


@dataclass(frozen=True)
class PageRules:
    """Struct page layout and flag values from VMCOREINFO, for ``exclude_pages``."""

    size: int
    off_flags: int
    off_mapping: int
    off_mapcount: int | None
    off_private: int | None
    off_chead: int | None
    off_order: int  # in the struct page after a head page; 0 = unknown (order 0)
    off_dtor: int  # likewise; 0 = unknown
    lru: int
    private: int
    swapcache: int
    swapbacked: int | None  # None: kernel before 4.10 (no PG_swapbacked)
    head_mask: int
    hwpoison: int  # 0 when not exported
    slab_bit: int  # full 64-bit mask of PG_slab (0 if unknown)
    slab_mapcount: int | None  # 6.10+ page type value, as u32
    buddy: int | None  # PAGE_BUDDY_MAPCOUNT_VALUE as u32; None: cannot identify free pages
    offline: int | None
    hugetlb_dtor: int | None
    nr_free_area: int | None

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


@dataclass
class Bitmaps:
    """What a kdump file's bitmaps say, and what filtering did."""

    max_mapnr: int
    first: bytearray
    second: bytearray
    level: int  # the level applied (bits that could not be applied are cleared)
    excluded: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_dumpable(self) -> int:
        return count_bits(self.second)


def needs_struct_pages(level: int, info: VmcoreInfo) -> bool:
    """Whether makedumpfile would walk struct pages at ``level`` (create_2nd_bitmap())."""
    if level & (DL_EXCLUDE_CACHE | DL_EXCLUDE_CACHE_PRI | DL_EXCLUDE_USER_DATA):
        return True
    if info.number("PG_hwpoison") is not None:
        return True
    return bool(level & DL_EXCLUDE_FREE)


def exclude_pages(
    kernel: Kernel,
    rules: PageRules,
    level: int,
    mem_maps: list[tuple[int, int, int]],
    bitmap2: bytearray,
    in_segs: bytes | bytearray,
    notes: list[str],
) -> dict[str, int]:
    """Clear 2nd-bitmap bits of pages ``level`` excludes; returns counts per reason.

    A mirror of makedumpfile 1.7.2 ``__exclude_unnecessary_pages()``: first match wins,
    compound and buddy ranges are excluded as a whole and skipped, tail pages are skipped.
    Blocks of struct pages that cannot be read leave their pages in the dump (noted).
    """
    counts = dict.fromkeys(COUNTERS, 0)
    unpack = rules.unpacker().iter_unpack
    order = rules.field_order()
    ix = {name: order.index(name) for name in order}
    i_flags, i_mapping = ix["flags"], ix["mapping"]
    i_chead, i_mapcount, i_private = ix.get("chead"), ix.get("mapcount"), ix.get("private")
    size = rules.size
    ex_free = bool(level & DL_EXCLUDE_FREE) and rules.buddy is not None
    ex_cache = bool(level & DL_EXCLUDE_CACHE)
    ex_cache_pri = bool(level & DL_EXCLUDE_CACHE_PRI)
    ex_user = bool(level & DL_EXCLUDE_USER_DATA)
    lru, priv, swapcache = rules.lru, rules.private, rules.swapcache
    swapbacked = rules.swapbacked
    head_mask, hwpoison, slab_bit = rules.head_mask, rules.hwpoison, rules.slab_bit
    slab_mc, buddy, offline = rules.slab_mapcount, rules.buddy, rules.offline
    hugetlb_dtor, nr_free_area = rules.hugetlb_dtor, rules.nr_free_area
    off_order, off_dtor = rules.off_order, rules.off_dtor
    unreadable = 0
    bad_order = 0

    for sec_start, sec_end, mem_map in mem_maps:
        skip_to = sec_start
        # Blocks aligned like makedumpfile's PGMM_CACHED reads.
        blk = sec_start - sec_start % PGMM_CACHED
        while blk < sec_end:
            b_start = max(blk, sec_start, skip_to)
            b_end = min(blk + PGMM_CACHED, sec_end)
            blk += PGMM_CACHED
            if b_start >= b_end:
                continue
            seg_bytes = in_segs[b_start >> 3 : (b_end + 7) >> 3]
            if not any(seg_bytes):
                continue
            try:
                raw = kernel.read(mem_map + (b_start - sec_start) * size, (b_end - b_start) * size)
            except VmcoreError as e:
                unreadable += b_end - b_start
                log.debug("struct pages of pfn %#x-%#x unreadable: %s", b_start, b_end, e)
                continue
            all_in = b_start & 7 == 0 and b_end & 7 == 0 and seg_bytes.count(255) == len(seg_bytes)
            pfn = b_start - 1
            for rec in unpack(raw):
                pfn += 1
                if pfn < skip_to:
                    continue
                if not all_in and not in_segs[pfn >> 3] >> (pfn & 7) & 1:
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
                    if nr_order >= 64 or pfn & ((1 << nr_order) - 1):
                        nr_order = 0
                if ex_free and not is_slab and mapcount == buddy:
                    private = rec[i_private]
                    if nr_free_area is not None and private >= nr_free_area:
                        bad_order += 1
                        continue
                    nr_order = private
                    reason = "free"
                elif (
                    (ex_cache or ex_cache_pri)
                    and (
                        flags & lru
                        or ((swapbacked is None or flags & swapbacked) and flags & swapcache)
                    )
                    and not mapping & PAGE_MAPPING_ANON
                    and (ex_cache_pri or not flags & priv)
                ):
                    reason = "cache_private" if flags & priv else "cache"
                elif ex_user and (mapping & PAGE_MAPPING_ANON or dtor == hugetlb_dtor):
                    reason = "user"
                elif hwpoison and flags & hwpoison:
                    reason = "hwpoison"
                elif offline is not None and not flags & slab_bit and mapcount == offline:
                    reason = "offline"
                else:
                    continue
                n = 1 << nr_order
                clear_range(bitmap2, pfn, pfn + n)
                counts[reason] += n
                if n > 1:
                    skip_to = pfn + n
    if unreadable:
        notes.append(
            f"struct pages of {unreadable} page frames could not be read; those pages were kept"
        )
    if bad_order:
        notes.append(f"{bad_order} free pages had an invalid buddy order and were kept")
    return counts


def build_bitmaps(vm: Vmcore, level: int) -> Bitmaps:
    """Both bitmaps for ``vm`` at ``level``. Never raises for filtering problems:
    what cannot be applied is kept in the dump and explained in ``notes``."""
    loads = vm.loads
    max_mapnr = max_mapnr_of(loads)
    notes: list[str] = []
    kernel = None
    mem_maps: list[tuple[int, int, int]] = []
    info = VmcoreInfo(vm.vmcoreinfo)
    try:
        want_pages = needs_struct_pages(level, info)
    except VmcoreError as e:
        want_pages = False
        notes.append(_fallback_note(level, e))
    if want_pages:
        try:
            kernel = Kernel(info, ElfPhysMemory(loads, vm.pread, vm.path))
            mem_maps = kernel.mem_maps(max_mapnr)
            if mem_maps:
                max_mapnr = min(max_mapnr, max(end for _, end, _ in mem_maps))
        except VmcoreError as e:
            kernel = None
            notes.append(_fallback_note(level, e))
    first = first_bitmap(loads, max_mapnr)
    second = bytearray(first)
    applied = level
    excluded: dict[str, int] = {}
    if kernel is not None:
        try:
            rules = PageRules.from_info(info)
            if level & DL_EXCLUDE_FREE and rules.buddy is None:
                notes.append(
                    "dump level bit 16 (free pages) needs PAGE_BUDDY_MAPCOUNT_VALUE in "
                    "VMCOREINFO; free pages were kept"
                )
                applied &= ~DL_EXCLUDE_FREE
            excluded = exclude_pages(kernel, rules, level, mem_maps, second, first, notes)
        except VmcoreError as e:
            second[:] = first
            excluded = {}
            notes.append(_fallback_note(level, e))
            applied &= ~STRUCT_PAGE_BITS
    elif level & STRUCT_PAGE_BITS:
        applied &= ~STRUCT_PAGE_BITS
    return Bitmaps(max_mapnr, first, second, applied, excluded, notes)


def _fallback_note(level: int, err: Exception) -> str:
    kept = level & DL_EXCLUDE_ZERO
    return (
        f"dump level {level}: cannot read struct pages ({err}); cache, user and free pages "
        f"were kept (effective dump level {kept})"
    )
