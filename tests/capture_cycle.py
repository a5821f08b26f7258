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

import io
import re
import subprocess
import time
import uuid
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
python3 -I -m kdump_capture load $K --kernel /boot/vmlinuz --initrd /boot/capture.img \\
    || fail "kdump-capture load"
python3 -I -m kdump_capture status $K || fail "kdump-capture status"
echo "E2E-CRASHING"
python3 -I -m kdump_capture test-crash --yes $K
fail "still alive after test-crash"
"""

SAVED = re.compile(r"kdump-capture: \[ *[0-9.]+s\] save finished with exit code (-?\d+)")
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


def first_stage_image(
    kernel: vmkit.Kernel, capture: Path, marker: str, work: Path, loaded: Path | None = None
) -> Path:
    """The first kernel's image: our runtime (``capture``) plus an overlay with the loader
    script, busybox, the kernel and the image to load (``loaded``, default ``capture``)."""
    arc = cpio.Archive()
    arc.add_file("init-first", FIRST_INIT.replace("{marker}", marker).encode(), 0o755)
    # the capture image has busybox only when its config may open a shell
    arc.add_file("usr/bin/busybox", vmkit.find_busybox().read_bytes(), 0o755)
    arc.add_file("boot/vmlinuz", kernel.vmlinuz.read_bytes())
    arc.add_file("boot/capture.img", (loaded or capture).read_bytes())
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
) -> CycleResult:
    """One cycle; ``loaded`` is a capture image built elsewhere (dracut) to load instead of
    ours (ours is still built: the first kernel's load side runs from it)."""
    work.mkdir(parents=True, exist_ok=True)
    marker = f"KDUMP-CAPTURE-E2E-{uuid.uuid4().hex}"
    capture, report = build_capture(
        kernel, config_text, work, target_device=target_device, target_fstype=target_fstype
    )
    first = first_stage_image(kernel, capture, marker, work, loaded)
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
