"""kdump-compressed and flattened writers on synthetic vmcores: layout, round trips, faults."""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess

import pytest

from kdump_capture.dumpfile import KdumpReader, open_dump
from kdump_capture.elf import PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note
from kdump_capture.errors import NotSupported, VmcoreError
from kdump_capture.formats import NullMonitor, flat, make_writer
from kdump_capture.formats import filter as F
from kdump_capture.formats.structs import (
    DISK_DUMP_HEADER,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    KDUMP_SUB_HEADER,
    PAGE_DESC,
    DiskDumpHeader,
    KdumpSubHeader,
    PageDesc,
)
from kdump_capture.kernel import AddressError
from kdump_capture.sample import (
    PAGE_BUDDY_MAPCOUNT,
    RAM_START,
    KernelImage,
    PageState,
    SampleSpec,
    write_sample,
)
from kdump_capture.vmcore import Vmcore, open_vmcore

from .faulty import adopt

PAGE = 4096
FIRST = RAM_START // PAGE


class SeekSink:
    seekable = True

    def __init__(self) -> None:
        self.f = io.BytesIO()

    def write(self, data) -> None:
        self.f.write(bytes(data))

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def tell(self) -> int:
        return self.f.tell()

    def save(self, path) -> str:
        with open(path, "wb") as out:
            out.write(self.f.getvalue())
        return str(path)


class StreamSink(SeekSink):
    seekable = False

    def seek(self, offset: int) -> None:
        raise AssertionError("a non-seekable sink was seeked")


def test_struct_sizes_match_c():
    assert DISK_DUMP_HEADER.size == 464  # sizeof(struct disk_dump_header)
    assert KDUMP_SUB_HEADER.size == 104  # sizeof(struct kdump_sub_header)
    assert PAGE_DESC.size == 24  # sizeof(page_desc_t)
    assert flat.FLAT_HEADER.size == 32 and flat.RECORD.size == 16
    kh = KdumpSubHeader(phys_base=1, dump_level=31, max_mapnr_64=7, offset_note=4200)
    assert KdumpSubHeader.unpack_from(kh.pack()) == kh
    raw = kh.pack()
    assert (
        struct.unpack_from("<q", raw, 48)[0] == 4200 and struct.unpack_from("<Q", raw, 96)[0] == 7
    )


