"""bench/measure.py's page-cache preparation: what every formats table starts from."""

from __future__ import annotations

import ctypes
import mmap
import os

from bench import measure

LIBC = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), from mincore(2)."""
    size = os.path.getsize(path)
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    LIBC.mmap.restype = ctypes.c_void_p
    LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * n)()
            assert LIBC.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec), n
        finally:
            LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def test_refresh_drops_and_reads_the_file_again(tmp_path):
    path = str(tmp_path / "sample")
    data = os.urandom(4 << 20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident_pages(path)[0] < 1024  # the fsync'ed file can leave the cache
    out = measure.refresh(path)
    assert resident_pages(path) == (1024, 1024)
    assert set(out) <= {"read_s", "file_huge_mib"} and out["read_s"] >= 0
    assert isinstance(out.get("file_huge_mib", 0), int)
    with open(path, "rb") as f:
        assert f.read() == data
