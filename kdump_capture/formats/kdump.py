"""kdump-compressed output (makedumpfile's ``KDUMP   `` format, header version 6).

Layout (block B = page size): disk_dump_header in block 0; kdump_sub_header + the vmcore's
note segment from block 1; both bitmaps; page_desc[num_dumpable]; page data (the shared
zero page first when level bit 1 is set). Pages are compressed in batches on worker threads
(zlib and zstd release the GIL); a page is stored raw when its compressed form is not smaller.
Over a non-seekable sink the same writes go out as a flattened stream (``flat.py``).
"""

from __future__ import annotations

import array
import logging
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..elf import Phdr
from ..errors import NotSupported, VmcoreError
from ..kernel import ElfPhysMemory, Kernel, VmcoreInfo
from ..vmcore import Vmcore
from . import FormatWriter, Monitor, WriteResult
from .filter import DL_EXCLUDE_ZERO, PageFilter, Summary, iter_runs
from .flat import FlatOutput, PlacedOutput, SeekOutput
from .structs import (
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    KDUMP_SUB_HEADER,
    PAGE_DESC,
    DiskDumpHeader,
    KdumpSubHeader,
)

log = logging.getLogger(__name__)

PAGE = 4096
# 256 pages (1 MiB) per batch: one read, one compression job, one data write each.
BATCH_PAGES = 256
# Descriptors are flushed in 64 KiB pieces (makedumpfile's cache size): few seeks/records.
DESC_FLUSH = 64 << 10
# Two workers for two cores; batches in flight bound memory to a few MiB.
WORKERS = 2
IN_FLIGHT = 4
ZERO_PAGE = bytes(PAGE)
ZERO_BATCH = bytes(BATCH_PAGES * PAGE)


# -- page codecs ------------------------------------------------------------------------------
class Codec:
    """Compresses batches of pages. ``compress_batch`` runs on a worker thread.

    Returns ``(parts, words)``: for each page ``words[i] = size | flags << 32``, or 0 for an
    all-zero page when ``zero_dedup`` (no part then); ``parts`` are the stored bytes of the
    other pages in order (compressed, or the raw page when compression did not shrink it).
    """

    name = ""
    flag = 0
    workers = WORKERS

    def compress_batch(self, view: memoryview, n: int, zero_dedup: bool) -> tuple[list, list]:
        raise NotImplementedError


class ZlibCodec(Codec):
    """zlib stream (RFC 1950) at level 1, as makedumpfile ``-c`` (``compress2(Z_BEST_SPEED)``)."""

    name = "zlib"
    flag = DUMP_DH_COMPRESSED_ZLIB

    def __init__(self) -> None:
        self._zero = zlib.compress(ZERO_PAGE, 1)

    def compress_batch(self, view, n, zero_dedup):
        parts: list = []
        words: list[int] = []
        flag = self.flag << 32
        zero = self._zero
        compress = zlib.compress
        for i in range(n):
            page = view[i * PAGE : (i + 1) * PAGE]
            c = compress(page, 1)
            size = len(c)
            if zero_dedup and c == zero:  # deterministic: same stream <=> same page
                words.append(0)
            elif size < PAGE:
                parts.append(c)
                words.append(size | flag)
            else:
                parts.append(page)
                words.append(PAGE)
        return parts, words


class ZstdCodec(Codec):
    """One zstd frame per page (crash: ``ZSTD_decompressDCtx``); batches compressed in C."""

    name = "zstd"
    flag = DUMP_DH_COMPRESSED_ZSTD

    def __init__(self, level: int = 1) -> None:
        import zstandard

        self._zstd = zstandard
        self._level = level
        # A compressor per worker thread (they are not thread-safe). Measured here:
        # multi_compress_to_buffer(threads=0) per batch beats its internal thread pool.
        self._local = threading.local()
        self._zero = zstandard.ZstdCompressor(level=level).compress(ZERO_PAGE)
        self._segs: dict[int, bytes] = {}

    def _segments(self, n: int) -> bytes:
        segs = self._segs.get(n)
        if segs is None:
            segs = array.array("Q", [v for i in range(n) for v in (i * PAGE, PAGE)]).tobytes()
            self._segs[n] = segs
        return segs

    def compress_batch(self, view, n, zero_dedup):
        zs = self._zstd
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zs.ZstdCompressor(level=self._level)
        try:
            coll = cctx.multi_compress_to_buffer(
                zs.BufferWithSegments(view[: n * PAGE], self._segments(n)), threads=0
            )
        except zs.ZstdError as e:
            raise VmcoreError(f"zstd compression failed: {e}") from None
        parts: list = []
        words: list[int] = []
        flag = self.flag << 32
        zero = self._zero
        zlen = len(zero)
        for i in range(n):
            seg = coll[i]
            size = len(seg)
            if zero_dedup and size == zlen and seg.tobytes() == zero:
                words.append(0)
            elif size < PAGE:
                parts.append(seg)
                words.append(size | flag)
            else:
                parts.append(view[i * PAGE : (i + 1) * PAGE])
                words.append(PAGE)
        return parts, words


