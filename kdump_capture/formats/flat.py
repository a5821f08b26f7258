"""makedumpfile's flattened format (``-F``): positioned writes as a stream, and ``-R`` to undo it.

A flattened stream is a 4096-byte header (``"makedumpfile"``, type 1, version 1, big-endian)
followed by records ``{int64 offset; int64 size}`` (big-endian) + ``size`` bytes, each meaning
"write these bytes at ``offset`` of the real file", and an end marker (offset = size = -1).
Records may come in any order and overlap; later ones win, uncovered bytes read as zeros.
"""

from __future__ import annotations

import bisect
import os
import struct
from typing import Protocol

from ..errors import VmcoreError

FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER = struct.Struct(">16sqq")  # char signature[16]; int64 type; int64 version
FLAT_HEADER_SIZE = 4096  # the header is padded to one page (MAX_SIZE_MDF_HEADER)
FLAT_TYPE_DUMPFILE = 1
FLAT_VERSION = 1
RECORD = struct.Struct(">qq")  # struct makedumpfile_data_header: offset, buf_size
END_MARKER = RECORD.pack(-1, -1)
assert FLAT_HEADER.size == 32 and RECORD.size == 16
# Copy records in pieces of this size when rearranging (bounded memory for any record).
COPY_CHUNK = 1 << 20


def flat_header() -> bytes:
    head = FLAT_HEADER.pack(FLAT_SIGNATURE, FLAT_TYPE_DUMPFILE, FLAT_VERSION)
    return head + bytes(FLAT_HEADER_SIZE - len(head))


class PlacedOutput(Protocol):
    """Writes bytes at absolute offsets of the dump file; returns bytes sent to the sink."""

    flattened: bool

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> int: ...

    def finish(self) -> int: ...


class SeekOutput:
    """Positioned writes on a seekable sink (seek only when the position changes)."""

    flattened = False

    def __init__(self, sink) -> None:
        self.sink = sink

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if self.sink.tell() != offset:
            self.sink.seek(offset)
        self.sink.write(data)
        return len(data)

    def finish(self) -> int:
        return 0


class FlatOutput:
    """Positioned writes as a flattened stream on any (non-seekable) sink."""

    flattened = True

    def __init__(self, sink) -> None:
        self.sink = sink
        self.started = False

    def _start(self) -> int:
        self.started = True
        self.sink.write(flat_header())
        return FLAT_HEADER_SIZE

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        n = 0 if self.started else self._start()
        if not len(data):
            return n
        self.sink.write(RECORD.pack(offset, len(data)))
        self.sink.write(data)
        return n + RECORD.size + len(data)

    def finish(self) -> int:
        n = 0 if self.started else self._start()
        self.sink.write(END_MARKER)
        return n + RECORD.size


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise VmcoreError(
            f"{path}: offset {f.tell():#x}: flattened stream ends inside {what} "
            "(truncated: no end marker)"
        )
    return data


def check_flat_header(head: bytes, path: str) -> None:
    if len(head) < FLAT_HEADER.size:
        raise VmcoreError(f"{path}: too short for a flattened dump header")
    sig, ftype, version = FLAT_HEADER.unpack_from(head)
    if sig.rstrip(b"\0") != FLAT_SIGNATURE:
        raise VmcoreError(f"{path}: offset 0x0: not a flattened dump (signature {sig[:12]!r})")
    if ftype != FLAT_TYPE_DUMPFILE:
        raise VmcoreError(f"{path}: offset 0x10: flattened type {ftype} is not 1 (dump file)")


def is_flattened(head: bytes) -> bool:
    return head[:16].rstrip(b"\0") == FLAT_SIGNATURE


def rearrange(src_path: str, dst_path: str) -> int:
    """Rebuild the normal dump file from a flattened stream (like ``makedumpfile -R``).

    Returns the size of the result. Raises VmcoreError for a malformed or truncated stream
    (the partial output is removed).
    """
    with open(src_path, "rb", buffering=COPY_CHUNK) as src:
        check_flat_header(_read_exact(src, FLAT_HEADER_SIZE, src_path, "the header"), src_path)
        fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            end = 0
            while True:
                offset, size = RECORD.unpack(_read_exact(src, RECORD.size, src_path, "a record"))
                if offset == -1 and size == -1:
                    break
                if offset < 0 or size <= 0:
                    raise VmcoreError(
                        f"{src_path}: offset {src.tell() - RECORD.size:#x}: bad record header "
                        f"(offset {offset}, size {size})"
                    )
                pos = offset
                left = size
                while left:
                    piece = _read_exact(src, min(left, COPY_CHUNK), src_path, "record data")
                    os.pwrite(fd, piece, pos)
                    pos += len(piece)
                    left -= len(piece)
                end = max(end, offset + size)
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(dst_path)
            raise
        os.close(fd)
    return end


class FlatFile:
    """Random access to the file a flattened stream describes (without rearranging it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._index()
        except BaseException:
            self.f.close()
            raise

    def _index(self) -> None:
        f = self.f
        check_flat_header(_read_exact(f, FLAT_HEADER_SIZE, self.path, "the header"), self.path)
        recs: list[tuple[int, int, int, int]] = []  # (offset, size, stream position, order)
        total = os.fstat(f.fileno()).st_size
        pos = FLAT_HEADER_SIZE
        while True:
            f.seek(pos)
            offset, size = RECORD.unpack(_read_exact(f, RECORD.size, self.path, "a record"))
            if offset == -1 and size == -1:
                break
            if offset < 0 or size <= 0 or pos + RECORD.size + size > total:
                raise VmcoreError(
                    f"{self.path}: offset {pos:#x}: bad or truncated record "
                    f"(offset {offset}, size {size})"
                )
            recs.append((offset, size, pos + RECORD.size, len(recs)))
            pos += RECORD.size + size
        recs.sort()
        self._recs = recs
        self._starts = [r[0] for r in recs]
        self._maxlen = max((r[1] for r in recs), default=0)
        self.size = max((r[0] + r[1] for r in recs), default=0)

    def pread(self, size: int, offset: int) -> bytes:
        """Bytes ``offset..offset+size`` of the rearranged file (zeros where no record)."""
        size = max(0, min(size, self.size - offset))
        out = bytearray(size)
        if not size:
            return bytes(out)
        end = offset + size
        lo = bisect.bisect_left(self._starts, offset - self._maxlen)
        hi = bisect.bisect_left(self._starts, end)
        hits = [r for r in self._recs[lo:hi] if r[0] + r[1] > offset]
        for r_off, r_size, r_pos, _ in sorted(hits, key=lambda r: r[3]):  # later wins
            s = max(offset, r_off)
            e = min(end, r_off + r_size)
            self.f.seek(r_pos + (s - r_off))
            out[s - offset : e - offset] = self.f.read(e - s)
        return bytes(out)

    def close(self) -> None:
        self.f.close()
