"""KDUMP_FREE_DISK_SIZE with compressed dumps: the pre-check never refuses a dump that fits,
and the monitor stops (or makes room for) one that outgrows the disk while it streams."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from kdump_capture.formats import make_writer
from kdump_capture.sample import DEMO_LOG, KernelImage, SampleSpec, write_sample
from kdump_capture.vmcore import open_vmcore

from .bigcore import get_bigcore
from .helpers import cli, save_args
from .servers.targets import make_target
from .test_save_network import run_save, write_config

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs: ``small_disk(mib)`` mounts one and returns its path."""
    mounted = []

    def make(mib: int):
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"cannot mount a tmpfs: {r.stderr}"
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _sample(tmp_path, name, **spec):
    path = tmp_path / name
    write_sample(str(path), SampleSpec(**spec))
    return str(path)


def _dumps(savedir):
    return sorted(n for n in os.listdir(savedir) if not n.startswith("."))


def _status(savedir, name):
    with open(savedir / name / "manifest.json") as f:
        return json.load(f)["status"]


def _files(savedir, name):
    return {f: (savedir / name / f).read_bytes() for f in sorted(os.listdir(savedir / name))}


def test_compressed_dump_that_fits_is_saved(tmp_path, small_disk):
    """48 MiB of memory, 90% zero pages: 3.3 MB compressed. The old pre-check asked for the
    uncompressed size (about 52 MiB) and refused it on a 24 MiB disk with 8 MiB kept free."""
    src = _sample(tmp_path, "vmcore", ram_mib=48, zero_percent=90)
    savedir = small_disk(24) / "dumps"
    r = cli(*save_args(src, str(savedir), "KDUMP_DUMPFORMAT=compressed", "KDUMP_FREE_DISK_SIZE=8"))
    assert r.rc == 0, r.err
    [name] = _dumps(savedir)
    assert _status(savedir, name) == "complete"
    assert os.path.getsize(savedir / name / "vmcore") < 4 * MiB
    assert cli("verify", str(savedir / name)).rc == 0


def test_estimate_fits_but_output_does_not(tmp_path, small_disk):
    """Incompressible memory: the pre-check's lower bound fits, the output (25 MB) does not.
    The monitor stops the dump; the older dump stays whole; nothing incomplete is left."""
    disk = small_disk(24)
    savedir = disk / "dumps"
    old = _sample(tmp_path, "old", ram_mib=8, crash_time=1764000000)
    new = _sample(tmp_path, "new", ram_mib=48, zero_percent=0, crash_time=1764100000)
    sets = ("KDUMP_DUMPFORMAT=compressed", "KDUMP_FREE_DISK_SIZE=4")
    assert cli(*save_args(old, str(savedir), *sets)).rc == 0
    [kept] = _dumps(savedir)
    before = _files(savedir, kept)
    r = cli(*save_args(new, str(savedir), *sets))
    assert r.rc == 5, r.err
    assert "dump stopped" in r.err and "KDUMP_FREE_DISK_SIZE" in r.err  # the monitor's words
    assert "Traceback" not in r.err
    assert _dumps(savedir) == [kept]
    assert _files(savedir, kept) == before
    assert _status(savedir, kept) == "complete"
    assert not [n for n in os.listdir(savedir) if n.startswith(".")]
    assert cli("verify", str(savedir / kept)).rc == 0


def test_monitor_deletes_what_rotation_would_delete_to_make_room(tmp_path, small_disk):
    """KEEP_OLD_DUMPS=1: after success only the newest older dump stays, so the oldest may
    go when the output turns out larger than the room; the newer older one is never touched."""
    savedir = small_disk(44) / "dumps"
    sets = ("KDUMP_FREE_DISK_SIZE=4", "KDUMP_KEEP_OLD_DUMPS=1")
    for i, t in enumerate((1764000000, 1764050000)):
        old = _sample(tmp_path, f"old{i}", ram_mib=8, crash_time=t)
        assert cli(*save_args(old, str(savedir), *sets)).rc == 0
    oldest, newer = _dumps(savedir)
    before = _files(savedir, newer)
    new = _sample(tmp_path, "new", ram_mib=48, zero_percent=0, crash_time=1764100000)
    r = cli(*save_args(new, str(savedir), "KDUMP_DUMPFORMAT=compressed", *sets))
    assert r.rc == 0, r.err
    assert f"deleting old dump {oldest} to make room" in r.err
    names = _dumps(savedir)
    assert oldest not in names and newer in names and len(names) == 2
    assert _files(savedir, newer) == before
    assert all(_status(savedir, n) == "complete" for n in names)


