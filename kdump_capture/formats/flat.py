"""makedumpfile's flattened format (``-F``): positioned writes as a stream, and ``-R`` to undo it.

A flattened stream is a 4096-byte header (``"makedumpfile"``, type 1, version 1, big-endian)
followed by records ``{int64 offset; int64 size}`` (big-endian) + ``size`` bytes, each meaning
"write these bytes at ``offset`` of the real file", and an end marker (offset = size = -1).
Records may come in any order and overlap; later ones win, uncovered bytes read as zeros.
"""

from __future__ import annotations

import array
import bisect
import heapq
import os
import stat
import struct

from ..elf import EHDR, ELFMAG, PHDR, PT_LOAD
from ..errors import ConfigError, TargetFull, TransportError, VmcoreError
from .structs import DISK_DUMP_HEADER, KDUMP_SIGNATURE, PAGE_DESC, DiskDumpHeader

# typing.TYPE_CHECKING without importing typing, which costs the capture's start-up ~3 ms
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Protocol

    class PlacedOutput(Protocol):
        """Writes bytes at absolute offsets of the dump file; returns bytes sent to the sink."""

        flattened: bool

        def put(self, offset: int, data: bytes | bytearray | memoryview) -> int: ...

        def finish(self) -> int: ...


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
# Bytes at the start of the file that must be known to bound it: an ELF header with up to
# 65535 program headers; a disk_dump_header needs only its 464 bytes.
HEAD_MAX = EHDR.size + 0xFFFF * PHDR.size
# Block (page) sizes of Linux architectures: 4 KiB to 256 KiB (hexagon).
MIN_BLOCK = 512
MAX_BLOCK = 1 << 18
# makedumpfile appends eraseinfo text (one line per erased symbol) after the page data.
ERASEINFO_ALLOWANCE = 1 << 20


def flat_header() -> bytes:
    head = FLAT_HEADER.pack(FLAT_SIGNATURE, FLAT_TYPE_DUMPFILE, FLAT_VERSION)
    return head + bytes(FLAT_HEADER_SIZE - len(head))


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
        from ..report import AGE_MAGIC, ENCRYPTED_HINT

        if head.startswith(AGE_MAGIC):
            raise VmcoreError(f"{path}: {ENCRYPTED_HINT}")
        raise VmcoreError(f"{path}: offset 0x0: not a flattened dump (signature {sig[:12]!r})")
    if ftype != FLAT_TYPE_DUMPFILE:
        raise VmcoreError(f"{path}: offset 0x10: flattened type {ftype} is not 1 (dump file)")


def is_flattened(head: bytes) -> bool:
    return head[:16].rstrip(b"\0") == FLAT_SIGNATURE


