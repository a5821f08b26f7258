"""Write the seed inputs of the dump fuzz targets: ``python3 -m tests.fuzz.make_seeds``.

Seeds are small valid inputs (a few KiB to 32 KiB) made from kdump_capture.sample's synthetic
kernel, written as ``corpus/<target>/seed-*``; crashers found later sit beside them.
"""

from __future__ import annotations

import io

from kdump_capture.elf import NT_PRSTATUS, PT_LOAD, PT_NOTE, Ehdr, Phdr, pack_note
from kdump_capture.formats import NullMonitor, make_writer
from kdump_capture.sample import PAGE, PAGE_OFFSET, KernelImage, SampleSpec, _prstatus, _vmcoreinfo
from kdump_capture.vmcore import open_vmcore

from . import CORPUS
from .t_vmcore import _INFO_KEYS, _memfile, original_ring, printk_seed


def _tiny_elf(loads: int, with_info: bool = True) -> bytes:
    """An ELF vmcore with two CPUs' notes, VMCOREINFO and ``loads`` one-page PT_LOADs."""
    notes = pack_note(b"CORE", NT_PRSTATUS, _prstatus(1))
    notes += pack_note(b"CORE", NT_PRSTATUS, _prstatus(2))
    if with_info:
        notes += pack_note(b"VMCOREINFO", 0, _vmcoreinfo(SampleSpec()))
    data_off = PAGE + -(-len(notes) // PAGE) * PAGE
    phdrs = [Phdr(PT_NOTE, 0, PAGE, 0, 0, len(notes), len(notes), 0)]
    for i in range(loads):
        pa = 0x100000 + i * 0x200000
        phdrs.append(Phdr(PT_LOAD, 7, data_off + i * PAGE, PAGE_OFFSET + pa, pa, PAGE, PAGE, 0))
    head = Ehdr.core(len(phdrs)).pack() + b"".join(p.pack() for p in phdrs)
    pages = b"".join(((b"page %d " % i) * PAGE)[:PAGE] for i in range(loads))
    return head.ljust(PAGE, b"\0") + notes.ljust(data_off - PAGE, b"\0") + pages


class _Sink:
    def __init__(self, seekable: bool) -> None:
        self.seekable = seekable
        self.f = io.BytesIO()

    def write(self, data) -> None:
        self.f.write(bytes(data))

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def tell(self) -> int:
        return self.f.tell()


def _dump(fmt: str, level: int, seekable: bool) -> bytes:
    k = KernelImage(40)
    k.build([(0, b"Linux version 6.1.0-seed"), (2_000_000, b"the last words")])
    k_path = _memfile("seed").put(b"")
    k.write(k_path)
    with open_vmcore(k_path) as vm:
        sink = _Sink(seekable)
        make_writer(vm, fmt, level, seekable).write(sink, NullMonitor())
    return sink.f.getvalue()


def seeds() -> dict[str, dict[str, bytes]]:
    info_text = KernelImage(40)
    info_text.build([(0, b"x")])
    ring = original_ring()
    return {
        "elf": {
            "seed-two-loads": _tiny_elf(2),
            "seed-no-load": _tiny_elf(0),
            "seed-no-vmcoreinfo": _tiny_elf(1, with_info=False),
        },
        "vmcoreinfo": {
            "seed-synthetic-kernel": info_text.vmcoreinfo().encode(),
            "seed-sample": _vmcoreinfo(SampleSpec()),
        },
        "printk": {
            "seed-valid": printk_seed(),
            "seed-ring-bytes": printk_seed(ring),
            "seed-overrides": printk_seed(
                ring[:128],
                {
                    _INFO_KEYS.index("SIZE(printk_ringbuffer)"): 88,
                    _INFO_KEYS.index("CRASHTIME"): 1764000000,
                },
            ),  # fmt: skip
        },
        "kdump": {
            "seed-zlib-31": _dump("compressed", 31, True),
            "seed-zstd-1": _dump("zstd", 1, True),
        },
        "flat": {"seed-zlib-31": _dump("compressed", 31, False)},
        "rearrange": {"seed-zlib-31": _dump("compressed", 31, False)},
    }


def main() -> None:
    for target, files in seeds().items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
            print(f"{d / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
