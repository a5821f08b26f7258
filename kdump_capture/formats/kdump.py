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
import os
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator

from .. import speedups
from ..elf import Phdr
from ..errors import NotSupported, VmcoreError
from ..kernel import ElfPhysMemory, Kernel, VmcoreInfo
from ..memory import BATCH_PAGES, BufferPlan
from ..record import Record
from ..vmcore import Vmcore
from . import FormatWriter, WriteResult
from .filter import DL_EXCLUDE_ZERO, PageFilter, Summary, iter_runs
from .flat import FlatOutput, SeekOutput
from .pages import zero_mask_py
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

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from concurrent.futures import Future

    from . import Monitor
    from .flat import PlacedOutput


class Done:
    """A batch compressed on the calling thread: what ``Future.result`` gives, without
    importing ``concurrent.futures`` on one CPU (the capture kernel's usual case)."""

    __slots__ = ("value",)

    def __init__(self, value: tuple) -> None:
        self.value = value

    def result(self) -> tuple:
        return self.value


PAGE = 4096
# Descriptors are flushed in 64 KiB pieces (makedumpfile's cache size): few seeks/records.
DESC_FLUSH = 64 << 10
# Compression threads and batches in flight come from the save's BufferPlan (memory.py):
# two workers for two cores, four batches (a few MiB); one and two on a single CPU.
WORKERS = 2
ZERO_PAGE = bytes(PAGE)
# A batch (BATCH_PAGES pages by default: one read, one compression job, one data write;
# BufferPlan.batch_pages says) that is all zero skips compression.
ZERO_BATCH = bytes(BATCH_PAGES * PAGE)
_SEQ_OFFSETS = array.array("Q", range(0, BATCH_PAGES * PAGE, PAGE))


# -- page codecs ------------------------------------------------------------------------------
class Codec:
    """Compresses batches of pages; ``pack`` may run on a worker thread.

    ``pack(src, offsets, zero_dedup, out)`` takes the pages ``src[o:o+PAGE]`` for each
    offset (u64) and returns ``(data, words)``: ``data`` holds the stored bytes of the pages
    back to back (compressed, or the raw page when compression did not shrink it);
    ``words`` (u64 each) hold ``size | flag << 32`` per page, or 0 for an all-zero page when
    ``zero_dedup`` (nothing stored: it shares the zero page). ``out`` (a bytearray of
    ``len(offsets) * PAGE``) is the caller's to reuse once the data is written; a codec may
    return its data in it.
    """

    name = ""
    flag = 0
    # Whether pack finds all-zero pages in its own pass over the pages (the C loops): then
    # the writer does not check whole batches for zeros first, which read them twice.
    zero_check_inside = False

    def pack(self, src, offsets: array.array, zero_dedup: bool, out: bytearray):
        raise NotImplementedError


class ZlibCodec(Codec):
    """zlib stream (RFC 1950) at level 1, as makedumpfile ``-c`` (``compress2(Z_BEST_SPEED)``)."""

    name = "zlib"
    flag = DUMP_DH_COMPRESSED_ZLIB

    def __init__(self, accelerated: bool | None = None) -> None:
        self._accel = None if accelerated is False else speedups.module()
        self.zero_check_inside = self._accel is not None

    def pack(self, src, offsets, zero_dedup, out):
        if self._accel is not None:
            n, words = self._accel.zlib_pages(src, offsets, zero_dedup, self.flag, out)
            return memoryview(out)[:n], words
        return self.pack_py(src, offsets, zero_dedup)

    def pack_py(self, src, offsets, zero_dedup):
        """The reference of ``_speedups.zlib_pages``."""
        parts: list = []
        words = array.array("Q")
        flag = self.flag << 32
        compress = zlib.compress
        for o in offsets:
            page = bytes(src[o : o + PAGE])  # (a memoryview compares with bytes ~35x slower)
            if zero_dedup and page == ZERO_PAGE:
                words.append(0)
                continue
            c = compress(page, 1)
            if len(c) < PAGE:
                parts.append(c)
                words.append(len(c) | flag)
            else:
                parts.append(page)
                words.append(PAGE)
        return b"".join(parts), words.tobytes()