class LzoCodec(Codec):
    """Raw lzo1x_1 output without python-lzo's 5-byte header (crash: lzo1x_decompress_safe)."""

    name = "lzo"
    flag = DUMP_DH_COMPRESSED_LZO

    def __init__(self) -> None:
        try:
            import lzo  # type: ignore[import-not-found]
        except ImportError:
            raise NotSupported(
                "KDUMP_DUMPFORMAT=lzo needs the python-lzo package (pip install python-lzo); "
                "use 'compressed' (zlib) or 'zstd'"
            ) from None
        self._compress = lzo.compress
        self._zero = lzo.compress(ZERO_PAGE, 1, False)

    def compress_batch(self, view, n, zero_dedup):
        parts: list = []
        words: list[int] = []
        flag = self.flag << 32
        for i in range(n):
            page = view[i * PAGE : (i + 1) * PAGE]
            c = self._compress(bytes(page), 1, False)
            if zero_dedup and c == self._zero:
                words.append(0)
            elif len(c) < PAGE:
                parts.append(c)
                words.append(len(c) | flag)
            else:
                parts.append(page)
                words.append(PAGE)
        return parts, words


def get_codec(name: str) -> Codec:
    """The page codec for a format name: compressed (zlib), zstd, lzo; snappy is refused."""
    if name in ("compressed", "zlib"):
        return ZlibCodec()
    if name == "zstd":
        return ZstdCodec()
    if name == "lzo":
        return LzoCodec()
    if name == "snappy":
        raise NotSupported(
            "KDUMP_DUMPFORMAT=snappy is not supported (no maintained raw-snappy binding); "
            "use 'compressed' (zlib) or 'zstd'"
        )
    raise NotSupported(f"unknown kdump-compressed codec {name!r}")


