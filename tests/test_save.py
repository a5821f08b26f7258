"""`kdump-capture save` to local directories, run as a user would (a subprocess)."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from kdump_capture import speedups
from kdump_capture.dumpfile import KdumpReader
from kdump_capture.elf import PT_LOAD
from kdump_capture.errors import FreeSpaceError, Interrupted, TransportError
from kdump_capture.formats.structs import DUMP_DH_COMPRESSED_LZO
from kdump_capture.pipeline import BudgetMonitor
from kdump_capture.progress import NoProgress
from kdump_capture.sample import DEMO_LOG, PAGE, SampleSpec, write_demo, write_sample
from kdump_capture.urls import parse_target
from kdump_capture.vmcore import open_vmcore
from transports import open_transport
from transports.base import TransportSettings

from . import matrix
from .faults import fill
from .helpers import ROOT, cli, save_args


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=16))
    return str(p)


def dumps_in(savedir):
    return sorted(n for n in os.listdir(savedir) if not n.startswith("."))


def manifest(dumpdir):
    with open(os.path.join(dumpdir, "manifest.json")) as f:
        return json.load(f)


def test_level0_byte_identical_with_readme_manifest_and_modes(sample, tmp_path):
    savedir = tmp_path / "dumps"
    r = cli(*save_args(sample, str(savedir)))
    assert r.rc == 0, r.err
    [name] = dumps_in(savedir)
    d = savedir / name
    assert open(d / "vmcore", "rb").read() == open(sample, "rb").read()
    m = manifest(d)
    assert m["status"] == "complete" and m["dump_level"] == 0 and m["dump_format"] == "ELF"
    assert m["files"]["vmcore"]["size"] == os.path.getsize(sample)
    readme = (d / "README.txt").read_text()
    assert "6.1.0-sample-amd64" in readme and "2025-11-24 16:00:00 UTC" in readme
    assert "Status         : complete" in readme
    for p in [savedir, d]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    for f in os.listdir(d):
        assert stat.S_IMODE(os.stat(d / f).st_mode) == 0o600, f
    assert not [f for f in os.listdir(d) if f.startswith(".")]
    v = cli("verify", str(d))
    assert v.rc == 0, v.err
    # progress goes to stdout as plain lines when it is not a terminal (KDUMP_VERBOSE=3)
    assert "100%" in r.out


def test_verify_detects_tampering(sample, tmp_path):
    savedir = tmp_path / "dumps"
    assert cli(*save_args(sample, str(savedir))).rc == 0
    d = savedir / dumps_in(savedir)[0]
    with open(d / "vmcore", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X")
    v = cli("verify", str(d))
    assert v.rc == 8 and "vmcore" in v.err


def _phys_read(vm, paddr, size):
    for p in vm.loads:
        if p.paddr <= paddr < p.paddr + p.memsz:
            rel = paddr - p.paddr
            if rel >= p.filesz:
                return bytes(size)
            return vm.pread(size, p.offset + rel)
    raise AssertionError(f"paddr {paddr:#x} not in any PT_LOAD")


def test_level1_leaves_out_zero_runs_and_keeps_data(tmp_path):
    src = tmp_path / "vmcore"
    write_sample(str(src), SampleSpec(ram_mib=32, segments=2, sparse=True))
    # put data pages at known places: the first page, one in the middle, the last one
    with open_vmcore(str(src)) as vm:
        loads = vm.loads
    marks = []
    with open(src, "r+b") as f:
        for p in loads:
            for rel in (0, (p.filesz // 2) // PAGE * PAGE, p.filesz - PAGE):
                f.seek(p.offset + rel)
                data = (b"page@%x " % (p.paddr + rel)) * 400
                f.write(data[:PAGE])
                marks.append((p.paddr + rel, data[:PAGE]))
    savedir = tmp_path / "dumps"
    r = cli(*save_args(str(src), str(savedir), "KDUMP_DUMPLEVEL=1"))
    assert r.rc == 0, r.err
    out = savedir / dumps_in(savedir)[0] / "vmcore"
    assert os.path.getsize(out) < os.path.getsize(src) // 10
    with open_vmcore(str(out)) as vm, open_vmcore(str(src)) as orig:
        assert vm.notes_blob == orig.notes_blob
        assert sum(p.memsz for p in vm.loads) == sum(p.memsz for p in orig.loads)
        for paddr, data in marks:
            assert _phys_read(vm, paddr, PAGE) == data
        # an excluded page still reads as zeros
        assert _phys_read(vm, loads[0].paddr + 8 * PAGE, PAGE) == bytes(PAGE)
        assert all(p.type == PT_LOAD for p in vm.loads)
    assert manifest(out.parent)["dump_level"] == 1


def test_rotation_on_disk(sample, tmp_path):
    savedir = tmp_path / "dumps"
    for _ in range(4):
        assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=2")).rc == 0
    names = dumps_in(savedir)
    assert len(names) == 3  # the new one plus two older
    assert names[-1].endswith(".3")
    os.mkdir(savedir / "unrelated")  # not ours: never touched
    assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=-1")).rc == 0
    # every older dump went before writing, so the new one takes the crash time's own name
    stamp = names[-1].rsplit(".", 1)[0]
    assert stamp not in names
    assert dumps_in(savedir) == [stamp, "unrelated"]
    assert manifest(savedir / stamp)["status"] == "complete"
    for _ in range(3):
        assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=0")).rc == 0
    assert len(dumps_in(savedir)) == 5


def test_kill_mid_dump_leaves_nothing_complete_and_next_run_cleans(tmp_path):
    src = tmp_path / "big"
    write_sample(str(src), SampleSpec(ram_mib=3072, sparse=True))
    savedir = tmp_path / "dumps"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", *save_args(str(src), str(savedir))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    tmpfile = None
    while time.monotonic() < deadline and tmpfile is None:
        for root, _, files in os.walk(savedir) if savedir.exists() else []:
            for f in files:
                if f.startswith(".kdump-tmp.vmcore") and os.path.getsize(os.path.join(root, f)):
                    tmpfile = os.path.join(root, f)
        time.sleep(0.05)
    assert tmpfile, "the dump never started writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    [name] = dumps_in(savedir)
    d = savedir / name
    assert not (d / "manifest.json").exists() and not (d / "vmcore").exists()
    assert "INCOMPLETE" in (d / "README.txt").read_text()
    assert cli("verify", str(d)).rc == 8
    small = tmp_path / "small"
    write_sample(str(small), SampleSpec(ram_mib=4))
    r = cli(*save_args(str(small), str(savedir)))
    assert r.rc == 0, r.err
    # the stale dump was removed once the new one (the next name: same crash time) was saved
    [again] = dumps_in(savedir)
    assert again == f"{name}.1"
    assert manifest(savedir / again)["status"] == "complete"
    assert not [f for f in os.listdir(savedir / again) if f.startswith(".kdump-tmp")]
    assert os.path.getsize(savedir / again / "vmcore") == os.path.getsize(small)


def test_an_incomplete_dump_stays_until_the_next_one_is_saved(sample, tmp_path):
    # A run killed after the vmcore but before the manifest leaves a whole vmcore. It used to
    # be deleted at the start of the next run, before that run had saved anything.
    savedir = tmp_path / "dumps"
    assert cli(*save_args(sample, str(savedir))).rc == 0
    [name] = dumps_in(savedir)
    os.unlink(savedir / name / "manifest.json")
    whole = (savedir / name / "vmcore").read_bytes()
    # the next save fails before writing (it can never have the room it asks for)
    r = cli(*save_args(sample, str(savedir), "KDUMP_FREE_DISK_SIZE=100T"))
    assert r.rc == 5, r.err
    assert dumps_in(savedir) == [name]
    assert (savedir / name / "vmcore").read_bytes() == whole
    r = cli(*save_args(sample, str(savedir), "KDUMP_FREE_DISK_SIZE=0"))
    assert r.rc == 0, r.err
    assert dumps_in(savedir) == [f"{name}.1"]
    assert "left incomplete by an earlier run" in r.err


def test_keep_old_dumps_0_keeps_an_incomplete_dump_too(sample, tmpfs):
    """KEEP_OLD_DUMPS=0 keeps all, the README says; but a dump a killed run left without a
    manifest (its vmcore whole, the only copy of that crash) was deleted once the next
    dump was saved, and first of all when that one needed room. Now it stays."""
    savedir = tmpfs / "dumps"
    keep0 = "KDUMP_KEEP_OLD_DUMPS=0"
    assert cli(*save_args(sample, str(savedir), keep0, "KDUMP_FREE_DISK_SIZE=0")).rc == 0
    [name] = dumps_in(savedir)
    os.unlink(savedir / name / "manifest.json")
    before = {f: (savedir / name / f).read_bytes() for f in os.listdir(savedir / name)}
    r = cli(*save_args(sample, str(savedir), keep0, "KDUMP_FREE_DISK_SIZE=0"))
    assert r.rc == 0, r.err
    assert "left incomplete" not in r.err
    assert dumps_in(savedir) == [name, f"{name}.1"]
    st = os.statvfs(savedir)
    # short by a little: deleting the incomplete dump would make the room
    margin = (st.f_bavail * st.f_frsize - os.path.getsize(sample)) // (1 << 20) + 1
    r = cli(*save_args(sample, str(savedir), keep0, f"KDUMP_FREE_DISK_SIZE={margin}"))
    assert r.rc == 5, r.err
    assert "to make room" not in r.err
    assert {f: (savedir / name / f).read_bytes() for f in os.listdir(savedir / name)} == before


def _save_in_process(sample, savedir, keep: int = 0):
    """An ELF level-0 save to ``savedir`` in this process (for faults patched into it)."""
    from kdump_capture.pipeline import SavePlan, save_to_target
    from kdump_capture.urls import parse_savedir

    targets, _ = parse_savedir(f"file://{savedir}")
    plan = SavePlan(targets, "elf", 0, keep, 0, TransportSettings())
    with open_vmcore(sample) as vm:
        return save_to_target(vm, plan, targets[0])


def test_a_signal_during_rotation_after_the_dump_leaves_it_complete(sample, tmp_path, monkeypatch):
    # SIGTERM while rotation deleted an older dump, after the new one was complete, ended
    # the save "interrupted" (exit 130), as if the dump were lost.
    from transports.file import FileTransport

    savedir = tmp_path / "dumps"
    for _ in range(2):
        assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=1")).rc == 0

    def stopped(self, relpath):
        raise Interrupted("interrupted by signal 15")

    monkeypatch.setattr(FileTransport, "remove_tree", stopped)
    res = _save_in_process(sample, savedir, keep=1)
    assert res.record.status == "complete"
    assert manifest(savedir / res.directory)["status"] == "complete"
    assert len(dumps_in(savedir)) == 3  # the older two stay: rotation stopped


def test_a_rotated_sequence_number_is_not_taken_again(sample, tmp_path):
    # Dumps of the same second: .1 rotated away while .2 stays. A new dump named .1 would
    # sort before .2, and the next rotation would delete the newer dump.
    savedir = tmp_path / "dumps"
    for _ in range(3):
        assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=0")).rc == 0
    base, one, two = dumps_in(savedir)
    shutil.rmtree(savedir / one)
    assert cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=0")).rc == 0
    assert dumps_in(savedir) == [base, two, f"{base}.3"]


def test_a_target_full_at_the_manifest_leaves_a_readme_saying_incomplete(sample, tmp_path, tmpfs):
    # The manifest is the completeness mark; README.txt used to be replaced by its final
    # text ("Status: complete") before it, so a target full at the manifest (or a kill in
    # between) left a README saying complete beside no manifest.
    probe = tmp_path / "probe"
    assert cli(*save_args(sample, str(probe), "KDUMP_FREE_DISK_SIZE=0")).rc == 0
    [p] = dumps_in(probe)
    files = set(os.listdir(probe / p)) - {"README.txt", "manifest.json"}
    pages = sum(-(-os.path.getsize(probe / p / f) // 4096) * 4096 for f in files)
    savedir = tmpfs / "dumps"
    savedir.mkdir()
    # room for the placeholder README and the other files (the vmcore), not one page more
    fill(str(tmpfs), leave=4096 + pages)
    r = cli(*save_args(sample, str(savedir), "KDUMP_FREE_DISK_SIZE=0"))
    assert r.rc == 5, r.err
    [name] = dumps_in(savedir)
    assert not (savedir / name / "manifest.json").exists()
    assert "INCOMPLETE" in (savedir / name / "README.txt").read_text()
    assert "complete" not in cli("list", f"file://{savedir}").out.replace("incomplete", "")


def test_a_readme_that_cannot_be_written_after_the_manifest_is_a_warning(
    sample, tmp_path, monkeypatch
):
    # The final README comes after the manifest: when it could not be written (the target
    # full, a dropped connection), the save failed for a dump the manifest says is complete
    # (and skipped rotation), and verify failed on the README the manifest lists.
    from kdump_capture import pipeline
    from kdump_capture.errors import TargetFull

    put = pipeline._put

    def full_at_the_readme(transport, relpath, data, encrypt_to=()):
        if relpath.endswith("/README.txt") and data != pipeline.PLACEHOLDER.encode():
            raise TargetFull("no space left on device")
        return put(transport, relpath, data, encrypt_to)

    monkeypatch.setattr(pipeline, "_put", full_at_the_readme)
    savedir = tmp_path / "dumps"
    res = _save_in_process(sample, savedir)
    d = savedir / res.directory
    assert manifest(d)["status"] == "complete"
    assert sorted(os.listdir(d)) == ["manifest.json", "vmcore"]
    r = cli("verify", str(d))
    assert r.rc == 0, r.err
    assert "MISSING  README.txt" in r.out


def test_a_dump_deleted_half_way_no_longer_reads_complete(sample, tmp_path):
    # Deletion used to go in listing order (creation order on btrfs and XFS: the vmcore
    # first): stopped half way, it left manifest.json, so the dump still listed complete.
    # Here it stops at a tree no dump has (deeper than 8 levels), listed around the marks.
    savedir = tmp_path / "dumps"
    assert cli(*save_args(sample, str(savedir))).rc == 0
    [name] = dumps_in(savedir)
    d = savedir / name
    for f in ("vmcore", "README.txt", "manifest.json"):
        os.rename(d / f, d / f"{f}.x")
    for i in range(20):  # created around the marks, which are renamed back in between
        os.makedirs(d / f"deep{i:02}" / ("x/" * 9))
        if i == 10:
            for f in ("vmcore", "README.txt", "manifest.json"):
                os.rename(d / f"{f}.x", d / f)
    t = open_transport(parse_target(f"file://{savedir}")[0], TransportSettings())
    with t, pytest.raises(TransportError, match="nested"):
        t.remove_tree(name)
    assert not (d / "manifest.json").exists()
    assert not (d / "README.txt").exists()
    r = cli("list", f"file://{savedir}")
    assert "incomplete" in r.out and " complete" not in r.out


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"cannot mount a tmpfs for the disk-full test: {r.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_older_dumps_and_leaves_nothing_partial(tmp_path, tmpfs):
    small = tmp_path / "s"
    write_sample(str(small), SampleSpec(ram_mib=16))
    big = tmp_path / "b"
    write_sample(str(big), SampleSpec(ram_mib=40, crash_time=1764100000))
    savedir = tmpfs / "dumps"
    assert cli(*save_args(str(small), str(savedir), "KDUMP_FREE_DISK_SIZE=8")).rc == 0
    before = dumps_in(savedir)
    good = open(savedir / before[0] / "vmcore", "rb").read()
    # KEEP_OLD_DUMPS=5 would keep the old dump, so it must not be pruned to make room
    r = cli(*save_args(str(big), str(savedir), "KDUMP_FREE_DISK_SIZE=8"))
    assert r.rc == 5, r.err
    assert "KDUMP_FREE_DISK_SIZE" in r.err
    assert dumps_in(savedir) == before
    assert open(savedir / before[0] / "vmcore", "rb").read() == good
    assert sorted(os.listdir(savedir / before[0])) == ["README.txt", "manifest.json", "vmcore"]
    # margin 0: the pre-check still refuses a dump larger than the disk
    r = cli(*save_args(str(big), str(savedir), "KDUMP_FREE_DISK_SIZE=0"))
    assert r.rc == 5
    assert dumps_in(savedir) == before
    # KEEP_OLD_DUMPS=-1 allows deleting the old dump first: now it fits
    r = cli(*save_args(str(big), str(savedir), "KDUMP_FREE_DISK_SIZE=1", "KDUMP_KEEP_OLD_DUMPS=-1"))
    assert r.rc == 0, r.err
    assert len(dumps_in(savedir)) == 1 and dumps_in(savedir) != before


class ShrinkingDisk:
    """Test-only stand-in for a target whose free space drops while we write."""

    def __init__(self, free):
        self.free = free

    def free_space(self, relpath=""):
        return self.free

    def describe(self):
        return "test://shrinking"


def test_budget_monitor_stops_when_margin_would_be_crossed():
    MiB = 1 << 20
    disk = ShrinkingDisk(200 * MiB)
    mon = BudgetMonitor(disk, "d", 64 * MiB, None, NoProgress(), disk.free)
    mon.advance(MiB, MiB)  # first check: plenty
    mon.advance(8 * MiB, 8 * MiB)  # no check before 32 MiB more were written
    disk.free = 90 * MiB  # somebody else filled the disk: 26 MiB may still be written
    mon.advance(24 * MiB, 24 * MiB)  # checked; fine, and the next check comes sooner:
    assert mon.next_check - mon.written == 12 * MiB  # half of what is safe (26 - 2 MiB)
    mon.advance(11 * MiB, 11 * MiB)
    disk.free = 65 * MiB  # the next write could cross the margin
    with pytest.raises(FreeSpaceError, match="KDUMP_FREE_DISK_SIZE"):
        mon.advance(MiB, MiB)


def test_budget_monitor_never_stops_a_dump_whose_rest_fits():
    """Less room than one write step, but an upper bound of what is left fits: go on."""
    MiB = 1 << 20
    disk = ShrinkingDisk(65 * MiB)
    mon = BudgetMonitor(disk, "d", 64 * MiB, MiB, NoProgress(), disk.free)
    mon.advance(MiB // 2, MiB // 2)
    disk.free -= MiB // 2
    mon.advance(MiB // 2, MiB // 2)
    disk.free -= MiB // 2
    mon.check(final=True)  # exactly at the margin: kept
    disk.free -= 1
    with pytest.raises(FreeSpaceError):
        mon.check(final=True)
    # without the bound, the same room stops the dump at once
    disk.free = 65 * MiB
    with pytest.raises(FreeSpaceError):
        BudgetMonitor(disk, "d", 64 * MiB, None, NoProgress(), disk.free).advance(1, 1)


def test_budget_monitor_deletes_what_rotation_would_delete_before_stopping():
    MiB = 1 << 20
    disk = ShrinkingDisk(70 * MiB)
    freed = []

    def make_room(short):  # one old dump that rotation would delete anyway
        if freed:
            return False
        freed.append(short)
        disk.free += 20 * MiB
        return True

    mon = BudgetMonitor(disk, "d", 64 * MiB, None, NoProgress(), disk.free, make_room)
    mon.advance(MiB, MiB)
    assert freed == []  # 6 MiB of room: no need yet
    disk.free = 65 * MiB
    mon.advance(3 * MiB, 3 * MiB)
    assert freed == [MiB]  # one old dump went, 21 MiB of room now
    disk.free = 64 * MiB
    with pytest.raises(FreeSpaceError):
        mon.advance(11 * MiB, 11 * MiB)  # nothing is left to delete: stop
    assert len(freed) == 1


def test_disk_filling_during_the_write_stops_the_dump_and_keeps_older(tmp_path):
    """The stop-during-write path end to end: the pre-check finds room for the whole dump,
    then another writer takes most of it while the vmcore is written. The monitor's next
    check (every 32 MiB) stops the dump before the disk is full: exit 5, the partial
    directory removed, the older dump as it was."""
    src = tmp_path / "big"
    write_sample(str(src), SampleSpec(ram_mib=100, sparse=True, crash_time=1764100000))
    older = tmp_path / "older"
    write_sample(str(older), SampleSpec(ram_mib=4))
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # 128 MiB: the older dump (4 MiB), the new one (100 MiB), side files (4 MiB) and the
    # 8 MiB margin fit, with 12 MiB to spare.
    with matrix.tmpfs(str(mnt), 128 << 20):
        assert cli(*save_args(str(older), str(mnt), "KDUMP_FREE_DISK_SIZE=8")).rc == 0
        [old] = dumps_in(mnt)
        before = matrix.snapshot(str(mnt / old))
        conf = tmp_path / "kdump"
        matrix.write_config(str(conf), f"file://{mnt}", "KDUMP_FREE_DISK_SIZE=8\n")
        # At 40 MiB read (and written), leave 30 MiB: the writes up to the check at 65 MiB
        # take 25 MiB of them, and that check wants 32 MiB ahead plus the margin.
        run = matrix.Engine(str(conf)).run(
            str(src), at=[(0.4, lambda: fill(str(mnt), "other-writer", leave=30 << 20))]
        )
        assert run.fired, "the fault was never injected"
        assert run.rc == 5, run.err
        assert "KDUMP_FREE_DISK_SIZE" in run.last_line and "dump stopped" in run.last_line
        assert "removing the partial dump" in run.err and "Traceback" not in run.err
        assert dumps_in(mnt) == [old, "other-writer"]
        assert matrix.snapshot(str(mnt / old)) == before


def test_disk_filling_during_an_elf_copy_costs_no_older_dump(tmp_path):
    """KEEP_OLD_DUMPS=1 with two older dumps: the oldest is one rotation drops after success.
    Another writer fills the disk during an ELF copy, whose rest is known to the byte: the
    monitor deleted the oldest dump for the next write's 2 MiB, though the 60 MiB still to
    come could never fit, then stopped the dump anyway: a failed save cost an older dump.
    Now nothing is deleted when the room it frees cannot hold what the dump certainly needs."""
    src = tmp_path / "big"
    write_sample(str(src), SampleSpec(ram_mib=100, sparse=True, crash_time=1764100000))
    mnt = tmp_path / "disk"
    mnt.mkdir()
    with matrix.tmpfs(str(mnt), 128 << 20):
        sets = ("KDUMP_FREE_DISK_SIZE=8", "KDUMP_KEEP_OLD_DUMPS=1")
        for i, t in enumerate((1764000000, 1764050000)):
            older = tmp_path / f"older{i}"
            write_sample(str(older), SampleSpec(ram_mib=4, crash_time=t))
            assert cli(*save_args(str(older), str(mnt), *sets)).rc == 0
        before = {n: matrix.snapshot(str(mnt / n)) for n in dumps_in(mnt)}
        conf = tmp_path / "kdump"
        matrix.write_config(
            str(conf), f"file://{mnt}", "KDUMP_FREE_DISK_SIZE=8\nKDUMP_KEEP_OLD_DUMPS=1\n"
        )
        run = matrix.Engine(str(conf)).run(
            str(src), at=[(0.4, lambda: fill(str(mnt), "other-writer", leave=30 << 20))]
        )
        assert run.fired, "the fault was never injected"
        assert run.rc == 5, run.err
        assert "dump stopped" in run.last_line and "Traceback" not in run.err
        assert "to make room" not in run.err.replace("would not make room", "")
        assert dumps_in(mnt) == [*before, "other-writer"]
        assert {n: matrix.snapshot(str(mnt / n)) for n in before} == before


@pytest.mark.parametrize(
    "args, rc, fragment",
    [
        (["--vmcore", "/nonexistent/vmcore"], 3, "no such file"),
        (["--set", "KDUMP_DUMPLEVEL=77"], 2, "KDUMP_DUMPLEVEL"),
        (["--set", "KDUMP_SAVEDIR=gopher://x/y"], 2, "unknown scheme"),
        (["--set", "KDUMP_DUMPDEV=/dev/sdz9"], 10, "KDUMP_DUMPDEV"),
        (["--set", "KDUMP_NO_SUCH=1"], 2, "KDUMP_NO_SUCH"),
    ],
)
def test_exit_codes(sample, tmp_path, args, rc, fragment):
    base = [
        "save",
        "--config",
        "/nonexistent",
        "--no-reboot",
        "--set",
        f"KDUMP_SAVEDIR=file://{tmp_path}/d",
    ]
    if "--vmcore" not in args:
        base += ["--vmcore", sample]
    r = cli(*base, *args)
    assert r.rc == rc, (r.rc, r.err)
    assert fragment in r.err
    assert "Traceback" not in r.err


def test_bad_vmcore_exit_code(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello world" * 100)
    r = cli(*save_args(str(bad), str(tmp_path / "d")))
    assert r.rc == 4 and "offset 0x0" in r.err and "Traceback" not in r.err


def test_config_file_error_names_file_and_line(sample, tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text('# comment\nKDUMP_SAVEDIR="file:///tmp/x"\nKDUMP_KEEP_OLD_DUMPS=many\n')
    r = cli("save", "--config", str(conf), "--vmcore", sample, "--no-reboot")
    assert r.rc == 2
    assert f"{conf}:3: KDUMP_KEEP_OLD_DUMPS" in r.err


def test_show_config_redacts_passwords(tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text(
        'KDUMP_SAVEDIR="ftp://bob:hunter2@127.0.0.1/dumps"\nKDUMP_OPTIONS="--args-linux"\n'
    )
    r = cli("show-config", "--config", str(conf))
    assert r.rc == 0, r.err
    assert "hunter2" not in r.out + r.err
    assert 'KDUMP_SAVEDIR="ftp://bob:***@127.0.0.1/dumps"' in r.out
    assert 'KEXEC_OPTIONS="--args-linux"' in r.out
    assert 'KDUMP_KEEP_OLD_DUMPS="5"' in r.out


def test_missing_config_warns_and_uses_defaults(sample, tmp_path):
    r = cli(*save_args(sample, str(tmp_path / "d")))
    assert r.rc == 0
    assert "/nonexistent/kdump" in r.err


def _peak_rss_kib(args):
    # The source is read, not mapped: mapped windows of a regular file add their page cache
    # to RSS by timing and folio sizes (see test_scale.test_peak_rss_flat_from_1_to_8_gib).
    env = dict(os.environ, PYTHONPATH=ROOT, KDUMP_CAPTURE_NO_MMAP="1")
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "kdump_capture", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_peak_memory_is_flat_as_the_vmcore_grows(tmp_path):
    small, big = tmp_path / "s", tmp_path / "b"
    write_sample(str(small), SampleSpec(ram_mib=64, sparse=True))
    write_sample(str(big), SampleSpec(ram_mib=1024, sparse=True))
    a = _peak_rss_kib(save_args(str(small), str(tmp_path / "d1"), "KDUMP_FREE_DISK_SIZE=0"))
    b = _peak_rss_kib(save_args(str(big), str(tmp_path / "d2"), "KDUMP_FREE_DISK_SIZE=0"))
    assert b - a < 4096, f"peak RSS grew from {a} KiB to {b} KiB"


def test_pre_and_post_scripts(sample, tmp_path):
    log = tmp_path / "log"
    pre = f'echo "pre $KDUMP_VMCORE" >> {log}'
    post = f'echo "post $KDUMP_DUMP_DIR $KDUMP_DUMP_URL" >> {log}'
    r = cli(
        *save_args(
            sample, str(tmp_path / "d"), f"KDUMP_PRESCRIPT={pre}", f"KDUMP_POSTSCRIPT={post}"
        )
    )
    assert r.rc == 0, r.err
    lines = log.read_text().splitlines()
    name = dumps_in(tmp_path / "d")[0]
    assert lines[0].startswith("pre")
    assert lines[1] == f"post {name} file://{tmp_path}/d"


@pytest.mark.parametrize("continue_on_error", ["true", "false"])
def test_the_post_script_runs_after_a_failed_save_too(sample, tmp_path, continue_on_error):
    """SUSE runs KDUMP_POSTSCRIPT after a failed save as well (KDUMP_CONTINUE_ON_ERROR):
    a script that tells the admin, or turns a machine off, never ran when the dump failed.
    It runs, with KDUMP_DUMP_STATUS=failed (saved after a dump), and the save's exit code
    stays its failure's; with KDUMP_CONTINUE_ON_ERROR=false the failure stops it first."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where the target directory should be\n")
    log = tmp_path / "log"
    post = f'echo "post [$KDUMP_DUMP_STATUS] [$KDUMP_DUMP_DIR]" >> {log}'
    args = save_args(sample, str(blocker / "d"), f"KDUMP_POSTSCRIPT={post}")
    r = cli(*args, "--set", f"KDUMP_CONTINUE_ON_ERROR={continue_on_error}")
    assert r.rc == 6, r.err
    assert "kdump-capture: error:" in r.err.strip().splitlines()[-1]
    if continue_on_error == "true":
        assert log.read_text() == "post [failed] []\n"
    else:
        assert not log.exists()
    r = cli(*save_args(sample, str(tmp_path / "d"), f"KDUMP_POSTSCRIPT={post}"))
    assert r.rc == 0, r.err
    assert log.read_text().splitlines()[-1] == f"post [saved] [{dumps_in(tmp_path / 'd')[0]}]"


