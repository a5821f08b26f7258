"""The kernel log from a dump: the lockless printk ring buffer (Linux 5.10+).

The text matches ``makedumpfile --dump-dmesg`` (1.7.2, ``printk.c: dump_lockless_dmesg()``)
byte for byte: ``[%5d.%06d] `` prefixes, continuation lines indented to the prefix width,
bytes that are neither printable nor white space as ``\\x%02x`` of a *signed* char (so
0xe2 prints as ``\\xffffffe2``, as C's sprintf does).
"""

from __future__ import annotations

import re
import struct
from collections import deque

from .errors import NotSupported, VmcoreError
from .kernel import ElfPhysMemory, Kernel, KernelInfoError, VmcoreInfo
from .vmcore import Vmcore

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .kernel import PhysMemory

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
DESC_FLAGS_SHIFT = 62
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
DESC_COMMITTED = 1
DESC_FINALIZED = 2
# Sanity bounds against corrupt VMCOREINFO or memory. Text: 32 MiB (log_buf_len=32M; the
# kernel would take more, but no capture kernel could hold it). Descriptors: the kernel makes
# text size / 32 of them (PRB_AVGBITS = 5); allow four times that for small average records.
MAX_DATA_BITS = 25
MAX_DESC_BITS = MAX_DATA_BITS - 5 + 2
# struct printk_ringbuffer, prb_desc and printk_info are 88, 24 and 88 bytes on x86_64.
MAX_STRUCT = 4096
# Descriptors and infos are read in windows of this size, not as whole arrays.
WINDOW = 64 << 10
# The formatted log: at most about 1.3x the text area for a real ring (prefixes, indents).
# Escapes ("\\xffffffe2" for one byte) can make it ten times the text: a 128 KiB ring made
# 65 MB, held three times over (lines, joined, encoded) in a capture kernel's tens of MiB.
# Past twice the text area plus OUTPUT_SLACK, the oldest records go: the crash is at the
# end of the log. (A real ring of the largest size, 32 MiB, stays whole.)
OUTPUT_SLACK = 1 << 20

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
    except (struct.error, OverflowError) as e:
        raise VmcoreError(f"printk ring buffer is malformed: {e}") from None


