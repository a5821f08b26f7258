"""Resolve kernel modules and their dependencies from ``modules.dep`` of a modules root.

``modules.dep`` (written by depmod) maps each module file to the files it needs, relative
to ``/lib/modules/VER``. A module listed in ``modules.builtin`` is compiled into the kernel
and needs no file. Names are normalised the way modprobe does: ``-`` and ``_`` are the same.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import zlib
from dataclasses import dataclass, field

from kdump_capture.errors import ConfigError

log = logging.getLogger(__name__)

# Modules the capture kernel may need, by purpose. Only those present in modules.dep are
# taken; names missing there are built in or not built at all for that kernel.
STORAGE = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "ahci",
    "ata_piix",
    "xen_blkfront",
    "hv_storvsc",
)
FILESYSTEMS = ("ext4", "xfs", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1")
NETWORK = (
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "ena",
    "vmxnet3",
    "xen_netfront",
    "hv_netvsc",
    "gve",
)
NFS = ("nfs", "nfsv4", "nfsv3")  # NFSv3 for servers without NFSv4 (transports/nfs.py)


def modname(path_or_name: str) -> str:
    """``kernel/fs/nfs/nfs.ko.xz`` -> ``nfs``; ``virtio-net`` -> ``virtio_net``."""
    base = os.path.basename(path_or_name)
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


ELF_MAGIC = b"\x7fELF"


def _unzstd(data: bytes) -> bytes:
    import zstandard  # a dependency already (the image's own compression)

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    try:
        return reader.read()
    except zstandard.ZstdError as e:
        raise ValueError(str(e)) from None


# How depmod's module files are compressed (kmod's own suffixes): RHEL, SUSE and Debian 13
# ship .ko.xz, Ubuntu 24.04 and Arch .ko.zst. The capture image holds them unpacked: /init
# loads with finit_module(2) without MODULE_INIT_COMPRESSED_FILE, which kernels before 5.17
# (RHEL 9: 5.14) do not know and later ones honour only with CONFIG_MODULE_DECOMPRESS; a
# compressed file is refused there ("Exec format error") and its driver never comes up.
DECOMPRESS = {".xz": lzma.decompress, ".zst": _unzstd, ".gz": gzip.decompress}


def module_image(rel: str, path: str) -> tuple[str, bytes]:
    """(path relative to the modules root, ELF bytes) of a module file as the capture image
    holds it: ``kernel/fs/xfs/xfs.ko.xz`` -> ``kernel/fs/xfs/xfs.ko`` and its unpacked bytes.

    A module that cannot be read or unpacked, or is no ELF file then, is a ConfigError
    naming the file: an image without it would find out only at the crash.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # modules.dep names a file that is gone (modules removed by hand)
        raise ConfigError(
            f"kernel module {path}: {e.strerror}; reinstall the kernel's modules, or run "
            "'depmod' for this kernel version if the file was removed on purpose"
        ) from None
    ext = os.path.splitext(rel)[1]
    if ext in DECOMPRESS:
        try:
            data = DECOMPRESS[ext](data)
        except (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError) as e:
            raise ConfigError(
                f"kernel module {path}: cannot unpack it ({e}); reinstall the kernel's modules"
            ) from None
        rel = rel.removesuffix(ext)
    if not data.startswith(ELF_MAGIC):
        raise ConfigError(
            f"kernel module {path} is not an ELF file (unknown compression?); the capture "
            "kernel could not load it"
        )
    return rel, data


@dataclass
class ModuleIndex:
    """The parsed ``modules.dep`` and ``modules.builtin`` of one kernel version."""

    root: str  # /lib/modules/VER
    paths: dict[str, str] = field(default_factory=dict)  # name -> relative .ko path
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> dependency names
    builtin: set[str] = field(default_factory=set)
    # "fs-TYPE" -> modules that provide that filesystem type (modules.alias, and
    # modules.builtin.modinfo for built-in ones): ext4 serves ext3 and ext2 mounts.
    fs_aliases: dict[str, list[str]] = field(default_factory=dict)
    # Whether modules.builtin was there: without it a name missing from modules.dep may be
    # built in or absent, and nobody can tell which.
    builtin_known: bool = False

    @classmethod
    def parse(
        cls, root: str, dep_text: str, builtin_text: str = "", alias_text: str = ""
    ) -> ModuleIndex:
        idx = cls(root)
        for line in dep_text.splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            name = modname(mod.strip())
            idx.paths[name] = mod.strip()
            idx.deps[name] = [modname(d) for d in rest.split()]
        idx.builtin = {modname(x) for x in builtin_text.split()}
        idx.builtin_known = bool(builtin_text.strip())
        for line in alias_text.splitlines():
            words = line.split()
            # only the filesystem aliases: the file has thousands of device aliases
            if len(words) == 3 and words[0] == "alias" and words[1].startswith("fs-"):
                idx.fs_aliases.setdefault(words[1], []).append(modname(words[2]))
        return idx

    def provides(self, names: list[str] | tuple[str, ...]) -> bool | None:
        """Whether one of ``names`` is a module file or built in; None when that cannot be
        told (no modules.builtin) and none is a module."""
        if any(modname(n) in self.paths or modname(n) in self.builtin for n in names):
            return True
        return False if self.builtin_known else None

    def filesystem_modules(self, fstype: str) -> list[str]:
        """Names of the modules that may provide filesystem ``fstype``: those whose alias
        is ``fs-TYPE`` (``MODULE_ALIAS_FS``; ext4 for ext3), then the type's own name."""
        return list(dict.fromkeys([*self.fs_aliases.get(f"fs-{fstype}", []), modname(fstype)]))

    @classmethod
    def load(cls, root: str) -> ModuleIndex:
        dep = os.path.join(root, "modules.dep")
        try:
            with open(dep, encoding="utf-8") as f:
                dep_text = f.read()
        except OSError as e:
            raise ConfigError(
                f"cannot read {dep} ({e.strerror}); run 'depmod -b <root> <version>' first"
            ) from None
        try:
            with open(os.path.join(root, "modules.builtin"), encoding="utf-8") as f:
                builtin_text = f.read()
        except OSError:
            builtin_text = ""
        try:
            with open(os.path.join(root, "modules.alias"), encoding="utf-8") as f:
                alias_text = f.read()
        except OSError:
            alias_text = ""
        idx = cls.parse(root, dep_text, builtin_text, alias_text)
        # Built-in modules' aliases: NUL-separated "module.alias=fs-ext3" records written
        # by the kernel's modules_install (5.2 and later).
        try:
            with open(os.path.join(root, "modules.builtin.modinfo"), "rb") as f:
                modinfo = f.read()
        except OSError:
            modinfo = b""
        for rec in modinfo.split(b"\0"):
            mod, _, value = rec.decode("utf-8", "replace").partition(".alias=")
            if value.startswith("fs-"):
                idx.fs_aliases.setdefault(value, []).append(modname(mod))
        return idx

    def has(self, name: str) -> bool:
        return modname(name) in self.paths

    def resolve(self, wanted: list[str] | tuple[str, ...], *, strict: bool = False) -> list[str]:
        """Module names in load order (every dependency before its users), without duplicates.

        Unknown names are skipped (built in, or absent from this kernel); with ``strict`` an
        unknown name that is not built in raises ConfigError.
        """
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                return  # depmod never writes cycles; tolerate a broken file anyway
            state[name] = 1
            for dep in self.deps.get(name, []):
                visit(dep)
            state[name] = 2
            order.append(name)

        for w in wanted:
            name = modname(w)
            if name in self.paths:
                visit(name)
            elif strict and name not in self.builtin:
                raise ConfigError(f"kernel module {w!r} not found in {self.root}/modules.dep")
        return order

    def file(self, name: str) -> str:
        """Absolute path of a module's file."""
        return os.path.join(self.root, self.paths[modname(name)])


