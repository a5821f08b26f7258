"""Load side: command-line composition, kernel-config checks, kernel choice, CLI seam, and
that on a machine without a crashkernel reservation nothing is changed."""

from __future__ import annotations

import argparse
import errno
import gzip
import json
import logging
import os
import subprocess
import sys

import pytest

from kdump_capture.errors import LoadError
from kdump_capture.load import commands, kexec, rebuild
from kdump_capture.load import system as loadsys

PROC = (
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-13-amd64 root=UUID=abcd ro quiet crashkernel=192M "
    "console=ttyS0,115200 resume=/dev/sda2 rd.lvm.lv=vg/root nr_cpus=8 hugepages=64"
)
# What every capture kernel gets after nr_cpus (see kexec.CAPTURE_OPTIONS).
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
        # a whole word in double quotes is the same parameter to the kernel: still dropped
        (
            '"crashkernel=1G-4G:192M,4G-:256M" "rdinit=/sbin/x" "rd.break" "hugepages=9" q',
            "",
            "",
            1,
            f"q nr_cpus=1 {REST} panic=10",
        ),
        ('"panic=1" x', "", "", 1, f'"panic=1" x nr_cpus=1 {REST}'),
    ],
)
def test_capture_cmdline(proc, commandline, append, cpus, expected):
    assert kexec.capture_cmdline(proc, commandline, append, cpus) == expected


def test_capture_cmdline_always_has_capture_options():
    out = kexec.capture_cmdline("", "", "", 1).split()
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
    p, w = loadsys.check_kernel_config(loadsys.parse_kernel_config(text))
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
    return loadsys.System(str(proc), str(sysfs), str(boot), "6.1.0-test")


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
    assert loadsys.pick_kernel("", system) == ("6.1.0-test", f"{system.boot}/vmlinuz-6.1.0-test")
    (tmp_path / "boot/vmlinuz-6.1.0-1-kdump").write_bytes(b"k")
    (tmp_path / "boot/vmlinuz-6.1.0-2-kdump").write_bytes(b"k")
    assert loadsys.pick_kernel("", system)[0] == "6.1.0-2-kdump"
    # the newest as a version, not as text: 6.1.0-10 after 6.1.0-9 ("1" sorts before "9")
    (tmp_path / "boot/vmlinuz-6.1.0-9-kdump").write_bytes(b"k")
    (tmp_path / "boot/vmlinuz-6.1.0-10-kdump").write_bytes(b"k")
    assert loadsys.pick_kernel("", system)[0] == "6.1.0-10-kdump"
    assert loadsys.pick_kernel("5.10.0-9-amd64", system)[0] == "5.10.0-9-amd64"
    assert loadsys.pick_kernel("/opt/vmlinuz-5.1", system) == ("5.1", "/opt/vmlinuz-5.1")