def _zstandard():
    import zstandard

    return zstandard


class ZstdCodec(Codec):
    """One zstd frame per page (crash: ``ZSTD_decompressDCtx``), makedumpfile's level 1.

    With the accelerator built against libzstd (``_speedups.zstd_pages``) a batch is one C
    call: zero check and frame per page on one reused context, as zlib_pages does. Without
    it all pages of a batch go to python-zstandard in one call (``pack_py``, the reference);
    all-zero pages are found first and not compressed when they share the zero page. Both
    use one context per thread (they are not thread-safe), level 1, the content size in each
    frame header and no checksum.
    """

    name = "zstd"
    flag = DUMP_DH_COMPRESSED_ZSTD

    def __init__(self, level: int = 1, accelerated: bool | None = None) -> None:
        self._level = level
        self._accel = None if accelerated is False else speedups.module()
        self._pages = getattr(self._accel, "zstd_pages", None)
        self.zero_check_inside = self._pages is not None
        # python-zstandard only when it compresses: with zstd_pages it would cost the
        # capture kernel 0.8 MiB of RSS and 5 ms of start-up for nothing. Without
        # zstd_pages it is imported here, so that a missing module fails before the dump.
        self._zstd = None if self._pages is not None else _zstandard()
        # Measured here: multi_compress_to_buffer(threads=0) per batch beats its internal
        # thread pool.
        self._local = threading.local()

    def pack(self, src, offsets, zero_dedup, out):
        if self._pages is None:
            return self.pack_py(src, offsets, zero_dedup)
        cctx = getattr(self._local, "ccap", None)
        if cctx is None:
            cctx = self._local.ccap = self._accel.zstd_cctx(self._level)  # type: ignore[union-attr]
        try:
            n, words = self._pages(cctx, src, offsets, zero_dedup, self.flag, out)
        except RuntimeError as e:
            raise VmcoreError(f"zstd compression failed: {e}") from None
        return memoryview(out)[:n], words

    def pack_py(self, src, offsets, zero_dedup):
        """The reference of ``_speedups.zstd_pages``, on python-zstandard."""
        zs = self._zstd = self._zstd or _zstandard()
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zs.ZstdCompressor(level=self._level)
        if zero_dedup:
            if self._accel is not None:
                mask = self._accel.zero_pages(src, offsets)
            else:
                mask = zero_mask_py(src, offsets)
            todo = [o for i, o in enumerate(offsets) if not mask[i >> 3] >> (i & 7) & 1]
        else:
            mask = None
            todo = list(offsets)
        frames: list = []
        if todo:
            segs = array.array("Q", [v for o in todo for v in (o, PAGE)]).tobytes()
            try:
                coll = cctx.multi_compress_to_buffer(zs.BufferWithSegments(src, segs), threads=0)
                frames = list(coll)
            except zs.ZstdError as e:
                raise VmcoreError(f"zstd compression failed: {e}") from None
        parts: list = []
        words = array.array("Q")
        flag = self.flag << 32
        it = iter(zip(todo, frames, strict=True))
        for i in range(len(offsets)):
            if mask is not None and mask[i >> 3] >> (i & 7) & 1:
                words.append(0)
                continue
            o, f = next(it)
            size = len(f)
            if size < PAGE:
                parts.append(f)
                words.append(size | flag)
            else:
                parts.append(src[o : o + PAGE])
                words.append(PAGE)
        return b"".join(parts), words.tobytes()


