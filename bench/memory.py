"""Peak RSS of `kdump-capture save` as the vmcore grows (the engine must stay flat).

    python3 bench/memory.py [--sizes 200,4096] [--levels 0,1] [--out bench/results/memory.md]

Each input is a synthetic sparse ELF vmcore of the given RAM size in MiB (reads of holes are
fast, so a 4 GiB input costs seconds, not minutes). The dump goes to a scratch directory
that is deleted afterwards. Peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kdump_capture.sample import SampleSpec, write_sample  # noqa: E402


def run(vmcore: str, savedir: str, level: int) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one save."""
    code = (
        "import resource, subprocess, sys, time;"
        "t = time.monotonic();"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    args = [
        sys.executable,
        "-m",
        "kdump_capture",
        "save",
        "--config",
        "/dev/null",
        "--vmcore",
        vmcore,
        "--no-reboot",
        "--set",
        f"KDUMP_SAVEDIR=file://{savedir}",
        "--set",
        f"KDUMP_DUMPLEVEL={level}",
        "--set",
        "KDUMP_FREE_DISK_SIZE=0",
        "--set",
        "KDUMP_VERBOSE=0",
        "--set",
        "KDUMP_KEEP_OLD_DUMPS=0",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,4096", help="RAM sizes in MiB (comma-separated)")
    ap.add_argument("--levels", default="0,1")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/memory.md"))
    ap.add_argument("--scratch", default=None, help="directory for inputs and dumps")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    levels = [int(s) for s in a.levels.split(",")]
    scratch = tempfile.mkdtemp(prefix="kdump-bench-", dir=a.scratch)
    rows = []
    try:
        for mib in sizes:
            src = os.path.join(scratch, f"vmcore-{mib}")
            write_sample(src, SampleSpec(ram_mib=mib, sparse=True))
            for level in levels:
                dest = os.path.join(scratch, f"d-{mib}-{level}")
                wall, rss = run(src, dest, level)
                rows.append((mib, level, os.path.getsize(src), wall, rss))
                print(
                    f"{mib:>6} MiB level {level}: {wall:6.2f} s, peak RSS {rss / 1024:.1f} MiB",
                    flush=True,
                )
                shutil.rmtree(dest)
            os.unlink(src)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        "# Peak memory of `kdump-capture save` vs vmcore size",
        "",
        f"Command: `python3 bench/memory.py --sizes {a.sizes} --levels {a.levels}`  ",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}. Input: synthetic sparse ELF vmcores; target: local "
        "directory.",
        "",
        "| RAM (MiB) | level | vmcore bytes | wall (s) | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for mib, level, size, wall, rss in rows:
        lines.append(f"| {mib} | {level} | {size} | {wall:.2f} | {rss / 1024:.1f} |")
    by_level: dict[int, list[int]] = {}
    for _, level, _, _, rss in rows:
        by_level.setdefault(level, []).append(rss)
    lines.append("")
    for level, rs in sorted(by_level.items()):
        lines.append(
            f"Level {level}: peak RSS spread {(max(rs) - min(rs)) / 1024:.1f} MiB "
            f"across sizes {a.sizes} MiB."
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
