"""Fuzz targets: the dump-device header and the recover read path (untrusted device data)."""

from __future__ import annotations

import atexit
import functools
import os
import tempfile

from kdump_capture import dumpdev


@functools.cache
def _image_path() -> str:
    """One device image per process, rewritten for every input (in RAM where /dev/shm is)."""
    fd, path = tempfile.mkstemp(
        prefix="fuzz-dumpdev-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    os.close(fd)
    atexit.register(os.unlink, path)
    return path


def _header(data: bytes) -> None:
    """The header parser alone, against a device as large as the input and a huge one."""
    dumpdev.DeviceHeader.unpack(data, "fuzz", len(data))
    dumpdev.DeviceHeader.unpack(data, "fuzz", 1 << 40)


def _device(data: bytes) -> None:
    """What `recover` does with a device image: header, source, the copy checked as it
    streams (its SHA-256)."""
    path = _image_path()
    with open(path, "wb") as f:
        f.write(data)
    header = dumpdev.read_header(path)
    if header is None or header.state == dumpdev.WRITING:
        return
    with dumpdev.open_device_dump(path, header) as vm:
        vm.pread(64, 0)
        buf, off = bytearray(1 << 16), 0
        while n := vm.read_data(buf, off):
            off += n


TARGETS = {"dumpdev_header": _header, "dumpdev": _device}
