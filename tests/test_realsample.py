"""The real vmcore samples are real: ELF cores that makedumpfile and crash can read."""

from __future__ import annotations

import mmap
import struct
import subprocess
from pathlib import Path

import pytest

from tests import vmkit

pytestmark = pytest.mark.vm

PT_LOAD = 1
PT_NOTE = 4
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
PAGE = 4096


def _phdrs(data: bytes | mmap.mmap) -> list[tuple[int, ...]]:
    ident, e_type, e_machine, *_, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum, _a, _b, _c = (
        _EHDR.unpack_from(data, 0)
    )
    assert ident[:4] == b"\x7fELF" and ident[4] == 2 and ident[5] == 1, "not ELF64 LE"
    assert (e_type, e_machine) == (4, 62), "not an x86_64 ET_CORE"
    return [_PHDR.unpack_from(data, e_phoff + i * e_phentsize) for i in range(e_phnum)]


def _notes(data: bytes | mmap.mmap, offset: int, size: int) -> list[tuple[bytes, int, bytes]]:
    notes, pos, end = [], offset, offset + size
    while pos + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
        pos += _NHDR.size
        name = bytes(data[pos : pos + namesz]).rstrip(b"\0")
        pos += (namesz + 3) & ~3
        notes.append((name, ntype, bytes(data[pos : pos + descsz])))
        pos += (descsz + 3) & ~3
    return notes


def _check_core(sample: vmkit.Sample) -> None:
    assert sample.path.stat().st_size == sample.size
    with open(sample.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        phdrs = _phdrs(m)
        # /proc/vmcore merges every note into one PT_NOTE, the first program header.
        assert phdrs[0][0] == PT_NOTE
        loads = [p for p in phdrs if p[0] == PT_LOAD]
        assert len(loads) >= 2  # kernel text plus at least one System RAM range
        assert max(p[2] + p[5] for p in phdrs) == sample.size
        ram = sum(p[5] for p in loads[1:])
        crash = sample.crashkernel_mib << 20
        assert (sample.mem_mib << 20) - crash - (64 << 20) < ram <= (sample.mem_mib << 20) - crash
        notes = _notes(m, phdrs[0][2], phdrs[0][5])
    names = [n[0] for n in notes]
    assert b"CORE" in names  # NT_PRSTATUS of the crashing CPU
    vmcoreinfo = next(desc for name, _t, desc in notes if name == b"VMCOREINFO")
    assert f"OSRELEASE={sample.kernel_version}\n".encode() in vmcoreinfo


def _check_dmesg(sample: vmkit.Sample, out: Path) -> None:
    proc = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(sample.path), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = out.read_text(errors="replace").splitlines()
    assert any(line.endswith(sample.marker) for line in lines), (
        f"{sample.marker!r} not in the dmesg makedumpfile extracted from {sample.path}"
    )


def test_module_chain_is_in_load_order(cloud_kernel: vmkit.Kernel) -> None:
    names = [p.name for p in cloud_kernel.module_chain("virtio_blk", "virtio-pci")]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_blk.ko")
    assert names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert len(names) == len(set(names))
    assert all(p.exists() for p in cloud_kernel.module_chain("virtio_blk"))


_HELLO_INIT = """#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "VMKIT-HELLO $(/bin/busybox uname -r)"
[ -n "$stay" ] && exec /bin/busybox sleep 600
/bin/busybox poweroff -f
"""


def _hello_initrd(tmp_path: Path) -> Path:
    tree = tmp_path / "root"
    vmkit.busybox_tree(tree, _HELLO_INIT)
    return vmkit.pack_cpio(tree, tmp_path / "hello.cpio")


def test_guest_wait_for_then_timeout_kills(cloud_kernel: vmkit.Kernel, tmp_path: Path) -> None:
    guest = vmkit.Guest(
        cloud_kernel.vmlinuz,
        _hello_initrd(tmp_path),
        "console=ttyS0 panic=-1 stay=1",
        tmp_path / "console.log",
        mem_mib=256,
    )
    with guest:
        m = guest.wait_for(r"^VMKIT-HELLO (\S+)", timeout=120)
        assert m.group(1) == cloud_kernel.version
        with pytest.raises(vmkit.GuestTimeout, match="NEVER") as exc:
            guest.wait_for("NEVER", timeout=0.5)
        assert guest.proc.poll() is not None  # killed on timeout
        assert "VMKIT-HELLO" in exc.value.console


def test_run_guest_powers_off(cloud_kernel: vmkit.Kernel, tmp_path: Path) -> None:
    result = vmkit.run_guest(
        cloud_kernel.vmlinuz,
        _hello_initrd(tmp_path),
        "console=ttyS0 panic=-1",
        tmp_path / "console.log",
        timeout=120,
        mem_mib=256,
    )
    assert (result.returncode, result.timed_out) == (0, False), result.console[-2000:]
    assert "VMKIT-HELLO" in result.console


def test_drive_escapes_commas() -> None:
    arg = vmkit.Drive(Path("/a,b.raw"), readonly=True).arg()
    assert arg.startswith("file=/a,,b.raw,format=raw,if=virtio")
    assert arg.endswith(",readonly=on")


def test_sample_is_an_elf_core(real_sample: vmkit.Sample) -> None:
    _check_core(real_sample)


def test_makedumpfile_finds_the_marker(real_sample: vmkit.Sample, tmp_path: Path) -> None:
    _check_dmesg(real_sample, tmp_path / "dmesg.txt")


def test_sample_holds_the_known_memory(real_sample: vmkit.Sample) -> None:
    """Every page the guest's memfill wrote and every data-disk block it read (kept in
    the page cache) is in the dump, at a page boundary."""
    contents = real_sample.meta["contents"]
    seen: dict[bytes, set[int]] = {b"KDCPANON": set(), b"KDCPDISK": set()}
    with (
        open(real_sample.path, "rb") as fh,
        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
        for p in _phdrs(m):
            if p[0] != PT_LOAD:
                continue
            for off in range(p[2], p[2] + p[5], PAGE):
                tag = m[off : off + 8]
                if tag in seen:
                    seen[tag].add(struct.unpack_from("<Q", m, off + 8)[0])
    assert len(seen[b"KDCPANON"]) == contents["anon_pattern_mib"] * 256
    assert len(seen[b"KDCPDISK"]) == contents["page_cache_mib"] * 256


def test_cached_sample_is_reused(real_sample: vmkit.Sample) -> None:
    again = vmkit.get_sample(512)
    assert (again.path, again.marker, again.sha256) == (
        real_sample.path,
        real_sample.marker,
        real_sample.sha256,
    )


@pytest.mark.slow
def test_2g_sample(real_sample_2g: vmkit.Sample, tmp_path: Path) -> None:
    _check_core(real_sample_2g)
    _check_dmesg(real_sample_2g, tmp_path / "dmesg.txt")


@pytest.mark.slow
def test_crash_reads_the_sample(
    real_sample: vmkit.Sample, debug_vmlinux: Path, tmp_path: Path
) -> None:
    cmds = tmp_path / "cmds"
    cmds.write_text("sys\nlog\nbt\nquit\n")
    proc = subprocess.run(
        ["crash", "-s", str(debug_vmlinux), str(real_sample.path), "-i", str(cmds)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert real_sample.marker in out, out[-3000:]
    assert "sysrq" in out.lower(), out[-3000:]