def implied_size(head: bytes | bytearray, path: str, stream_size: int | None = None) -> int | None:
    """The largest size the dump starting with ``head`` can have, from its own header.

    kdump-compressed: the header blocks and bitmaps, then a descriptor and a full block per
    page the bitmap can describe (at most ``max_mapnr``), the shared zero page and eraseinfo.
    ELF: the end of the furthest segment, and no further than the segments laid out one
    after the other (as every dump writer does). With ``stream_size`` (the flattened
    stream's size, when known) the parts that must be in the stream (bitmaps, descriptors,
    page data, segment data) are bounded by it too. None: ``head`` is too short to tell yet.
    Raises VmcoreError when the header is neither, or is malformed.
    """
    if len(head) < 8:
        return None
    if head[:8] == KDUMP_SIGNATURE:
        if len(head) < DISK_DUMP_HEADER.size:
            return None
        dh = DiskDumpHeader.unpack_from(head)
        bs = dh.block_size
        if not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
            raise VmcoreError(f"{path}: offset 0x1ac: bad block_size {bs} in the kdump header")
        if dh.sub_hdr_size < 0:
            raise VmcoreError(f"{path}: offset 0x1b0: bad sub_hdr_size {dh.sub_hdr_size}")
        if stream_size is not None and dh.bitmap_blocks * bs > stream_size:
            raise VmcoreError(
                f"{path}: offset 0x1b4: bitmap_blocks {dh.bitmap_blocks} makes "
                f"{dh.bitmap_blocks * bs:#x} bytes of bitmaps, more than the whole stream"
            )
        pages = dh.bitmap_blocks * bs // 2 * 8
        if dh.max_mapnr < 0xFFFFFFFF:  # else the real value is 64-bit, in the sub header
            pages = min(pages, dh.max_mapnr)
        header = bs * (1 + dh.sub_hdr_size + dh.bitmap_blocks)
        rest = pages * (PAGE_DESC.size + bs) + bs + ERASEINFO_ALLOWANCE
        if stream_size is not None:
            rest = min(rest, stream_size)  # descriptors and page data are all in the stream
        return header + rest
    if head[:4] == ELFMAG:
        if len(head) < EHDR.size:
            return None
        phoff, phentsize, phnum = _ELF_FIELDS.unpack_from(head, 32)
        if phentsize != PHDR.size or phoff > HEAD_MAX:
            raise VmcoreError(f"{path}: offset 0x20: bad ELF program header table")
        table_end = phoff + phnum * PHDR.size
        if len(head) < table_end:
            return None
        end = table_end
        dense = _align(table_end)
        for i in range(phnum):
            _, _, p_offset, _, _, p_filesz, _, _ = PHDR.unpack_from(head, phoff + i * PHDR.size)
            end = max(end, p_offset + p_filesz)
            dense += _align(p_filesz)
        if stream_size is not None and dense > _align(table_end) + stream_size + phnum * MAX_BLOCK:
            raise VmcoreError(
                f"{path}: the ELF program headers describe more data than the whole stream"
            )
        return min(end, dense)
    raise VmcoreError(
        f"{path}: the flattened stream holds neither a kdump-compressed nor an ELF dump "
        f"(it starts with {bytes(head[:8])!r})"
    )


def _placeholder_phdrs(head: bytes | bytearray) -> bool:
    """Whether ``head`` is an ELF header whose program headers are not written yet: none is
    a PT_LOAD (makedumpfile -F -E first writes them all zero; a dump's real ones always
    hold its memory)."""
    if head[:4] != ELFMAG or len(head) < EHDR.size:
        return False
    phoff, _, phnum = _ELF_FIELDS.unpack_from(head, 32)
    if len(head) < phoff + phnum * PHDR.size:
        return False
    types = (PHDR.unpack_from(head, phoff + i * PHDR.size)[0] for i in range(phnum))
    return all(t != PT_LOAD for t in types)


