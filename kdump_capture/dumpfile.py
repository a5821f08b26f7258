"""Open any dump we or makedumpfile write (ELF, kdump-compressed, flattened) for reading."""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .bounds import MAX_NOTES, MAX_VMCOREINFO, check_span, read_span
from .elf import (
    EHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    ET_CORE,
    PHDR,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    Ehdr,
    Phdr,
    iter_notes,
)
from .errors import NoDumpError, NotSupported, VmcoreError
from .formats.filter import _POPCOUNT, test_bit
from .formats.flat import MAX_BLOCK, MIN_BLOCK, FlatFile, is_flattened
from .formats.structs import (
    DISK_DUMP_HEADER,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    KDUMP_SIGNATURE,
    KDUMP_SUB_HEADER,
    PAGE_DESC,
    DiskDumpHeader,
    KdumpSubHeader,
    PageDesc,
)
from .kernel import AddressError, ElfPhysMemory, VmcoreInfo
from .vmcore import MAX_PHYS_ADDR, Vmcore, open_vmcore, parse_vmcoreinfo, vmcoreinfo_text

# Bits per entry of the rank index (pfn -> descriptor number): 4096 bits = 512 bitmap bytes,
# so a lookup counts at most 512 bytes in C.
RANK_BLOCK_BITS = 4096


