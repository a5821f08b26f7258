"""Capture-kernel fitness: image sizes per target, and per target and format the smallest
crashkernel= at which a whole cycle (load, crash, capture, save, reboot) completes in a
1 GiB TCG guest, next to what ``kdump-capture estimate`` recommends there.

    python3 bench/capture_fitness.py [--cases all | file:elf,sftp:compressed+encrypt,...]
                                     [--sizes 96,112,128,144,160] [--images]

Each case tries the sizes from the largest down and stops at the first that fails (the
ones below it are not tried). Every run is kept in bench/results/capture_fitness.json
(a rerun of a case replaces that case's runs); bench/results/capture_fitness.md is written
from that file, entirely by this script. Needs what the VM tests need (qemu, the cached
Debian cloud kernel, the test servers); each cycle takes 1-7 minutes under TCG.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import capture_cycle, vmkit  # noqa: E402

MIB = 1024 * 1024
RESULTS = ROOT / "bench/results/capture_fitness.json"
REPORT = ROOT / "bench/results/capture_fitness.md"
UP = re.compile(
    r"capture kernel up \(MemTotal (\d+) kB, MemAvailable (\d+) kB, Shmem (\d+) kB"
    r"(?:, rootfs size (\d+) kB)?\)"
)
PEAK = re.compile(r"peak RSS (\d+) MiB; MemTotal \d+ kB, MemAvailable (\d+) kB")
MEMORY = re.compile(r"memory \(anonymous, MiB\): (.*)")
INIT_ANON = re.compile(r"/init anon (\d+) kB")
OOM = re.compile(r"Out of memory: Killed process \d+ \((\S+)\).*?anon-rss:(\d+)kB")


def one_run(kernel: vmkit.Kernel, kind: str, fmt: str, size: int, work: Path) -> dict:
    started = time.monotonic()
    res, dumps = capture_cycle.matrix_cycle(kernel, kind, fmt, size, work)
    ok = res.save_rc == 0 and res.finish == "rebooting" and len(dumps) == 1
    up, peak = UP.search(res.console), PEAK.search(res.console)
    mem, init, oom = MEMORY.search(res.console), INIT_ANON.search(res.console), None
    reason = ""
    if not ok:
        oom = OOM.search(res.console)
        if oom:
            reason = f"OOM: {oom.group(1)} killed at anon-rss {int(oom.group(2)) // 1024} MiB"
        else:
            lines = [
                ln
                for ln in res.console.splitlines()
                if any(k in ln for k in ("kdump", "Kernel panic", "No working init", "E2E-"))
            ]
            reason = (lines[-1] if lines else "no console output").strip()[:160]
    return {
        "kind": kind,
        "format": fmt,
        "size": size,
        "ok": ok,
        "reason": reason,
        "memtotal": int(up.group(1)) // 1024 if up else None,
        "available": int(up.group(2)) // 1024 if up else None,
        "shmem": int(up.group(3)) // 1024 if up else None,
        "rootfs_size": int(up.group(4)) // 1024 if up and up.group(4) else None,
        "save_peak_rss": int(peak.group(1)) if peak else None,
        "init_anon": int(init.group(1)) // 1024 if init else None,
        "memory": mem.group(1).strip() if mem else "",
        "estimate": res.estimate,
        "panic_to_saved": round(res.panic_to_saved, 1) if res.panic_to_saved else None,
        "save_seconds": res.save_seconds,
        "progress_lines": res.progress_lines,
        "image_unpacked": res.report.unpacked,
        "image_compressed": res.report.compressed,
        "wall": round(time.monotonic() - started),
    }


def image_sizes(kernel: vmkit.Kernel, work: Path) -> list[dict]:
    """Build each target's image (compressed level 31) and report its sizes."""
    rows = []
    for kind in capture_cycle.TARGET_KINDS:
        with capture_cycle.serve_target(kind, work / kind) as t:
            config = t.config + capture_cycle.format_config("compressed") + capture_cycle.COMMON
            _path, report = capture_cycle.build_capture(
                kernel,
                config,
                work / kind,
                target_device=t.cycle_args.get("target_device", ""),
                target_fstype=t.cycle_args.get("target_fstype", ""),
            )
        rows.append(
            {
                "kind": kind,
                "compressed": report.compressed,
                "unpacked": report.unpacked,
                "kernel_modules": report.facts.get("kernel_modules", 0),
                "save_imports": report.facts.get("save_imports", 0),
                "seconds": round(report.seconds, 1),
                "pyc": report.python_modules,
            }
        )
    return rows


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"runs": [], "images": [], "commands": []}


def smallest(runs: list[dict]) -> int | None:
    ok = sorted(r["size"] for r in runs if r["ok"])
    return ok[0] if ok else None


def fmt_mib(v) -> str:
    return "-" if v is None else f"{v}"


