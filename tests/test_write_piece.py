"""Local files are written in pieces that keep to unreported memory under free page reporting."""

from __future__ import annotations

import os

import pytest

import transports.file as tfile
from kdump_capture import dumpdev
from kdump_capture.memory import MIB, file_write_piece, write_piece
from kdump_capture.urls import parse_target
from transports import open_transport
from transports.base import TransportSettings


def fake_sys(root, order: str | None, features: list[str]) -> str:
    """A /sys with page_reporting's order (None: no such module) and virtio balloons."""
    if order is not None:
        p = root / "module/page_reporting/parameters"
        p.mkdir(parents=True)
        (p / "page_reporting_order").write_text(order + "\n")
    drv = root / "bus/virtio/drivers/virtio_balloon"
    drv.mkdir(parents=True)
    (drv / "bind").write_text("")
    for i, bits in enumerate(features):
        dev = root / f"devices/virtio{i}"
        dev.mkdir(parents=True)
        (dev / "features").write_text(bits + "\n")
        (drv / f"virtio{i}").symlink_to(dev)
    return str(root)


REPORTING = "0110010000000000000000000000000010000000"  # this machine's balloon: bits 1, 2, 5, 32
NO_REPORTING = "0110000000000000000000000000000010000000"


@pytest.mark.parametrize(
    "order, features, piece",
    [
        ("5", [REPORTING], 64 << 10),  # reported blocks start at 128 KiB: 64 KiB folios
        ("4", [NO_REPORTING, REPORTING], 32 << 10),  # any balloon that reports
        ("8", [REPORTING], 512 << 10),
        ("9", [REPORTING], None),  # reported blocks from 2 MiB: 1 MiB writes stay below
        ("-1", [REPORTING], None),  # not set by a device yet: the kernel's default
        ("3", [REPORTING], None),  # pieces of a few pages: more system calls than gain
        ("0", [REPORTING], None),
        ("5", [NO_REPORTING], None),  # a balloon that does not report
        ("5", [], None),  # no balloon
        (None, [REPORTING], None),  # a kernel without page reporting
        ("five", [REPORTING], None),  # unreadable: no limit, never an error
        ("5", ["01100"], None),  # too short to hold bit 5
    ],
)
def test_piece_from_sysfs(tmp_path, order, features, piece):
    assert file_write_piece(fake_sys(tmp_path, order, features)) == piece


def test_piece_without_sysfs(tmp_path):
    assert file_write_piece(str(tmp_path / "nothing")) is None


def test_file_sink_writes_in_pieces(tmp_path, monkeypatch):
    """The file transport hands write(2) at most one piece; the file is whole."""
    lengths = []
    real_write = os.write

    def write(fd, data):
        lengths.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(tfile, "write_piece", lambda: 64 << 10)
    target, _ = parse_target(f"file://{tmp_path}/dumps")
    data = os.urandom(3 * MIB + 5)
    with open_transport(target, TransportSettings()) as tr:
        with tr.create("vmcore") as sink:
            monkeypatch.setattr(os, "write", write)
            sink.write(data)
            monkeypatch.setattr(os, "write", real_write)
            sink.commit()
    assert max(lengths) == 64 << 10 and sum(lengths) == len(data)
    assert (tmp_path / "dumps/vmcore").read_bytes() == data


def test_the_piece_follows_this_machine():
    write_piece.cache_clear()
    assert write_piece() == (file_write_piece() or 1 << 62)


def test_dump_device_writes_in_pieces(tmp_path, monkeypatch):
    """The dump device sink (KDUMP_DUMPDEV) writes its data area in the same pieces."""
    lengths = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        lengths.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(dumpdev, "write_piece", lambda: 16 << 10)
    dev = tmp_path / "device"
    dev.write_bytes(bytes(dumpdev.DATA_OFFSET + 2 * MIB))
    data = os.urandom(MIB + 3)
    fd = os.open(dev, os.O_RDWR)
    try:
        sink = dumpdev.DeviceSink(fd, str(dev), 2 * MIB)
        monkeypatch.setattr(os, "pwrite", pwrite)
        sink.write(data)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
    finally:
        os.close(fd)
    assert max(lengths) == 16 << 10 and sum(lengths) == len(data)
    with open(dev, "rb") as f:
        f.seek(dumpdev.DATA_OFFSET)
        assert f.read(len(data)) == data
