"""Dump-level filtering: bitmap helpers and makedumpfile's struct page rules, synthetic."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdump_capture.formats import filter as F
from kdump_capture.kernel import ElfPhysMemory, Kernel, VmcoreInfo
from kdump_capture.sample import (
    PAGE_BUDDY_MAPCOUNT,
    PAGE_OFFLINE_MAPCOUNT,
    PG_HEAD,
    PG_LRU,
    PG_PRIVATE,
    PG_SLAB,
    PG_SWAPBACKED,
    PG_SWAPCACHE,
    RAM_START,
    KernelImage,
    PageState,
)
from kdump_capture.vmcore import open_vmcore

FIRST = RAM_START // 4096  # first RAM pfn of KernelImage


@given(st.integers(1, 300), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 64))))
def test_ranges_and_runs_match_brute_force(nbits, ops):
    bm = bytearray(F.bitmap_half_len(nbits, 64))
    ref = [False] * (len(bm) * 8)
    for i, (start, n) in enumerate(ops):
        end = min(start + n, len(ref))
        if i % 3:
            F.set_range(bm, start, end)
            val = True
        else:
            F.clear_range(bm, start, end)
            val = False
        for p in range(start, end):
            ref[p] = val
    assert [F.test_bit(bm, p) for p in range(len(ref))] == ref
    assert F.count_bits(bm) == sum(ref)
    runs = list(F.iter_runs(bm, nbits))
    expect = [p for p in range(nbits) if ref[p]]
    assert [p for s, e in runs for p in range(s, e)] == expect
    assert all(prev[1] < nxt[0] for prev, nxt in zip(runs, runs[1:], strict=False))  # maximal


def test_bitmap_len_is_block_aligned():
    assert F.bitmap_half_len(1) == 4096
    assert F.bitmap_half_len(8 * 4096) == 4096
    assert F.bitmap_half_len(8 * 4096 + 1) == 8192


def test_test_bit_mask_keeps_makedumpfile_quirk():
    # makedumpfile's test_bit() uses an int mask: only bit numbers mod 32, and bit 31
    # sign-extends over the upper half.
    assert F._test_bit_mask(4) == 16
    assert F._test_bit_mask(36) == 16
    assert F._test_bit_mask(31) == 0xFFFFFFFF80000000
    assert F._test_bit_mask(None) == 0


def _image(tmp_path, pages: dict[int, PageState], extra=None):
    k = KernelImage(1024)
    k.pages = {FIRST + i: st for i, st in pages.items()}
    k.build([(0, b"x")])
    path = str(tmp_path / "v.elf")
    k.write(path, extra)
    return open_vmcore(path)


PAGES = {
    600: PageState(flags=1 << PG_LRU, mapping=0xFFFF888000001000),  # cache
    601: PageState(flags=1 << PG_LRU | 1 << PG_PRIVATE, mapping=0xFFFF888000001000),
    602: PageState(flags=1 << PG_LRU, mapping=0xFFFF888000002001),  # anon (user)
    603: PageState(flags=1 << PG_SWAPCACHE | 1 << PG_SWAPBACKED),  # swap cache
    604: PageState(flags=1 << PG_SWAPCACHE),  # swapcache without swapbacked: not cache
    608: PageState(mapcount=PAGE_BUDDY_MAPCOUNT, private=3),  # free, order 3: 608-615
    616: PageState(flags=1 << PG_SLAB, mapcount=PAGE_BUDDY_MAPCOUNT, private=0),  # slab
    620: PageState(mapcount=PAGE_OFFLINE_MAPCOUNT),  # offline: excluded at every level
    624: PageState(flags=1 << PG_HEAD, order=2, dtor=2),  # hugetlb head: 624-627 user
    625: PageState(compound_head=0xFFFFEA0000000001),
    632: PageState(mapcount=PAGE_BUDDY_MAPCOUNT, private=20),  # invalid order: kept
}


@pytest.mark.parametrize(
    "level,excluded",
    [
        (0, {620}),
        (2, {600, 603, 620}),
        (4, {600, 601, 603, 620}),
        (8, {602, 620, 624, 625, 626, 627}),
        (16, {620, *range(608, 616)}),
        (31, {600, 601, 602, 603, 620, 624, 625, 626, 627, *range(608, 616)}),
    ],
)
def test_struct_page_rules(tmp_path, level, excluded):
    # At level 0 makedumpfile walks struct pages only when PG_hwpoison is exported.
    vm = _image(tmp_path, PAGES, {"NUMBER(PG_hwpoison)": "23"} if level < 2 else None)
    bm = F.build_bitmaps(vm, level)
    got = {p - FIRST for p in range(FIRST, FIRST + 1024) if not F.test_bit(bm.second, p)}
    assert got == excluded
    assert all(F.test_bit(bm.first, p) for p in range(FIRST, FIRST + 1024))
    assert not F.test_bit(bm.first, FIRST - 1)
    if level & 16:
        assert any("invalid buddy order" in n for n in bm.notes)


def test_missing_vmcoreinfo_falls_back_with_note(tmp_path):
    vm = _image(tmp_path, PAGES, {"SYMBOL(mem_section)": None})
    bm = F.build_bitmaps(vm, 31)
    assert bm.second == bm.first
    assert bm.level == 1
    assert any("effective dump level 1" in n for n in bm.notes)


def test_garbage_vmcoreinfo_falls_back(tmp_path):
    vm = _image(tmp_path, PAGES, {"NUMBER(SECTION_SIZE_BITS)": "banana"})
    bm = F.build_bitmaps(vm, 31)
    assert bm.second == bm.first and bm.notes


def test_vtop_walks_huge_pages(tmp_path):
    k = KernelImage(1024)
    k.build([(0, b"x")])
    k.map(0xFFFFC90000000000, 0x200000, huge=True)
    k.put(0x200000 + 0x1234, b"HUGE")
    path = str(tmp_path / "v.elf")
    k.write(path)
    vm = open_vmcore(path)
    kern = Kernel(VmcoreInfo(vm.vmcoreinfo), ElfPhysMemory(vm.loads, vm.pread, vm.path))
    assert kern.translate(0xFFFFC90000001234) == (0x201234, 0x200000 - 0x1234)
    assert kern.read(0xFFFFC90000001234, 4) == b"HUGE"
    assert kern.utsname()[130:145].rstrip(b"\0") == b"6.1.0-synthetic"


# -- bitmap windows: the same bitmaps whatever the window size ----------------------------
ORDERS = st.integers(0, 10)
STATES = st.one_of(
    st.builds(lambda o: PageState(mapcount=PAGE_BUDDY_MAPCOUNT, private=o), ORDERS),
    st.builds(
        lambda o: PageState(flags=1 << PG_LRU | 1 << PG_HEAD, mapping=0xFFFF888000001000, order=o),
        ORDERS,
    ),  # fmt: skip
    st.builds(lambda: PageState(flags=1 << PG_LRU, mapping=0xFFFF888000002001)),
    st.builds(lambda: PageState(flags=1 << PG_HEAD, order=9, dtor=2)),
    st.builds(lambda: PageState(flags=1 << PG_SLAB)),
    st.builds(lambda: PageState(mapcount=PAGE_OFFLINE_MAPCOUNT)),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.integers(0, 2047), STATES, max_size=40), st.sampled_from([1, 16, 31]))
def test_windows_give_the_same_bitmaps(tmp_path, pages, level):
    # Free blocks and compound pages cross the 512-frame windows here: the walk carries
    # its skip and the excluded range into the next window, as one pass over the whole
    # bitmap does.
    k = KernelImage(2048)
    k.pages = {FIRST + i: s for i, s in pages.items()}
    k.build([(0, b"x")])
    path = str(tmp_path / "w.elf")
    k.write(path, {"NUMBER(PG_hwpoison)": "23"})
    with open_vmcore(path) as vm:
        whole = F.build_bitmaps(vm, level, accelerated=False)
        for kw in ({"window_pfns": 512}, {"window_pfns": 1024, "cache_bytes": 0}):
            part = F.build_bitmaps(vm, level, accelerated=False, **kw)
            assert part == whole
        pf = F.PageFilter(vm, level, window_pfns=512, cache_bytes=0, accelerated=False)
        a = [(w.start, bytes(w.second)) for w in pf.windows()]
        b = [(w.start, bytes(w.second)) for w in pf.windows()]  # computed again: the same
        assert a == b and len(a) > 1


def _counting_kernel(tmp_path, vm) -> tuple[Kernel, list[int]]:
    """The synthetic kernel of ``vm``, with the sizes of its memory reads recorded."""
    kern = Kernel(VmcoreInfo(vm.vmcoreinfo), ElfPhysMemory(vm.loads, vm.pread, vm.path))
    reads: list[int] = []
    real_read = kern.read
    kern.read = lambda va, n: reads.append(n) or real_read(va, n)
    return kern, reads


def _one_section_vmcore(tmp_path) -> str:
    k = KernelImage(1024)
    k.build([(0, b"x")])
    path = str(tmp_path / "v.elf")
    k.write(path)
    return path


def test_mem_section_roots_bounded_by_vmcoreinfo(tmp_path):
    # A PT_LOAD far above RAM must not make the walk read 2^23 sections' worth of roots.
    with open_vmcore(_one_section_vmcore(tmp_path)) as vm:
        kern, reads = _counting_kernel(tmp_path, vm)
        mm = kern.mem_maps(1 << 38)
        assert mm.ranges == [(0, 1 << 15, 0xFFFFEA0000000000)]  # one present section
        assert max(reads) <= 2048 * 8  # LENGTH(mem_section) roots, not 2^38 / 2^15 / 256


def test_mem_sections_are_read_only_where_the_dump_has_data(tmp_path, monkeypatch):
    """The walk looked at every section below max_mapnr and kept a range for each one whose
    mem_map did not follow the last: 64 pages of hostile roots took a save to 2.1 GB. Only
    the sections holding the dump's data are read now, and the ranges are capped."""
    from kdump_capture import kernel as K

    with open_vmcore(_one_section_vmcore(tmp_path)) as vm:
        kern, reads = _counting_kernel(tmp_path, vm)
        mm = kern.mem_maps(1 << 38, [(0, 1024)])
        assert mm.ranges == [(0, 1 << 15, 0xFFFFEA0000000000)]
        assert len(reads) == 2  # one root pointer, one table: not 2048 roots
        assert kern.mem_maps(1 << 38, [(1 << 20, 1 << 21)]).ranges == []  # no section there
        monkeypatch.setattr(K, "MAX_MEM_MAP_RANGES", 0)
        with pytest.raises(K.KernelInfoError, match="more than 0 separate mem_map ranges"):
            kern.mem_maps(1 << 38, [(0, 1024)])


