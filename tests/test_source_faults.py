"""A source that fails or ends early (issue 8, item 10 and the fault matrix's EIO row).

Unreadable pages (EIO, as /proc/vmcore gives for memory the first kernel could not hand over)
are retried once, then saved as zeros and listed in the README and manifest; the rest of the
dump is saved and it is complete. A source that ends before its expected size gives an
INCOMPLETE dump (status "incomplete", exit 13), never a complete one. The faults come from
test-only Vmcore subclasses (tests/faulty.py), never from hooks in the engine.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from kdump_capture.dumpfile import open_dump
from kdump_capture.errors import IncompleteDump
from kdump_capture.pipeline import SavePlan, save_to_target
from kdump_capture.sample import PAGE, RAM_START, KernelImage
from kdump_capture.urls import parse_savedir
from kdump_capture.vmcore import open_vmcore
from transports.base import TransportSettings

from .faulty import EioVmcore, ShortVmcore, adopt
from .helpers import cli, save_args

MIB = 1 << 20
RAM_PAGES = 1024  # 4 MiB of synthetic RAM: page tables, struct pages, printk ring, data
DATA_PAGES = range(600, 1000)  # pages of random data (the kernel structures sit below)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A synthetic kernel's vmcore whose pages 600-999 hold random (incompressible) data."""
    k = KernelImage(RAM_PAGES)
    k.build([(0, b"Linux version 6.1.0-synthetic"), (1000, b"before the crash")])
    rng = random.Random(8)
    for i in DATA_PAGES:
        k.put(RAM_START + i * PAGE, rng.randbytes(PAGE))
    path = str(tmp_path_factory.mktemp("img") / "vmcore")
    k.write(path)
    return path


def _save(vm, savedir, fmt="elf", level=0):
    targets, _ = parse_savedir(f"file://{savedir}")
    plan = SavePlan(
        targets=targets,
        dump_format=fmt,
        dump_level=level,
        keep_old_dumps=0,
        free_disk_size=0,
        settings=TransportSettings(),
    )
    return save_to_target(vm, plan, targets[0])


def _manifest(dumpdir):
    with open(os.path.join(dumpdir, "manifest.json")) as f:
        return json.load(f)


def _page_offset(vm, page):
    """Source offset of RAM page ``page`` (the image has one RAM PT_LOAD)."""
    return vm.loads[0].offset + page * PAGE


# Two unreadable ranges: one of 3 pages, one of a single page at a 1 MiB chunk boundary.
BAD_PAGES = [(650, 653), (768, 769)]


@pytest.mark.parametrize(
    ("fmt", "level"), [("elf", 0), ("elf", 1), ("compressed", 1), ("zstd", 31)]
)
def test_eio_ranges_are_zeros_recorded_and_the_rest_is_saved(image, tmp_path, fmt, level):
    vm = open_vmcore(image)
    bad = [(_page_offset(vm, a), _page_offset(vm, b)) for a, b in BAD_PAGES]
    faulty = adopt(vm, EioVmcore, bad=list(bad))
    res = _save(faulty, tmp_path / "dumps", fmt, level)
    d = tmp_path / "dumps" / res.directory
    doc = _manifest(d)
    assert doc["status"] == "complete"
    assert [(r["offset"], r["offset"] + r["size"]) for r in doc["unreadable"]] == bad
    assert [r["paddr"] for r in doc["unreadable"]] == [RAM_START + a * PAGE for a, _ in BAD_PAGES]
    assert doc["unreadable_bytes"] == 4 * PAGE
    readme = (d / "README.txt").read_text()
    assert "UNREADABLE: 16384 bytes" in readme and f"offset {bad[0][0]:#x}" in readme
    assert faulty.failures >= 2  # the first read, then the page-by-page retry

    src = open(image, "rb").read()
    if fmt == "elf" and level == 0:
        expect = bytearray(src)
        for a, b in bad:
            expect[a:b] = bytes(b - a)
        assert (d / "vmcore").read_bytes() == expect
        return
    with open_dump(str(d / "vmcore")) as dump:
        for a, b in BAD_PAGES:
            assert dump.read_phys(RAM_START + a * PAGE, (b - a) * PAGE) == bytes((b - a) * PAGE)
        for page in (600, 649, 653, 767, 769, 999):  # readable neighbours are intact
            off = _page_offset(vm, page)
            assert dump.read_phys(RAM_START + page * PAGE, PAGE) == src[off : off + PAGE]
        assert "before the crash" in dump.dmesg()