# -- layout -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """File offsets of a kdump-compressed dump (see module docstring)."""

    block: int
    sub_hdr_blocks: int
    bitmap_blocks: int
    num_dumpable: int
    zero_page: bool

    @property
    def bitmap_off(self) -> int:
        return self.block * (1 + self.sub_hdr_blocks)

    @property
    def desc_off(self) -> int:
        return self.block * (1 + self.sub_hdr_blocks + self.bitmap_blocks)

    @property
    def data_off(self) -> int:
        return self.desc_off + PAGE_DESC.size * self.num_dumpable

    @property
    def first_data(self) -> int:
        """Where compressed page data starts (after the shared zero page, if any)."""
        return self.data_off + (self.block if self.zero_page else 0)

    @classmethod
    def make(cls, notes_size: int, half_bitmap: int, num_dumpable: int, zero: bool) -> Layout:
        sub = -(-(KDUMP_SUB_HEADER.size + notes_size) // PAGE)
        return cls(PAGE, sub, 2 * half_bitmap // PAGE, num_dumpable, zero)


def default_utsname(vm: Vmcore) -> bytes:
    """A new_utsname when init_uts_ns cannot be read: sysname, release and machine only."""
    fields = [b"Linux", b"", (vm.release or "").encode()[:64], b"", b"x86_64", b""]
    return b"".join(f.ljust(65, b"\0") for f in fields)


def read_utsname(vm: Vmcore, notes: list[str]) -> bytes:
    try:
        info = VmcoreInfo(vm.vmcoreinfo)
        uts = Kernel(info, ElfPhysMemory(vm.loads, vm.pread, vm.path)).utsname()
        if uts[260:266] != b"x86_64":
            machine = uts[260:325].split(b"\0")[0]
            raise VmcoreError(f"utsname machine is {machine!r}")
        return uts
    except VmcoreError as e:
        notes.append(f"utsname not readable from memory ({e}); built from VMCOREINFO")
        return default_utsname(vm)


# -- page sources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """``npages`` pages at file ``offset`` (None: not backed by the file, read as zeros)."""

    npages: int
    offset: int | None


def iter_batches(
    runs: Iterable[tuple[int, int]], loads: list[Phdr]
) -> Iterator[tuple[int, list[Piece]]]:
    """Batches of up to BATCH_PAGES dumpable pages in pfn order, as file pieces to read.

    ``runs`` are the ascending runs ``(start, end)`` of set bits of the 2nd bitmap.
    """
    mem = ElfPhysMemory(loads, lambda n, o: b"", "")
    pieces: list[Piece] = []
    count = 0
    for start, end in runs:
        pfn = start
        while pfn < end:
            pa = pfn * PAGE
            seg = mem.find(pa)
            if seg is None:
                n = 1
                off = None
            else:
                n = min(end, (seg.end + PAGE - 1) // PAGE) - pfn
                off = seg.offset + (pa - seg.paddr)
                file_pages = max(0, (seg.file_end - pa) // PAGE)
                if file_pages == 0:
                    off = None
                    n = min(n, max(1, (seg.end - pa) // PAGE))
                else:
                    n = min(n, file_pages)
            n = min(n, BATCH_PAGES - count)
            pieces.append(Piece(n, off))
            count += n
            pfn += n
            if count == BATCH_PAGES:
                yield count, pieces
                pieces, count = [], 0
    if count:
        yield count, pieces


# -- the writer -------------------------------------------------------------------------------
class KdumpWriter(FormatWriter):
    """kdump-compressed dump; flattened when the sink cannot seek.

    Bitmaps come window by window from a PageFilter: a first pass counts the dumpable pages
    (their number places the page data), the second writes each window's bitmaps, then its
    pages. Memory stays flat however large the machine was.
    """

    def __init__(self, vm: Vmcore, level: int, codec: Codec, flattened: bool = False) -> None:
        super().__init__(vm, level)
        self.codec = codec
        self.flattened = flattened
        self._filter: PageFilter | None = None

    def page_filter(self) -> PageFilter:
        if self._filter is None:
            self._filter = PageFilter(self.vm, self.level)
        return self._filter

    def input_size(self) -> int | None:
        return self.page_filter().summary().num_dumpable * PAGE

    def estimate(self) -> int | None:
        pf = self.page_filter()
        n = pf.summary().num_dumpable
        lay = Layout.make(len(self.vm.notes_blob), pf.half_len, n, True)
        return lay.first_data + n * PAGE

    def describe(self) -> str:
        text = f"kdump-compressed ({self.codec.name})"
        if self.flattened:
            text += ", flattened (rebuild with 'kdump-capture rearrange')"
        return text

    def write(self, sink, monitor: Monitor) -> WriteResult:
        out: PlacedOutput = FlatOutput(sink) if self.flattened else SeekOutput(sink)
        vm = self.vm
        pf = self.page_filter()
        summ = pf.summary()
        notes = list(summ.notes)
        num = summ.num_dumpable
        zero_dedup = bool(self.level & DL_EXCLUDE_ZERO)
        lay = Layout.make(len(vm.notes_blob), pf.half_len, num, zero_dedup)
        uts = read_utsname(vm, notes)
        header = self._header(lay, summ, uts, incomplete=False)
        written = out.put(0, header)
        written += out.put(PAGE, self._sub_header(lay, summ))
        monitor.advance(0, written)

        stats, error = self._pages(out, lay, pf, monitor, zero_dedup)
        if error is not None:
            # Pages not written keep zeroed descriptors (offset 0 = missing to crash), and
            # the header says so: a clearly marked partial dump instead of no dump.
            notes.append(f"INCOMPLETE dump: {error}; {stats['done']} of {num} pages written")
            n = out.put(0, self._header(lay, summ, uts, incomplete=True))
            monitor.advance(0, n)
        monitor.advance(0, out.finish())
        if stats["zero"]:
            log.debug("%d zero pages share one page", stats["zero"])
        return WriteResult(
            format=self.describe(),
            dump_level=summ.level,
            pages_total=summ.pages_total,
            pages_written=stats["done"],
            flattened=self.flattened,
            notes=notes,
        )

    # -- headers --
    def _header(self, lay: Layout, bm: Summary, uts: bytes, incomplete: bool) -> bytes:
        vm = self.vm
        status = self.codec.flag | (DUMP_DH_COMPRESSED_INCOMPLETE if incomplete else 0)
        dh = DiskDumpHeader(
            header_version=6,
            utsname=uts,
            tv_sec=vm.crash_time or 0,
            tv_usec=0,
            status=status,
            block_size=PAGE,
            sub_hdr_size=lay.sub_hdr_blocks,
            bitmap_blocks=lay.bitmap_blocks,
            max_mapnr=min(bm.max_mapnr, 0xFFFFFFFF),
            nr_cpus=vm.nr_cpus,
        )
        return dh.pack().ljust(PAGE, b"\0")

    def _sub_header(self, lay: Layout, bm: Summary) -> bytes:
        vm = self.vm
        try:
            phys_base = VmcoreInfo(vm.vmcoreinfo).number("phys_base") or 0
        except VmcoreError:
            phys_base = 0
        offset_note = PAGE + KDUMP_SUB_HEADER.size
        vmi = vm.vmcoreinfo_note
        kh = KdumpSubHeader(
            phys_base=phys_base & 0xFFFFFFFFFFFFFFFF,
            dump_level=bm.level,
            offset_vmcoreinfo=offset_note + vmi.offset if vmi else 0,
            size_vmcoreinfo=len(vmi.desc) if vmi else 0,
            offset_note=offset_note if vm.notes_blob else 0,
            size_note=len(vm.notes_blob),
            max_mapnr_64=bm.max_mapnr,
        )
        return kh.pack() + vm.notes_blob

    # -- pages --
    def _runs(self, out, lay, pf: PageFilter, monitor, zero_dedup) -> Iterator[tuple[int, int]]:
        """Runs of dumpable pages, window by window; writes each window's bitmaps first.

        A window of a memory hole (all zero) is not written: the file reads zeros there
        anyway. The last window is always written, so the bitmaps reach their full length.
        """
        half = pf.half_len
        last = half * 8
        zero_page = zero_dedup
        for win in pf.windows():
            off = win.start >> 3
            if win.end == last or any(win.first):
                sent = out.put(lay.bitmap_off + off, win.first)
                sent += out.put(lay.bitmap_off + half + off, win.second)
                monitor.advance(0, sent)
            if zero_page:  # the shared zero page, right after the first bitmaps written
                monitor.advance(0, out.put(lay.data_off, ZERO_PAGE))
                zero_page = False
            for s, e in iter_runs(win.second, pf.max_mapnr - win.start):
                yield win.start + s, win.start + e

    def _pages(self, out, lay, pf, monitor, zero_dedup) -> tuple[dict[str, int], str | None]:
        vm = self.vm
        codec = self.codec
        stats = {"done": 0, "zero": 0}
        desc = DescBuffer(out, lay.desc_off)
        data_pos = lay.first_data
        free_bufs = [bytearray(BATCH_PAGES * PAGE) for _ in range(IN_FLIGHT + 1)]
        pending: deque[tuple[Future, bytearray, int]] = deque()
        error: str | None = None

        def emit() -> None:
            nonlocal data_pos
            fut, buf, n = pending.popleft()
            parts, words = fut.result()
            offs = array.array("q", bytes(8 * n))
            pos = data_pos
            zero_off = lay.data_off
            for i, w in enumerate(words):
                if w:
                    offs[i] = pos
                    pos += w & 0xFFFFFFFF
                else:
                    offs[i] = zero_off
                    words[i] = PAGE
            nzero = n - len(parts)
            sent = out.put(data_pos, b"".join(parts)) if parts else 0
            data_pos = pos
            sent += desc.add(offs, words)
            free_bufs.append(buf)
            stats["done"] += n
            stats["zero"] += nzero
            monitor.advance(n * PAGE, sent)

        runs = self._runs(out, lay, pf, monitor, zero_dedup)
        with ThreadPoolExecutor(max_workers=codec.workers, thread_name_prefix="compress") as ex:
            try:
                for n, pieces in iter_batches(runs, vm.loads):
                    buf = free_bufs.pop()
                    view = memoryview(buf)
                    pos = 0
                    for p in pieces:
                        nbytes = p.npages * PAGE
                        if p.offset is None:
                            view[pos : pos + nbytes] = bytes(nbytes)
                        else:
                            got = vm.readinto(view[pos : pos + nbytes], p.offset)
                            if got != nbytes:
                                raise VmcoreError(
                                    f"{vm.path}: offset {p.offset + got:#x}: unexpected end of "
                                    "file (truncated vmcore)"
                                )
                        pos += nbytes
                    if n == BATCH_PAGES and buf == ZERO_BATCH and zero_dedup:
                        fut: Future = Future()
                        fut.set_result(([], [0] * n))
                    else:
                        fut = ex.submit(codec.compress_batch, view, n, zero_dedup)
                    pending.append((fut, buf, n))
                    if len(pending) >= IN_FLIGHT:
                        emit()
                while pending:
                    emit()
            except VmcoreError as e:
                # The source failed: keep what was read before it, then stop. The bitmaps
                # of the windows not reached yet are still written (their pages read as
                # missing, not as excluded).
                error = str(e)
                while pending:
                    emit()
                for _ in runs:
                    pass
        monitor.advance(0, desc.flush())
        return stats, error


class DescBuffer:
    """Collects page descriptors and writes them in DESC_FLUSH pieces at their place."""

    def __init__(self, out: PlacedOutput, desc_off: int) -> None:
        self.out = out
        self.next_off = desc_off
        self.buf = bytearray()

    def add(self, offsets: array.array, words: list[int]) -> int:
        n = len(words)
        rec = bytearray(PAGE_DESC.size * n)
        q = memoryview(rec).cast("Q")
        q[0::3] = array.array("Q", offsets.tobytes())
        q[1::3] = array.array("Q", words)
        self.buf += rec
        return self.flush() if len(self.buf) >= DESC_FLUSH else 0

    def flush(self) -> int:
        if not self.buf:
            return 0
        n = self.out.put(self.next_off, self.buf)
        self.next_off += len(self.buf)
        self.buf = bytearray()
        return n
