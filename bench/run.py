"""Every benchmark of issue 9 in one command; writes bench/RESULTS.md and bench/results/*.png.

    python3 bench/run.py [--quick] [--cpus 1|2] [--runs 5] [--scratch DIR] [--fresh-memory]
                         [--samples 512,2048,8192] [--scale 1,64,256,1024] [--skip SECTION,...]

Sections (each can be skipped): ``formats`` (real vmcores of TCG guests: our format writers
and whole saves against makedumpfile 1.7.2, cp and cp + sync), ``scale`` (synthetic sparse
vmcores of 1 GiB to 1 TiB with a realistic struct-page array: time, peak RSS and the
struct-page walk against makedumpfile on the same file), ``memory`` (peak RSS of the whole
save across sizes, formats and a network target), ``transports`` (loopback throughput
against OpenSSH sftp, curl and smbclient), ``e2e`` (the whole save over SFTP on the real
samples against ``makedumpfile -F -l -d 31 | ssh``, bench/sftp_e2e.py). Commands are pinned
to the first ``--cpus`` CPUs (default one, as a capture kernel with nr_cpus=1), ours and the
reference interleaved, medians of ``--runs``. When a goal is missed, a cProfile summary of
our command says what limits it. ``--quick`` runs a subset in under three minutes. Free page
reporting (a virtio balloon handing freed memory to the host, whose page faults then land on
whoever touches it next) is off while the bench runs, after the free memory is written once
(bench/measure.py settled_memory); ``--fresh-memory`` leaves it as it is. Nothing
under bench/results is edited by hand: this command writes every file there
(capture_fitness.md comes from bench/capture_fitness.py, which this runs too unless skipped
or --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure  # noqa: E402
from bench.measure import ROOT, Case, interleave, python_cmd  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
WRITER = os.path.join(ROOT, "bench", "writer.py")
CODEC_FLOOR = os.path.join(ROOT, "bench", "codec_floor.py")
GIB = 1 << 30


def log(msg: str) -> None:
    print(msg, flush=True)


# -- machine -------------------------------------------------------------------------------
OWN_OUTPUTS = (":(exclude)bench/results", ":(exclude)bench/RESULTS.md")


def fresh_memory_probe(rounds: int = 5, mib: int = 1024) -> dict:
    """How this machine's memory behaves when written fresh: free page reporting settings
    (virtio-balloon hands memory the guest frees back to the host, whose page faults then
    cost the next writer) and the wall and system seconds of writing ``mib`` MiB into a new
    tmpfs file, ``rounds`` times. The transport servers write every upload into new page
    cache, so this spread bounds how steady their figures can be."""
    params = "/sys/module/page_reporting/parameters"
    reporting = {}
    for name in ("page_reporting_order", "min_free_ms"):
        with contextlib.suppress(OSError):
            with open(os.path.join(params, name)) as f:
                reporting[name] = f.read().strip()
    block = bytes(8 << 20)
    walls, systems = [], []
    for _ in range(rounds):
        fd, path = tempfile.mkstemp(prefix="bench-fresh-", dir="/dev/shm")
        try:
            t0, c0 = time.monotonic(), os.times().system
            for _ in range(mib // 8):
                os.write(fd, block)
            walls.append(round(time.monotonic() - t0, 2))
            systems.append(round(os.times().system - c0, 2))
        finally:
            os.close(fd)
            os.unlink(path)
    return {"reporting": reporting, "mib": mib, "wall": walls, "system": systems}


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    mdf = measure.makedumpfile_version()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    # The bench's own outputs do not count: a --reuse run starts from the raw.json of the run
    # before it, which is not committed yet.
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *OWN_OUTPUTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import zlib

    import zstandard

    from kdump_capture import speedups

    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "makedumpfile": mdf,
        "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "accelerator": speedups.describe(),
    }


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# -- formats on real samples ------------------------------------------------------------------
# (our case, reference case, limit of ours/reference on the 2 and 8 GiB samples)
FORMAT_GOALS = [
    ("zstd -d 31", "makedumpfile -l -d 31", 1.0),
    ("compressed -d 31", "makedumpfile -c -d 31", 1.0),
    ("ELF -d 31", "makedumpfile -E -d 31", 1.2),
    ("zstd -d 1", "makedumpfile -l -d 1", 1.0),
    # the whole save with its checksum: XXH3-128, the default KDUMP_CHECKSUM
    ("save ELF -d 0 (with XXH3)", "cp + sync", 1.3),
]
# Not a goal: the same save with KDUMP_CHECKSUM=sha256, the default before the figures here
# made the case for XXH3-128 (what SHA-256 alone costs on one CPU).
# (the save with SHA-256, its reference, the same save with the default checksum)
CHECKSUM_CONTEXT = [("save ELF -d 0 (with SHA-256)", "cp + sync", "save ELF -d 0 (with XXH3)")]
SHA256 = ("--set", "KDUMP_CHECKSUM=sha256")
# Not goals of the issue: our lzo and zstd formats against makedumpfile writing the same
# codec (lzo1x_1; zstd level 1) and the same bytes, so the ratio is what our writer costs
# around it. The -z rows need a makedumpfile built with zstd (measure.zstd_makedumpfile).
SAME_CODEC = [
    ("lzo -d 31", "makedumpfile -l -d 31", ("lzo", "-l", "31")),
    ("lzo -d 1", "makedumpfile -l -d 1", ("lzo", "-l", "1")),
    ("zstd -d 31", "makedumpfile -z -d 31", ("zstd", "-z", "31")),
    ("zstd -d 1", "makedumpfile -z -d 1", ("zstd", "-z", "1")),
]


def save_argv(src: str, dest: str, fmt: str, level: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*python_cmd(), *measure.save_args(src, f"file://{dest}", fmt, level, extra=extra)]


def format_cases(src: str, work: str, mdz: str | None = None) -> list[Case]:
    """Ours and the references; ``mdz``: a makedumpfile that writes zstd (-z), if any."""
    out = os.path.join(work, "out")
    py = [*python_cmd(), WRITER, src]
    save_dir = os.path.join(work, "dumps")
    zstd_refs = [
        Case(f"makedumpfile -z -d {lv}", [mdz, "-z", "-d", lv, src, out], out, "ref")
        for lv in ("31", "1")
        if mdz
    ]
    return [
        Case("zstd -d 31", py + ["zstd", "31", out], out),
        Case("makedumpfile -l -d 31", ["makedumpfile", "-l", "-d", "31", src, out], out, "ref"),
        Case("compressed -d 31", py + ["compressed", "31", out], out),
        Case("makedumpfile -c -d 31", ["makedumpfile", "-c", "-d", "31", src, out], out, "ref"),
        Case("ELF -d 31", py + ["elf", "31", out], out),
        Case("makedumpfile -E -d 31", ["makedumpfile", "-E", "-d", "31", src, out], out, "ref"),
        Case("zstd -d 1", py + ["zstd", "1", out], out),
        Case("makedumpfile -l -d 1", ["makedumpfile", "-l", "-d", "1", src, out], out, "ref"),
        Case("lzo -d 31", py + ["lzo", "31", out], out),
        Case("lzo -d 1", py + ["lzo", "1", out], out),
        *zstd_refs,
        Case("save ELF -d 0 (with XXH3)", save_argv(src, save_dir, "ELF", 0), save_dir),
        Case("save ELF -d 0 (with SHA-256)", save_argv(src, save_dir, "ELF", 0, SHA256), save_dir),
        Case("cp + sync", ["sh", "-c", f'cp "{src}" "{out}" && sync "{out}"'], out, "ref"),
    ]


def identical_to_makedumpfile(
    src: str,
    work: str,
    fmt: str = "compressed",
    flag: str = "-c",
    level: str = "31",
    binary: str = "makedumpfile",
) -> bool:
    a, b = os.path.join(work, "id-ours"), os.path.join(work, "id-mdf")
    subprocess.run([*python_cmd(), WRITER, src, fmt, level, a], env=measure.env(), check=True)
    subprocess.run([binary, flag, "-d", level, src, b], check=True, capture_output=True)
    same = subprocess.run(["cmp", "-s", a, b]).returncode == 0
    os.unlink(a)
    os.unlink(b)
    return same


def codec_floor(src: str, level: int, work: str, cpus: int) -> dict:
    """The page codecs alone on the pages of a ``level`` dump of ``src`` (bench/codec_floor.py)."""
    cmd = [*measure.pin(cpus), *python_cmd(), CODEC_FLOOR, src, str(level)]
    cmd.append(os.path.join(work, f"tap-{level}"))
    p = subprocess.run(cmd, env=measure.env(), capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(p.stdout)


# What bench/writer.py does before its first page: the interpreter, our imports and the
# accelerator (its self-test runs at import).
STARTUP = (
    "from kdump_capture.formats import NullMonitor, make_writer\n"
    "from kdump_capture.vmcore import open_vmcore\n"
    "from kdump_capture import speedups\n"
    "speedups.module()\n"
)


def startup_cpu(runs: int, cpus: int) -> float | None:
    """Median CPU seconds of our writer's start-up alone (pinned like the cases)."""
    try:
        cpu = [measure.run([*python_cmd(), "-c", STARTUP], cpus).cpu for _ in range(runs)]
    except RuntimeError:
        return None
    return sorted(cpu)[len(cpu) // 2]


def run_formats(args, samples: list[tuple[str, str]], res: dict) -> None:
    for label, src in samples:
        log(f"formats: {label} ({src}), load {load()}")
        work = tempfile.mkdtemp(prefix="bench-formats-", dir=args.scratch)
        mdz = args.makedumpfile_zstd
        cases = format_cases(src, work, mdz)
        start_load = load()
        try:
            interleave(
                cases, args.runs, args.cpus, log, before=functools.partial(measure.warm, src)
            )
            same = identical_to_makedumpfile(src, work)
            same_codec = {}
            for o, _, a in SAME_CODEC:
                binary = mdz if a[1] == "-z" else "makedumpfile"
                if binary:
                    same_codec[o] = identical_to_makedumpfile(src, work, *a, binary=binary)
            floors = {str(lv): codec_floor(src, lv, work, args.cpus) for lv in (31, 1)}
            startup = startup_cpu(args.runs, args.cpus)
            profiles = {}
            by = {c.name: c for c in cases}
            limit_all = 2.0 if label.startswith("512") else None
            for ours, ref, limit in FORMAT_GOALS:
                lim = limit_all or limit
                if by[ours].wall > lim * by[ref].wall:
                    argv = by[ours].argv[len(python_cmd()) :]
                    measure.warm(src)
                    profiles[ours] = measure.profile(argv, args.cpus)
                    measure.clean(by[ours].output)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        res["formats"].append(
            {
                "label": label,
                "src": src,
                "size": os.path.getsize(src),
                "runs": args.runs,
                "load": [start_load, load()],
                "identical": same,
                "identical_same_codec": same_codec,
                "makedumpfile_zstd": mdz,
                "codec_floor": floors,
                "startup_cpu": startup,
                "profiles": profiles,
                "cases": [
                    {
                        "name": c.name,
                        "side": c.side,
                        "argv": c.argv,
                        "samples": [s.__dict__ | {"stderr": ""} for s in c.samples],
                    }
                    for c in cases
                ],
            }
        )


# -- scale: synthetic machines of 1 GiB to 1 TiB ----------------------------------------------
STEP = re.compile(r"STEP \[Excluding unnecessary pages\] : ([0-9.]+) seconds")
WALK = re.compile(r"struct-page walk ([0-9.]+) s")


def settle(src: str, row: dict) -> None:
    """Before every timed run, of ours and of makedumpfile alike (see measure.settle_sparse)."""
    t = time.monotonic()
    data, extents = measure.settle_sparse(src)
    row["settle"] = {"data_mib": data >> 20, "extents": extents, "s": time.monotonic() - t}


def run_scale(args, res: dict) -> None:
    from tests.bigcore import get_bigcore

    bigdir = os.path.join(args.scratch or tempfile.gettempdir(), "kdump-bigcores")
    for gib in args.scale:
        log(f"scale: {gib} GiB bigcore, load {load()}")
        t = time.monotonic()
        src = get_bigcore(bigdir, gib * 1024)
        made = time.monotonic() - t
        work = tempfile.mkdtemp(prefix="bench-scale-", dir=args.scratch)
        out, dumps = os.path.join(work, "out"), os.path.join(work, "dumps")
        row: dict = {
            "gib": gib,
            "file_bytes": os.path.getsize(src),
            "made_s": made,
            "disk_mib": os.stat(src).st_blocks * 512 >> 20,
            "load": [load()],
            "levels": {},
        }
        try:
            for level in (31, 1):
                if level == 1 and gib > args.scale_l1_max:
                    continue  # reads every page of RAM: minutes per run at 1 TiB
                runs = args.scale_runs if level == 31 or gib <= args.scale_l1_full else 1
                if gib >= args.scale_one_run:
                    runs = 1
                mdf = ["makedumpfile", "-c", "-d", str(level), "--message-level", "31", src, out]
                cases = [
                    Case(
                        f"save compressed -d {level}",
                        save_argv(src, dumps, "compressed", level),
                        dumps,
                    ),
                    Case(f"makedumpfile -c -d {level}", mdf, out, "ref"),
                    Case(f"save zstd -d {level}", save_argv(src, dumps, "zstd", level), dumps),
                ]
                interleave(cases, runs, args.cpus, log, before=functools.partial(settle, src, row))
                walks = [float(m) for s in cases[0].samples for m in WALK.findall(s.stderr)]
                steps = [sum(float(m) for m in STEP.findall(s.stderr)) for s in cases[1].samples]
                row["levels"][level] = {
                    "runs": runs,
                    "errors": {c.name: c.error for c in cases if c.error},
                    "cases": [
                        {
                            "name": c.name,
                            "side": c.side,
                            "argv": c.argv,
                            "wall": c.wall,
                            "rss": c.rss,
                            "size": c.size,
                            "walls": [s.wall for s in c.samples],
                            "cpu_s": [s.cpu for s in c.samples],
                            "user_s": [s.user for s in c.samples],
                            "sys_s": [s.system for s in c.samples],
                            "samples_ok": bool(c.samples),
                        }
                        for c in cases
                    ],
                    "walk_ours": sorted(walks)[len(walks) // 2] if walks else None,
                    "walk_mdf": sorted(steps)[len(steps) // 2] if steps else None,
                }
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if gib >= args.keep_below and not args.keep_bigcores:
                os.unlink(src)
        row["load"].append(load())
        res["scale"].append(row)


# -- memory: peak RSS of the save across sizes, formats and a network target ------------------
def run_memory(args, res: dict) -> None:
    from bench.memory import measure_all

    # three runs per case, mapped and read (one each with --quick, to keep its 3 minutes)
    runs = 1 if args.quick else 3
    res["memory"] = measure_all(args.memory_sizes, args.cpus, args.scratch, log, runs)


# -- transports ---------------------------------------------------------------------------------
def run_transports(args, res: dict) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json") as jf:
        cmd = [
            *measure.pin(args.cpus),
            sys.executable,
            os.path.join(ROOT, "bench", "transports.py"),
            "--size-mb",
            str(args.transport_mb),
            "--runs",
            str(args.runs),
            "--json",
            jf.name,
        ]
        # The server of a capture kernel is another machine: with CPUs to spare, the
        # servers leave the clients' CPUs (ours and the reference alike).
        spare = [str(c) for c in range(args.cpus, os.cpu_count() or 1)]
        if spare:
            cmd += ["--server-cpus", ",".join(spare)]
        log(f"transports: {' '.join(cmd)}")
        p = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=ROOT))
        if p.returncode == 0:
            with open(jf.name) as f:
                res["transports"] = json.load(f)
        else:
            res["transports"] = {"error": f"bench/transports.py exited with {p.returncode}"}


# -- end to end over SFTP against makedumpfile | ssh -------------------------------------------
def run_e2e(args, res: dict) -> None:
    from bench.sftp_e2e import measure_all
    from tests.vmkit import get_sample

    samples = [(f"{mib} MiB guest", str(get_sample(mib).path)) for mib in args.e2e_samples]
    res["e2e"] = measure_all(samples, args.runs, args.cpus, args.scratch, log)


# -- report ---------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _fresh_memory_cell(probe: dict | None) -> str:
    if not probe:
        return "not measured"
    rep = probe["reporting"]
    how = (
        "free page reporting "
        + ", ".join(f"{k} {v}" for k, v in rep.items())
        + " (virtio-balloon: freed memory goes back to the host)"
        if rep
        else "no free page reporting"
    )
    return (
        f"{how}; writing {probe['mib']} MiB into a new tmpfs file took "
        f"{min(probe['wall'])}-{max(probe['wall'])} s ({min(probe['system'])}-"
        f"{max(probe['system'])} s of system time) over {len(probe['wall'])} rounds at the "
        "start (the transport servers and every output file write into new memory)"
    )


def _settled_cell(m: dict) -> str:
    """What measure.settled_memory did for this run, and what new memory cost then."""
    info = m.get("settled")
    text = measure.settled_text(info)
    if not info or "order_during" not in info:
        return text
    probe = m.get("settled_probe")
    if probe:
        text += (
            f"; then writing {probe['mib']} MiB into a new tmpfs file took "
            f"{min(probe['wall'])}-{max(probe['wall'])} s"
        )
    return text + " (bench/measure.py settled_memory; `--fresh-memory` leaves it on)"


def report(args, res: dict) -> str:
    m = res["machine"]
    L = [
        "# Benchmark results (issue 9: speed and scale on one CPU)",
        "",
        f"Written by `python3 bench/run.py {' '.join(sys.argv[1:])}` on {m['date']}; nothing "
        "here is edited by hand.",
        "",
        "| machine | |",
        "|---|---|",
        f"| host | {m['host']}: {m['cpu']}, {m['cpus']} CPUs, {m['mem_mib']} MiB, Linux "
        f"{m['kernel']} |",
        f"| software | Python {m['python']}, {m['makedumpfile']}, zstd {m['zstd']}, zlib "
        f"{m['zlib']} |",
        f"| makedumpfile with zstd (`-z`) | {_zstd_cell(m)} |",
        f"| commit | {m['commit']} |",
        f"| page loops | {m['accelerator']} |",
        f"| pinning | first {args.cpus} CPU(s) (`{' '.join(measure.pin(args.cpus))}`); medians "
        f"of {args.runs} interleaved runs; peak RSS from GNU time (max over runs) |",
        f"| load average | {res['load'][0]} at start, {res['load'][1]} at end (1, 5, 15 min) |",
        f"| fresh memory | {_fresh_memory_cell(m.get('fresh_memory'))} |",
        f"| memory during the run | {_settled_cell(m)} |",
        f"| sections reused from an earlier run | {', '.join(res.get('reused', [])) or 'none'} |",
        "",
        "Our Python runs as `python3 -S` with PYTHONPATH set, as in the capture kernel "
        "(whose initramfs has no site-packages start-up hooks; this machine's .pth files "
        "cost ~50 ms of CPU per start). `zstd`/`compressed`/`ELF` rows time our format "
        "writer alone (bench/writer.py), like makedumpfile writing the file; `save` rows "
        "time the whole `kdump-capture save` (dmesg, checksum, fsync, README, manifest): "
        "XXH3-128 by default, SHA-256 with `KDUMP_CHECKSUM=sha256`. Before every run of the "
        "formats tables, ours and the reference's alike, the sample is read once (`cat`) so "
        "that all of it is in the page cache: the ELF -d 0 and `cp` rows write as much as "
        "they read and would push part of it out for the next run.",
        "",
    ]
    goals: list[tuple[str, str, str, bool]] = []
    for f in res.get("formats", []):
        cases = {c["name"]: c for c in f["cases"]}

        def med(name: str, key: str = "wall", cases=cases) -> float:
            vals = sorted(s[key] for s in cases[name]["samples"])
            return vals[len(vals) // 2]

        L += [
            f"## Formats: {f['label']} ({f['size'] / 1e6:.0f} MB, `{f['src']}`)",
            "",
            f"Load average {f['load'][0]} before, {f['load'][1]} after.",
            "",
            "| case | wall s (median) | CPU s (median) | all runs (wall s) | output MB "
            "| peak RSS MiB | command |",
            "|---|---:|---:|---|---:|---:|---|",
        ]
        for c in f["cases"]:
            runs = ", ".join(f"{s['wall']:.2f}" for s in c["samples"])
            rss = max(s["rss_mib"] for s in c["samples"])
            shown = " ".join(c["argv"]).replace(f["src"], "VMCORE").replace(ROOT + "/", "")
            shown = re.sub(r"/\S*bench-formats-\w+", "SCRATCH", shown)
            L.append(
                f"| {c['name']} | {med(c['name']):.3f} | {med(c['name'], 'cpu'):.3f} | {runs} | "
                f"{med(c['name'], 'size') / 1e6:.1f} | {rss:.1f} | `{shown}` |"
            )
        L += ["", "| goal | figure | met |", "|---|---|---|"]
        small = f["label"].startswith("512")
        for ours, ref, limit in FORMAT_GOALS:
            if ours not in cases:  # results from before the case existed (--reuse)
                continue
            lim = 2.0 if small else limit
            r = med(ours) / med(ref)
            ok = r <= lim
            text = f"{ours} <= {lim:.1f}x `{ref}`"
            L.append(
                f"| {text} | {r:.2f}x ({med(ours):.3f} / {med(ref):.3f} s) | "
                f"{'yes' if ok else '**no**'} |"
            )
            goals.append((f["label"], text, f"{r:.2f}x", ok))
        zs, cs = med("zstd -d 31", "size"), med("makedumpfile -c -d 31", "size")
        ok = zs <= cs
        L.append(
            f"| zstd -d 31 size <= `-c -d 31` size | {zs / cs:.3f}x | {'yes' if ok else '**no**'} |"
        )
        goals.append((f["label"], "zstd -d 31 size <= -c -d 31", f"{zs / cs:.3f}x", ok))
        L.append(
            f"| compressed -d 31 byte-identical to `-c -d 31` | "
            f"{'identical' if f['identical'] else 'differs'} | "
            f"{'yes' if f['identical'] else '**no**'} |"
        )
        goals.append((f["label"], "compressed -d 31 byte-identical", "", f["identical"]))
        L += same_codec_lines(f, cases, med)
        L += checksum_context_lines(cases, med)
        L += codec_floor_lines(f.get("codec_floor", {}), med, f.get("startup_cpu"))
        L += measure.profile_lines(f["profiles"])
        L.append("")
    if res.get("scale"):
        L += scale_report(res["scale"], goals)
    if res.get("memory"):
        from bench.memory import report_lines

        L += report_lines(res["memory"], goals)
    if res.get("transports"):
        L += transport_report(res["transports"], goals)
    if res.get("e2e"):
        from bench.sftp_e2e import report_lines as e2e_lines

        L += e2e_lines(res["e2e"], goals)
    L += ["## Goals", "", "| where | goal | figure | met |", "|---|---|---|---|"]
    for where, text, fig, ok in goals:
        L.append(f"| {where} | {text} | {fig} | {'yes' if ok else '**no**'} |")
    L += ["", "Plots: " + ", ".join(f"`bench/results/{p}`" for p in res.get("plots", []))]
    return "\n".join(L) + "\n"


def checksum_context_lines(cases: dict, med) -> list[str]:
    """The default save beside the same save with SHA-256: what that checksum costs."""
    L = []
    for ours, ref, default in CHECKSUM_CONTEXT:
        if not {ours, ref, default} <= cases.keys():
            continue
        r = med(ours) / med(ref)
        L += [
            "",
            f"Not an issue goal: `{ours}`, the same save with `KDUMP_CHECKSUM=sha256`, "
            f"takes {r:.2f}x `{ref}` ({med(ours):.3f} / {med(ref):.3f} s; CPU "
            f"{med(ours, 'cpu'):.3f} s against {med(default, 'cpu'):.3f} s with the default "
            "XXH3-128).",
        ]
    return L


def _zstd_cell(m: dict) -> str:
    if "makedumpfile_zstd" not in m:  # results from before the bench looked for one
        return "not looked for"
    if not m["makedumpfile_zstd"]:
        return (
            "none found (Debian's is built without zstd; bench/makedumpfile_zstd.py builds one "
            "from makedumpfile's source): the `-z` rows are left out"
        )
    return (
        f"{m['makedumpfile_zstd']}: built from the source of the same release with "
        "USEZSTD=on (bench/makedumpfile_zstd.py), as Debian's is built without zstd"
    )


def same_codec_lines(f: dict, cases: dict, med) -> list[str]:
    """Our lzo and zstd formats beside makedumpfile writing the same codec (-l, -z): what
    our writer costs around the codec, apart from the codec."""
    rows = [(o, r) for o, r, _ in SAME_CODEC if o in cases and r in cases]
    if not rows:
        return []
    same = f.get("identical_same_codec", {})
    with_z = any(r.startswith("makedumpfile -z") for _, r in rows)
    L = [
        "",
        "Not an issue goal: our `lzo` format against makedumpfile `-l`, the same codec "
        "(lzo1x_1)"
        + (
            ", and our `zstd` format against makedumpfile `-z` (zstd level 1, a frame per "
            "page, what makedumpfile writes with zstd). The zstd goals above compare our zstd "
            "with `-l`; these rows show what makedumpfile's own zstd takes on the same pages"
            if with_z
            else ""
        )
        + ". When `identical`, the same bytes; what is left is our writer around the codec.",
        "",
        "| case | ratio | output | byte-identical |",
        "|---|---|---:|---|",
    ]
    for ours, ref in rows:
        r = med(ours) / med(ref)
        size = med(ours, "size") / med(ref, "size")
        ident = {True: "identical", False: "**differs**"}.get(same.get(ours), "not checked")
        L.append(
            f"| {ours} vs `{ref}` | {r:.2f}x ({med(ours):.3f} / {med(ref):.3f} s) | "
            f"{size:.3f}x | {ident} |"
        )
    notes = []
    for level in ("31", "1"):
        z, lz = f"makedumpfile -z -d {level}", f"makedumpfile -l -d {level}"
        if z in cases and lz in cases:
            r = med(z) / med(lz)
            notes.append(
                f"- Level {level}: makedumpfile's own zstd takes {r:.2f}x its lzo (`-z` / `-l`: "
                f"{med(z):.3f} / {med(lz):.3f} s)"
                + (
                    ": the zstd goal's limit (no slower than `-l`) is one makedumpfile misses "
                    "too, with the same codec and the same bytes."
                    if r > 1.0
                    else "."
                )
            )
    return L + ([""] + notes if notes else [])


def codec_floor_lines(floors: dict, med, startup: float | None = None) -> list[str]:
    """What the codecs alone cost on the dump's pages, against makedumpfile -l's whole run
    (time) and zlib's stored bytes (size): the frontier that bounds the zstd goals."""
    if not floors:
        return []
    L = [
        "",
        "The codec alone (`bench/codec_floor.py VMCORE LEVEL`, pinned alike): the pages this "
        "level dumps, compressed one page at a time by the C libraries with no Python "
        "between pages, best CPU time of 3. LZO1X-1 is what makedumpfile `-l` writes, zstd "
        "level 1 what our zstd format writes (levels 2 and 3 store less, negative levels run "
        "faster; tuning zstd's parameters found nothing better than these), "
        "zlib level 1 what `-c` writes (here through Python's zlib module, page by page), "
        "and the same bytes from our own deflate (the accelerator's loop, what our "
        "compressed format runs). A codec *meets both* when "
        "its CPU time alone is no more than makedumpfile `-l`'s whole run (reading, "
        "filtering, compressing and writing) and it stores no more bytes than zlib: a zstd "
        "setting that misses either cannot meet the zstd goals (time of `-l`, size of `-c`) "
        "whatever the code around it does. The whole run's time compared is its median CPU "
        "time (user + system), which waiting for a CPU on this shared machine does not "
        "inflate as it does the wall time (shown too); on one idle CPU the two differ by a "
        "few percent.",
        "",
        "| level | pages | codec | CPU s | makedumpfile -l whole run: CPU s (wall s) "
        "| stored MB | stored / zlib's | meets both |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    said = []
    for level, fl in floors.items():
        if "error" in fl:
            L.append(f"| {level} | | codec_floor failed: {fl['error']} | | | | | |")
            continue
        mdf = f"makedumpfile -l -d {level}"
        ref = med(mdf, "cpu")
        whole = f"{ref:.3f} ({med(mdf):.3f})"
        zlib_bytes = fl["codecs"].get("zlib level 1", {}).get("bytes")
        for name, c in fl["codecs"].items():
            if "error" in c:
                L.append(f"| {level} | {fl['pages']} | {name}: {c['error']} | | {whole} | | | |")
                continue
            rel = f"{c['bytes'] / zlib_bytes:.3f}x" if zlib_bytes else "?"
            ok = meets_both(c, ref, zlib_bytes)
            L.append(
                f"| {level} | {fl['pages']} | {name} | {c['cpu_s']:.3f} | {whole} | "
                f"{c['bytes'] / 1e6:.1f} | {rel} | {'yes' if ok else 'no'} |"
            )
        said += [lzo_share(level, fl["codecs"], ref), codec_verdict(level, fl["codecs"], ref)]
        said.append(around_codec(level, fl["codecs"], med, startup))
    codecs = [c for fl in floors.values() for c in fl.get("codecs", {}).values()]
    notes = list(dict.fromkeys(c["note"] for c in codecs if c.get("note")))
    if notes:  # which library, and whether LZO ran in our C loop or python-lzo
        said.append("Measured with " + "; ".join(notes) + ".")
    L.append("")
    L += [f"- {s}" for s in said]
    return L


def meets_both(c: dict, ref_s: float, zlib_bytes: int | None) -> bool:
    """A codec alone no slower than makedumpfile -l's whole run and no larger than zlib."""
    return zlib_bytes is not None and c["cpu_s"] <= ref_s and c["bytes"] <= zlib_bytes


def lzo_share(level: str, codecs: dict, ref_s: float) -> str:
    """How much of makedumpfile -l's whole run its codec (LZO1X-1) alone takes."""
    c = codecs.get("LZO1X-1")
    if c is None or "error" in c:
        return f"Level {level}: LZO1X-1 {c['error'] if c else 'not measured'}."
    return (
        f"Level {level}: LZO1X-1 alone takes {c['cpu_s']:.3f} s, "
        f"{100 * c['cpu_s'] / ref_s:.0f}% of makedumpfile -l's whole run "
        f"({ref_s:.3f} s CPU), and stores {c['bytes'] / 1e6:.1f} MB."
    )


def around_codec(level: str, codecs: dict, med, startup: float | None = None) -> str:
    """Where the zstd gap is: the code around each side's codec against the codecs alone.

    A run's median CPU time less its codec's alone (zstd level 1 for ours, LZO1X-1 for
    makedumpfile -l) is what starting, reading, filtering, packing and writing cost it,
    roughly: the codec alone ran on the same pages copied into one buffer, in another
    process (and python-zstandard's libzstd, not the system's one our accelerator links).
    ``startup`` is our writer's start-up alone (interpreter, imports, accelerator)."""
    z, lz = codecs.get("zstd level 1", {}), codecs.get("LZO1X-1", {})
    if "cpu_s" not in z or "cpu_s" not in lz:
        return f"Level {level}: no split of the zstd gap (a codec was not measured)."
    ours, ref = med(f"zstd -d {level}", "cpu"), med(f"makedumpfile -l -d {level}", "cpu")
    a_ours, a_ref = ours - z["cpu_s"], ref - lz["cpu_s"]
    codec_gap = z["cpu_s"] - lz["cpu_s"]
    head = (
        f"Level {level}, around the codec (a run's CPU time less its codec's alone): our "
        f"zstd run {a_ours:.3f} s ({ours:.3f} less zstd level 1's {z['cpu_s']:.3f}), "
        f"makedumpfile -l {a_ref:.3f} s ({ref:.3f} less LZO1X-1's {lz['cpu_s']:.3f}); "
        f"the codecs alone differ by {codec_gap:.3f} s and the whole runs by {ours - ref:.3f} s"
    )
    if ours <= ref:
        return head + "."
    if a_ours <= a_ref:
        return head + (
            ": the code around our codec costs less than makedumpfile's, so the gap is the codec's."
        )
    extra = a_ours - a_ref
    more = f": the code around our codec costs {extra:.3f} s more than makedumpfile's"
    if startup is None:
        return head + more + ", which is ours to find; the rest of the gap is the codec's."
    if extra <= startup:
        return head + (
            f"{more}, no more than our start-up alone (interpreter, imports and accelerator: "
            f"{startup:.3f} s); the rest of the gap is the codec's."
        )
    return head + (
        f"{more}: {startup:.3f} s of it is our start-up alone (interpreter, imports and "
        f"accelerator) and {extra - startup:.3f} s is ours to find; the rest of the gap is "
        "the codec's."
    )


def codec_verdict(level: str, codecs: dict, ref_s: float) -> str:
    """One sentence from the figures: does any zstd setting alone meet both goals?"""
    zlib_bytes = codecs.get("zlib level 1", {}).get("bytes")
    if zlib_bytes is None:
        return f"Level {level}: zlib not measured, so no verdict on size."
    zstd = {n: c for n, c in codecs.items() if n.startswith("zstd") and "error" not in c}
    if not zstd:
        return f"Level {level}: zstd not measured."
    good = [n for n, c in zstd.items() if meets_both(c, ref_s, zlib_bytes)]
    if good:
        return (
            f"Level {level}: {', '.join(good)} meet{'s' if len(good) == 1 else ''} both: "
            "the codec does not bound the zstd goals here."
        )
    small = [(c["cpu_s"], n) for n, c in zstd.items() if c["bytes"] <= zlib_bytes]
    fast = [(c["bytes"], n) for n, c in zstd.items() if c["cpu_s"] <= ref_s]
    parts = []
    if small:
        t, n = min(small)
        parts.append(
            f"the fastest no larger than zlib ({n}) takes {t:.3f} s, "
            f"{t / ref_s:.2f}x makedumpfile -l's whole run"
        )
    else:
        parts.append("none stores as little as zlib")
    if fast:
        b, n = min(fast)
        parts.append(
            f"the smallest no slower than that run ({n}) stores {b / zlib_bytes:.2f}x zlib's bytes"
        )
    else:
        t, n = min((c["cpu_s"], n) for n, c in zstd.items())
        parts.append(f"none is as fast as that run (the fastest, {n}, takes {t / ref_s:.2f}x)")
    return (
        f"Level {level}: no zstd setting meets both ({len(zstd)} measured): "
        + "; ".join(parts)
        + ": at this level the zstd goal (time of `-l`, size of `-c`) is bound by the codec, "
        "not by the code around it."
    )


def scale_report(rows: list[dict], goals: list) -> list[str]:
    L = [
        "## Scale: synthetic machines (tests/bigcore.py, sparse files)",
        "",
        "RAM from 1 MiB with a hole from 2 to 4 GiB, SPARSEMEM vmemmap of 64-byte struct "
        "pages, a 6.1 kernel's VMCOREINFO; 2 MiB regions of free buddy blocks (order 10), "
        "page-cache folios, anonymous THPs, hugetlb, order-0 cache/anon, slab, kernel pages "
        "(many zero). Ours: the whole save. `walk` = struct-page walk (ours: the log line; "
        "makedumpfile: its STEP [Excluding unnecessary pages] times, both passes).",
        "",
        "Before every run, of ours and of makedumpfile alike, the input is settled "
        "(`bench/measure.py` `settle_sparse`): its data extents read (warm, as the real "
        "samples are) and its holes dropped from the page cache. A read of a hole allocates "
        "a zero-filled page-cache page and readahead "
        f"({_readahead_kb()} KiB here) reads holes around every page read: without this, "
        "one run of a 256 GiB bigcore filled this machine's page cache and evicted the data "
        "the next run read back from disk, and wall time per GiB more than doubled from "
        "64 to 256 GiB for both tools. So every run, of every size, starts alike and pays "
        "the same per GiB: the kernel allocating and zeroing the hole pages that its reads "
        "and readahead touch (one makedumpfile run at 256 GiB: 27 s of system time "
        "beside 12.5 s of user time). /proc/vmcore has no page cache and no such cost, "
        "so these figures are slower than a capture kernel's, for makedumpfile as for us. "
        "`CPU s` (user + system, GNU time) shows what waiting on the disk or on other "
        "processes added to `wall s` on this shared machine (see the load averages).",
        "",
        "| RAM | file on disk | level | case | wall s | CPU s | runs | peak RSS MiB | output MB |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        disk = _disk_mib(r)
        for level, lv in r["levels"].items():
            for c in lv["cases"]:
                cpu = _cpu(c)
                L.append(
                    f"| {r['gib']} GiB | {disk} | {level} | {c['name']} | {c['wall']:.2f} | "
                    f"{cpu:.2f} | {lv['runs']} | {c['rss']:.1f} | {c['size'] / 1e6:.1f} |"
                )
    L.append("")
    for r in rows:
        st = r.get("settle")
        settled = (
            f"; settling read {st['data_mib']} MiB in {st['extents']} extents ({st['s']:.1f} s)"
            if st
            else ""
        )
        L.append(f"- {r['gib']} GiB: load average {' -> '.join(r['load'])}{settled}")
    for r in rows:
        for lv in r["levels"].values():
            for name, err in lv.get("errors", {}).items():
                L.append(f"\n{r['gib']} GiB, {name}: FAILED: {err}")
    L += ["", "| RAM | level 31: walk ours / makedumpfile | ratio |", "|---:|---|---:|"]
    worst_walk = 0.0
    for r in rows:
        lv = r["levels"].get(31) or r["levels"].get("31")
        if lv and lv["walk_ours"] is not None and lv["walk_mdf"]:
            q = lv["walk_ours"] / lv["walk_mdf"]
            worst_walk = max(worst_walk, q)
            L.append(
                f"| {r['gib']} GiB | {lv['walk_ours']:.3f} / {lv['walk_mdf']:.3f} s | {q:.2f}x |"
            )
    measured = worst_walk > 0
    goals.append(
        (
            "scale",
            "struct-page walk <= 2x makedumpfile's",
            f"{worst_walk:.2f}x max" if measured else "not measured",
            measured and worst_walk <= 2.0,
        )
    )
    base = rows[0]
    for level in (31, 1):
        key = level if level in base["levels"] else str(level)
        for ci, name in ((0, "save compressed"), (2, "save zstd")):
            rss0 = base["levels"][key]["cases"][ci]["rss"]
            have = [
                r
                for r in rows[1:]
                if key in r["levels"] and r["levels"][key]["cases"][ci]["samples_ok"]
            ]
            goal = f"-d {level}: peak RSS within 4 MiB of the {base['gib']} GiB case"
            if not have:  # the base against itself proves nothing
                goals.append(
                    ("scale", f"{name} {goal}", f"not measured above {base['gib']} GiB", False)
                )
                continue
            spread = max(r["levels"][key]["cases"][ci]["rss"] for r in have) - rss0
            goals.append(
                (
                    "scale",
                    f"{name} (up to {have[-1]['gib']} GiB) {goal}",
                    f"{spread:+.1f} MiB",
                    spread <= 4.0,
                )
            )
        big = [
            r
            for r in rows
            if r["gib"] >= 64 and key in r["levels"] and r["levels"][key]["cases"][0]["samples_ok"]
        ]
        if len(big) >= 2:
            a, b = big[0], big[-1]
            wa = a["levels"][key]["cases"][0]["wall"] / a["gib"]
            wb = b["levels"][key]["cases"][0]["wall"] / b["gib"]
            ca, cb = (_cpu(r["levels"][key]["cases"][0]) / r["gib"] for r in (a, b))
            figure = f"{wb:.4f} vs {wa:.4f} s/GiB (CPU {cb:.4f} vs {ca:.4f}"
            ua, ub = (r["levels"][key]["cases"][0].get("user_s") for r in (a, b))
            if ua and ub:
                ua, ub = (statistics.median(u) / r["gib"] for u, r in ((ua, a), (ub, b)))
                figure += f"; user {ub:.4f} vs {ua:.4f}"
            ref = [r["levels"][key]["cases"][1]["wall"] / r["gib"] for r in (a, b)]
            figure += f"; makedumpfile {ref[1] / ref[0]:.2f}x)"
            goals.append(
                (
                    "scale",
                    f"save compressed -d {level}: time linear in RAM "
                    f"(s per GiB at {b['gib']} vs {a['gib']} GiB, within 1.5x)",
                    f"{wb / wa:.2f}x: {figure}",
                    wb <= 1.5 * wa,
                )
            )
    for level in (31, 1):
        big = [r for r in rows if r["gib"] >= 64 and level in r["levels"]]
        if not big:
            continue
        cases = big[0]["levels"][level]["cases"]
        split = all(c.get("user_s") for r in big for c in r["levels"][level]["cases"])
        L += [
            "",
            f"Seconds per GiB of RAM, wall / CPU{' (user + system)' if split else ''} "
            f"(level {level}; linear means the same figure at every size):",
            "",
            "| RAM | " + " | ".join(c["name"] for c in cases) + " |",
            "|---:|" + "---:|" * len(cases),
        ]
        for r in big:
            cells = []
            for c in r["levels"][level]["cases"]:
                g = r["gib"]
                cell = f"{c['wall'] / g:.3f} / {_cpu(c) / g:.3f}"
                if split:
                    user, system = (statistics.median(c[k]) / g for k in ("user_s", "sys_s"))
                    cell += f" ({user:.3f} + {system:.3f})"
                cells.append(cell)
            L.append(f"| {r['gib']} GiB | " + " | ".join(cells) + " |")
    L.append("")
    return L


def _cpu(c: dict) -> float:
    """Median CPU seconds (user + system) of a case's runs."""
    return statistics.median(c["cpu_s"]) if c.get("cpu_s") else float("nan")


def _readahead_kb() -> str:
    """The readahead of the disk under the bench's scratch directory (the largest one)."""
    sizes = []
    for dev in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{dev}/queue/read_ahead_kb") as f:
                sizes.append(int(f.read()))
        except (OSError, ValueError):
            continue
    return str(max(sizes)) if sizes else "?"


def _disk_mib(r: dict) -> str:
    return f"{r.get('disk_mib', 0)} MiB" if r.get("disk_mib") else "-"


def transport_report(t: dict, goals: list) -> list[str]:
    L = ["## Transports on loopback", ""]
    if "error" in t:
        return L + [t["error"], ""]
    L += [
        f"`{t['command']}` (load {t['load'][0]:.1f} before, {t['load'][1]:.1f} after)",
        "",
        "| transport | ours MB/s | reference | reference MB/s | ratio "
        "| client CPU s: ours | reference | server CPU s: ours | reference |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in t["rows"]:
        r = row["ref_s"] / row["ours_s"]
        cpu = [
            f"{row[k]:.2f}" if k in row else "-"
            for k in ("ours_cpu_s", "ref_cpu_s", "ours_server_cpu_s", "ref_server_cpu_s")
        ]
        goal = row.get("goal", True)  # False: a reference row for context only
        L.append(
            f"| {row['label']} | {row['size'] / row['ours_s'] / 1e6:.1f} | {row['ref_label']} | "
            f"{row['size'] / row['ref_s'] / 1e6:.1f} | {r:.2f}{'' if goal else ' *'} | "
            f"{cpu[0]} | {cpu[1]} | {cpu[2]} | {cpu[3]} |"
        )
        if goal:
            goals.append(
                (
                    "transports",
                    f"{row['label']}: >= 0.9x {row['ref_label']}",
                    f"{r:.2f}x",
                    r >= 0.9,
                )
            )
    if not all(row.get("goal", True) for row in t["rows"]):
        L += ["", t.get("context_note", "\\* context, not a goal")]
    if runs := measure.run_lines(t["rows"]):
        L += ["", *runs]
    notes = t.get("notes", {})
    if notes.get("checksum"):
        L += ["", notes["checksum"]]
    if notes.get("cifs"):
        L += ["", f"CIFS: {notes['cifs']}."]
    L += measure.profile_lines(t.get("profiles", {}))
    L.append("")
    return L


# -- plots ----------------------------------------------------------------------------------------
# A colour per codec in the formats plots, so that each of our rows and its references
# (the same codec: lzo with -l, zstd with -z; the goal's: zstd with -l) read as a family.
CODEC_COLOURS = (
    (("zstd", "-z "), "tab:blue"),
    (("lzo", "-l "), "tab:orange"),
    (("compressed", "-c "), "tab:green"),
    (("ELF -d 31", "-E "), "tab:red"),
    (("-d 0", "cp "), "tab:purple"),
)


def format_style(name: str) -> tuple[str, str]:
    """(colour, marker) of a formats case: its codec's colour; o at -d 31, s at -d 1, ^ for
    the SHA-256 save (beside the default one)."""
    colour = next(
        (c for keys, c in CODEC_COLOURS if any(k in name + " " for k in keys)), "tab:gray"
    )
    marker = "^" if "SHA-256" in name else "s" if name.endswith("-d 1") else "o"
    return colour, marker


def plots(res: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install '.[bench]'): no plots")
        return []
    os.makedirs(RESULTS_DIR, exist_ok=True)
    made = []
    if res.get("formats"):
        for key, ylabel, fname in (
            ("wall", "wall time (s)", "formats_time.png"),
            ("rss_mib", "peak RSS (MiB)", "formats_rss.png"),
        ):
            fig, ax = plt.subplots(figsize=(10, 5.5))
            names = [c["name"] for c in res["formats"][0]["cases"]]
            for name in names:
                xs, ys = [], []
                for f in res["formats"]:
                    c = next((c for c in f["cases"] if c["name"] == name), None)
                    if c is None:
                        continue
                    vals = sorted(s[key] for s in c["samples"])
                    xs.append(f["size"] / 1e9)
                    ys.append(vals[len(vals) // 2] if key == "wall" else vals[-1])
                side = next(c for c in res["formats"][0]["cases"] if c["name"] == name)["side"]
                color, marker = format_style(name)
                ax.plot(
                    xs, ys, "--" if side == "ref" else "-", color=color, marker=marker, label=name
                )
            ax.set_xlabel("vmcore size (GB)")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(
                "real vmcores, one CPU: ours (solid) vs makedumpfile/cp (dashed); "
                "a colour per codec, o: -d 31, s: -d 1"
            )
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            fig.savefig(os.path.join(RESULTS_DIR, fname), dpi=110)
            plt.close(fig)
            made.append(fname)
    if res.get("scale"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for level in (31, 1):
            first = res["scale"][0]["levels"][level]
            have = [r for r in res["scale"] if level in r["levels"]]
            for ci, case in enumerate(first["cases"]):
                xs = [r["gib"] for r in have]
                walls = [r["levels"][level]["cases"][ci]["wall"] for r in have]
                rss = [r["levels"][level]["cases"][ci]["rss"] for r in have]
                style = "--" if case["side"] == "ref" else "-"
                axes[0].plot(xs, walls, style + "o", label=case["name"])
                axes[1].plot(xs, rss, style + "o", label=case["name"])
        for ax, yl in zip(axes, ("wall time (s)", "peak RSS (MiB)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("RAM of the synthetic machine (GiB)")
            ax.set_ylabel(yl)
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        fig.suptitle("synthetic vmcores, one CPU: ours (solid) vs makedumpfile (dashed)")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS_DIR, "scale.png"), dpi=110)
        plt.close(fig)
        made.append("scale.png")
    t = res.get("transports")
    if t and "rows" in t:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = [r for r in t["rows"] if r.get("goal", True)]  # one bar pair per transport
        labels = [r["label"] for r in rows]
        ours = [r["size"] / r["ours_s"] / 1e6 for r in rows]
        ref = [r["size"] / r["ref_s"] / 1e6 for r in rows]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], ref, 0.4, label="reference client")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("MB/s (loopback)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS_DIR, "transports.png"), dpi=110)
        plt.close(fig)
        made.append("transports.png")
    return made


def _save_raw(path: str, res: dict) -> None:
    """Figures so far (a later section failing keeps them)."""
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)


def run_sections(args, res: dict, skip: set[str]) -> None:
    """Every section not skipped or reused, in order; raw.json after each."""
    if res["machine"]["accelerator"].startswith("pure Python"):
        log(
            f"warning: {res['machine']['accelerator']}: build it with "
            "'python3 setup.py build_ext --inplace' to measure the compiled path"
        )
    from tests.vmkit import get_sample

    reuse = set(filter(None, args.reuse.split(",")))
    if reuse:
        with open(os.path.join(RESULTS_DIR, "raw.json")) as f:
            old = json.load(f)
        for name in reuse:
            res[name] = old.get(name, res.get(name))
            skip.add(name)
        for row in res.get("scale", []):  # JSON made the level keys strings
            row["levels"] = {int(k): v for k, v in row["levels"].items()}
        res["reused"] = sorted(reuse)
    if "formats" not in skip:
        samples = []
        for mib in [int(x) for x in args.samples.split(",") if x]:
            s = get_sample(mib)
            samples.append((f"{mib} MiB guest", str(s.path)))
        run_formats(args, samples, res)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    raw = os.path.join(RESULTS_DIR, "raw.json")
    sections = (
        ("scale", run_scale),
        ("memory", run_memory),
        ("transports", run_transports),
        ("e2e", run_e2e),
    )
    for name, fn in sections:
        _save_raw(raw, res)
        if name not in skip:
            fn(args, res)
    if "fitness" not in skip:
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "capture_fitness.py")],
            env=dict(os.environ, PYTHONPATH=ROOT),
            check=False,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset in under three minutes")
    ap.add_argument("--cpus", type=int, default=1, help="pin to the first N CPUs (default 1)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scratch", default=None, help="directory for outputs and bigcores")
    ap.add_argument("--samples", default="512,2048,8192", help="real samples (MiB of guest RAM)")
    ap.add_argument("--scale", default="1,64,256,1024", help="bigcore sizes in GiB")
    ap.add_argument(
        "--scale-l1-full",
        type=int,
        default=64,
        help="level 1 gets --runs runs up to this size, one run above",
    )
    ap.add_argument(
        "--scale-l1-max", type=int, default=1 << 20, help="no level 1 above this size (GiB)"
    )
    ap.add_argument("--scale-runs", type=int, default=None, help="runs per scale case")
    ap.add_argument(
        "--scale-one-run", type=int, default=1 << 20, help="one run per case from this size (GiB)"
    )
    ap.add_argument(
        "--reuse",
        default="",
        help="sections to take from bench/results/raw.json of an earlier run instead of running",
    )
    ap.add_argument("--memory-sizes", default="1,16", help="bigcore sizes (GiB) for memory")
    ap.add_argument("--transport-mb", type=int, default=1024)
    ap.add_argument(
        "--e2e-samples", default="512,2048", help="real samples (MiB) for the SFTP end to end"
    )
    ap.add_argument(
        "--skip", default="", help="sections to skip: formats,scale,memory,transports,e2e,fitness"
    )
    ap.add_argument("--keep-bigcores", action="store_true")
    ap.add_argument(
        "--makedumpfile-zstd",
        default=None,
        metavar="PATH",
        help="a makedumpfile built with zstd, the reference of our zstd format's same-codec "
        "rows (default: makedumpfile on PATH if it writes zstd, else the one "
        "bench/makedumpfile_zstd.py builds; without one those rows are left out)",
    )
    ap.add_argument(
        "--fresh-memory",
        action="store_true",
        help="leave free page reporting as it is (by default the bench turns it off while it "
        "runs and writes the free memory once first: see measure.settled_memory)",
    )
    ap.add_argument("--keep-below", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    asked = args.makedumpfile_zstd
    args.makedumpfile_zstd = measure.zstd_makedumpfile(asked)
    if asked and not args.makedumpfile_zstd:
        ap.error(f"--makedumpfile-zstd {asked}: not a makedumpfile that writes zstd (-v)")
    if args.scratch:
        os.makedirs(args.scratch, exist_ok=True)
    measure.precompile()
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        args.samples, args.scale, args.memory_sizes = "512", "1,4", "1,4"
        args.scale_l1_full = 1
        skip |= {"transports", "e2e", "fitness"}
    args.scale = [int(x) for x in args.scale.split(",") if x]
    args.scale_runs = args.scale_runs or args.runs
    args.memory_sizes = [int(x) for x in args.memory_sizes.split(",") if x]
    args.e2e_samples = [int(x) for x in args.e2e_samples.split(",") if x]
    res: dict = {"machine": machine(), "load": [load()], "formats": [], "scale": []}
    mdz = args.makedumpfile_zstd
    res["machine"]["makedumpfile_zstd"] = (
        f"{mdz} ({measure.makedumpfile_version(mdz)})" if mdz else None
    )
    res["machine"]["fresh_memory"] = fresh_memory_probe()
    # --quick keeps to its three minutes: writing all free memory can take a minute
    with measure.settled_unless(args.fresh_memory, log=log, touch=not args.quick) as settled:
        res["machine"]["settled"] = settled
        if settled and "order_during" in settled:  # what new memory costs now
            res["machine"]["settled_probe"] = fresh_memory_probe()
        run_sections(args, res, skip)
    res["load"].append(load())
    res["plots"] = plots(res)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "raw.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    text = report(args, res)
    with open(RESULTS, "w") as f:
        f.write(text)
    log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