def test_a_script_may_set_up_the_terminal(sample, tmp_path):
    """A script that sets up the console (``stty`` on /dev/tty: tcsetattr) on a terminal
    whose foreground group is the save's: run in a process group of its own it was stopped
    by SIGTTOU, and the save hung. Scripts stay in the save's group."""
    import pty
    import select

    argv = [sys.executable, "-m", "kdump_capture"]
    argv += save_args(sample, str(tmp_path / "d"), "KDUMP_PRESCRIPT=stty sane < /dev/tty")
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["PYTHONPATH"] = ROOT
        os.execv(sys.executable, argv)
    end, out, status = time.monotonic() + 30, b"", None
    try:
        while status is None and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:  # EIO: the save closed its end
                    pass
            wpid, st = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(st) if wpid else None
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status == 0, out.decode(errors="replace")
    assert len(dumps_in(tmp_path / "d")) == 1


def test_failing_prescript(sample, tmp_path):
    r = cli(
        *save_args(
            sample, str(tmp_path / "d"), "KDUMP_PRESCRIPT=exit 3", "KDUMP_CONTINUE_ON_ERROR=false"
        )
    )
    assert r.rc == 12 and "KDUMP_PRESCRIPT failed (exit status 3)" in r.err
    assert not (tmp_path / "d").exists()
    r = cli(*save_args(sample, str(tmp_path / "d"), "KDUMP_PRESCRIPT=exit 3"))
    assert r.rc == 0 and "continuing" in r.err