def fake_bzimage(release: str) -> bytes:
    """A bzImage's setup header as the boot protocol lays it out: "HdrS" at 0x202 and at
    0x20E the offset (less 0x200) of the version string that ``uname -r`` starts with."""
    head = bytearray(0x400)
    head[0x202:0x208] = b"HdrS" + (0x20F).to_bytes(2, "little")
    head[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    head[0x300 : 0x300 + len(release) + 30] = f"{release} (geeko@build) #1 SMP\0".encode()
    return bytes(head)


def test_an_image_path_gives_the_version_of_that_image(tmp_path):
    """KDUMP_KERNELVER=/boot/vmlinuz (SUSE: a link to the newest kernel installed) or
    /usr/lib/modules/VER/vmlinuz (Fedora, RHEL 9): the version was the running kernel's,
    and the image packed modules that the capture kernel refuses (another version)."""
    system = _system(tmp_path)
    boot = tmp_path / "boot"
    (boot / "vmlinuz-6.4.0-2-default").write_bytes(b"not a bzImage")
    (boot / "vmlinuz").symlink_to("vmlinuz-6.4.0-2-default")
    assert loadsys.pick_kernel(f"{boot}/vmlinuz", system) == ("6.4.0-2-default", f"{boot}/vmlinuz")
    modules = tmp_path / "usr/lib/modules/6.5.0-1.fc39.x86_64"
    modules.mkdir(parents=True)
    (modules / "vmlinuz").write_bytes(b"not a bzImage")
    assert loadsys.pick_kernel(f"{modules}/vmlinuz", system)[0] == "6.5.0-1.fc39.x86_64"
    (boot / "kernel").write_bytes(fake_bzimage("6.6.7-custom"))
    assert loadsys.pick_kernel(f"{boot}/kernel", system)[0] == "6.6.7-custom"
    # an image that says nothing: the running kernel's version, as before
    (boot / "kernel").write_bytes(b"kernel")
    assert loadsys.pick_kernel(f"{boot}/kernel", system)[0] == "6.1.0-test"


def test_readiness_without_reservation_gives_the_seed_message(tmp_path):
    r = loadsys.readiness(CFG, _system(tmp_path, reserved=0))
    assert r.problems == [loadsys.NOT_RESERVED]
    assert loadsys.NOT_RESERVED == (
        "Memory for crashkernel is not reserved Please reserve memory by passing "
        '"crashkernel=X@Y" parameter to the kernel Then try loading kdump kernel'
    )
    text = "\n".join(r.lines())
    assert "reservation:    none" in text and "command line:   console=ttyS0 nr_cpus=1" in text


def test_readiness_ready(tmp_path):
    r = loadsys.readiness(CFG, _system(tmp_path, reserved=192 << 20, loaded=1))
    assert r.problems == [] and r.loaded and r.reserved == 192 << 20
    assert r.warnings == ["CONFIG_DEBUG_INFO is not set: crash needs a separate debug kernel"]
    assert "192 MiB" in "\n".join(r.lines())


def test_kexec_fallback_argv():
    argv = kexec.kexec_binary_argv("/sbin/kexec", "/boot/k", "/i.img", "a b", "--args-linux")
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
    commands.add_subcommands(parser.add_subparsers(dest="command", required=True))
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
    assert args.func is commands.cmd_initramfs_build
    assert parser.parse_args(["check"]).config == "/etc/sysconfig/kdump"


def test_test_crash_refuses_without_yes(capsys):
    args = _parser().parse_args(["test-crash", "--config", "/nonexistent"])
    assert args.func(args) == 2
    assert "--yes" in capsys.readouterr().out


@pytest.fixture
def no_reservation_here():
    """This build machine (and CI) has no crashkernel reservation; the tests below rely on
    it to prove that check/load/status/test-crash change nothing. Fail loudly otherwise."""
    system = loadsys.System()
    if system.crash_size() or system.crash_loaded():
        pytest.fail("this machine has a crashkernel reservation: refusing to run load tests")
    return system


def test_commands_say_not_possible_here_and_change_nothing(no_reservation_here, capsys):
    parser = _parser()
    before = os.path.exists(loadsys.INITRD_DIR)
    sysrq = no_reservation_here.read("/proc/sys/kernel/sysrq")  # None: no sysrq here
    check = parser.parse_args(["check", "--config", "/nonexistent"])
    assert check.func(check) == LoadError.exit_code
    out = capsys.readouterr().out
    assert loadsys.NOT_RESERVED in out and "not possible here" in out
    status = parser.parse_args(["status", "--config", "/nonexistent"])
    assert status.func(status) == LoadError.exit_code
    assert "kdump is not possible here" in capsys.readouterr().out
    load = parser.parse_args(["load", "--config", "/nonexistent"])
    with pytest.raises(LoadError, match="Memory for crashkernel is not reserved"):
        load.func(load)
    crash = parser.parse_args(["test-crash", "--yes", "--config", "/nonexistent"])
    with pytest.raises(LoadError, match="no capture kernel is loaded"):
        crash.func(crash)
    assert os.path.exists(loadsys.INITRD_DIR) == before
    assert no_reservation_here.read("/proc/sys/kernel/sysrq") == sysrq


SYSTEM = loadsys.System


def _fake_kernel(tmp_path, loaded: bool) -> loadsys.System:
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
    monkeypatch.setattr(loadsys, "System", lambda: system)  # cmd_test_crash's System()
    with pytest.raises(LoadError, match="no capture kernel is loaded"):
        args.func(args)
    assert (tmp_path / "proc/sys/kernel/sysrq").read_text() == "176\n"
    assert (tmp_path / "proc/sysrq-trigger").read_text() == ""
    system = _fake_kernel(tmp_path, loaded=True)
    args.func(args)  # on the pretend kernel: nothing crashes
    assert (tmp_path / "proc/sys/kernel/sysrq").read_text() == "1"
    assert (tmp_path / "proc/sysrq-trigger").read_text() == "c"


# -- the rebuild decision (issue 8 item 15) and private image files (item 1) ----------------
def _inputs(cfg, **kw):
    args = dict(
        kernel_version="9.9.9-test",
        modules_root=None,
        compress="zstd",
        target_device="",
        target_fstype="",
    )
    args.update(kw)
    return rebuild.image_inputs(cfg, **args)


def _fake_image(directory, cfg) -> str:
    """An image file for ``cfg`` with the record the builder writes beside it."""
    from kdump_capture import private

    private.make_dir(str(directory))
    img = str(directory / "initrd-9.9.9-test.img")
    private.write_file(img, b"image")
    rebuild.write_record(img, _inputs(cfg))
    return img


def test_set_override_of_the_target_makes_the_image_stale(tmp_path):
    """``load --set KDUMP_SAVEDIR=...`` used to load the old image (only the config file's
    mtime counted): the new target must trigger a rebuild."""
    from kdump_capture.config import load_config

    old = load_config("/nonexistent/kdump", ["KDUMP_SAVEDIR=file:///var/crash"])
    new = load_config("/nonexistent/kdump", ["KDUMP_SAVEDIR=ftp://10.0.0.9/dumps"])
    _fake_image(tmp_path / "images", old)
    same = commands.image_decision(old, "9.9.9-test", None, str(tmp_path / "images"))
    assert same.rebuild == [] and same.line() == "up to date"
    changed = commands.image_decision(new, "9.9.9-test", None, str(tmp_path / "images"))
    assert changed.rebuild == ["configuration changed"]
    assert "stale (configuration changed): load rebuilds it" in changed.line()
    # --initrd: the admin's own image is used as it is
    assert commands.image_decision(new, "9.9.9-test", "/x.img").rebuild == []


def test_other_inputs_make_the_image_stale(tmp_path):
    from kdump_capture.config import load_config

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh/id_ed25519"
    key.write_text("key 1")
    cfg = load_config(None, ["KDUMP_SAVEDIR=sftp://root@10.0.0.9/dumps"])
    before = _inputs(cfg, home=str(home))
    assert _inputs(cfg, home=str(home)) == before  # deterministic
    key.write_text("key 2")
    (home / ".ssh/known_hosts").write_text("10.0.0.9 ssh-ed25519 AAAA\n")
    after = _inputs(cfg, home=str(home))
    assert {k for k in before if before[k] != after[k]} == {"ssh keys", "known_hosts"}
    assert _inputs(cfg, kernel_version="9.9.9-other")["kernel"] == "9.9.9-other"
    assert _inputs(cfg, compress="gzip")["build options"] != before["build options"]
    img = tmp_path / "img"
    img.write_bytes(b"x")
    assert rebuild.stale_reasons(str(img), before) == [
        f"nothing records what it was built from ({img}{rebuild.RECORD_SUFFIX})"
    ]
    rebuild.write_record(str(img), before)
    assert rebuild.stale_reasons(str(img), after) == ["ssh keys changed", "known_hosts changed"]
    assert rebuild.stale_reasons(str(tmp_path / "none"), before) == ["there is no image yet"]


def test_engine_digest_follows_the_sources(tmp_path):
    root = tmp_path / "src"
    for d in rebuild.ENGINE_DIRS:
        (root / d).mkdir(parents=True)
        (root / d / "a.py").write_text("x = 1\n")
    (root / "initramfs/init").write_text("#!init\n")
    first = rebuild.engine_digest(root)
    (root / "transports/a.py").write_text("x = 2\n")
    assert rebuild.engine_digest(root) != first


def test_a_record_an_older_version_wrote_rebuilds_and_says_so(tmp_path):
    """A record of version 1 (what kdump-capture wrote before records held the image's
    SHA-256) must never let load take the image for up to date, and load used to say that
    nothing recorded the inputs, with the record right there: now it names its version."""
    img = tmp_path / "initrd-9.9.9-test.img"
    img.write_bytes(b"image")
    inputs = {"configuration": "c", "engine": "e"}
    old = {"version": 1, "inputs": inputs, "image": {}}
    (tmp_path / f"{img.name}{rebuild.RECORD_SUFFIX}").write_text(json.dumps(old))
    assert rebuild.read_record(str(img)) is None
    [why] = rebuild.stale_reasons(str(img), inputs)
    assert "record version 1" in why and f"reads version {rebuild.RECORD_VERSION}" in why
    (tmp_path / f"{img.name}{rebuild.RECORD_SUFFIX}").write_text("{not json")
    assert rebuild.stale_reasons(str(img), inputs) == [
        f"nothing records what it was built from ({img}{rebuild.RECORD_SUFFIX})"
    ]


def test_engine_digest_follows_the_compiled_accelerator(tmp_path):
    """The image packs kdump_capture/_speedups*.so as it is. Only .py files were digested:
    an upgrade that rebuilt the accelerator alone (a fix in its C source, or a build that
    now finds libzstd's headers) left load calling the image with the old one up to date."""
    root = tmp_path / "src"
    for d in rebuild.ENGINE_DIRS:
        (root / d).mkdir(parents=True)
        (root / d / "a.py").write_text("x = 1\n")
    (root / "initramfs/init").write_text("#!init\n")
    so = root / "kdump_capture" / "_speedups.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF built without the zstd loop")
    first = rebuild.engine_digest(root)
    so.write_bytes(b"\x7fELF built with the zstd loop")
    assert rebuild.engine_digest(root) != first
    so.unlink()  # the accelerator gone (a build without a compiler): stale too
    assert rebuild.engine_digest(root) != first