class _Records:
    """Records of a kernel array (descriptors, infos), read a window at a time."""

    def __init__(self, kernel: Kernel, va: int, size: int, count: int) -> None:
        self.kernel = kernel
        self.va = va
        self.size = size
        self.count = count
        self.per = max(1, WINDOW // size)
        self.window = -1
        self.buf = b""

    def get(self, i: int) -> tuple[bytes, int]:
        """The buffer holding record ``i`` and the record's offset in it."""
        w = i // self.per
        if w != self.window:
            first = w * self.per
            n = min(self.per, self.count - first)
            self.buf = self.kernel.read((self.va + first * self.size) & U64_MASK, n * self.size)
            self.window = w
        return self.buf, (i - w * self.per) * self.size


U64_MASK = (1 << 64) - 1


def _offset(info: VmcoreInfo, name: str) -> int:
    """OFFSET(name): a member's offset, so within a plausible structure size."""
    value = info.need_offset(name)
    if value >= MAX_STRUCT:
        raise VmcoreError(f"VMCOREINFO: OFFSET({name})={value} is implausible")
    return value


def _lockless(kernel: Kernel, info: VmcoreInfo) -> str:
    rb = kernel.u64(info.need_symbol("prb"))
    prb_size = info.need_size("printk_ringbuffer")
    if prb_size > MAX_STRUCT:
        raise VmcoreError(f"VMCOREINFO: SIZE(printk_ringbuffer)={prb_size} is implausible")
    prb = kernel.read(rb, prb_size)
    dr = _offset(info, "printk_ringbuffer.desc_ring")
    tr = _offset(info, "printk_ringbuffer.text_data_ring")
    counter = _offset(info, "atomic_long_t.counter")
    count_bits = _u(U32, prb, dr + _offset(info, "prb_desc_ring.count_bits"))
    size_bits = _u(U32, prb, tr + _offset(info, "prb_data_ring.size_bits"))
    if count_bits > MAX_DESC_BITS or size_bits > MAX_DATA_BITS:
        raise VmcoreError(
            f"printk ring buffer looks corrupt: count_bits={count_bits}, size_bits={size_bits}"
        )
    count = 1 << count_bits
    dsize = 1 << size_bits
    desc_size = info.need_size("prb_desc")
    info_size = info.need_size("printk_info")
    if not 0 < desc_size <= MAX_STRUCT or not 0 < info_size <= MAX_STRUCT:
        raise VmcoreError(
            f"VMCOREINFO: SIZE(prb_desc)={desc_size} or SIZE(printk_info)={info_size} "
            "is implausible"
        )
    # All of the ring must be in the dump: bound it before reading any of it.
    need = count * (desc_size + info_size) + dsize
    if need > kernel.mem.capacity:
        raise VmcoreError(
            f"printk ring buffer looks corrupt: count_bits={count_bits} and "
            f"size_bits={size_bits} need {need:#x} bytes, more than the dump holds "
            f"({kernel.mem.capacity:#x})"
        )
    descs = _Records(
        kernel, _u(U64, prb, dr + _offset(info, "prb_desc_ring.descs")), desc_size, count
    )
    infos = _Records(
        kernel, _u(U64, prb, dr + _offset(info, "prb_desc_ring.infos")), info_size, count
    )
    text = kernel.read(_u(U64, prb, tr + _offset(info, "prb_data_ring.data")), dsize)
    tail = _u(U64, prb, dr + _offset(info, "prb_desc_ring.tail_id") + counter)
    head = _u(U64, prb, dr + _offset(info, "prb_desc_ring.head_id") + counter)

    sv_off = _offset(info, "prb_desc.state_var") + counter
    lpos = _offset(info, "prb_desc.text_blk_lpos")
    begin_off = lpos + _offset(info, "prb_data_blk_lpos.begin")
    next_off = lpos + _offset(info, "prb_data_blk_lpos.next")
    ts_off = _offset(info, "printk_info.ts_nsec")
    len_off = _offset(info, "printk_info.text_len")

    limit = 2 * dsize + OUTPUT_SLACK
    lines: deque[str] = deque()
    out_len = dropped = 0
    rid = tail
    for _ in range(count + 1):  # at most every descriptor once, plus the head
        dbuf, d = descs.get(rid % count)
        sv = _u(U64, dbuf, d + sv_off)
        if sv & DESC_ID_MASK == rid and sv >> DESC_FLAGS_SHIFT in (DESC_COMMITTED, DESC_FINALIZED):
            begin = _u(U64, dbuf, d + begin_off) % dsize
            nxt = _u(U64, dbuf, d + next_off) % dsize
            if begin != nxt:
                ibuf, inf = infos.get(rid % count)
                tlen = _u(U16, ibuf, inf + len_off)
                if begin > nxt:
                    begin = 0
                begin += 8
                # C: "if (next - begin < text_len)" with unsigned longs.
                if (nxt - begin) & 0xFFFFFFFFFFFFFFFF < tlen:
                    tlen = (nxt - begin) & 0xFFFFFFFFFFFFFFFF
                ts = _u(U64, ibuf, inf + ts_off)
                prefix = f"[{ts // 1_000_000_000:5d}.{ts % 1_000_000_000 // 1000:06d}] "
                msg = text[begin : begin + tlen]
                line = prefix + _escape(msg, " " * len(prefix)) + "\n"
                out_len += len(line)
                lines.append(line)
                while out_len > limit and len(lines) > 1:
                    out_len -= len(lines.popleft())
                    dropped += 1
        if rid == head:
            break
        rid = (rid + 1) & DESC_ID_MASK
    if dropped:
        lines.appendleft(
            f"[kdump-capture: the {dropped} oldest records are left out: the formatted log "
            f"would be larger than {limit} characters, twice the ring's text area]\n"
        )
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
