"""The kernel log from a dump: the lockless printk ring buffer (Linux 5.10+).

The text matches ``makedumpfile --dump-dmesg`` (1.7.2, ``printk.c: dump_lockless_dmesg()``)
byte for byte: ``[%5d.%06d] `` prefixes, continuation lines indented to the prefix width,
bytes that are neither printable nor white space as ``\\x%02x`` of a *signed* char (so
0xe2 prints as ``\\xffffffe2``, as C's sprintf does).
"""

from __future__ import annotations

import re
import struct

from .errors import NotSupported, VmcoreError
from .kernel import ElfPhysMemory, Kernel, KernelInfoError, PhysMemory, VmcoreInfo
from .vmcore import Vmcore

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
DESC_FLAGS_SHIFT = 62
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
DESC_COMMITTED = 1
DESC_FINALIZED = 2
# Sanity bounds against corrupt VMCOREINFO or memory (the kernel allows up to 2**25 text
# bytes via log_buf_len; descriptors are text size / 32).
MAX_DATA_BITS = 30
MAX_DESC_BITS = 26

# Bytes makedumpfile copies as they are: isprint() or isspace() in the C locale.
_PLAIN = re.compile(rb"[^\x09-\x0d\x20-\x7e]")


def _escape(msg: bytes, indent: str) -> str:
    if not _PLAIN.search(msg):
        text = msg.decode("ascii")
    else:
        out = []
        for b in msg:
            if b == 0x0A or 0x09 <= b <= 0x0D or 0x20 <= b <= 0x7E:
                out.append(chr(b))
            else:
                out.append("\\x%02x" % (b if b < 0x80 else b | 0xFFFFFF00))
        text = "".join(out)
    return text.replace("\n", "\n" + indent) if "\n" in text else text


def _u(fmt: struct.Struct, buf: bytes, off: int) -> int:
    return fmt.unpack_from(buf, off)[0]


def extract_kernel_log(kernel: Kernel) -> str:
    """The whole log (tail to head), formatted as makedumpfile --dump-dmesg writes it."""
    info = kernel.info
    if info.symbol("prb") is None:
        if info.symbol("log_buf") is not None:
            raise NotSupported(
                "this kernel uses the pre-5.10 log_buf printk buffer; only the lockless "
                "ring buffer (Linux 5.10+) is supported"
            )
        raise KernelInfoError("VMCOREINFO has no SYMBOL(prb): cannot find the kernel log")
    try:
        return _lockless(kernel, info)
    except struct.error as e:
        raise VmcoreError(f"printk ring buffer is malformed: {e}") from None


def _lockless(kernel: Kernel, info: VmcoreInfo) -> str:
    rb = kernel.u64(info.need_symbol("prb"))
    prb = kernel.read(rb, info.need_size("printk_ringbuffer"))
    dr = info.need_offset("printk_ringbuffer.desc_ring")
    tr = info.need_offset("printk_ringbuffer.text_data_ring")
    counter = info.need_offset("atomic_long_t.counter")
    count_bits = _u(U32, prb, dr + info.need_offset("prb_desc_ring.count_bits"))
    size_bits = _u(U32, prb, tr + info.need_offset("prb_data_ring.size_bits"))
    if count_bits > MAX_DESC_BITS or size_bits > MAX_DATA_BITS:
        raise VmcoreError(
            f"printk ring buffer looks corrupt: count_bits={count_bits}, size_bits={size_bits}"
        )
    count = 1 << count_bits
    dsize = 1 << size_bits
    desc_size = info.need_size("prb_desc")
    info_size = info.need_size("printk_info")
    descs_va = _u(U64, prb, dr + info.need_offset("prb_desc_ring.descs"))
    infos_va = _u(U64, prb, dr + info.need_offset("prb_desc_ring.infos"))
    descs = kernel.read(descs_va, desc_size * count)
    infos = kernel.read(infos_va, info_size * count)
    text = kernel.read(_u(U64, prb, tr + info.need_offset("prb_data_ring.data")), dsize)
    tail = _u(U64, prb, dr + info.need_offset("prb_desc_ring.tail_id") + counter)
    head = _u(U64, prb, dr + info.need_offset("prb_desc_ring.head_id") + counter)

    sv_off = info.need_offset("prb_desc.state_var") + counter
    lpos = info.need_offset("prb_desc.text_blk_lpos")
    begin_off = lpos + info.need_offset("prb_data_blk_lpos.begin")
    next_off = lpos + info.need_offset("prb_data_blk_lpos.next")
    ts_off = info.need_offset("printk_info.ts_nsec")
    len_off = info.need_offset("printk_info.text_len")

    lines: list[str] = []
    rid = tail
    for _ in range(count + 1):  # at most every descriptor once, plus the head
        d = (rid % count) * desc_size
        sv = _u(U64, descs, d + sv_off)
        if sv & DESC_ID_MASK == rid and sv >> DESC_FLAGS_SHIFT in (DESC_COMMITTED, DESC_FINALIZED):
            begin = _u(U64, descs, d + begin_off) % dsize
            nxt = _u(U64, descs, d + next_off) % dsize
            if begin != nxt:
                inf = (rid % count) * info_size
                tlen = _u(U16, infos, inf + len_off)
                if begin > nxt:
                    begin = 0
                begin += 8
                # C: "if (next - begin < text_len)" with unsigned longs.
                if (nxt - begin) & 0xFFFFFFFFFFFFFFFF < tlen:
                    tlen = (nxt - begin) & 0xFFFFFFFFFFFFFFFF
                ts = _u(U64, infos, inf + ts_off)
                prefix = f"[{ts // 1_000_000_000:5d}.{ts % 1_000_000_000 // 1000:06d}] "
                msg = text[begin : begin + tlen]
                lines.append(prefix + _escape(msg, " " * len(prefix)) + "\n")
        if rid == head:
            break
        rid = (rid + 1) & DESC_ID_MASK
    return "".join(lines)


def extract_from(info: VmcoreInfo, mem: PhysMemory, phys_base: int | None = None) -> str:
    """The kernel log of any dump that offers physical reads and VMCOREINFO."""
    return extract_kernel_log(Kernel(info, mem, phys_base))


def extract(vm: Vmcore) -> str:
    """The kernel log of an ELF vmcore, as ``makedumpfile --dump-dmesg`` prints it.

    Raises VmcoreError (bad or missing VMCOREINFO, unreadable memory) or NotSupported
    (pre-5.10 kernel, raw /dev/oldmem without VMCOREINFO) with a one-line message.
    """
    if vm.kind != "elf":
        raise NotSupported(f"{vm.path}: no VMCOREINFO in raw memory images; cannot find the log")
    if not vm.vmcoreinfo:
        raise VmcoreError(f"{vm.path}: the vmcore has no VMCOREINFO note; cannot find the log")
    mem = ElfPhysMemory(vm.loads, vm.pread, vm.path)
    return extract_from(VmcoreInfo(vm.vmcoreinfo), mem)
