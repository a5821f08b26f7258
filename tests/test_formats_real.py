"""Our dumps of the real sample against makedumpfile 1.7.2 and crash 8.0.2 on the same file."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from kdump_capture.dumpfile import open_dump
from kdump_capture.formats import NullMonitor, make_writer
from kdump_capture.formats.flat import rearrange
from kdump_capture.vmcore import open_vmcore

pytestmark = pytest.mark.vm
PAGE = 4096


class FileSink:
    def __init__(self, path: Path, seekable: bool) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in write_dump
        self.seekable = seekable

    def write(self, data) -> None:
        self.f.write(data)

    def seek(self, offset: int) -> None:
        assert self.seekable
        self.f.seek(offset)

    def tell(self) -> int:
        return self.f.tell()


def write_dump(src: Path, dst: Path, fmt: str, level: int, seekable: bool = True):
    with open_vmcore(str(src)) as vm:
        sink = FileSink(dst, seekable)
        try:
            return make_writer(vm, fmt, level, seekable).write(sink, NullMonitor())
        finally:
            sink.f.close()


def bitmap2(path: Path) -> bytes:
    data = path.read_bytes()
    sub_hdr_size, bitmap_blocks = struct.unpack_from("<iI", data, 432)
    half = bitmap_blocks * PAGE // 2
    start = PAGE * (1 + sub_hdr_size) + half
    return data[start : start + half]


def mdf_dmesg(path: Path, tmp: Path) -> str:
    out = tmp / (path.name + ".dmesg")
    p = subprocess.run(["makedumpfile", "--dump-dmesg", str(path), str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return out.read_text("ascii")


@pytest.fixture(scope="module")
def dumps(real_sample, tmp_path_factory):
    """Level-31 dumps of the 512 MiB sample: ours (zlib, zstd, flattened) and makedumpfile's."""
    tmp = tmp_path_factory.mktemp("real")
    src = Path(real_sample.path)
    out = {"tmp": tmp}
    subprocess.run(["makedumpfile", "-c", "-d", "31", str(src), str(tmp / "mdf31")],
                   check=True, capture_output=True)  # fmt: skip
    out["mdf"] = tmp / "mdf31"
    for fmt, seekable, name in [("compressed", True, "c31"), ("zstd", True, "z31"),
                                ("compressed", False, "flat31")]:  # fmt: skip
        out[name + "_result"] = write_dump(src, tmp / name, fmt, 31, seekable)
        out[name] = tmp / name
    return out


def test_same_pages_and_size_as_makedumpfile(dumps):
    assert bitmap2(dumps["c31"]) == bitmap2(dumps["mdf"])
    ours, theirs = dumps["c31"].stat().st_size, dumps["mdf"].stat().st_size
    assert abs(ours - theirs) <= 0.05 * theirs
    assert not dumps["c31_result"].notes


def test_makedumpfile_reads_compressed_and_rearranged(dumps, real_sample):
    tmp = dumps["tmp"]
    assert real_sample.marker in mdf_dmesg(dumps["c31"], tmp)
    assert dumps["flat31_result"].flattened
    rearrange(str(dumps["flat31"]), str(tmp / "re31"))
    with open(dumps["flat31"], "rb") as f:
        subprocess.run(["makedumpfile", "-R", str(tmp / "mre31")], stdin=f, check=True,
                       capture_output=True)  # fmt: skip
    assert (tmp / "re31").read_bytes() == (tmp / "mre31").read_bytes()
    assert (tmp / "re31").read_bytes() == dumps["c31"].read_bytes()
    assert real_sample.marker in mdf_dmesg(tmp / "re31", tmp)


def test_our_dmesg_of_every_format_is_makedumpfiles(dumps, real_sample):
    ref = mdf_dmesg(Path(real_sample.path), dumps["tmp"])
    for name in ("c31", "z31", "flat31"):
        with open_dump(str(dumps[name])) as d:
            assert d.dmesg() == ref, name


def test_zstd_is_makedumpfile_z_byte_for_byte(dumps, real_sample):
    """Our zstd format is what makedumpfile -z writes, byte for byte: one zstd frame per page
    at level 1, and the same headers, bitmaps and descriptors. Debian's makedumpfile is built
    without zstd; this needs one built with it (bench/makedumpfile_zstd.py)."""
    from bench.measure import zstd_makedumpfile

    mdz = zstd_makedumpfile()
    if not mdz:
        pytest.skip("no makedumpfile with zstd (bench/makedumpfile_zstd.py builds one)")
    tmp, src = dumps["tmp"], Path(real_sample.path)
    write_dump(src, tmp / "z1", "zstd", 1)
    for level, ours in (("31", dumps["z31"]), ("1", tmp / "z1")):
        ref = tmp / f"mdz{level}"
        subprocess.run([mdz, "-z", "-d", level, str(src), str(ref)], check=True,
                       capture_output=True)  # fmt: skip
        assert ours.read_bytes() == ref.read_bytes(), f"-d {level}"


