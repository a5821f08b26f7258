"""Configuration features of issue 8, item 17: bounded expansion, KDUMP_VERBOSE bits 1 and 4,
load-side features this build refuses, and KDUMP_POSTSCRIPT after a dump-device write."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import tracemalloc

import pytest

from kdump_capture import features
from kdump_capture.config import MAX_VALUE, load_config, parse_sysconfig
from kdump_capture.errors import ConfigError, NotSupported
from kdump_capture.load import kexec
from kdump_capture.sample import SampleSpec, write_sample
from tests.helpers import cli, save_args

# --- expansion is capped -------------------------------------------------------------------------


def test_doubling_30_times_fails_early_with_file_and_line(tmp_path):
    """`A=$A$A` doubles the value per line: 30 lines would be 1 GiB (26 took 2.1 GB before).
    It must fail at the first line past 64 KiB, fast and in little memory."""
    conf = tmp_path / "kdump"
    conf.write_text("A=x\n" + "A=$A$A\n" * 30 + "KDUMP_SAVEDIR=$A\n")
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError) as e:
            load_config(str(conf))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 1.0
    assert peak < 4 << 20, f"peak {peak >> 20} MiB"
    # 2**17 characters (line 18) is the first value over 64 KiB
    assert str(e.value) == f"{conf}:18: A: the value is longer than 64 KiB (after expansion)"


def test_doubling_through_the_cli_is_exit_2(tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text("A=xx\n" + 'A="$A${A}"\n' * 30)
    r = cli("show-config", "--config", str(conf))
    assert r.rc == 2 and "Traceback" not in r.err
    assert r.err.strip() == (
        f"kdump-capture: error: {conf}:17: A: the value is longer than 64 KiB (after expansion)"
    )


def test_every_value_is_capped():
    ok = "A='" + "x" * MAX_VALUE + "'\n"
    assert len(parse_sysconfig(ok, "f")[0].value) == MAX_VALUE
    for text in (
        "A='" + "x" * (MAX_VALUE + 1) + "'\n",  # quoted literal
        "A=" + "x" * (MAX_VALUE + 1) + "\n",  # bare literal
        "A='" + "x" * 40000 + '\'\nB=$A"$A"\n',  # expansions inside and outside quotes
    ):
        with pytest.raises(ConfigError, match="longer than 64 KiB"):
            parse_sysconfig(text, "f")


def test_all_values_together_are_capped():
    """Many values just under the cap: together they must stay bounded as well."""
    text = "A='" + "x" * 60000 + "'\n" + "".join(f"B{i}=$A\n" for i in range(40))
    with pytest.raises(ConfigError, match=r"f:\d+: B\d+: the values of this file add up"):
        parse_sysconfig(text, "f")


def test_huge_or_endless_config_file(tmp_path):
    t0 = time.monotonic()
    r = cli("show-config", "--config", "/dev/zero")
    assert r.rc == 2 and "/dev/zero: not a regular file" in r.err
    assert time.monotonic() - t0 < 30
    huge = tmp_path / "kdump"
    huge.write_bytes(b"#" * (1 << 20) + b"\n")
    r = cli("show-config", "--config", str(huge))
    assert r.rc == 2 and f"{huge}: larger than 1024 KiB" in r.err


def test_set_value_is_capped():
    with pytest.raises(ConfigError, match="--set KDUMP_PRESCRIPT: the value is longer"):
        load_config(None, ["KDUMP_PRESCRIPT=" + "x" * (MAX_VALUE + 1)])


# --- KDUMP_VERBOSE bits 1 (syslog) and 4 (stdout) on load ----------------------------------------

LINE = "kexec_file_load kernel=/boot/vmlinuz initrd=/i.img cmdline='a b' flags=KEXEC_FILE_ON_CRASH"


@pytest.fixture
def syslog(tmp_path):
    path = str(tmp_path / "log")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_verbose_1_logs_the_load_command_to_syslog(syslog, tmp_path, capsys):
    path, s = syslog
    kmsg = tmp_path / "kmsg"
    kexec.announce_load(LINE, 1, socket_path=path, kmsg=str(kmsg))
    assert s.recv(4096).decode() == f"<13>kdump-capture[{os.getpid()}]: load command: {LINE}"
    assert capsys.readouterr().out == ""  # bit 4 is off
    assert not kmsg.exists()


def test_verbose_1_without_syslog_goes_to_the_kernel_log(tmp_path, capsys):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")  # stands in for /dev/kmsg
    kexec.announce_load(LINE, 3, socket_path=str(tmp_path / "none"), kmsg=str(kmsg))
    assert kmsg.read_text() == f"<13>kdump-capture[{os.getpid()}]: load command: {LINE}\n"
    assert capsys.readouterr().out == ""


def test_verbose_4_prints_the_load_command(syslog, tmp_path, capsys):
    path, s = syslog
    kexec.announce_load(LINE, 4, socket_path=path, kmsg=str(tmp_path / "kmsg"))
    assert capsys.readouterr().out == f"load command: {LINE}\n"
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recv(4096)  # bit 1 is off: nothing logged


def test_load_command_names_the_load():
    assert kexec.load_command("kexec_file_load", "/boot/vmlinuz", "/i.img", "a b") == LINE
    argv = "/sbin/kexec -p --initrd=/i.img '--command-line=a b' /boot/vmlinuz"
    assert kexec.load_command(argv, "/boot/vmlinuz", "/i.img", "a b") == argv


# --- load-side features this build does not implement ------------------------------------------


def _load_side(tmp_path, command: list[str], config: str):
    """A load-side command (check, load, initramfs build --output IMAGE) with ``config``:
    (config file, image path, its run)."""
    conf = tmp_path / "kdump"
    conf.write_text(config)
    image = tmp_path / "initrd.img"
    if command[-1] == "--output":
        command = [*command, str(image)]
    return conf, image, cli(*command, "--config", str(conf))


@pytest.mark.parametrize("setting", ["KDUMP_UPDATE_BOOTLOADER=yes", "KDUMP_CRASHKERNEL=256M,high"])
@pytest.mark.parametrize("command", [["check"], ["load"], ["initramfs", "build", "--output"]])
def test_bootloader_and_crashkernel_are_refused_on_the_load_side(tmp_path, setting, command):
    """Refused (exit 9) before anything happens; nothing is built or loaded."""
    conf, image, r = _load_side(tmp_path, command, f"# ours\n{setting}\n")
    assert r.rc == 9, r.err
    name = setting.split("=")[0]
    assert f"kdump-capture: error: {conf}:2: {name}: " in r.err and "not supported" in r.err
    assert not image.exists()


def test_defaults_do_not_turn_them_on():
    cfg = load_config(None)
    assert cfg.value("KDUMP_UPDATE_BOOTLOADER") is False and cfg.value("KDUMP_CRASHKERNEL") == ""
    features.check_supported(cfg)  # no error


def test_a_capture_kernel_never_refuses_a_dump_over_them(tmp_path):
    sample = str(tmp_path / "vmcore")
    write_sample(sample, SampleSpec(ram_mib=2))
    r = cli(
        *save_args(
            sample,
            str(tmp_path / "d"),
            "KDUMP_UPDATE_BOOTLOADER=yes",
            "KDUMP_CRASHKERNEL=256M",
        )
    )
    assert r.rc == 0, r.err


@pytest.mark.parametrize("command", [["check"], ["initramfs", "build", "--output"]])
def test_a_dump_format_this_build_cannot_write_is_refused_before_the_crash(tmp_path, command):
    """KDUMP_DUMPFORMAT=snappy (accepted by the configuration, as SUSE lists it) passed
    `check` and `load` and was refused only by the writer in the capture kernel, exit 9 with
    no dump saved. It is refused where the other features this build lacks are."""
    text = f"KDUMP_SAVEDIR=file://{tmp_path}/d\nKDUMP_DUMPFORMAT=snappy\n"
    conf, image, r = _load_side(tmp_path, command, text)
    assert r.rc == 9, r.err
    assert f"kdump-capture: error: {conf}:2: KDUMP_DUMPFORMAT: " in r.err and "snappy" in r.err
    assert not image.exists()


def test_the_formats_this_build_writes_pass_the_check():
    for fmt in ("none", "ELF", "compressed", "lzo", "zstd", "raw"):
        features.check_unsupported(load_config(None, [f"KDUMP_DUMPFORMAT={fmt}"]))


STATIC_IP = "ip=10.0.0.5::10.0.0.1:255.255.255.0:web01:eth0:none"


@pytest.mark.parametrize("command", [["check"], ["initramfs", "build", "--output"]])
@pytest.mark.parametrize("name", ["KDUMP_COMMANDLINE_APPEND", "KDUMP_COMMANDLINE"])
def test_a_static_ip_option_for_the_capture_network_is_refused(tmp_path, command, name):
    """SUSE's template says to put a static set-up in KDUMP_COMMANDLINE_APPEND, and its dracut
    takes the capture network from that ip=. Ours passed it on and brought up DHCP instead,
    without a word: on a network without a DHCP server the SFTP target, and the dump, were
    lost."""
    conf = tmp_path / "kdump"
    conf.write_text(
        "## Type: string\n"
        'KDUMP_SAVEDIR="sftp://dump@10.0.0.2/var/crash"\n'
        'KDUMP_NETCONFIG="auto"\n'
        f'{name}="console=ttyS0 {STATIC_IP}"\n'
    )
    image = tmp_path / "initrd.img"
    if command[-1] == "--output":
        command = [*command, str(image)]
    r = cli(*command, "--config", str(conf))
    assert r.rc == 9, r.err
    assert f"kdump-capture: error: {conf}:4: {name}: ip= " in r.err
    assert "KDUMP_NETCONFIG=DEV:static" in r.err
    assert not image.exists()


@pytest.mark.parametrize(
    "settings",
    [
        ("KDUMP_SAVEDIR=ftp://h/x", "KDUMP_COMMANDLINE_APPEND=ip=dhcp"),  # what we do anyway
        ("KDUMP_SAVEDIR=ftp://h/x", "KDUMP_COMMANDLINE_APPEND=ip=off"),
        ("KDUMP_SAVEDIR=file:///var/crash", f"KDUMP_COMMANDLINE_APPEND={STATIC_IP}"),  # no net
        ("KDUMP_SAVEDIR=ftp://h/x", "KDUMP_DUMPDEV=/dev/sdb1", f"KDUMP_COMMANDLINE={STATIC_IP}"),
        ("KDUMP_SAVEDIR=ftp://h/x", "KDUMP_COMMANDLINE_APPEND=noip=1:2 vip=a:b"),
    ],
)
def test_ip_options_that_change_nothing_for_the_capture_network_pass(settings):
    features.check_supported(load_config(None, settings))


@pytest.mark.parametrize(
    "settings",
    [
        ("KDUMP_SAVEDIR=ftp://h/x", "KDUMP_COMMANDLINE_APPEND=ip=eth1:dhcp"),
        (
            "KDUMP_SAVEDIR=file:///d",
            "KDUMP_NETCONFIG=auto:force",
            f"KDUMP_COMMANDLINE_APPEND={STATIC_IP}",
        ),
        ("KDUMP_SAVEDIR=ftp://h/x", f'KDUMP_COMMANDLINE_APPEND="{STATIC_IP}"'),  # quoted whole
    ],
)
def test_ip_options_that_set_up_another_network_are_refused(settings):
    with pytest.raises(NotSupported, match="ip= with an interface or an address"):
        features.check_supported(load_config(None, settings))


# --- KDUMP_POSTSCRIPT with KDUMP_DUMPDEV --------------------------------------------------------


@pytest.fixture
def loopdev(tmp_path):
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot attach a loop device: {r.stderr}"
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def _dev_save(sample, dev, *sets):
    args = ["save", "--config", "/nonexistent", "--vmcore", sample, "--no-reboot"]
    for s in (f"KDUMP_DUMPDEV={dev}", *sets):
        args += ["--set", s]
    return cli(*args)


def test_postscript_runs_after_the_device_write(loopdev, tmp_path):
    sample = str(tmp_path / "vmcore")
    write_sample(sample, SampleSpec(ram_mib=4))
    out = tmp_path / "post"
    # the header's state (offset 12, 2 = complete) as the script sees it: written before it ran
    post = (
        f'echo "$KDUMP_DUMP_DEVICE [$KDUMP_DUMP_DIR]" >{out}; '
        f'od -An -tu4 -j12 -N4 "$KDUMP_DUMP_DEVICE" >>{out}'
    )
    r = _dev_save(sample, loopdev, f"KDUMP_POSTSCRIPT={post}")
    assert r.rc == 0, r.err
    first, state = out.read_text().splitlines()
    assert first == f"{loopdev} []"
    assert state.strip() == "2"
    assert "kdump-capture recover" in r.out


def test_failing_postscript_after_the_device_write(loopdev, tmp_path):
    sample = str(tmp_path / "vmcore")
    write_sample(sample, SampleSpec(ram_mib=4))
    r = _dev_save(sample, loopdev, "KDUMP_POSTSCRIPT=exit 4", "KDUMP_CONTINUE_ON_ERROR=false")
    assert r.rc == 12 and "KDUMP_POSTSCRIPT failed (exit status 4)" in r.err
    # the first save's dump is complete and not recovered: only replaced when asked to
    r = _dev_save(sample, loopdev, "KDUMP_POSTSCRIPT=exit 4", "KDUMP_DUMPDEV_OVERWRITE=yes")
    assert r.rc == 0 and "continuing" in r.err


def test_a_config_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    """open() of a FIFO waited for a writer for good (`--config FIFO`)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(ConfigError, match="not a regular file: not a kdump configuration"):
            load_config(path)


