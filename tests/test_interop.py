"""The commands after a crash on what other tools made: makedumpfile files, other layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_capture.dumpfile import open_dump
from tests.helpers import ROOT, cli

pytestmark = pytest.mark.vm  # the real sample (generated once in a guest, then cached)


def makedumpfile(*args: str, stdout=None) -> None:
    subprocess.run(["makedumpfile", *args], check=True, stdout=stdout, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def mdf(real_sample, tmp_path_factory) -> dict[str, Path]:
    """makedumpfile's own files of the 512 MiB sample, and its --dump-dmesg of it."""
    tmp = tmp_path_factory.mktemp("mdf")
    src = real_sample.path
    out = {"tmp": tmp}
    makedumpfile("-E", "-d", "31", src, str(tmp / "elf31"))
    with open(tmp / "elf31.flat", "wb") as f:
        makedumpfile("-F", "-E", "-d", "31", src, stdout=f)
    makedumpfile("--dump-dmesg", src, str(tmp / "dmesg.txt"))
    for name in ("elf31", "elf31.flat", "dmesg.txt"):
        out[name] = tmp / name
    return out


def test_rearrange_of_makedumpfile_flattened_elf(mdf):
    # makedumpfile -F -E writes zeroed program headers first (at 0x40), then the ELF header,
    # and the real program headers last: "record for 0x40 before the dump's header is
    # complete" (exit 4), where makedumpfile -R rebuilds the file.
    out = mdf["tmp"] / "rearranged-elf"
    r = cli("rearrange", str(mdf["elf31.flat"]), str(out))
    assert r.rc == 0, r.err
    assert out.read_bytes() == mdf["elf31"].read_bytes()


def test_dmesg_and_summary_of_a_flattened_elf(mdf):
    # SUSE kdump 2.x writes every dump flattened, ELF ones with makedumpfile -F -E: both
    # were exit 9, "flattened stream of a non-kdump file; rearrange it first".
    r = cli("dmesg", str(mdf["elf31.flat"]))
    assert (r.rc, r.err) == (0, "")
    assert r.out == mdf["dmesg.txt"].read_text("ascii")
    s = cli("summary", str(mdf["elf31.flat"]))
    assert s.rc == 0 and "Kernel panic - not syncing" in s.out, s.err


