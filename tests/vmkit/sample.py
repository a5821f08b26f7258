"""Generate (and cache) real vmcore samples: crash a TCG guest and keep its /proc/vmcore.

The guest boots Debian's cloud kernel with ``crashkernel=``, fills memory with known
content, writes a marker line to /dev/kmsg, loads itself as capture kernel with
``kexec_file_load`` and crashes with sysrq-c. The capture kernel copies /proc/vmcore
raw onto a virtio disk; the host cuts that disk to the ELF's length.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import cache_dir, file_lock
from .initrd import busybox_tree, compile_static, find_busybox, pack_cpio
from .kernel import Kernel, get_kernel
from .qemu import Drive, Guest, VmError

log = logging.getLogger(__name__)

# Bump when the guest recipe changes in a way the hashed inputs below do not capture.
GENERATOR_VERSION = 1
GUEST_DIR = Path(__file__).parent / "guest"
MODULES = ("virtio_ring", "virtio", "virtio_pci", "virtio_blk")
MARKER_PREFIX = "KDUMP-CAPTURE-MARKER"
PAGE = 4096
# The data disk's content, read through the page cache in the first kernel.
DISK_BLOCK_MAGIC = b"KDCPDISK"
DISK_BLOCK_FILL = 0x5C
# 192 MiB: the capture kernel with this busybox initramfs needs far less, but it is the
# value measured to leave room for a Python payload (see ENVIRONMENT.md).
DEFAULT_CRASHKERNEL_MIB = 192
# panic=-1 plus qemu's -no-reboot: any unplanned panic ends the guest at once.
FIRST_CMDLINE = "console=ttyS0 crashkernel={crashkernel_mib}M panic=-1 vmkit_stage=first"
# The usual kdump capture options; init.sh tells the stages apart by vmkit_stage=.
CAPTURE_CMDLINE = "console=ttyS0 irqpoll nr_cpus=1 reset_devices panic=-1 vmkit_stage=capture"

_ELF_IDENT = struct.Struct("<4sBBBBB7x")
_ELF64_EHDR_TAIL = struct.Struct("<HHIQQQIHHHHHH")  # e_type .. e_shstrndx, after e_ident
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
ET_CORE = 4
EM_X86_64 = 62


class SampleError(VmError):
    """Sample generation failed; the message says which step and quotes the console."""


@dataclass(frozen=True)
class Sample:
    """A cached real vmcore (ELF, exactly as /proc/vmcore read it) and what is in it."""

    path: Path
    marker: str  # the full line written to /dev/kmsg, e.g. "KDUMP-CAPTURE-MARKER 3f..."
    kernel_version: str
    vmlinuz: Path
    mem_mib: int
    crashkernel_mib: int
    size: int
    sha256: str
    sidecar: Path
    meta: dict[str, Any]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def elf_core_length(path: Path) -> int:
    """Length an ELF64 x86_64 core at the start of *path* really has: the end of its
    last segment (max ``p_offset + p_filesz``). Raises SampleError if it is no core."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        magic, cls, data, _ver, _abi, _abiver = _ELF_IDENT.unpack_from(head)
        if magic != b"\x7fELF" or cls != 2 or data != 1:
            raise SampleError(f"{path}: no ELF64 little-endian header (starts {head[:16]!r})")
        (e_type, e_machine, _v, _entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
         e_phnum, *_rest) = _ELF64_EHDR_TAIL.unpack_from(head, 16)  # fmt: skip
        if e_type != ET_CORE or e_machine != EM_X86_64 or e_phnum == 0:
            raise SampleError(f"{path}: ELF type {e_type} machine {e_machine}, not an x86_64 core")
        fh.seek(e_phoff)
        table = fh.read(e_phentsize * e_phnum)
    end = 0
    for i in range(e_phnum):
        _t, _f, p_offset, _va, _pa, p_filesz, _memsz, _align = _ELF64_PHDR.unpack_from(
            table, i * e_phentsize
        )
        end = max(end, p_offset + p_filesz)
    return end


