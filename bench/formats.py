"""Format writers vs makedumpfile 1.7.2 and cp on one real vmcore: wall time, size, peak RSS.

    python3 bench/formats.py [--vmcore PATH | --mem 2048] [--runs 3] [--scratch DIR]

Every command runs as a child process (peak RSS from its rusage), ``--runs`` times, in
turns (ours, theirs, ours, ...) so that load from other processes hits both alike; the
page cache is warmed first. Results (medians) go to bench/results/formats.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_ours(src: str, fmt: str, level: int, dst: str) -> None:
    """Child mode: write one dump with our writer to a local file."""
    from kdump_capture.formats import NullMonitor, make_writer
    from kdump_capture.vmcore import open_vmcore

    class Sink:
        seekable = True

        def __init__(self, path: str) -> None:
            self.f = open(path, "wb")  # noqa: SIM115

        def write(self, data) -> None:
            self.f.write(data)

        def seek(self, offset: int) -> None:
            self.f.seek(offset)

        def tell(self) -> int:
            return self.f.tell()

    with open_vmcore(src) as vm:
        sink = Sink(dst)
        make_writer(vm, fmt, level, True).write(sink, NullMonitor())
        sink.f.close()


@dataclass
class Sample:
    wall: float
    rss_mib: float
    size: int


def measure(cmd: list[str], dst: str) -> Sample:
    if os.path.exists(dst):
        os.unlink(dst)
    # Start every case with no dirty pages: otherwise a case pays for the writeback of
    # the previous case's output and the figures depend on the order of the cases.
    subprocess.run(["sync"], check=True)
    with tempfile.TemporaryFile() as errf:  # a file, not a pipe: progress output is long
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t
        errf.seek(0)
        err = errf.read().decode(errors="replace")[-2000:]
    p.returncode = status
    if status:
        raise SystemExit(f"failed ({status}): {shlex.join(cmd)}\n{err}")
    size = os.path.getsize(dst)
    os.unlink(dst)
    return Sample(wall, ru.ru_maxrss / 1024, size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vmcore")
    ap.add_argument("--mem", type=int, default=2048, help="vmkit sample size when no --vmcore")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "formats.md"))
    ap.add_argument("--run-ours", nargs=4, metavar=("SRC", "FMT", "LEVEL", "DST"))
    a = ap.parse_args()
    if a.run_ours:
        src, fmt, level, dst = a.run_ours
        run_ours(src, fmt, int(level), dst)
        return
    src = a.vmcore
    if not src:
        from tests.vmkit import get_sample

        src = str(get_sample(a.mem).path)
    scratch = tempfile.mkdtemp(prefix="bench-formats-", dir=a.scratch)
    dst = os.path.join(scratch, "out")
    py = [sys.executable, os.path.abspath(__file__), "--run-ours", src]
    cases = [
        ("zstd -d 31", py + ["zstd", "31", dst]),
        ("makedumpfile -l -d 31", ["makedumpfile", "-l", "-d", "31", src, dst]),
        ("makedumpfile -c -d 31", ["makedumpfile", "-c", "-d", "31", src, dst]),
        ("compressed -d 31", py + ["compressed", "31", dst]),
        ("zstd -d 1", py + ["zstd", "1", dst]),
        ("makedumpfile -l -d 1", ["makedumpfile", "-l", "-d", "1", src, dst]),
        ("makedumpfile -c -d 1", ["makedumpfile", "-c", "-d", "1", src, dst]),
        ("ELF -d 0", py + ["elf", "0", dst]),
        ("cp", ["cp", src, dst]),
        ("ELF -d 31", py + ["elf", "31", dst]),
        ("makedumpfile -E -d 31", ["makedumpfile", "-E", "-d", "31", src, dst]),
    ]
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    results: dict[str, list[Sample]] = {name: [] for name, _ in cases}
    try:
        for r in range(a.runs):
            for name, cmd in cases:
                s = measure(cmd, dst)
                results[name].append(s)
                print(f"run {r + 1} {name:24s} {s.wall:7.2f} s {s.size / 1e6:9.1f} MB "
                      f"{s.rss_mib:6.1f} MiB", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {
        n: Sample(
            statistics.median(x.wall for x in v),
            max(x.rss_mib for x in v),
            int(statistics.median(x.size for x in v)),
        )
        for n, v in results.items()
    }
    write_report(a, src, cases, med)


def write_report(a, src: str, cases, med: dict[str, Sample]) -> None:
    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y else "-"

    lines = [
        "# Format writers vs makedumpfile 1.7.2",
        "",
        f"Command: `python3 bench/formats.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.node()}, {os.cpu_count()} CPUs, load average at end "
        f"{os.getloadavg()[0]:.1f}  ",
        f"Vmcore: `{src}` ({os.path.getsize(src) / 1e6:.0f} MB), page cache warm; "
        f"median of {a.runs} runs (commands interleaved); RSS = max over runs.",
        "",
        "| case | wall s | output MB | peak RSS MiB | command |",
        "|---|---:|---:|---:|---|",
    ]
    for name, cmd in cases:
        s = med[name]
        shown = shlex.join(cmd).replace(src, "VMCORE")
        lines.append(
            f"| {name} | {s.wall:.2f} | {s.size / 1e6:.1f} | {s.rss_mib:.1f} | `{shown}` |"
        )
    m = med
    ours_rss = max(s.rss_mib for n, s in m.items() if not n.startswith(("makedumpfile", "cp")))
    lines += [
        "",
        "| target | figure | met |",
        "|---|---|---|",
        f"| zstd -d 31 time <= 1.0x `-l -d 31` | "
        f"{ratio(m['zstd -d 31'].wall, m['makedumpfile -l -d 31'].wall)} | "
        f"{'yes' if m['zstd -d 31'].wall <= m['makedumpfile -l -d 31'].wall else 'no'} |",
        f"| zstd -d 31 size <= `-c -d 31` | "
        f"{ratio(m['zstd -d 31'].size, m['makedumpfile -c -d 31'].size)} | "
        f"{'yes' if m['zstd -d 31'].size <= m['makedumpfile -c -d 31'].size else 'no'} |",
        f"| zstd -d 1 time <= 1.0x `-l -d 1` | "
        f"{ratio(m['zstd -d 1'].wall, m['makedumpfile -l -d 1'].wall)} | "
        f"{'yes' if m['zstd -d 1'].wall <= m['makedumpfile -l -d 1'].wall else 'no'} |",
        f"| zstd -d 1 size <= `-c -d 1` | "
        f"{ratio(m['zstd -d 1'].size, m['makedumpfile -c -d 1'].size)} | "
        f"{'yes' if m['zstd -d 1'].size <= m['makedumpfile -c -d 1'].size else 'no'} |",
        f"| ELF -d 0 time <= 1.1x cp | {ratio(m['ELF -d 0'].wall, m['cp'].wall)} | "
        f"{'yes' if m['ELF -d 0'].wall <= 1.1 * m['cp'].wall else 'no'} |",
        f"| compressed -d 31 size vs `-c -d 31` | "
        f"{ratio(m['compressed -d 31'].size, m['makedumpfile -c -d 31'].size)} | - |",
        f"| peak RSS <= 64 MiB (ours) | {ours_rss:.1f} MiB | {'yes' if ours_rss <= 64 else 'no'} |",
        "",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
