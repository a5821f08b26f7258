"""/init: its pure parts (DHCP packets, superblock probing, finish policy, cmdline options),
the save's watchdog, and /init as a whole run in PID and mount namespaces of its own."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

INIT = Path(__file__).resolve().parent.parent / "initramfs" / "init"


def _load_init():
    loader = importlib.machinery.SourceFileLoader("kdump_capture_init", str(INIT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


init = _load_init()


def test_init_is_executable_python_with_packed_interpreter_shebang():
    text = INIT.read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    assert INIT.stat().st_mode & 0o111


def test_cmdline_options():
    opts = init.parse_cmdline("ro console=ttyS0 kdump_capture.finish=poweroff kdump_capture.break")
    assert opts == {"finish": "poweroff", "break": "1"}


@pytest.mark.parametrize(
    ("ok", "cmdline", "shell", "expected"),
    [
        (True, {}, "/usr/bin/sh", "reboot"),
        (False, {}, "/usr/bin/sh", "shell"),
        (False, {}, "", "shell-python"),
        (True, {"finish": "poweroff"}, "", "poweroff"),
    ],
)
def test_finish_action(ok, cmdline, shell, expected):
    plan = {"on_success": "reboot", "on_failure": "shell", "shell": shell}
    assert init.finish_action(plan, ok, cmdline) == expected


def _reply(msgtype: int, xid: int, yiaddr: str, opts: bytes) -> bytes:
    head = init.BOOTP.pack(
        2,
        1,
        6,
        0,
        xid,
        0,
        0,
        b"\0" * 4,
        socket.inet_aton(yiaddr),
        b"\0" * 4,
        b"\0" * 4,
        b"\x52\x54\0\x12\x34\x56".ljust(16, b"\0"),
        b"\0" * 64,
        b"\0" * 128,
        init.DHCP_COOKIE,
    )
    return head + bytes([53, 1, msgtype]) + opts + b"\0\0" + bytes([255])


def test_dhcp_request_layout():
    mac = bytes.fromhex("525400123456")
    pkt = init.dhcp_packet(
        init.DHCPREQUEST,
        0xDEADBEEF,
        mac,
        socket.inet_aton("10.0.2.15"),
        socket.inet_aton("10.0.2.2"),
    )
    f = init.BOOTP.unpack_from(pkt)
    assert f[0] == 1 and f[4] == 0xDEADBEEF and f[6] == 0x8000 and f[11][:6] == mac
    assert f[14] == 0x63825363
    opts = pkt[240:]
    assert opts[:3] == bytes([53, 1, 3])
    assert bytes([50, 4]) + socket.inet_aton("10.0.2.15") in opts
    assert bytes([54, 4]) + socket.inet_aton("10.0.2.2") in opts
    assert opts[-1] == 255


def test_dhcp_ack_parsing_and_foreign_xid():
    opts = (
        bytes([1, 4])
        + socket.inet_aton("255.255.255.0")
        + bytes([3, 4])
        + socket.inet_aton("10.0.2.2")
        + bytes([6, 8])
        + socket.inet_aton("10.0.2.3")
        + socket.inet_aton("1.1.1.1")
    )
    pkt = _reply(init.DHCPACK, 7, "10.0.2.15", opts)
    addr, parsed = init.parse_dhcp(pkt, 7)
    assert socket.inet_ntoa(addr) == "10.0.2.15"
    assert parsed[53] == bytes([init.DHCPACK])
    assert init.mask_to_prefix(parsed[1]) == 24
    assert parsed[6] == socket.inet_aton("10.0.2.3") + socket.inet_aton("1.1.1.1")
    assert init.parse_dhcp(pkt, 8) is None
    assert init.parse_dhcp(pkt[:100], 7) is None


def test_prefix_mask_round_trip():
    for p in (0, 8, 16, 23, 24, 32):
        assert init.mask_to_prefix(socket.inet_aton(init.prefix_to_mask(p))) == p


def test_struct_sizes_match_kernel_abi():
    assert init.RTENTRY.size == 120  # sizeof(struct rtentry) on x86_64
    assert init.IFREQ_ADDR.size == 40  # sizeof(struct ifreq)
    assert struct.calcsize("=HH4s8x") == 16  # sizeof(struct sockaddr_in)


def _mkfs(tmp_path: Path, tool: list[str]) -> bytes:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} is not installed (setup.sh installs it)")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run([*tool, str(img)], check=True, capture_output=True)
    return img.read_bytes()[:65536]


def test_probe_ext4_label_and_uuid(tmp_path):
    uuid = "0b7f3c5e-1111-4222-8333-444455556666"
    head = _mkfs(tmp_path, ["mkfs.ext4", "-q", "-L", "crashdisk", "-U", uuid])
    info = init.probe_superblock(head)
    assert info == {"TYPE": "ext4", "UUID": uuid, "LABEL": "crashdisk"}
    assert init.matches("LABEL=crashdisk", "/dev/vda", info)
    assert init.matches(f"UUID={uuid.upper()}", "/dev/vda", info)
    assert not init.matches("LABEL=other", "/dev/vda", info)
    assert init.matches("/dev/vda", "/dev/vda", {})


def test_probe_unknown_is_empty():
    assert init.probe_superblock(b"\0" * 65536) == {}


# ---------------------------------------------------------------- the save's watchdog

BEAT_THEN_HANG = """
import os, time
fd = int(os.environ["KDUMP_HEARTBEAT_FD"])
os.write(fd, b"1048576\\n")
os.write(fd, b"3145728\\n")
time.sleep(1000)
"""

IGNORE_AND_HANG = """
import signal, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(1000)
"""

STEADY_BEATS = """
import os, time
fd = int(os.environ["KDUMP_HEARTBEAT_FD"])
for i in range(12):
    os.write(fd, b"%d\\n" % (i << 20))
    time.sleep(0.5)