NO_SH = """
import os, subprocess, sys
subprocess.run(["mount", "--bind", "/dev/null", "/bin/sh"], check=True)
os.execv(sys.executable, [sys.executable, "-m", "kdump_capture", *sys.argv[1:]])
"""


def _cli_without_sh(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a mount namespace of its own where /bin/sh cannot be run (/dev/null)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (a mount namespace)")
    env = {**os.environ, "PYTHONPATH": ROOT}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", NO_SH]
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=env, timeout=120)


def test_a_script_that_cannot_start_is_a_script_failure(sample, tmp_path):
    """/bin/sh that cannot be run (exec refused, fork failing for memory): a pre-script
    stopped the dump (exit 12, nothing saved) though KDUMP_CONTINUE_ON_ERROR=true says go
    on, and KDUMP_TRANSFER was exit 12 instead of its 14. Now it is a failure like any
    other of the command."""
    sets = ("KDUMP_PRESCRIPT=echo pre", "KDUMP_POSTSCRIPT=echo post")
    r = _cli_without_sh(*save_args(sample, str(tmp_path / "d"), *sets))
    assert r.returncode == 0, r.stderr
    assert len(dumps_in(tmp_path / "d")) == 1
    for directive in ("KDUMP_PRESCRIPT", "KDUMP_POSTSCRIPT"):
        assert f"{directive}: cannot run /bin/sh: Permission denied" in r.stderr
        assert f"{directive} failed (could not be started); continuing" in r.stderr
    r = _cli_without_sh(
        *save_args(sample, str(tmp_path / "e"), *sets, "KDUMP_CONTINUE_ON_ERROR=false")
    )
    assert r.returncode == 12 and not (tmp_path / "e").exists(), r.stderr
    assert "KDUMP_PRESCRIPT failed (could not be started)" in r.stderr
    r = _cli_without_sh(*save_args(sample, str(tmp_path / "f"), "KDUMP_TRANSFER=echo t"))
    assert r.returncode == 14, r.stderr
    assert "KDUMP_TRANSFER failed (could not be started)" in r.stderr