def test_second_pass_cache_all_or_nothing(tmp_path):
    # The first pass keeps the 2nd bitmap's windows for the second only when all of them
    # fit cache_bytes; otherwise the second pass computes them again, the same.
    k = KernelImage(2048)
    k.pages = {FIRST + 1: PageState(flags=1 << PG_SLAB)}
    k.build([(0, b"x")])
    path = str(tmp_path / "c.elf")
    k.write(path)
    with open_vmcore(path) as vm:
        whole = F.build_bitmaps(vm, 31, accelerated=False)
        fits = F.PageFilter(vm, 31, window_pfns=512, cache_bytes=4096, accelerated=False)
        n = sum(1 for _ in fits.windows())
        assert n > 1 and fits._cache is not None and len(fits._cache) == n
        tight = F.PageFilter(vm, 31, window_pfns=512, cache_bytes=(n - 1) * 64, accelerated=False)
        seen = [bytes(w.second) for w in tight.windows()]
        assert tight._cache is None
        again = [bytes(w.second) for w in tight.windows()]
        assert seen == again
        assert F.build_bitmaps(vm, 31, window_pfns=512, cache_bytes=64, accelerated=False) == whole


@pytest.mark.parametrize("n", [0, 1, 7, 8, 65535, 65536, 65537, 200_000])
def test_count_bits(n):
    data = bytes((i * 37 + n) & 0xFF for i in range(n))
    want = sum(bin(b).count("1") for b in data)
    assert F.count_bits(data) == F.count_bits(bytearray(data)) == want
    assert F.count_bits(memoryview(data)) == want