def _align(n: int) -> int:
    """``n`` rounded up to the largest block size (segments may be aligned to a page)."""
    return -(-n // MAX_BLOCK) * MAX_BLOCK


# e_phoff (u64 at 32); e_phentsize, e_phnum (u16 at 54, 56).
_ELF_FIELDS = struct.Struct("<Q14xHH")


def rearrange(src_path: str, dst_path: str) -> int:
    """Rebuild the normal dump file from a flattened stream (like ``makedumpfile -R``).

    The file is written under a new temporary name next to ``dst_path`` (created
    exclusively, never through a link) and renamed to ``dst_path`` only when the whole
    stream was applied: on any error ``dst_path`` is left as it was. Records must begin with
    the dump's header, and none may reach past the size that header implies
    (``implied_size``). Returns the size of the result. Raises VmcoreError for a malformed,
    truncated or out-of-bounds stream, TransportError when the output cannot be written,
    ConfigError when ``dst_path`` exists and is not a regular file (``_check_output``).
    """
    _check_output(dst_path)
    with open(src_path, "rb", buffering=COPY_CHUNK) as raw:
        src = _Counted(raw)  # a pipe (`... | rearrange /dev/stdin OUT`) cannot tell()
        check_flat_header(_read_exact(src, FLAT_HEADER_SIZE, src_path, "the header"), src_path)
        tmp, fd = _create_temp(dst_path)
        try:
            st = os.fstat(src.fileno())
            stream_size = st.st_size if stat.S_ISREG(st.st_mode) else None
            try:
                end = _apply_records(src, src_path, fd, dst_path, stream_size)
            except VmcoreError as e:
                if stream_size is None or _ends_with_marker(src, stream_size):
                    raise
                # A copy cut short: the header's bounds, shrunk to what the stream holds,
                # refuse a record before the stream's end is reached. Say what it is.
                raise VmcoreError(
                    f"{src_path}: the flattened stream is truncated ({stream_size} bytes, no "
                    f"end marker at its end: a copy cut short?): "
                    + str(e).removeprefix(f"{src_path}: ")
                ) from None
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
            os.fsync(fd)
            os.replace(tmp, dst_path)  # replaces a link at dst_path itself, never its target
            os.close(fd)  # only now: its lock marks the temporary file as in use until then
            fd = -1
            fsync_dir(dst_path)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)
            if isinstance(e, OSError):
                raise _output_error(dst_path, e) from e
            raise
    return end


class _Counted:
    """A stream read front to back that knows its position without seeking (a pipe)."""

    def __init__(self, f) -> None:
        self.f = f
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def fileno(self) -> int:
        return self.f.fileno()


def _ends_with_marker(src, stream_size: int) -> bool:
    """Whether the stream's last bytes are the end marker, as a complete stream's are."""
    if stream_size < FLAT_HEADER_SIZE + RECORD.size:
        return False
    return os.pread(src.fileno(), RECORD.size, stream_size - RECORD.size) == END_MARKER


def _apply_records(src, src_path: str, fd: int, dst_path: str, stream_size: int | None) -> int:
    end = 0
    # The file's first bytes (at most HEAD_MAX), until its header bounds the file, and which
    # of them a record has written: makedumpfile -F -E writes the program headers (at 0x40)
    # before the ELF header (at 0), so the header is whole once the run from 0 is covered.
    head = bytearray()
    covered = bytearray()
    known = 0  # bytes from 0 that records have written
    limit: int | None = None
    # makedumpfile -F -E writes zeroed program headers first and the real ones last: until
    # then the header bounds nothing, and the file is bounded as a dense writer lays it out,
    # by the header area plus the record data the stream has carried so far.
    placeholder = False
    seen = 0
    while True:
        at = src.tell()
        offset, size = RECORD.unpack(_read_exact(src, RECORD.size, src_path, "a record"))
        if offset == -1 and size == -1:
            break
        if offset < 0 or size <= 0:
            raise VmcoreError(
                f"{src_path}: offset {at:#x}: bad record header (offset {offset}, size {size})"
            )
        if limit is None and not placeholder and offset >= HEAD_MAX:
            raise VmcoreError(
                f"{src_path}: offset {at:#x}: record for {offset:#x} before the dump's header "
                "is complete (the stream must start with it)"
            )
        seen += size
        if placeholder and offset + size > HEAD_MAX + seen:
            raise VmcoreError(
                f"{src_path}: offset {at:#x}: record for {offset:#x}-{offset + size:#x} lies "
                f"beyond the {seen:#x} bytes of data the stream has carried so far (the "
                "ELF program headers are not written yet)"
            )
        if limit is not None and offset + size > limit:
            raise VmcoreError(
                f"{src_path}: offset {at:#x}: record for {offset:#x}-{offset + size:#x} lies "
                f"beyond the {limit:#x} bytes the dump's header allows"
            )
        pos = offset
        left = size
        while left:
            piece = _read_exact(src, min(left, COPY_CHUNK), src_path, "record data")
            if limit is None and not placeholder and pos < HEAD_MAX:
                part = piece[: HEAD_MAX - pos]
                if len(head) < pos + len(part):
                    grow = pos + len(part) - len(head)
                    head += bytes(grow)
                    covered += bytes(grow)
                head[pos : pos + len(part)] = part
                covered[pos : pos + len(part)] = b"\1" * len(part)
            try:
                os.pwrite(fd, piece, pos)
            except OSError as e:
                raise _output_error(dst_path, e) from e
            pos += len(piece)
            left -= len(piece)
        end = max(end, offset + size)
        if limit is None and not placeholder:
            known = covered.find(0, known)
            if known < 0:
                known = len(covered)
            limit = implied_size(head[:known], src_path, stream_size)
            if limit is not None and _placeholder_phdrs(head[:known]):
                placeholder, limit, head, covered = True, None, bytearray(), bytearray()
                known = HEAD_MAX  # nothing more to learn from the header's first version
            if limit is None and not placeholder and known >= HEAD_MAX:
                raise VmcoreError(f"{src_path}: the dump's header is implausibly large")
            if limit is not None and end > limit:
                raise VmcoreError(
                    f"{src_path}: offset {at:#x}: the first record ({end:#x} bytes) is larger "
                    f"than the {limit:#x} bytes the dump's header allows"
                )
    if limit is None and end and not placeholder:
        implied_size(head[:known], src_path, stream_size)  # raises for a stream not a dump
        raise VmcoreError(f"{src_path}: the stream ends inside the dump's header")
    return end