def _logged_sample(tmp_path, name, ram_mib, random=False):
    """A synthetic kernel with a readable log (dmesg.txt); ``random``: incompressible RAM."""
    k = KernelImage(ram_mib * 256)
    k.build(DEMO_LOG)
    if random:
        start = k.next_free * 4096
        k.mem[start:] = os.urandom(len(k.mem) - start)
    path = tmp_path / name
    k.write(str(path), cpus=2)
    return str(path)


def _kept_log(savedir, name, err):
    """The failed dump the vmcore did not fit in: its log, a README and manifest saying why."""
    assert sorted(os.listdir(savedir / name)) == ["README.txt", "dmesg.txt", "manifest.json"]
    with open(savedir / name / "manifest.json") as f:
        m = json.load(f)
    assert m["status"] == "failed" and "KDUMP_FREE_DISK_SIZE" in m["error"]
    assert "Kernel panic - not syncing: sysrq triggered crash" in m["crash_summary"]["panic"]
    assert "sysrq triggered crash" in (savedir / name / "dmesg.txt").read_text()
    assert "the vmcore was not written" in err or "dump stopped" in err


def test_the_kernel_log_is_kept_when_the_vmcore_cannot_fit(tmp_path, small_disk):
    """An ELF dump larger than the disk was refused with 'nothing was written': the kernel
    log, which says why the machine crashed and fits easily, was lost with it (SUSE's kdump
    keeps dmesg and README.txt). Now it is saved with a failed record; older dumps stay."""
    disk = small_disk(24)
    savedir = disk / "dumps"
    old = _sample(tmp_path, "old", ram_mib=4, crash_time=1764000000)
    assert cli(*save_args(old, str(savedir), "KDUMP_FREE_DISK_SIZE=4")).rc == 0
    [kept] = _dumps(savedir)
    before = _files(savedir, kept)
    new = _logged_sample(tmp_path, "new", ram_mib=32)
    r = cli(*save_args(new, str(savedir), "KDUMP_FREE_DISK_SIZE=4", "KDUMP_KEEP_OLD_DUMPS=1"))
    assert r.rc == 5, r.err
    assert "the vmcore was not written" in r.err and "Traceback" not in r.err
    [failed] = [n for n in _dumps(savedir) if n != kept]
    _kept_log(savedir, failed, r.err)
    assert _files(savedir, kept) == before
    assert not [n for n in os.listdir(savedir) if n.startswith(".")]


def test_the_kernel_log_is_kept_when_the_monitor_stops_the_vmcore(tmp_path, small_disk):
    """The same when the vmcore outgrows the room while it streams (compressed, random RAM):
    the partial vmcore goes, dmesg.txt stays with a failed record."""
    savedir = small_disk(24) / "dumps"
    new = _logged_sample(tmp_path, "new", ram_mib=40, random=True)
    sets = ("KDUMP_DUMPFORMAT=compressed", "KDUMP_FREE_DISK_SIZE=4")
    r = cli(*save_args(new, str(savedir), *sets))
    assert r.rc == 5, r.err
    assert "dump stopped" in r.err and "Traceback" not in r.err
    [failed] = _dumps(savedir)
    _kept_log(savedir, failed, r.err)
    assert not [n for n in os.listdir(savedir) if n.startswith(".")]


@pytest.fixture(scope="module")
def big8g(tmp_path_factory):
    """A synthetic 8 GiB machine (tests/bigcore.py): 8 GiB as ELF, about 13 MB at -d 31.
    Same cache directory as tests/test_scale.py, so a session makes it once."""
    return get_bigcore(str(tmp_path_factory.getbasetemp() / "bigcores"), 8192)