def report(data: dict) -> str:
    out = [
        "# Capture-kernel fitness",
        "",
        "Generated by `bench/capture_fitness.py` from `bench/results/capture_fitness.json`; "
        "do not edit by hand. A 1 GiB qemu TCG guest (`-cpu max`, one vCPU) with Debian's "
        "cloud kernel: the first kernel runs `kdump-capture estimate` and `load` "
        "(kexec_file_load) with the image from `initramfs build`, then crashes; the "
        "capture kernel's /init saves /proc/vmcore and reboots. Formats: `compressed` and "
        "`zstd` at level 31, `ELF` at level 0; a format's `+encrypt` adds `KDUMP_ENCRYPT_TO` "
        "(an age key), `+sha256` adds `KDUMP_CHECKSUM=sha256` (configurations admins add, "
        "each with what it imports). Commands that produced the runs below:",
        "",
        *[f"    {c}" for c in data.get("commands", [])],
        "",
    ]
    if data.get("images"):
        out += [
            "## Image size per target",
            "",
            "Kernel modules are deleted by /init once loaded; `save imports` is the save's "
            "interpreter and imports, measured by the builder (anonymous memory).",
            "",
            "| target | compressed | unpacked | of it kernel modules | save imports |"
            " build time | .pyc modules |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["images"]:
            out.append(
                f"| {r['kind']} | {r['compressed'] / MIB:.1f} MiB | {r['unpacked'] / MIB:.1f} MiB "
                f"| {r['kernel_modules'] / MIB:.1f} MiB | {r['save_imports'] / MIB:.1f} MiB "
                f"| {r['seconds']} s | {r['pyc']} |"
            )
        out.append("")
    cases: dict[tuple[str, str], list[dict]] = {}
    for r in data["runs"]:
        cases.setdefault((r["kind"], r["format"]), []).append(r)
    out += [
        "## Smallest crashkernel= per target and format",
        "",
        "`estimate` is what `kdump-capture estimate` printed in the guest's first kernel; "
        "`tried` lists every reservation run (ok or failed), largest first.",
        "",
        "| target | format | smallest that completes | estimate | estimate - smallest "
        "| tried | panic to committed dump at the smallest |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kind, fmt), runs in sorted(cases.items()):
        low = smallest(runs)
        est = next((r["estimate"] for r in runs if r["estimate"]), None)
        diff = f"{est - low:+d}M" if low and est else "-"
        tried = ", ".join(
            f"{r['size']}M {'ok' if r['ok'] else 'failed'}"
            for r in sorted(runs, key=lambda r: -r["size"])
        )
        at_low = next((r for r in runs if r["ok"] and r["size"] == low), None)
        ptime = f"{at_low['panic_to_saved']} s" if at_low and at_low["panic_to_saved"] else "-"
        out.append(
            f"| {kind} | {fmt} | {f'{low}M' if low else 'none'} | "
            f"{f'{est}M' if est else '-'} | {diff} | {tried} | {ptime} |"
        )
    out += [
        "",
        "## Every run",
        "",
        "MemTotal, MemAvailable and Shmem (the unpacked image) as /init sees them at its "
        "start, and the size the kernel gave rootfs (tmpfs, half of its memory at boot: the "
        "unpacked image must fit; `-` for runs before /init logged it); the save's peak RSS "
        "(wait4, with mapped files) and its own breakdown of anonymous memory (phases, then "
        "the peak); progress = progress lines on the console.",
        "",
        "| target | format | crashkernel | result | MemTotal | MemAvailable | Shmem | rootfs "
        "| /init | save peak RSS | save seconds | progress | panic to saved "
        "| save memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["runs"], key=lambda r: (r["kind"], r["format"], -r["size"])):
        result = "ok" if r["ok"] else f"FAILED: {r['reason']}"
        out.append(
            f"| {r['kind']} | {r['format']} | {r['size']}M | {result} | {fmt_mib(r['memtotal'])} "
            f"| {fmt_mib(r['available'])} | {fmt_mib(r['shmem'])} "
            f"| {fmt_mib(r.get('rootfs_size'))} | {fmt_mib(r['init_anon'])} "
            f"| {fmt_mib(r['save_peak_rss'])} | {fmt_mib(r['save_seconds'])} "
            f"| {r['progress_lines']} | {fmt_mib(r['panic_to_saved'])} | {r['memory'] or '-'} |"
        )
    return "\n".join(out) + "\n"


def save(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    REPORT.write_text(report(data))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default="",
        help="all, or kind:format[+variant...],... (e.g. sftp:compressed, file:zstd+encrypt)",
    )
    ap.add_argument("--sizes", default="112,128,144,160")
    ap.add_argument("--images", action="store_true", help="measure the image of each target")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    data = load_results()
    if args.report_only:
        save(data)
        return 0
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    command = "python3 bench/capture_fitness.py " + " ".join(sys.argv[1:])
    data.setdefault("commands", []).append(f"{command}   # at {commit}")
    kernel = vmkit.get_kernel()
    if args.cases == "all":
        cases = [(k, f) for k in capture_cycle.TARGET_KINDS for f in capture_cycle.FORMATS]
    else:
        cases = [tuple(c.split(":")) for c in args.cases.split(",") if c]
    sizes = sorted((int(s) for s in args.sizes.split(",")), reverse=True)
    with tempfile.TemporaryDirectory(prefix="kdump-fitness-") as tmp:
        if args.images:
            data["images"] = image_sizes(kernel, Path(tmp) / "images")
            save(data)
        for kind, fmt in cases:
            data["runs"] = [r for r in data["runs"] if (r["kind"], r["format"]) != (kind, fmt)]
            for size in sizes:
                work = Path(tmp) / f"{kind}-{fmt}-{size}"
                r = one_run(kernel, kind, fmt, size, work)
                shutil.rmtree(work, ignore_errors=True)  # dumps and disks: GBs per run
                data["runs"].append(r)
                save(data)
                print(
                    f"{kind} {fmt} crashkernel={size}M: "
                    f"{'ok' if r['ok'] else 'FAILED ' + r['reason']} ({r['wall']} s; "
                    f"estimate {r['estimate']}M)",
                    flush=True,
                )
                if not r["ok"]:
                    break
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
