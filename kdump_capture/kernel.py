"""The crashed kernel's memory: typed VMCOREINFO, physical reads, x86_64 vtop, mem_map."""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable, Iterable, Iterator

from .bounds import MAX_KERNEL_READ
from .elf import PT_LOAD, Phdr
from .errors import VmcoreError
from .record import Record

# typing.TYPE_CHECKING without importing typing, which costs the capture's start-up ~3 ms
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class PhysMemory(Protocol):
        """Physical memory of the crashed machine, as some dump file holds it.

        ``capacity`` is how many bytes of memory the dump holds: no structure read from it
        can be larger, whatever size a corrupt VMCOREINFO or memory claims.
        """

        capacity: int

        def read_phys(self, paddr: int, size: int) -> bytes:
            """``size`` bytes at ``paddr``; raises AddressError if any of it is not in the
            dump."""
            ...


log = logging.getLogger(__name__)

PAGE = 4096
PAGE_SHIFT = 12
START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map: kernel text mapping base
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
# Page-table entries: present bit, PSE (huge page) bit and the physical address bits.
PTE_PRESENT = 1
PTE_PSE = 1 << 7
PTE_ADDR_MASK = 0x000FFFFFFFFFF000
# A struct mem_section's section_mem_map: low 5 bits are flags (SECTION_MAP_LAST_BIT = 1<<5
# since Linux 4.13), bit 0 = SECTION_MARKED_PRESENT.
SECTION_MAP_MASK = ~((1 << 5) - 1) & 0xFFFFFFFFFFFFFFFF
SECTION_MARKED_PRESENT = 1
# x86_64 physical addresses have at most 52 bits (5-level paging): bounds section numbers
# when VMCOREINFO does not say MAX_PHYSMEM_BITS.
# Separate mem_map ranges kept (section by section without vmemmap: a 1 TiB machine
# with 128 MiB sections has 8192); past this the struct pages are not read (a fallback).
MAX_MEM_MAP_RANGES = 1 << 16
MAX_PHYS_BITS = 52
U64_MASK = 0xFFFFFFFFFFFFFFFF


class KernelInfoError(VmcoreError):
    """VMCOREINFO lacks an entry (or has a malformed one) that an operation needs."""


class AddressError(VmcoreError):
    """A kernel address cannot be translated or its memory is not in the dump."""


class VmcoreInfo:
    """Typed access to VMCOREINFO entries, parsed the way makedumpfile's read_vmcoreinfo does.

    ``SYMBOL(x)`` and ``KERNELOFFSET`` are hexadecimal; ``SIZE``, ``OFFSET``, ``LENGTH`` and
    ``NUMBER`` are decimal (``NUMBER`` is signed, with a ``0x`` hex form for a few keys).
    Getters return None when the key is missing; ``need_*`` raise KernelInfoError instead.
    """

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries

    def _int(self, key: str, base: int, unsigned: bool = False) -> int | None:
        raw = self.entries.get(key)
        if raw is None:
            return None
        try:
            if len(raw) > 24:  # 2**64 has 20 digits: anything longer is not a C long
                raise ValueError
            if base == 10 and raw.lower().startswith(("0x", "-0x")):
                value = int(raw, 16)
            else:
                value = int(raw, base)
        except ValueError:
            raise KernelInfoError(f"VMCOREINFO: {key}={raw[:32]!r} is not a number") from None
        if unsigned and value < 0:
            raise KernelInfoError(f"VMCOREINFO: {key}={raw!r} is negative")
        return value

    def symbol(self, name: str) -> int | None:
        return self._int(f"SYMBOL({name})", 16)

    # SIZE, OFFSET and LENGTH are %lu in the kernel: a negative one is corrupt.
    def size(self, name: str) -> int | None:
        return self._int(f"SIZE({name})", 10, unsigned=True)

    def offset(self, name: str) -> int | None:
        return self._int(f"OFFSET({name})", 10, unsigned=True)

    def length(self, name: str) -> int | None:
        return self._int(f"LENGTH({name})", 10, unsigned=True)

    def number(self, name: str) -> int | None:
        return self._int(f"NUMBER({name})", 10)

    def kerneloffset(self) -> int | None:
        return self._int("KERNELOFFSET", 16)

    def _need(self, kind: str, name: str, value: int | None) -> int:
        if value is None:
            raise KernelInfoError(f"VMCOREINFO has no {kind}({name})")
        return value

    def need_symbol(self, name: str) -> int:
        return self._need("SYMBOL", name, self.symbol(name))

    def need_size(self, name: str) -> int:
        return self._need("SIZE", name, self.size(name))

    def need_offset(self, name: str) -> int:
        return self._need("OFFSET", name, self.offset(name))

    def need_length(self, name: str) -> int:
        return self._need("LENGTH", name, self.length(name))

    def need_number(self, name: str) -> int:
        return self._need("NUMBER", name, self.number(name))