def _bounds(src: str, fmt: str, level: int) -> tuple[int, int]:
    """The writer's (lower bound, upper estimate) of the output, as the pre-check sees them."""
    with open_vmcore(src) as vm:
        w = make_writer(vm, fmt, level, True)
        return w.lower_bound(), w.estimate()


@pytest.mark.parametrize("fmt", ["compressed", "zstd"])
def test_filtered_big_machine_fits_a_small_disk(big8g, small_disk, fmt):
    """Issue 9 (scale): at 1 TiB the pre-check asked for the uncompressed dumpable pages
    (73842 MiB) with 59457 MiB free, while the dump makedumpfile wrote was 1660 MB. Scaled
    down: an 8 GiB machine whose ELF size and upper estimate are far above a 32 MiB disk
    keeping 8 MiB free, but whose -d 31 dump (about 13 MB) fits, is saved."""
    lower, upper = _bounds(big8g, fmt, 31)
    assert os.path.getsize(big8g) > 200 * upper // 100 > 100 * MiB  # the premise
    assert lower < 8 * MiB
    savedir = small_disk(32) / "dumps"
    sets = (f"KDUMP_DUMPFORMAT={fmt}", "KDUMP_DUMPLEVEL=31", "KDUMP_FREE_DISK_SIZE=8")
    r = cli(*save_args(big8g, str(savedir), *sets))
    assert r.rc == 0, r.err
    [name] = _dumps(savedir)
    assert _status(savedir, name) == "complete"
    assert os.path.getsize(savedir / name / "vmcore") < 24 * MiB
    assert cli("verify", str(savedir / name)).rc == 0


def test_filtered_big_machine_is_refused_when_even_its_minimum_cannot_fit(big8g, small_disk):
    """The other half of a sound pre-check: headers, bitmaps and one descriptor per dumpable
    page are written whatever the pages compress to; when they and the margin exceed the free
    space, the save is refused before any of the vmcore is written (exit 5, older dumps
    untouched; the kernel log is kept with a failed record)."""
    lower, _ = _bounds(big8g, "compressed", 31)
    disk = small_disk(16)
    savedir = disk / "dumps"
    old = _sample(disk.parent, "old", ram_mib=4, crash_time=1764000000)
    assert cli(*save_args(old, str(savedir), "KDUMP_FREE_DISK_SIZE=0")).rc == 0
    [kept] = _dumps(savedir)
    before = _files(savedir, kept)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    margin = (free - lower) // MiB + 1  # the lower bound alone fits, with the margin it does not
    assert margin > 0
    sets = ("KDUMP_DUMPFORMAT=compressed", "KDUMP_DUMPLEVEL=31", f"KDUMP_FREE_DISK_SIZE={margin}")
    r = cli(*save_args(big8g, str(savedir), *sets, "KDUMP_KEEP_OLD_DUMPS=0"))
    assert r.rc == 5, r.err
    assert f"needs at least {-(-lower // MiB)} MiB" in r.err
    assert "the vmcore was not written" in r.err and "Traceback" not in r.err
    [failed] = [n for n in _dumps(savedir) if n != kept]
    assert _status(savedir, failed) == "failed"
    assert sorted(_files(savedir, failed)) == ["README.txt", "dmesg.txt", "manifest.json"]
    assert _files(savedir, kept) == before


@pytest.mark.vm
def test_real_vmcore_compressed_fits_a_small_disk(real_sample, small_disk, tmp_path):
    """The measured case of issue 8 (item 19): a real 410 MB vmcore of a 512 MiB guest makes
    about 17 MB as compressed level 31; a 64 MB disk keeping 16 MB free must take it."""
    savedir = small_disk(64) / "dumps"
    r = cli(
        *save_args(
            str(real_sample.path),
            str(savedir),
            "KDUMP_DUMPFORMAT=compressed",
            "KDUMP_DUMPLEVEL=31",
            "KDUMP_FREE_DISK_SIZE=16",
        )
    )
    assert r.rc == 0, r.err
    [name] = _dumps(savedir)
    vmcore = savedir / name / "vmcore"
    assert os.path.getsize(vmcore) < 32 * MiB
    out = tmp_path / "dmesg.txt"
    d = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(vmcore), str(out)], capture_output=True, text=True
    )
    assert d.returncode == 0, d.stdout + d.stderr
    assert real_sample.marker in out.read_text(errors="replace")


