"""Large synthetic vmcores with a realistic struct-page array, as sparse files (scale tests).

A machine of any RAM size (1 GiB to 1 TiB and more) laid out the way a 6.1 x86_64 kernel
leaves it: RAM from 1 MiB with a hole below 4 GiB, SPARSEMEM_EXTREME mem_section roots,
a vmemmap of 64-byte struct pages mapped with 2 MiB pages and stored at the top of RAM,
4-level page tables, VMCOREINFO with the real kernel's names and values, a printk ring.

Memory is a mix of page types, chosen per 2 MiB region (512 page frames) with weights in
``MIX``: free buddy blocks of order 10 (and some of lower orders), page-cache folios and
anonymous THPs of order 9, hugetlb pages, order-0 page cache and anonymous pages, slab
(order 0 and compound order 3), and kernel pages, many of them zero-filled.

To keep a 1 TiB file at a few GiB on disk, what no filter ever reads is left as file holes
(zeros): the struct pages of the tail pages of free blocks and of large folios (both tools
skip them after the head page gives the order), and the content of most pages. About 0.4%
of the pages carry data (text-like or random), so that level 1 has pages to compress.
``makedumpfile`` reads these files as it reads real ones (the bench compares the two).
"""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import asdict, dataclass

from kdump_capture.elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note
from kdump_capture.sample import (
    PAGE_BUDDY_MAPCOUNT,
    PAGE_OFFSET,
    PG_HEAD,
    PG_LRU,
    PG_PRIVATE,
    PG_SLAB,
    PG_SWAPBACKED,
    PG_SWAPCACHE,
    RAM_START,
    START_KERNEL_MAP,
    STRUCT_PAGE,
    VMEMMAP_BASE,
    KernelImage,
    _prstatus,
)

PAGE = 4096
GIB = 1 << 30
HUGE = 2 << 20  # vmemmap is mapped with 2 MiB pages
SECTION_PFNS = 1 << 15  # SECTION_SIZE_BITS 27
REGION = 512  # page frames per region (2 MiB of RAM)
STRUCT = struct.Struct("<QQQQQQII8x")  # flags, chead, dtor/order word, mapping, index,
assert STRUCT.size == STRUCT_PAGE  # private, _mapcount, _refcount (6.1 layout)
PG_RESERVED = 12
# Node/zone/section bits in the upper flags, as a real kernel keeps them (zone Normal).
ZONE_FLAGS = 0x0017FFFF00000000
MAPCOUNT_NONE = 0xFFFFFFFF  # -1: not mapped
HUGETLB_DTOR, TRANSHUGE_DTOR, COMPOUND_DTOR = 2, 3, 1
# Kernel area: page tables, mem_section, utsname and the printk ring, from 1 MiB.
KERNEL_PAGES = 2048
GENERATOR_VERSION = 2

# Region kinds and their weights (per mille of RAM); FREE takes aligned pairs (order 10).
MIX = {
    "free": 560,
    "cache_folio": 190,
    "anon_thp": 110,
    "hugetlb": 10,
    "cache": 40,
    "anon": 30,
    "slab": 10,
    "kernel": 45,
    "free_small": 5,
}
# One page in this many carries data, per kind (the rest are zero: file holes).
DATA_EVERY = {
    "cache_folio": 512,
    "anon_thp": 512,
    "hugetlb": 512,
    "cache": 64,
    "anon": 64,
    "slab": 8,
    "kernel": 20,
}


@dataclass(frozen=True)
class BigSpec:
    ram_mib: int
    seed: int = 1
    cpus: int = 4
    version: int = GENERATOR_VERSION


def ram_ranges(ram_mib: int) -> list[tuple[int, int]]:
    """Physical RAM: from 1 MiB, with the PCI hole from 2 to 4 GiB on larger machines."""
    size = ram_mib << 20
    if size <= 2 * GIB:
        return [(RAM_START, size)]
    return [(RAM_START, 2 * GIB), (4 * GIB, 4 * GIB + size - 2 * GIB)]


