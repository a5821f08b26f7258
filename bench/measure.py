"""How the bench runs one command: pinned to CPUs, timed, peak RSS from a small launcher.

Peak RSS comes from GNU time (``/usr/bin/time``), a small C program that forks and execs
the command and reads its rusage: the figure is the command's own, not the bench's (a
child forked from a large parent starts with the parent's resident pages counted).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = shutil.which("time") or "/usr/bin/time"


# Debian's makedumpfile (1.7.2) is built without zstd: it ignores -z. The same release built
# from its source with USEZSTD=on (bench/makedumpfile_zstd.py) is looked for here, to time
# our zstd format against makedumpfile writing the same codec.
MAKEDUMPFILE_ZSTD = os.path.expanduser("~/.cache/kdump-capture/makedumpfile-zstd/makedumpfile")


def makedumpfile_v(binary: str = "makedumpfile") -> list[str]:
    """The lines of ``binary -v``: its version, then which codecs it was built with ([] when
    it does not run)."""
    try:
        p = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return p.stdout.splitlines()


def makedumpfile_version(binary: str = "makedumpfile") -> str:
    """``binary -v``'s first line ("makedumpfile: version 1.7.2 (...)"), "" if none."""
    return next(iter(makedumpfile_v(binary)), "").strip()


def has_zstd(binary: str) -> bool:
    """Whether this makedumpfile writes zstd pages (``-v`` lists "zstd<TAB>enabled")."""
    return any(line.split() == ["zstd", "enabled"] for line in makedumpfile_v(binary))


def zstd_makedumpfile(explicit: str | None = None) -> str | None:
    """A makedumpfile that writes zstd: ``explicit``, else the one on PATH, else the one
    bench/makedumpfile_zstd.py builds; None when none does."""
    for cand in [explicit] if explicit else ["makedumpfile", MAKEDUMPFILE_ZSTD]:
        path = shutil.which(cand)
        if path and has_zstd(path):
            return os.path.abspath(path)
    return None


def site_packages() -> str:
    import zstandard

    return os.path.dirname(os.path.dirname(zstandard.__file__))


def precompile() -> None:
    """Compile our packages to .pyc files before anything is timed.

    A capture image carries .pyc files only (initramfs/runtime.py compiles them when it
    builds the image), so the capture kernel never compiles our sources. With
    PYTHONDONTWRITEBYTECODE set (as on these machines) and no __pycache__ in the tree,
    every timed run would compile them instead: ~30 ms of CPU for the format writer alone
    (bench/writer.py, measured on main at a65b9c1), start-up that the capture
    kernel does not spend.
    """
    import compileall

    for pkg in ("kdump_capture", "transports", "bench"):
        compileall.compile_dir(os.path.join(ROOT, pkg), quiet=1)


def python_cmd() -> list[str]:
    """Our interpreter as the capture kernel runs it: no site-packages start-up hooks.

    The capture initramfs packs only the modules it imports; this machine's site-packages
    also has .pth files (editable installs, certificate hooks) that cost ~50 ms of CPU at
    every start. ``-S`` skips them; PYTHONPATH (see ``env()``) puts ours and the
    dependencies on the path.
    """
    return [sys.executable, "-S"]


def save_args(
    src: str, url: str, fmt: str, level: int, config: str = "/dev/null", extra=()
) -> list[str]:
    """``kdump-capture save`` of ``src`` into ``url`` as every bench runs it (after the
    interpreter): no reboot, no free-space margin, no rotation, quiet."""
    sets = {
        "KDUMP_SAVEDIR": url,
        "KDUMP_DUMPFORMAT": fmt,
        "KDUMP_DUMPLEVEL": str(level),
        "KDUMP_FREE_DISK_SIZE": "0",
        "KDUMP_VERBOSE": "0",
        "KDUMP_KEEP_OLD_DUMPS": "0",
    }
    args = ["-m", "kdump_capture", "save", "--config", config, "--vmcore", src, "--no-reboot"]
    for name, value in sets.items():
        args += ["--set", f"{name}={value}"]
    return [*args, *extra]


def sftp_config(work: str, srv) -> str:
    """A 0600 config in ``work`` that trusts the test sshd ``srv``'s host key and logs in with
    its client key (what a save to that server needs beyond the URL)."""
    conf = os.path.join(work, "kdump.conf")
    with open(conf, "w") as f:
        f.write(f'KDUMP_HOST_KEY="{srv.host_key}"\nKDUMP_SSH_IDENTITY="{srv.client_key}"\n')
    os.chmod(conf, 0o600)
    return conf


def profile_lines(profiles: dict[str, str]) -> list[str]:
    """Report lines for the cProfile summaries of the cases whose goal was missed."""
    L: list[str] = []
    for name, prof in profiles.items():
        L += [
            "",
            f"cProfile of `{name}` (goal missed; one run, top functions by own time):",
            "",
            "```",
            prof,
            "```",
        ]
    return L


