"""Load side: command-line composition, kernel-config checks, kernel choice, CLI seam, and
that on a machine without a crashkernel reservation nothing is changed."""

from __future__ import annotations

import argparse
import gzip
import os

import pytest

from kdump_capture import loadside
from kdump_capture.errors import LoadError

PROC = (
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-13-amd64 root=UUID=abcd ro quiet crashkernel=192M "
    "console=ttyS0,115200 resume=/dev/sda2 rd.lvm.lv=vg/root nr_cpus=8 hugepages=64"
)
# What every capture kernel gets after nr_cpus (see loadside.CAPTURE_OPTIONS).
REST = (
    "irqpoll reset_devices cgroup_disable=memory mce=off numa=off acpi_no_memhotplug "
    "transparent_hugepage=never novmcoredd cma=0 hugetlb_cma=0"
)


@pytest.mark.parametrize(
    ("proc", "commandline", "append", "cpus", "expected"),
    [
        # derived: production options kept; root, boot image, reservation, limits dropped
        (PROC, "", "", 1, f"quiet console=ttyS0,115200 nr_cpus=1 {REST} panic=10"),
        # APPEND comes last; an option it sets is not added by us
        (
            PROC,
            "",
            "nr_cpus=2 net.ifnames=0",
            1,
            f"quiet console=ttyS0,115200 {REST} panic=10 nr_cpus=2 net.ifnames=0",
        ),
        # KDUMP_COMMANDLINE is taken as written (its root= too)
        (
            PROC,
            "console=ttyS1 root=/dev/vda",
            "",
            1,
            f"console=ttyS1 root=/dev/vda nr_cpus=1 {REST} panic=10",
        ),
        # KDUMP_CPUS=0: no CPU limit; 4: four CPUs
        ("console=ttyS0", "", "", 0, f"console=ttyS0 {REST} panic=10"),
        ("console=ttyS0", "", "", 4, f"console=ttyS0 nr_cpus=4 {REST} panic=10"),
        # the production init's arguments after "--" are dropped
        ("console=ttyS0 -- --init-arg", "", "", 1, f"console=ttyS0 nr_cpus=1 {REST} panic=10"),
        # quoted values survive as one option
        (
            'console=ttyS0 dyndbg="file foo.c +p"',
            "",
            "",
            1,
            f'console=ttyS0 dyndbg="file foo.c +p" nr_cpus=1 {REST} panic=10',
        ),
        # the production kernel's panic= is kept, ours not added
        ("panic=1 console=ttyS0", "", "", 1, f"panic=1 console=ttyS0 nr_cpus=1 {REST}"),
        # our own kdump_capture.* options and systemd.* never reach the capture kernel
        (
            "kdump_capture.finish=shell systemd.unit=x.target quiet",
            "",
            "",
            1,
            f"quiet nr_cpus=1 {REST} panic=10",
        ),
        # empty everything still gives a working capture command line
        ("", "", "", 1, f"nr_cpus=1 {REST} panic=10"),
    ],
)
def test_capture_cmdline(proc, commandline, append, cpus, expected):
    assert loadside.capture_cmdline(proc, commandline, append, cpus) == expected


def test_capture_cmdline_always_has_capture_options():
    out = loadside.capture_cmdline("", "", "", 1).split()
    for opt in ("nr_cpus=1", "irqpoll", "reset_devices", "panic=10", "novmcoredd"):
        assert opt in out


KCONFIG_OK = """
CONFIG_KEXEC=y
CONFIG_KEXEC_FILE=y
CONFIG_CRASH_DUMP=y
CONFIG_PROC_VMCORE=y
CONFIG_SYSFS=y
# CONFIG_DEBUG_INFO is not set
"""


@pytest.mark.parametrize(
    ("text", "problems", "warnings"),
    [
        (KCONFIG_OK, 0, 1),
        (KCONFIG_OK + "CONFIG_DEBUG_INFO=y\n", 0, 0),
        (KCONFIG_OK.replace("CONFIG_KEXEC=y\nCONFIG_KEXEC_FILE=y", ""), 1, 1),
        (KCONFIG_OK.replace("CONFIG_KEXEC=y\n", ""), 0, 1),  # kexec_file alone is enough
        (KCONFIG_OK.replace("CONFIG_PROC_VMCORE=y", "CONFIG_PROC_VMCORE=m"), 1, 1),
        ("", 4, 1),
    ],
)
def test_check_kernel_config(text, problems, warnings):
    p, w = loadside.check_kernel_config(loadside.parse_kernel_config(text))
    assert (len(p), len(w)) == (problems, warnings)