def test_private_files_under_umask_022(tmp_path):
    """The image holds the password and the SSH key: 0600 in a 0700 directory from the
    first byte, whatever the umask; an existing loose directory or image is repaired."""
    from kdump_capture import private

    old = os.umask(0o022)
    try:
        d = tmp_path / "a" / "images"
        private.make_dir(str(d))
        assert d.stat().st_mode & 0o777 == 0o700
        fd = private.open_new(str(d / "new"))  # mode is 0600 before the first byte
        try:
            assert os.fstat(fd).st_mode & 0o777 == 0o600
        finally:
            os.close(fd)
        private.write_file(str(d / "img"), b"secret")
        assert (d / "img").stat().st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            private.open_new(str(d / "new"))
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        (loose / "img").write_bytes(b"secret")
        os.chmod(loose / "img", 0o644)
        private.make_dir(str(loose), repair=True)
        assert private.repair_file(str(loose / "img"))
        assert loose.stat().st_mode & 0o777 == 0o700
        assert (loose / "img").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_load_repairs_and_reports_loose_modes(tmp_path):
    from kdump_capture.config import load_config

    cfg = load_config(None, ["KDUMP_SAVEDIR=file:///var/crash"])
    img = _fake_image(tmp_path / "images", cfg)
    os.chmod(img, 0o644)
    os.chmod(tmp_path / "images", 0o755)
    decision = commands.image_decision(cfg, "9.9.9-test", None, str(tmp_path / "images"))
    assert decision.rebuild == [] and len(decision.loose_modes) == 2
    assert "readable by others" in decision.line()
    commands.prepare_image(cfg, decision, "9.9.9-test")  # up to date: repairs, builds nothing
    assert os.stat(img).st_mode & 0o777 == 0o600
    assert (tmp_path / "images").stat().st_mode & 0o777 == 0o700
    again = commands.image_decision(cfg, "9.9.9-test", None, str(tmp_path / "images"))
    assert again.loose_modes == [] and again.line() == "up to date"