@pytest.mark.parametrize("bad", ["fifo", "/dev/zero"])
def test_an_ssh_identity_that_is_not_a_small_file_is_skipped(tmp_path, caplog, bad):
    """paramiko read KDUMP_SSH_IDENTITY whole: /dev/zero grew the save to 19 GB (an OOM
    kill in a capture kernel), a FIFO waited for good."""
    from transports.base import TransportSettings
    from transports.sftp import load_identities

    path = str(tmp_path / "fifo") if bad == "fifo" else bad
    if bad == "fifo":
        os.mkfifo(path)
    assert load_identities(TransportSettings(ssh_identity=(path,))) == []
    assert f"cannot load ssh key {path}: {path}: not a regular file" in caplog.text


@pytest.mark.parametrize(
    "setting, message",
    [
        ("KDUMP_SAVEDIR=ftp://h%0Ax/x", "the host may not hold blanks, control characters"),
        ("KDUMP_SAVEDIR=ftp://h%00x/x", "the host may not hold blanks, control characters"),
        ("KDUMP_SAVEDIR=s3://h%20x/bkt", "the host may not hold blanks, control characters"),
        ("KDUMP_NET_TIMEOUT=9999999999", "9999999999 is out of range; allowed: 0-86400"),
        ("KDUMP_S3_REGION=a\nb", "'a\\nb' is not valid; allowed: a region name"),
    ],
)
def test_values_that_failed_later_as_target_errors_are_config_errors(setting, message):
    """Each passed the configuration and failed at the target instead (exit 6): a host with
    a newline printed it raw into the error line, a timeout past time_t overflowed in the
    socket layer, a region with a newline split a signed header."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [setting])
    assert load_config(None, ["KDUMP_SAVEDIR=sftp://[fe80::1%25eth0]/x"]).savedir[0].host