def test_transfer_replaces_the_flow(sample, tmp_path):
    dest = tmp_path / "copied"
    r = cli(*save_args(sample, str(tmp_path / "d"), f'KDUMP_TRANSFER=cp "$KDUMP_VMCORE" {dest}'))
    assert r.rc == 0, r.err
    assert dest.read_bytes() == open(sample, "rb").read()
    assert not (tmp_path / "d").exists()
    r = cli(*save_args(sample, str(tmp_path / "d"), "KDUMP_TRANSFER=exit 7"))
    assert r.rc == 14 and "KDUMP_TRANSFER failed (exit status 7)" in r.err


@pytest.mark.parametrize(
    "setting, what",
    [
        ("MAKEDUMPFILE_OPTIONS=-d 31", "makedumpfile options (this engine is not makedumpfile;"),
        ("KDUMP_COPY_KERNEL=yes", "copying the kernel image next to the dump is"),
        ("KDUMPTOOL_FLAGS=SPLIT", "SPLIT is"),
        ("KDUMP_FADUMP=yes", "firmware-assisted dump (ppc64 only) is"),
    ],
)
def test_unimplemented_directives_fail_clearly(sample, tmp_path, setting, what):
    r = cli(*save_args(sample, str(tmp_path / "d"), setting))
    assert r.rc == 9 and f"{setting.split('=')[0]}: {what}" in r.err  # the message printed a tuple
    assert "not supported" in r.err and "('" not in r.err
    assert not (tmp_path / "d").exists()


