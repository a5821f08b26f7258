"""Pure decisions of the builder: network set-up, mounts, finish actions, capture config."""

from __future__ import annotations

import pytest

from initramfs import builder
from kdump_capture.config import load_config
from kdump_capture.errors import ConfigError, NotSupported

N = builder.NetConfig


@pytest.mark.parametrize(
    ("value", "needed", "expected"),
    [
        ("auto", True, N("dhcp", timeout=30)),
        ("", True, N("dhcp", timeout=30)),
        ("auto", False, N(timeout=30)),  # local target: no network
        # The configuration admits auto:force: it was "unknown mode 'force'" (exit 2) with
        # a network target, and no network for a local one
        ("auto:force", True, N("dhcp", timeout=30)),
        ("auto:force", False, N("dhcp", timeout=30)),
        ("eth1:dhcp", True, N("dhcp", ifname="eth1", timeout=30)),
        ("eth1:dhcp4", True, N("dhcp", ifname="eth1", timeout=30)),
        ("eth1:auto", True, N("dhcp", ifname="eth1", timeout=30)),
        ("eth1:dhcp", False, N(timeout=30)),
        ("eth1:dhcp:force", False, N("dhcp", ifname="eth1", timeout=30)),  # forced
        ("eth0:static", True, N("static", ifname="eth0", timeout=30)),  # address from host
        ("eth0:static:force", False, N("static", ifname="eth0", timeout=30)),
    ],
)
def test_parse_netconfig(value, needed, expected):
    assert builder.parse_netconfig(value, needed, 30) == expected


def test_parse_netconfig_rejects():
    with pytest.raises(NotSupported):
        builder.parse_netconfig("eth0:dhcp6", True, 30)
    with pytest.raises(ConfigError):
        builder.parse_netconfig("eth0:bogus", True, 30)
    with pytest.raises(ConfigError):  # an address of its own: not a form the config admits
        builder.parse_netconfig("eth0:static:10.1.2.3/16", True, 30)


@pytest.mark.parametrize(
    ("scheme", "runlevel", "needed"),
    [
        ("file", "1", False),
        ("file", "3", True),
        ("file", "5", True),
        ("sftp", "1", True),
        ("nfs", "s", True),
    ],
)
def test_network_needed(scheme, runlevel, needed):
    assert builder.network_needed(scheme, runlevel) is needed


@pytest.mark.parametrize(
    ("reboot", "cont", "expected"),
    [
        ("yes", "true", ("reboot", "reboot")),
        ("no", "true", ("shell", "reboot")),
        ("yes", "false", ("reboot", "shell")),
        ("0", "0", ("shell", "shell")),
    ],
)
def test_finish_actions(reboot, cont, expected):
    cfg = {"KDUMP_IMMEDIATE_REBOOT": reboot, "KDUMP_CONTINUE_ON_ERROR": cont}
    assert builder.finish_actions(cfg) == expected


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:17 / /var rw,relatime shared:2 - xfs /dev/sdb1 rw
31 30 8:33 / /var/crash rw - ext4 /dev/sdc1 rw
40 22 0:5 / /dev rw - devtmpfs udev rw
41 22 0:44 / /srv/my\\040dumps rw - vfat /dev/sdd1 rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/var/crash", ("/var/crash", "/dev/sdc1", "ext4")),
        ("/var/crash/sub", ("/var/crash", "/dev/sdc1", "ext4")),
        ("/var/crashes", ("/var", "/dev/sdb1", "xfs")),  # not a path prefix of /var/crash
        ("/var/log/dump", ("/var", "/dev/sdb1", "xfs")),
        ("/srv/my dumps/x", ("/srv/my dumps", "/dev/sdd1", "vfat")),
        ("/opt/dumps", ("/", "/dev/sda1", "ext4")),
    ],
)
def test_find_mount(path, expected):
    assert builder.find_mount(path, MOUNTINFO) == expected