def wanted_modules(
    scheme: str,
    network: bool,
    fstype: str = "",
    extra: tuple[str, ...] = (),
    storage: tuple[str, ...] = STORAGE,
    nics: tuple[str, ...] = NETWORK,
    fs_modules: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Which modules to pack for a target scheme (pure: no I/O).

    ``fstype`` narrows the filesystems to the one the local target uses (xfs alone is 4 MB);
    ``fs_modules`` are the modules that may provide it (ModuleIndex.filesystem_modules);
    ``storage`` and ``nics`` default to drivers for common hardware (see host_drivers).
    """
    wanted: list[str] = []
    if scheme == "file":
        wanted += storage
        if fstype == "vfat":
            wanted += ("vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1")
        elif fstype:
            wanted += fs_modules or [fstype]
        else:
            wanted += FILESYSTEMS
    if network:
        wanted += nics
    if scheme == "nfs":
        wanted += NFS
    wanted += extra
    return list(dict.fromkeys(wanted))


def missing_drivers(
    index: ModuleIndex, fstypes: list[str], nfs: bool
) -> tuple[list[str], list[str]]:
    """(missing, unknown): the drivers a target needs that this kernel has neither as a
    module nor built in, and those it may lack (no modules.builtin to tell), each as
    "WHAT (module names)".

    A local target's filesystem type (from mountinfo or --target-fstype) and the NFS client
    for an nfs:// target (nfs, and nfsv4 or nfsv3) are checked: without them the capture
    kernel cannot write the target, and would find out only at the crash.
    """
    needs: list[tuple[str, list[str]]] = []
    for fs in dict.fromkeys(f for f in fstypes if f):
        needs.append((f"the {fs} filesystem", index.filesystem_modules(fs)))
    if nfs:
        needs += [("the NFS client", ["nfs"]), ("NFSv4 or NFSv3", ["nfsv4", "nfsv3"])]
    missing: list[str] = []
    unknown: list[str] = []
    for what, names in needs:
        found = index.provides(names)
        if not found:
            (unknown if found is None else missing).append(f"{what} ({', '.join(names)})")
    return missing, unknown


def _driver_modules(device: str, sysfs: str) -> list[str]:
    """Modules of the drivers bound to a sysfs device and to its parents (bus adapters)."""
    mods: list[str] = []
    path = os.path.realpath(device)
    top = os.path.realpath(sysfs) + "/devices/"
    while path.startswith(top):
        link = os.path.join(path, "driver", "module")
        if os.path.islink(link):
            mods.append(modname(os.path.basename(os.readlink(link))))
        path = os.path.dirname(path)
    return mods


def host_drivers(sysfs: str = "/sys") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(storage, network) driver modules of this machine's disks and network interfaces,
    for an image built for the running kernel ("host only", as dracut does); drivers
    built into the kernel have no module and are not listed."""
    storage: list[str] = []
    for name in sorted(os.listdir(f"{sysfs}/block")) if os.path.isdir(f"{sysfs}/block") else []:
        dev = f"{sysfs}/block/{name}/device"
        if os.path.exists(dev):
            storage += _driver_modules(dev, sysfs)
    nics: list[str] = []
    for name in (
        sorted(os.listdir(f"{sysfs}/class/net")) if os.path.isdir(f"{sysfs}/class/net") else []
    ):
        dev = f"{sysfs}/class/net/{name}/device"
        if os.path.exists(dev):
            nics += _driver_modules(dev, sysfs)
    return tuple(dict.fromkeys(storage)), tuple(dict.fromkeys(nics))