class _Seg(Record):
    __slots__ = ("paddr", "end", "offset", "file_end")

    def __init__(self, paddr: int, end: int, offset: int, file_end: int) -> None:
        self.paddr = paddr
        self.end = end
        self.offset = offset  # file offset of paddr
        self.file_end = file_end  # paddr where file-backed bytes stop (p_filesz); then zeros


class ElfPhysMemory:
    """Physical reads through an ELF core's PT_LOADs (``pread(size, offset)`` of the file)."""

    def __init__(self, loads: Iterable[Phdr], pread: Callable[[int, int], bytes], name: str):
        segs = sorted(
            (
                _Seg(p.paddr, p.paddr + p.memsz, p.offset, p.paddr + p.filesz)
                for p in loads
                if p.type == PT_LOAD and p.memsz
            ),
            key=lambda s: s.paddr,
        )
        self._segs = segs
        self._starts = [s.paddr for s in segs]
        self._reach = []  # highest end among segments[0..i]
        top = 0
        for s in segs:
            top = max(top, s.end)
            self._reach.append(top)
        self._pread = pread
        self.name = name
        self.capacity = sum(s.file_end - s.paddr for s in segs)

    def find(self, paddr: int) -> _Seg | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        # Segments may overlap (the kernel text PT_LOAD lies inside a RAM PT_LOAD): look
        # back while an earlier segment could still reach paddr.
        while i >= 0 and self._reach[i] > paddr:
            s = self._segs[i]
            if paddr < s.end:
                return s
            i -= 1
        return None

    def next_start(self, paddr: int) -> int:
        """The lowest segment start above ``paddr`` (end of a gap), or 2^64."""
        i = bisect.bisect_right(self._starts, paddr)
        return self._starts[i] if i < len(self._starts) else 1 << 64

    def read_phys(self, paddr: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            s = self.find(paddr)
            if s is None:
                raise AddressError(
                    f"{self.name}: physical address {paddr:#x} is not in any PT_LOAD of the dump"
                )
            n = min(size, s.end - paddr)
            file_n = max(0, min(n, s.file_end - paddr))
            if file_n:
                data = self._pread(file_n, s.offset + (paddr - s.paddr))
                if len(data) != file_n:
                    raise AddressError(
                        f"{self.name}: offset {s.offset + (paddr - s.paddr):#x}: "
                        "file ends early (truncated vmcore)"
                    )
                out += data
            out += bytes(n - file_n)
            paddr += n
            size -= n
        return bytes(out)


class Kernel:
    """Reads the crashed x86_64 kernel's virtual memory by walking its page tables."""

    def __init__(self, info: VmcoreInfo, mem: PhysMemory, phys_base: int | None = None) -> None:
        self.info = info
        self.mem = mem
        if phys_base is None:
            phys_base = info.need_number("phys_base")
        self.phys_base = phys_base & 0xFFFFFFFFFFFFFFFF
        top = info.symbol("init_top_pgt")
        if top is None:
            top = info.need_symbol("swapper_pg_dir")
        self.pgd_pa = (top - START_KERNEL_MAP + self.phys_base) & 0xFFFFFFFFFFFFFFFF
        self.levels = 5 if info.number("pgtable_l5_enabled") == 1 else 4
        sme = info.number("sme_mask") or 0
        self.addr_mask = PTE_ADDR_MASK & ~(sme & 0xFFFFFFFFFFFFFFFF)
        self._tables: dict[int, bytes] = {}

    # -- translation ---------------------------------------------------------------------
    def _table(self, pa: int) -> bytes:
        t = self._tables.get(pa)
        if t is None:
            if len(self._tables) > 4096:  # 16 MiB worst case; vmemmap walks need few tables
                self._tables.clear()
            t = self.mem.read_phys(pa, PAGE)
            self._tables[pa] = t
        return t

    def translate(self, va: int) -> tuple[int, int]:
        """Physical address of ``va`` and the bytes left in its mapping (page or huge page)."""
        shifts = (48, 39, 30, 21, 12) if self.levels == 5 else (39, 30, 21, 12)
        table = self.pgd_pa
        for shift in shifts:
            entry = U64.unpack_from(self._table(table), ((va >> shift) & 511) * 8)[0]
            if not entry & PTE_PRESENT:
                raise AddressError(f"kernel address {va:#x} is not mapped (level {shift})")
            if shift in (30, 21) and entry & PTE_PSE:
                size = 1 << shift
                base = entry & self.addr_mask & ~(size - 1)
                off = va & (size - 1)
                return base + off, size - off
            table = entry & self.addr_mask
        off = va & (PAGE - 1)
        return table + off, PAGE - off

    def vtop(self, va: int) -> int:
        return self.translate(va)[0]

    def read(self, va: int, size: int) -> bytes:
        """``size`` bytes of kernel virtual memory at ``va``.

        ``size`` comes from the dump: it must fit in what the dump holds and below
        MAX_KERNEL_READ, else AddressError (before anything is read).
        """
        limit = min(MAX_KERNEL_READ, self.mem.capacity)
        if not 0 <= size <= limit:
            raise AddressError(
                f"a read of {size:#x} bytes at {va:#x} is larger than the dump can hold "
                f"({limit:#x} bytes): corrupt size in VMCOREINFO or kernel memory"
            )
        parts = []
        while size > 0:
            pa, left = self.translate(va)
            n = min(size, left)
            parts.append(self.mem.read_phys(pa, n))
            va += n
            size -= n
        return b"".join(parts)

    def u64(self, va: int) -> int:
        return U64.unpack(self.read(va, 8))[0]

    def u32(self, va: int) -> int:
        return U32.unpack(self.read(va, 4))[0]

    # -- kernel facts ----------------------------------------------------------------------
    def utsname(self) -> bytes:
        """The 390-byte ``struct new_utsname`` of init_uts_ns."""
        base = self.info.need_symbol("init_uts_ns")
        return self.read(base + (self.info.offset("uts_namespace.name") or 0), 390)

    def mem_maps(self, max_mapnr: int, ram: list[tuple[int, int]] | None = None) -> MemMaps:
        """Where the struct pages of every present section below ``max_mapnr`` live.

        SPARSEMEM_EXTREME decoding as makedumpfile's get_mm_sparsemem(): SYMBOL(mem_section)
        is the root array; each root holds PAGE/SIZE(mem_section) sections. The number of
        sections is bounded by the kernel's own limits (LENGTH(mem_section) roots,
        MAX_PHYSMEM_BITS), not by the PT_LOADs, which a corrupt vmcore may place anywhere.
        Only the sections holding ``ram`` (pfn ranges ``(start, end)``; all below
        ``max_mapnr`` if None) are read, a root's sections in one piece: what is read grows
        with the dump, not with what the crashed kernel's tables claim. At most
        MAX_MEM_MAP_RANGES ranges are kept (one per section where the mem_maps do not
        follow each other: 2 GB from 64 pages of hostile roots before the bound).
        """
        info = self.info
        root = info.need_symbol("mem_section")
        ms_size = info.need_size("mem_section")
        map_off = info.need_offset("mem_section.section_mem_map")
        sec_bits = info.need_number("SECTION_SIZE_BITS")
        page_size = info.need_size("page")
        if not 8 <= ms_size <= PAGE or not 0 <= map_off <= ms_size - 8:
            raise KernelInfoError(f"VMCOREINFO: implausible SIZE(mem_section)={ms_size}")
        if not PAGE_SHIFT < sec_bits < MAX_PHYS_BITS:
            raise KernelInfoError(f"VMCOREINFO: implausible SECTION_SIZE_BITS={sec_bits}")
        pfn_shift = sec_bits - PAGE_SHIFT
        per_section = 1 << pfn_shift
        per_root = PAGE // ms_size
        phys_bits = info.number("MAX_PHYSMEM_BITS")
        if phys_bits is None or not sec_bits <= phys_bits <= MAX_PHYS_BITS:
            phys_bits = MAX_PHYS_BITS
        num_sections = min(-(-max_mapnr // per_section), 1 << (phys_bits - sec_bits))
        nr_roots = info.length("mem_section")
        if nr_roots is not None and 0 < nr_roots < -(-num_sections // per_root):
            num_sections = min(num_sections, nr_roots * per_root)
        wanted = merge_spans(
            (s >> pfn_shift, min(((e - 1) >> pfn_shift) + 1, num_sections))
            for s, e in (ram if ram is not None else [(0, max_mapnr)])
            if s < e
        )
        ranges: list[tuple[int, int, int]] = []
        table_root, table = -1, b""
        for lo, hi in wanted:
            for nr in range(lo, hi):
                ri, i = divmod(nr, per_root)
                if ri != table_root:
                    table_root, table = ri, b""
                    r = self.u64(root + 8 * ri)
                    if r:
                        first = ri * per_root
                        table = self.read(r, min(per_root, num_sections - first) * ms_size)
                if not table:
                    continue
                coded = U64.unpack_from(table, i * ms_size + map_off)[0]
                if not coded & SECTION_MARKED_PRESENT:
                    continue
                start = nr << pfn_shift
                mem_map = ((coded & SECTION_MAP_MASK) + start * page_size) & U64_MASK
                if mem_map >> 63 == 0:
                    raise KernelInfoError(
                        f"mem_section {nr}: mem_map {mem_map:#x} is not a kernel address"
                    )
                end = min(start + per_section, max_mapnr)
                if start >= end:
                    continue
                if ranges:
                    p_start, p_end, p_map = ranges[-1]
                    if p_end == start and p_map + (start - p_start) * page_size == mem_map:
                        ranges[-1] = (p_start, end, p_map)  # vmemmap: one range for all
                        continue
                if len(ranges) >= MAX_MEM_MAP_RANGES:
                    raise KernelInfoError(
                        f"mem_section: more than {MAX_MEM_MAP_RANGES} separate mem_map ranges"
                    )
                ranges.append((start, end, mem_map))
        return MemMaps(per_section, page_size, ranges)


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``(start, end)`` spans covering the non-empty input spans."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(x for x in spans if x[0] < x[1]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


class MemMaps(Record):
    """Present sections as ranges ``(pfn_start, pfn_end, mem_map_va)``, merged wherever the
    struct pages of neighbouring sections are contiguous (always, with a vmemmap).

    Kept per range rather than per section so that its size does not grow with RAM; the
    section size is kept because makedumpfile walks struct pages one section at a time.
    """

    __slots__ = ("section_pfns", "page_size", "ranges")

    def __init__(self, section_pfns: int, page_size: int, ranges: list[tuple[int, int, int]]):
        self.section_pfns = section_pfns
        self.page_size = page_size
        self.ranges = ranges

    @property
    def end(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def sections(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """``(pfn_start, pfn_end, mem_map_va)`` of each present section meeting [lo, hi)."""
        per = self.section_pfns
        i = bisect.bisect_right(self.ranges, (lo, U64_MASK, U64_MASK)) - 1
        i = max(i, 0)
        for start, end, mem_map in self.ranges[i:]:
            if start >= hi:
                break
            if end <= lo:
                continue
            s = max(start, lo - lo % per)
            while s < min(end, hi):
                e = min(s - s % per + per, end)
                yield s, e, mem_map + (s - start) * self.page_size
                s = e


def max_mapnr_of(loads: Iterable[Phdr]) -> int:
    """Page frames covered by the PT_LOADs' data: ``ceil(max(p_paddr + p_filesz) / PAGE)``.

    makedumpfile counts p_memsz. In /proc/vmcore the two are equal; a tail with no data in
    the file (memsz > filesz: an ELF dump's excluded pages) holds nothing to dump, and a
    corrupt header could claim petabytes there: hours of empty bitmap windows.
    """
    top = max((p.paddr + p.filesz for p in loads if p.type == PT_LOAD), default=0)
    return (top + PAGE - 1) >> PAGE_SHIFT
