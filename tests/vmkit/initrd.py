"""Build small busybox initramfs images for test guests (test-only; not the product's)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .kernel import Kernel
from .qemu import VmError

# Directories every init expects to exist before it can mount anything.
_DIRS = ("bin", "sbin", "etc", "lib/modules", "proc", "sys", "dev", "tmp", "boot")


class InitrdError(VmError):
    """An initramfs could not be assembled (missing busybox, gcc or cpio failure)."""


def find_busybox() -> Path:
    """The static busybox from Debian's ``busybox-static``."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).exists():
            return Path(cand)
    raise InitrdError("busybox not found (apt-get install busybox-static)")


def busybox_tree(
    tree: Path,
    init: str | Path,
    *,
    kernel: Kernel | None = None,
    modules: Sequence[str] = (),
    files: Mapping[str, Path | str | bytes] = {},  # noqa: B006 - read only
) -> list[str]:
    """Fill *tree* with busybox (``/bin/busybox``), ``/init`` and optional extras.

    *init* is the script text or a path to it. *modules* (with their dependencies, in
    load order, from *kernel*'s modules.dep) are copied flat into ``/lib/modules/``;
    the returned list of ``.ko`` names is the order in which to ``insmod`` them.
    *files* maps a path inside the image to a host file or to its content.
    The init must mount devtmpfs itself; the image has no ``/dev/console`` node, so
    it should ``exec </dev/console >/dev/console 2>&1`` once /dev is mounted.
    """
    for d in _DIRS:
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(find_busybox(), tree / "bin" / "busybox")
    init_text = init.read_text() if isinstance(init, Path) else init
    (tree / "init").write_text(init_text)
    (tree / "init").chmod(0o755)
    kos: list[str] = []
    if modules:
        if kernel is None:
            raise InitrdError("modules requested without a kernel")
        for ko in kernel.module_chain(*modules):
            shutil.copy2(ko, tree / "lib" / "modules" / ko.name)
            kos.append(ko.name)
    for dest, src in files.items():
        target = tree / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy2(src, target)
        elif isinstance(src, bytes):
            target.write_bytes(src)
        else:
            target.write_text(src)
    return kos


def pack_cpio(tree: Path, out: Path) -> Path:
    """Pack *tree* as a newc cpio archive owned by root (what the kernel unpacks)."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with open(out, "wb") as fh:
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=tree,
            input="\n".join(names).encode() + b"\n",
            stdout=fh,
            stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        raise InitrdError(f"cpio of {tree} failed: {proc.stderr.decode(errors='replace')}")
    return out


def compile_static(source: Path, out: Path) -> Path:
    """``gcc -static`` a one-file C helper for the guest (binaries are never committed)."""
    cmd = ["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise InitrdError("gcc not found (apt-get install gcc libc6-dev)") from None
    if proc.returncode != 0:
        raise InitrdError(f"compiling {source.name} failed:\n{proc.stderr}")
    out.chmod(0o755)
    return out