def test_older_dumps_stay_when_deleting_them_could_not_make_room(big8g, small_disk):
    """The pre-check deleted older dumps one by one while short, even when deleting all of
    them could never cover the shortfall (a corrupt vmcore claimed petabytes): they were lost
    and the save failed anyway. Now nothing is deleted unless it can make the room."""
    lower, _ = _bounds(big8g, "compressed", 31)
    disk = small_disk(16)
    savedir = disk / "dumps"
    for i, t in enumerate((1764000000, 1764050000)):
        old = _sample(disk.parent, f"old{i}", ram_mib=4, crash_time=t)
        assert cli(*save_args(old, str(savedir), "KDUMP_FREE_DISK_SIZE=0")).rc == 0
    oldest, newer = _dumps(savedir)
    before = {n: _files(savedir, n) for n in (oldest, newer)}
    freeable = sum(len(b) for b in before[oldest].values())
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    # short even after deleting the oldest, far past what it holds (the rule's slack)
    margin = (free + 4 * freeable + (1 << 30) - lower) // MiB + 2
    sets = ("KDUMP_DUMPFORMAT=compressed", "KDUMP_DUMPLEVEL=31", f"KDUMP_FREE_DISK_SIZE={margin}")
    r = cli(*save_args(big8g, str(savedir), *sets, "KDUMP_KEEP_OLD_DUMPS=1"))
    assert r.rc == 5, r.err
    assert "not deleting older dumps: all 1 that rotation allows would not make room" in r.err
    assert "to make room" not in r.err.replace("would not make room", "")
    assert {n: _files(savedir, n) for n in _dumps(savedir)} == before


def test_no_older_dump_is_deleted_for_room_it_cannot_make(tmp_path, small_disk):
    """KEEP_OLD_DUMPS=1 with two older 8 MiB dumps: the oldest is one rotation drops after
    success. An ELF copy of 48 MiB on a 40 MiB disk was 29 MiB short: the pre-check deleted
    the oldest dump (8 MiB) "to make room", was still short, and failed: the failed save
    cost an older dump (the rule then spared them only past 4 times what they hold plus
    1 GiB). Now none is deleted unless their listed sizes cover the shortfall."""
    savedir = small_disk(40) / "dumps"
    sets = ("KDUMP_FREE_DISK_SIZE=4", "KDUMP_KEEP_OLD_DUMPS=1")
    for i, t in enumerate((1764000000, 1764050000)):
        old = _sample(tmp_path, f"old{i}", ram_mib=8, crash_time=t)
        assert cli(*save_args(old, str(savedir), *sets)).rc == 0
    before = {n: _files(savedir, n) for n in _dumps(savedir)}
    new = _sample(tmp_path, "new", ram_mib=48, crash_time=1764100000)
    r = cli(*save_args(new, str(savedir), *sets))
    assert r.rc == 5, r.err
    assert "not deleting older dumps: all 1 that rotation allows would not make room" in r.err
    assert "to make room" not in r.err.replace("would not make room", "")
    assert {n: _files(savedir, n) for n in _dumps(savedir)} == before
    # when the listed sizes do cover the shortfall, the oldest goes and the dump is saved
    oldest = min(before)
    r = cli(*save_args(_sample(tmp_path, "fits", ram_mib=24), str(savedir), *sets))
    assert r.rc == 0, r.err
    assert f"deleting old dump {oldest} to make room" in r.err
    assert oldest not in _dumps(savedir) and len(_dumps(savedir)) == 2