@dataclass
class Dump:
    """A dump opened for reading: VMCOREINFO, notes and physical memory."""

    path: str
    kind: str  # "elf", "kdump" or "kdump (flattened)"
    vmcoreinfo: dict[str, str]
    notes_blob: bytes | memoryview
    read_phys: Callable[[int, int], bytes]
    phys_base: int | None
    close: Callable[[], None]
    capacity: int  # bytes of memory the dump holds (the bound of any one read)
    header: DiskDumpHeader | None = None
    sub_header: KdumpSubHeader | None = None
    #: why the file holds less than its headers promise (None: as far as can be told, whole)
    incomplete: str | None = None

    @property
    def info(self) -> VmcoreInfo:
        return VmcoreInfo(self.vmcoreinfo)

    def dmesg(self) -> str:
        """The kernel log, as ``makedumpfile --dump-dmesg`` prints it."""
        from .dmesg import extract_from

        if not self.vmcoreinfo:
            raise VmcoreError(f"{self.path}: the dump has no VMCOREINFO; cannot find the log")
        try:
            return extract_from(self.info, self, self.phys_base)
        except (VmcoreError, NotSupported) as e:
            # The log's walk through kernel memory speaks of addresses and VMCOREINFO
            # entries, not of the file: a message on its own must say which dump it is.
            if str(e).startswith(f"{self.path}: "):
                raise
            raise type(e)(f"{self.path}: {e}") from None

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_dump(path: str) -> Dump:
    """Open an ELF vmcore, a kdump-compressed file or a flattened stream (detected by content).

    Raises NoDumpError (missing file), VmcoreError (malformed) or NotSupported.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            head = f.read(4096)
    except OSError as e:
        raise NoDumpError(f"{path}: cannot open: {e.strerror}") from e
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        # A pipe (`... | kdump-capture dmesg /dev/stdin`): what was read is gone, and the
        # log lies at offsets only the headers give. "Illegal seek" was an internal error.
        raise VmcoreError(
            f"{path}: not a regular file: a dump is read at random offsets; save it to a file first"
        )
    if head[:4] == b"\x7fELF":
        vm = open_vmcore(path)
        return _elf_dump(vm)
    if head[:8] == KDUMP_SIGNATURE:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

        def pread(size: int, offset: int) -> bytes:
            return os.pread(fd, size, offset)

        try:
            size = os.fstat(fd).st_size
            return KdumpReader(path, pread, lambda: os.close(fd), size, size).dump("kdump")
        except BaseException:
            os.close(fd)
            raise
    if is_flattened(head):
        flat = FlatFile(path)
        try:
            head2 = flat.pread(8, 0)
            if head2[:4] == ELFMAG:
                return _flat_elf_dump(path, flat)
            if head2 != KDUMP_SIGNATURE:
                raise NotSupported(
                    f"{path}: flattened stream of a non-kdump file; rearrange it first "
                    "(kdump-capture rearrange)"
                )
            reader = KdumpReader(path, flat.pread, flat.close, flat.size, flat.data_bytes)
            return reader.dump("kdump (flattened)")
        except BaseException:
            flat.close()
            raise
    from .report import AGE_MAGIC, ENCRYPTED_HINT

    if head.startswith(AGE_MAGIC):
        raise VmcoreError(f"{path}: {ENCRYPTED_HINT}")
    raise VmcoreError(
        f"{path}: offset 0x0: not an ELF, kdump-compressed or flattened dump"
        + (
            f" (it is {packed}-compressed as a whole: decompress it first)"
            if (packed := packed_with(head))
            else ""
        )
    )


# Debian's kdump-tools pipes its flattened dumps through KDUMP_COMPRESSION (dump.STAMP.gz).
_PACKERS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def packed_with(head: bytes) -> str | None:
    """The whole-file compressor whose magic ``head`` starts with, if any."""
    return next((name for magic, name in _PACKERS if head.startswith(magic)), None)


def _elf_dump(vm: Vmcore) -> Dump:
    mem = ElfPhysMemory(vm.loads, vm.pread, vm.path)
    return Dump(
        vm.path, "elf", vm.vmcoreinfo, vm.notes_blob, mem.read_phys, None, vm.close, mem.capacity
    )


def _flat_elf_dump(path: str, flat: FlatFile) -> Dump:
    """A flattened ELF dump (makedumpfile -F -E; SUSE kdump 2.x writes its ELF dumps so),
    read through the stream's index. Every header is checked against the size the records
    make, as ``open_vmcore`` checks a file's."""
    size = flat.size
    ehdr = Ehdr.unpack_from(read_span(flat.pread, path, "the ELF header", 0, EHDR.size, size))
    if ehdr.ident[4] != ELFCLASS64 or ehdr.ident[5] != ELFDATA2LSB or ehdr.type != ET_CORE:
        raise VmcoreError(f"{path}: offset 0x4: not a 64-bit little-endian ELF core file")
    if ehdr.phentsize != PHDR.size:
        raise VmcoreError(f"{path}: offset 0x36: e_phentsize {ehdr.phentsize} is not 56")
    if ehdr.phnum in (0, PN_XNUM):
        raise NotSupported(
            f"{path}: offset 0x38: e_phnum {ehdr.phnum} in a flattened ELF; rearrange it "
            "first (kdump-capture rearrange)"
        )
    table = read_span(
        flat.pread,
        path,
        "the program headers",
        ehdr.phoff,
        ehdr.phnum * PHDR.size,
        size,
        where=0x20,
    )
    phdrs = [Phdr.unpack_from(table, i * PHDR.size) for i in range(ehdr.phnum)]
    notes = []
    for i, p in enumerate(phdrs):
        where = ehdr.phoff + i * PHDR.size
        if p.type not in (PT_LOAD, PT_NOTE):
            continue
        check_span(path, f"program header #{i}", p.offset, p.filesz, size, where=where)
        if p.type == PT_NOTE:
            notes.append((i, p, where))
        elif p.filesz > p.memsz or p.paddr + p.memsz > MAX_PHYS_ADDR:
            raise VmcoreError(
                f"{path}: offset {where:#x}: PT_LOAD #{i} has p_filesz {p.filesz:#x}, p_memsz "
                f"{p.memsz:#x} at {p.paddr:#x}"
            )
    loads = [p for p in phdrs if p.type == PT_LOAD]
    if not loads:
        raise VmcoreError(f"{path}: offset 0x38: no PT_LOAD: the dump holds no memory")
    check_span(path, "the note segments", 0, sum(p.filesz for _, p, _ in notes), None, MAX_NOTES)
    blob = b"".join(
        read_span(flat.pread, path, f"PT_NOTE #{i}", p.offset, p.filesz, size, where=where)
        for i, p, where in notes
    )
    vmcoreinfo: dict[str, str] = {}
    try:
        found = iter_notes(blob)
    except ValueError as e:
        raise VmcoreError(f"{path}: PT_NOTE: {e}") from None
    for n in found:
        if n.name == b"VMCOREINFO":
            vmcoreinfo = parse_vmcoreinfo(vmcoreinfo_text(n.desc, path))
    mem = ElfPhysMemory(loads, flat.pread, path)
    return Dump(
        path, "elf (flattened)", vmcoreinfo, blob, mem.read_phys, None, flat.close, mem.capacity
    )