def test_a_transient_read_error_is_retried_and_loses_nothing(image, tmp_path):
    vm = open_vmcore(image)
    bad = [(_page_offset(vm, a), _page_offset(vm, b)) for a, b in BAD_PAGES]
    faulty = adopt(vm, EioVmcore, bad=list(bad), transient=True)
    res = _save(faulty, tmp_path / "dumps")
    d = tmp_path / "dumps" / res.directory
    doc = _manifest(d)
    assert faulty.failures == 2 and doc["status"] == "complete" and doc["unreadable"] == []
    assert (d / "vmcore").read_bytes() == open(image, "rb").read()


def test_raw_source_eio_at_a_chunk_boundary_is_not_the_end(image, tmp_path):
    # /dev/oldmem used to end the copy at the first EIO on a chunk boundary and call the
    # truncated copy complete.
    raw = tmp_path / "dev-oldmem"
    data = random.Random(3).randbytes(3 * MIB)
    raw.write_bytes(data)
    vm = open_vmcore(str(raw))
    assert vm.kind == "raw" and vm.size == 3 * MIB
    faulty = adopt(vm, EioVmcore, bad=[(MIB, MIB + 2 * PAGE)])
    res = _save(faulty, tmp_path / "dumps", "raw")
    d = tmp_path / "dumps" / res.directory
    doc = _manifest(d)
    assert doc["status"] == "complete" and doc["unreadable"] == [
        {"offset": MIB, "size": 2 * PAGE, "paddr": MIB}
    ]
    out = (d / "vmcore").read_bytes()
    assert len(out) == 3 * MIB and out[MIB : MIB + 2 * PAGE] == bytes(2 * PAGE)
    assert out[:MIB] == data[:MIB] and out[MIB + 2 * PAGE :] == data[MIB + 2 * PAGE :]


@pytest.mark.parametrize(("fmt", "level"), [("raw", 0), ("elf", 0), ("elf", 1), ("zstd", 31)])
def test_a_source_that_ends_early_is_saved_incomplete(image, tmp_path, fmt, level):
    vm = open_vmcore(image)
    end = _page_offset(vm, 700)
    short = adopt(vm, ShortVmcore, end=end)
    with pytest.raises(IncompleteDump, match="INCOMPLETE") as e:
        _save(short, tmp_path / "dumps", fmt, level)
    assert e.value.exit_code == 13
    (name,) = os.listdir(tmp_path / "dumps")
    d = tmp_path / "dumps" / name
    doc = _manifest(d)
    assert doc["status"] == "incomplete" and "ended" in doc["error"]
    assert "vmcore" in doc["files"]  # what was read is kept
    assert (d / "README.txt").read_text().startswith("Kernel crashdump (INCOMPLETE)")
    if fmt in ("raw", "elf") and level == 0:
        assert (d / "vmcore").read_bytes() == open(image, "rb").read()[:end]
    r = cli("verify", str(d))
    assert r.rc == 8 and "incomplete" in r.err


def test_save_from_dev_null_is_not_complete(tmp_path):
    # A character device is raw memory: its size is the end of System RAM in /proc/iomem.
    # /dev/null ends at once: an INCOMPLETE dump (13), or no size known (not root: 4).
    savedir = tmp_path / "dumps"
    r = cli(*save_args("/dev/null", str(savedir)))
    assert r.rc in (4, 13), r.err
    for name in os.listdir(savedir) if savedir.exists() else []:
        if os.path.exists(savedir / name / "manifest.json"):
            assert _manifest(savedir / name)["status"] != "complete"
        assert cli("verify", str(savedir / name)).rc == 8