def _bzimage(path, init_size: int) -> None:
    """A file with the x86 boot header of a bzImage (protocol 2.15) asking ``init_size``."""
    head = bytearray(0x1000)
    head[0x202:0x208] = b"HdrS" + (0x20F).to_bytes(2, "little")
    head[0x260:0x264] = init_size.to_bytes(4, "little")
    path.write_bytes(bytes(head))


def _load_on(tmp_path, monkeypatch, image_mib: int):
    """``load --initrd`` of an image of ``image_mib`` MiB on a pretend kernel with a 64 MiB
    reservation and a capture kernel loaded; the kernel calls it would make are recorded."""
    system = _system(tmp_path, reserved=64 << 20, loaded=1)
    _bzimage(tmp_path / "boot/vmlinuz-6.1.0-test", 40 << 20)
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as f:
        f.truncate(image_mib << 20)
    calls = []
    monkeypatch.setattr(loadsys, "System", lambda: system)
    monkeypatch.setattr(kexec, "kexec_file_unload", lambda: calls.append("unload"))

    def kernel_load(kernel, image, cmdline, flags):
        calls.append("load")
        if image_mib + 40 > 64:  # what the kernel answers when nothing fits (after freeing)
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    monkeypatch.setattr(kexec, "kexec_file_load", kernel_load)
    args = _parser().parse_args(["load", "--config", "/nonexistent", "--initrd", str(initrd)])
    return args, calls


