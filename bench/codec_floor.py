"""What the page codec alone costs on the pages of one dump: the floor under a format's time.

    python3 -S bench/codec_floor.py VMCORE LEVEL SCRATCH_FILE [--runs 3]

Runs our kdump-compressed writer over VMCORE at dump level LEVEL with a codec that only
copies each page it is given into SCRATCH_FILE: exactly the pages a dump of that level
compresses (the filter's page set; all-zero pages share the zero page and are skipped, as
in the real writer). Then every page is compressed on its own, one block, frame or stream
per page as the formats require, by the C libraries with no Python between pages:

- LZO1X-1, what makedumpfile ``-l`` writes: liblzo2's lzo1x_1 through our accelerator's
  ``lzo_pages`` (the loop our lzo format runs), or python-lzo page by page when the
  accelerator was built without liblzo2 (the JSON's note says which). Without either the
  entry says so and the others are still measured.
- zstd, what our zstd format writes at level 1, and a sweep of faster and tuned settings
  (zstd_settings): python-zstandard's ``multi_compress_to_buffer``, one call for all pages.
- zlib level 1, what makedumpfile ``-c`` (and our compressed format) writes: page by page
  through the zlib module (one call per page costs well under 1% of zlib's time), and the
  same bytes from our own deflate in the accelerator's loop (``zlib_pages``), which our
  compressed format runs when the accelerator is built.

Prints one JSON object: pages, input bytes, and per codec the best CPU seconds of ``--runs``
and the bytes stored (a page is stored raw when compression does not shrink it:
min(len, 4096)), or an ``error``. bench/run.py runs it pinned like every other case and
sets each codec against makedumpfile ``-l``'s whole run (time) and zlib's bytes (size, the
goal being no larger than ``-c``): when no zstd setting alone is both, no change around the
codec meets the zstd goal.
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


LZO = "LZO1X-1"
OWN_DEFLATE = "zlib level 1, our deflate"
BATCH = 4096  # pages per lzo_pages call: 16 MiB of output, one call per 4096 pages


def batched(pages, data, n: int):
    """All pages through an accelerator loop ``pages(src, offsets, zero_dedup, flag, out)``
    (lzo_pages, zlib_pages), in batches: the page loop in C, no Python between pages."""
    offsets = array.array("Q", range(0, BATCH * PAGE, PAGE))
    out = bytearray(BATCH * PAGE)
    view = memoryview(data)

    def run() -> int:
        stored = 0
        for first in range(0, n, BATCH):
            k = min(BATCH, n - first)
            src = view[first * PAGE : (first + k) * PAGE]
            size, _ = pages(src, offsets[:k], False, 1, out)
            stored += size
        return stored

    return run


def own_deflate_runner(data, n: int, accel) -> tuple:
    """(run, note) for our level-1 deflate (zlib_pages, engine 1), or (None, why not)."""
    if accel is None or getattr(accel, "ZLIB_DEFLATE", "") != "own":
        return None, "not measured: the accelerator does not use its own deflate here"
    return batched(lambda *a: accel.zlib_pages(*a, 1), data, n), (
        f"our deflate, checked against zlib {accel.ZLIB_VERSION} (_speedups.zlib_pages)"
    )


def lzo_python(compress, data, n: int):
    """One python-lzo call per page, its 5-byte header left out (without the accelerator)."""
    view = memoryview(data)

    def run() -> int:
        return sum(
            min(len(compress(bytes(view[o : o + PAGE]), 1, False)), PAGE)
            for o in range(0, n * PAGE, PAGE)
        )

    return run


def lzo_runner(data, n: int, accel) -> tuple:
    """(run, note) for LZO1X-1 on these pages, or (None, why not)."""
    if accel is not None and hasattr(accel, "lzo_pages"):
        return batched(accel.lzo_pages, data, n), (
            f"liblzo2 {accel.LZO_VERSION}, per-page loop in C (_speedups.lzo_pages)"
        )
    try:
        import lzo
    except ImportError:
        return None, "not measured: no accelerator built with liblzo2 and no python-lzo"
    return lzo_python(lzo.compress, data, n), "python-lzo, one call per page (no accelerator)"


def zstd_settings() -> list[tuple[str, dict]]:
    """(name, ZstdCompressor arguments): what the zstd format writes, then the frontier.

    Levels 2 and 3 store less (for a 4 KiB source level 2 is level 1's fast strategy with
    minMatch 4, level 3 dfast), negative levels run faster and store more. A sweep of the
    advanced parameters on the pages of the 512 MiB sample (fast and dfast strategies,
    hashLog 10-13, minMatch 4-7, targetLength 0-4, windowLog 12 as for any 4 KiB input; best
    CPU of 5) found no setting off the frontier these levels draw beyond this machine's
    noise: at -d 31 the fastest no larger than zlib were fast with minMatch 4 (0.19 s,
    15.8-15.9 MB, level 2's parameters but hashLog 10-12) against level 1's 0.21-0.22 s, and
    every setting under 0.18 s stored more than zlib's 16.0 MB; at -d 1 none stored as
    little as zlib's 56.3 MB (the smallest, dfast with minMatch 4, stored 57.7 MB: level 3).
    There zstd first goes below zlib at level 12 (btopt, minMatch 3: 53.2 MB in 6.4 s), too
    slow to be worth a row."""
    return [
        ("zstd level 1", {"level": 1}),
        ("zstd level 2", {"level": 2}),
        ("zstd level 3", {"level": 3}),
        ("zstd level -1", {"level": -1}),
        ("zstd level -3", {"level": -3}),
        ("zstd level -5", {"level": -5}),
        ("zstd level -7", {"level": -7}),
    ]


def best_cpu(fn, runs: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(runs):
        t = time.process_time()
        size = fn()
        best = min(best, time.process_time() - t)
    return best, size


def measure(data, runs: int, accel=None) -> dict:
    """Every codec on ``data`` (whole pages), page by page: the JSON. ``accel`` is the
    compiled accelerator (kdump_capture.speedups.module()) or None."""
    import zstandard

    n = len(data) // PAGE
    out: dict = {"pages": n, "input_bytes": n * PAGE, "codecs": {}}
    codecs = out["codecs"]

    def record(name: str, fn, note: str) -> None:
        """The codec's best CPU time and bytes, or why it was not measured (fn None)."""
        if fn is None:
            codecs[name] = {"error": note}
        else:
            cpu, size = best_cpu(fn, runs)
            codecs[name] = {"cpu_s": cpu, "bytes": size, "note": note}

    record(LZO, *lzo_runner(data, n, accel))
    view = memoryview(data)[: n * PAGE]
    segs = zstandard.BufferWithSegments(
        view, array.array("Q", [v for o in range(0, n * PAGE, PAGE) for v in (o, PAGE)]).tobytes()
    )

    def zstd_with(kw: dict):
        cctx = zstandard.ZstdCompressor(**kw)

        def run() -> int:
            if not n:
                return 0
            frames = cctx.multi_compress_to_buffer(segs, threads=0)
            return sum(min(len(fr), PAGE) for fr in frames)  # stored raw when not smaller

        return run

    def zlib_1() -> int:
        return sum(
            min(len(zlib.compress(view[o : o + PAGE], 1)), PAGE) for o in range(0, n * PAGE, PAGE)
        )

    zver = ".".join(map(str, zstandard.ZSTD_VERSION))
    for name, fn, note in [
        *((name, zstd_with(kw), f"zstd {zver} (python-zstandard)") for name, kw in zstd_settings()),
        ("zlib level 1", zlib_1, f"zlib {zlib.ZLIB_RUNTIME_VERSION}"),
    ]:
        record(name, fn, note)
    record(OWN_DEFLATE, *own_deflate_runner(data, n, accel))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vmcore")
    ap.add_argument("level", type=int)
    ap.add_argument("scratch")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    n = tap_pages(args.vmcore, args.level, args.scratch)
    try:
        with open(args.scratch, "rb") as f:
            # the file's name goes at once, its pages stay mapped until we exit
            data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if n else b""
    finally:
        os.unlink(args.scratch)
    from kdump_capture import speedups

    out = measure(data, args.runs, speedups.module())
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
