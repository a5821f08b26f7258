"""What the page codec alone costs on the pages of one dump: the floor under a format's time.

    python3 -S bench/codec_floor.py VMCORE LEVEL SCRATCH_FILE [--runs 3]

Runs our kdump-compressed writer over VMCORE at dump level LEVEL with a codec that only
copies each page it is given into SCRATCH_FILE: exactly the pages a dump of that level
compresses (the filter's page set; all-zero pages share the zero page and are skipped, as
in the real writer). Then every page is compressed on its own, one zstd frame or zlib
stream per page as the format requires, by the C libraries: python-zstandard's
``multi_compress_to_buffer`` takes all pages in one call; zlib runs page by page. Prints
one JSON object: pages, input bytes, and per codec the best CPU seconds of ``--runs`` and
the bytes stored (a page is stored raw when compression does not shrink it). bench/run.py
runs it pinned like every other case and compares the zstd figure with makedumpfile ``-l``
(LZO) on the same vmcore: when zstd alone needs longer than makedumpfile's whole run, no
change around the codec meets that goal.
"""

from __future__ import annotations

import argparse
import array
import json
import mmap
import os
import sys
import time
import zlib

PAGE = 4096
ZERO = bytes(PAGE)


class NullSink:
    """A seekable sink that keeps nothing (the dump itself is not wanted here)."""

    seekable = True

    def __init__(self) -> None:
        self.pos = 0

    def write(self, data) -> None:
        self.pos += len(data)

    def seek(self, offset: int) -> None:
        self.pos = offset

    def tell(self) -> int:
        return self.pos


def tap_pages(vmcore: str, level: int, scratch: str) -> int:
    """Write the non-zero pages a ``level`` dump of ``vmcore`` holds into ``scratch``."""
    from kdump_capture.formats import NullMonitor
    from kdump_capture.formats.kdump import Codec, KdumpWriter, ZstdCodec
    from kdump_capture.vmcore import open_vmcore

    class Tap(Codec):
        name = ZstdCodec.name
        flag = ZstdCodec.flag

        def __init__(self, f) -> None:
            self.f = f
            self.pages = 0

        def pack(self, src, offsets, zero_dedup, out):
            view = memoryview(src)
            for o in offsets:
                page = view[o : o + PAGE]
                if page != ZERO:
                    self.f.write(page)
                    self.pages += 1
            return b"", bytes(8 * len(offsets))

    with open(scratch, "wb") as f, open_vmcore(vmcore) as vm:
        tap = Tap(f)
        KdumpWriter(vm, level, tap, flattened=False).write(NullSink(), NullMonitor())
    return tap.pages


def best_cpu(fn, runs: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(runs):
        t = time.process_time()
        size = fn()
        best = min(best, time.process_time() - t)
    return best, size


def main(argv: list[str]) -> int:
    import zstandard

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vmcore")
    ap.add_argument("level", type=int)
    ap.add_argument("scratch")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    n = tap_pages(args.vmcore, args.level, args.scratch)
    try:
        with open(args.scratch, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if n else b""
    finally:
        os.unlink(args.scratch)
    data = memoryview(mm)
    offs = range(0, n * PAGE, PAGE)
    segs = zstandard.BufferWithSegments(
        data, array.array("Q", [v for o in offs for v in (o, PAGE)]).tobytes()
    )
    out: dict = {"pages": len(offs), "input_bytes": len(offs) * PAGE, "codecs": {}}

    def zstd_at(level: int):
        cctx = zstandard.ZstdCompressor(level=level)

        def run() -> int:
            frames = cctx.multi_compress_to_buffer(segs, threads=0)
            return sum(min(len(fr), PAGE) for fr in frames)  # stored raw when not smaller

        return run

    def zlib_1() -> int:
        return sum(min(len(zlib.compress(data[o : o + PAGE], 1)), PAGE) for o in offs)

    for name, fn in (
        ("zstd level 1", zstd_at(1)),
        ("zstd level -1", zstd_at(-1)),
        ("zlib level 1", zlib_1),
    ):
        cpu, size = best_cpu(fn, args.runs)
        out["codecs"][name] = {"cpu_s": cpu, "bytes": size}
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