def test_load_that_cannot_fit_the_reservation_keeps_the_loaded_kernel(tmp_path, monkeypatch):
    """The kernel frees the loaded capture kernel before it tries a new one: an image too
    large for the reservation used to unload it and then fail with 'Cannot assign requested
    address', leaving the machine without kdump. Now load refuses first, saying why."""
    args, calls = _load_on(tmp_path, monkeypatch, image_mib=30)
    with pytest.raises(LoadError) as e:
        args.func(args)
    assert calls == []  # nothing unloaded, nothing tried
    assert "70.0 MiB" in str(e.value) and "reservation (64 MiB)" in str(e.value)
    assert "estimate" in str(e.value) and "left as it is" in str(e.value)
    assert e.value.exit_code == 11


def test_load_that_fits_goes_ahead(tmp_path, monkeypatch, capsys):
    args, calls = _load_on(tmp_path, monkeypatch, image_mib=20)
    assert args.func(args) == 0
    assert calls == ["unload", "load"]
    assert "loaded capture kernel" in capsys.readouterr().out


def test_load_below_the_estimate_says_so(tmp_path, monkeypatch, caplog):
    """check warned when the reservation was below the estimate, load did not: at boot
    the unit's journal had no word of it before a crash ran out of memory."""
    args, calls = _load_on(tmp_path, monkeypatch, image_mib=20)
    facts = {"unpacked": 160 << 20, "save_imports": 40 << 20}
    rebuild.write_record(args.initrd, {}, facts)
    with caplog.at_level(logging.WARNING):
        assert args.func(args) == 0
    assert calls == ["unload", "load"]
    assert "the reservation (64 MiB) is below the estimate" in caplog.text