@contextlib.contextmanager
def _btrfs(mnt, commit: int | None = None):
    """A 300 MiB btrfs (a loop image beside ``mnt``) mounted on ``mnt``: it counts deleted
    files as free only when its transaction commits (``commit`` seconds; 30 by default)."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is not installed (setup.sh installs btrfs-progs)")
    img = f"{mnt}.img"
    os.makedirs(mnt, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(300 * MiB)
    subprocess.run(["mkfs.btrfs", "-q", "-f", img], check=True, capture_output=True)
    opts = "loop" + (f",commit={commit}" if commit else "")
    subprocess.run(["mount", "-o", opts, img, str(mnt)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        os.unlink(img)


def _older_dumps_and_one_short(tmp_path, mnt, save):
    """Three older 40 MiB dumps through ``save(vmcore, *sets)``; the settings under which a
    new 80 MiB ELF dump is 30 MiB short: deleting the oldest alone makes the room."""
    for i, t in enumerate((1764000000, 1764050000, 1764080000)):
        old = _sample(tmp_path, f"old{i}", ram_mib=40, crash_time=t)
        assert save(old, "KDUMP_KEEP_OLD_DUMPS=0").rc == 0
    new = _sample(tmp_path, "new", ram_mib=80, crash_time=1764100000)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    st = os.statvfs(mnt)
    margin = -(-(st.f_bavail * st.f_frsize + 30 * MiB - os.path.getsize(new)) // MiB)
    return new, (f"KDUMP_FREE_DISK_SIZE={margin}", "KDUMP_KEEP_OLD_DUMPS=1")


def test_deleting_for_room_on_btrfs_deletes_only_what_is_needed(tmp_path):
    """btrfs (SUSE's default) showed a deleted dump's space only at its next commit: the
    pre-check deleted the oldest dump, still saw the disk short, deleted the next one too,
    then failed (exit 5): two older dumps and the new one lost, where deleting one was
    enough. Now the target's filesystem is synced (syncfs) after a deletion for room."""
    mnt = tmp_path / "btrfs"
    with _btrfs(mnt):
        savedir = mnt / "dumps"
        new, sets = _older_dumps_and_one_short(
            tmp_path, mnt, lambda src, *s: cli(*save_args(src, str(savedir), *s))
        )
        oldest, older, newest = _dumps(savedir)
        r = cli(*save_args(new, str(savedir), *sets))
        assert r.rc == 0, r.err
        assert r.err.count("to make room") == 1 and f"old dump {oldest} to make room" in r.err
        [saved] = [n for n in _dumps(savedir) if n not in (oldest, older, newest)]
        assert _dumps(savedir) == [newest, saved]  # rotation, after success, took `older`
        assert _status(savedir, saved) == "complete"


def test_a_deletion_that_frees_nothing_stops_the_deleting(tmp_path):
    """The dumps in a btrfs subvolume with a snapshot of it (snapper's, on SUSE): deleting
    a dump frees nothing. The pre-check deleted one older dump after the other, all it
    could, and failed: now it stops after the first, which gave back no space."""
    mnt = tmp_path / "btrfs"
    with _btrfs(mnt):
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "sv")], check=True)
        savedir = mnt / "sv" / "dumps"
        new, sets = _older_dumps_and_one_short(
            tmp_path, mnt, lambda src, *s: cli(*save_args(src, str(savedir), *s))
        )
        snap = ["btrfs", "subvolume", "snapshot", "-r", str(mnt / "sv"), str(mnt / "snap")]
        subprocess.run(snap, check=True, capture_output=True)
        oldest, *rest = _dumps(savedir)
        before = {n: _files(savedir, n) for n in rest}
        r = cli(*save_args(new, str(savedir), *sets))
        assert r.rc == 5, r.err
        assert f"deleting {oldest} gave back no space" in r.err
        assert r.err.count("to make room") == 1
        assert {n: _files(savedir, n) for n in _dumps(savedir)} == before


def test_deleting_for_room_on_a_servers_btrfs_waits_for_the_space(tmp_path, request):
    """The same over SFTP, to a server whose directory is on btrfs (committing every 5 s):
    the client cannot sync the server's filesystem, so the pre-check waits until the free
    space it reports shows the deletion before it looks at the shortfall again."""
    target = make_target("sftp", request)
    with _btrfs(target.server_dir, commit=5):
        conf = write_config(tmp_path / "kdump", target)
        new, sets = _older_dumps_and_one_short(
            tmp_path, target.server_dir, lambda src, *s: run_save(conf, src, *s)
        )
        r = run_save(conf, new, *sets)
        assert r.rc == 0, r.err
        assert r.err.count("to make room") == 1
        assert len(_dumps(target.server_dir)) == 2
