"""kdump-capture estimate: the reservation added up from measured parts."""

from __future__ import annotations

from kdump_capture import memory
from kdump_capture.config import load_config
from kdump_capture.load import estimate as est
from kdump_capture.load import rebuild
from tests.helpers import cli

MIB = 1 << 20
FACTS = {
    "compressed": 9 * MIB,
    "unpacked": 27 * MIB,
    "kernel_modules": 2 * MIB,
    "interpreter": 3 * MIB,
    "save_imports": 17 * MIB,
}


def _cfg(*sets):
    return load_config(None, list(sets))


def _parts(e):
    return dict(e.parts)


def test_parts_add_up_to_a_multiple_of_16m():
    cfg = _cfg("KDUMP_SAVEDIR=sftp://u@h/d", "KDUMP_DUMPFORMAT=compressed", "KDUMP_DUMPLEVEL=31")
    e = est.estimate(cfg, FACTS, max_pfn=(1 << 30) // 4096)
    parts = _parts(e)
    assert parts["unpacked image (rootfs in RAM)"] == 25 * MIB  # module files are deleted,
    assert parts["kernel modules (loaded)"] == 2 * MIB  # and loaded
    assert parts["save: interpreter and imports (measured)"] == 17 * MIB
    assert parts["save: replay ring"] == memory.FLOOR.replay
    assert parts["save: read-back"] == memory.READ_BACK
    # both bitmaps of the one window (32 KiB each), and the 2nd bitmap kept from the count
    assert parts["save: bitmaps for 1.0 GiB"] == 96 << 10
    assert e.total == sum(parts.values())
    assert e.crashkernel % (16 * MIB) == 0 and e.total <= e.crashkernel < e.total + 16 * MIB
    assert e.lines()[-1] == f"recommended: crashkernel={e.crashkernel // MIB}M"


def test_what_changes_the_estimate():
    def total(*sets, facts=FACTS, pfns=(1 << 30) // 4096):
        return est.estimate(_cfg(*sets), facts, pfns).total

    sftp = total("KDUMP_SAVEDIR=sftp://u@h/d", "KDUMP_DUMPFORMAT=compressed")
    local = total("KDUMP_SAVEDIR=/var/crash", "KDUMP_DUMPFORMAT=compressed")
    assert sftp - local == memory.FLOOR.replay + memory.READ_BACK + MIB - MIB // 4
    # FTP keeps a larger replay ring (no acknowledgements)
    ftp = total("KDUMP_SAVEDIR=ftp://h/d", "KDUMP_DUMPFORMAT=compressed")
    assert ftp - local == memory.FTP_REPLAY + memory.FTP_SOCKET + MIB // 2 - MIB // 4
    nfs = total("KDUMP_SAVEDIR=nfs://h/d", "KDUMP_DUMPFORMAT=compressed")
    assert nfs - local == memory.NFS_WRITEBACK
    cifs = total("KDUMP_SAVEDIR=cifs://u:p@h/s/d", "KDUMP_DUMPFORMAT=compressed")
    assert cifs - local == 2 * memory.FLOOR.replay + 2 * MIB - MIB // 4
    # S3: one upload part of S3's 5 MiB minimum at the floor (the replay budget is less),
    # and the send buffer TCP grows for the PUT of a part
    s3 = total("KDUMP_SAVEDIR=s3+http://h/bucket/d", "KDUMP_DUMPFORMAT=compressed")
    assert s3 - local == memory.S3_MIN_PART + memory.S3_SOCKET + MIB - MIB // 4
    # ...but 10,000 parts must hold the largest file: for a 1 TiB machine (plus 1/64 of
    # format overhead) that takes parts of 107 MiB
    s3_big = est.estimate(_cfg("KDUMP_SAVEDIR=s3://h/bucket/d"), FACTS, 1 << 28)
    assert _parts(s3_big)["save: upload parts"] == 107 * MIB
    # ELF at level 0 has no bitmaps; a 1 TiB machine's are two 256 KiB windows (cyclic)
    elf0 = est.estimate(_cfg("KDUMP_SAVEDIR=/c"), FACTS, 1 << 28)
    assert not [p for p in _parts(elf0) if "bitmaps" in p]
    big = est.estimate(_cfg("KDUMP_SAVEDIR=/c", "KDUMP_DUMPFORMAT=zstd"), FACTS, 1 << 28)
    assert _parts(big)["save: bitmaps for 1024.0 GiB"] == 512 << 10
    # a fallback list counts the target that needs the most
    both = total("KDUMP_SAVEDIR=/var/crash sftp://u@h/d", "KDUMP_DUMPFORMAT=compressed")
    assert both == sftp


def test_machine_max_pfn_from_iomem(tmp_path):
    iomem = tmp_path / "iomem"
    iomem.write_text(
        "00000000-00000fff : Reserved\n"
        "00001000-0009fbff : System RAM\n"
        "00100000-3ffdffff : System RAM\n"
        "  01000000-01ffffff : Kernel code\n"
        "100000000-13fffffff : System RAM\n"
        "fec00000-fec003ff : IOAPIC 0\n"
    )
    assert est.machine_max_pfn(str(iomem)) == 0x140000
    hidden = tmp_path / "hidden"  # what a non-root reader sees
    hidden.write_text("00000000-00000000 : System RAM\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000000 kB\n")
    assert est.machine_max_pfn(str(hidden), str(meminfo)) == 1000000 * 1024 // 4096


def test_estimate_command_reads_the_image_record(tmp_path):
    img = tmp_path / "capture.img"
    img.write_bytes(b"image")
    rebuild.write_record(str(img), {"configuration": "x"}, FACTS)
    r = cli(
        "estimate",
        "--config",
        "/nonexistent",
        "--set",
        "KDUMP_SAVEDIR=sftp://u@h/d",
        "--set",
        "KDUMP_DUMPFORMAT=compressed",
        "--initrd",
        str(img),
    )
    assert r.rc == 0, r.err
    assert "unpacked image (rootfs in RAM)" in r.out and "replay ring" in r.out
    assert "recommended: crashkernel=" in r.out and "current reservation" in r.out
    (tmp_path / "bare.img").write_bytes(b"x")
    r = cli("estimate", "--config", "/nonexistent", "--initrd", str(tmp_path / "bare.img"))
    assert r.rc == 11 and "no record of its sizes" in r.err


def test_check_warns_below_the_estimate():
    assert est.below_estimate(0, 128 * MIB) is None  # no reservation: check says so anyway
    assert est.below_estimate(128 * MIB, 128 * MIB) is None
    text = est.below_estimate(112 * MIB, 128 * MIB)
    assert "reservation (112 MiB) is below the estimate" in text and "crashkernel=128M" in text


def test_an_image_larger_than_half_the_memory_at_boot_raises_the_estimate():
    """rootfs is tmpfs, which the kernel sizes at boot to half of its memory: a file target
    with encryption (31.5 MiB unpacked) was estimated at 112M, where the kernel said
    "Initramfs unpacking failed: write error" and found no init (bench/capture_fitness.py).
    Twice the image in whole pages, the compressed image and ROOTFS_BOOT now bound it."""
    cfg = _cfg("KDUMP_SAVEDIR=/var/crash", "KDUMP_DUMPFORMAT=compressed", "KDUMP_DUMPLEVEL=31")
    big = {**FACTS, "compressed": 10 * MIB, "unpacked": 31 * MIB, "rootfs": 31 * MIB + MIB // 2}
    big["save_imports"] = 11 * MIB
    e = est.estimate(cfg, big, max_pfn=(1 << 30) // 4096)
    assert e.total == memory.ROOTFS_BOOT + 10 * MIB + 63 * MIB
    assert "more to unpack the image (rootfs: half of the memory at boot)" in _parts(e)
    assert e.crashkernel == 128 * MIB
    # a small image is bounded by the save, not by unpacking it
    small = {**FACTS, "compressed": 7 * MIB, "unpacked": 20 * MIB, "rootfs": 20 * MIB}
    assert not [p for p in _parts(est.estimate(cfg, small, (1 << 30) // 4096)) if "more" in p]