class LzoCodec(Codec):
    """Raw lzo1x_1 output per page, as makedumpfile ``-l`` (crash: lzo1x_decompress_safe).

    With the accelerator built against liblzo2 (``_speedups.lzo_pages``) a batch is one C
    call, zero check included, and python-lzo is not needed. Without it python-lzo
    compresses page by page (``pack_py``, the reference; its 5-byte header is left out).
    Both give makedumpfile ``-l``'s bytes.
    """

    name = "lzo"
    flag = DUMP_DH_COMPRESSED_LZO

    def __init__(self, accelerated: bool | None = None) -> None:
        accel = None if accelerated is False else speedups.module()
        self._pages = getattr(accel, "lzo_pages", None)
        self.zero_check_inside = self._pages is not None
        self._compress = None
        if self._pages is None:
            try:
                import lzo  # type: ignore[import-not-found]
            except ImportError:
                raise NotSupported(
                    "KDUMP_DUMPFORMAT=lzo needs liblzo2 in the compiled accelerator (install "
                    "liblzo2-dev, then reinstall kdump-capture) or the python-lzo package; use "
                    "'compressed' (zlib) or 'zstd'"
                ) from None
            self._compress = lzo.compress

    def pack(self, src, offsets, zero_dedup, out):
        if self._pages is None:
            return self.pack_py(src, offsets, zero_dedup)
        try:
            n, words = self._pages(src, offsets, zero_dedup, self.flag, out)
        except RuntimeError as e:
            raise VmcoreError(f"lzo compression failed: {e}") from None
        return memoryview(out)[:n], words

    def pack_py(self, src, offsets, zero_dedup):
        """The reference of ``_speedups.lzo_pages``, on python-lzo."""
        if self._compress is None:
            import lzo  # type: ignore[import-not-found]

            self._compress = lzo.compress
        parts: list = []
        words = array.array("Q")
        flag = self.flag << 32
        for o in offsets:
            page = bytes(src[o : o + PAGE])
            if zero_dedup and page == ZERO_PAGE:
                words.append(0)
                continue
            c = self._compress(page, 1, False)
            if len(c) < PAGE:
                parts.append(c)
                words.append(len(c) | flag)
            else:
                parts.append(page)
                words.append(PAGE)
        return b"".join(parts), words.tobytes()


def page_descs_py(words: bytes, data_pos: int, zero_off: int) -> bytes:
    """The reference of ``_speedups.page_descs``: page_desc records for a batch's words."""
    w = array.array("Q", words)
    n = len(w)
    offs = array.array("q", bytes(8 * n))
    sizes = array.array("Q", w)
    pos = data_pos
    for i, v in enumerate(w):
        if v:
            offs[i] = pos
            pos += v & 0xFFFFFFFF
        else:
            offs[i] = zero_off
            sizes[i] = PAGE
    rec = bytearray(PAGE_DESC.size * n)
    q = memoryview(rec).cast("Q")
    q[0::3] = array.array("Q", offs.tobytes())
    q[1::3] = sizes
    return bytes(rec)


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
class Layout(Record):
    """File offsets of a kdump-compressed dump (see module docstring)."""

    __slots__ = ("block", "sub_hdr_blocks", "bitmap_blocks", "num_dumpable", "zero_page")

    def __init__(
        self,
        block: int,
        sub_hdr_blocks: int,
        bitmap_blocks: int,
        num_dumpable: int,
        zero_page: bool,
    ) -> None:
        self.block = block
        self.sub_hdr_blocks = sub_hdr_blocks
        self.bitmap_blocks = bitmap_blocks
        self.num_dumpable = num_dumpable
        self.zero_page = zero_page

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
class Piece(Record):
    """``npages`` pages at file ``offset`` (None: not backed by the file, read as zeros).

    ``head`` > 0: one page whose PT_LOAD starts ``head`` bytes into it; its first ``head``
    bytes are zeros and the rest is at ``offset`` (makedumpfile's readpage_elf()).
    """

    __slots__ = ("npages", "offset", "head")

    def __init__(self, npages: int, offset: int | None, head: int = 0) -> None:
        self.npages = npages
        self.offset = offset
        self.head = head