def test_elf_level_31_close_to_makedumpfile(real_sample, tmp_path):
    src = Path(real_sample.path)
    write_dump(src, tmp_path / "e31", "elf", 31)
    subprocess.run(["makedumpfile", "-E", "-d", "31", str(src), str(tmp_path / "m31")],
                   check=True, capture_output=True)  # fmt: skip
    ours, theirs = (tmp_path / "e31").stat().st_size, (tmp_path / "m31").stat().st_size
    assert abs(ours - theirs) <= 0.01 * theirs
    assert real_sample.marker in mdf_dmesg(tmp_path / "e31", tmp_path)


def _split_into_pages(vm, count: int) -> list:
    """The sample's PT_LOADs as output segments, the first ``count`` pages one segment each."""
    from kdump_capture.formats.elf import OutSeg

    segs = []
    for p in vm.loads:
        done = 0
        while done < p.filesz and len(segs) < count:
            at = (p.vaddr + done, p.paddr + done, p.offset + done)
            segs.append(OutSeg(*at, PAGE, PAGE, p.flags))
            done += PAGE
        if done < p.memsz:
            rest = max(p.filesz - done, 0)
            segs.append(OutSeg(p.vaddr + done, p.paddr + done, p.offset + done, rest,
                               p.memsz - done, p.flags))  # fmt: skip
    return segs


@pytest.fixture(scope="module")
def xnum_elf(real_sample, tmp_path_factory):
    """The real sample as an ELF file with 70,000+ program headers: extended numbering."""
    from kdump_capture.formats.elf import write_elf_segments

    out = tmp_path_factory.mktemp("xnum") / "vmcore"
    with open_vmcore(real_sample.path) as vm:
        segs = _split_into_pages(vm, 70_000)
        sink = FileSink(out, True)
        try:
            write_elf_segments(vm, segs, sink, NullMonitor(), 0)
        finally:
            sink.f.close()
    return out, len(segs)


def test_extended_numbering_is_read_by_makedumpfile_and_by_us(xnum_elf, real_sample, tmp_path):
    # makedumpfile -E writes PN_XNUM past 0xFFFE segments; we wrote e_phnum 0xFFFF as a
    # count (which readers take for PN_XNUM), and past it copied excluded runs instead.
    path, nsegs = xnum_elf
    head = subprocess.run(["readelf", "-h", str(path)], capture_output=True, text=True).stdout
    assert f"Number of program headers:         65535 ({nsegs + 1})" in head, head
    assert real_sample.marker in mdf_dmesg(path, tmp_path)
    with open_vmcore(str(path)) as vm:
        assert len(vm.loads) == nsegs
    with open_vmcore(real_sample.path) as src, open_dump(str(path)) as ours:
        p = src.loads[-1]
        assert ours.read_phys(p.paddr, PAGE) == src.pread(PAGE, p.offset)
        assert real_sample.marker in ours.dmesg()


@pytest.mark.slow
def test_crash_opens_an_extended_numbered_elf(xnum_elf, real_sample, debug_vmlinux, tmp_path):
    cmds = tmp_path / "cmds"
    cmds.write_text("sys\nlog\nquit\n")
    p = subprocess.run(["crash", "-s", str(debug_vmlinux), str(xnum_elf[0]), "-i", str(cmds)],
                       capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert real_sample.marker in out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z31", "c31"])
def test_crash_opens_level_31_dumps(dumps, real_sample, debug_vmlinux, name):
    cmds = dumps["tmp"] / "cmds"
    cmds.write_text("sys\nlog\nbt\nquit\n")
    p = subprocess.run(["crash", "-s", str(debug_vmlinux), str(dumps[name]), "-i", str(cmds)],
                       capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert real_sample.marker in out
    assert 'PANIC: "Kernel panic - not syncing: sysrq triggered crash"' in out
    assert "sysrq_handle_crash" in out and "COMMAND:" in out
    # crash reports failures as "crash: ..." or "<command>: ..." lines (log lines start "[").
    bad = [ln for ln in out.splitlines() if ln.startswith(("crash:", "bt:", "log:", "sys:"))]
    assert not bad, bad