def test_rearrange_reads_the_stream_from_a_pipe(mdf):
    # makedumpfile -R reads standard input (`ssh host cat vmcore.flat | ...`); ours failed on
    # a pipe with "OUT: cannot write the rearranged dump: Illegal seek" (exit 6): it asked
    # the input for its position.
    out = mdf["tmp"] / "from-a-pipe"
    env = dict(os.environ, PYTHONPATH=ROOT)
    with subprocess.Popen(["cat", str(mdf["elf31.flat"])], stdout=subprocess.PIPE) as cat:
        p = subprocess.run(
            [sys.executable, "-m", "kdump_capture", "rearrange", "/dev/stdin", str(out)],
            stdin=cat.stdout,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        cat.stdout.close()
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == mdf["elf31"].read_bytes()


@pytest.fixture(scope="module")
def split(real_sample_2g, tmp_path_factory) -> list[Path]:
    """makedumpfile --split -c -d 31 of the 2 GiB sample into three parts."""
    tmp = tmp_path_factory.mktemp("split")
    parts = [tmp / f"vmcore{i}" for i in (1, 2, 3)]
    makedumpfile("--split", "-c", "-d", "31", real_sample_2g.path, *map(str, parts))
    return parts


def test_each_part_of_a_split_dump_reads_its_own_pages(split, real_sample_2g):
    # A part's descriptors are numbered from its start_pfn; every page of the second part
    # read as "page frame ... is missing (incomplete dump)" (exit 4).
    with open_dump(real_sample_2g.path) as whole, open_dump(str(split[1])) as part:
        sub, reader = part.sub_header, part.read_phys.__self__
        assert sub.split and sub.start_pfn_64 > 0
        pfns = [p for p in range(sub.start_pfn_64, sub.end_pfn_64) if reader.is_dumped(p)]
        assert pfns
        for pfn in pfns[:: max(1, len(pfns) // 200)]:
            assert part.read_phys(pfn * 4096, 4096) == whole.read_phys(pfn * 4096, 4096)


def test_a_split_part_says_it_is_one_part_not_an_incomplete_dump(split, real_sample_2g, tmp_path):
    ref = tmp_path / "dmesg.txt"
    makedumpfile("--dump-dmesg", real_sample_2g.path, str(ref))
    first = cli("dmesg", str(split[0]))  # the log lies in the first part's page frames
    assert first.rc == 0, first.err
    assert first.out == ref.read_text("ascii")
    for part in split[1:]:
        r = cli("dmesg", str(part))
        assert r.rc == 9, r.err
        assert r.err.count("\n") == 1 and str(part) in r.err, r.err
        assert "split dump" in r.err and "incomplete" not in r.err and "corrupt" not in r.err


@pytest.fixture(scope="module")
def unfinished(real_sample, tmp_path_factory) -> dict[str, Path]:
    """makedumpfile -c -d 0 of the 512 MiB sample: whole, stopped by a full disk (it marks
    the file DUMP_DH_COMPRESSED_INCOMPLETE), and a whole one cut short (a copy, or a writer
    killed: nothing marks those)."""
    tmp = tmp_path_factory.mktemp("unfinished")
    whole = tmp / "whole"
    makedumpfile("-c", "-d", "0", real_sample.path, str(whole))
    # A disk 1 MiB short of the dump: the pages holding the log are written before it fills.
    mib = whole.stat().st_size // (1 << 20) - 1
    mnt, full = tmp / "mnt", tmp / "disk-full"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size={mib}m tmpfs {mnt} && "
        f"{{ makedumpfile -c -d 0 {real_sample.path} {mnt}/vmcore >/dev/null 2>&1; "
        f"cp {mnt}/vmcore {full}; }}"
    )
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True)
    status = int.from_bytes(full.read_bytes()[424:428], "little")
    assert status & 0x8, "makedumpfile did not mark the dump incomplete"
    cut = tmp / "cut-short"
    with open(whole, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(whole.stat().st_size * 95 // 100))
    ref = tmp / "dmesg.txt"
    makedumpfile("--dump-dmesg", real_sample.path, str(ref))
    return {"whole": whole, "disk-full": full, "cut-short": cut, "dmesg": ref}


@pytest.mark.parametrize("name", ["disk-full", "cut-short"])
def test_dmesg_and_summary_of_an_unfinished_makedumpfile_dump_say_so(unfinished, name):
    # Both printed the log or the summary and exited 0, not a word of the missing pages
    # (makedumpfile --dump-dmesg refuses the first; crash warns that it is incomplete).
    path = str(unfinished[name])
    r = cli("dmesg", path)
    assert r.out == unfinished["dmesg"].read_text("ascii")  # what it holds is printed
    assert r.rc == 13, r.err
    assert r.err.count("\n") == 1 and f"{path}: the dump is incomplete" in r.err, r.err
    s = cli("summary", path)
    assert "Kernel panic - not syncing" in s.out
    assert s.rc == 13 and "incomplete" in s.err, s.err
    assert cli("summary", "--json", path).rc == 13


def test_dmesg_and_summary_of_a_whole_makedumpfile_dump_are_exit_0(unfinished):
    r = cli("dmesg", str(unfinished["whole"]))
    assert (r.rc, r.err) == (0, "")
    assert r.out == unfinished["dmesg"].read_text("ascii")
    assert cli("summary", str(unfinished["whole"])).rc == 0


def test_a_flattened_dump_cut_short_says_truncated(real_sample, tmp_path):
    # A Red Hat vmcore-incomplete over SSH, or Debian's dump-incomplete: a makedumpfile -F
    # stream cut off. It read "bad or truncated record", as if forged.
    flat = tmp_path / "vmcore-incomplete"
    with open(flat, "wb") as f:
        makedumpfile("-F", "-c", "-d", "31", real_sample.path, stdout=f)
    os.truncate(flat, flat.stat().st_size * 9 // 10)
    for cmd in ("dmesg", "summary"):
        r = cli(cmd, str(flat))
        assert r.rc == 4 and r.err.count("\n") == 1, r.err
        assert f"{flat}: offset " in r.err and "the flattened stream is truncated" in r.err


def test_rearrange_waits_for_program_headers_that_hold_memory(mdf, tmp_path):
    # A writer may fill the PT_NOTE header first and the PT_LOADs last: until a PT_LOAD is
    # written the header bounds nothing (it bounded the file at its note, and refused).
    from kdump_capture.formats.flat import FlatOutput

    elf = mdf["elf31"].read_bytes()
    phoff, phnum = int.from_bytes(elf[32:40], "little"), int.from_bytes(elf[56:58], "little")
    table = bytearray(elf[phoff : phoff + phnum * 56])
    for i in range(phnum):
        if table[i * 56] == 1:  # PT_LOAD: not written yet
            table[i * 56 : i * 56 + 56] = bytes(56)

    class Sink:
        def __init__(self, f):
            self.write = f.write

    stream = tmp_path / "notes-first.flat"
    with open(stream, "wb") as f:
        out = FlatOutput(Sink(f))
        out.put(phoff, table)
        out.put(0, elf[:64])
        end = phoff + len(table)
        for off in range(end, len(elf), 1 << 20):
            out.put(off, elf[off : off + (1 << 20)])
        out.put(phoff, elf[phoff:end])
        out.finish()
    r = cli("rearrange", str(stream), str(tmp_path / "out"))
    assert r.rc == 0, r.err
    assert (tmp_path / "out").read_bytes() == elf


def test_an_elf_dump_stopped_before_its_program_headers_says_incomplete(mdf, tmp_path):
    # makedumpfile -E killed (Red Hat's vmcore-incomplete with an -E collector) leaves its
    # program headers zero: it read "none of the program headers is a PT_LOAD: the vmcore
    # holds no memory", as if corrupt.
    elf = bytearray(mdf["elf31"].read_bytes())
    phoff, phnum = int.from_bytes(elf[32:40], "little"), int.from_bytes(elf[56:58], "little")
    elf[phoff : phoff + phnum * 56] = bytes(phnum * 56)
    path = tmp_path / "vmcore-incomplete"
    path.write_bytes(elf)
    for cmd in ("dmesg", "summary"):
        r = cli(cmd, str(path))
        assert r.rc == 4 and r.err.count("\n") == 1, r.err
        assert f"{path}: offset {phoff:#x}: " in r.err and "the dump is incomplete" in r.err
