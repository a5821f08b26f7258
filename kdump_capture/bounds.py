"""Size checks for data read from a dump: every size and offset is checked before use.

A crashed kernel's memory, and any dump file, is untrusted input: ELF program headers, note
sizes, VMCOREINFO values, kdump-compressed and flattened headers, the printk ring's
descriptors. Each reader takes sizes and offsets from the data itself, so each passes them
through ``check_span`` (or ``read_span``) before anything is allocated or read from them: a
span must start at a non-negative offset, fit inside what the file can hold and stay below a
sane limit for what it is. A violation is a VmcoreError naming the file, the field, and the
offset it was read from, never a MemoryError, a multi-GiB read or an endless loop.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from .errors import VmcoreError

# The largest file offset (off_t): an offset beyond it is not in any file.
MAX_OFFSET = (1 << 63) - 1

# Sane limits, for what real dumps hold.
# The notes of /proc/vmcore: about 400 bytes per possible CPU (8192 CPUs: 3.3 MiB) plus
# VMCOREINFO (one page) and, rarely, device dumps (NT_VMCOREDD) of a few MiB.
MAX_NOTES = 64 << 20
# VMCOREINFO is one page in the kernel (VMCOREINFO_BYTES = PAGE_SIZE, 64 KiB pages at most).
MAX_VMCOREINFO = 1 << 16
# One read of the crashed kernel's memory (a table, the printk ring's text or descriptors):
# the largest is the printk text area, at most 32 MiB in practice (log_buf_len=32M).
MAX_KERNEL_READ = 64 << 20


def _at(where: int | None) -> str:
    return "" if where is None else f"offset {where:#x}: "


def check_span(
    path: str,
    what: str,
    offset: int,
    size: int,
    holds: int | None,
    limit: int | None = None,
    where: int | None = None,
) -> None:
    """Raise VmcoreError unless ``size`` bytes at ``offset`` can be real.

    ``holds``: bytes the file (or memory) can hold, None if unknown; ``limit``: the sane
    maximum for this kind of data; ``where``: the file offset the values were read from.
    """
    at = _at(where)
    if offset < 0 or size < 0:
        raise VmcoreError(f"{path}: {at}{what}: negative offset {offset} or size {size}")
    if offset + size > MAX_OFFSET:
        raise VmcoreError(f"{path}: {at}{what} at {offset:#x} lies beyond any file")
    if limit is not None and size > limit:
        raise VmcoreError(
            f"{path}: {at}{what} of {size:#x} bytes is implausibly large (at most {limit:#x})"
        )
    if holds is not None and offset + size > holds:
        raise VmcoreError(
            f"{path}: {at}{what} at {offset:#x}-{offset + size:#x} lies past the end "
            f"of the file ({holds:#x} bytes)"
        )


def read_span(
    pread: Callable[[int, int], bytes],
    path: str,
    what: str,
    offset: int,
    size: int,
    holds: int | None,
    limit: int | None = None,
    where: int | None = None,
) -> bytes:
    """``check_span``, then exactly ``size`` bytes at ``offset`` through ``pread(size, offset)``."""
    check_span(path, what, offset, size, holds, limit, where)
    data = pread(size, offset)
    if len(data) != size:
        raise VmcoreError(
            f"{path}: offset {offset + len(data):#x}: file ends inside {what} "
            f"({size:#x} bytes at {offset:#x})"
        )
    return data


def _is_dev_null(st: os.stat_result) -> bool:
    """/dev/null (``--config /dev/null``: the built-in defaults), by its device number."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def read_small_file(path: str, limit: int) -> bytes:
    """The content of ``path``, a regular file of at most ``limit`` bytes (or /dev/null).

    For files a configuration names (the config itself, SSH keys, CA bundles): a FIFO is
    opened without blocking and refused (``--config FIFO`` and ``KDUMP_SSH_IDENTITY=FIFO``
    waited for a writer for good), and no more than ``limit`` + 1 bytes are ever read
    (``KDUMP_SSH_IDENTITY=/dev/zero`` grew the save to 19 GB). OSError from opening or
    reading; ValueError, naming the file, for anything but a small regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or _is_dev_null(st)):
            raise ValueError(f"{path}: not a regular file")
        parts, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            parts.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return data
