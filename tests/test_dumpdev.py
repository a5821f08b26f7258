"""KDUMP_DUMPDEV: raw dump onto a (loop) block device, then `recover` into KDUMP_SAVEDIR."""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from kdump_capture import dumpdev
from kdump_capture.errors import DumpDeviceError, IncompleteDump
from kdump_capture.finish import should_reboot
from kdump_capture.sample import SampleSpec, write_sample
from kdump_capture.vmcore import open_vmcore

from .faulty import ShortVmcore, adopt
from .helpers import ROOT, cli


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
        assert r.rc == 10 and f"{os.path.basename(dev)} is mounted on {mnt}" in r.err
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
    assert r.rc == 10 and "does not match its recorded SHA-256" in r.err
    # checked as it was copied: the copy is recorded as failed, never as complete
    [name] = os.listdir(tmp_path / "d")
    assert _status(tmp_path / "d" / name) == "failed"
    assert dumpdev.read_header(dev) == h  # not marked recovered
    with open(dev, "r+b") as f:  # a header still saying "writing": the dump was cut short
        f.write(dumpdev.DeviceHeader(dumpdev.WRITING, 0, 0, 0, bytes(32), "", "elf", 0).pack())
    r = _recover(dev, tmp_path / "e")
    assert r.rc == 10 and "incomplete: writing it was interrupted" in r.err
    assert not (tmp_path / "e").exists() or not os.listdir(tmp_path / "e")


def _status(dumpdir):
    return json.loads((dumpdir / "manifest.json").read_text())["status"]


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


def test_regular_file_is_refused_and_left_alone(sample, tmp_path):
    precious = tmp_path / "precious.img"
    content = os.urandom(64 << 10) * 16
    precious.write_bytes(content)
    r = _save_to_dev(sample, str(precious))
    assert r.rc == 10, r.err
    assert "not a block device (a regular file)" in r.err and str(precious) in r.err
    assert precious.read_bytes() == content


def test_format_none_is_refused_for_a_device(sample, loopdev):
    dev = loopdev(32)
    r = _save_to_dev(sample, dev, "KDUMP_DUMPFORMAT=none")
    assert r.rc == 2 and "writes no vmcore" in r.err
    assert dumpdev.read_header(dev) is None  # nothing was written