def _content_pages() -> list[bytes]:
    rng = random.Random(7)
    out = []
    for i in range(6):
        line = b"kdump bigcore %d: struct task_struct, inode cache, dentry %08x\n" % (i, i * 7919)
        out.append((line * (PAGE // len(line) + 1))[:PAGE])
    out += [rng.randbytes(PAGE) for _ in range(2)]  # incompressible: stored raw
    return out


class _Layout:
    """Where RAM and the vmemmap are, and the file offset of every physical address."""

    def __init__(self, spec: BigSpec) -> None:
        self.ranges = ram_ranges(spec.ram_mib)
        self.max_pfn = self.ranges[-1][1] // PAGE
        self.vm_bytes = -(-self.max_pfn * STRUCT_PAGE // HUGE) * HUGE
        self.vm_phys = (self.ranges[-1][1] - self.vm_bytes) // HUGE * HUGE
        self.kernel_end = RAM_START + KERNEL_PAGES * PAGE
        if self.vm_phys < self.ranges[-1][0] or self.kernel_end > self.ranges[0][1]:
            raise ValueError(f"bigcore: {spec.ram_mib} MiB is too small")
        self.notes_off = 0
        self.loads: list[Phdr] = []

    def place(self, notes_len: int) -> int:
        phnum = 2 + len(self.ranges)
        self.notes_off = -(-(64 + 56 * phnum) // PAGE) * PAGE
        off = self.notes_off + -(-notes_len // PAGE) * PAGE
        # The kernel text PT_LOAD first (it overlaps RAM, as in /proc/vmcore), then RAM.
        size = KERNEL_PAGES * PAGE
        self.loads = [Phdr(PT_LOAD, 7, off, START_KERNEL_MAP + RAM_START, RAM_START, size, size, 0)]
        off += size
        for start, end in self.ranges:
            n = end - start
            self.loads.append(Phdr(PT_LOAD, 7, off, PAGE_OFFSET + start, start, n, n, 0))
            off += n
        return off

    def file_offset(self, pa: int) -> int:
        for p in self.loads[1:]:
            if p.paddr <= pa < p.paddr + p.memsz:
                return p.offset + (pa - p.paddr)
        raise ValueError(f"bigcore: {pa:#x} is not RAM")

    def is_ram(self, pfn: int) -> bool:
        pa = pfn * PAGE
        return any(s <= pa < e for s, e in self.ranges)


def _kinds(rng: random.Random, nregions: int) -> list[str]:
    """A kind per region; free blocks of order 10 take two aligned regions."""
    others = [k for k in MIX if k != "free"]
    weights = [MIX[k] for k in others]
    free_p = MIX["free"] / sum(MIX.values())
    kinds: list[str] = []
    while len(kinds) < nregions:
        if rng.random() < free_p:
            kinds += ["free", "free_tail"]
        else:
            kinds += rng.choices(others, weights, k=2)
    return kinds[:nregions]


def _fill_region(buf: bytearray, base: int, pfn0: int, kind: str, rng: random.Random) -> list[int]:
    """Struct pages of one region into ``buf`` (at byte ``base``); returns pfns given data."""
    pack = STRUCT.pack_into
    every = DATA_EVERY.get(kind)
    if kind == "free":
        pack(buf, base, ZONE_FLAGS, 0, 0, 0, 0, 10, PAGE_BUDDY_MAPCOUNT, 0)
        return []
    if kind == "free_tail":
        return []
    if kind == "free_small":
        i = 0
        while i < REGION:
            order = rng.randrange(0, 9)
            while i % (1 << order) or i + (1 << order) > REGION:
                order -= 1
            pack(buf, base + i * STRUCT_PAGE, ZONE_FLAGS, 0, 0, 0, 0, order, PAGE_BUDDY_MAPCOUNT, 0)
            i += 1 << order
        return []
    if kind in ("cache_folio", "anon_thp", "hugetlb"):
        if kind == "cache_folio":
            flags, mapping, dtor, mc = 1 << PG_LRU, 0xFFFF888100000000 + pfn0 * 64, COMPOUND_DTOR, 0
        elif kind == "anon_thp":
            flags = 1 << PG_LRU | 1 << PG_SWAPBACKED
            mapping, dtor, mc = 0xFFFF888200000001 + pfn0 * 64, TRANSHUGE_DTOR, 0
        else:
            flags, mapping, dtor, mc = 0, 0, HUGETLB_DTOR, MAPCOUNT_NONE
        pack(buf, base, ZONE_FLAGS | flags | 1 << PG_HEAD, 0, 0, mapping, 0, 0, mc, 1)
        # The first tail page holds compound_dtor (byte 16) and compound_order (byte 17).
        head_va = VMEMMAP_BASE + pfn0 * STRUCT_PAGE
        pack(buf, base + STRUCT_PAGE, ZONE_FLAGS, head_va | 1, dtor | 9 << 8, 0, 0, 0, 0, 0)
        return _data_run(pfn0, every, rng)
    # Regions of order-0 pages (and compound slabs): every struct page written.
    for i in range(REGION):
        off = base + i * STRUCT_PAGE
        pfn = pfn0 + i
        if kind == "cache":
            flags = 1 << PG_LRU
            if i % 8 == 3:
                flags |= 1 << PG_PRIVATE  # buffer heads
            if i % 16 == 5:
                flags = 1 << PG_SWAPCACHE | 1 << PG_SWAPBACKED  # swap cache
            mapping = 0xFFFF888300000000 + (pfn >> 4) * 256
            pack(buf, off, ZONE_FLAGS | flags, 0, 0, mapping, pfn, 0, MAPCOUNT_NONE, 1)
        elif kind == "anon":
            flags = 1 << PG_LRU | 1 << PG_SWAPBACKED
            mapping = 0xFFFF888400000001 + (pfn >> 6) * 512
            pack(buf, off, ZONE_FLAGS | flags, 0, 0, mapping, pfn, 0, 0, 1)
        elif kind == "slab":
            if i % 16 < 8:  # an order-3 compound slab
                if i % 8 == 0:
                    pack(buf, off, ZONE_FLAGS | 1 << PG_SLAB | 1 << PG_HEAD, 0, 0,
                         0xFFFF888500000000, 0, 0, MAPCOUNT_NONE, 1)  # fmt: skip
                else:
                    head_va = VMEMMAP_BASE + (pfn - i % 8) * STRUCT_PAGE
                    word = COMPOUND_DTOR | 3 << 8 if i % 8 == 1 else 0
                    pack(buf, off, ZONE_FLAGS, head_va | 1, word, 0, 0, 0, 0, 0)
            else:
                pack(buf, off, ZONE_FLAGS | 1 << PG_SLAB, 0, 0, 0xFFFF888500000000,
                     0, 0, MAPCOUNT_NONE, 1)  # fmt: skip
        else:  # kernel
            pack(buf, off, ZONE_FLAGS | 1 << PG_RESERVED, 0, 0, 0, 0, 0, MAPCOUNT_NONE, 1)
    return _data_run(pfn0, every, rng)


def _data_run(pfn0: int, every: int | None, rng: random.Random) -> list[int]:
    """The pages of a region that carry data: REGION/every of them, together (as files and
    heaps are), so that the zero pages around them form long runs."""
    if not every:
        return []
    n = REGION // every
    start = rng.randrange(REGION - n + 1)
    return [pfn0 + start + i for i in range(n)]


def write_bigcore(path: str, spec: BigSpec) -> int:
    """Write the vmcore to ``path`` (sparse, mode 0600); returns its size."""
    lay = _Layout(spec)
    k = KernelImage(KERNEL_PAGES)
    rng = random.Random(spec.seed)
    sections = sorted(
        {
            pfn // SECTION_PFNS
            for s, e in lay.ranges
            for pfn in range(s // PAGE, e // PAGE, SECTION_PFNS)
        }
        | {(e // PAGE - 1) // SECTION_PFNS for _, e in lay.ranges}
    )
    for nr in sections:  # vmemmap: 2 MiB of struct pages per section
        k.map(VMEMMAP_BASE + nr * SECTION_PFNS * STRUCT_PAGE, lay.vm_phys + nr * HUGE, huge=True)
    n_roots = 2048  # NR_SECTION_ROOTS for MAX_PHYSMEM_BITS 46 (LENGTH(mem_section))
    roots = k.alloc(n_roots * 8 // PAGE)
    per_root = PAGE // 16
    for r in sorted({nr // per_root for nr in sections}):
        table = k.alloc(1)
        k.u64(roots + r * 8, k.va(table))
        for nr in sections:
            if nr // per_root == r:
                k.u64(table + (nr % per_root) * 16, VMEMMAP_BASE | 0x3)  # PRESENT | HAS_MEM_MAP
    k.symbols["mem_section"] = k.va(roots)
    uts = k.alloc(1)
    fields = [b"Linux", b"bigcore", b"6.1.0-bigcore", b"#1 SMP", b"x86_64", b""]
    k.put(uts, b"".join(f.ljust(65, b"\0") for f in fields))
    k.symbols["init_uts_ns"] = k.va(uts)
    k._build_prb([(0, b"Linux version 6.1.0-bigcore"), (1000, f"RAM {spec.ram_mib} MiB".encode())])
    k.map_direct()

    vmcoreinfo = k.vmcoreinfo({"OSRELEASE": "6.1.0-bigcore"}).encode()
    notes = b"".join(pack_note(b"CORE", NT_PRSTATUS, _prstatus(1 + c)) for c in range(spec.cpus))
    notes += pack_note(b"VMCOREINFO", 0, vmcoreinfo)
    size = lay.place(len(notes))
    content = _content_pages()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        head = Ehdr.core(1 + len(lay.loads)).pack()
        head += Phdr(PT_NOTE, 0, lay.notes_off, 0, 0, len(notes), len(notes), 0).pack()
        head += b"".join(p.pack() for p in lay.loads)
        os.pwrite(fd, head, 0)
        os.pwrite(fd, notes, lay.notes_off)
        reserved = [(0, lay.kernel_end // PAGE), (lay.vm_phys // PAGE, lay.max_pfn)]
        zero = bytes(PAGE)
        for nr in sections:
            buf = bytearray(HUGE)
            pfn0 = nr * SECTION_PFNS
            kinds = _kinds(rng, SECTION_PFNS // REGION)
            data: list[int] = []
            for j, kind in enumerate(kinds):
                rp = pfn0 + j * REGION
                if any(lo < rp + REGION and rp < hi for lo, hi in reserved):
                    kind = "kernel_reserved"
                got = _fill_region(buf, j * REGION * STRUCT_PAGE, rp, kind, rng)
                data += [p for p in got if lay.is_ram(p)]
            # Only the non-zero pages of the struct-page array are written (sparse file).
            base = lay.file_offset(lay.vm_phys + nr * HUGE)
            for i in range(0, HUGE, PAGE):
                if buf[i : i + PAGE] != zero:
                    os.pwrite(fd, buf[i : i + PAGE], base + i)
            for n, pfn in enumerate(data):
                os.pwrite(fd, content[(pfn + n) % len(content)], lay.file_offset(pfn * PAGE))
        # The kernel area (page tables and the rest), in RAM and in the kernel text PT_LOAD.
        os.pwrite(fd, bytes(k.mem), lay.file_offset(RAM_START))
        os.pwrite(fd, bytes(k.mem), lay.loads[0].offset)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return size


def get_bigcore(directory: str, ram_mib: int, seed: int = 1) -> str:
    """The path of a bigcore of ``ram_mib`` in ``directory``, made once and then reused."""
    spec = BigSpec(ram_mib, seed)
    path = os.path.join(directory, f"bigcore-{ram_mib}M-s{seed}.elf")
    side = path + ".json"
    try:
        with open(side) as f:
            if json.load(f) == asdict(spec) and os.path.exists(path):
                return path
    except (OSError, ValueError):
        pass
    os.makedirs(directory, exist_ok=True)
    write_bigcore(path, spec)
    with open(side, "w") as f:
        json.dump(asdict(spec), f)
    return path
