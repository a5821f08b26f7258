"""File targets write behind: a dump does not stay in the page cache while it is written.

A capture kernel has tens of MiB to spare; a dump of several GiB that stays cached and
dirty until the final fsync means reclaim and writeback throttling during the save.
transports.base.WriteBehind starts writeback as data comes and drops what lies CACHE_LAG behind.
Residency is read with mincore(2) on a private mapping of the file.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os

import pytest

from kdump_capture import checksum
from transports import base
from transports import file as filetr

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def resident(path: str, start: int, length: int) -> int:
    """How many pages of path[start:start+length] are in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, for from_buffer
    try:
        buf = (ctypes.c_char * len(m)).from_buffer(m)
        vec = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        if libc.mincore(ctypes.addressof(buf) + start, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del buf
        return sum(v & 1 for v in vec)
    finally:
        m.close()


@pytest.fixture
def dump_dir(tmp_path):
    """tmp_path, if its filesystem drops clean pages on POSIX_FADV_DONTNEED (tmpfs does not)."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(4 * MiB))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident(str(probe), 0, 4 * MiB) > 4 * MiB // PAGE // 2:
        pytest.skip("this filesystem keeps clean pages cached on POSIX_FADV_DONTNEED")
    probe.unlink()
    return tmp_path


def temp_file(directory) -> str:
    (name,) = [n for n in os.listdir(directory) if n != "vmcore"]
    return os.path.join(directory, name)


def _sink(dump_dir) -> filetr.FileSink:
    """A file sink in ``dump_dir``, which it holds open by descriptor (and closes)."""
    fd = os.open(dump_dir, os.O_RDONLY | os.O_DIRECTORY)
    return filetr.FileSink(fd, str(dump_dir), "vmcore", checksum.SHA256)


def test_written_data_leaves_the_cache_once_on_disk(dump_dir):
    block = os.urandom(MiB)
    first = 48 * MiB
    with _sink(dump_dir) as sink:
        for _ in range(first // MiB):
            sink.write(block)
        # Put the first 48 MiB on disk (clean pages): what the writeback started above
        # does on its own, given time.
        fd = os.open(temp_file(dump_dir), os.O_RDONLY)
        os.fdatasync(fd)
        os.close(fd)
        for _ in range(32):
            sink.write(block)
        lag_end = (first + 32 * MiB) - base.CACHE_LAG - base.FLUSH_STEP
        assert lag_end > 32 * MiB
        # Clean and more than CACHE_LAG behind the end: dropped.
        assert resident(temp_file(dump_dir), 32 * MiB, first - 32 * MiB) == 0
        info = sink.commit()
    path = os.path.join(dump_dir, "vmcore")
    assert info.size == 80 * MiB == os.path.getsize(path)
    # On disk after the commit: none of it stays cached.
    assert resident(path, 0, info.size) == 0
    with open(path, "rb") as f:
        h = hashlib.sha256()
        while chunk := f.read(MiB):
            h.update(chunk)
    assert info.digest == h.hexdigest()


def test_seek_back_into_dropped_data_is_written(dump_dir):
    """A header rewritten after its pages left the cache still lands (kdump formats do this)."""
    sink = _sink(dump_dir)
    for i in range(40):
        sink.write(bytes([i]) * MiB)
    sink.seek(PAGE // 2)
    sink.write(b"HEADER")
    sink.seek(40 * MiB)
    sink.write(b"tail")
    info = sink.commit()
    with open(os.path.join(dump_dir, "vmcore"), "rb") as f:
        data = f.read()
    expect = bytearray(b"".join(bytes([i]) * MiB for i in range(40)) + b"tail")
    expect[PAGE // 2 : PAGE // 2 + 6] = b"HEADER"
    assert data == bytes(expect)
    assert info.digest == hashlib.sha256(expect).hexdigest()


def test_dump_device_data_leaves_the_cache(dump_dir):
    """KDUMP_DUMPDEV: the device's page cache is the same pile-up as a file's."""
    from kdump_capture.dumpdev import DATA_OFFSET, DeviceSink

    path = str(dump_dir / "dumpdev")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, DATA_OFFSET + 64 * MiB)
        sink = DeviceSink(fd, path, 64 * MiB)
        data = os.urandom(MiB)
        for _ in range(40):
            sink.write(data)
        info = sink.commit()
    finally:
        os.close(fd)
    assert info.size == 40 * MiB
    assert info.digest == hashlib.sha256(data * 40).hexdigest()
    assert resident(path, 0, DATA_OFFSET + 40 * MiB) <= 1  # the header page may stay