class FakeSystem:
    """A fake /sys/class/block, /sys/fs/btrfs, mountinfo and /proc/swaps for check_device."""

    def __init__(self, root):
        self.root = root
        self.view = dumpdev.SystemView(
            sys_block=str(root / "sys/class/block"),
            sys_btrfs=str(root / "sys/fs/btrfs"),
            mountinfo=str(root / "mountinfo"),
            swaps=str(root / "swaps"),
        )
        os.makedirs(self.view.sys_block)
        os.makedirs(self.view.sys_btrfs)
        (root / "mountinfo").write_text(
            "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n23 22 0:21 / /proc rw - proc proc rw\n"
        )
        (root / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")

    def disk(self, name, major, minor, partitions=0):
        """A whole disk with ``partitions`` partitions, plus its device node (mknod)."""
        d = self.root / "sys/class/block" / name
        (d / "holders").mkdir(parents=True)
        (d / "dev").write_text(f"{major}:{minor}\n")
        for i in range(1, partitions + 1):
            p = d / f"{name}p{i}"
            (p / "holders").mkdir(parents=True)
            (p / "dev").write_text(f"{major}:{minor + i}\n")
            (p / "partition").write_text(f"{i}\n")
            os.symlink(p, self.root / "sys/class/block" / f"{name}p{i}")
            self.node(f"{name}p{i}", major, minor + i)
        return self.node(name, major, minor)

    def node(self, name, major, minor):
        path = self.root / "dev" / name
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
        return str(path)

    def append(self, name, text):
        """Add a line to the fake mountinfo or swaps; ``{dev}`` is the fake /dev."""
        with open(self.root / name, "a") as f:
            f.write(text.format(dev=self.root / "dev"))

    def holder(self, of, name, dm_name=""):
        os.makedirs(self.root / f"sys/class/block/{of}/holders/{name}")
        if dm_name:
            os.makedirs(self.root / f"sys/class/block/{name}/dm")
            (self.root / f"sys/class/block/{name}/dm/name").write_text(dm_name + "\n")

    def btrfs_member(self, name, uuid):
        devices = self.root / f"sys/fs/btrfs/{uuid}/devices"
        os.makedirs(devices)
        os.symlink(self.root / f"sys/class/block/{name}", devices / name)

    def check(self, path):
        dumpdev.check_device(path, self.view)


# Majors 240-254 are for local/experimental use (devices.txt): nothing real on this machine.
MAJOR = 240


def test_fake_sysfs_clean_disk_is_accepted(tmp_path):
    fake = FakeSystem(tmp_path)
    fake.check(fake.disk("sdx", MAJOR, 0, partitions=2))


@pytest.mark.parametrize(
    "setup, reason",
    [
        # a whole disk whose partition is mounted (mountinfo names only the partition)
        (
            lambda f: f.append("mountinfo", f"40 22 {MAJOR}:2 / /srv\\040data rw - ext4 x rw\n"),
            "its partition sdxp2 is mounted on /srv data",
        ),
        # the same, mountinfo naming the partition by its source path (btrfs: 0:NN numbers)
        (
            lambda f: f.append("mountinfo", "41 22 0:44 / /home rw - btrfs {dev}/sdxp1 rw\n"),
            "its partition sdxp1 is mounted on /home",
        ),
        # an LVM physical volume: device-mapper holds the partition
        (
            lambda f: f.holder("sdxp1", "dm-3", "vg0-root"),
            "its partition sdxp1 is in use by dm-3 (vg0-root)",
        ),
        # an md RAID member: md holds the whole disk
        (lambda f: f.holder("sdx", "md127"), "sdx is in use by md127"),
        # active swap on a partition, named by its device path
        (
            lambda f: f.append("swaps", "{dev}/sdxp2 partition 8388604 0 -2\n"),
            "its partition sdxp2 is an active swap area",
        ),
        # the second device of a mounted multi-device btrfs: in no mountinfo line
        (
            lambda f: f.btrfs_member("sdx", "5f3c0a8e-1111-2222-3333-444455556666"),
            "sdx belongs to the mounted btrfs filesystem 5f3c0a8e",
        ),
    ],
    ids=["partition-mounted", "partition-mounted-by-path", "lvm", "md", "swap", "btrfs"],
)
def test_fake_sysfs_in_use_is_refused(tmp_path, setup, reason):
    fake = FakeSystem(tmp_path)
    disk = fake.disk("sdx", MAJOR, 0, partitions=2)
    setup(fake)
    with pytest.raises(dumpdev.DumpDeviceError) as err:
        fake.check(disk)
    assert reason in str(err.value) and disk in str(err.value)


def test_fake_sysfs_free_partition_beside_a_mounted_one_is_accepted(tmp_path):
    fake = FakeSystem(tmp_path)
    fake.disk("sdx", MAJOR, 0, partitions=2)
    fake.append("mountinfo", f"40 22 {MAJOR}:2 / /srv rw - ext4 x rw\n")
    fake.check(str(tmp_path / "dev/sdxp1"))
    with pytest.raises(dumpdev.DumpDeviceError, match="sdxp2 is mounted on /srv"):
        fake.check(str(tmp_path / "dev/sdxp2"))


def test_whole_disk_with_a_really_mounted_partition(tmp_path, loopdev, sample):
    """The partition is a real mounted loop device; only the disk around it is fake (this
    machine's kernel has no partition tables: losetup -P finds none)."""
    part = loopdev(16)
    subprocess.run(["mkfs.ext2", "-q", part], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", part, str(mnt)], check=True)
    try:
        fake = FakeSystem(tmp_path / "fake")
        fake.view = dumpdev.SystemView(
            sys_block=fake.view.sys_block, sys_btrfs=fake.view.sys_btrfs
        )  # the real mountinfo and /proc/swaps
        disk = fake.disk("vdz", MAJOR, 0)
        p = tmp_path / f"fake/sys/class/block/vdz/{os.path.basename(part)}"
        (p / "holders").mkdir(parents=True)
        rdev = os.stat(part).st_rdev
        (p / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        (p / "partition").write_text("1\n")
        with pytest.raises(dumpdev.DumpDeviceError, match=f"is mounted on {mnt}"):
            fake.check(disk)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    fake.check(disk)  # unmounted: the disk may be used


def test_second_device_of_a_mounted_btrfs_is_refused(tmp_path, loopdev, sample):
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is not installed (setup.sh installs btrfs-progs)")
    first, second = loopdev(128), loopdev(128)  # sparse; 128 MiB is mkfs.btrfs's minimum
    subprocess.run(
        ["mkfs.btrfs", "-q", "-f", "-d", "single", "-m", "single", first, second],
        check=True,
        capture_output=True,
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", first, str(mnt)], check=True)
    try:
        (mnt / "data").write_bytes(b"live data")
        r = _save_to_dev(sample, second)
        assert r.rc == 10, r.err
        assert f"{os.path.basename(second)} belongs to the mounted btrfs filesystem" in r.err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _header_file(tmp_path, data=b"x" * 4096, **fields):
    """A device image (a regular file: recover reads anything) with a crafted header."""
    values = {
        "magic": dumpdev.MAGIC,
        "version": dumpdev.VERSION,
        "state": dumpdev.COMPLETE,
        "offset": dumpdev.DATA_OFFSET,
        "size": len(data),
        "crash": 1764100000,
        "written": 1764100100,
        "sha256": hashlib.sha256(data).digest(),
        "release": b"6.1.0-sample-amd64",
        "format": b"raw",
        "level": 0,
    }
    values.update(fields)
    head = dumpdev.HEADER.pack(*values.values()).ljust(dumpdev.DATA_OFFSET, b"\0")
    path = tmp_path / "dev.img"
    path.write_bytes(head + data)
    return str(path)


def test_crafted_header_round_trip_is_recovered(tmp_path):
    dev = _header_file(tmp_path)
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 0, r.err
    [name] = os.listdir(tmp_path / "d")
    assert (tmp_path / "d" / name / "vmcore").read_bytes() == b"x" * 4096


def test_device_header_keeps_sha256_with_xxh3(sample, loopdev, tmp_path):
    """KDUMP_CHECKSUM=xxh3: the header's 32-byte checksum stays SHA-256 (recover checks it);
    the copy recover writes to KDUMP_SAVEDIR gets XXH3-128 in its manifest."""
    dev = loopdev(32)
    r = _save_to_dev(sample, dev, "KDUMP_CHECKSUM=xxh3")
    assert r.rc == 0, r.err
    data = open(sample, "rb").read()
    assert dumpdev.read_header(dev).sha256 == hashlib.sha256(data).digest()
    r = _recover(dev, tmp_path / "d", "--set", "KDUMP_CHECKSUM=xxh3")
    assert r.rc == 0, r.err
    [name] = os.listdir(tmp_path / "d")
    info = json.loads((tmp_path / "d" / name / "manifest.json").read_text())["files"]["vmcore"]
    assert info["algorithm"] == "xxh3-128" and info["size"] == len(data)
    v = cli("verify", str(tmp_path / "d" / name))
    assert v.rc == 0 and "xxh3-128" in v.out, v.err


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"level": 0xFFFFFFFF}, "dump level = 4294967295"),
        ({"format": b"../../etc/x\n"}, "format = b'../../etc/x\\n': not printable"),
        ({"format": b"../../etc/x"}, "format = '../../etc/x': not one of"),
        ({"format": b"none"}, "format = 'none': not one of"),
        ({"size": 0, "sha256": hashlib.sha256(b"").digest()}, "data size = 0"),
        ({"release": b"6.1\xff\xfe-amd64"}, "kernel release = b'6.1\\xff\\xfe-amd64'"),
        ({"release": b"6.1 amd64"}, "kernel release"),
        ({"offset": 1 << 63}, f"data offset = {1 << 63}"),
        ({"size": 1 << 63}, f"data size = {1 << 63}: larger than the device's 4096"),
        ({"size": 4097}, "data size = 4097"),
        ({"crash": -5}, "crash time = -5"),
        ({"written": 1 << 62}, "written at"),
        ({"version": 2}, "version = 2"),
        ({"state": 9}, "state = 9"),
    ],
)
def test_bad_header_fields_exit_10_naming_the_field(tmp_path, fields, message):
    dev = _header_file(tmp_path, **fields)
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 10, (r.rc, r.err)
    assert message in r.err and dev in r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert not (tmp_path / "d").exists() or not os.listdir(tmp_path / "d")


