"""One whole kdump cycle in a TCG guest, driven by our own tools (used by the end-to-end
tests and bench/capture_fitness.py).

First kernel (booted with ``crashkernel=``): a small busybox script, ``/init-first``, writes a
marker to /dev/kmsg and runs our packed Python: ``kdump-capture load`` (kexec_file_load of
the cloud kernel with the capture initramfs built by ``initramfs.builder``), then
``kdump-capture test-crash --yes``. The capture kernel boots that initramfs; its /init saves
the dump and finishes as configured. The first kernel's image is the capture image itself
plus an uncompressed overlay archive (the kernel unpacks concatenated archives), so the
load side runs with exactly the runtime the capture uses.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from initramfs import builder, cpio
from kdump_capture.config import load_config
from tests import vmkit

FIRST_INIT = """#!/usr/bin/busybox sh
/usr/bin/busybox mount -t proc proc /proc
/usr/bin/busybox mount -t sysfs sysfs /sys
/usr/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
export PATH=/usr/bin HOME=/root
fail() { echo "E2E-FAIL: $*"; /usr/bin/busybox poweroff -f; sleep 5; }
echo "E2E-STAGE first"
echo "{marker}" >/dev/kmsg
K="--config /etc/sysconfig/kdump"
{setup}
if [ -e /boot/capture.img.inputs.json ]; then  # our image (dracut's has no record)
    python3 -I -m kdump_capture estimate $K --initrd /boot/capture.img \\
        || fail "kdump-capture estimate"
fi
python3 -I -m kdump_capture load $K --kernel /boot/vmlinuz --initrd /boot/capture.img \\
    || fail "kdump-capture load"
python3 -I -m kdump_capture status $K || fail "kdump-capture status"
echo "E2E-CRASHING"
python3 -I -m kdump_capture test-crash --yes $K
fail "still alive after test-crash"
"""

SAVED = re.compile(r"kdump-capture: \[ *[0-9.]+s\] save finished with exit code (-?\d+)")
ESTIMATE = re.compile(r"recommended: crashkernel=(\d+)M")
SAVE_TIME = re.compile(r"save finished with exit code -?\d+ after ([0-9.]+) s")
# A progress line of the save on the serial console (kdump_capture.progress.LineProgress).
PROGRESS = re.compile(r"^vmcore: +\d+% \d+/\d+ MB, [0-9.]+ MB/s, (ETA|done in) ", re.M)
FINISH = re.compile(r"kdump-capture: \[ *[0-9.]+s\] (rebooting|powering off|halting)")


@dataclass
class CycleResult:
    console: str
    returncode: int | None
    marker: str
    save_rc: int | None
    finish: str | None
    panic_to_saved: float | None  # host wall time from "crashing" to "save finished"
    total: float
    report: builder.BuildReport
    log_path: Path

    @property
    def estimate(self) -> int | None:
        """crashkernel= in MiB that ``kdump-capture estimate`` printed in the first kernel."""
        m = ESTIMATE.search(self.console)
        return int(m.group(1)) if m else None

    @property
    def save_seconds(self) -> float | None:
        """How long the save ran, as /init measured it in the capture kernel."""
        m = SAVE_TIME.search(self.console)
        return float(m.group(1)) if m else None

    @property
    def progress_lines(self) -> int:
        return len(PROGRESS.findall(self.console))


def build_capture(
    kernel: vmkit.Kernel,
    config_text: str,
    work: Path,
    *,
    target_device: str = "",
    target_fstype: str = "",
) -> tuple[Path, builder.BuildReport]:
    conf = work / "kdump.conf"
    conf.write_text(config_text)
    cfg = load_config(str(conf))
    out = work / "capture.img"
    report = builder.build(
        cfg,
        str(out),
        kernel_version=kernel.version,
        modules_root=str(kernel.modules_root),
        target_device=target_device,
        target_fstype=target_fstype,
    )
    return out, report


# For the first stage: load the capture image's kernel modules (its disk drivers), as a
# real system has its disks when kdump is loaded (`load` checks a KDUMP_DUMPDEV device).
LOAD_DISK_DRIVERS = """\
python3 -I -c 'import importlib.machinery as m, importlib.util as u, json
s = u.spec_from_loader("i", m.SourceFileLoader("i", "/init"))
i = u.module_from_spec(s)
s.loader.exec_module(i)
i.load_modules(json.load(open("/etc/kdump-capture/init.json"))["modules"])' \\
    || fail "loading the disk drivers"