def _system(tmp_path, reserved=0, loaded=0, cmdline="root=/dev/vda console=ttyS0"):
    proc, sysfs, boot = tmp_path / "proc", tmp_path / "sys", tmp_path / "boot"
    (sysfs / "kernel").mkdir(parents=True)
    proc.mkdir()
    boot.mkdir()
    (sysfs / "kernel/kexec_crash_size").write_text(f"{reserved}\n")
    (sysfs / "kernel/kexec_crash_loaded").write_text(f"{loaded}\n")
    (proc / "cmdline").write_text(cmdline + "\n")
    with gzip.open(proc / "config.gz", "wt") as f:
        f.write(KCONFIG_OK)
    (boot / "vmlinuz-6.1.0-test").write_bytes(b"kernel")
    return loadside.System(str(proc), str(sysfs), str(boot), "6.1.0-test")


CFG = {
    "KDUMP_KERNELVER": "",
    "KDUMP_COMMANDLINE": "",
    "KDUMP_COMMANDLINE_APPEND": "",
    "KDUMP_CPUS": "1",
    "KEXEC_OPTIONS": "",
    "KDUMP_SAVEDIR": "file:///var/crash",
}


def test_pick_kernel(tmp_path):
    system = _system(tmp_path)
    assert loadside.pick_kernel("", system) == ("6.1.0-test", f"{system.boot}/vmlinuz-6.1.0-test")
    (tmp_path / "boot/vmlinuz-6.1.0-1-kdump").write_bytes(b"k")
    (tmp_path / "boot/vmlinuz-6.1.0-2-kdump").write_bytes(b"k")
    assert loadside.pick_kernel("", system)[0] == "6.1.0-2-kdump"
    assert loadside.pick_kernel("5.10.0-9-amd64", system)[0] == "5.10.0-9-amd64"
    assert loadside.pick_kernel("/opt/vmlinuz-5.1", system) == ("5.1", "/opt/vmlinuz-5.1")


def test_readiness_without_reservation_gives_the_seed_message(tmp_path):
    r = loadside.readiness(CFG, _system(tmp_path, reserved=0))
    assert r.problems == [loadside.NOT_RESERVED]
    assert loadside.NOT_RESERVED == (
        "Memory for crashkernel is not reserved Please reserve memory by passing "
        '"crashkernel=X@Y" parameter to the kernel Then try loading kdump kernel'
    )
    text = "\n".join(r.lines())
    assert "reservation:    none" in text and "command line:   console=ttyS0 nr_cpus=1" in text


def test_readiness_ready(tmp_path):
    r = loadside.readiness(CFG, _system(tmp_path, reserved=192 << 20, loaded=1))
    assert r.problems == [] and r.loaded and r.reserved == 192 << 20
    assert r.warnings == ["CONFIG_DEBUG_INFO is not set: crash needs a separate debug kernel"]
    assert "192 MiB" in "\n".join(r.lines())


def test_needs_rebuild(tmp_path):
    conf, img = tmp_path / "kdump", tmp_path / "initrd.img"
    conf.write_text("x")
    assert loadside.needs_rebuild(str(img), str(conf))
    img.write_bytes(b"x")
    os.utime(conf, (1, 1))
    assert not loadside.needs_rebuild(str(img), str(conf))
    os.utime(img, (0, 0))
    assert loadside.needs_rebuild(str(img), str(conf))


