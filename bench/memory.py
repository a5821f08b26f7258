"""Peak RSS of `kdump-capture save` as the machine grows: formats, levels, a network target.

    python3 bench/memory.py [--sizes 1,64] [--cpus 1] [--scratch DIR]

Inputs are synthetic vmcores with a realistic struct-page array (tests/bigcore.py), so the
filter, the bitmaps and the compressors all work as on a real machine (all-zero inputs made
"flat memory" trivially true). Targets: a local directory, and SFTP to an OpenSSH server on
loopback. Peak RSS is measured from outside by GNU time (bench/measure.py). bench/run.py
puts the table into bench/RESULTS.md; run alone, this prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
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


def measure_all(sizes: list[int], cpus: int, scratch: str | None, log: Callable = print) -> dict:
    from tests.bigcore import get_bigcore
    from tests.servers.sshd import sshd

    work = tempfile.mkdtemp(prefix="bench-memory-", dir=scratch)
    bigdir = os.path.join(scratch or tempfile.gettempdir(), "kdump-bigcores")
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
                    s = measure.run(_save(src, url, fmt, level, conf), cpus, d)
                    shutil.rmtree(d, ignore_errors=True)
                    rows.append(
                        {
                            "gib": gib,
                            "format": fmt,
                            "level": level,
                            "target": target,
                            "wall": s.wall,
                            "rss": s.rss_mib,
                            "size": s.size,
                        }
                    )
                    log(
                        f"  memory {gib:5d} GiB {fmt:10s} -d {level:2d} {target:5s} "
                        f"{s.wall:7.2f} s {s.rss_mib:6.1f} MiB"
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"sizes": sizes, "rows": rows}


def report_lines(data: dict, goals: list | None = None) -> list[str]:
    sizes = data["sizes"]
    L = [
        "## Memory: peak RSS of the whole save (synthetic machines, GNU time)",
        "",
        "| format | level | target | " + " | ".join(f"{g} GiB" for g in sizes) + " | spread |",
        "|---|---:|---|" + "---:|" * (len(sizes) + 1),
    ]
    for fmt, level, target in CASES:
        rss = [
            r["rss"]
            for g in sizes
            for r in data["rows"]
            if (r["gib"], r["format"], r["level"], r["target"]) == (g, fmt, level, target)
        ]
        if len(rss) != len(sizes):
            continue
        spread = max(rss) - rss[0]
        L.append(
            f"| {fmt} | {level} | {target} | "
            + " | ".join(f"{x:.1f}" for x in rss)
            + f" | +{spread:.1f} |"
        )
        if goals is not None:
            goals.append(
                (
                    "memory",
                    f"{fmt} -d {level} to {target}: peak RSS within 4 MiB "
                    f"from {sizes[0]} to {sizes[-1]} GiB",
                    f"+{spread:.1f} MiB",
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
    a = ap.parse_args()
    data = measure_all([int(x) for x in a.sizes.split(",")], a.cpus, a.scratch)
    print("\n".join(report_lines(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