def test_header_text_from_the_crashed_kernel_is_stored_as_recover_accepts_it():
    head = dumpdev.DeviceHeader(
        dumpdev.COMPLETE, 10, 0, 0, bytes(32), "6.1 évil\n" + "x" * 90, "elf", 31
    ).pack()
    back = dumpdev.DeviceHeader.unpack(head, "dev", 1 << 20)
    assert back.release == "6.1___vil_" + "x" * 54 and back.format == "elf"


def test_unrecovered_dump_is_kept_by_a_new_save(sample, loopdev, tmp_path):
    """The first crash is the one nobody has seen yet: a second save must not cost it."""
    dev = loopdev(32)
    assert _save_to_dev(sample, dev).rc == 0
    with open(dev, "rb") as f:
        before = f.read()
    r = _save_to_dev(sample, dev, "KDUMP_DUMPFORMAT=compressed")
    assert r.rc == 10, r.err
    assert "holds a complete dump that was not recovered yet" in r.err
    assert "kernel 6.1.0-sample-amd64" in r.err and "crashed 2025-11-24 16:00:00 UTC" in r.err
    assert "kdump-capture recover" in r.err and "KDUMP_DUMPDEV_OVERWRITE=yes" in r.err
    with open(dev, "rb") as f:
        assert f.read() == before  # nothing written, not even the header
    r = _save_to_dev(sample, dev, "KDUMP_DUMPFORMAT=compressed", "KDUMP_DUMPDEV_OVERWRITE=yes")
    assert r.rc == 0, r.err
    assert dumpdev.read_header(dev).format == "compressed"
    # recovered, interrupted or incomplete dumps are overwritten as before
    assert _recover(dev, tmp_path / "d").rc == 0
    assert _save_to_dev(sample, dev).rc == 0
    with open(dev, "r+b") as f:
        f.write(dumpdev.DeviceHeader(dumpdev.WRITING, 0, 0, 0, bytes(32), "", "elf", 0).pack())
    assert _save_to_dev(sample, dev).rc == 0
    assert dumpdev.read_header(dev).state == dumpdev.COMPLETE