def run_lines(rows: list[dict]) -> list[str]:
    """Every run's wall time under the table: the servers' own speed varies from run to run
    (smbd's CPU for the same upload: 0.38 s in some sets, 0.56 s in others), which a median
    alone hides. Each client once."""
    seen: dict[str, list[float]] = {}
    for row in rows:
        for key, runs in ((f"ours, {row['label']}", "ours_runs"), (row["ref_label"], "ref_runs")):
            if row.get(runs) and key not in seen:
                seen[key] = row[runs]
    if not seen:
        return []  # results from before the runs were kept
    return [
        "Wall time of every run, in the order they ran (s): "
        + "; ".join(f"{k}: {', '.join(f'{t:.2f}' for t in v)}" for k, v in seen.items())
        + "."
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, site_packages()])
    e.pop("KDUMP_CAPTURE_PURE_PYTHON", None)
    return e


@dataclass
class Sample:
    wall: float
    rss_mib: float
    cpu: float  # user + system
    size: int = 0
    stderr: str = ""
    user: float = 0.0  # the two parts of cpu, as GNU time gives them
    system: float = 0.0


@dataclass
class Case:
    name: str
    argv: list[str]
    output: str | None = None  # file (or directory) whose size is the result's size
    side: str = "ours"  # "ours" or "ref"
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples) if self.samples else float("nan")

    @property
    def rss(self) -> float:
        return max(s.rss_mib for s in self.samples) if self.samples else float("nan")

    @property
    def size(self) -> int:
        return int(statistics.median(s.size for s in self.samples)) if self.samples else 0

    def shown(self, subst: dict[str, str]) -> str:
        text = shlex.join(self.argv)
        for k, v in subst.items():
            text = text.replace(k, v)
        return text


def pin(cpus: int) -> list[str]:
    return ["taskset", "-c", ",".join(str(c) for c in range(cpus))]


def run(argv: list[str], cpus: int, output: str | None = None, environ=None) -> Sample:
    """Run once: wall time (monotonic, around the launcher), peak RSS and CPU (GNU time)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf, tempfile.TemporaryFile() as err:
        cmd = [*pin(cpus), TIME, "-o", tf.name, "-f", "%M %U %S", *argv]
        t = time.monotonic()
        # stdout too: makedumpfile prints its STEP timings there
        p = subprocess.run(cmd, stdout=err, stderr=err, env=environ or env())
        wall = time.monotonic() - t
        err.seek(0)
        text = err.read().decode(errors="replace")
        if p.returncode:
            raise RuntimeError(f"failed ({p.returncode}): {shlex.join(argv)}\n{text[-2000:]}")
        fields = tf.read().split()[-3:]
    rss_kib, user, sys_ = int(fields[0]), float(fields[1]), float(fields[2])
    return Sample(wall, rss_kib / 1024, user + sys_, _size(output), text[-4000:], user, sys_)


def _size(path: str | None) -> int:
    if not path or not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            if f == "vmcore":
                total += os.path.getsize(os.path.join(d, f))
    return total


def clean(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path)
    elif path and os.path.exists(path):
        os.unlink(path)


def warm(path: str) -> None:
    """Read ``path`` once so that all of it is in the page cache before a run. The ELF -d 0
    and ``cp`` rows write as much as they read: on this machine one round of the 8 GiB
    sample's cases pushed part of the sample out, and the next case read it back from disk
    (always ours: zstd -d 31 comes first in a round). The issue's figures are warm."""
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def sparse_extents(fd: int) -> Iterator[tuple[bool, int, int]]:
    """(is_data, start, end) of every extent of a file, from SEEK_DATA / SEEK_HOLE."""
    off, size = 0, os.fstat(fd).st_size
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            yield False, off, size
            return
        if data > off:
            yield False, off, data
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield True, data, hole
        off = hole


