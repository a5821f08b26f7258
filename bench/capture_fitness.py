"""Capture-kernel fitness: initramfs sizes per target, the smallest crashkernel= at which a
whole cycle (load, crash, capture, save, reboot) completes for a 1 GiB TCG guest, and the
time from the panic to the committed dump.

    python3 bench/capture_fitness.py [--case sftp|file] [--sizes 96,128,160,192]
                                     [--out bench/results/capture_fitness.md]

Needs what the VM tests need (qemu, the cached Debian cloud kernel) and, for the SFTP case,
the OpenSSH fixture from tests/servers. Each cycle takes 1-3 minutes under TCG.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from initramfs import builder  # noqa: E402
from kdump_capture.config import load_config  # noqa: E402
from tests import capture_cycle, vmkit  # noqa: E402

MIB = 1024 * 1024
UP = re.compile(r"capture kernel up \(MemTotal (\d+) kB, MemAvailable (\d+) kB\)")
PEAK = re.compile(r"peak RSS (\d+) MiB; MemTotal \d+ kB, MemAvailable (\d+) kB")
TARGETS = {
    "file": 'KDUMP_SAVEDIR="file:///var/crash"\n',
    "ftp": 'KDUMP_SAVEDIR="ftp://u:p@10.0.2.2/dumps"\n',
    "nfs": 'KDUMP_SAVEDIR="nfs://10.0.2.2/dumps"\n',
    "cifs": 'KDUMP_SAVEDIR="cifs://u:p@10.0.2.2/share/dumps"\n',
}


def image_sizes(kernel: vmkit.Kernel, work: Path, ssh_config: str) -> list[tuple]:
    rows = []
    for name, text in [*TARGETS.items(), ("sftp", ssh_config)]:
        conf = work / f"{name}.conf"
        conf.write_text(text)
        try:
            report = builder.build(
                load_config(str(conf)),
                str(work / f"{name}.img"),
                kernel_version=kernel.version,
                modules_root=str(kernel.modules_root),
                target_device="LABEL=kdumpdisk" if name == "file" else "",
                target_fstype="ext4" if name == "file" else "",
            )
        except Exception as e:  # a transport not in this build: say so in the table
            rows.append((name, None, None, None, f"not built: {e}"))
            continue
        rows.append(
            (name, report.compressed, report.unpacked, report.seconds, report.python_modules)
        )
    return rows


def one_cycle(kernel, case: str, size: int, work: Path, server) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if case == "sftp":
        dumps = work / "dumps"
        dumps.mkdir(exist_ok=True)
        from tests.test_e2e_vm import sftp_config

        res = capture_cycle.run_cycle(
            kernel, sftp_config(server, dumps), work / "cycle", crashkernel_mib=size, net=True
        )
    else:
        disk = capture_cycle.make_ext4_disk(work / "disk.img", 2048, "kdumpdisk")
        from tests.test_e2e_vm import LOCAL_CONFIG

        res = capture_cycle.run_cycle(
            kernel,
            LOCAL_CONFIG,
            work / "cycle",
            crashkernel_mib=size,
            drives=(disk,),
            target_device="LABEL=kdumpdisk",
            target_fstype="ext4",
        )
    up = UP.search(res.console)
    peak = PEAK.search(res.console)
    ok = res.save_rc == 0 and res.finish == "rebooting"
    reason = ""
    if not ok:
        lines = [
            ln
            for ln in res.console.splitlines()
            if any(k in ln for k in ("kdump", "Kernel panic", "Out of memory", "No working init"))
        ]
        reason = (lines[-1] if lines else res.console.strip().splitlines()[-1])[:160]
    return {
        "size": size,
        "ok": ok,
        "memtotal": int(up.group(1)) // 1024 if up else None,
        "available": int(up.group(2)) // 1024 if up else None,
        "peak": int(peak.group(1)) if peak else None,
        "after": int(peak.group(2)) // 1024 if peak else None,
        "panic_to_saved": res.panic_to_saved,
        "total": res.total,
        "reason": reason,
    }


def fmt(v, spec="") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("sftp", "file"), default="sftp")
    ap.add_argument("--sizes", default="96,128,160,192")
    ap.add_argument("--out", default=str(ROOT / "bench/results/capture_fitness.md"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kernel = vmkit.get_kernel()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    from tests.servers.sshd import sshd
    from tests.test_e2e_vm import sftp_config

    with tempfile.TemporaryDirectory(prefix="kdump-fitness-") as tmp:
        work = Path(tmp)
        with sshd(str(work / "sshd")) as server:
            sizes_rows = image_sizes(kernel, work, sftp_config(server, work / "dumps"))
            cycles = []
            for size in sizes:
                t = time.monotonic()
                r = one_cycle(kernel, args.case, size, work / f"c{size}", server)
                print(
                    f"crashkernel={size}M: {'ok' if r['ok'] else 'FAILED'} "
                    f"({time.monotonic() - t:.0f} s) {r['reason']}",
                    flush=True,
                )
                cycles.append(r)
    smallest = next((r["size"] for r in cycles if r["ok"]), None)
    out = [
        "# Capture-kernel fitness",
        "",
        f"Measured by `python3 bench/capture_fitness.py --case {args.case} --sizes {args.sizes}`"
        f" at `{commit}`; Debian cloud kernel {kernel.version}, qemu TCG (`-cpu max`), "
        "1 GiB guest, 1 vCPU. Sizes are of `kdump-capture initramfs build` output (zstd -19).",
        "",
        "## Initramfs size per target",
        "",
        "| target | compressed | unpacked | build time | .pyc modules |",
        "|---|---|---|---|---|",
    ]
    for name, comp, unp, secs, mods in sizes_rows:
        if comp is None:
            out.append(f"| {name} | - | - | - | {mods} |")
        else:
            out.append(
                f"| {name} | {comp / MIB:.1f} MiB | {unp / MIB:.1f} MiB | {secs:.1f} s | {mods} |"
            )
    out += [
        "",
        f"## Whole cycle per crashkernel= ({args.case} target)",
        "",
        "MemTotal/MemAvailable as /init sees them before the save starts; peak RSS of the "
        "save process (wait4); panic-to-saved is host wall time from the first kernel's "
        "`test-crash` to /init's 'save finished' line (the dump is committed then).",
        "",
        "| crashkernel | result | MemTotal | MemAvailable at start | save peak RSS "
        "| MemAvailable after | panic to committed dump | whole cycle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in cycles:
        result = "ok" if r["ok"] else f"FAILED: {r['reason']}"
        out.append(
            f"| {r['size']}M | {result} | {fmt(r['memtotal'])} MiB | {fmt(r['available'])} MiB "
            f"| {fmt(r['peak'])} MiB | {fmt(r['after'])} MiB "
            f"| {fmt(r['panic_to_saved'], '.0f')} s | {fmt(r['total'], '.0f')} s |"
        )
    out += [
        "",
        f"Smallest crashkernel= that completes: **{smallest}M**"
        if smallest
        else "No size completed.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out))
    print("\n".join(out))
    return 0 if smallest else 1


if __name__ == "__main__":
    sys.exit(main())