def iter_batches(
    runs: Iterable[tuple[int, int]], loads: list[Phdr], batch: int = BATCH_PAGES
) -> Iterator[tuple[int, list[Piece]]]:
    """Batches of up to ``batch`` dumpable pages in pfn order, as file pieces to read.

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
            head = 0
            if seg is None:
                n = 1
                off = None
                start = mem.next_start(pa)
                if start < pa + PAGE:  # a PT_LOAD starts inside this page
                    seg = mem.find(start)
                    if seg is not None and seg.file_end >= pa + PAGE:
                        head = start - pa
                        off = seg.offset + (start - seg.paddr)
            else:
                n = min(end, (seg.end + PAGE - 1) // PAGE) - pfn
                off = seg.offset + (pa - seg.paddr)
                file_pages = max(0, (seg.file_end - pa) // PAGE)
                if file_pages == 0:
                    off = None
                    n = min(n, max(1, (seg.end - pa) // PAGE))
                else:
                    n = min(n, file_pages)
            n = min(n, batch - count)
            pieces.append(Piece(n, off, head))
            count += n
            pfn += n
            if count == batch:
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

    def __init__(
        self,
        vm: Vmcore,
        level: int,
        codec: Codec,
        flattened: bool = False,
        buffers: BufferPlan | None = None,
        accelerated: bool | None = None,
    ) -> None:
        super().__init__(vm, level)
        self.codec = codec
        self.flattened = flattened
        self.buffers = buffers or BufferPlan()
        self.accelerated = accelerated
        self._accel = None if accelerated is False else speedups.module()
        self._filter: PageFilter | None = None

    def page_filter(self) -> PageFilter:
        if self._filter is None:
            self._filter = PageFilter(self.vm, self.level, accelerated=self.accelerated)
        return self._filter

    def input_size(self) -> int | None:
        return self.page_filter().summary().num_dumpable * PAGE

    def estimate(self) -> int | None:
        pf = self.page_filter()
        n = pf.summary().num_dumpable
        lay = Layout.make(len(self.vm.notes_blob), pf.half_len, n, True)
        return lay.first_data + n * PAGE

    def lower_bound(self) -> int:
        # Headers, bitmaps and one descriptor per dumpable page are written whatever the
        # pages compress to; the page data may be as small as the shared zero page.
        pf = self.page_filter()
        n = pf.summary().num_dumpable
        return Layout.make(len(self.vm.notes_blob), pf.half_len, n, False).data_off

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
        sub = self._sub_header(lay, summ)
        written += out.put(PAGE, sub)
        # the notes from where they are held, not copied behind the sub header (a device-dump
        # note can be tens of MiB)
        written += out.put(PAGE + len(sub), vm.notes_blob)
        monitor.advance(0, written)

        stats, error = self._pages(out, lay, pf, monitor, zero_dedup)
        incomplete = None
        if error is not None:
            # Pages not written keep zeroed descriptors (offset 0 = missing to crash), and
            # the header says so: a clearly marked partial dump instead of no dump.
            incomplete = f"{error}; {stats['done']} of {num} pages written"
            n = out.put(0, self._header(lay, summ, uts, incomplete=True))
            monitor.advance(0, n)
        monitor.advance(0, out.finish())
        log.info("%s", pf.walk_report())
        if stats["zero"]:
            log.debug("%d zero pages share one page", stats["zero"])
        return WriteResult(
            format=self.describe(),
            dump_level=summ.level,
            pages_total=summ.pages_total,
            pages_written=stats["done"],
            flattened=self.flattened,
            notes=notes,
            incomplete=incomplete,
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
        return kh.pack()

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
        # Compression overlaps reading and writing only where a second CPU exists: on one
        # CPU (a capture kernel with nr_cpus=1) handing batches to a thread only costs.
        # Batch size, batches in flight and threads come from the save's BufferPlan.
        batch = self.buffers.batch_pages
        cpus = len(os.sched_getaffinity(0))
        threads = max(1, min(WORKERS, self.buffers.workers)) if cpus > 1 else 0
        in_flight = max(1, self.buffers.batches) if threads else 1
        nbufs = in_flight + 1 if threads else 1
        copy_bufs = [bytearray(batch * PAGE) for _ in range(nbufs)]
        out_bufs = [bytearray(batch * PAGE) for _ in range(nbufs)]
        pending: deque[tuple[Future | Done, bytearray, bytearray, int]] = deque()
        error: str | None = None
        descs = self._descs

        def emit() -> None:
            nonlocal data_pos
            fut, cbuf, obuf, n = pending.popleft()
            data, words = fut.result()
            sent = out.put(data_pos, data) if len(data) else 0
            recs = descs(words, data_pos, lay.data_off)
            data_pos += len(data)
            sent += desc.add(recs)
            del data
            copy_bufs.append(cbuf)
            out_bufs.append(obuf)
            stats["done"] += n
            stats["zero"] += array.array("Q", words).count(0) if zero_dedup else 0
            monitor.advance(n * PAGE, sent)

        runs = self._runs(out, lay, pf, monitor, zero_dedup)
        ex = None
        if threads:
            from concurrent.futures import ThreadPoolExecutor  # not imported on one CPU

            ex = ThreadPoolExecutor(threads, thread_name_prefix="compress")
        try:
            for n, pieces in iter_batches(runs, vm.loads, batch):
                cbuf, obuf = copy_bufs.pop(), out_bufs.pop()
                src, offsets = self._gather(pieces, n, cbuf)
                if (
                    zero_dedup
                    and not codec.zero_check_inside
                    and _all_zero(src, offsets, n, batch, self._accel)
                ):
                    fut: Future | Done = Done((b"", bytes(8 * n)))
                elif ex is not None:
                    fut = ex.submit(codec.pack, src, offsets, zero_dedup, obuf)
                else:
                    fut = Done(codec.pack(src, offsets, zero_dedup, obuf))
                del src
                pending.append((fut, cbuf, obuf, n))
                if len(pending) >= in_flight:
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
        finally:
            if ex is not None:
                ex.shutdown(wait=True)
        monitor.advance(0, desc.flush())
        return stats, error

    def _descs(self, words: bytes, data_pos: int, zero_off: int) -> bytes:
        if self._accel is not None:
            return self._accel.page_descs(words, data_pos, zero_off)
        return page_descs_py(words, data_pos, zero_off)

    def _gather(self, pieces: list[Piece], n: int, buf: bytearray):
        """The batch's pages as (buffer, u64 offsets): a view of the mapped source when
        every page is in the file and near the others, else read into ``buf``."""
        if all(p.offset is not None and not p.head for p in pieces):
            lo = min(p.offset for p in pieces)  # type: ignore[type-var]
            hi = max(p.offset + p.npages * PAGE for p in pieces)  # type: ignore[operator]
            view = self.vm.view(lo, hi - lo)
            if view is not None:
                offsets = array.array("Q")
                for p in pieces:
                    start = p.offset - lo  # type: ignore[operator]
                    offsets.extend(range(start, start + p.npages * PAGE, PAGE))
                return view, offsets
        vm = self.vm
        view = memoryview(buf)
        pos = 0
        for p in pieces:
            nbytes = p.npages * PAGE
            if p.offset is None:
                view[pos : pos + nbytes] = bytes(nbytes)
            else:
                view[pos : pos + p.head] = bytes(p.head)
                got = vm.read_data(view[pos + p.head : pos + nbytes], p.offset)
                if got != nbytes - p.head:
                    raise VmcoreError(
                        f"{vm.path}: the source ended at offset {p.offset + got:#x}"
                        " (truncated vmcore)"
                    )
            pos += nbytes
        return view[:pos], _SEQ_OFFSETS[:n]


def _all_zero(src, offsets: array.array, n: int, batch: int, accel) -> bool:
    """Whether a whole batch of contiguous pages is zero (skips the codec for it)."""
    if n != batch or offsets[-1] != offsets[0] + (n - 1) * PAGE:
        return False
    if accel is not None:
        return accel.zero_pages(src, offsets) == b"\xff" * (n // 8)
    # bytes, not the memoryview: comparing a memoryview with bytes goes item by item
    return bytes(src[offsets[0] : offsets[0] + n * PAGE]) == ZERO_BATCH[: n * PAGE]


class DescBuffer:
    """Collects page descriptors and writes them in DESC_FLUSH pieces at their place."""

    def __init__(self, out: PlacedOutput, desc_off: int) -> None:
        self.out = out
        self.next_off = desc_off
        self.buf = bytearray()

    def add(self, records: bytes) -> int:
        self.buf += records
        return self.flush() if len(self.buf) >= DESC_FLUSH else 0

    def flush(self) -> int:
        if not self.buf:
            return 0
        n = self.out.put(self.next_off, self.buf)
        self.next_off += len(self.buf)
        self.buf = bytearray()
        return n
