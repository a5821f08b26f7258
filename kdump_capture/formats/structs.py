"""kdump-compressed binary structures (makedumpfile ``diskdump_mod.h``), declared once."""

from __future__ import annotations

import struct

from ..record import Record

KDUMP_SIGNATURE = b"KDUMP   "
UTSNAME_SIZE = 390  # struct new_utsname: six fields of 65 bytes

DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8
DUMP_DH_EXCLUDED_VMEMMAP = 0x10
DUMP_DH_COMPRESSED_ZSTD = 0x20
COMPRESSION_FLAGS = (
    DUMP_DH_COMPRESSED_ZLIB
    | DUMP_DH_COMPRESSED_LZO
    | DUMP_DH_COMPRESSED_SNAPPY
    | DUMP_DH_COMPRESSED_ZSTD
)

# struct disk_dump_header: signature[8], header_version, utsname, 6 bytes padding,
# timestamp (tv_sec, tv_usec), status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr,
# total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")
# struct kdump_sub_header: phys_base, dump_level, split, start_pfn, end_pfn,
# offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note, offset_eraseinfo,
# size_eraseinfo, start_pfn_64, end_pfn_64, max_mapnr_64.
KDUMP_SUB_HEADER = struct.Struct("<QiiQQqQqQqQQQQ")
# struct page_desc: offset (off_t), size, flags, page_flags.
PAGE_DESC = struct.Struct("<qIIQ")
# sizeof() of the C structs on x86_64 (reference spec §1.2, §1.3, §1.5).
assert DISK_DUMP_HEADER.size == 464
assert KDUMP_SUB_HEADER.size == 104
assert PAGE_DESC.size == 24


class DiskDumpHeader(Record):
    __slots__ = (
        "header_version",
        "utsname",
        "tv_sec",
        "tv_usec",
        "status",
        "block_size",
        "sub_hdr_size",
        "bitmap_blocks",
        "max_mapnr",
        "nr_cpus",
        "total_ram_blocks",
        "device_blocks",
        "written_blocks",
        "current_cpu",
        "signature",
    )

    def __init__(
        self,
        header_version: int,
        utsname: bytes,
        tv_sec: int,
        tv_usec: int,
        status: int,
        block_size: int,
        sub_hdr_size: int,
        bitmap_blocks: int,
        max_mapnr: int,
        nr_cpus: int,
        total_ram_blocks: int = 0,
        device_blocks: int = 0,
        written_blocks: int = 0,
        current_cpu: int = 0,
        signature: bytes = KDUMP_SIGNATURE,
    ) -> None:
        self.header_version = header_version
        self.utsname = utsname
        self.tv_sec = tv_sec
        self.tv_usec = tv_usec
        self.status = status
        self.block_size = block_size
        self.sub_hdr_size = sub_hdr_size
        self.bitmap_blocks = bitmap_blocks
        self.max_mapnr = max_mapnr
        self.nr_cpus = nr_cpus
        self.total_ram_blocks = total_ram_blocks
        self.device_blocks = device_blocks
        self.written_blocks = written_blocks
        self.current_cpu = current_cpu
        self.signature = signature

    def pack(self) -> bytes:
        return DISK_DUMP_HEADER.pack(
            self.signature,
            self.header_version,
            self.utsname,
            self.tv_sec,
            self.tv_usec,
            self.status,
            self.block_size,
            self.sub_hdr_size,
            self.bitmap_blocks,
            self.max_mapnr,
            self.total_ram_blocks,
            self.device_blocks,
            self.written_blocks,
            self.current_cpu,
            self.nr_cpus,
        )

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> DiskDumpHeader:
        (sig, ver, uts, sec, usec, status, bs, sub, bmb, mm, trb, db, wb, cc, ncpu) = (
            DISK_DUMP_HEADER.unpack_from(buf, offset)
        )
        return cls(ver, uts, sec, usec, status, bs, sub, bmb, mm, ncpu, trb, db, wb, cc, sig)

    def uts_field(self, index: int) -> str:
        """One utsname field (0 sysname .. 4 machine) as text."""
        raw = self.utsname[65 * index : 65 * (index + 1)]
        return raw.split(b"\0")[0].decode("ascii", "replace")


class KdumpSubHeader(Record):
    __slots__ = (
        "phys_base",
        "dump_level",
        "split",
        "start_pfn",
        "end_pfn",
        "offset_vmcoreinfo",
        "size_vmcoreinfo",
        "offset_note",
        "size_note",
        "offset_eraseinfo",
        "size_eraseinfo",
        "start_pfn_64",
        "end_pfn_64",
        "max_mapnr_64",
    )

    def __init__(
        self,
        phys_base: int = 0,
        dump_level: int = 0,
        split: int = 0,
        start_pfn: int = 0,
        end_pfn: int = 0,
        offset_vmcoreinfo: int = 0,
        size_vmcoreinfo: int = 0,
        offset_note: int = 0,
        size_note: int = 0,
        offset_eraseinfo: int = 0,
        size_eraseinfo: int = 0,
        start_pfn_64: int = 0,
        end_pfn_64: int = 0,
        max_mapnr_64: int = 0,
    ) -> None:
        self.phys_base = phys_base
        self.dump_level = dump_level
        self.split = split
        self.start_pfn = start_pfn
        self.end_pfn = end_pfn
        self.offset_vmcoreinfo = offset_vmcoreinfo
        self.size_vmcoreinfo = size_vmcoreinfo
        self.offset_note = offset_note
        self.size_note = size_note
        self.offset_eraseinfo = offset_eraseinfo
        self.size_eraseinfo = size_eraseinfo
        self.start_pfn_64 = start_pfn_64
        self.end_pfn_64 = end_pfn_64
        self.max_mapnr_64 = max_mapnr_64

    def pack(self) -> bytes:
        return KDUMP_SUB_HEADER.pack(
            self.phys_base,
            self.dump_level,
            self.split,
            self.start_pfn,
            self.end_pfn,
            self.offset_vmcoreinfo,
            self.size_vmcoreinfo,
            self.offset_note,
            self.size_note,
            self.offset_eraseinfo,
            self.size_eraseinfo,
            self.start_pfn_64,
            self.end_pfn_64,
            self.max_mapnr_64,
        )

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> KdumpSubHeader:
        return cls(*KDUMP_SUB_HEADER.unpack_from(buf, offset))


class PageDesc(Record):
    __slots__ = ("offset", "size", "flags", "page_flags")

    def __init__(self, offset: int, size: int, flags: int, page_flags: int = 0) -> None:
        self.offset = offset
        self.size = size
        self.flags = flags
        self.page_flags = page_flags

    def pack(self) -> bytes:
        return PAGE_DESC.pack(self.offset, self.size, self.flags, self.page_flags)

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> PageDesc:
        return cls(*PAGE_DESC.unpack_from(buf, offset))
