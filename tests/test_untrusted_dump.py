"""The crashed kernel's data is untrusted input (issue 8, items 7, 8, 9 and 13).

Sizes and offsets read from a dump (program headers, notes, kdump-compressed and flattened
headers, VMCOREINFO, the printk ring) are checked against what the dump can hold before
anything is allocated; a bad kernel log costs only dmesg.txt; a bad CRASHTIME costs only the
crash time; rearrange never touches an existing output. Cases that would take GiBs without
the checks run in a subprocess under an address-space limit, so that a regression fails the
test instead of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
import zstandard

from kdump_capture.dumpfile import open_dump
from kdump_capture.elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note, xnum_section
from kdump_capture.errors import VmcoreError
from kdump_capture.formats import NullMonitor, flat, make_writer
from kdump_capture.formats.structs import (
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
)
from kdump_capture.sample import PAGE, PAGE_OFFSET, RAM_START, KernelImage, SampleSpec, write_sample
from kdump_capture.vmcore import check_crash_time, open_vmcore

from .helpers import ROOT, cli, save_args

MESSAGES = [(0, b"Linux version 6.1.0-synthetic"), (2_000_000, b"the last words")]
GIB = 1 << 30


def dumps_in(savedir) -> list[str]:
    return sorted(n for n in os.listdir(savedir) if not n.startswith("."))


def manifest(dumpdir) -> dict:
    with open(os.path.join(dumpdir, "manifest.json")) as f:
        return json.load(f)


def cli_limited(args: list[str], mib: int = 1024):
    """The CLI under an address-space limit: a runaway allocation is a MemoryError, fast.

    Under AddressSanitizer (tests/test_sanitized.py) the limit cannot apply (its shadow
    memory alone reserves terabytes); its cap on one allocation does that job there."""

    def limit() -> None:
        if os.environ.get("KDUMP_CAPTURE_SANITIZED") != "1":
            resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "kdump_capture", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=limit,
    )


# -- item 7: a corrupt printk ring costs dmesg.txt, never the vmcore ----------------------------
# A 2 GiB PT_LOAD of memory the dump does not store (p_filesz 0: reads as zeros), mapped at a
# vmalloc address with 2 MiB pages: a real dump's RAM is as large, and before the checks a
# ring size taken from memory read through it until MemoryError.
VMALLOC = 0xFFFFC90000000000
ZERO_PA = 4 * GIB
ZERO_SIZE = 2 * GIB


def _ring_vmcore(path: str, corrupt: str, count_bits: int = 26) -> None:
    k = KernelImage(512)
    k.build(MESSAGES)
    for i in range(ZERO_SIZE >> 21):
        k.map(VMALLOC + (i << 21), ZERO_PA + (i << 21), huge=True)
    prb_ptr = k.symbols["prb"] - PAGE_OFFSET  # physical address of the `prb` pointer
    ring = k.get_u64(prb_ptr) - PAGE_OFFSET
    extra: dict[str, str] = {}
    if corrupt == "count_bits":
        k.put(ring, count_bits.to_bytes(4, "little"))  # prb_desc_ring.count_bits
        k.u64(ring + 8, VMALLOC)  # descs
        k.u64(ring + 16, VMALLOC)  # infos
    elif corrupt == "size_bits":
        k.put(ring + 48, (25).to_bytes(4, "little"))  # prb_data_ring.size_bits: 32 MiB
        k.u64(ring + 56, VMALLOC)  # data
    elif corrupt == "SIZE(printk_ringbuffer)":
        k.u64(prb_ptr, VMALLOC)
        extra["SIZE(printk_ringbuffer)"] = str(1 << 36)
    elif corrupt == "SIZE(prb_desc)":
        extra["SIZE(prb_desc)"] = str(1 << 30)
    notes = pack_note(b"CORE", NT_PRSTATUS, bytes(336))
    notes += pack_note(b"VMCOREINFO", 0, k.vmcoreinfo(extra).encode())
    data_off = PAGE + -(-len(notes) // PAGE) * PAGE
    size = len(k.mem)
    phdrs = [
        Phdr(PT_NOTE, 0, PAGE, 0, 0, len(notes), len(notes), 0),
        Phdr(PT_LOAD, 7, data_off, k.va(RAM_START), RAM_START, size, size, 0),
        Phdr(PT_LOAD, 7, data_off + size, VMALLOC, ZERO_PA, 0, ZERO_SIZE, 0),
    ]
    with open(path, "wb") as f:
        f.write(Ehdr.core(len(phdrs)).pack() + b"".join(p.pack() for p in phdrs))
        f.write(bytes(PAGE - f.tell()) + notes)
        f.write(bytes(data_off - f.tell()) + k.mem)


@pytest.mark.parametrize(
    "corrupt", ["count_bits", "size_bits", "SIZE(printk_ringbuffer)", "SIZE(prb_desc)"]
)
def test_corrupt_printk_ring_costs_only_dmesg(tmp_path, corrupt):
    src = str(tmp_path / "vmcore")
    _ring_vmcore(src, corrupt)
    savedir = tmp_path / "dumps"
    args = save_args(src, str(savedir), "KDUMP_DUMPFORMAT=ELF", "KDUMP_DUMPLEVEL=0")
    started = time.monotonic()
    r = cli_limited(args)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 60
    (name,) = dumps_in(savedir)
    doc = manifest(savedir / name)
    assert doc["status"] == "complete" and "vmcore" in doc["files"]
    assert "dmesg.txt" not in doc["files"] and not (savedir / name / "dmesg.txt").exists()
    why = [n for n in doc["notes"] if n.startswith("dmesg.txt not saved")]
    assert why and ("corrupt" in why[0] or "implausible" in why[0]), doc["notes"]
    assert why[0] in (savedir / name / "README.txt").read_text()
    assert (savedir / name / "vmcore").read_bytes() == open(src, "rb").read()


def test_the_ring_reader_checks_sizes_before_reading(tmp_path):
    from kdump_capture import dmesg

    src = str(tmp_path / "vmcore")
    # 2**20 descriptors is a real 32 MiB log's count, but needs 112 MiB this dump does not hold.
    _ring_vmcore(src, "count_bits", 20)
    tracemalloc.start()
    try:
        with open_vmcore(src) as vm, pytest.raises(VmcoreError, match="more than the dump"):
            dmesg.extract(vm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def _buggy_log_vmcore(vm):
    """A source whose kernel-memory reads hit an unexpected exception (a bug in a reader);
    the copy of the vmcore reads through another path and works."""
    from kdump_capture.vmcore import Vmcore

    from .faulty import adopt

    class Buggy(Vmcore):
        def pread(self, size, offset):
            raise ZeroDivisionError("a bug in a kernel structure reader")

    return adopt(vm, Buggy)


def test_any_failure_of_dmesg_extraction_is_recorded_and_the_vmcore_saved(tmp_path):
    from kdump_capture.pipeline import SavePlan, save_to_target
    from kdump_capture.urls import parse_savedir
    from transports.base import TransportSettings

    k = KernelImage(512)
    k.build(MESSAGES)
    src = str(tmp_path / "vmcore")
    k.write(src)
    targets, _ = parse_savedir(f"file://{tmp_path}/dumps")
    plan = SavePlan(targets, "elf", 0, 0, 0, TransportSettings())
    with open_vmcore(src) as vm:
        res = save_to_target(_buggy_log_vmcore(vm), plan, targets[0])
    d = tmp_path / "dumps" / res.directory
    doc = manifest(d)
    assert doc["status"] == "complete" and (d / "vmcore").read_bytes() == open(src, "rb").read()
    (why,) = [n for n in doc["notes"] if n.startswith("dmesg.txt not saved")]
    assert "ZeroDivisionError" in why and "internal error" in why
    assert why in (d / "README.txt").read_text()


# -- item 8: CRASHTIME is range-checked; nothing cheap fails after rotation ------------------
BAD_CRASHTIMES = ["99999999999999999999", "1e17", "100000000000000000", "-100000000000000", "x"]


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("1764000000", True),
        ("946684800", True),  # 2000-01-01
        ("946684799", False),
        ("0", False),
        ("", False),
        (" 1764000000", False),
        ("1764000000.5", False),
        ("+1764000000", False),
        *[(b, False) for b in BAD_CRASHTIMES],
    ],
)
def test_crash_time_range(raw, ok):
    value, why = check_crash_time(raw, now=1764000000)
    assert (value is not None) == ok and (why is None) == ok
    if ok:
        assert value == int(raw)
    else:
        assert "CRASHTIME=" in why
    assert check_crash_time(None, 0) == (None, None)
    # A capture kernel whose clock is unset (1970) still accepts a real crash time.
    assert check_crash_time("1764000000", now=0)[0] == 1764000000


def _old_dump(savedir, tmp_path) -> str:
    good = tmp_path / "good.vmcore"
    write_sample(str(good), SampleSpec(ram_mib=2))
    r = cli(*save_args(str(good), str(savedir), "KDUMP_DUMPFORMAT=ELF", "KDUMP_DUMPLEVEL=0"))
    assert r.rc == 0, r.err
    (name,) = dumps_in(savedir)
    assert name.startswith("2025-11-24")
    return name


def _bad_time_vmcore(path, crashtime: str) -> None:
    k = KernelImage(512)
    k.build(MESSAGES)
    k.write(str(path), {"CRASHTIME": crashtime})


@pytest.mark.parametrize(
    ("raw", "fmt"),
    [(raw, "ELF") for raw in BAD_CRASHTIMES] + [(raw, "compressed") for raw in BAD_CRASHTIMES[:2]],
)
def test_bad_crashtime_falls_back_to_the_clock(tmp_path, raw, fmt):
    savedir = tmp_path / "dumps"
    old = _old_dump(savedir, tmp_path)
    src = tmp_path / "bad.vmcore"
    _bad_time_vmcore(src, raw)
    before = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(time.time() - 1))
    r = cli(*save_args(str(src), str(savedir), f"KDUMP_DUMPFORMAT={fmt}",
                       "KDUMP_KEEP_OLD_DUMPS=-1"))  # fmt: skip
    after = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(time.time() + 1))
    assert r.rc == 0, r.err
    (name,) = dumps_in(savedir)
    assert name != old and before <= name <= after  # named after the capture kernel's clock
    doc = manifest(savedir / name)
    assert doc["status"] == "complete" and doc["crash_time"] is None
    (note,) = [n for n in doc["notes"] if n.startswith("CRASHTIME=")]
    assert "capture kernel's clock" in note
    readme = (savedir / name / "README.txt").read_text()
    assert "Crash time     : unknown" in readme and note in readme
    assert "dmesg.txt" in doc["files"]


@pytest.mark.parametrize("raw", BAD_CRASHTIMES)
def test_a_cheap_failure_happens_before_rotation_deletes_anything(tmp_path, raw):
    # KEEP_OLD_DUMPS=-1 deletes all old dumps before writing. A dump that can only fail
    # (format "none" saves only dmesg.txt, and this vmcore has no kernel log) must fail
    # before that, whatever CRASHTIME says.
    savedir = tmp_path / "dumps"
    old = _old_dump(savedir, tmp_path)
    before = manifest(savedir / old)
    src = tmp_path / "nolog.vmcore"
    write_sample(str(src), SampleSpec(ram_mib=1, crash_time=raw))  # no printk ring
    r = cli(*save_args(str(src), str(savedir), "KDUMP_DUMPFORMAT=none",
                       "KDUMP_KEEP_OLD_DUMPS=-1"))  # fmt: skip
    assert r.rc == 4, r.err
    assert "VMCOREINFO has no" in r.err and "Traceback" not in r.err
    assert dumps_in(savedir) == [old] and manifest(savedir / old) == before


# -- item 9: every header size is checked before it is allocated ----------------------------
def _peak(fn) -> int:
    """Peak traced memory while ``fn`` runs (it must raise VmcoreError)."""
    tracemalloc.start()
    try:
        with pytest.raises(VmcoreError) as e:
            fn()
        return tracemalloc.get_traced_memory()[1], str(e.value)
    finally:
        tracemalloc.stop()


def test_many_pt_notes_are_bounded_together(tmp_path):
    # 65535 PT_NOTEs, each 2 KiB of zeros (an empty note segment): 128 MiB together. Only the
    # first used to be bounded, and all of them were read into one blob.
    phnum = 65535  # extended numbering from here on: section 0 behind them holds the count
    hdr = 64 + phnum * 56 + 64
    notes_off = -(-hdr // PAGE) * PAGE
    ph = Phdr(PT_NOTE, 0, notes_off, 0, 0, 2048, 2048, 0).pack()
    p = tmp_path / "notes"
    with open(p, "wb") as f:
        f.write(Ehdr.core(phnum).pack() + ph * phnum + xnum_section(phnum))
        f.write(bytes(notes_off - hdr + 2048))
    peak, msg = _peak(lambda: open_vmcore(str(p)))
    assert "implausibly large" in msg and "65535 PT_NOTE" in msg
    assert peak < 64 << 20  # the 65535 program headers themselves take about 25 MiB


def _xnum_file(path, sh_info: int, shentsize: int = 64, shoff: int | None = None) -> None:
    """A core file whose e_phnum is PN_XNUM: section 0 behind 2 program headers."""
    import struct as st

    ehdr = bytearray(Ehdr.core(2).pack())
    shoff = 64 + 2 * 56 if shoff is None else shoff
    st.pack_into("<Q", ehdr, 0x28, shoff)
    st.pack_into("<HHHH", ehdr, 0x38, 0xFFFF, shentsize, 1, 0)
    ph = Phdr(PT_LOAD, 7, PAGE, PAGE_OFFSET, 0, PAGE, PAGE, 0).pack() * 2
    path.write_bytes((bytes(ehdr) + ph + xnum_section(sh_info)).ljust(PAGE, b"\0") + bytes(PAGE))


@pytest.mark.parametrize(
    ("sh_info", "shentsize", "shoff", "message"),
    [
        (1 << 31, 64, None, "offset 0xdc: section 0 gives 2147483648 program headers"),
        (0, 64, None, "offset 0xdc: section 0 gives 0 program headers"),
        (2, 32, None, "offset 0x3a: e_phnum is PN_XNUM but e_shentsize 32"),
        (2, 64, (1 << 64) - 8, "offset 0x28: e_shoff 0xfffffffffffffff8 is out of range"),
        (2, 64, 5 * PAGE, "file ends inside section 0"),
    ],
)
def test_extended_numbering_from_an_untrusted_header(tmp_path, sh_info, shentsize, shoff, message):
    p = tmp_path / "xnum"
    _xnum_file(p, sh_info, shentsize, shoff)
    with pytest.raises(VmcoreError, match=message):
        open_vmcore(str(p))


def test_a_vmcore_without_memory_is_not_saved_as_complete(tmp_path):
    # Notes and no PT_LOAD (a corrupt ELF header): saved as a "complete" dump of 8 KiB,
    # exit 0, in every format. makedumpfile refuses it; so do we (exit 4, no dump).
    notes = pack_note(b"CORE", NT_PRSTATUS, bytes(336))
    src = tmp_path / "vmcore"
    head = Ehdr.core(1).pack() + Phdr(PT_NOTE, 0, PAGE, 0, 0, len(notes), len(notes), 0).pack()
    src.write_bytes(head.ljust(PAGE, b"\0") + notes)
    savedir = tmp_path / "dumps"
    for fmt in ("ELF", "compressed"):
        r = cli(*save_args(str(src), str(savedir), f"KDUMP_DUMPFORMAT={fmt}"))
        assert r.rc == 4, r.err
        assert "offset 0x38: none of the 1 program headers is a PT_LOAD" in r.err
        assert not savedir.exists() or not any(savedir.iterdir())


def test_extended_numbering_gives_the_count(tmp_path):
    p = tmp_path / "xnum"
    _xnum_file(p, 2)
    with open_vmcore(str(p)) as vm:
        assert len(vm.loads) == 2


class _FileSink:
    seekable = True

    def __init__(self, path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, data) -> None:
        self.f.write(data)

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


def _vmcore_with_notes(path, notes: bytes, ram_pages: int = 256) -> None:
    """A vmcore of ``ram_pages`` pages of RAM behind one PT_NOTE holding ``notes``."""
    notes_off = PAGE
    data_off = notes_off + -(-len(notes) // PAGE) * PAGE
    ram = ram_pages * PAGE
    head = Ehdr.core(2).pack() + Phdr(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0).pack()
    head += Phdr(PT_LOAD, 7, data_off, PAGE_OFFSET + RAM_START, RAM_START, ram, ram, 0).pack()
    with open(path, "wb") as f:
        f.write(head.ljust(notes_off, b"\0") + notes.ljust(data_off - notes_off, b"\0"))
        f.write(bytes(range(256)) * (ram // 256))


def test_a_note_segment_of_empty_notes_is_refused_within_bounds(tmp_path):
    # 48 MiB of 12-byte empty notes: 4 million objects, 2.2 GB for 60 MiB of them.
    p = tmp_path / "vmcore"
    _vmcore_with_notes(p, struct.pack("<III", 0, 0, 1) * (4 << 20))
    peak, msg = _peak(lambda: open_vmcore(str(p)))
    assert "more than 65536 notes" in msg and "PT_NOTE" in msg
    assert peak < 64 << 20  # the segment itself: 48 MiB


@pytest.mark.parametrize(("fmt", "mapped"), [("elf", True), ("compressed", True), ("elf", False)])
def test_a_large_note_is_mapped_or_held_once(tmp_path, monkeypatch, fmt, mapped):
    # A device-dump note (NT_VMCOREDD) of 24 MiB was held by the notes, copied into the
    # header (ELF) or behind the sub header (kdump-compressed), and sliced into its
    # description: about three times its size at the peak. Then it was held once, read
    # from the source; /proc/vmcore (a regular file, as here) has the capture kernel's own
    # copy mapped instead, and only a source that is read (KDUMP_CAPTURE_NO_MMAP) holds it.
    big = 24 << 20
    if not mapped:
        monkeypatch.setenv("KDUMP_CAPTURE_NO_MMAP", "1")

    def peak(extra: int) -> int:
        notes = pack_note(b"CORE", NT_PRSTATUS, bytes(336))
        notes += pack_note(b"VMCOREDD", 0x700, bytes(extra))
        p = tmp_path / f"vmcore-{extra}"
        _vmcore_with_notes(p, notes)
        tracemalloc.start()
        try:
            with open_vmcore(str(p), map_notes=True) as vm:  # as `save` opens its source
                sink = _FileSink(tmp_path / "out")
                try:
                    make_writer(vm, fmt, 0, True).write(sink, NullMonitor())
                finally:
                    sink.f.close()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(0)  # imports and module constants, once
    more = peak(big) - peak(0)
    held = 0 if mapped else big
    assert more < held + (2 << 20), f"{more >> 20} MiB more at the peak"


@pytest.fixture(scope="module")
def kdump_file(tmp_path_factory):
    """A small kdump-compressed (zlib) dump of a synthetic kernel."""
    d = tmp_path_factory.mktemp("kd")
    k = KernelImage(256)
    k.build(MESSAGES)
    k.write(str(d / "elf"))
    with open_vmcore(str(d / "elf")) as vm:
        for name, seekable in (("kdump", True), ("flat", False)):
            sink = _FileSink(d / name)
            sink.seekable = seekable
            make_writer(vm, "compressed", 1, seekable).write(sink, NullMonitor())
            sink.close()
    return d


def test_a_bitmap_larger_than_max_mapnr_needs_is_refused(kdump_file, tmp_path):
    """The 2nd bitmap is read whole, and a sparse file may claim any size: bitmap_blocks
    2^20 in a file of 48 KiB on disk read 2 GiB into memory for `dmesg` (MemoryError, exit
    1, under a limit). It must be what max_mapnr needs."""
    p = _patched(kdump_file / "kdump", tmp_path / "bad", 436, "<I", 1 << 20)
    with open(p, "r+b") as f:
        f.truncate(5 << 30)  # sparse: the blocks the header claims are "there"
    with pytest.raises(VmcoreError, match=r"offset 0x1b4: bitmap_blocks 1048576 is more than"):
        open_dump(p)
    r = cli("dmesg", p)
    assert r.rc == 4 and "bitmap_blocks 1048576" in r.err


def _patched(src, dst, offset: int, fmt: str, value: int) -> str:
    data = bytearray(open(src, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return str(dst)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (436, "<I", 0xFFFFFFFF, "past the end"),  # bitmap_blocks
        (428, "<i", 1 << 30, "bad block_size"),
        (432, "<i", 0x7FFFFFFF, "past the end"),  # sub_hdr_size
        (PAGE + 56, "<Q", 1 << 36, "size_note"),
        (PAGE + 48, "<q", -4096, "negative"),  # offset_note
        (PAGE + 40, "<Q", 1 << 40, "size_vmcoreinfo"),
    ],
)
def test_kdump_header_sizes_are_checked(kdump_file, tmp_path, offset, fmt, value, message):
    p = _patched(kdump_file / "kdump", tmp_path / "bad", offset, fmt, value)
    peak, msg = _peak(lambda: open_dump(p).dmesg())
    assert message in msg and peak < 16 << 20


def _first_desc(path) -> int:
    with open_dump(str(path)) as d:
        return d.header.block_size * (1 + d.header.sub_hdr_size + d.header.bitmap_blocks)


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_a_decompression_bomb_page_is_stopped_at_one_block(kdump_file, tmp_path, codec):
    # The first page's data replaced by a stream that inflates to 64 MiB (zlib: from its
    # 4 KiB; zstd: its frame header even announces the size).
    if codec == "zlib":
        bomb = zlib.compressobj(9).compress(bytes(64 << 20))[:PAGE]
        flag = DUMP_DH_COMPRESSED_ZLIB
    else:
        bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
        flag = DUMP_DH_COMPRESSED_ZSTD
    assert len(bomb) <= PAGE
    data = bytearray(open(kdump_file / "kdump", "rb").read())
    desc = _first_desc(kdump_file / "kdump")
    struct.pack_into("<qII", data, desc, len(data), len(bomb), flag)
    (tmp_path / "bomb").write_bytes(bytes(data) + bomb)
    with open_dump(str(tmp_path / "bomb")) as d:
        # The first descriptor is RAM's first page: level 1 keeps zero pages in the bitmap.
        peak, msg = _peak(lambda: d.read_phys(RAM_START, 16))
    assert "decompress" in msg and peak < 1 << 20


def test_flattened_record_far_past_the_header_is_refused(kdump_file, tmp_path):
    # The second record's offset moved to 2**42: a 4.6 KiB stream used to make a 4 TiB file.
    data = bytearray(open(kdump_file / "flat", "rb").read())
    first_size = struct.unpack_from(">q", data, flat.FLAT_HEADER_SIZE + 8)[0]
    second = flat.FLAT_HEADER_SIZE + 16 + first_size
    struct.pack_into(">q", data, second, 1 << 42)
    src = tmp_path / "far"
    src.write_bytes(bytes(data))
    out = tmp_path / "out" / "vmcore"
    out.parent.mkdir()
    r = cli("rearrange", str(src), str(out))
    assert r.rc == 4 and "beyond" in r.err and "header allows" in r.err
    assert os.listdir(out.parent) == []
    with pytest.raises(VmcoreError, match="header allows"):
        flat.FlatFile(str(src))


def _flat_with(head: bytes, records: Iterator[bytes], path) -> None:
    with open(path, "wb") as f:
        f.write(flat.flat_header() + flat.RECORD.pack(0, len(head)) + head)
        for rec in records:
            f.write(rec)
        f.write(flat.END_MARKER)


def test_a_flattened_stream_that_keeps_overwriting_is_refused_at_once(kdump_file, tmp_path):
    # 3M one-byte records over the same byte: indexed as Python tuples, 680 MB before any
    # error. Records that go back more often than a dump writer's need more lanes than allowed.
    head = open(kdump_file / "kdump", "rb").read(8192)
    one = flat.RECORD.pack(8192, 1) + b"\0"
    _flat_with(head, (one * 65536 for _ in range(48)), tmp_path / "s")
    peak, msg = _peak(lambda: flat.FlatFile(str(tmp_path / "s")))
    assert "rearrange" in msg and peak < 1 << 20


def test_a_flattened_stream_of_tiny_records_is_indexed_compactly(kdump_file, tmp_path):
    # 2^16 one-byte records in offset order (one lane): 24 bytes of index each, and a read
    # over all of them collects nothing (it used to build a tuple per record).
    head = open(kdump_file / "kdump", "rb").read(8192)
    n = 1 << 16

    def records():
        for j in range(n >> 16):
            base = 8192 + (j << 16)
            yield b"".join(flat.RECORD.pack(base + i, 1) + b"\x01" for i in range(1 << 16))

    _flat_with(head, records(), tmp_path / "s")
    tracemalloc.start()
    try:
        ff = flat.FlatFile(str(tmp_path / "s"))
        got = ff.pread(n, 8192)
        peak = tracemalloc.get_traced_memory()[1]
        ff.close()
    finally:
        tracemalloc.stop()
    assert got == b"\x01" * n
    assert peak < 32 * n + (2 << 20)


# -- item 13: rearrange writes a new file and renames it at the end -------------------------
def test_rearrange_replaces_a_link_never_writes_through_it(kdump_file, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "vmcore"
    out.symlink_to(victim)
    size = flat.rearrange(str(kdump_file / "flat"), str(out))
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and out.read_bytes() == (kdump_file / "kdump").read_bytes()
    assert size == out.stat().st_size and (out.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["victim", "vmcore"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_failed_rearrange_leaves_an_existing_output_alone(kdump_file, tmp_path, damage):
    data = open(kdump_file / "flat", "rb").read()
    src = tmp_path / "bad"
    src.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:4096] + b"x" * 64)
    out = tmp_path / "vmcore"
    out.write_bytes(b"an older rearranged dump")
    r = cli("rearrange", str(src), str(out))
    assert r.rc == 4, r.err
    assert out.read_bytes() == b"an older rearranged dump"
    assert sorted(os.listdir(tmp_path)) == ["bad", "vmcore"]  # no temporary file left


def test_rearrange_of_a_flattened_elf_stays_within_its_headers(tmp_path):
    # makedumpfile -E -F writes ELF as a flattened stream: its program headers bound it.
    elf = tmp_path / "elf"
    k = KernelImage(64)
    k.build(MESSAGES)
    k.write(str(elf))
    data = elf.read_bytes()
    stream = flat.flat_header()
    for off in range(0, len(data), 20000):  # records of odd sizes, in order
        piece = data[off : off + 20000]
        stream += flat.RECORD.pack(off, len(piece)) + piece
    src = tmp_path / "stream"
    src.write_bytes(stream + flat.END_MARKER)
    assert flat.rearrange(str(src), str(tmp_path / "out")) == len(data)
    assert (tmp_path / "out").read_bytes() == data
    far = stream + flat.RECORD.pack(len(data) + (1 << 30), 8) + b"x" * 8 + flat.END_MARKER
    src.write_bytes(far)
    with pytest.raises(VmcoreError, match="header allows"):
        flat.rearrange(str(src), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data