def test_unwritable_format_fails_before_rotation_deletes(sample, tmp_path):
    savedir = tmp_path / "d"
    assert cli(*save_args(sample, str(savedir))).rc == 0
    before = dumps_in(savedir)
    r = cli(*save_args(sample, str(savedir), "KDUMP_KEEP_OLD_DUMPS=-1", "KDUMP_DUMPFORMAT=snappy"))
    assert r.rc == 9 and "snappy" in r.err
    assert dumps_in(savedir) == before


@pytest.mark.parametrize(
    "available, cpus, replay, batches, workers, pages",
    [
        (None, 2, 16, 4, 2, 256),
        (1 << 40, 8, 16, 4, 2, 256),
        (128 << 20, 2, 16, 4, 2, 256),
        (100 << 20, 2, 12, 4, 2, 256),
        (48 << 20, 2, 6, 3, 2, 64),  # below 64 MiB: quarter-size batches
        (31 << 20, 2, 4, 2, 2, 64),
        (1 << 20, 2, 4, 2, 2, 64),
        (128 << 20, 1, 16, 2, 1, 256),  # a capture kernel's one CPU: one thread, two batches
        (None, 1, 16, 2, 1, 256),
    ],
)
def test_buffers_follow_available_memory(available, cpus, replay, batches, workers, pages):
    from kdump_capture.memory import FLOOR, BufferPlan, plan_buffers

    plan = plan_buffers(available, cpus)
    assert plan == BufferPlan(replay << 20, batches, workers, pages)
    assert plan.replay >= FLOOR.replay and plan.batches >= FLOOR.batches


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The built-in sample with a kernel: page tables, struct pages, a printk ring (16 MiB)."""
    p = tmp_path_factory.mktemp("demo") / "vmcore"
    write_demo(str(p), 16)
    return str(p)


def _makedumpfile_dmesg(dump, out):
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(dump), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_text()


def test_lzo_dump_end_to_end(demo, tmp_path):
    """KDUMP_DUMPFORMAT=lzo: makedumpfile reads the kernel log from it, and every page our
    reader decompresses is the source's page."""
    import lzo  # noqa: F401 - python-lzo is a test dependency: missing, this test fails

    savedir = tmp_path / "d"
    r = cli(*save_args(demo, str(savedir), "KDUMP_DUMPFORMAT=lzo", "KDUMP_DUMPLEVEL=31"))
    assert r.rc == 0, r.err
    d = savedir / dumps_in(savedir)[0]
    m = manifest(d)
    assert m["status"] == "complete" and m["dump_format"] == "kdump-compressed (lzo)"
    assert cli("verify", str(d)).rc == 0
    log = _makedumpfile_dmesg(d / "vmcore", tmp_path / "md.txt")
    assert log == (d / "dmesg.txt").read_text()
    assert DEMO_LOG[-1][1].decode() in log
    fd = os.open(d / "vmcore", os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        reader = KdumpReader(str(d / "vmcore"), lambda n, o: os.pread(fd, n, o), lambda: None, size)
        pfns = [pfn for pfn in range(reader.max_mapnr) if reader.is_dumped(pfn)]
        assert pfns
        lzo_pages = 0
        with open_vmcore(demo) as vm:
            for pfn in pfns:
                assert reader.page(pfn) == _phys_read(vm, pfn * PAGE, PAGE), hex(pfn)
                lzo_pages += bool(reader.desc(pfn).flags & DUMP_DH_COMPRESSED_LZO)
    finally:
        os.close(fd)
    assert lzo_pages > 0


def _no_python_lzo(tmp_path) -> str:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "lzo.py").write_text("raise ImportError('No module named lzo (test shim)')\n")
    return f"{shim}{os.pathsep}{ROOT}"


