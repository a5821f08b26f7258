"""ELF64 core-file structures (as /proc/vmcore presents them), declared once."""

from __future__ import annotations

import struct

from .record import Record

ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_X86_64 = 62

PT_LOAD = 1
PT_NOTE = 4

NT_PRSTATUS = 1
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"

# Elf64_Ehdr: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Nhdr: n_namesz, n_descsz, n_type
NHDR = struct.Struct("<III")
# Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
# sh_addralign, sh_entsize (a core file has one: section 0, for extended numbering)
SHDR = struct.Struct("<IIQQQQIIQQ")
assert EHDR.size == 64 and PHDR.size == 56 and NHDR.size == 12 and SHDR.size == 64

# Extended numbering (elf(5)): with 0xFFFF program headers or more, e_phnum is PN_XNUM and
# the count is section 0's sh_info. makedumpfile -E writes it for large machines, and
# crash (7.2.8 and later) and makedumpfile read it. A count this large is read or written
# at most (the headers cost 56 bytes each in the file, and a Phdr each when read back).
PN_XNUM = 0xFFFF
MAX_XNUM_PHNUM = 1 << 18
SH_INFO_OFFSET = 44  # of sh_info in Elf64_Shdr


class Ehdr(Record):
    __slots__ = (
        "ident",
        "type",
        "machine",
        "version",
        "entry",
        "phoff",
        "shoff",
        "flags",
        "ehsize",
        "phentsize",
        "phnum",
        "shentsize",
        "shnum",
        "shstrndx",
    )

    def __init__(
        self,
        ident: bytes,
        type: int,
        machine: int,
        version: int,
        entry: int,
        phoff: int,
        shoff: int,
        flags: int,
        ehsize: int,
        phentsize: int,
        phnum: int,
        shentsize: int,
        shnum: int,
        shstrndx: int,
    ) -> None:
        self.ident = ident
        self.type = type
        self.machine = machine
        self.version = version
        self.entry = entry
        self.phoff = phoff
        self.shoff = shoff
        self.flags = flags
        self.ehsize = ehsize
        self.phentsize = phentsize
        self.phnum = phnum
        self.shentsize = shentsize
        self.shnum = shnum
        self.shstrndx = shstrndx

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> Ehdr:
        return cls(*EHDR.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return EHDR.pack(
            self.ident,
            self.type,
            self.machine,
            self.version,
            self.entry,
            self.phoff,
            self.shoff,
            self.flags,
            self.ehsize,
            self.phentsize,
            self.phnum,
            self.shentsize,
            self.shnum,
            self.shstrndx,
        )

    @classmethod
    def core(cls, phnum: int, machine: int = EM_X86_64) -> Ehdr:
        """A core file's header, its ``phnum`` program headers right behind it; from
        PN_XNUM on, with extended numbering: section 0 (``xnum_section``) follows them."""
        ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
        xnum = phnum >= PN_XNUM
        return cls(
            ident,
            ET_CORE,
            machine,
            EV_CURRENT,
            0,
            EHDR.size,
            EHDR.size + PHDR.size * phnum if xnum else 0,
            0,
            EHDR.size,
            PHDR.size,
            PN_XNUM if xnum else phnum,
            SHDR.size if xnum else 0,
            1 if xnum else 0,
            0,
        )


def xnum_section(phnum: int) -> bytes:
    """Section 0 of an extended-numbered core file: SHT_NULL, sh_info the real phnum."""
    return SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)


class Phdr(Record):
    __slots__ = ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")

    def __init__(
        self,
        type: int,
        flags: int,
        offset: int,
        vaddr: int,
        paddr: int,
        filesz: int,
        memsz: int,
        align: int,
    ) -> None:
        self.type = type
        self.flags = flags
        self.offset = offset
        self.vaddr = vaddr
        self.paddr = paddr
        self.filesz = filesz
        self.memsz = memsz
        self.align = align

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, offset: int = 0) -> Phdr:
        return cls(*PHDR.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return PHDR.pack(
            self.type,
            self.flags,
            self.offset,
            self.vaddr,
            self.paddr,
            self.filesz,
            self.memsz,
            self.align,
        )


class Note(Record):
    """One ELF note; ``offset`` is where its descriptor starts inside the note blob."""

    __slots__ = ("name", "type", "desc", "offset")

    def __init__(self, name: bytes, type: int, desc: bytes | memoryview, offset: int) -> None:
        self.name = name
        self.type = type
        self.desc = desc
        self.offset = offset


def _pad4(n: int) -> int:
    return (n + 3) & ~3


# Notes parsed from one blob at most: a crashed kernel writes one per CPU (NR_CPUS is at
# most 8192), VMCOREINFO and a few more (device dumps, Xen). 64 MiB of empty notes made
# 5.2 million objects: 2.2 GB.
MAX_NOTE_COUNT = 1 << 16
# A description larger than this is a view into the blob, not a copy of it (a view costs
# about 200 bytes, more than a small copy).
NOTE_VIEW = 4096


def iter_notes(blob: bytes | memoryview) -> list[Note]:
    """Parse a PT_NOTE blob, or a view of a mapped one; stops at a zero header or the blob's
    end (as the kernel does).

    Raises ValueError past MAX_NOTE_COUNT notes."""
    notes: list[Note] = []
    off = 0
    while off + NHDR.size <= len(blob):
        if len(notes) == MAX_NOTE_COUNT:
            raise ValueError(f"more than {MAX_NOTE_COUNT} notes (a kernel writes one per CPU)")
        namesz, descsz, ntype = NHDR.unpack_from(blob, off)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break
        name_off = off + NHDR.size
        desc_off = name_off + _pad4(namesz)
        end = desc_off + _pad4(descsz)
        if desc_off + descsz > len(blob):
            raise ValueError(f"note at blob offset {off} runs past the end of the note segment")
        name = bytes(blob[name_off : name_off + namesz]).rstrip(b"\0")
        if descsz > NOTE_VIEW:  # a device-dump note can be tens of MiB: not copied
            desc: bytes | memoryview = memoryview(blob)[desc_off : desc_off + descsz]
        else:
            desc = bytes(blob[desc_off : desc_off + descsz])
        notes.append(Note(name, ntype, desc, desc_off))
        off = end
    return notes


def pack_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One note record with the name NUL-terminated and both parts padded to 4 bytes."""
    n = name + b"\0"
    return (
        NHDR.pack(len(n), len(desc), ntype)
        + n.ljust(_pad4(len(n)), b"\0")
        + desc.ljust(_pad4(len(desc)), b"\0")
    )
