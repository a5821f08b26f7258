"""The whole `kdump-capture save` (ELF level 0, local target) against `cp` on one vmcore.

    python3 bench/save_vs_cp.py [--vmcore FILE] [--runs 5] [--scratch DIR]

Unlike bench/formats.py, which times the format writer alone, this runs the real command:
SHA-256 of every byte, fsync before the rename, README and manifest. Each case starts with
`sync` (no dirty pages left by the previous one); runs alternate ours and the references.
References: `cp` (no fsync, no hash) and `cp` + `sync FILE` (durable, like ours).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmcore", help="default: the 2 GiB real sample (tests/vmkit)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scratch", default=None, help="filesystem to write to")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/save_vs_cp.md"))
    a = ap.parse_args()
    src = a.vmcore
    if not src:
        from tests.vmkit import get_sample

        src = str(get_sample(2048).path)
    scratch = tempfile.mkdtemp(prefix="bench-save-", dir=a.scratch)
    dumps, copy = os.path.join(scratch, "dumps"), os.path.join(scratch, "copy")
    save = [
        sys.executable,
        "-m",
        "kdump_capture",
        "save",
        "--config",
        "/dev/null",
        "--vmcore",
        src,
        "--no-reboot",
        "--set",
        f"KDUMP_SAVEDIR=file://{dumps}",
        "--set",
        "KDUMP_VERBOSE=0",
        "--set",
        "KDUMP_FREE_DISK_SIZE=0",
    ]
    cases = {
        "kdump-capture save (ELF -d 0)": save,
        "cp": ["cp", src, copy],
        "cp + sync": ["sh", "-c", f'cp "{src}" "{copy}" && sync "{copy}"'],
    }
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    times: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for r in range(a.runs):
            for name, cmd in cases.items():
                shutil.rmtree(dumps, ignore_errors=True)
                if os.path.exists(copy):
                    os.unlink(copy)
                times[name].append(timed(cmd))
                print(f"run {r + 1} {name:32s} {times[name][-1]:6.2f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["kdump-capture save (ELF -d 0)"]
    lines = [
        "# `kdump-capture save` vs `cp` (ELF level 0, local target)",
        "",
        f"Command: `python3 bench/save_vs_cp.py --runs {a.runs}"
        + (f" --scratch {a.scratch}" if a.scratch else "")
        + "`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}  ",
        f"Vmcore: `{src}` ({os.path.getsize(src)} bytes), page cache warm; medians.",
        "",
        "| case | median s | all runs (s) | ours / this |",
        "|---|---:|---|---:|",
    ]
    for k, v in times.items():
        runs = ", ".join(f"{x:.2f}" for x in v)
        lines.append(f"| {k} | {med[k]:.2f} | {runs} | {ours / med[k]:.2f}x |")
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