"""


def first_stage_image(
    kernel: vmkit.Kernel,
    capture: Path,
    marker: str,
    work: Path,
    loaded: Path | None = None,
    setup: str = "",
) -> Path:
    """The first kernel's image: our runtime (``capture``) plus an overlay with the loader
    script, busybox, the kernel and the image to load (``loaded``, default ``capture``).
    ``setup``: shell lines the first stage runs before loading (LOAD_DISK_DRIVERS)."""
    arc = cpio.Archive()
    script = FIRST_INIT.replace("{marker}", marker).replace("{setup}", setup)
    arc.add_file("init-first", script.encode(), 0o755)
    # the capture image has busybox only when its config may open a shell
    arc.add_file("usr/bin/busybox", vmkit.find_busybox().read_bytes(), 0o755)
    arc.add_file("boot/vmlinuz", kernel.vmlinuz.read_bytes())
    arc.add_file("boot/capture.img", (loaded or capture).read_bytes())
    if loaded is None:  # our builder's record beside the image: what ``estimate`` reads
        record = capture.with_name(capture.name + ".inputs.json")
        arc.add_file("boot/capture.img.inputs.json", record.read_bytes(), 0o600)
    buf = io.BytesIO()
    arc.write(buf)
    first = work / "first.img"
    # overlay first (uncompressed newc), then the capture image (zstd): both are unpacked
    first.write_bytes(buf.getvalue() + capture.read_bytes())
    return first


def run_cycle(
    kernel: vmkit.Kernel,
    config_text: str,
    work: Path,
    *,
    crashkernel_mib: int = 160,
    mem_mib: int = 1024,
    drives: tuple[vmkit.Drive, ...] = (),
    net: bool = False,
    target_device: str = "",
    target_fstype: str = "",
    timeout: float = 420.0,
    loaded: Path | None = None,
    stop_at: str | None = None,
    setup: str = "",
) -> CycleResult:
    """One cycle; ``loaded`` is a capture image built elsewhere (dracut) to load instead of
    ours (ours is still built: the first kernel's load side runs from it). ``stop_at``: a
    console pattern after the save (a shell waiting on the console, which nobody types
    into here) at which the guest is stopped."""
    work.mkdir(parents=True, exist_ok=True)
    marker = f"KDUMP-CAPTURE-E2E-{uuid.uuid4().hex}"
    capture, report = build_capture(
        kernel, config_text, work, target_device=target_device, target_fstype=target_fstype
    )
    first = first_stage_image(kernel, capture, marker, work, loaded, setup)
    append = f"console=ttyS0 quiet crashkernel={crashkernel_mib}M rdinit=/init-first panic=-1"
    log_path = work / "console.log"
    started = time.monotonic()
    crashed = saved_at = None
    save_rc = None
    with vmkit.Guest(
        kernel.vmlinuz, first, append, log_path, mem_mib=mem_mib, drives=drives, net=net
    ) as guest:
        try:
            guest.wait_for(r"E2E-CRASHING", timeout=120)
            crashed = time.monotonic()
            m = guest.wait_for(SAVED, timeout=timeout)
            saved_at = time.monotonic()
            save_rc = int(m.group(1))
            if stop_at is not None:
                guest.wait_for(stop_at, timeout=60)
                guest.kill()
        except vmkit.VmError:
            pass  # reported below from the console
        result = guest.wait(timeout=60)
    console = result.console
    fm = FINISH.search(console)
    return CycleResult(
        console=console,
        returncode=result.returncode,
        marker=marker,
        save_rc=save_rc,
        finish=fm.group(1) if fm else None,
        panic_to_saved=(saved_at - crashed) if crashed and saved_at else None,
        total=time.monotonic() - started,
        report=report,
        log_path=log_path,
    )


def make_ext4_disk(path: Path, size_mib: int, label: str) -> vmkit.Drive:
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True)
    return vmkit.Drive(path)


def extract_from_ext4(image: Path, src: str, dest: Path) -> Path:
    """Copy a directory out of an ext4 image with debugfs (no mount needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["debugfs", "-R", f"rdump {src} {dest}", str(image)], capture_output=True, text=True
    )
    out = dest / Path(src).name
    if r.returncode != 0 or not out.exists():
        raise AssertionError(f"debugfs rdump {src} failed: {r.stderr}")
    return out


# -- the targets of the VM matrix (shared by tests/test_e2e_vm.py and bench) ---------------
TARGET_KINDS = ("file", "sftp", "ftp", "nfs", "cifs", "s3")
# KDUMP_DUMPFORMAT and KDUMP_DUMPLEVEL of the matrix's formats (issue 12: the ones admins use)
FORMATS = {"compressed": ("compressed", 31), "zstd": ("zstd", 31), "elf": ("ELF", 0)}
DISK_LABEL = "kdumpdisk"
COMMON = 'KDUMP_IMMEDIATE_REBOOT="yes"\nKDUMP_KEEP_OLD_DUMPS="0"\nKDUMP_FREE_DISK_SIZE="0"\n'


@dataclass
class TargetSetup:
    """A running target: the config lines that point at it, what run_cycle needs for it,
    and how to get the dump directories onto the host afterwards."""

    config: str
    cycle_args: dict
    fetch: object  # () -> list[Path] of dump directories


@contextlib.contextmanager
def serve_target(kind: str, work: Path) -> Iterator[TargetSetup]:
    """Start the server for ``kind`` (file: an ext4 virtio disk) on the host's loopback."""
    work.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        disk = make_ext4_disk(work / "disk.img", 2048, DISK_LABEL)

        def fetch_disk() -> list[Path]:
            crash = extract_from_ext4(disk.path, "/var/crash", work / "out")
            return [d for d in crash.iterdir() if d.is_dir()]

        yield TargetSetup(
            'KDUMP_SAVEDIR="file:///var/crash"\n',
            {"drives": (disk,), "target_device": f"LABEL={DISK_LABEL}", "target_fstype": "ext4"},
            fetch_disk,
        )
        return
    dumps = work / "dumps"

    def fetch() -> list[Path]:
        return [d for d in dumps.iterdir() if d.is_dir()] if dumps.is_dir() else []

    net = {"net": True}
    if kind == "sftp":
        from tests.servers.sshd import sshd

        dumps.mkdir()
        with sshd(str(work / "sshd")) as s:
            yield TargetSetup(
                f'KDUMP_SAVEDIR="sftp://root@10.0.2.2:{s.port}{dumps}"\n'
                f'KDUMP_HOST_KEY="{s.host_key}"\nKDUMP_SSH_IDENTITY="{s.client_key}"\n'
                'KDUMP_NET_TIMEOUT="30"\n',
                net,
                fetch,
            )
    elif kind == "ftp":
        from tests.servers.ftp import pyftpd

        (work / "ftpd").mkdir()
        with pyftpd(str(work / "ftpd"), str(work / "ftproot")) as s:
            dumps = work / "ftproot" / "dumps"
            yield TargetSetup(
                f'KDUMP_SAVEDIR="ftp://{s.user}:{s.password}@10.0.2.2:{s.port}/dumps"\n',
                net,
                fetch,
            )
    elif kind == "cifs":
        from tests.servers.samba import smbd

        with smbd(str(work / "smbd"), str(work / "share")) as s:
            dumps = work / "share" / "dumps"
            yield TargetSetup(
                f'KDUMP_SAVEDIR="cifs://{s.user}:{s.password}@10.0.2.2:{s.port}/{s.share}/dumps"\n',
                net,
                fetch,
            )
    elif kind == "s3":
        from tests.servers.s3 import seaweed

        with seaweed(str(work / "weed")) as s:

            def fetch_objects() -> list[Path]:
                """Each dump's objects, downloaded into a directory of its own (the empty
                object that stands for the directory itself is skipped)."""
                names = set()
                for key in s.keys("vm/"):
                    parts = key.split("/", 2)
                    if key.endswith("/") or len(parts) < 3:
                        continue
                    name, rel = parts[1], parts[2]
                    path = dumps / name / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    s.client().download_file(s.bucket, key, str(path))
                    names.add(name)
                return [dumps / n for n in sorted(names)]

            yield TargetSetup(
                f'KDUMP_SAVEDIR="s3+http://10.0.2.2:{s.port}/{s.bucket}/vm"\n'
                f'KDUMP_S3_ACCESS_KEY="{s.access_key}"\nKDUMP_S3_SECRET_KEY="{s.secret_key}"\n',
                net,
                fetch_objects,
            )
    elif kind == "nfs":
        from tests import nfs_ganesha

        with nfs_ganesha.ganesha(str(work), str(dumps)):
            yield TargetSetup('KDUMP_SAVEDIR="nfs://10.0.2.2/dumps"\n', net, fetch)
    else:
        raise ValueError(f"unknown target kind {kind!r}")


# Settings admins add to a format (a case "compressed+encrypt+sha256"): what they cost the
# capture kernel is what bench/capture_fitness.py measures with them.
VARIANTS = ("encrypt", "sha256")


def age_recipient(work: Path) -> str:
    """A new age key pair in ``work`` (Debian's age-keygen); its public key."""
    key = work / "age.key"
    if not key.exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    return next(
        ln.split(": ")[1].strip() for ln in key.read_text().splitlines() if "public key" in ln
    )


def format_config(fmt: str, work: Path | None = None) -> str:
    """The config lines of a matrix format, with its variants (``encrypt`` needs ``work``
    for its key)."""
    base, *variants = fmt.split("+")
    name, level = FORMATS[base]
    out = f'KDUMP_DUMPFORMAT="{name}"\nKDUMP_DUMPLEVEL="{level}"\n'
    for v in variants:
        if v == "sha256":
            out += 'KDUMP_CHECKSUM="sha256"\n'
        elif v == "encrypt" and work is not None:
            out += f'KDUMP_ENCRYPT_TO="{age_recipient(work)}"\n'
        else:
            raise ValueError(f"unknown format variant {v!r} (known: {', '.join(VARIANTS)})")
    return out


def matrix_cycle(
    kernel: vmkit.Kernel, kind: str, fmt: str, crashkernel_mib: int, work: Path
) -> tuple[CycleResult, list[Path]]:
    """One cycle of the matrix: ``kind`` target, ``fmt`` format, this reservation; returns
    the result and the dump directories found on the target afterwards."""
    with serve_target(kind, work / "target") as t:
        res = run_cycle(
            kernel,
            t.config + format_config(fmt, work) + COMMON,
            work / "cycle",
            crashkernel_mib=crashkernel_mib,
            # ELF at level 0 over SFTP is 947 MB at 2-10 MB/s under TCG (emulated crypto)
            timeout=900.0,
            **t.cycle_args,
        )
        dumps = t.fetch() if res.save_rc == 0 else []
    return res, dumps