def settle_sparse(path: str) -> tuple[int, int]:
    """Put a sparse input in the same page-cache state before every run: its data warm, its
    holes not cached. Returns (data bytes, extents).

    A read of a file hole allocates a zero-filled page-cache page, and readahead
    (read_ahead_kb, 8 MiB on this VM's disk) reads holes around every page a tool reads:
    -d 31 runs over a 64 GiB bigcore left 14 GiB of it cached (fincore; our save read
    1.6 GiB of it), and a 256 GiB one touches four times as many, more than fits in this
    machine's 23 GiB. So each run evicted the data the next one needed (a random 4 KiB
    read each, from a shared virtual disk) and the page frames of the run's own holes had
    to be reclaimed first: wall time per GiB more than doubled from 64 to 256 GiB, for
    makedumpfile as for us. /proc/vmcore has no page cache at all. Dropping the cached
    holes (POSIX_FADV_DONTNEED on hole ranges only) and reading the data twice (a second
    access moves it to the active LRU list, which the run's own hole pages do not evict
    first) gives both tools the same start: what the real-sample cases get from warm files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    buf = bytearray(1 << 20)
    data = extents = 0
    try:
        for is_data, start, end in sparse_extents(fd):
            extents += 1
            if not is_data:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
                continue
            data += end - start
            for _ in range(2):
                off = start
                while off < end:
                    n = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - off)]], off)
                    if not n:
                        break
                    off += n
    finally:
        os.close(fd)
    return data, extents


def interleave(
    cases: list[Case],
    runs: int,
    cpus: int,
    log: Callable[[str], None] = print,
    before: Callable[[], None] | None = None,
) -> None:
    """Run the cases in turns (ours, reference, ours, ...) ``runs`` times each, so that
    load from other processes hits every case alike. Every run starts with no dirty pages
    (``sync``) and without the previous run's output."""
    for r in range(runs):
        for c in cases:
            clean(c.output)
            if before:
                before()
            subprocess.run(["sync"], check=True)
            try:
                s = run(c.argv, cpus, c.output)
            except RuntimeError as e:  # record it and go on: one case must not end the bench
                c.error = str(e).splitlines()[-1][:300]
                log(f"  run {r + 1} {c.name}: FAILED: {c.error}")
                continue
            c.samples.append(s)
            log(
                f"  run {r + 1} {c.name:36s} {s.wall:7.3f} s {s.size / 1e6:9.1f} MB "
                f"{s.rss_mib:6.1f} MiB"
            )
            clean(c.output)