def test_kernel_footprint_reads_init_size(tmp_path):
    _bzimage(tmp_path / "bz", 51 << 20)
    assert kexec.kernel_footprint(str(tmp_path / "bz")) == 51 << 20
    (tmp_path / "raw").write_bytes(b"\0" * 5000)  # not a bzImage: its size
    assert kexec.kernel_footprint(str(tmp_path / "raw")) == 5000
    assert kexec.kernel_footprint(str(tmp_path / "none")) == 0


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.EPERM, "Secure Boot"),
        (errno.EKEYREJECTED, "signed by a key it trusts"),
        (errno.ENOEXEC, "not an image this kernel can load"),
        (errno.EBUSY, "in progress"),
        (errno.EADDRNOTAVAIL, "do not fit the crashkernel reservation"),
        (errno.ENOMEM, "do not fit the crashkernel reservation"),
        (errno.EINVAL, "command line"),
    ],
)
def test_kexec_file_load_errors_say_what_they_mean(err, words, monkeypatch):
    """A failed load said only the errno's text ('Cannot assign requested address' for an
    image too large, 'Operation not permitted' under lockdown): now what it means too."""
    import shutil

    def refused(kernel, initrd, cmdline, flags):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(kexec, "kexec_file_load", refused)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no kexec binary to fall back on
    with pytest.raises(LoadError) as e:
        kexec.load_image("/boot/k", "/i.img", "console=ttyS0", "")
    assert str(e.value).startswith(f"kexec_file_load failed: {os.strerror(err)}: ")
    assert words in str(e.value) and e.value.exit_code == 11


def test_what_the_builder_takes_from_the_host_makes_the_image_stale(tmp_path, monkeypatch):
    """The image packs an s3:// target's CA bundle and this host's name (KDUMP_HOSTNAME
    empty), neither of which the record covered: a renewed CA kept the old one (TLS fails
    at the crash), and a renamed or cloned machine went on naming its dumps after the old
    name (rotating another host's dumps on a shared target)."""
    import shutil

    from kdump_capture import identity
    from kdump_capture.config import load_config
    from tests.servers.s3 import make_tls

    ca, _, _ = make_tls(str(tmp_path))
    s3 = "KDUMP_SAVEDIR=s3://s3.example.com/dumps/d"
    cfg = load_config(None, [s3, f"KDUMP_S3_CA_BUNDLE={ca}"])
    monkeypatch.setattr(identity, "local_identity", lambda root="/": "web01")
    before = _inputs(cfg)
    (tmp_path / "renewed").mkdir()
    shutil.copy(make_tls(str(tmp_path / "renewed"))[0], ca)  # a renewed CA
    assert {k for k, v in _inputs(cfg).items() if v != before[k]} == {"CA certificates"}
    before = _inputs(cfg)
    monkeypatch.setattr(identity, "local_identity", lambda root="/": "web02")
    assert {k for k, v in _inputs(cfg).items() if v != before[k]} == {"host name"}
    # a name in the configuration is packed as it is: the host's own does not count then
    named = load_config(None, ["KDUMP_SAVEDIR=file:///var/crash", "KDUMP_HOSTNAME=db1"])
    before = _inputs(named)
    monkeypatch.setattr(identity, "local_identity", lambda root="/": "web03")
    assert _inputs(named) == before