def test_incomplete_device_dump_is_recovered_as_incomplete(sample, loopdev, tmp_path):
    """A source that ends early: what was read is kept on the device, checksummed, and
    recover saves it as an incomplete dump (exit 13), as a file target would."""
    dev = loopdev(32)
    end = 5 << 20
    with open_vmcore(sample) as vm:
        short = adopt(vm, ShortVmcore, end=end)
        with pytest.raises(IncompleteDump, match="recover` saves what was read"):
            dumpdev.write_dump(short, dev, "elf", 0)
    h = dumpdev.read_header(dev)
    data = open(sample, "rb").read()[:end]
    assert (h.state, h.data_size, h.sha256) == (
        dumpdev.INCOMPLETE,
        end,
        hashlib.sha256(data).digest(),
    )
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 13, r.err
    assert "INCOMPLETE" in r.err and "interrupted" not in r.err
    [name] = os.listdir(tmp_path / "d")
    assert (tmp_path / "d" / name / "vmcore").read_bytes() == data
    assert _status(tmp_path / "d" / name) == "incomplete"
    why = json.loads((tmp_path / "d" / name / "manifest.json").read_text())["error"]
    assert f"its source ended after {len(data)} bytes when the capture kernel wrote it" in why
    assert dumpdev.read_header(dev).state == dumpdev.RECOVERED_INCOMPLETE
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 0 and "already recovered" in r.out
    r = _recover(dev, tmp_path / "d", "--force")  # still incomplete, never complete
    assert r.rc == 13, r.err
    assert sorted(_status(tmp_path / "d" / n) for n in os.listdir(tmp_path / "d")) == [
        "incomplete",
        "incomplete",
    ]