def _content_plan(mem_mib: int) -> dict[str, int]:
    # Small enough that a 512 MiB guest minus 192 MiB crashkernel does not run short.
    return {
        "anon_pattern_mib": max(mem_mib // 8, 8),
        "anon_zero_mib": max(mem_mib // 32, 4),
        "page_cache_mib": max(mem_mib // 16, 8),
    }


def _inputs(kernel: Kernel, mem_mib: int, crashkernel_mib: int, busybox: Path) -> dict[str, Any]:
    guest_files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(GUEST_DIR.iterdir())
    }
    return {
        "generator_version": GENERATOR_VERSION,
        "kernel_version": kernel.version,
        "vmlinuz_size": kernel.vmlinuz.stat().st_size,
        "mem_mib": mem_mib,
        "crashkernel_mib": crashkernel_mib,
        "content": _content_plan(mem_mib),
        "first_cmdline": FIRST_CMDLINE.format(crashkernel_mib=crashkernel_mib),
        "capture_cmdline": CAPTURE_CMDLINE,
        "guest_files": guest_files,
        "busybox_sha256": _sha256_file(busybox),
    }


def _inputs_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _build_initramfs(work: Path, kernel: Kernel, conf: dict[str, str]) -> tuple[Path, Path]:
    """Build capture.cpio (busybox, init, virtio modules) and first.cpio (the same plus
    the static helpers, the kernel and capture.cpio itself, which kexec_file_load needs
    as files). Returns (first, capture)."""
    tree = work / "capture-root"
    kos = busybox_tree(tree, GUEST_DIR / "init.sh", kernel=kernel, modules=MODULES)
    conf = {**conf, "MODULES": " ".join(kos)}
    (tree / "etc" / "vmkit.conf").write_text(
        "".join(f"{k}='{v}'\n" for k, v in sorted(conf.items()))
    )
    capture = pack_cpio(tree, work / "capture.cpio")
    for name in ("kexec_load", "memfill"):
        compile_static(GUEST_DIR / f"{name}.c", tree / "sbin" / name.replace("_", "-"))
    shutil.copy2(kernel.vmlinuz, tree / "boot" / "vmlinuz")
    shutil.copy2(capture, tree / "boot" / "capture.cpio")
    return pack_cpio(tree, work / "first.cpio"), capture


def _make_data_disk(path: Path, mib: int) -> None:
    """Every 4 KiB block: b"KDCPDISK" + u64 LE block index + 4080 x 0x5C."""
    fill = bytes([DISK_BLOCK_FILL]) * (PAGE - 16)
    blocks_per_mib = (1 << 20) // PAGE
    with open(path, "wb") as fh:
        for mb in range(mib):
            base = mb * blocks_per_mib
            fh.write(
                b"".join(
                    DISK_BLOCK_MAGIC + struct.pack("<Q", base + i) + fill
                    for i in range(blocks_per_mib)
                )
            )


def _timeout_for(mem_mib: int) -> float:
    # Two TCG boots (~5-10 s each) plus filling memory and copying /proc/vmcore inside
    # the guest at 30-100 MB/s: allow 180 s fixed plus 0.2 s per MiB (2 GiB -> ~590 s).
    return 180 + 0.2 * mem_mib


def _diagnose(console: str, timed_out: bool, timeout: float) -> str | None:
    """Say which step of the crash cycle failed, from the guest's VMKIT- lines and
    kernel messages; None if the capture finished."""
    fail = re.search(r"^VMKIT-FAIL: (.*)$", console, re.MULTILINE)
    if fail:
        return f"guest init failed: {fail.group(1)}"
    if "VMKIT-CAPTURE-DONE" in console:
        return None
    first, crashed, capture = console.partition("VMKIT-CRASHING")
    if not crashed:
        panic = re.search(r"Kernel panic - not syncing: (.*)", first)
        if panic:
            return f"first kernel panicked before the planned crash: {panic.group(1)}"
        if timed_out:
            return f"first kernel did not reach the crash within {timeout:.0f} s"
        return "first kernel stopped before the crash (see console)"
    if "Linux version" not in capture:
        return "no capture kernel booted after sysrq-c (kexec into the crash kernel failed)"
    # The capture kernel prints its own panic, if any, after the sysrq one.
    panics = re.findall(r"Kernel panic - not syncing: (.*)", capture)[1:]
    if panics:
        return f"capture kernel panicked: {panics[-1]} (crashkernel too small?)"
    if "VMKIT-STAGE capture" not in capture:
        return "capture kernel booted but its init never ran (crashkernel too small?)"
    if timed_out:
        return f"capture kernel did not finish copying /proc/vmcore within {timeout:.0f} s"
    return "capture kernel stopped before it finished copying /proc/vmcore"


def _generate(
    kernel: Kernel,
    mem_mib: int,
    crashkernel_mib: int,
    out_dir: Path,
    stem: str,
    inputs: dict[str, Any],
    timeout: float,
) -> Sample:
    console_log = out_dir / f"{stem}.console.log"
    marker = f"{MARKER_PREFIX} {secrets.token_hex(16)}"
    plan = inputs["content"]
    append_first = inputs["first_cmdline"]
    append_capture = inputs["capture_cmdline"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f"tmp-{stem}-") as tmp:
        work = Path(tmp)
        first, _capture = _build_initramfs(
            work,
            kernel,
            {
                "MARKER": marker,
                "ANON_MIB": str(plan["anon_pattern_mib"]),
                "ZERO_MIB": str(plan["anon_zero_mib"]),
                "CAPTURE_CMDLINE": append_capture,
            },
        )
        dump_disk = work / "dump.raw"
        # /proc/vmcore is about guest RAM minus crashkernel plus a duplicate of the
        # kernel text (tens of MiB); 256 MiB of slack. Sparse, so it costs nothing.
        with open(dump_disk, "wb") as fh:
            fh.truncate((mem_mib + 256) << 20)
        data_disk = work / "data.raw"
        _make_data_disk(data_disk, plan["page_cache_mib"])

        guest = Guest(
            kernel.vmlinuz,
            first,
            append_first,
            console_log,
            mem_mib=mem_mib,
            drives=[Drive(dump_disk), Drive(data_disk, readonly=True)],
        )
        with guest:
            result = guest.wait(timeout)
        console = result.console
        problem = _diagnose(console, result.timed_out, timeout)
        if problem:
            raise SampleError(problem, console, console_log)
        m = re.search(r"^VMKIT-VMCORE-SIZE (\d+)", console, re.MULTILINE)
        if not m:
            raise SampleError("capture kernel did not report the /proc/vmcore size", console)
        expected = int(m.group(1))
        length = elf_core_length(dump_disk)
        if length != expected:
            raise SampleError(
                f"ELF length {length} differs from /proc/vmcore size {expected}",
                console,
                console_log,
            )
        os.truncate(dump_disk, length)
        sha = _sha256_file(dump_disk)
        elapsed = time.monotonic() - started
        path = out_dir / f"{stem}.elf"
        sidecar = out_dir / f"{stem}.json"
        meta = {
            "marker": marker,
            "kernel_version": kernel.version,
            "vmlinuz": str(kernel.vmlinuz),
            "mem_mib": mem_mib,
            "crashkernel_mib": crashkernel_mib,
            "size": length,
            "sha256": sha,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "generation_seconds": round(elapsed, 1),
            "created_by": [sys.executable, *sys.argv],
            "qemu_command": guest.args,
            "contents": {
                **plan,
                "anon_page_layout": "b'KDCPANON' + u64le page index + 4080 * 0xA5",
                "page_cache_block_layout": "b'KDCPDISK' + u64le block index + 4080 * 0x5C",
            },
            "inputs": inputs,
            "inputs_key": _inputs_key(inputs),
        }
        dump_disk.rename(path)
        tmp_sidecar = work / "sidecar.json"
        tmp_sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        tmp_sidecar.rename(sidecar)  # written last: its presence marks a complete sample
    log.info("generated %s (%d bytes) in %.1f s", path, length, elapsed)
    return _sample_from(meta, path, sidecar)


def _sample_from(meta: dict[str, Any], path: Path, sidecar: Path) -> Sample:
    return Sample(
        path=path,
        marker=meta["marker"],
        kernel_version=meta["kernel_version"],
        vmlinuz=Path(meta["vmlinuz"]),
        mem_mib=meta["mem_mib"],
        crashkernel_mib=meta["crashkernel_mib"],
        size=meta["size"],
        sha256=meta["sha256"],
        sidecar=sidecar,
        meta=meta,
    )


def _load_cached(path: Path, sidecar: Path, key: str) -> Sample | None:
    try:
        meta = json.loads(sidecar.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("inputs_key") != key:
        log.info("sample %s is stale (inputs changed)", path)
        return None
    if not path.exists() or path.stat().st_size != meta.get("size"):
        return None
    return _sample_from(meta, path, sidecar)


def get_sample(
    mem_mib: int = 512,
    *,
    crashkernel_mib: int = DEFAULT_CRASHKERNEL_MIB,
    cache: str | os.PathLike[str] | None = None,
    force: bool = False,
    timeout: float | None = None,
) -> Sample:
    """Return the real vmcore of a *mem_mib* guest, generating it if missing or stale.

    Cached as ``<cache>/samples/vmcore-<mem_mib>.elf`` (``-ck<N>`` appended for a
    non-default crashkernel) with a ``.json`` sidecar and the guest's ``.console.log``.
    Regenerates when the kernel, guest recipe (init, C helpers, busybox), memory size or
    crashkernel changed. Takes a lock, so parallel callers generate it once.
    """
    kernel = get_kernel(cache)
    busybox = find_busybox()
    out_dir = cache_dir(cache) / "samples"
    out_dir.mkdir(exist_ok=True)
    stem = f"vmcore-{mem_mib}"
    if crashkernel_mib != DEFAULT_CRASHKERNEL_MIB:
        stem += f"-ck{crashkernel_mib}"
    path, sidecar = out_dir / f"{stem}.elf", out_dir / f"{stem}.json"
    inputs = _inputs(kernel, mem_mib, crashkernel_mib, busybox)
    key = _inputs_key(inputs)
    with file_lock(out_dir / f"{stem}.lock"):
        if not force:
            cached = _load_cached(path, sidecar, key)
            if cached is not None:
                return cached
        sidecar.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        # We hold this stem's lock, so any work directory of it is left from a killed run.
        for stale in out_dir.glob(f"tmp-{stem}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("generating %s (guest %d MiB, crashkernel=%dM)", path, mem_mib, crashkernel_mib)
        return _generate(
            kernel,
            mem_mib,
            crashkernel_mib,
            out_dir,
            stem,
            inputs,
            timeout if timeout is not None else _timeout_for(mem_mib),
        )