def test_lzo_without_liblzo2_or_python_lzo_is_refused_before_writing(demo, tmp_path):
    """The documented exit 9 when neither the accelerator's liblzo2 loop nor python-lzo is
    there (the pure-Python path, and a shim that makes the import fail)."""
    savedir = tmp_path / "d"
    env = {"PYTHONPATH": _no_python_lzo(tmp_path), "KDUMP_CAPTURE_PURE_PYTHON": "1"}
    r = cli(*save_args(demo, str(savedir), "KDUMP_DUMPFORMAT=lzo"), env=env)
    assert r.rc == 9, r.err
    last = r.err.splitlines()[-1]
    assert "python-lzo" in last and "liblzo2-dev" in last and "Traceback" not in r.err
    assert not savedir.exists() or dumps_in(savedir) == []


@pytest.mark.skipif(not hasattr(speedups.module(), "lzo_pages"), reason="built without liblzo2")
def test_lzo_with_the_accelerator_needs_no_python_lzo(demo, tmp_path):
    """The compiled lzo loop is enough: the same dump as makedumpfile -l, byte for byte."""
    savedir = tmp_path / "d"
    env = {"PYTHONPATH": _no_python_lzo(tmp_path)}
    r = cli(*save_args(demo, str(savedir), "KDUMP_DUMPFORMAT=lzo", "KDUMP_DUMPLEVEL=31"), env=env)
    assert r.rc == 0, r.err
    [name] = dumps_in(savedir)
    ref = tmp_path / "ref.lzo"
    subprocess.run(["makedumpfile", "-l", "-d", "31", demo, str(ref)], check=True,
                   capture_output=True)  # fmt: skip
    assert (savedir / name / "vmcore").read_bytes() == ref.read_bytes()


