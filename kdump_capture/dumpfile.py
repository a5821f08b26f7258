"""Open any dump we or makedumpfile write (ELF, kdump-compressed, flattened) for reading."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .elf import iter_notes
from .errors import NoDumpError, NotSupported, VmcoreError
from .formats.filter import _POPCOUNT, test_bit
from .formats.flat import FlatFile, is_flattened
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
from .vmcore import Vmcore, open_vmcore, parse_vmcoreinfo

# Bits per entry of the rank index (pfn -> descriptor number): 4096 bits = 512 bitmap bytes,
# so a lookup counts at most 512 bytes in C.
RANK_BLOCK_BITS = 4096


@dataclass
class Dump:
    """A dump opened for reading: VMCOREINFO, notes and physical memory."""

    path: str
    kind: str  # "elf", "kdump" or "kdump (flattened)"
    vmcoreinfo: dict[str, str]
    notes_blob: bytes
    read_phys: Callable[[int, int], bytes]
    phys_base: int | None
    close: Callable[[], None]
    header: DiskDumpHeader | None = None
    sub_header: KdumpSubHeader | None = None

    @property
    def info(self) -> VmcoreInfo:
        return VmcoreInfo(self.vmcoreinfo)

    def dmesg(self) -> str:
        """The kernel log, as ``makedumpfile --dump-dmesg`` prints it."""
        from .dmesg import extract_from

        if not self.vmcoreinfo:
            raise VmcoreError(f"{self.path}: the dump has no VMCOREINFO; cannot find the log")
        return extract_from(self.info, self, self.phys_base)

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
            head = f.read(4096)
    except OSError as e:
        raise NoDumpError(f"{path}: cannot open: {e.strerror}") from e
    if head[:4] == b"\x7fELF":
        vm = open_vmcore(path)
        return _elf_dump(vm)
    if head[:8] == KDUMP_SIGNATURE:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

        def pread(size: int, offset: int) -> bytes:
            return os.pread(fd, size, offset)

        try:
            return KdumpReader(path, pread, lambda: os.close(fd)).dump("kdump")
        except BaseException:
            os.close(fd)
            raise
    if is_flattened(head):
        flat = FlatFile(path)
        try:
            head2 = flat.pread(8, 0)
            if head2 != KDUMP_SIGNATURE:
                raise NotSupported(
                    f"{path}: flattened stream of a non-kdump file; rearrange it first "
                    "(kdump-capture rearrange)"
                )
            return KdumpReader(path, flat.pread, flat.close).dump("kdump (flattened)")
        except BaseException:
            flat.close()
            raise
    raise VmcoreError(f"{path}: offset 0x0: not an ELF, kdump-compressed or flattened dump")


def _elf_dump(vm: Vmcore) -> Dump:
    mem = ElfPhysMemory(vm.loads, vm.pread, vm.path)
    return Dump(vm.path, "elf", vm.vmcoreinfo, vm.notes_blob, mem.read_phys, None, vm.close)


class KdumpReader:
    """Page access to a kdump-compressed file through ``pread(size, offset)``."""

    def __init__(self, path: str, pread: Callable[[int, int], bytes], close: Callable[[], None]):
        self.path = path
        self.pread = pread
        self._close = close
        raw = pread(DISK_DUMP_HEADER.size, 0)
        if len(raw) < DISK_DUMP_HEADER.size:
            raise VmcoreError(f"{path}: file ends inside the kdump header")
        dh = DiskDumpHeader.unpack_from(raw)
        if dh.block_size <= 0 or dh.block_size & (dh.block_size - 1) or dh.sub_hdr_size < 0:
            raise VmcoreError(f"{path}: offset 0x1ac: bad block_size {dh.block_size}")
        self.dh = dh
        self.block = dh.block_size
        kh = KdumpSubHeader.unpack_from(pread(KDUMP_SUB_HEADER.size, self.block).ljust(104, b"\0"))
        self.kh = kh
        self.max_mapnr = kh.max_mapnr_64 if dh.header_version >= 6 else dh.max_mapnr
        bm_off = self.block * (1 + dh.sub_hdr_size)
        half = dh.bitmap_blocks * self.block // 2
        self.bitmap = pread(half, bm_off + half)
        if len(self.bitmap) != half:
            raise VmcoreError(f"{path}: offset {bm_off + half:#x}: file ends inside the bitmap")
        self.desc_off = self.block * (1 + dh.sub_hdr_size + dh.bitmap_blocks)
        ranks = [0]
        step = RANK_BLOCK_BITS // 8
        for i in range(0, len(self.bitmap), step):
            ranks.append(ranks[-1] + sum(self.bitmap[i : i + step].translate(_POPCOUNT)))
        self._ranks = ranks
        self.notes_blob = b""
        self.vmcoreinfo: dict[str, str] = {}
        if dh.header_version >= 4 and kh.offset_note and kh.size_note:
            self.notes_blob = pread(kh.size_note, kh.offset_note)
        if dh.header_version >= 3 and kh.offset_vmcoreinfo and kh.size_vmcoreinfo:
            text = pread(kh.size_vmcoreinfo, kh.offset_vmcoreinfo)
            self.vmcoreinfo = parse_vmcoreinfo(text.decode("ascii", "replace"))
        elif self.notes_blob:
            for n in iter_notes(self.notes_blob):
                if n.name == b"VMCOREINFO":
                    self.vmcoreinfo = parse_vmcoreinfo(n.desc.decode("ascii", "replace"))

    @property
    def incomplete(self) -> bool:
        return bool(self.dh.status & DUMP_DH_COMPRESSED_INCOMPLETE)

    def dump(self, kind: str) -> Dump:
        return Dump(
            self.path,
            kind,
            self.vmcoreinfo,
            self.notes_blob,
            self.read_phys,
            self.kh.phys_base,
            self._close,
            self.dh,
            self.kh,
        )

    def is_dumped(self, pfn: int) -> bool:
        return 0 <= pfn < min(self.max_mapnr, len(self.bitmap) * 8) and test_bit(self.bitmap, pfn)

    def desc(self, pfn: int) -> PageDesc:
        if not self.is_dumped(pfn):
            raise AddressError(f"{self.path}: page frame {pfn:#x} is not in the dump (excluded)")
        blk = pfn // RANK_BLOCK_BITS
        lo = blk * RANK_BLOCK_BITS // 8
        rank = self._ranks[blk] + sum(self.bitmap[lo : pfn >> 3].translate(_POPCOUNT))
        rank += bin(self.bitmap[pfn >> 3] & ((1 << (pfn & 7)) - 1)).count("1")
        raw = self.pread(PAGE_DESC.size, self.desc_off + rank * PAGE_DESC.size)
        if len(raw) != PAGE_DESC.size:
            raise VmcoreError(f"{self.path}: file ends inside the page descriptors")
        return PageDesc.unpack_from(raw)

    def page(self, pfn: int) -> bytes:
        pd = self.desc(pfn)
        if pd.offset == 0 or pd.size == 0:
            raise AddressError(f"{self.path}: page frame {pfn:#x} is missing (incomplete dump)")
        if pd.size > self.block:
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: descriptor size {pd.size}")
        data = self.pread(pd.size, pd.offset)
        if len(data) != pd.size:
            raise VmcoreError(f"{self.path}: page frame {pfn:#x}: data past the end of file")
        return self._decompress(pfn, pd, data)

    def _decompress(self, pfn: int, pd: PageDesc, data: bytes) -> bytes:
        flags = pd.flags
        try:
            if flags & DUMP_DH_COMPRESSED_ZLIB:
                out = zlib.decompress(data)
            elif flags & DUMP_DH_COMPRESSED_ZSTD:
                import zstandard

                out = zstandard.ZstdDecompressor().decompress(data, max_output_size=self.block)
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
