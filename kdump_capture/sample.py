"""Synthetic ELF vmcores laid out like /proc/vmcore: for the demo, unit tests and scale tests.

They carry real-looking notes (per-CPU NT_PRSTATUS, VMCOREINFO with OSRELEASE, PAGESIZE and
CRASHTIME) and PT_LOADs whose pages mix zero pages, compressible text and random bytes. They
have no kernel data structures (page tables, struct page, printk buffer): tools that need
those are tested with the real samples the VM harness makes (tests/vmkit).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from .elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note

PAGE = 4096
PRSTATUS_SIZE = 336  # sizeof(struct elf_prstatus) on x86_64
PAGE_OFFSET = 0xFFFF888000000000  # x86_64 direct map base without KASLR
CHUNK_PAGES = 256


@dataclass(frozen=True)
class SampleSpec:
    """What to generate. ``ram_mib`` of RAM split into ``segments`` PT_LOADs with holes."""

    ram_mib: int = 64
    segments: int = 3
    cpus: int = 2
    zero_percent: int = 40
    sparse: bool = False  # all-zero RAM written as file holes (fast multi-GB inputs)
    seed: int = 1
    release: str = "6.1.0-sample-amd64"
    crash_time: int = 1764000000


def _vmcoreinfo(spec: SampleSpec) -> bytes:
    lines = [
        f"OSRELEASE={spec.release}",
        f"BUILD-ID={'ab' * 20}",
        f"PAGESIZE={PAGE}",
        "SYMBOL(init_uts_ns)=ffffffff82a13540",
        "OFFSET(uts_namespace.name)=4",
        "NUMBER(phys_base)=0",
        "KERNELOFFSET=0",
        f"CRASHTIME={spec.crash_time}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _prstatus(pid: int) -> bytes:
    desc = bytearray(PRSTATUS_SIZE)
    desc[32:36] = pid.to_bytes(4, "little")  # pr_pid
    return bytes(desc)


def _page_kind(rng: random.Random, zero_percent: int) -> int:
    r = rng.randrange(100)
    if r < zero_percent:
        return 0
    return 1 if r < zero_percent + (100 - zero_percent) // 2 else 2


def write_sample(path: str, spec: SampleSpec = SampleSpec()) -> int:
    """Write a synthetic vmcore to ``path`` (mode 0600); returns its size in bytes."""
    total_pages = spec.ram_mib * 256
    per_seg = max(1, total_pages // spec.segments)
    # RAM ranges with a 1 MiB hole between them, starting at 1 MiB like real x86 RAM maps.
    ranges = []
    paddr = 0x100000
    left = total_pages
    for i in range(spec.segments):
        n = per_seg if i < spec.segments - 1 else left
        ranges.append((paddr, n))
        paddr += n * PAGE + 0x100000
        left -= n
    notes = b"".join(pack_note(b"CORE", NT_PRSTATUS, _prstatus(100 + c)) for c in range(spec.cpus))
    notes += pack_note(b"VMCOREINFO", 0, _vmcoreinfo(spec))
    phnum = 1 + len(ranges)
    hdr_len = 64 + 56 * phnum
    notes_off = (hdr_len + PAGE - 1) // PAGE * PAGE
    data_off = notes_off + (len(notes) + PAGE - 1) // PAGE * PAGE
    phdrs = [Phdr(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0)]
    off = data_off
    for start, n in ranges:
        phdrs.append(Phdr(PT_LOAD, 7, off, PAGE_OFFSET + start, start, n * PAGE, n * PAGE, 0))
        off += n * PAGE
    size = off
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Ehdr.core(phnum).pack())
            for p in phdrs:
                f.write(p.pack())
            f.write(bytes(notes_off - f.tell()))
            f.write(notes)
            f.write(bytes(data_off - f.tell()))
            if spec.sparse:
                f.truncate(size)
            else:
                _write_pages(f, total_pages, spec)
    except BaseException:
        os.unlink(path)
        raise
    return size


def _write_pages(f, total_pages: int, spec: SampleSpec) -> None:
    rng = random.Random(spec.seed)
    chunk = bytearray(CHUNK_PAGES * PAGE)
    page_no = 0
    while page_no < total_pages:
        n = min(CHUNK_PAGES, total_pages - page_no)
        noise = rng.randbytes(n * PAGE)
        for i in range(n):
            kind = _page_kind(rng, spec.zero_percent)
            lo = i * PAGE
            if kind == 0:
                chunk[lo : lo + PAGE] = bytes(PAGE)
            elif kind == 1:
                line = b"page %9d: kdump-capture synthetic text, compresses well.\n" % (page_no + i)
                chunk[lo : lo + PAGE] = (line * (PAGE // len(line) + 1))[:PAGE]
            else:
                chunk[lo : lo + PAGE] = noise[lo : lo + PAGE]
        f.write(memoryview(chunk)[: n * PAGE])
        page_no += n


# -- synthetic kernel memory: page tables, mem_section, struct pages, printk ring buffer ----
START_KERNEL_MAP = 0xFFFFFFFF80000000
VMEMMAP_BASE = 0xFFFFEA0000000000
STRUCT_PAGE = 64  # SIZE(page) on x86_64
RAM_START = 0x100000  # RAM from 1 MiB, like real x86 maps
PRB_COUNT_BITS = 5  # 32 descriptors
PRB_DATA_BITS = 12  # 4 KiB of text


@dataclass
class PageState:
    """Fields of one struct page (6.1 layout: flags@0 compound_head@8 mapping@24 private@40
    _mapcount@48; compound_dtor@16 and compound_order@17 live in the next struct page)."""

    flags: int = 0
    compound_head: int = 0
    mapping: int = 0
    private: int = 0
    mapcount: int = 0xFFFFFFFF  # -1: not mapped
    order: int = 0  # written into the next struct page when flags has PG_head
    dtor: int = 0


# Page flag bits of the 6.1 cloud kernel (VMCOREINFO of the real sample).
PG_LRU, PG_SLAB, PG_SWAPCACHE, PG_PRIVATE, PG_HEAD, PG_SWAPBACKED = 4, 9, 10, 13, 16, 19
PAGE_BUDDY_MAPCOUNT = 0xFFFFFF7F  # -129
PAGE_OFFLINE_MAPCOUNT = 0xFFFFFEFF  # -257


class KernelImage:
    """Physical memory of a tiny fake x86_64 kernel, written out as an ELF vmcore.

    It has what the filter and dmesg code read: 4-level page tables (direct map and
    vmemmap), SPARSEMEM_EXTREME mem_section, struct pages and a lockless printk ring buffer.
    """

    def __init__(self, ram_pages: int = 1024) -> None:
        self.ram_pages = ram_pages
        self.mem = bytearray(ram_pages * PAGE)
        self.next_free = 0
        self.page_offset = PAGE_OFFSET
        self.pgd = self.alloc(1)
        self.max_pfn = RAM_START // PAGE + ram_pages
        self.pages: dict[int, PageState] = {}
        self.symbols: dict[str, int] = {}

    # memory
    def alloc(self, npages: int) -> int:
        pa = RAM_START + self.next_free * PAGE
        self.next_free += npages
        if self.next_free > self.ram_pages:
            raise MemoryError("KernelImage: out of RAM")
        return pa

    def va(self, pa: int) -> int:
        return self.page_offset + pa

    def put(self, pa: int, data: bytes) -> None:
        off = pa - RAM_START
        self.mem[off : off + len(data)] = data

    def u64(self, pa: int, value: int) -> None:
        self.put(pa, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def get_u64(self, pa: int) -> int:
        off = pa - RAM_START
        return int.from_bytes(self.mem[off : off + 8], "little")

    def map(self, va: int, pa: int, huge: bool = False) -> None:
        """Map one 4 KiB page (or a 2 MiB page with ``huge``) at ``va``."""
        table = self.pgd
        for shift in (39, 30, 21):
            slot = table + ((va >> shift) & 511) * 8
            if shift == 21 and huge:
                self.u64(slot, pa | 0x83)  # present, writable, PSE
                return
            entry = self.get_u64(slot)
            if not entry & 1:
                entry = self.alloc(1) | 0x63
                self.u64(slot, entry)
            table = entry & 0x000FFFFFFFFFF000
        self.u64(table + ((va >> 12) & 511) * 8, pa | 0x63)

    def map_direct(self) -> None:
        for i in range(self.ram_pages):
            pa = RAM_START + i * PAGE
            self.map(self.va(pa), pa)

    # kernel structures
    def build(self, messages: list[tuple[int, bytes]], uts_release: str = "6.1.0-synthetic"):
        """Lay out struct pages, mem_section, utsname and a ring buffer holding ``messages``
        (``(ts_nsec, text)`` pairs); call after setting ``pages``."""
        n_map_pages = -(-self.max_pfn * STRUCT_PAGE // PAGE)
        map_pa = self.alloc(n_map_pages)
        for i in range(n_map_pages):
            self.map(VMEMMAP_BASE + i * PAGE, map_pa + i * PAGE)
        for pfn in range(self.max_pfn):
            st = self.pages.get(pfn, PageState())
            base = map_pa + pfn * STRUCT_PAGE
            self.u64(base, st.flags)
            self.u64(base + 8, st.compound_head)
            self.u64(base + 24, st.mapping)
            self.u64(base + 40, st.private)
            self.put(base + 48, (st.mapcount & 0xFFFFFFFF).to_bytes(4, "little"))
            if st.flags & (1 << PG_HEAD) and pfn + 1 < self.max_pfn:
                self.put(base + STRUCT_PAGE + 16, bytes([st.dtor, st.order]))
        # mem_section: root array (LENGTH(mem_section) = 2048 pointers, 4 pages) -> one root
        # of 256 16-byte sections; section 0 present.
        roots = self.alloc(2048 * 8 // PAGE)
        sections = self.alloc(1)
        self.u64(roots, self.va(sections))
        self.u64(sections, VMEMMAP_BASE | 0x3)  # coded mem_map (pfn 0) | PRESENT | HAS_MEM_MAP
        self.symbols["mem_section"] = self.va(roots)
        uts = self.alloc(1)
        fields = [b"Linux", b"synthetic", uts_release.encode(), b"#1 SMP", b"x86_64", b""]
        self.put(uts, b"".join(f.ljust(65, b"\0") for f in fields))
        self.symbols["init_uts_ns"] = self.va(uts)
        self._build_prb(messages)
        self.map_direct()  # last: maps every page, including the tables allocated above

    def _build_prb(self, messages: list[tuple[int, bytes]]) -> None:
        count = 1 << PRB_COUNT_BITS
        dsize = 1 << PRB_DATA_BITS
        descs = self.alloc(1)
        infos = self.alloc(-(-count * 88 // PAGE))
        data = self.alloc(dsize // PAGE)
        ring = self.alloc(1)
        prb_ptr = ring + 512
        lpos = 0
        first_id = count  # ids start above count, as after a first wrap of the id space
        for i, (ts, text) in enumerate(messages):
            rid = first_id + i
            blk = 8 + len(text)
            blk = (blk + 7) & ~7
            begin = lpos
            if begin % dsize + blk > dsize:  # wrap: the block restarts at index 0
                begin = lpos + (dsize - lpos % dsize)
            nxt = begin + blk
            if nxt - lpos > dsize:
                raise ValueError("synthetic ring buffer text area too small")
            off = begin % dsize
            self.u64(data + off, rid)
            self.put(data + off + 8, text)
            d = descs + (rid % count) * 24
            self.u64(d, rid | (2 << 62))  # finalized
            self.u64(d + 8, lpos if begin != lpos else begin)
            self.u64(d + 16, nxt)
            inf = infos + (rid % count) * 88
            self.u64(inf, i)
            self.u64(inf + 8, ts)
            self.put(inf + 16, len(text).to_bytes(2, "little"))
            lpos = nxt
        head = first_id + len(messages) - 1
        self.put(ring, PRB_COUNT_BITS.to_bytes(4, "little"))
        self.u64(ring + 8, self.va(descs))
        self.u64(ring + 16, self.va(infos))
        self.u64(ring + 24, head)
        self.u64(ring + 32, first_id)
        self.put(ring + 48, PRB_DATA_BITS.to_bytes(4, "little"))
        self.u64(ring + 56, self.va(data))
        self.u64(prb_ptr, self.va(ring))
        self.symbols["prb"] = self.va(prb_ptr)

    def vmcoreinfo(self, extra: dict[str, str] | None = None, crash_time: int = 1764000000) -> str:
        sym = self.symbols
        lines = {
            "OSRELEASE": "6.1.0-synthetic",
            "PAGESIZE": str(PAGE),
            "SYMBOL(init_uts_ns)": f"{sym['init_uts_ns']:x}",
            "OFFSET(uts_namespace.name)": "0",
            "SYMBOL(mem_section)": f"{sym['mem_section']:x}",
            "LENGTH(mem_section)": "2048",
            "SIZE(mem_section)": "16",
            "OFFSET(mem_section.section_mem_map)": "0",
            "NUMBER(SECTION_SIZE_BITS)": "27",
            "NUMBER(MAX_PHYSMEM_BITS)": "46",
            "SIZE(page)": str(STRUCT_PAGE),
            "OFFSET(page.flags)": "0",
            "OFFSET(page._refcount)": "52",
            "OFFSET(page.mapping)": "24",
            "OFFSET(page.lru)": "8",
            "OFFSET(page._mapcount)": "48",
            "OFFSET(page.private)": "40",
            "OFFSET(page.compound_dtor)": "16",
            "OFFSET(page.compound_order)": "17",
            "OFFSET(page.compound_head)": "8",
            "LENGTH(zone.free_area)": "11",
            "SYMBOL(prb)": f"{sym['prb']:x}",
            "SIZE(printk_ringbuffer)": "88",
            "OFFSET(printk_ringbuffer.desc_ring)": "0",
            "OFFSET(printk_ringbuffer.text_data_ring)": "48",
            "OFFSET(printk_ringbuffer.fail)": "80",
            "SIZE(prb_desc_ring)": "48",
            "OFFSET(prb_desc_ring.count_bits)": "0",
            "OFFSET(prb_desc_ring.descs)": "8",
            "OFFSET(prb_desc_ring.infos)": "16",
            "OFFSET(prb_desc_ring.head_id)": "24",
            "OFFSET(prb_desc_ring.tail_id)": "32",
            "SIZE(prb_desc)": "24",
            "OFFSET(prb_desc.state_var)": "0",
            "OFFSET(prb_desc.text_blk_lpos)": "8",
            "SIZE(prb_data_blk_lpos)": "16",
            "OFFSET(prb_data_blk_lpos.begin)": "0",
            "OFFSET(prb_data_blk_lpos.next)": "8",
            "SIZE(printk_info)": "88",
            "OFFSET(printk_info.seq)": "0",
            "OFFSET(printk_info.ts_nsec)": "8",
            "OFFSET(printk_info.text_len)": "16",
            "OFFSET(printk_info.caller_id)": "20",
            "SIZE(prb_data_ring)": "32",
            "OFFSET(prb_data_ring.size_bits)": "0",
            "OFFSET(prb_data_ring.data)": "8",
            "OFFSET(prb_data_ring.head_lpos)": "16",
            "OFFSET(prb_data_ring.tail_lpos)": "24",
            "SIZE(atomic_long_t)": "8",
            "OFFSET(atomic_long_t.counter)": "0",
            "NUMBER(PG_lru)": str(PG_LRU),
            "NUMBER(PG_private)": str(PG_PRIVATE),
            "NUMBER(PG_swapcache)": str(PG_SWAPCACHE),
            "NUMBER(PG_swapbacked)": str(PG_SWAPBACKED),
            "NUMBER(PG_slab)": str(PG_SLAB),
            "NUMBER(PG_head_mask)": str(1 << PG_HEAD),
            "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129",
            "NUMBER(HUGETLB_PAGE_DTOR)": "2",
            "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)": "-257",
            "NUMBER(phys_base)": "0",
            "SYMBOL(init_top_pgt)": f"{START_KERNEL_MAP + self.pgd:x}",
            "NUMBER(pgtable_l5_enabled)": "0",
            "KERNELOFFSET": "0",
            "NUMBER(sme_mask)": "0",
            "CRASHTIME": str(crash_time),
        }
        lines.update(extra or {})
        return "".join(f"{k}={v}\n" for k, v in lines.items() if v is not None)

    def write(self, path: str, extra: dict[str, str] | None = None, cpus: int = 1) -> int:
        """The image as an ELF vmcore with one RAM PT_LOAD; returns its size."""
        notes = b"".join(pack_note(b"CORE", NT_PRSTATUS, _prstatus(1 + c)) for c in range(cpus))
        notes += pack_note(b"VMCOREINFO", 0, self.vmcoreinfo(extra).encode())
        notes_off = PAGE
        data_off = notes_off + (len(notes) + PAGE - 1) // PAGE * PAGE
        size = len(self.mem)
        phdrs = [
            Phdr(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0),
            Phdr(PT_LOAD, 7, data_off, self.va(RAM_START), RAM_START, size, size, 0),
        ]
        with open(path, "wb") as f:
            f.write(Ehdr.core(len(phdrs)).pack() + b"".join(p.pack() for p in phdrs))
            f.write(bytes(notes_off - f.tell()))
            f.write(notes)
            f.write(bytes(data_off - f.tell()))
            f.write(self.mem)
        return data_off + size


DEMO_LOG = [
    (0, b"Linux version 6.1.0-synthetic (kdump-capture built-in sample vmcore)"),
    (1_204_000, b"Command line: console=ttyS0 crashkernel=192M"),
    (2_410_551_000, b"kdump-capture: this kernel log was extracted from the sample vmcore"),
    (61_503_117_000, b"sysrq: Trigger a crash"),
    (61_503_240_000, b"Kernel panic - not syncing: sysrq triggered crash"),
]


def write_demo(path: str, ram_mib: int = 64) -> int:
    """The built-in demo vmcore: a tiny synthetic kernel (page tables, struct pages, a
    printk ring buffer with DEMO_LOG) so that every step of a save, dmesg.txt included,
    runs on it. Its RAM is held in memory while writing: keep ``ram_mib`` small."""
    k = KernelImage(ram_mib * 256)
    k.build(DEMO_LOG)
    return k.write(path, cpus=2)