"""

# No heartbeat at all, but reading (like the page filter scanning the vmcore): progress.
READS_ONLY = """
import os, sys, time
fd = os.open(sys.executable, os.O_RDONLY)
end = time.monotonic() + 6
while time.monotonic() < end:
    os.pread(fd, 65536, 0)
    time.sleep(0.3)
"""

# The reading is done by a child (like a KDUMP_TRANSFER command): progress as well.
CHILD_READS = f"""
import subprocess, sys
subprocess.run([sys.executable, "-c", {READS_ONLY!r}], check=True)
"""


def _watched(code: str, timeout: float = 2.0, grace: float = 2.0):
    t0 = time.monotonic()
    rc, _ = init.run_watched(
        [sys.executable, "-c", code], {"PATH": "/usr/bin"}, {"timeout": timeout, "grace": grace}
    )
    return rc, time.monotonic() - t0


def test_watchdog_stops_a_save_that_hangs(capsys):
    rc, took = _watched(BEAT_THEN_HANG)
    out = capsys.readouterr().out
    assert rc == -signal.SIGUSR1  # the stand-in has no handler: SIGUSR1 ends it
    assert 2.0 <= took < 6.0, took
    assert "watchdog: the save made no progress for 2 s (3 MiB of the dump done)" in out


def test_watchdog_kills_a_save_that_does_not_stop(capsys):
    rc, took = _watched(IGNORE_AND_HANG, timeout=1.5, grace=1.5)
    out = capsys.readouterr().out
    assert rc == -signal.SIGKILL
    assert 3.0 <= took < 8.0, took
    assert "stopping it" in out and "did not stop within 2 s; killing it" in out


@pytest.mark.parametrize(
    "code", [STEADY_BEATS, READS_ONLY, CHILD_READS], ids=["beats", "reads", "child-reads"]
)
def test_watchdog_leaves_a_save_that_makes_progress(code, capsys):
    rc, took = _watched(code)  # each runs 6 s, three times the watchdog's timeout
    assert rc == 0 and took >= 5.5
    assert "watchdog" not in capsys.readouterr().out


def test_sync_that_never_ends_does_not_stop_the_finish(capsys):
    t0 = time.monotonic()
    assert init.sync_within(1.0, sync=lambda: time.sleep(30)) is False
    assert time.monotonic() - t0 < 5
    assert "sync did not finish within 1 s" in capsys.readouterr().out
    assert init.sync_within(10.0) is True


def test_watchdog_off_runs_the_save_plainly():
    rc, _ = init.run_watched([sys.executable, "-c", "raise SystemExit(3)"], {}, {})
    assert rc == 3


def test_real_save_blocked_on_its_source_is_stopped_and_says_why(tmp_path, capfd):
    """The real CLI, blocked opening a FIFO as its vmcore (nothing ever writes to it)."""
    fifo = tmp_path / "vmcore"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "kdump_capture", "save", "--config", "/nonexistent"]
    argv += ["--vmcore", str(fifo), "--no-reboot", "--set", f"KDUMP_SAVEDIR=file://{tmp_path}/d"]
    env = {"PATH": "/usr/bin", "PYTHONPATH": str(INIT.parent.parent)}
    rc, _ = init.run_watched(argv, env, {"timeout": 3, "grace": 10})
    out, err = capfd.readouterr()
    assert rc == 130, out + err
    assert "stopped by the capture kernel's watchdog" in err
    assert "watchdog: the save made no progress" in out


def _gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` ended (a zombie not yet reaped counts as ended)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("directive", ["KDUMP_PRESCRIPT", "KDUMP_TRANSFER"])
def test_real_save_with_a_hanging_command_is_stopped_and_says_why(tmp_path, capfd, directive):
    """An administrator's command that hangs: the watchdog's SIGUSR1 ended the save by the
    signal (no handler was set yet: rc -10, no message) and left the command running on
    while the capture kernel rebooted. Now: exit 130 with the watchdog's message, and the
    command and what it started are gone (a pre-script: with KDUMP_CONTINUE_ON_ERROR=false;
    with true the save goes on, test_a_hanging_script_costs_itself_not_the_dump)."""
    pids = tmp_path / "pids"
    command = f"sleep 1000 & echo $! > {pids}; echo $$ >> {pids}; wait"
    argv = [sys.executable, "-m", "kdump_capture", "save", "--config", "/nonexistent"]
    vmcore = tmp_path / "vmcore"
    vmcore.write_bytes(b"\0" * 4096)  # never read: the command hangs first
    argv += ["--vmcore", str(vmcore), "--no-reboot", "--set", f"KDUMP_SAVEDIR=file://{tmp_path}/d"]
    argv += ["--set", f"{directive}={command}", "--set", "KDUMP_CONTINUE_ON_ERROR=false"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(INIT.parent.parent)}
    rc, _ = init.run_watched(argv, env, {"timeout": 3, "grace": 10})
    out, err = capfd.readouterr()
    assert rc == 130, out + err
    assert "stopped by the capture kernel's watchdog" in err
    assert f"{directive}: stopping it" in err
    for pid in pids.read_text().split():
        assert _gone(int(pid)), f"{directive}: process {pid} still runs"
    assert not (tmp_path / "d").exists()


def test_a_hanging_script_costs_itself_not_the_dump(tmp_path, capfd):
    """A pre- or post-script that hangs: the watchdog stopped the whole save, exit 130 and
    no dump, though KDUMP_CONTINUE_ON_ERROR=true (the default) says a failed script does
    not stop it. Now the save kills the script and goes on, telling /init (the line
    "resumed" on the heartbeat pipe), which takes back its SIGKILL: the dump is saved."""
    pids = tmp_path / "pids"
    command = f"sleep 1000 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    argv = [sys.executable, "-m", "kdump_capture", "save", "--config", "/nonexistent"]
    argv += ["--sample", "--no-reboot", "--set", f"KDUMP_SAVEDIR=file://{tmp_path}/d"]
    argv += ["--set", f"KDUMP_PRESCRIPT={command}", "--set", f"KDUMP_POSTSCRIPT={command}"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(INIT.parent.parent)}
    rc, _ = init.run_watched(argv, env, {"timeout": 3, "grace": 2})
    out, err = capfd.readouterr()
    assert rc == 0, out + err
    assert out.count("watchdog: the save stopped what made no progress and goes on") == 2
    for directive in ("KDUMP_PRESCRIPT", "KDUMP_POSTSCRIPT"):
        assert f"{directive} failed (stopped by the capture kernel's watchdog" in err
    assert len(os.listdir(tmp_path / "d")) == 1  # the dump
    assert "Dump saved: " in out
    for pid in pids.read_text().split():
        assert _gone(int(pid)), f"process {pid} still runs"


ALWAYS_RESUMES = """
import os, signal, time
fd = int(os.environ["KDUMP_HEARTBEAT_FD"])
signal.signal(signal.SIGUSR1, lambda *_: os.write(fd, b"resumed\\n"))
time.sleep(1000)
"""


def test_watchdog_after_resumed_watches_afresh(capsys):
    """A save that said "resumed" is not killed after the grace period; stuck again, it
    gets a new SIGUSR1 a whole timeout later. Twice at most (a pre- and a post-script):
    the third SIGUSR1 is followed by SIGKILL whatever the save says."""
    rc, took = _watched(ALWAYS_RESUMES, timeout=1.5, grace=1.0)
    out = capsys.readouterr().out
    assert rc == -signal.SIGKILL
    assert out.count("stopping it") == 3 and out.count("goes on") == 2, out
    assert "killing it" in out
    assert 5.0 <= took < 15.0, took


SANDBOX = """
import importlib.machinery, importlib.util, os, sys
loader = importlib.machinery.SourceFileLoader("kdump_capture_init", sys.argv[1])
spec = importlib.util.spec_from_loader(loader.name, loader)
init = importlib.util.module_from_spec(spec)
loader.exec_module(init)
# PID 1 of a new PID namespace, and reboot(2) replaced: nothing can reach the host's.
assert os.getpid() == 1, "not in a new PID namespace"