def test_capture_config_round_trips_through_the_config_parser(tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text(
        'KDUMP_SAVEDIR="ftp://user:it\'s%20me@host/dumps"\n'
        'KDUMP_PRESCRIPT="echo \\"quoted\\" \\$HOME; true"\n'
        "KDUMP_DUMPLEVEL=31\n"
    )
    cfg = load_config(str(conf), ["KDUMP_VERBOSE=7"])
    text = builder.capture_config(cfg, {"KDUMP_NET_TIMEOUT": "5"})
    out = tmp_path / "capture"
    out.write_text(text)
    again = load_config(str(out))
    for name in cfg:
        want = "5" if name == "KDUMP_NET_TIMEOUT" else cfg[name]
        assert again[name] == want, name
    assert again.warnings == []


def test_init_plan_runs_save_without_reboot(tmp_path):
    from kdump_capture.urls import parse_savedir

    cfg = {"KDUMP_IMMEDIATE_REBOOT": "yes", "KDUMP_CONTINUE_ON_ERROR": "no"}
    targets, _ = parse_savedir("sftp://root:pw@10.0.2.2/dumps")
    plan = builder.init_plan(cfg, targets, ["/m.ko"], N("dhcp"), [], "")
    assert plan["save"][:5] == ["/usr/bin/python3", "-I", "-m", "kdump_capture", "save"]
    assert "--no-reboot" in plan["save"]  # /init unmounts, then reboots itself
    assert "pw" not in plan["target"]  # the plan is printed on the console
    assert (plan["on_success"], plan["on_failure"]) == ("reboot", "shell")
    assert plan["watchdog"] == {"timeout": 300, "grace": 15}  # automatic: 8 x 30 s + 60 s
    cfg = {**cfg, "KDUMP_SAVE_TIMEOUT": "90", "KDUMP_NET_TIMEOUT": "10"}
    plan = builder.init_plan(cfg, targets, ["/m.ko"], N("dhcp"), [], "")
    assert plan["watchdog"]["timeout"] == 90


@pytest.mark.parametrize(
    ("settings", "needed"),
    [
        ([], False),  # defaults: reboot after success and after failure, no scripts
        (["KDUMP_IMMEDIATE_REBOOT=no"], True),
        (["KDUMP_CONTINUE_ON_ERROR=no"], True),
        (["KDUMP_PRESCRIPT=logger hi"], True),
        (["KDUMP_TRANSFER=cp /proc/vmcore /x"], True),
    ],
)
def test_needs_shell(settings, needed):
    assert builder.needs_shell(load_config(None, settings)) is needed


def dumpdev_plan(shell: str = "/usr/bin/sh", device: str = "/dev/vdb") -> dict:
    """The plan of an image for KDUMP_DUMPDEV with a local target (given a disk to mount)
    and a network one, everything else at its default."""
    from kdump_capture.urls import parse_savedir

    cfg = load_config(
        None, ["KDUMP_SAVEDIR=file:///var/crash ftp://h/d", f"KDUMP_DUMPDEV={device}"]
    )
    targets, _ = parse_savedir(cfg["KDUMP_SAVEDIR"])
    mounts = [builder.FileMount("LABEL=crashroot", "ext4", "/kdump/mnt0", "var/crash")]
    return builder.init_plan(cfg, targets, ["/m.ko"], N("dhcp", timeout=30), mounts, shell)


def test_a_dump_device_image_writes_only_the_device_and_stays_on_the_console():
    """The dump device is for when KDUMP_SAVEDIR's filesystem or network is broken: its
    image mounts nothing and brings up no network (a failure there, or 30 s of waiting for a
    missing disk, stood between the crash and the device), waits for the device instead, and
    after the dump opens the console for ``recover``: KDUMP_IMMEDIATE_REBOOT=yes (the
    default) rebooted with the dump still only on the device."""
    plan = dumpdev_plan()
    assert plan["mounts"] == [] and plan["network"]["mode"] == "none"
    assert plan["dump_device"] == {"path": "/dev/vdb", "timeout": builder.DEVICE_TIMEOUT}
    assert plan["target"] == "/dev/vdb"
    assert (plan["on_success"], plan["on_failure"]) == ("shell", "reboot")
    cfg = load_config(None, ["KDUMP_DUMPDEV=/dev/vdb"])
    assert builder.finish_actions(cfg) == ("shell", "reboot")
    assert builder.needs_shell(cfg)  # busybox is packed for that shell
    assert builder.init_plan(cfg, [], [], N(), [], "")["dump_device"]["path"] == "/dev/vdb"
    # without a dump device, nothing changes
    cfg = load_config(None, [])
    assert builder.init_plan(cfg, [], [], N(), [], "")["dump_device"] == {}


@pytest.mark.parametrize("device", ["/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "vdb", "/dev/fd"])
def test_a_dump_device_our_capture_kernel_cannot_have_is_warned_of(device):
    """Our image has no udev: /dev/disk/by-* and other links never come up there."""
    assert "the capture kernel of this image has no udev links" in (
        builder.dump_device_warning(device)
    )
    assert builder.dump_device_warning("/dev/vdb") == ""
    assert builder.dump_device_warning("/dev/nvme0n1p3") == ""