def test_modules_installed_again_make_the_image_stale(tmp_path):
    """Modules rebuilt under the same kernel version: depmod writes modules.dep again with
    the same text, and the image kept the old modules (which the new kernel may refuse)."""
    from kdump_capture.config import load_config
    from tests.test_initramfs_build import KVER, fake_modules_root

    root = fake_modules_root(tmp_path)
    cfg = load_config(None, ["KDUMP_SAVEDIR=ftp://10.0.0.9/d"])
    before = _inputs(cfg, kernel_version=KVER, modules_root=str(root))
    assert _inputs(cfg, kernel_version=KVER, modules_root=str(root)) == before
    (root / "kernel/drivers/net/virtio_net.ko").write_bytes(b"\x7fELF rebuilt")
    dep = root / "modules.dep"
    st = dep.stat()
    dep.write_text(dep.read_text())  # depmod -a
    os.utime(dep, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = _inputs(cfg, kernel_version=KVER, modules_root=str(root))
    assert {k for k in before if before[k] != after[k]} == {"kernel modules"}


def test_an_image_replaced_after_its_record_is_stale(tmp_path):
    """Two builds of one image at once could leave one build's image beside the other's
    record: `load` then called an image with the old target and credentials "up to date".
    The record holds the image's SHA-256 now."""
    from kdump_capture.config import load_config

    cfg = load_config("/nonexistent/kdump", ["KDUMP_SAVEDIR=file:///var/crash"])
    img = _fake_image(tmp_path / "images", cfg)
    assert commands.image_decision(cfg, "9.9.9-test", None, str(tmp_path / "images")).rebuild == []
    with open(img, "wb") as f:
        f.write(b"another build's image")
    decision = commands.image_decision(cfg, "9.9.9-test", None, str(tmp_path / "images"))
    assert decision.rebuild == [
        "the image is not the one its record describes (replaced after its build)"
    ]


def _hold(directory) -> subprocess.Popen:
    """Another process of ours holding ``directory`` (dir_lock) until it is killed."""
    code = (
        "import sys, time; from kdump_capture import private\n"
        "with private.dir_lock(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline() == "held\n"
    return p


def test_a_load_waits_for_another_and_a_killed_holder_blocks_nothing(tmp_path, monkeypatch):
    """Two loads at once each decided, built and loaded on their own: the one that loaded
    last could load the other's image. One load at a time now holds the image directory;
    a holder that is killed frees it at once (no lock file is left to block the next)."""
    from kdump_capture import private

    images = tmp_path / "images"
    images.mkdir()
    holder = _hold(images)
    try:
        with pytest.raises(TimeoutError) as e, private.dir_lock(str(images), timeout=0.5):
            pass
        assert str(images) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    with private.dir_lock(str(images), timeout=5), private.dir_lock(str(images), timeout=0):
        pass  # free again, and reentrant within a process

    # `load` itself: it waits for the directory before it looks at the image
    system = _system(tmp_path, reserved=256 << 20, loaded=0)
    _bzimage(tmp_path / "boot/vmlinuz-6.1.0-test", 40 << 20)
    monkeypatch.setattr(loadsys, "System", lambda: system)
    monkeypatch.setattr(loadsys, "INITRD_DIR", str(images))
    monkeypatch.setattr(private, "dir_lock", _short_lock(private.dir_lock))
    holder = _hold(images)
    try:
        args = _parser().parse_args(["load", "--config", "/nonexistent"])
        with pytest.raises(LoadError) as e:
            args.func(args)
        assert "another load" in str(e.value) and "nothing was changed" in str(e.value)
        assert e.value.exit_code == 11
        assert os.listdir(images) == []  # nothing built meanwhile
    finally:
        holder.kill()
        holder.wait()


def _short_lock(real):
    def lock(path, timeout=600.0, what=""):
        return real(path, timeout=min(timeout, 0.5), what=what)

    return lock


def test_an_updated_system_library_makes_the_image_stale(tmp_path):
    """The image packs the system's libc, libssl, libz...: a security update of one left
    the image "up to date", the old library in it. The record holds each packed library's
    size and mtime now."""
    from kdump_capture.config import load_config

    cfg = load_config("/nonexistent/kdump", ["KDUMP_SAVEDIR=file:///var/crash"])
    lib = tmp_path / "libssl.so.3"
    lib.write_bytes(b"old")
    img = _fake_image(tmp_path / "images", cfg)
    rebuild.write_record(img, _inputs(cfg), libraries=[str(lib)])
    directory = str(tmp_path / "images")
    assert commands.image_decision(cfg, "9.9.9-test", None, directory).rebuild == []
    lib.write_bytes(b"new, patched")
    decision = commands.image_decision(cfg, "9.9.9-test", None, directory)
    assert decision.rebuild == ["system libraries changed (libssl.so.3)"]