def test_kexec_fallback_argv():
    argv = loadside.kexec_binary_argv("/sbin/kexec", "/boot/k", "/i.img", "a b", "--args-linux")
    assert argv == [
        "/sbin/kexec",
        "-p",
        "--args-linux",
        "--initrd=/i.img",
        "--command-line=a b",
        "/boot/k",
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdump-capture")
    loadside.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_seam_registers_commands_with_config_and_set():
    parser = _parser()
    for cmd in ("check", "load", "unload", "status", "test-crash"):
        args = parser.parse_args([cmd, "--config", "/x", "--set", "A=1", "--set", "B=2"])
        assert args.config == "/x" and args.overrides == ["A=1", "B=2"] and callable(args.func)
    args = parser.parse_args(
        [
            "initramfs",
            "build",
            "--output",
            "/o",
            "--kernel-version",
            "v",
            "--modules-root",
            "/m",
            "--compress",
            "gzip",
        ]
    )
    assert (args.output, args.kernel_version, args.modules_root, args.compress) == (
        "/o",
        "v",
        "/m",
        "gzip",
    )
    assert args.func is loadside.cmd_initramfs_build
    assert parser.parse_args(["check"]).config == "/etc/sysconfig/kdump"


def test_test_crash_refuses_without_yes(capsys):
    args = _parser().parse_args(["test-crash", "--config", "/nonexistent"])
    assert args.func(args) == 2
    assert "--yes" in capsys.readouterr().out


@pytest.fixture
def no_reservation_here():
    """This build machine (and CI) has no crashkernel reservation; the tests below rely on
    it to prove that check/load/status/test-crash change nothing. Fail loudly otherwise."""
    system = loadside.System()
    if system.crash_size() or system.crash_loaded():
        pytest.fail("this machine has a crashkernel reservation: refusing to run load tests")
    return system


def test_commands_say_not_possible_here_and_change_nothing(no_reservation_here, capsys):
    parser = _parser()
    before = os.path.exists(loadside.INITRD_DIR)
    sysrq = no_reservation_here.read("/proc/sys/kernel/sysrq")  # None: no sysrq here
    check = parser.parse_args(["check", "--config", "/nonexistent"])
    assert check.func(check) == LoadError.exit_code
    out = capsys.readouterr().out
    assert loadside.NOT_RESERVED in out and "not possible here" in out
    status = parser.parse_args(["status", "--config", "/nonexistent"])
    assert status.func(status) == LoadError.exit_code
    assert "kdump is not possible here" in capsys.readouterr().out
    load = parser.parse_args(["load", "--config", "/nonexistent"])
    with pytest.raises(LoadError, match="Memory for crashkernel is not reserved"):
        load.func(load)
    crash = parser.parse_args(["test-crash", "--yes", "--config", "/nonexistent"])
    with pytest.raises(LoadError, match="no capture kernel is loaded"):
        crash.func(crash)
    assert os.path.exists(loadside.INITRD_DIR) == before
    assert no_reservation_here.read("/proc/sys/kernel/sysrq") == sysrq


SYSTEM = loadside.System


def _fake_kernel(tmp_path, loaded: bool) -> loadside.System:
    """/proc and /sys of a pretend kernel: sysrq and the trigger are plain files here."""
    (tmp_path / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
    (tmp_path / "sys/kernel").mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc/sys/kernel/sysrq").write_text("176\n")
    (tmp_path / "proc/sysrq-trigger").write_text("")
    (tmp_path / "sys/kernel/kexec_crash_loaded").write_text("1\n" if loaded else "0\n")
    return SYSTEM(
        proc=str(tmp_path / "proc"), sys=str(tmp_path / "sys"), boot=str(tmp_path / "boot")
    )


def test_test_crash_enables_sysrq_only_when_a_capture_kernel_is_loaded(tmp_path, monkeypatch):
    """Without a loaded capture kernel, test-crash changes nothing (sysrq stays 176); with
    one, it enables sysrq and writes 'c' to the trigger, in that order of files."""
    args = _parser().parse_args(["test-crash", "--yes", "--config", "/nonexistent"])
    system = _fake_kernel(tmp_path, loaded=False)
    monkeypatch.setattr(loadside, "System", lambda: system)  # cmd_test_crash's System()
    with pytest.raises(LoadError, match="no capture kernel is loaded"):
        args.func(args)
    assert (tmp_path / "proc/sys/kernel/sysrq").read_text() == "176\n"
    assert (tmp_path / "proc/sysrq-trigger").read_text() == ""
    system = _fake_kernel(tmp_path, loaded=True)
    args.func(args)  # on the pretend kernel: nothing crashes
    assert (tmp_path / "proc/sys/kernel/sysrq").read_text() == "1"
    assert (tmp_path / "proc/sysrq-trigger").read_text() == "c"