class KdumpReader:
    """Page access to a kdump-compressed file through ``pread(size, offset)``.

    ``size`` is the file's size; ``holds`` the bytes of data it really contains (less for a
    flattened stream with holes). Every size and offset in the headers is checked against
    them (``bounds.check_span``) before anything is read or allocated.
    """

    def __init__(
        self,
        path: str,
        pread: Callable[[int, int], bytes],
        close: Callable[[], None],
        size: int,
        holds: int | None = None,
    ):
        self.path = path
        self.pread = pread
        self._close = close
        self.size = size
        holds = size if holds is None else min(holds, size)
        raw = read_span(pread, path, "the kdump header", 0, DISK_DUMP_HEADER.size, size)
        dh = DiskDumpHeader.unpack_from(raw)
        bs = dh.block_size
        if not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
            raise VmcoreError(f"{path}: offset 0x1ac: bad block_size {bs}")
        if dh.sub_hdr_size < 0:
            raise VmcoreError(f"{path}: offset 0x1b0: bad sub_hdr_size {dh.sub_hdr_size}")
        self.dh = dh
        self.block = bs
        self.desc_off = bs * (1 + dh.sub_hdr_size + dh.bitmap_blocks)
        check_span(
            path,
            "the header blocks and bitmaps (sub_hdr_size, bitmap_blocks)",
            0,
            self.desc_off,
            size,
            where=0x1B0,
        )
        sub = read_span(pread, path, "the kdump sub header", bs, KDUMP_SUB_HEADER.size, size)
        kh = KdumpSubHeader.unpack_from(sub)
        self.kh = kh
        self.max_mapnr = kh.max_mapnr_64 if dh.header_version >= 6 else dh.max_mapnr
        bm_off = bs * (1 + dh.sub_hdr_size)
        half = dh.bitmap_blocks * bs // 2
        needed = (self.max_mapnr + 7) // 8  # bytes of one bitmap
        # Before version 6, max_mapnr is 32 bits: saturated, it says nothing of the bitmap.
        saturated = dh.header_version < 6 and self.max_mapnr == 0xFFFFFFFF
        if not saturated and half > (needed + bs - 1) // bs * bs:
            # Held whole: a sparse file may claim any size (2^20 blocks: 2 GiB read into
            # memory for `dmesg`), so it must be what max_mapnr needs (makedumpfile and
            # QEMU write exactly that, rounded up to a block).
            raise VmcoreError(
                f"{path}: offset 0x1b4: bitmap_blocks {dh.bitmap_blocks} is more than "
                f"max_mapnr {self.max_mapnr} needs"
            )
        self.bitmap = read_span(
            pread, path, "the 2nd bitmap", bm_off + half, half, size, holds, where=0x1B4
        )
        ranks = [0]
        step = RANK_BLOCK_BITS // 8
        for i in range(0, len(self.bitmap), step):
            ranks.append(ranks[-1] + sum(self.bitmap[i : i + step].translate(_POPCOUNT)))
        self._ranks = ranks
        # One part of a split dump (makedumpfile --split) holds the page frames
        # start_pfn..end_pfn of the whole bitmap; its descriptors are numbered from start_pfn.
        self.first, self.stop = 0, self.max_mapnr
        if kh.split:
            v6 = dh.header_version >= 6
            start = kh.start_pfn_64 if v6 else kh.start_pfn
            end = kh.end_pfn_64 if v6 else kh.end_pfn
            self.first, self.stop = min(start, self.max_mapnr), min(end, self.max_mapnr)
            self.stop = max(self.first, self.stop)
        self._base = self._rank(self.first)
        self.pages = self._rank(self.stop) - self._base
        if kh.split and not self.pages:
            raise NotSupported(
                f"{path}: offset {bs + 12:#x}: a part of a split dump that holds no page "
                f"(page frames {self.first:#x}-{self.stop:#x}); join the parts first: "
                "makedumpfile --reassemble PART... OUT"
            )
        #: no more pages than descriptors fit in the file
        self.capacity = min(self.pages, max(0, size - self.desc_off) // PAGE_DESC.size) * bs
        self.notes_blob = b""
        self.vmcoreinfo: dict[str, str] = {}
        where = bs + 48  # kdump_sub_header.offset_note
        if dh.header_version >= 4 and kh.offset_note and kh.size_note:
            self.notes_blob = read_span(
                pread,
                path,
                "the ELF notes (size_note)",
                kh.offset_note,
                kh.size_note,
                size,
                min(holds, MAX_NOTES),
                where,
            )
        where = bs + 32  # kdump_sub_header.offset_vmcoreinfo
        if dh.header_version >= 3 and kh.offset_vmcoreinfo and kh.size_vmcoreinfo:
            text = read_span(
                pread,
                path,
                "VMCOREINFO (size_vmcoreinfo)",
                kh.offset_vmcoreinfo,
                kh.size_vmcoreinfo,
                size,
                MAX_VMCOREINFO,
                where,
            )
            self.vmcoreinfo = parse_vmcoreinfo(text.decode("ascii", "replace"))
        elif self.notes_blob:
            try:
                notes = iter_notes(self.notes_blob)
            except ValueError as e:
                raise VmcoreError(f"{path}: ELF notes at {kh.offset_note:#x}: {e}") from None
            for n in notes:
                if n.name == b"VMCOREINFO":
                    self.vmcoreinfo = parse_vmcoreinfo(vmcoreinfo_text(n.desc, path))

    @property
    def incomplete(self) -> str | None:
        """Why the file holds less than its headers promise, or None.

        makedumpfile marks a dump it could not finish writing (the disk full) with
        DUMP_DH_COMPRESSED_INCOMPLETE; one killed while writing carries no mark, but its last
        page descriptor (written last: descriptors go out with their data) is still empty.
        """
        if self.dh.status & DUMP_DH_COMPRESSED_INCOMPLETE:
            return (
                "its writer marked it incomplete (DUMP_DH_COMPRESSED_INCOMPLETE: it stopped "
                "early, as makedumpfile does when the disk is full)"
            )
        if not self.pages:
            return None
        off = self.desc_off + (self.pages - 1) * PAGE_DESC.size
        raw = self.pread(PAGE_DESC.size, off)
        if len(raw) != PAGE_DESC.size:
            return f"the file ends at offset {off:#x}, inside its page descriptors"
        pd = PageDesc.unpack_from(raw)
        if pd.offset == 0 or pd.size == 0 or pd.offset + pd.size > self.size:
            return (
                f"the descriptor of its last page (offset {off:#x}) is "
                f"{'empty' if pd.offset == 0 or pd.size == 0 else 'past the end of the file'}"
                ": writing it stopped before the end (the writer killed, or the copy cut short)"
            )
        return None

    def dump(self, kind: str) -> Dump:
        return Dump(
            self.path,
            kind,
            self.vmcoreinfo,
            self.notes_blob,
            self.read_phys,
            self.kh.phys_base,
            self._close,
            self.capacity,
            self.dh,
            self.kh,
            self.incomplete,
        )

    def _rank(self, pfn: int) -> int:
        """The number of dumped pages before ``pfn`` in the bitmap."""
        pfn = min(pfn, len(self.bitmap) * 8)
        blk = pfn // RANK_BLOCK_BITS
        lo = blk * RANK_BLOCK_BITS // 8
        rank = self._ranks[blk] + sum(self.bitmap[lo : pfn >> 3].translate(_POPCOUNT))
        if pfn & 7:
            rank += bin(self.bitmap[pfn >> 3] & ((1 << (pfn & 7)) - 1)).count("1")
        return rank

    def is_dumped(self, pfn: int) -> bool:
        return 0 <= pfn < min(self.max_mapnr, len(self.bitmap) * 8) and test_bit(self.bitmap, pfn)

    def desc(self, pfn: int) -> PageDesc:
        if not self.is_dumped(pfn):
            raise AddressError(f"{self.path}: page frame {pfn:#x} is not in the dump (excluded)")
        if not self.first <= pfn < self.stop:
            raise NotSupported(
                f"{self.path}: page frame {pfn:#x} is in another part of a split dump (this "
                f"part holds page frames {self.first:#x}-{self.stop:#x}); join the parts "
                "first: makedumpfile --reassemble PART... OUT"
            )
        off = self.desc_off + (self._rank(pfn) - self._base) * PAGE_DESC.size
        raw = self.pread(PAGE_DESC.size, off)
        if len(raw) != PAGE_DESC.size:
            raise VmcoreError(
                f"{self.path}: offset {off:#x}: file ends inside the page descriptors"
            )
        return PageDesc.unpack_from(raw)

    def page(self, pfn: int) -> bytes:
        pd = self.desc(pfn)
        if pd.offset == 0 or pd.size == 0:
            raise AddressError(f"{self.path}: page frame {pfn:#x} is missing (incomplete dump)")
        if pd.size > self.block:
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: descriptor size {pd.size}")
        data = read_span(
            self.pread, self.path, f"the data of page frame {pfn:#x}", pd.offset, pd.size, self.size
        )
        return self._decompress(pfn, pd, data)

    def _decompress(self, pfn: int, pd: PageDesc, data: bytes) -> bytes:
        flags = pd.flags
        try:
            # Never more than a block (+1 to tell "too long"): a page that inflates to more
            # is corrupt, and must not cost memory first (a 4 KiB zlib page can claim 4 MiB,
            # a zstd frame header any size it likes).
            if flags & DUMP_DH_COMPRESSED_ZLIB:
                out = zlib.decompressobj().decompress(data, self.block + 1)
            elif flags & DUMP_DH_COMPRESSED_ZSTD:
                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                    out = reader.read(self.block + 1)
            elif flags & DUMP_DH_COMPRESSED_LZO:
                try:
                    import lzo  # type: ignore[import-not-found]
                except ImportError:
                    raise NotSupported(f"{self.path}: lzo pages need python-lzo") from None
                out = lzo.decompress(data, False, self.block)
            elif flags & DUMP_DH_COMPRESSED_SNAPPY:
                raise NotSupported(f"{self.path}: snappy-compressed pages are not supported")
            else:
                out = data
        except (zlib.error, ValueError) as e:
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: cannot decompress: {e}") from e
        except Exception as e:  # zstandard.ZstdError, lzo.error: library errors, converted once
            if isinstance(e, VmcoreError | NotSupported):
                raise
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: cannot decompress: {e}") from e
        if len(out) != self.block:
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: decompressed to {len(out)} bytes")
        return out

    def read_phys(self, paddr: int, size: int) -> bytes:
        parts = []
        while size > 0:
            pfn, off = divmod(paddr, self.block)
            n = min(size, self.block - off)
            parts.append(self.page(pfn)[off : off + n])
            paddr += n
            size -= n
        return b"".join(parts)


__all__ = ["Dump", "KdumpReader", "open_dump"]
