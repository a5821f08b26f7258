"""Peak RSS of `kdump-capture save` as the machine grows: formats, levels, a network target.

    python3 bench/memory.py [--sizes 1,64] [--cpus 1] [--scratch DIR]

Inputs are synthetic vmcores with a realistic struct-page array (tests/bigcore.py), so the
filter, the bitmaps and the compressors all work as on a real machine (all-zero inputs made
"flat memory" trivially true). Targets: a local directory, and SFTP to an OpenSSH server on
loopback. Peak RSS is measured from outside by GNU time (bench/measure.py), the median of
``--runs`` runs per case. bench/run.py puts the table into bench/RESULTS.md; run alone, this
prints it.

Each case runs twice over: as the save runs (the source mapped in windows), and with the
source read (``KDUMP_CAPTURE_NO_MMAP=1``). A mapped regular file adds to RSS the page cache
of the windows that batches in flight still hold, whole 2 MiB folios where the kernel made
them: how much depends on timing and on the folios the file got, not on the machine's size
(CI once measured +4.6 MiB between 1 and 8 GiB, the save's own part +1.0). /proc/vmcore's mappings
are PFN maps outside RSS, so in a capture kernel the save's memory is the second figure.
The goal is judged on the first, the stricter one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure  # noqa: E402
from bench.measure import python_cmd  # noqa: E402

CASES = [  # (format, level, target)
    ("ELF", 31, "file"),
    ("ELF", 1, "file"),
    ("compressed", 31, "file"),
    ("compressed", 1, "file"),
    ("zstd", 31, "file"),
    ("zstd", 1, "file"),
    ("zstd", 31, "sftp"),
    ("compressed", 31, "sftp"),
]


def _save(src: str, url: str, fmt: str, level: int, conf: str) -> list[str]:
    return [*python_cmd(), *measure.save_args(src, url, fmt, level, config=conf)]


def measure_all(
    sizes: list[int], cpus: int, scratch: str | None, log: Callable = print, runs: int = 3
) -> dict:
    from tests.bigcore import get_bigcore
    from tests.servers.sshd import sshd

    work = tempfile.mkdtemp(prefix="bench-memory-", dir=scratch)
    bigdir = os.path.join(scratch or tempfile.gettempdir(), "kdump-bigcores")
    read_env = dict(measure.env(), KDUMP_CAPTURE_NO_MMAP="1")
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(sshd(os.path.join(work, "sshd")))
            conf = measure.sftp_config(work, srv)
            for gib in sizes:
                src = get_bigcore(bigdir, gib * 1024)
                for fmt, level, target in CASES:
                    d = os.path.join(work, "out")
                    url = (
                        f"file://{d}"
                        if target == "file"
                        else (f"sftp://root@{srv.host}:{srv.port}{d}")
                    )
                    argv = _save(src, url, fmt, level, conf)
                    mapped, read = [], []
                    for _ in range(runs):  # interleaved
                        for out, environ in ((mapped, None), (read, read_env)):
                            out.append(measure.run(argv, cpus, d, environ))
                            shutil.rmtree(d, ignore_errors=True)
                    row = {
                        "gib": gib,
                        "format": fmt,
                        "level": level,
                        "target": target,
                        "wall": statistics.median(s.wall for s in mapped),
                        "rss": statistics.median(s.rss_mib for s in mapped),
                        "rss_read": statistics.median(s.rss_mib for s in read),
                        "rss_runs": [s.rss_mib for s in mapped],
                        "rss_read_runs": [s.rss_mib for s in read],
                        "size": mapped[-1].size,
                    }
                    rows.append(row)
                    log(
                        f"  memory {gib:5d} GiB {fmt:10s} -d {level:2d} {target:5s} "
                        f"{row['wall']:7.2f} s {row['rss']:6.1f} MiB mapped, "
                        f"{row['rss_read']:6.1f} MiB read"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"sizes": sizes, "runs": runs, "rows": rows}


def report_lines(data: dict, goals: list | None = None) -> list[str]:
    sizes = data["sizes"]
    runs = data.get("runs", 1)
    how = f"Median of {runs} interleaved runs per case" if runs > 1 else "One run per case"
    L = [
        "## Memory: peak RSS of the whole save (synthetic machines, GNU time)",
        "",
        f"{how}, MiB. *mapped*: the save as it runs, the source mapped in windows; "
        "*read*: the same save with the source read "
        "(`KDUMP_CAPTURE_NO_MMAP=1`). The difference is page cache of the source windows "
        "that batches in flight still hold, which a capture kernel's /proc/vmcore (PFN "
        "maps) does not count; the goal is judged on *mapped*.",
        "",
        "| format | level | target | "
        + " | ".join(f"{g} GiB mapped | {g} GiB read" for g in sizes)
        + " | spread mapped | spread read |",
        "|---|---:|---|" + "---:|" * (2 * len(sizes) + 2),
    ]
    for fmt, level, target in CASES:
        got = [
            r
            for g in sizes
            for r in data["rows"]
            if (r["gib"], r["format"], r["level"], r["target"]) == (g, fmt, level, target)
        ]
        if len(got) != len(sizes):
            continue
        rss = [r["rss"] for r in got]
        read = [r.get("rss_read") for r in got]
        spread = max(rss) - rss[0]
        cells = []
        for m, r in zip(rss, read, strict=True):
            cells += [f"{m:.1f}", "-" if r is None else f"{r:.1f}"]
        rspread = None if None in read else f"+{max(read) - read[0]:.1f}"
        L.append(
            f"| {fmt} | {level} | {target} | "
            + " | ".join(cells)
            + f" | +{spread:.1f} | {rspread or '-'} |"
        )
        read_text = f"{rspread} MiB" if rspread else "not measured"
        if goals is not None:
            goals.append(
                (
                    "memory",
                    f"{fmt} -d {level} to {target}: peak RSS within 4 MiB "
                    f"from {sizes[0]} to {sizes[-1]} GiB",
                    f"+{spread:.1f} MiB (source read: {read_text})",
                    spread <= 4.0,
                )
            )
    L.append("")
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,64", help="RAM of the synthetic machines in GiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    data = measure_all([int(x) for x in a.sizes.split(",")], a.cpus, a.scratch, runs=a.runs)
    print("\n".join(report_lines(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
