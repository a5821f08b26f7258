"""Fuzz targets: dump files we and makedumpfile write (kdump-compressed, flattened).

``kdump``: the input is a kdump-compressed file; it is opened, its kernel log extracted and
some pages read. ``flat``: the input is a flattened stream, read in place the same way.
``rearrange``: the input is a flattened stream rebuilt into a file (``makedumpfile -R``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import cache

from kdump_capture.dumpfile import open_dump
from kdump_capture.errors import KdumpError
from kdump_capture.formats.flat import rearrange
from kdump_capture.sample import PAGE, RAM_START

from .t_vmcore import _memfile, quiet

# Pages read from each dump besides the log: the first pages of RAM.
READ_PAGES = 8


def _read(path: str) -> None:
    with open_dump(path) as d:
        try:
            d.dmesg()
        except KdumpError:
            pass  # a bad log is one finding less than a bad dump: go on to the pages
        for i in range(READ_PAGES):
            try:
                d.read_phys(RAM_START + i * PAGE, PAGE)
            except KdumpError:
                pass


def _kdump(data: bytes) -> None:
    _read(_memfile("kdump").put(data))


def _flat(data: bytes) -> None:
    _read(_memfile("flat").put(data))


@cache
def _outdir() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="fuzz-rearrange-", dir=base)


def _rearrange(data: bytes) -> None:
    src = _memfile("rearrange").put(data)
    out = os.path.join(_outdir(), "out")
    try:
        rearrange(src, out)
    finally:
        for name in os.listdir(_outdir()):
            p = os.path.join(_outdir(), name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)


TARGETS = {"kdump": quiet(_kdump), "flat": quiet(_flat), "rearrange": quiet(_rearrange)}
