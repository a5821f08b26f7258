"""End to end in a real kernel: load with our loader, crash, capture with our initramfs,
check the dump on the host (manifest SHA-256, the dmesg marker found by makedumpfile, or by
our reader for zstd, which Debian's makedumpfile lacks; dmesg.txt), the progress lines on the
serial console, and the estimate the first kernel printed.

The slow matrix (issue 12): every target with each of kdump-compressed (zlib) and zstd at
level 31 and ELF at level 0, in a 1 GiB guest at crashkernel=160M; file and SFTP also at
128M with compressed level 31. bench/capture_fitness.py finds the smallest reservations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import capture_cycle, nfs_ganesha, vmkit

pytestmark = pytest.mark.vm

LABEL = capture_cycle.DISK_LABEL
LOCAL_CONFIG = """\
KDUMP_SAVEDIR="file:///var/crash"
KDUMP_IMMEDIATE_REBOOT="yes"
KDUMP_KEEP_OLD_DUMPS="0"
KDUMP_FREE_DISK_SIZE="0"
KDUMP_VERBOSE="7"
"""
# KDUMP_VERBOSE=7: `load` prints its command (bit 4) and logs it (bit 1); the first stage
# has no syslog, so it goes to the kernel log, and so into the crashed kernel's dmesg.
LOAD_COMMAND = "load command: kexec_file_load kernel=/boot/vmlinuz initrd=/boot/capture.img"


def check_dump(dumpdir: Path, marker: str, vmcore_name: str = "vmcore", zstd: bool = False):
    """The dump is complete: manifest checksums match, makedumpfile (our own reader for
    zstd, which Debian's makedumpfile lacks) finds the marker in the vmcore."""
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "verify", str(dumpdir)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"verify failed: {r.stdout}{r.stderr}"
    assert marker in (dumpdir / "dmesg.txt").read_text(errors="replace")
    if zstd:
        r = subprocess.run(
            [sys.executable, "-m", "kdump_capture", "dmesg", str(dumpdir / vmcore_name)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and marker in r.stdout, r.stderr
        return
    out = dumpdir.parent / "makedumpfile-dmesg.txt"
    out.unlink(missing_ok=True)
    vmcore = dumpdir / vmcore_name
    with open(vmcore, "rb") as f:
        flattened = f.read(16).rstrip(b"\0") == b"makedumpfile"
    if flattened:  # FTP cannot seek: makedumpfile's flattened format, rebuilt by its own -R
        rebuilt = dumpdir.parent / "vmcore.rearranged"
        rebuilt.unlink(missing_ok=True)
        with open(vmcore, "rb") as f:
            r = subprocess.run(["makedumpfile", "-R", str(rebuilt)], stdin=f, capture_output=True)
        assert r.returncode == 0, r.stdout + r.stderr
        vmcore = rebuilt
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(vmcore), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert marker in out.read_text(errors="replace")


def _explain(res: capture_cycle.CycleResult) -> str:
    tail = "\n".join(res.console.splitlines()[-40:])
    return f"console log {res.log_path}:\n{tail}"


def check_console(res: capture_cycle.CycleResult) -> None:
    """What an admin sees on the serial console: progress while a long save runs, and the
    estimate the first kernel printed."""
    assert res.estimate, _explain(res)
    if (res.save_seconds or 0) > 30:
        assert res.progress_lines >= 3, _explain(res)


def test_local_file_target_on_virtio_disk(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    disk = capture_cycle.make_ext4_disk(tmp_path / "disk.img", 2048, LABEL)
    res = capture_cycle.run_cycle(
        cloud_kernel,
        LOCAL_CONFIG,
        tmp_path / "cycle",
        drives=(disk,),
        target_device=f"LABEL={LABEL}",
        target_fstype="ext4",
    )
    assert res.save_rc == 0, _explain(res)
    assert res.finish == "rebooting", _explain(res)
    assert res.returncode == 0, _explain(res)  # -no-reboot: the reboot ended qemu
    crash = capture_cycle.extract_from_ext4(disk.path, "/var/crash", tmp_path / "out")
    dumps = [d for d in crash.iterdir() if d.is_dir()]
    assert len(dumps) == 1, list(crash.iterdir())
    check_dump(dumps[0], res.marker)
    assert LOAD_COMMAND in res.console, _explain(res)  # bit 4: stdout
    dmesg = (dumps[0] / "dmesg.txt").read_text(errors="replace")
    assert f"]: {LOAD_COMMAND}" in dmesg  # bit 1: "kdump-capture[PID]: load command: ..."
    check_console(res)


DUMPDEV_CONFIG = """\
KDUMP_SAVEDIR="file:///var/crash"
KDUMP_DUMPDEV="/dev/vda"
KDUMP_DUMPFORMAT="compressed"
KDUMP_DUMPLEVEL="31"
KDUMP_IMMEDIATE_REBOOT="yes"
KDUMP_VERBOSE="7"
"""


@pytest.mark.slow
def test_dump_device_then_recover(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    """KDUMP_DUMPDEV in a real capture kernel: the image waits for the disk, writes the dump
    raw onto it and stays on the console (whatever KDUMP_IMMEDIATE_REBOOT says); back in
    the system, `kdump-capture recover` copies it from the device (here its image file, as
    kdump-capture-recover.service would from the disk) into KDUMP_SAVEDIR."""
    dev = tmp_path / "dumpdev.img"
    with open(dev, "wb") as f:
        f.truncate(256 << 20)
    res = capture_cycle.run_cycle(
        cloud_kernel,
        DUMPDEV_CONFIG,
        tmp_path / "cycle",
        drives=(vmkit.Drive(dev),),
        stop_at=r"starting a shell on the console",
        setup=capture_cycle.LOAD_DISK_DRIVERS,
    )
    assert res.save_rc == 0, _explain(res)
    assert "Dump written to /dev/vda" in res.console, _explain(res)
    assert "starting a shell on the console" in res.console and res.finish is None, _explain(res)
    out = tmp_path / "recovered"
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "recover", "--config", "/nonexistent"]
        + ["--device", str(dev), "--set", f"KDUMP_SAVEDIR=file://{out}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    [dumpdir] = [d for d in out.iterdir() if d.is_dir()]
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "verify", str(dumpdir)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    dmesg = tmp_path / "makedumpfile-dmesg.txt"
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(dumpdir / "vmcore"), str(dmesg)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert res.marker in dmesg.read_text(errors="replace")


def sftp_config(server, dumps: Path) -> str:
    """Dump over SFTP to the test sshd; the guest reaches the host's loopback at 10.0.2.2."""
    return (
        f'KDUMP_SAVEDIR="sftp://root@10.0.2.2:{server.port}{dumps}"\n'
        f'KDUMP_HOST_KEY="{server.host_key}"\n'
        f'KDUMP_SSH_IDENTITY="{server.client_key}"\n'
        'KDUMP_IMMEDIATE_REBOOT="yes"\n'
        'KDUMP_KEEP_OLD_DUMPS="0"\n'
        'KDUMP_NET_TIMEOUT="30"\n'
    )


def test_sftp_to_openssh_on_host_loopback(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    servers = pytest.importorskip(
        "tests.servers.sshd", reason="the sshd fixture (tests/servers, branch net) is not merged"
    )
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with servers.sshd(str(tmp_path / "sshd")) as server:
        res = capture_cycle.run_cycle(
            cloud_kernel, sftp_config(server, dumps), tmp_path / "cycle", net=True
        )
    assert res.save_rc == 0, _explain(res)
    assert "network: " in res.console and "(dhcp," in res.console, _explain(res)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    found = [d for d in dumps.iterdir() if d.is_dir()]
    assert len(found) == 1, list(dumps.iterdir())
    check_dump(found[0], res.marker)
    check_console(res)


MATRIX = [
    *[(kind, fmt, 160) for kind in capture_cycle.TARGET_KINDS for fmt in capture_cycle.FORMATS],
    ("file", "compressed", 128),
    ("sftp", "compressed", 128),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fmt", "crashkernel"), MATRIX, ids=lambda v: str(v))
def test_capture_matrix(kind: str, fmt: str, crashkernel: int, cloud_kernel, tmp_path: Path):
    """A whole cycle completes for this target, format and reservation, in a 1 GiB guest."""
    res, dumps = capture_cycle.matrix_cycle(cloud_kernel, kind, fmt, crashkernel, tmp_path)
    assert res.save_rc == 0, _explain(res)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    assert len(dumps) == 1, dumps
    check_dump(dumps[0], res.marker, zstd=fmt == "zstd")
    check_console(res)


@pytest.mark.slow
def test_nfs_server_that_stops_answering_mid_dump(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    """ganesha is frozen (SIGSTOP: connections stay open, nothing answers) once the vmcore is
    streaming. The soft mount fails the writes after about KDUMP_NET_TIMEOUT (else the
    watchdog stops the save): the capture kernel still reboots, and says why."""
    export = tmp_path / "export"
    frozen: list[int] = []
    done = threading.Event()

    def freeze_when_streaming() -> None:
        pidfile = tmp_path / "ganesha.pid"
        while not done.wait(0.2):
            streaming = [
                f
                for root, _, files in os.walk(export)
                for f in files
                if f.startswith(".kdump-tmp.vmcore")
                and os.path.getsize(os.path.join(root, f)) > 64 << 20
            ]
            if streaming and pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                return

    config = (
        'KDUMP_SAVEDIR="nfs://10.0.2.2/dumps"\nKDUMP_IMMEDIATE_REBOOT="yes"\n'
        'KDUMP_NET_TIMEOUT="10"\nKDUMP_SAVE_TIMEOUT="90"\nKDUMP_FREE_DISK_SIZE="0"\n'
    )
    watcher = threading.Thread(target=freeze_when_streaming, daemon=True)
    with nfs_ganesha.ganesha(str(tmp_path), str(export)):
        watcher.start()
        t0 = time.monotonic()
        try:
            res = capture_cycle.run_cycle(
                cloud_kernel, config, tmp_path / "cycle", net=True, timeout=600
            )
        finally:
            done.set()
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        took = time.monotonic() - t0
    assert frozen, "the dump never streamed to the export: " + _explain(res)
    assert res.save_rc not in (None, 0), _explain(res)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    assert took < 600, took
    for d in (d for d in export.iterdir() if d.is_dir()):  # nothing incomplete looks complete
        assert not (d / "vmcore").exists(), list(d.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("served", ["4.0", "3"])
def test_an_nfs_server_without_nfsv4_1(served: str, cloud_kernel: vmkit.Kernel, tmp_path: Path):
    """A server that speaks only NFSv4.0 (an older one), or only NFSv3 (a NAS with its
    defaults): the save negotiates down as mount.nfs does, and the dump is complete. It runs
    in a network and mount namespace of its own (tests/nfs_isolated.py): NFSv3 needs rpcbind
    on port 111."""
    config = (
        'KDUMP_SAVEDIR="nfs://10.0.2.2/dumps"\nKDUMP_IMMEDIATE_REBOOT="yes"\n'
        'KDUMP_FREE_DISK_SIZE="0"\nKDUMP_DUMPFORMAT="compressed"\nKDUMP_DUMPLEVEL="31"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, "-m", "tests.nfs_isolated", str(tmp_path), served, config]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    console = Path(result["log_path"]).read_text(errors="replace")
    tail = "\n".join(console.splitlines()[-40:])
    assert result["save_rc"] == 0, tail
    assert result["finish"] == "rebooting" and result["returncode"] == 0, tail
    assert f"(vers={served}," in console, tail  # the version it mounted with
    dumps = [d for d in (tmp_path / "export").iterdir() if d.is_dir()]
    assert len(dumps) == 1, dumps
    check_dump(dumps[0], result["marker"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("export_mode", "squash", "read_only"),
    [(0o1777, True, False), (0o755, True, False), (0o755, False, True)],
    ids=["root_squash, writable", "root_squash, root's directory", "read-only export"],
)
def test_nfs_exports_as_admins_set_them_up(
    export_mode: int, squash: bool, read_only: bool, cloud_kernel: vmkit.Kernel, tmp_path: Path
):
    """root_squash (most servers' default: the capture kernel's root writes as the
    anonymous user) with a directory it may write: the dump is saved, private (0700, 0600)
    as everywhere. With root's own directory, or a read-only export: the save fails (exit
    6), saying why in terms of the export, not of a private mount point; the machine
    reboots."""
    export = tmp_path / "export"
    export.mkdir()
    export.chmod(export_mode)
    config = (
        'KDUMP_SAVEDIR="nfs://10.0.2.2/dumps"\nKDUMP_IMMEDIATE_REBOOT="yes"\n'
        'KDUMP_FREE_DISK_SIZE="0"\nKDUMP_DUMPFORMAT="compressed"\nKDUMP_DUMPLEVEL="31"\n'
    )
    with nfs_ganesha.ganesha(str(tmp_path), str(export), root_squash=squash, read_only=read_only):
        res = capture_cycle.run_cycle(cloud_kernel, config, tmp_path / "cycle", net=True)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    dumps = [d for d in export.iterdir() if d.is_dir()]
    if export_mode == 0o1777:
        assert res.save_rc == 0, _explain(res)
        assert len(dumps) == 1
        assert dumps[0].stat().st_mode & 0o777 == 0o700
        assert {f.stat().st_mode & 0o777 for f in dumps[0].iterdir()} == {0o600}
        check_dump(dumps[0], res.marker)
        return
    assert res.save_rc == 6 and not dumps, _explain(res)
    why = "the export is read-only" if read_only else "root_squash"
    assert "target directory 10.0.2.2:/dumps is not writable (" in res.console, _explain(res)
    assert why in res.console, _explain(res)
    assert (
        "kdump-nfs-" not in res.console.split("mounted 10.0.2.2:/dumps on", 1)[1].split("\n", 1)[1]
    ), _explain(res)


def test_s3_compressed_to_seaweedfs_at_160m(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    """The capture kernel dumps (compressed, level 31: flattened) through qemu's user network
    to SeaweedFS on the host; checked in place with ``verify URL`` and with makedumpfile on
    the rearranged file."""
    from tests.servers.s3 import seaweed

    with seaweed(str(tmp_path / "weed")) as s3:
        keys = f'KDUMP_S3_ACCESS_KEY="{s3.access_key}"\nKDUMP_S3_SECRET_KEY="{s3.secret_key}"\n'
        config = (
            f'KDUMP_SAVEDIR="s3+http://10.0.2.2:{s3.port}/{s3.bucket}/vm"\n{keys}'
            'KDUMP_DUMPFORMAT="compressed"\nKDUMP_DUMPLEVEL="31"\n'
            'KDUMP_IMMEDIATE_REBOOT="yes"\nKDUMP_KEEP_OLD_DUMPS="0"\n'
        )
        res = capture_cycle.run_cycle(
            cloud_kernel, config, tmp_path / "cycle", crashkernel_mib=160, net=True
        )
        assert res.save_rc == 0, _explain(res)
        assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
        assert s3.secret_key not in res.console
        for line in res.console.splitlines():  # figures for bench notes (pytest -s)
            if "save finished" in line or "upload parts" in line:
                print(line.strip())
        print(f"panic to committed dump: {res.panic_to_saved:.0f} s; image {res.report.summary()}")
        dumps = sorted({k.split("/")[1] for k in s3.keys("vm/")})
        assert len(dumps) == 1, dumps
        name = dumps[0]
        assert s3.uploads("vm/") == []
        conf = tmp_path / "host.conf"
        conf.write_text(keys)
        r = subprocess.run(
            [sys.executable, "-m", "kdump_capture", "verify", "--config", str(conf)]
            + [s3.url(f"vm/{name}", creds=False)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"verify failed: {r.stdout}{r.stderr}"
        assert res.marker in s3.get(f"vm/{name}/dmesg.txt").decode(errors="replace")
        flat = tmp_path / "vmcore.flat"
        flat.write_bytes(s3.get(f"vm/{name}/vmcore"))
    dump = tmp_path / "vmcore"
    with flat.open("rb") as stream:
        r = subprocess.run(["makedumpfile", "-R", str(dump)], stdin=stream, capture_output=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "makedumpfile-dmesg.txt"
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(dump), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert res.marker in out.read_text(errors="replace")


@pytest.mark.slow
def test_encrypted_sftp_at_160m(cloud_kernel: vmkit.Kernel, tmp_path: Path):
    """Issue 11: the capture kernel encrypts to an age key (compressed, level 31: written
    flattened) over SFTP at crashkernel=160M; the host decrypts with Debian's `age` and
    makedumpfile reads the dump; no stored file holds the marker in plain text."""
    from tests.servers.sshd import sshd

    key = tmp_path / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    pub = next(ln.split(": ")[1] for ln in key.read_text().splitlines() if "public key" in ln)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with sshd(str(tmp_path / "sshd")) as server:
        config = sftp_config(server, dumps) + (
            f'KDUMP_ENCRYPT_TO="{pub.strip()}"\n'
            'KDUMP_DUMPFORMAT="compressed"\nKDUMP_DUMPLEVEL="31"\n'
        )
        res = capture_cycle.run_cycle(
            cloud_kernel, config, tmp_path / "cycle", crashkernel_mib=160, net=True
        )
    assert res.save_rc == 0, _explain(res)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    assert b"AGE-SECRET-KEY" not in (tmp_path / "cycle" / "capture.img").read_bytes()
    for line in res.console.splitlines():  # figures for notes (pytest -s)
        if "save finished" in line:
            print(line.strip())
    print(f"panic to committed dump: {res.panic_to_saved:.0f} s; image {res.report.summary()}")
    [d] = [d for d in dumps.iterdir() if d.is_dir()]
    names = sorted(os.listdir(d))
    assert names == [
        "README.txt",
        "dmesg.txt.age",
        "manifest.json",
        "summary.txt.age",
        "vmcore.age",
    ]
    for name in names:
        assert res.marker.encode() not in (d / name).read_bytes(), name
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "verify", str(d)], capture_output=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    flat = tmp_path / "vmcore.flat"
    with flat.open("wb") as out:
        r = subprocess.run(["age", "-d", "-i", str(key), str(d / "vmcore.age")], stdout=out)
    assert r.returncode == 0
    dump = tmp_path / "vmcore"
    with flat.open("rb") as stream:
        r = subprocess.run(["makedumpfile", "-R", str(dump)], stdin=stream, capture_output=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "makedumpfile-dmesg.txt"
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(dump), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert res.marker in out.read_text(errors="replace")