@pytest.fixture
def read_only_loopdev(tmp_path):
    made = []

    def attach(img):
        r = subprocess.run(["losetup", "-r", "-f", "--show", img], capture_output=True, text=True)
        assert r.returncode == 0, f"cannot attach a loop device: {r.stderr}"
        made.append(r.stdout.strip())
        return made[-1]

    yield attach
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_recover_says_the_dump_was_copied_when_marking_fails(tmp_path, read_only_loopdev):
    img = _header_file(tmp_path)
    dev = read_only_loopdev(img)
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 10, r.err
    [name] = os.listdir(tmp_path / "d")
    assert f"dump copied to file://{tmp_path}/d/{name}; could not mark the device recovered" in (
        r.err
    )
    assert dev in r.err and "offset 0x0" in r.err
    assert _status(tmp_path / "d" / name) == "complete"


def test_recover_checks_the_bytes_it_copies(tmp_path):
    """Data that reads back differently once the copy runs is never saved as complete."""
    data = os.urandom(1 << 20)
    img = _header_file(tmp_path, data=data)
    h = dumpdev.read_header(img)
    vm = dumpdev.open_device_dump(img, h)
    with open(img, "r+b") as f:  # changed after any check before the copy
        f.seek(dumpdev.DATA_OFFSET + len(data) - 10)
        f.write(bytes([data[-10] ^ 1]))
    buf = bytearray(256 << 10)
    with vm, pytest.raises(DumpDeviceError, match="does not match its recorded SHA-256"):
        off = 0
        while n := vm.read_data(buf, off):  # as the writer copies it
            off += n


def test_recover_refuses_what_is_not_a_device_or_image(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        r = _recover(str(path), tmp_path / "d")  # a FIFO: open(2) used to wait forever
        assert r.rc == 10 and f"{path}: {kind}, not a block device" in r.err, r.err
    r = cli(
        "recover",
        "--config",
        "/nonexistent",
        "--if-present",
        "--set",
        f"KDUMP_DUMPDEV={fifo}",
        timeout=30,
    )
    assert r.rc == 10 and "a FIFO" in r.err


def test_one_recover_at_a_time(tmp_path):
    """Two recovers of one device at once (the boot-time unit and an admin) each copied the
    dump and marked it recovered: two dumps of one crash. The one that finds the device
    held now says so (exit 10) and changes nothing; once the holder is gone (the kernel
    drops its lock with the process), a recover finds the dump already recovered."""
    dev = _header_file(tmp_path)
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, dev], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = _recover(dev, tmp_path / "d")
        assert r.rc == 10, r.err
        assert "another 'kdump-capture recover' is copying" in r.err and "nothing was done" in r.err
        assert not (tmp_path / "d").exists()
        assert dumpdev.read_header(dev).state == dumpdev.COMPLETE
    finally:
        holder.kill()
        holder.wait()
    assert _recover(dev, tmp_path / "d").rc == 0
    r = _recover(dev, tmp_path / "d")
    assert r.rc == 0 and "already recovered" in r.out
    assert len(os.listdir(tmp_path / "d")) == 1


def test_sigterm_during_recover_is_exit_130(tmp_path):
    size = 256 << 20
    img = tmp_path / "dev.img"
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        h.update(zeros)
    head = dumpdev.DeviceHeader(dumpdev.COMPLETE, size, 0, 0, h.digest(), "6.1", "raw", 0)
    img.write_bytes(head.pack())
    os.truncate(img, dumpdev.DATA_OFFSET + size)
    savedir = tmp_path / "d"
    p = subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", "recover", "--config", "/nonexistent"]
        + ["--device", str(img), "--set", f"KDUMP_SAVEDIR=file://{savedir}"],
        env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline and _copied(savedir) < 1 << 20:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted by signal 15" in err
    [name] = os.listdir(savedir)
    assert _status(savedir / name) == "failed"
    assert not [f for f in os.listdir(savedir / name) if "vmcore" in f]
    assert dumpdev.read_header(str(img)).state == dumpdev.COMPLETE


def _copied(savedir):
    """Bytes of vmcore files (their temporary names too) under ``savedir`` so far."""
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(savedir)
        for f in files
        if "vmcore" in f
    )