def profile(argv_after_python: list[str], cpus: int, top: int = 12) -> str:
    """A cProfile summary (top functions by own time) of one run of our command."""
    with tempfile.NamedTemporaryFile(suffix=".prof") as pf:
        cmd = [*python_cmd(), "-m", "cProfile", "-o", pf.name, *argv_after_python]
        subprocess.run(
            [*pin(cpus), *cmd],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        try:
            return _summary(pf.name, top)
        except (OSError, TypeError, EOFError):
            return "(no profile)"


def _summary(stats, top: int) -> str:
    """The call count line and the ``top`` functions by own time of a profile (a file or a
    ``cProfile.Profile``), paths shown relative to the repository."""
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(stats, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    keep = [ln for ln in lines if "function calls" in ln or ln.lstrip()[:1].isdigit()]
    return "\n".join(ln.replace(ROOT + "/", "") for ln in keep)


def profile_threads(fn: Callable[[], None], top: int = 12, share: float = 0.1) -> str:
    """A cProfile summary of ``fn()`` run in this process: the calling thread, then every
    thread started meanwhile (a transport's receive thread, the hashing helper), each with
    its own top functions by own (wall) time; threads that took under ``share`` of the
    calling thread's time are only counted. Threads that start after ``fn`` returns and
    threads that were running before it are not seen."""
    import cProfile
    import pstats
    import re
    import threading

    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def begin(frame, event, arg) -> None:
        # threading calls this on the new thread's first event; from then on cProfile's own
        # hook replaces it there.
        sys.setprofile(None)
        prof = cProfile.Profile()
        with lock:
            profiles.append((threading.current_thread().name, prof))
        prof.enable()

    main = cProfile.Profile()
    threading.setprofile(begin)
    main.enable()
    try:
        fn()
    finally:
        main.disable()
        threading.setprofile(None)
    parts = [f"thread {threading.current_thread().name}:", _summary(main, top)]
    with lock:
        started = list(profiles)
    brief = 0
    for name, prof in started:
        prof.disable()  # only stops it if that thread is this one; the others have ended
        try:
            stats = pstats.Stats(prof)
        except TypeError:  # a thread that recorded nothing: idle, counted as such
            brief += 1
            continue
        if stats.total_tt < share * pstats.Stats(main).total_tt:
            brief += 1
            continue
        # names such as msg_worker-127.0.0.1:PORT: the port differs on every run
        name = re.sub(r":\d+$", "", name)
        parts += ["", f"thread {name}:", _summary(prof, top // 2)]
    if brief:
        parts += ["", f"({brief} more threads, each under {share:.0%} of the first one's time)"]
    return "\n".join(parts)


# -- memory the host takes back ----------------------------------------------------------------
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


def page_orders(buddyinfo: str = "/proc/buddyinfo") -> int:
    """How many block orders the page allocator has: one count per order on each line of
    /proc/buddyinfo after "Node N, zone NAME" (11 on x86_64: orders 0 to 10)."""
    with open(buddyinfo) as f:
        return len(f.readline().split()) - 4


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup lets it add before its limit (its page cache
    counts as used), or None when no limit is set or none can be read (v2, then v1)."""
    text = _read(proc_cgroup)
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and not controllers:  # the unified (v2) hierarchy
            dirs = [f"{root}{path}", f"{root}/unified{path}"]
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            dirs = [f"{root}/memory{path}"]
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for d in dirs:
            limit, used = (_read(f"{d}/{n}") for n in names)
            if limit and used and limit.isdigit() and used.isdigit() and int(limit) < 1 << 60:
                return max(0, int(limit) - int(used))
    return None


def touch_free_memory(margin_mib: int) -> tuple[int, float]:
    """Write all free memory but ``margin_mib`` once (anonymous, then freed): MiB, seconds.
    Within a memory cgroup's limit too, so that a container running the bench is not the
    one killed for it."""
    with open("/proc/meminfo") as f:
        free_mib = next(int(line.split()[1]) for line in f if line.startswith("MemFree:")) >> 10
    room = cgroup_room()
    if room is not None:
        free_mib = min(free_mib, room >> 20)
    size = max(0, free_mib - margin_mib) << 20
    if not size:
        return 0, 0.0
    block = memoryview(bytes(64 << 20))
    start = time.monotonic()
    with mmap.mmap(-1, size) as mm:
        while (left := size - mm.tell()) > 0:
            mm.write(block[:left])
    return size >> 20, round(time.monotonic() - start, 1)


@contextlib.contextmanager
def settled_memory(
    margin_mib: int = 512,
    log: Callable[[str], None] = print,
    path: str = REPORTING_ORDER,
    touch: bool = True,
) -> Iterator[dict]:
    """Free page reporting off while the bench runs, and the free memory backed first.

    Under a virtio balloon that reports free pages (the VMs these benches ran on), every
    free block of the reporting order goes back to the host, which backs it again only when
    the guest next touches it. Writing 1 GiB into new memory then took 0.3 to 6.8 s instead
    of 0.3 s, at random, and the transport servers and every output file write into new
    page cache: one run put smbd's CPU per 1 GB upload at 2.14 s for ours and 0.45 s for
    smbclient (perf: 77% in copying into the page cache), with this done at 0.45 and 0.38 s.
    The bench compares programs, and a capture kernel on bare metal has no balloon.

    So, where reporting is on and this process may change it (root): the order goes past
    the largest block order, so that nothing is reported, then all free memory but
    ``margin_mib`` is written once and freed, so that the host backs it again; the old order
    is back when the block ends (``touch=False`` skips the writing: the first use of memory
    the host already took is slow once, then stays fast). Yields what was done, for the
    report: ``order_before``, and ``order_during``, ``backed_mib`` and ``backed_s`` when it
    turned reporting off, ``already_off`` when reporting was off already (a run inside a
    settled one), or ``error`` when it could not.
    """
    info: dict = {}
    try:
        with open(path) as f:
            old = f.read().strip()
        off = page_orders()
    except (OSError, ValueError):
        yield info  # no free page reporting in this kernel: nothing to settle
        return
    info["order_before"] = old
    if old.lstrip("-").isdigit() and int(old) >= off:
        info["already_off"] = True
        yield info
        return
    try:
        with open(path, "w") as f:
            f.write(str(off))
    except OSError as e:
        info["error"] = f"could not turn free page reporting off ({e.strerror})"
        log(f"warning: {info['error']}: figures may carry the host's page faults")
        yield info
        return
    try:
        info["order_during"] = str(off)
        log(f"free page reporting off (order {old} -> {off})")
        info["backed_mib"], info["backed_s"] = touch_free_memory(margin_mib) if touch else (0, 0)
        if touch:
            log(f"wrote {info['backed_mib']} MiB of free memory in {info['backed_s']} s")
        yield info
    finally:
        with open(path, "w") as f:
            f.write(old)


def settled_unless(fresh: bool, **kw):
    """settled_memory(**kw), or, when ``--fresh-memory`` asked to leave memory alone, a
    block that yields None (which settled_text reports as such)."""
    return contextlib.nullcontext() if fresh else settled_memory(**kw)


def settled_text(info: dict | None) -> str:
    """What settled_memory did, in words for a report; None: it was not asked to."""
    if info is None:
        return "free page reporting left as it was (`--fresh-memory`)"
    if not info:
        return "no free page reporting here: nothing to settle"
    if info.get("already_off"):
        return f"free page reporting already off (order {info['order_before']})"
    if "error" in info:
        return f"{info['error']}: figures may carry the host's page faults"
    backed = (
        f"after writing {info['backed_mib']} MiB of free memory once ({info['backed_s']} s) so "
        "that the host backs it"
        if info["backed_mib"]
        else "free memory not written first (`--quick`)"
    )
    return (
        f"free page reporting off while the bench ran (page_reporting_order "
        f"{info['order_before']} -> {info['order_during']}, back after), {backed}"
    )