class Libc:
    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def reboot(self, cmd):
        print(f"FINAL ACTION {cmd:#x}", flush=True)
        os._exit(0)


init.libc = Libc(init.libc)
init.PLAN = sys.argv[2]
init.main()
"""


def test_init_reaches_its_final_action_after_a_hanging_save(tmp_path):
    """/init itself, as PID 1 of new PID and mount namespaces (its /proc, /sys and /dev
    mounts stay inside): the save hangs, the watchdog stops it, /init powers off."""
    plan = {
        "version": 1,
        "target": "file:///var/crash",
        "modules": [],
        "network": {"mode": "none"},
        "mounts": [],
        "save": [sys.executable, "-c", BEAT_THEN_HANG],
        "on_success": "reboot",
        "on_failure": "poweroff",
        "shell": "",
        "env": {"PATH": "/usr/bin"},
        "watchdog": {"timeout": 2, "grace": 2},
    }
    (tmp_path / "init.json").write_text(json.dumps(plan))
    r = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--kill-child", sys.executable, "-c", SANDBOX]
        + [str(INIT), str(tmp_path / "init.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any("watchdog: the save made no progress" in x for x in lines), r.stdout
    assert any(f"save finished with exit code -{signal.SIGUSR1}" in x for x in lines), r.stdout
    assert lines[-2].endswith("powering off")
    assert lines[-1] == f"FINAL ACTION {init.RB['poweroff']:#x}"


def _run_init(tmp_path: Path, plan: dict) -> subprocess.CompletedProcess:
    """/init with ``plan`` in new PID, mount and network namespaces (a network set-up, if
    the plan asks for one, finds no interface there and touches none of the host's)."""
    (tmp_path / "init.json").write_text(json.dumps(plan))
    return subprocess.run(
        ["unshare", "--mount", "--pid", "--net", "--fork", "--kill-child", sys.executable]
        + ["-c", SANDBOX, str(INIT), str(tmp_path / "init.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _a_disk() -> str:
    """A block device of this machine, as the kernel names it (/init only looks at it)."""
    names = sorted(os.listdir("/sys/class/block"))
    if not names:
        pytest.skip("no block device here")
    return f"/dev/{names[0]}"


def _real_save(savedir: str) -> list[str]:
    """The real CLI on a small built-in sample, as /init runs it."""
    argv = [sys.executable, "-m", "kdump_capture", "save", "--config", "/nonexistent"]
    argv += ["--sample", "--sample-mib", "4", "--no-reboot", "--progress", "lines"]
    return argv + ["--set", f"KDUMP_SAVEDIR={savedir}"]


def test_a_mount_point_left_unmounted_takes_no_directories(tmp_path):
    """Where no disk was found, mount() made no mount point, nor perhaps its parent: both
    are made, and the point is a file, under which the file target cannot create the
    directories that would put its dump in RAM."""
    mnt = tmp_path / "kdump" / "mnt0"
    init.block_mount_point(str(mnt), "no block device matches LABEL=x after 30 s")
    assert mnt.read_text() == "not mounted: no block device matches LABEL=x after 30 s\n"
    with pytest.raises(NotADirectoryError):
        os.makedirs(mnt / "var" / "crash")


@pytest.mark.parametrize("failing", ["network", "mount"])
def test_a_failed_network_or_mount_costs_only_its_targets(tmp_path, failing):
    """The network does not come up (no interface), or a local target's filesystem does not
    mount: /init says so and runs the save all the same, which saves to the target that
    works. The mount point that failed holds a file, so the save cannot write that target's
    dump into the capture kernel's RAM instead: that target fails, by name."""
    ok, mnt = tmp_path / "ok", tmp_path / "mnt0"
    plan = {
        "version": 1,
        "target": "file:///var/crash",
        "modules": [],
        "network": {"mode": "dhcp", "timeout": 1} if failing == "network" else {"mode": "none"},
        # a disk that is there, with a filesystem type that is not: mount(2) fails at once
        "mounts": (
            [{"source": _a_disk(), "fstype": "kdump-test-nofs", "target": str(mnt)}]
            if failing == "mount"
            else []
        ),
        "save": _real_save(
            (f"file://{mnt}/var/crash " if failing == "mount" else "") + f"file://{ok}"
        ),
        "on_success": "poweroff",
        "on_failure": "halt",
        "shell": "",
        "env": {"PATH": "/usr/bin", "PYTHONPATH": str(INIT.parent.parent)},
    }
    r = _run_init(tmp_path, plan)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    if failing == "network":
        assert "ERROR: network: no network interface found" in out
    else:
        assert f"ERROR: mount {_a_disk()} on {mnt} (kdump-test-nofs): No such device" in out
        assert f"{mnt}/var/crash" in r.stderr and "trying the next target" in r.stderr
        assert mnt.is_file() and not (mnt / "var").exists()
    assert "save finished with exit code 0" in out
    assert r.stdout.splitlines()[-1] == f"FINAL ACTION {init.RB['poweroff']:#x}"
    assert len(list(ok.glob("*/vmcore*"))) == 1


@pytest.mark.parametrize("present", [True, False], ids=["device-there", "device-missing"])
def test_init_with_a_dump_device_saves_to_it_and_stays_on_the_console(tmp_path, present):
    """The plan the builder writes for KDUMP_DUMPDEV (with KDUMP_IMMEDIATE_REBOOT=yes, the
    default), when KDUMP_SAVEDIR's filesystem is not there, which is what a dump device is
    for: /init neither waits for that filesystem nor brings up a network; it waits for the
    device (and says so when it does not come), runs the save, and opens the console for
    ``recover`` instead of rebooting."""
    from initramfs import builder
    from kdump_capture.config import load_config
    from kdump_capture.urls import parse_savedir

    device = _a_disk() if present else "/dev/kdump-test-absent"
    cfg = load_config(None, ["KDUMP_SAVEDIR=file:///var/crash", f"KDUMP_DUMPDEV={device}"])
    targets, _ = parse_savedir(cfg["KDUMP_SAVEDIR"])
    missing = builder.FileMount("LABEL=kdump-test-missing", "ext4", str(tmp_path / "m"), "crash")
    shell = tmp_path / "shell"
    shell.write_text("#!/bin/sh\necho CONSOLE SHELL\n")
    shell.chmod(0o755)
    net = builder.NetConfig("dhcp", timeout=1)
    plan = builder.init_plan(cfg, targets, [], net, [missing], str(shell))
    plan["save"] = [sys.executable, "-c", "print('SAVE RAN')"]  # the disk is not written
    if plan.get("dump_device"):
        plan["dump_device"]["timeout"] = 1
    t0 = time.monotonic()
    r = _run_init(tmp_path, plan)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 20  # no 30 s wait for the missing filesystem
    assert "no block device matches" not in r.stdout and "network" not in r.stdout
    if present:
        assert f"dump device {device} is there" in r.stdout
    else:
        assert (
            f"ERROR: dump device {device} (KDUMP_DUMPDEV) did not appear within 1 s "
            "(block devices here: "
        ) in r.stdout
    lines = r.stdout.splitlines()
    assert lines.index("SAVE RAN") < lines.index("CONSOLE SHELL") < len(lines) - 1
    assert lines[-1] == f"FINAL ACTION {init.RB['reboot']:#x}"  # when the shell is left