def test_filesystem_on_the_device_is_refused(sample, loopdev):
    """Nothing mounted (a capture kernel mounts nothing): the signature says what is there."""
    dev = loopdev(32)
    subprocess.run(["mkfs.ext2", "-q", dev], check=True)
    r = _save_to_dev(sample, dev)
    assert r.rc == 10, r.err
    assert f"{dev}: holds an ext2/ext3/ext4 filesystem (53 ef at offset 1080)" in r.err
    assert f"wipefs -a {dev}" in r.err
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", dev], capture_output=True)
    assert blkid.stdout.strip() == b"ext2"
    r = cli("check", "--config", "/nonexistent", "--set", f"KDUMP_DUMPDEV={dev}")
    assert f"problem: KDUMP_DUMPDEV {dev}: holds an ext2/ext3/ext4 filesystem" in r.out, r.out
    subprocess.run(["wipefs", "-q", "-a", dev], check=True)
    assert _save_to_dev(sample, dev).rc == 0


def test_a_swap_area_not_in_use_is_written_with_a_warning(sample, loopdev):
    """The kdump tutorial's dump device is "a non-used swap partition": refusing its
    signature would have lost the crash of every system set up that way. (One in use is
    refused: it is in /proc/swaps, test_fake_sysfs_in_use_is_refused.)"""
    dev = loopdev(32)
    subprocess.run(["mkswap", "-q", dev], check=True, capture_output=True)
    r = _save_to_dev(sample, dev)
    assert r.rc == 0, r.err
    assert "holds a swap area" in r.err and f"mkswap {dev}" in r.err
    assert dumpdev.read_header(dev).state == dumpdev.COMPLETE


def test_device_the_kernel_holds_is_refused(sample, loopdev):
    """Mounted in another mount namespace: not in our mountinfo, but the kernel refuses
    O_EXCL (here another program holds the device exclusively, which looks the same)."""
    dev = loopdev(32)
    held = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        r = _save_to_dev(sample, dev)
        assert r.rc == 10 and f"KDUMP_DUMPDEV {dev}: the device is in use" in r.err, r.err
        assert dumpdev.read_header(dev) is None
    finally:
        os.close(held)
    assert _save_to_dev(sample, dev).rc == 0


def _with(offset, magic, size=128 << 10):  # dumpdev.SIGNATURE_SPAN
    raw = bytearray(size)
    raw[offset : offset + len(magic)] = magic
    return bytes(raw)


def _mbr():
    raw = bytearray(_with(510, b"\x55\xaa"))
    raw[446 + 4] = 0x83  # one Linux partition
    return bytes(raw)


@pytest.mark.parametrize(
    "start, found",
    [
        (_with(1080, b"\x53\xef"), "ext2/ext3/ext4"),
        (_with(0, b"XFSB"), "XFS"),
        (_with(65600, b"_BHRfS_M"), "btrfs"),
        (_with(4086, b"SWAPSPACE2"), "swap"),
        (_with(65526, b"SWAP-SPACE"), "swap"),
        (_with(1536, b"LABELONE"), "LVM2"),
        (_with(512, b"EFI PART"), "GPT"),
        (_mbr(), "MBR partition table"),
        (_with(82, b"FAT32   "), "vfat"),
        (_with(3, b"NTFS    "), "NTFS"),
        (_with(0, b"LUKS\xba\xbe"), "LUKS"),
        (_with(510, b"\x55\xaa"), ""),  # a boot signature with no partition: nothing
        (_with(0, b""), ""),
        (dumpdev.MAGIC + _with(1080, b"\x53\xef")[8:], ""),  # our own dump
    ],
    ids=[
        "ext4",
        "xfs",
        "btrfs",
        "swap-4k",
        "swap-64k",
        "lvm2",
        "gpt",
        "mbr",
        "vfat",
        "ntfs",
        "luks",
        "boot-signature-only",
        "blank",
        "our-header",
    ],
)
def test_foreign_contents(start, found):
    assert (found in dumpdev.foreign_contents(start)) and bool(found) == bool(
        dumpdev.foreign_contents(start)
    )