def test_format_none_saves_only_the_kernel_log(demo, sample, tmp_path):
    savedir = tmp_path / "d"
    r = cli(*save_args(demo, str(savedir), "KDUMP_DUMPFORMAT=none"))
    assert r.rc == 0, r.err
    [name] = dumps_in(savedir)
    d = savedir / name
    assert sorted(os.listdir(d)) == ["README.txt", "dmesg.txt", "manifest.json"]
    m = manifest(d)
    assert m["status"] == "complete" and m["dump_format"] == "none (dmesg only)"
    assert sorted(m["files"]) == ["README.txt", "dmesg.txt"]
    assert (d / "dmesg.txt").read_text() == _makedumpfile_dmesg(demo, tmp_path / "md.txt")
    assert cli("verify", str(d)).rc == 0
    # a vmcore without a kernel log leaves nothing to save: never a complete dump
    r = cli(*save_args(sample, str(tmp_path / "e"), "KDUMP_DUMPFORMAT=none"))
    assert r.rc == 4 and "Traceback" not in r.err, r.err
    for left in dumps_in(tmp_path / "e") if (tmp_path / "e").exists() else []:
        assert "FAILED" in (tmp_path / "e" / left / "README.txt").read_text()


def test_format_raw_is_a_verbatim_copy(demo, tmp_path):
    savedir = tmp_path / "d"
    r = cli(*save_args(demo, str(savedir), "KDUMP_DUMPFORMAT=raw"))
    assert r.rc == 0, r.err
    [name] = dumps_in(savedir)
    d = savedir / name
    assert (d / "vmcore").read_bytes() == open(demo, "rb").read()
    m = manifest(d)
    assert m["status"] == "complete" and m["dump_level"] == 0
    assert cli("verify", str(d)).rc == 0
    # raw copies every byte: a dump level is refused before anything is written
    r = cli(*save_args(demo, str(tmp_path / "e"), "KDUMP_DUMPFORMAT=raw", "KDUMP_DUMPLEVEL=31"))
    assert r.rc == 9 and "level" in r.err and "Traceback" not in r.err, r.err
    assert not (tmp_path / "e").exists()