def _image(tmp_path, ram_pages=1024) -> str:
    """A synthetic kernel with zero, text, random, free (buddy) and user pages."""
    k = KernelImage(ram_pages)
    rng = random.Random(5)
    base = 300
    for i in range(base, ram_pages):
        kind = i % 4
        pa = RAM_START + i * PAGE
        if kind == 1:
            k.put(pa, (b"text page %6d " % i) * (PAGE // 16))
        elif kind == 2:
            k.put(pa, rng.randbytes(PAGE))
    # free pages (order 8: 256 pages) and an anonymous page
    k.pages[FIRST + 512] = PageState(mapcount=PAGE_BUDDY_MAPCOUNT, private=8)
    k.pages[FIRST + 301] = PageState(mapping=0xFFFF888000003001)
    k.build([(0, b"synthetic log"), (5, b"second line")])
    path = str(tmp_path / "v.elf")
    k.write(path)
    return path


def _write(vm, fmt, level, sink):
    w = make_writer(vm, fmt, level, sink.seekable)
    return w.write(sink, NullMonitor())


@pytest.mark.parametrize("fmt", ["compressed", "zstd"])
@pytest.mark.parametrize("level", [0, 1, 31])
def test_round_trip(tmp_path, fmt, level):
    src = _image(tmp_path)
    vm = open_vmcore(src)
    sink = SeekSink()
    res = _write(vm, fmt, level, sink)
    assert not res.flattened and res.dump_level == level and not res.notes
    path = sink.save(tmp_path / "dump")
    with open(path, "rb") as f:
        dh = DiskDumpHeader.unpack_from(f.read(464))
    assert dh.signature == b"KDUMP   " and dh.header_version == 6 and dh.nr_cpus == 1
    assert dh.uts_field(4) == "x86_64" and dh.uts_field(2) == "6.1.0-synthetic"
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = KdumpReader(
            path, lambda n, o: os.pread(fd, n, o), lambda: None, os.fstat(fd).st_size
        )
        bm = F.build_bitmaps(vm, level)
        assert reader.bitmap == bytes(bm.second)
        zero_offsets = set()
        raw_pages = 0
        for pfn in range(FIRST, FIRST + 1024):
            expect = vm.pread(PAGE, vm.loads[0].offset + (pfn - FIRST) * PAGE)
            if not F.test_bit(bm.second, pfn):
                with pytest.raises(AddressError):
                    reader.page(pfn)
                continue
            assert reader.page(pfn) == expect
            pd = reader.desc(pfn)
            if expect == bytes(PAGE) and level & 1:
                zero_offsets.add(pd.offset)
            raw_pages += pd.flags == 0
            assert pd.offset > 0 and pd.size <= PAGE
        assert len(zero_offsets) == (1 if level & 1 else 0)
        assert raw_pages >= 100  # random pages do not compress: stored raw
        if level & 16:
            assert not any(F.test_bit(reader.bitmap, FIRST + 512 + i) for i in range(256))
    finally:
        os.close(fd)
    with open_dump(path) as d:
        assert d.dmesg() == "[    0.000000] synthetic log\n[    0.000000] second line\n"


def test_makedumpfile_reads_our_synthetic_dump(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    sink = SeekSink()
    _write(vm, "compressed", 31, sink)
    path = sink.save(tmp_path / "dump")
    out = tmp_path / "dmesg.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", path, str(out)], check=True,
                   capture_output=True)  # fmt: skip
    assert "synthetic log" in out.read_text()


def test_flattened_rearranges_to_the_seekable_file(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    seek, stream = SeekSink(), StreamSink()
    _write(vm, "compressed", 31, seek)
    res = _write(vm, "compressed", 31, stream)
    assert res.flattened and "flattened" in res.format
    flat_path = stream.save(tmp_path / "flat")
    normal = seek.f.getvalue()
    flat.rearrange(flat_path, str(tmp_path / "re"))
    assert (tmp_path / "re").read_bytes() == normal
    with open(flat_path, "rb") as f:
        p = subprocess.run(["makedumpfile", "-R", str(tmp_path / "mre")], stdin=f,
                           capture_output=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "mre").read_bytes() == normal
    with open_dump(flat_path) as d:
        assert d.kind == "kdump (flattened)" and "synthetic log" in d.dmesg()


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.7, 0.9, 0.999])
def test_rearrange_says_a_stream_that_ends_early_is_truncated(tmp_path, keep):
    """A flattened dump copied only in part (a transfer cut short) is named truncated,
    wherever it ends: the header's bounds, shrunk to what the stream holds, used to refuse
    a record first, "beyond the bytes the dump's header allows", as if it were forged."""
    vm = open_vmcore(_image(tmp_path))
    stream = StreamSink()
    _write(vm, "compressed", 0, stream)
    data = stream.f.getvalue()
    src = tmp_path / "cut"
    src.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VmcoreError, match=r"cut: the flattened stream is truncated \(\d+ bytes"):
        flat.rearrange(str(src), str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def _stream(records, end=True) -> bytes:
    out = flat.flat_header()
    for off, data in records:
        out += flat.RECORD.pack(off, len(data)) + data
    return out + (flat.END_MARKER if end else b"")


def _kdump_head(max_mapnr=8) -> bytes:
    """A disk_dump_header: the first record of a flattened kdump stream (bounds the file)."""
    return DiskDumpHeader(6, bytes(390), 0, 0, 1, PAGE, 1, 0, max_mapnr, 1).pack()


def _kdump_bitmaps_head() -> bytes:
    return DiskDumpHeader(6, bytes(390), 0, 0, 1, PAGE, 1, 0xFFFFFFFF, 0xFFFFFFFF, 1).pack()


def _elf_head(offset: int) -> bytes:
    """An ELF header whose one PT_LOAD claims 16 bytes at ``offset``."""
    ph = Phdr(PT_LOAD, 7, offset, 0, 0, 16, 16, 0)
    return Ehdr.core(1).pack() + ph.pack()


def test_rearrange_out_of_order_and_overlapping(tmp_path):
    src = tmp_path / "s"
    head = _kdump_head()
    src.write_bytes(_stream([(0, head), (5100, b"B" * 50), (5000, b"A" * 10), (5120, b"C" * 10)]))
    n = flat.rearrange(str(src), str(tmp_path / "d"))
    expect = head + bytes(5000 - len(head)) + b"A" * 10 + bytes(90) + b"B" * 20 + b"C" * 10
    expect += b"B" * 20
    assert n == 5150 and (tmp_path / "d").read_bytes() == expect
    ff = flat.FlatFile(str(src))
    assert ff.pread(5150, 0) == expect and ff.pread(10, 5115) == expect[5115:5125]
    ff.close()
    with open(src, "rb") as f:
        subprocess.run(["makedumpfile", "-R", str(tmp_path / "m")], stdin=f, check=True,
                       capture_output=True)  # fmt: skip
    assert (tmp_path / "m").read_bytes() == expect


@pytest.mark.parametrize("seed", range(6))
def test_random_access_reads_what_rearrange_writes(tmp_path, seed):
    # Interleaved sequences, as a dump writer makes them (header, bitmaps, descriptors, data),
    # then rewrites and overlaps: FlatFile.pread must give the rearranged file's bytes.
    rnd = random.Random(seed)
    size = 1 << 16
    head = _kdump_head(max_mapnr=64)
    records = [(0, head)]
    cursors = [len(head) + 100, 20000, 40000]
    for _ in range(300):
        lane = rnd.randrange(len(cursors))
        n = rnd.randrange(1, 300)
        if cursors[lane] + n < size:
            records.append((cursors[lane], rnd.randbytes(n)))
            cursors[lane] += n + rnd.choice((0, 0, 7))
        if rnd.random() < 0.05:  # a rewrite somewhere earlier
            at = rnd.randrange(len(head), size - 600)
            records.append((at, rnd.randbytes(rnd.randrange(1, 600))))
    src = tmp_path / "s"
    src.write_bytes(_stream(records))
    n = flat.rearrange(str(src), str(tmp_path / "d"))
    expect = (tmp_path / "d").read_bytes()
    ff = flat.FlatFile(str(src))
    try:
        assert ff.size == n and ff.pread(n, 0) == expect
        for _ in range(200):
            at = rnd.randrange(n)
            k = rnd.randrange(1, 700)
            assert ff.pread(k, at) == expect[at : at + k]
    finally:
        ff.close()


@pytest.mark.parametrize(
    "data",
    [
        _stream([(0, b"x" * 10)], end=False),
        _stream([(0, b"x" * 10)])[:-30],
        b"notflat" + bytes(5000),
        _stream([(-5, b"x")]),
        _stream([(0, b"x" * 10)]),  # not a dump
        _stream([(100, _kdump_head())]),  # the header must come first
        _stream([(0, _kdump_head()), (1 << 42, b"x" * 16)]),  # far past what the header allows
        _stream([(0, _kdump_bitmaps_head())]),  # more bitmap than the whole stream
        _stream([(0, _elf_head(1 << 42)), (1 << 42, b"x" * 16)]),  # a segment far away
    ],
    ids=[
        "no-end",
        "truncated",
        "not-flat",
        "negative",
        "not-a-dump",
        "late-header",
        "2**42",
        "huge-bitmap",
        "elf-2**42",
    ],
)
def test_rearrange_rejects_bad_streams(tmp_path, data):
    src = tmp_path / "s"
    src.write_bytes(data)
    with pytest.raises(VmcoreError):
        flat.rearrange(str(src), str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


class FailingVmcore(Vmcore):
    """Test-only source that ends early: nothing can be read past ``fail_at``."""

    fail_at = 0

    def _pread_into(self, view, offset):
        if offset >= self.fail_at:
            return 0
        return super()._pread_into(view[: self.fail_at - offset], offset)

    def view(self, offset, length):
        # A failing device is read (and fails there), not mapped.
        return None if offset + length > self.fail_at else super().view(offset, length)


def test_read_error_gives_marked_partial_dump(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    bad = adopt(vm, FailingVmcore, fail_at=vm.loads[0].offset + 600 * PAGE)
    for sink in (SeekSink(), StreamSink()):
        res = _write(bad, "zstd", 1, sink)
        assert res.incomplete and "the source ended" in res.incomplete
        path = sink.save(tmp_path / "partial")
        if not sink.seekable:
            flat.rearrange(path, str(tmp_path / "re"))
            path = str(tmp_path / "re")
        with open_dump(path) as d:
            assert d.header.status & DUMP_DH_COMPRESSED_INCOMPLETE
            assert d.read_phys(RAM_START + 310 * PAGE, 16)
            with pytest.raises(AddressError, match="missing"):
                d.read_phys(RAM_START + 1000 * PAGE, 16)


def test_truncated_and_garbage_dumps_are_clear_errors(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    sink = SeekSink()
    _write(vm, "compressed", 1, sink)
    data = sink.f.getvalue()
    (tmp_path / "t1").write_bytes(data[:300])
    (tmp_path / "t2").write_bytes(data[: 3 * PAGE + 100])
    (tmp_path / "t3").write_bytes(b"garbage" * 100)
    for name in ("t1", "t2", "t3"):
        with pytest.raises(VmcoreError):
            open_dump(str(tmp_path / name))
    (tmp_path / "t4").write_bytes(data[: len(data) // 2])
    with open_dump(str(tmp_path / "t4")) as d:
        with pytest.raises(VmcoreError):
            for pfn in range(FIRST, FIRST + 1024):
                d.read_phys(pfn * PAGE, 8)


def test_truncated_vmcore_and_pt_load_past_end(tmp_path):
    path = tmp_path / "v"
    write_sample(str(path), SampleSpec(ram_mib=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(VmcoreError, match="truncated"):
        open_vmcore(str(path))


def test_synthetic_sample_without_struct_pages_falls_back(tmp_path):
    path = tmp_path / "v"
    write_sample(str(path), SampleSpec(ram_mib=4))
    vm = open_vmcore(str(path))
    res = _write(vm, "compressed", 31, SeekSink())
    assert res.dump_level == 1 and any("effective dump level 1" in n for n in res.notes)


def test_make_writer_formats(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    assert make_writer(vm, "none", 31, True).produces_file is False
    assert make_writer(vm, "elf", 31, True).produces_file
    with pytest.raises(NotSupported):
        make_writer(vm, "snappy", 31, True)
    with pytest.raises(NotSupported):
        make_writer(vm, "compressed", 32, True)
    with pytest.raises(NotSupported):
        make_writer(vm, "bogus", 1, True)


def test_elf_level_31_leaves_excluded_runs_out(tmp_path):
    vm = open_vmcore(_image(tmp_path))
    sink = SeekSink()
    res = _write(vm, "elf", 31, sink)
    path = sink.save(tmp_path / "e")
    out = open_vmcore(path)
    assert len(out.loads) >= 2  # excluded runs (the 256 free pages) split the RAM segment
    assert sum(p.filesz for p in out.loads) < sum(p.filesz for p in vm.loads) - 255 * PAGE
    assert sum(p.memsz for p in out.loads) == vm.loads[0].memsz
    assert res.dump_level == 31 and res.pages_written < res.pages_total
    dm = tmp_path / "dm"
    subprocess.run(["makedumpfile", "--dump-dmesg", path, str(dm)], check=True,
                   capture_output=True)  # fmt: skip
    assert "second line" in dm.read_text()


def test_page_desc_round_trip():
    pd = PageDesc(offset=123456, size=77, flags=0x20)
    assert PageDesc.unpack_from(pd.pack()) == pd


@pytest.mark.parametrize("fmt", ["compressed", "zstd"])
def test_small_buffer_plan_writes_the_same_dump(tmp_path, fmt):
    """A capture kernel with little memory uses quarter-size batches, two in flight and one
    thread (memory.plan_buffers): the dump must be byte-identical to the default's."""
    from kdump_capture.memory import FLOOR, plan_buffers

    vm = open_vmcore(_image(tmp_path))
    outs = []
    for plan in (None, FLOOR, plan_buffers(40 << 20, 1)):
        sink = SeekSink()
        make_writer(vm, fmt, 31, True, plan).write(sink, NullMonitor())
        outs.append(sink.f.getvalue())
    assert FLOOR.batch_pages < 256 and outs[0] == outs[1] == outs[2]


def _unaligned_image(tmp_path) -> tuple[str, int, int, bytes]:
    """The kernel of ``_image`` under two PT_LOADs that start and end inside pages: the
    first ends 100 bytes into page ``end_pfn``, the second starts 17 bytes into page
    ``start_pfn`` (a page cache page full of text). Returns the path, both pfns and the
    page ``start_pfn`` as memory holds it (its first 17 bytes are in no PT_LOAD: zeros)."""
    k = KernelImage(1024)
    rng = random.Random(9)
    for i in range(300, 1024):
        if i % 3:
            k.put(RAM_START + i * PAGE, rng.randbytes(PAGE))
    end_pfn, start_pfn = FIRST + 600, FIRST + 700
    k.put(start_pfn * PAGE, (b"page cache text " * (PAGE // 16)))
    k.pages[start_pfn] = PageState(flags=1 << 4, mapping=0xFFFF888000600000)  # PG_lru
    k.build([(0, b"synthetic log")])
    notes = pack_note(b"VMCOREINFO", 0, k.vmcoreinfo().encode())
    segs = [(RAM_START, end_pfn * PAGE + 100), (start_pfn * PAGE + 17, RAM_START + 1024 * PAGE)]
    data_off = 2 * PAGE
    phdrs = [Phdr(PT_NOTE, 0, PAGE, 0, 0, len(notes), len(notes), 0)]
    off = data_off
    for lo, hi in segs:
        phdrs.append(Phdr(PT_LOAD, 7, off, k.va(lo), lo, hi - lo, hi - lo, 0))
        off += hi - lo
    path = tmp_path / "unaligned.elf"
    with open(path, "wb") as f:
        f.write(Ehdr.core(len(phdrs)).pack() + b"".join(p.pack() for p in phdrs))
        f.seek(PAGE)
        f.write(notes)
        f.seek(data_off)
        for lo, hi in segs:
            f.write(k.mem[lo - RAM_START : hi - RAM_START])
    page = bytes(17) + bytes(
        k.mem[(start_pfn - FIRST) * PAGE + 17 : (start_pfn - FIRST + 1) * PAGE]
    )
    return str(path), end_pfn, start_pfn, page


def _read_ours(tmp_path, src: str, level: int) -> tuple[str, KdumpReader, int]:
    sink = SeekSink()
    _write(open_vmcore(src), "compressed", level, sink)
    ours = sink.save(tmp_path / "ours")
    fd = os.open(ours, os.O_RDONLY)
    reader = KdumpReader(ours, lambda n, o: os.pread(fd, n, o), lambda: None, os.fstat(fd).st_size)
    return ours, reader, fd


def _same_as_makedumpfile(tmp_path, src: str, ours: str, level: int) -> None:
    ref = tmp_path / "mdf"
    subprocess.run(["makedumpfile", "-c", "-d", str(level), src, str(ref)], check=True,
                   capture_output=True)  # fmt: skip
    with open(ours, "rb") as f:
        assert f.read() == ref.read_bytes()


@pytest.mark.parametrize("level", [0, 31])
def test_a_page_whose_pt_load_ends_inside_it_is_left_out(tmp_path, level):
    """The page a PT_LOAD's data ends inside (p_filesz not a page multiple) was dumped as
    zeros, though it holds data; makedumpfile's exclude_nodata_pages() leaves it out."""
    src, end_pfn, _, _ = _unaligned_image(tmp_path)
    _, reader, fd = _read_ours(tmp_path, src, level)
    try:
        assert reader.is_dumped(end_pfn - 1)
        with pytest.raises(AddressError):
            reader.page(end_pfn)
    finally:
        os.close(fd)
    ref = str(tmp_path / "mdf")
    subprocess.run(["makedumpfile", "-c", "-d", str(level), src, ref], check=True,
                   capture_output=True)  # fmt: skip
    fd = os.open(ref, os.O_RDONLY)
    try:
        theirs = KdumpReader(
            ref, lambda n, o: os.pread(fd, n, o), lambda: None, os.fstat(fd).st_size
        )
        assert theirs.is_dumped(end_pfn - 1) and not theirs.is_dumped(end_pfn)
    finally:
        os.close(fd)


@pytest.mark.parametrize("level", [0, 2, 31])
def test_a_page_a_pt_load_starts_inside_holds_its_data(tmp_path, level):
    """A page a PT_LOAD starts inside was dumped as zeros (at level 2 left out by its struct
    page); makedumpfile reads its data behind zeros and does not look at the struct page of
    a page whose first byte is in no PT_LOAD (is_in_segs())."""
    src, _, start_pfn, page = _unaligned_image(tmp_path)
    ours, reader, fd = _read_ours(tmp_path, src, level)
    try:
        assert reader.page(start_pfn) == page
    finally:
        os.close(fd)
    _same_as_makedumpfile(tmp_path, src, ours, level)


@pytest.mark.parametrize("level", [8, 31])
def test_elf_leaves_out_a_short_excluded_run_that_ends_a_pt_load(tmp_path, level):
    """Excluded runs shorter than 256 pages are copied only when kept pages follow them, as
    makedumpfile -E does: the user pages that ended RAM were written, data and all."""
    k = KernelImage(1024)
    k.max_pfn += 512  # struct pages past the end of RAM, which makedumpfile reads in blocks
    for i in range(300, 1024):
        k.put(RAM_START + i * PAGE, (b"text page %5d " % i) * (PAGE // 16))
    for pfn in range(FIRST + 1020, FIRST + 1024):  # the last 4 pages: anonymous
        k.pages[pfn] = PageState(flags=1 << 4, mapping=0xFFFF888000003001, mapcount=0)
    k.build([(0, b"synthetic log")])
    src = str(tmp_path / "v.elf")
    k.write(src)
    sink = SeekSink()
    _write(open_vmcore(src), "elf", level, sink)
    ours = open_vmcore(sink.save(tmp_path / "ours"))
    ref = tmp_path / "mdf"
    subprocess.run(["makedumpfile", "-E", "-d", str(level), src, str(ref)], check=True,
                   capture_output=True)  # fmt: skip
    theirs = open_vmcore(str(ref))
    segs = [(p.paddr, p.filesz, p.memsz) for p in ours.loads]
    assert segs == [(p.paddr, p.filesz, p.memsz) for p in theirs.loads]
    assert segs[-1][0] + segs[-1][1] == RAM_START + 1020 * PAGE