def _check_output(dst_path: str) -> None:
    """Refuse an output that exists and is neither a regular file nor a link.

    The result is renamed over ``dst_path``, which replaces whatever is there: a device
    node (``/dev/null``, as root) or a FIFO would become a regular file, and neither can
    take the positioned writes anyway. A link is replaced itself, never written through
    (the command line refuses one: ``/dev/stdout`` is a link).
    """
    try:
        mode = os.lstat(dst_path).st_mode
    except OSError:
        return  # nothing there: creating the file says what is wrong, if anything
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise ConfigError(
        f"{dst_path}: {kind}: rearrange writes a regular file in its place (it needs to "
        "seek: not a device or a pipe); name a file"
    )


def _create_temp(dst_path: str) -> tuple[str, int]:
    """A new file next to ``dst_path``: O_EXCL and O_NOFOLLOW, so no link is ever followed;
    locked while the descriptor is open (``private.lock_new``: `decrypt` removes a killed
    run's temporary file, never one in use)."""
    from ..private import lock_new

    folder, name = os.path.split(dst_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(8):
        tmp = os.path.join(folder, f".{name}.rearrange-{os.urandom(6).hex()}")
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise _output_error(dst_path, e) from e
        if lock_new(fd, tmp):
            return tmp, fd
        os.close(fd)  # removed as a leftover before we held it: another name
    raise TransportError(
        f"{dst_path}: cannot write the rearranged dump: its temporary files vanish"
    )


def _output_error(dst_path: str, e: OSError) -> TransportError:
    cls = TargetFull if e.errno == 28 else TransportError  # ENOSPC
    return cls(f"{dst_path}: cannot write the rearranged dump: {e.strerror}")


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (a rename in it lasts); errors are ignored."""
    try:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# A flattened stream is indexed in lanes: runs of records in stream order whose offsets only
# grow and do not overlap (a dump writer's header, bitmaps, descriptors and page data make a
# handful). Each record costs 24 bytes in three arrays, whatever the stream; a stream that
# needs more lanes, or more records than the index may hold, is refused with the advice to
# rearrange it (``rearrange`` streams with bounded memory).
MAX_LANES = 64
MAX_RECORDS = 8 << 20  # 192 MiB of index; a 1 TiB dump at level 0 writes about 4M


class _Lane:
    __slots__ = ("offs", "ends", "poss")

    def __init__(self) -> None:
        self.offs = array.array("q")
        self.ends = array.array("q")
        self.poss = array.array("q")  # where the record's bytes start in the stream


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
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise VmcoreError(f"{self.path}: a flattened dump must be a regular file")
        total = st.st_size
        lanes: list[_Lane] = []
        tails: list[int] = []  # each lane's last end
        size = data_bytes = count = 0
        pos = FLAT_HEADER_SIZE
        while True:
            f.seek(pos)
            offset, rsize = RECORD.unpack(_read_exact(f, RECORD.size, self.path, "a record"))
            if offset == -1 and rsize == -1:
                break
            if offset < 0 or rsize <= 0:
                raise VmcoreError(
                    f"{self.path}: offset {pos:#x}: bad record (offset {offset}, size {rsize})"
                )
            if pos + RECORD.size + rsize > total:
                raise VmcoreError(
                    f"{self.path}: offset {pos:#x}: the flattened stream is truncated ({total} "
                    f"bytes, a record of {rsize} bytes runs past its end, no end marker: a "
                    "copy cut short, or its writer stopped)"
                )
            count += 1
            if count > MAX_RECORDS:
                raise VmcoreError(
                    f"{self.path}: offset {pos:#x}: more than {MAX_RECORDS} records; "
                    "rearrange the stream first (kdump-capture rearrange)"
                )
            best = -1  # the lane this record continues: the one ending closest before it
            for i, tail in enumerate(tails):
                if tail <= offset and (best < 0 or tail > tails[best]):
                    best = i
            if best < 0:
                if len(lanes) == MAX_LANES:
                    raise VmcoreError(
                        f"{self.path}: offset {pos:#x}: records overlap or go back more "
                        "often than a dump writer's do; rearrange the stream first "
                        "(kdump-capture rearrange)"
                    )
                lanes.append(_Lane())
                tails.append(0)
                best = len(lanes) - 1
            lane = lanes[best]
            end = offset + rsize
            lane.offs.append(offset)
            lane.ends.append(end)
            lane.poss.append(pos + RECORD.size)
            tails[best] = end
            size = max(size, end)
            data_bytes += rsize
            pos += RECORD.size + rsize
        self._lanes = lanes
        self.size = size
        #: bytes of record data: no structure of the file can be larger
        self.data_bytes = data_bytes
        if self.size:
            limit = implied_size(self.pread(min(self.size, HEAD_MAX), 0), self.path, total)
            if limit is not None and self.size > limit:
                raise VmcoreError(
                    f"{self.path}: a record reaches {self.size:#x}, beyond the {limit:#x} "
                    "bytes the dump's header allows"
                )

    def pread(self, size: int, offset: int) -> bytes:
        """Bytes ``offset..offset+size`` of the rearranged file (zeros where no record)."""
        size = max(0, min(size, self.size - offset))
        out = bytearray(size)
        if not size:
            return bytes(out)
        end = offset + size
        # Each lane's pieces come in stream order; merged, later records win. Nothing is
        # collected: a range may be covered by millions of records.
        pieces = heapq.merge(*(self._pieces(lane, offset, end) for lane in self._lanes))
        f = self.f
        for r_pos, s, e in pieces:
            f.seek(r_pos)
            out[s - offset : e - offset] = f.read(e - s)
        return bytes(out)

    @staticmethod
    def _pieces(lane: _Lane, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(stream position, start, end) of the lane's bytes in ``offset..end``."""
        offs, ends, poss = lane.offs, lane.ends, lane.poss
        # in offset order, not overlapping: the first that may reach ``offset`` is the last
        # one starting at or before it
        i = max(0, bisect.bisect_right(offs, offset) - 1)
        n = len(offs)
        while i < n and offs[i] < end:
            if ends[i] > offset:
                s = max(offset, offs[i])
                yield poss[i] + (s - offs[i]), s, min(end, ends[i])
            i += 1

    def close(self) -> None:
        self.f.close()
