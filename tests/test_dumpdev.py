"""KDUMP_DUMPDEV: raw dump onto a (loop) block device, then `recover` into KDUMP_SAVEDIR."""

import os
import subprocess

import pytest

from kdump_capture import dumpdev
from kdump_capture.finish import should_reboot
from kdump_capture.sample import SampleSpec, write_sample

from .helpers import cli


@pytest.fixture
def loopdev(tmp_path):
    made = []

    def make(mib):
        img = tmp_path / f"dev{len(made)}.img"
        with open(img, "wb") as f:
            f.truncate(mib << 20)
        r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, f"cannot attach a loop device: {r.stderr}"
        made.append(r.stdout.strip())
        return made[-1]

    yield make
    for dev in made:
        subprocess.run(["umount", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=24))
    return str(p)


def _save_to_dev(sample, dev, *sets):
    args = ["save", "--config", "/nonexistent", "--vmcore", sample, "--set", f"KDUMP_DUMPDEV={dev}"]
    for s in sets:
        args += ["--set", s]
    return cli(*args)


def _recover(dev, savedir, *extra):
    return cli(
        "recover",
        "--config",
        "/nonexistent",
        "--device",
        dev,
        "--set",
        f"KDUMP_SAVEDIR=file://{savedir}",
        *extra,
    )


def test_round_trip_and_no_reboot(sample, loopdev, tmp_path):
    dev = loopdev(32)
    # KDUMP_IMMEDIATE_REBOOT=yes is the default: with a dump device we must not reboot
    # (this test process would not survive it).
    r = _save_to_dev(sample, dev)
    assert r.rc == 0, r.err
    assert "kdump-capture recover" in r.out
    h = dumpdev.read_header(dev)
    assert h.state == dumpdev.COMPLETE and h.data_size == os.path.getsize(sample)
    assert h.release == "6.1.0-sample-amd64" and h.format == "elf"
    savedir = tmp_path / "dumps"
    r = _recover(dev, savedir)
    assert r.rc == 0, r.err
    [name] = os.listdir(savedir)
    assert open(savedir / name / "vmcore", "rb").read() == open(sample, "rb").read()
    assert cli("verify", str(savedir / name)).rc == 0
    assert "Dump format    : ELF" in (savedir / name / "README.txt").read_text()
    assert dumpdev.read_header(dev).state == dumpdev.RECOVERED
    r = _recover(dev, savedir)
    assert r.rc == 0 and "already recovered" in r.out
    assert len(os.listdir(savedir)) == 1
    r = _recover(dev, savedir, "--force")
    assert r.rc == 0 and len(os.listdir(savedir)) == 2


def test_level1_on_device(loopdev, tmp_path):
    src = tmp_path / "sparse"
    write_sample(str(src), SampleSpec(ram_mib=64, sparse=True))
    dev = loopdev(8)  # too small for level 0, plenty for level 1
    assert _save_to_dev(str(src), dev, "KDUMP_DUMPLEVEL=0").rc == 10
    r = _save_to_dev(str(src), dev, "KDUMP_DUMPLEVEL=1")
    assert r.rc == 0, r.err
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 0, r.err


def test_too_small_device(sample, loopdev):
    dev = loopdev(8)
    r = _save_to_dev(sample, dev)
    assert r.rc == 10 and "too small" in r.err


def test_mounted_device_is_refused(sample, loopdev, tmp_path):
    dev = loopdev(32)
    subprocess.run(["mkfs.ext2", "-q", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        r = _save_to_dev(sample, dev)
        assert r.rc == 10 and "mounted on" in r.err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_interrupted_and_corrupt_dumps_are_not_recovered(sample, loopdev, tmp_path):
    dev = loopdev(32)
    assert _save_to_dev(sample, dev).rc == 0
    h = dumpdev.read_header(dev)
    with open(dev, "r+b") as f:  # flip one byte of the data
        f.seek(dumpdev.DATA_OFFSET + 5000)
        b = f.read(1)
        f.seek(dumpdev.DATA_OFFSET + 5000)
        f.write(bytes([b[0] ^ 0xFF]))
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 10 and "SHA-256" in r.err
    with open(dev, "r+b") as f:  # a header still saying "writing": the dump was cut short
        f.write(dumpdev.DeviceHeader(dumpdev.WRITING, 0, 0, 0, bytes(32), "", "elf", 0).pack())
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 10 and "incomplete" in r.err
    assert not (tmp_path / "d").exists() or not os.listdir(tmp_path / "d")
    del h


def test_blank_device(loopdev, tmp_path):
    dev = loopdev(4)
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 10 and "no kdump-capture dump" in r.err
    r = _recover(dev, tmp_path / "d", "--if-present")
    assert r.rc == 0


@pytest.mark.parametrize(
    "immediate, no_reboot, dumpdev_set, expected",
    [
        (True, False, "", True),
        (True, True, "", False),
        (True, False, "/dev/x", False),
        (False, False, "", False),
    ],
)
def test_reboot_decision(immediate, no_reboot, dumpdev_set, expected):
    assert should_reboot(immediate, no_reboot, dumpdev_set) is expected


def test_if_present_without_a_device_is_quiet(tmp_path):
    r = cli("recover", "--config", "/nonexistent", "--if-present")
    assert r.rc == 0
    r = cli("recover", "--config", "/nonexistent")
    assert r.rc == 2 and "KDUMP_DUMPDEV" in r.err
