"""Fetch Debian's cloud kernel (and, lazily, its debug vmlinux) into the vmkit cache."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_dir, file_lock

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-cloud-amd64"
# Pin a kernel version (e.g. "6.1.0-56-cloud-amd64") instead of asking apt for the candidate.
VERSION_ENV = "KDUMP_CAPTURE_KERNEL_VERSION"
_IMAGE_RE = re.compile(r"linux-image-(\d\S*-cloud-amd64)\b")
_DONE = ".complete"


class KernelError(RuntimeError):
    """The cloud kernel could not be fetched, unpacked or indexed."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked cloud kernel: ``root`` holds ``boot/`` and ``lib/modules/<version>/``."""

    version: str
    root: Path
    vmlinuz: Path
    modules_root: Path  # root/lib/modules/<version>
    _deps: dict[str, tuple[str, ...]] = field(repr=False, compare=False)

    def module_path(self, name: str) -> Path:
        """The ``.ko`` file of module *name* (``-`` and ``_`` are interchangeable)."""
        return self.modules_root / self._rel(name)

    def module_chain(self, *names: str) -> list[Path]:
        """``.ko`` paths for *names* and everything they need, in load order, each once."""
        order: list[str] = []
        for name in names:
            self._visit(self._rel(name), order, ())
        return [self.modules_root / rel for rel in order]

    def _rel(self, name: str) -> str:
        key = name.replace("-", "_")
        for rel in self._deps:
            if _module_name(rel) == key:
                return rel
        raise KernelError(f"module {name!r} is not in {self.modules_root}/modules.dep")

    def _visit(self, rel: str, order: list[str], stack: tuple[str, ...]) -> None:
        if rel in order:
            return
        if rel in stack:
            raise KernelError(f"dependency cycle in modules.dep: {' -> '.join(stack + (rel,))}")
        # modules.dep lists dependencies so that the last one must be loaded first
        # (modprobe walks the list backwards).
        for dep in reversed(self._deps[rel]):
            self._visit(dep, order, stack + (rel,))
        order.append(rel)


def _module_name(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = tuple(rest.split())
    return deps


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    log.debug("running %s", cmd)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(
            f"{' '.join(cmd)} failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` *package* into *dest* and return the ``.deb``."""
    before = set(dest.glob("*.deb"))
    try:
        _run(["apt-get", "download", "-q", package], cwd=dest)
    except KernelError as exc:
        raise KernelError(f"{exc}\n(hint: run 'apt-get update' once on this machine)") from None
    new = sorted(set(dest.glob("*.deb")) - before)
    if len(new) != 1:
        raise KernelError(f"apt-get download {package} produced {new!r}")
    return new[0]


def _candidate_version() -> str | None:
    """The kernel the metapackage's apt candidate depends on, from local apt lists."""
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE])
    except (KernelError, FileNotFoundError):
        return None
    for line in text.splitlines():
        if line.startswith("Depends:"):
            m = _IMAGE_RE.search(line)
            if m:
                return m.group(1)
    return None


def _cached_versions(kernels: Path) -> list[str]:
    if not kernels.is_dir():
        return []
    return sorted(p.name for p in kernels.iterdir() if (p / _DONE).exists())


def _fetch(version: str, dest: Path, tmp_root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="kernel-") as tmp:
        tmpdir = Path(tmp)
        meta = _apt_download(META_PACKAGE, tmpdir)
        depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
        m = _IMAGE_RE.search(depends)
        if not m:
            raise KernelError(f"{meta.name}: no linux-image dependency in {depends!r}")
        if m.group(1) != version:
            # apt lists and the downloaded metapackage disagree (lists updated meanwhile).
            log.warning("metapackage depends on %s, wanted %s", m.group(1), version)
        image = _apt_download(f"linux-image-{version}", tmpdir)
        root = tmpdir / "root"
        _run(["dpkg", "-x", str(image), str(root)])
        if not (root / "boot" / f"vmlinuz-{version}").exists():
            raise KernelError(f"{image.name} has no boot/vmlinuz-{version}")
        # The package ships no modules.dep; build it ourselves.
        _run(["depmod", "-b", str(root), version])
        (root / "source-packages").write_text(f"{meta.name}\n{image.name}\n")
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
        (dest / _DONE).write_text(version + "\n")


def get_kernel(cache: str | os.PathLike[str] | None = None, version: str | None = None) -> Kernel:
    """Return the cloud kernel, downloading and unpacking it on first use.

    The version is *version*, else ``$KDUMP_CAPTURE_KERNEL_VERSION``, else what apt's
    current candidate of ``linux-image-cloud-amd64`` depends on, else (apt lists absent,
    offline) the newest kernel already cached.
    """
    root = cache_dir(cache)
    kernels = root / "kernels"
    kernels.mkdir(exist_ok=True)
    version = version or os.environ.get(VERSION_ENV) or _candidate_version()
    if version is None:
        cached = _cached_versions(kernels)
        if not cached:
            raise KernelError(
                f"cannot resolve the version of {META_PACKAGE} (run 'apt-get update') "
                f"and nothing is cached in {kernels}"
            )
        version = cached[-1]
    dest = kernels / version
    with file_lock(kernels / f"{version}.lock"):
        if not (dest / _DONE).exists():
            log.info("fetching kernel %s into %s", version, dest)
            _fetch(version, dest, kernels)
    modules_root = dest / "lib" / "modules" / version
    deps = _parse_modules_dep((modules_root / "modules.dep").read_text())
    return Kernel(
        version=version,
        root=dest,
        vmlinuz=dest / "boot" / f"vmlinuz-{version}",
        modules_root=modules_root,
        _deps=deps,
    )


def get_debug_vmlinux(
    kernel: Kernel | None = None, cache: str | os.PathLike[str] | None = None
) -> Path:
    """Return the debug ``vmlinux`` matching *kernel* (for ``crash``), fetching it on first use.

    Downloads ``linux-image-<ver>-cloud-amd64-dbg`` (about 280 MB), keeps only
    ``usr/lib/debug/boot/vmlinux-<ver>`` and deletes the package.
    """
    kernel = kernel or get_kernel(cache)
    root = cache_dir(cache)
    dbg_dir = root / "debug"
    dbg_dir.mkdir(exist_ok=True)
    target = dbg_dir / f"vmlinux-{kernel.version}"
    with file_lock(dbg_dir / f"{kernel.version}.lock"):
        if target.exists():
            return target
        log.info("fetching debug vmlinux %s", kernel.version)
        member = f"./usr/lib/debug/boot/vmlinux-{kernel.version}"
        with tempfile.TemporaryDirectory(dir=dbg_dir, prefix="dbg-") as tmp:
            tmpdir = Path(tmp)
            deb = _apt_download(f"linux-image-{kernel.version}-dbg", tmpdir)
            with subprocess.Popen(
                ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE
            ) as deb_proc:
                tar = subprocess.run(
                    ["tar", "-x", "-C", str(tmpdir), member],
                    stdin=deb_proc.stdout,
                    capture_output=True,
                    text=True,
                )
            if deb_proc.returncode != 0 or tar.returncode != 0:
                raise KernelError(f"extracting {member} from {deb.name} failed: {tar.stderr}")
            (tmpdir / member).rename(target)
    return target
