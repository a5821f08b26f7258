"""Kernel-module resolution from modules.dep: load order, built-ins, selection per target."""
# ruff: noqa: E501  (modules.dep lines are long by nature)

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest
import zstandard

from initramfs import kmods
from kdump_capture.errors import ConfigError

DEP = """\
kernel/fs/nfs/nfs.ko: kernel/fs/lockd/lockd.ko kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/nfs/nfsv4.ko: kernel/net/dns_resolver/dns_resolver.ko kernel/fs/nfs/nfs.ko kernel/fs/lockd/lockd.ko kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/lockd/lockd.ko: kernel/fs/nfs_common/grace.ko kernel/net/sunrpc/sunrpc.ko
kernel/fs/nfs_common/grace.ko:
kernel/net/sunrpc/sunrpc.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/dns_resolver/dns_resolver.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
"""


@pytest.fixture
def index() -> kmods.ModuleIndex:
    return kmods.ModuleIndex.parse("/lib/modules/x", DEP, "kernel/fs/ext4/ext4.ko\n")


def test_names_are_normalised():
    assert kmods.modname("kernel/drivers/net/virtio_net.ko.xz") == "virtio_net"
    assert kmods.modname("virtio-net") == "virtio_net"


def test_dependencies_load_first(index):
    order = index.resolve(["nfsv4"])
    assert set(order) == {
        "nfsv4",
        "nfs",
        "lockd",
        "grace",
        "sunrpc",
        "fscache",
        "netfs",
        "dns_resolver",
    }
    for mod, deps in index.deps.items():
        if mod in order:
            assert all(order.index(d) < order.index(mod) for d in deps), mod
    assert order[-1] == "nfsv4"


def test_no_duplicates_and_unknown_skipped(index):
    order = index.resolve(["virtio_net", "virtio-net", "nvme", "ext4"])
    assert order == ["failover", "virtio_ring", "virtio", "virtio_net"]


def test_strict_rejects_missing_but_accepts_builtin(index):
    assert index.resolve(["ext4"], strict=True) == []
    with pytest.raises(ConfigError):
        index.resolve(["nosuchmod"], strict=True)


def test_missing_modules_dep_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="depmod"):
        kmods.ModuleIndex.load(str(tmp_path))


@pytest.mark.parametrize(
    ("scheme", "network", "fstype", "has", "lacks"),
    [
        ("file", False, "ext4", {"virtio_blk", "ext4"}, {"virtio_net", "xfs", "nfs"}),
        ("file", False, "", {"virtio_blk", "xfs", "vfat"}, {"virtio_net"}),
        ("file", True, "ext4", {"virtio_blk", "virtio_net"}, {"nfs"}),
        ("sftp", True, "", {"virtio_net"}, {"virtio_blk", "nfs", "cifs"}),
        ("nfs", True, "", {"virtio_net", "nfs", "nfsv4", "nfsv3"}, {"cifs"}),
        # CIFS is smbprotocol in user space: the kernel client (3.3 MB with deps) is not packed
        ("cifs", True, "", {"virtio_net"}, {"nfs", "cifs"}),
    ],
)
def test_wanted_modules_per_target(scheme, network, fstype, has, lacks):
    wanted = set(kmods.wanted_modules(scheme, network, fstype))
    assert has <= wanted
    assert not (lacks & wanted)


def test_host_drivers_follow_devices_and_their_parents(tmp_path):
    """A fake sysfs: vda on virtio2 under PCI 0000:00:04.0; eth0 on virtio1 under 00:03.0."""
    sysfs = tmp_path / "sys"

    def device(path: str, module: str | None) -> Path:
        d = sysfs / "devices" / path
        d.mkdir(parents=True, exist_ok=True)
        if module:
            drv = sysfs / "bus/drivers" / module
            (drv / "module").parent.mkdir(parents=True, exist_ok=True)
            (sysfs / "module" / module).mkdir(parents=True, exist_ok=True)
            if not (drv / "module").exists():
                (drv / "module").symlink_to(sysfs / "module" / module)
            (d / "driver").symlink_to(drv)
        return d

    device("pci0000:00/0000:00:04.0", "virtio_pci")
    blk = device("pci0000:00/0000:00:04.0/virtio2", "virtio_blk")
    device("pci0000:00/0000:00:03.0", "virtio_pci")
    net = device("pci0000:00/0000:00:03.0/virtio1", "virtio_net")
    device("platform/serial8250", None)  # built in: no module
    (sysfs / "block/vda").mkdir(parents=True)
    (sysfs / "block/vda/device").symlink_to(blk)
    (sysfs / "block/loop0").mkdir(parents=True)  # virtual: no device
    (sysfs / "class/net/eth0").mkdir(parents=True)
    (sysfs / "class/net/eth0/device").symlink_to(net)
    (sysfs / "class/net/lo").mkdir(parents=True)
    assert kmods.host_drivers(str(sysfs)) == (
        ("virtio_blk", "virtio_pci"),
        ("virtio_net", "virtio_pci"),
    )


def test_a_module_is_packed_unpacked_as_elf(tmp_path):
    elf = b"\x7fELF module"
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(elf))
    (tmp_path / "b.ko.zst").write_bytes(zstandard.ZstdCompressor().compress(elf))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "d.ko").write_bytes(elf)
    for name in ("a.ko.xz", "b.ko.zst", "c.ko.gz", "d.ko"):
        rel, data = kmods.module_image(f"kernel/{name}", str(tmp_path / name))
        assert rel == f"kernel/{name.split('.')[0]}.ko" and data == elf


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bad.ko.xz", b"\xfd7zXZ\0 truncated", "bad.ko.xz: cannot unpack it"),
        ("bad.ko.zst", b"\x28\xb5\x2f\xfd broken", "bad.ko.zst: cannot unpack it"),
        ("bad.ko.gz", b"\x1f\x8b broken", "bad.ko.gz: cannot unpack it"),
        ("bad.ko.lz4", b"\x04\x22\x4d\x18", "bad.ko.lz4 is not an ELF file"),
    ],
)
def test_a_module_that_cannot_be_unpacked_fails_the_build_naming_it(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        kmods.module_image(f"kernel/{name}", str(tmp_path / name))


def test_a_module_named_in_modules_dep_but_missing_is_a_config_error(tmp_path):
    """A stale modules.dep (a module deleted by hand): exit 2 naming the file, not an
    internal error."""
    with pytest.raises(ConfigError, match=r"virtio_blk\.ko: No such file.*depmod"):
        kmods.module_image("kernel/virtio_blk.ko", str(tmp_path / "kernel/virtio_blk.ko"))


def test_a_filesystem_type_is_found_by_its_module_alias(tmp_path):
    """ext3 and ext2 are mounted by ext4 (``alias fs-ext3 ext4``): there is no ext3.ko."""
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko\n"
    )
    (tmp_path / "modules.alias").write_text(
        "alias pci:v00001AF4d00001001sv*sd*bc*sc*i* virtio_blk\nalias fs-ext3 ext4\n"
    )
    (tmp_path / "modules.builtin.modinfo").write_bytes(
        b"vfat.alias=fs-vfat\0vfat.license=GPL\0fat.alias=fs-msdos\0"
    )
    index = kmods.ModuleIndex.load(str(tmp_path))
    assert index.filesystem_modules("ext3") == ["ext4", "ext3"]
    assert index.filesystem_modules("msdos") == ["fat", "msdos"]
    assert index.filesystem_modules("xfs") == ["xfs"]
    wanted = kmods.wanted_modules("file", False, "ext3", fs_modules=["ext4", "ext3"])
    assert index.resolve(wanted) == ["jbd2", "ext4"]


def test_a_driver_the_target_needs_is_missing_built_in_or_unknown(index):
    """Built in (ext4 in modules.builtin) or a module (nfs, nfsv4): nothing missing; in
    neither: missing; without modules.builtin nobody can tell: unknown."""
    assert kmods.missing_drivers(index, ["ext4"], nfs=True) == ([], [])
    missing, unknown = kmods.missing_drivers(index, ["btrfs", "ext4"], nfs=False)
    assert missing == ["the btrfs filesystem (btrfs)"] and unknown == []
    no_nfs = kmods.ModuleIndex.parse("/lib/modules/x", "kernel/fs/xfs/xfs.ko:\n", "kernel/a.ko\n")
    assert kmods.missing_drivers(no_nfs, ["xfs"], nfs=True)[0] == [
        "the NFS client (nfs)",
        "NFSv4 or NFSv3 (nfsv4, nfsv3)",
    ]
    unknown_builtins = kmods.ModuleIndex.parse("/lib/modules/x", DEP)
    assert kmods.missing_drivers(unknown_builtins, ["ext4"], nfs=True) == (
        [],
        ["the ext4 filesystem (ext4)"],
    )
