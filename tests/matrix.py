"""The fault matrix: what goes wrong (rows), where (targets), one runner and one checker.

Every row runs the real engine (``python3 -m kdump_capture save``, a subprocess, as /init
runs it) against a real target: a local directory, or the test sshd, pyftpdlib or Samba on
loopback. Each row's target root is a fresh tmpfs holding an older complete dump, planted
before the run and checksummed before and after. Faults come from outside the engine only:
the loopback proxy (tests/servers/proxy.py) for the network, ``ReadGate`` (tests/faults.py)
to hold the engine at an exact offset of the vmcore or fail reads with EIO, and mounts for
full and read-only filesystems. ``check`` holds the invariants every row must keep.

tests/test_fault_matrix.py runs the rows; ``python3 -m tests.reliability_report`` turns a
run into the table in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kdump_capture import checksum
from kdump_capture.elf import EHDR, NHDR, PHDR, PN_XNUM, PT_NOTE, SHDR, Ehdr, Phdr, xnum_section
from kdump_capture.errors import EXIT_CODES, ManifestError
from kdump_capture.policy import parse_dump_name
from kdump_capture.sample import DEMO_LOG, KernelImage, SampleSpec, write_sample
from kdump_capture.vmcore import open_vmcore
from transports.base import TransportSettings, is_temp_name
from transports.retry import retry_delays

from .faults import ReadGate, fill
from .helpers import ROOT
from .servers.proxy import DropProxy

MiB = 1 << 20
PAGE = 4096
KINDS = ("file", "sftp", "ftp", "cifs")
NET = ("sftp", "ftp", "cifs")

# The engine reads the vmcore in 1 MiB chunks, so a fault lands between two chunks. With
# 100 MiB of RAM, 1% and 99% are chunk boundaries; other rows need only 50%.
BIG_MIB = 100
MID_MIB = 32
SMALL_MIB = 4
OLD_CRASH = 1764000000  # the older dump: 2025-11-24 16:00:00
NEW_CRASH = 1764100000  # every row's vmcore: 2025-11-25 19:46:40
MARGIN_MB = 1  # KDUMP_FREE_DISK_SIZE: small, so the full-disk row's tmpfs stays small
NET_TIMEOUT = 10  # KDUMP_NET_TIMEOUT: bounds every wait on a server
# What the engine's retries add up to (production values: the matrix does not shorten them).
DELAYS = retry_delays(TransportSettings())
# A row's engine must end within this; the longest legitimate run is a server that stays
# away: every retry delay, plus a connect timeout per attempt, plus start-up and slack.
BOUND = sum(DELAYS) + (len(DELAYS) + 1) * NET_TIMEOUT + 30
# Address-space limit of the engine: well above what it maps (threads reserve stacks and
# malloc arenas; its RSS stays under 100 MiB), far below what
# a size read from a hostile header would allocate. A breach is a MemoryError, not an OOM.
ENGINE_AS = 512 << 20
FILLER = ".filler"


@dataclass
class Run:
    """One engine process."""

    rc: int
    out: str
    err: str
    elapsed: float
    timed_out: bool = False
    fired: list[int] = field(default_factory=list)  # offsets where a fault was injected
    planned: int = 0  # faults planned at offsets (all of them must have fired)
    eio: list[tuple[int, int]] = field(default_factory=list)  # reads answered with EIO

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


@dataclass
class DirState:
    """One entry of the target root after the row (the older dump excluded)."""

    name: str
    is_dir: bool
    files: dict[str, int] = field(default_factory=dict)  # name -> size
    manifest: dict | None = None
    manifest_error: str | None = None
    readme: str | None = None
    verified: list[str] = field(default_factory=list)  # problems found re-hashing the files
    vmcore_sha: str | None = None
    vmcore_diff: list[tuple[int, int]] | None = None  # byte ranges differing from the source

    @property
    def status(self) -> str | None:
        return self.manifest.get("status") if isinstance(self.manifest, dict) else None


@dataclass
class Outcome:
    row: str
    kind: str
    runs: list[Run]
    older: str
    older_before: dict[str, tuple[str, int]]
    older_after: dict[str, tuple[str, int]] | None
    entries: list[DirState]
    source_sha: str
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> Run:
        return self.runs[-1]


# -- sources ---------------------------------------------------------------------------
def make_sources(d: str) -> dict[str, str]:
    """Every vmcore the rows read, on a filesystem where ReadGate works (ext4 here)."""
    os.makedirs(d, exist_ok=True)
    out = {}

    def sample(name: str, mib: int, **kw) -> str:
        p = os.path.join(d, name)
        write_sample(p, SampleSpec(ram_mib=mib, crash_time=kw.pop("crash_time", NEW_CRASH), **kw))
        out[name] = p
        return p

    sample("older", SMALL_MIB, crash_time=OLD_CRASH)
    sample("big", BIG_MIB)
    sample("mid", MID_MIB)
    small = sample("small", SMALL_MIB)

    with open(small, "rb") as f:
        data = f.read()
    out["truncated"] = _put(d, "truncated", data[: len(data) * 6 // 10])
    out["empty"] = _put(d, "empty", b"")
    out["vmcoreinfo"] = _put(d, "vmcoreinfo", _garbage_vmcoreinfo(small, data))
    out["crashtime"] = _put(
        d, "crashtime", _patch_vmcoreinfo(small, data, {"CRASHTIME": "99999999999999999999"})
    )
    out["notes"] = _put(d, "notes", _bad_note(small, data))
    out["many-notes"] = _many_notes(os.path.join(d, "many-notes"))
    out["printk"] = _bad_printk(os.path.join(d, "printk"))
    return out


def _put(d: str, name: str, data: bytes) -> str:
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def _vmcoreinfo_at(path: str, data: bytes) -> tuple[int, bytes]:
    with open_vmcore(path) as vm:
        desc = vm.vmcoreinfo_note.desc
        start = data.index(desc, vm.notes_offset)
    return start, desc


def _garbage_vmcoreinfo(path: str, data: bytes) -> bytes:
    """VMCOREINFO of the same length full of binary noise and nonsense values."""
    start, desc = _vmcoreinfo_at(path, data)
    junk = (
        b"\xff\xfe\x00CRASHTIME=soon\nPAGESIZE=-1\nOSRELEASE=\x1b[2J\x00\x80\n=\n==\nSYMBOL(x)=zz\n"
    )
    noise = bytes((i * 151 + 7) & 0xFF for i in range(len(desc)))
    new = (junk + noise)[: len(desc)]
    return data[:start] + new + data[start + len(desc) :]


def _patch_vmcoreinfo(path: str, data: bytes, values: dict[str, str]) -> bytes:
    """Set VMCOREINFO ``values``, keeping the note's length (BUILD-ID gives up room)."""
    start, desc = _vmcoreinfo_at(path, data)
    lines = []
    for line in desc.decode().splitlines():
        key = line.partition("=")[0]
        if key == "BUILD-ID":
            continue
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    lines += [f"{k}={v}" for k, v in values.items()]
    new = ("\n".join(lines) + "\n").encode()
    if len(new) > len(desc):
        raise ValueError("patched VMCOREINFO does not fit")
    new += b"#" * (len(desc) - len(new))  # a line without '=' is ignored
    return data[:start] + new + data[start + len(desc) :]


def _bad_note(path: str, data: bytes) -> bytes:
    """The first note claims a name longer than the whole note segment."""
    with open_vmcore(path) as vm:
        off = vm.notes_offset
    namesz, descsz, ntype = NHDR.unpack_from(data, off)
    return data[:off] + NHDR.pack(0x7FFFFFF0, descsz, ntype) + data[off + NHDR.size :]


def _many_notes(path: str, count: int = 65535, size: int = 16 * MiB) -> str:
    """65535 PT_NOTEs, each a plausible 16 MiB, all over the same bytes (item 9); from
    65535 on, the count is in section 0 behind them (extended numbering)."""
    xnum = SHDR.size if count >= PN_XNUM else 0
    data_off = (EHDR.size + PHDR.size * count + xnum + PAGE - 1) // PAGE * PAGE
    ph = Phdr(PT_NOTE, 0, data_off, 0, 0, size, size, 0).pack()
    with open(path, "wb") as f:
        f.write(Ehdr.core(count).pack())
        f.write(ph * count)
        if xnum:
            f.write(xnum_section(count))
        f.truncate(data_off + size)
    return path


def _bad_printk(path: str) -> str:
    """A synthetic kernel whose printk ring claims 2^26 descriptors (item 7), all of them
    readable: 1.5 GiB of huge-page mappings that alias one 2 MiB stretch of RAM, as a
    large crashed machine's memory would be."""
    k = KernelImage(1024)
    k.build(DEMO_LOG)
    ring_ptr = k.symbols["prb"] - k.page_offset
    ring = k.get_u64(ring_ptr) - k.page_offset
    k.put(ring, struct.pack("<I", 26))  # prb_desc_ring.count_bits
    descs = 0xFFFFC90000000000  # the vmalloc area: far from everything build() mapped
    for i in range(24 * (1 << 26) // (2 * MiB)):  # sizeof(struct prb_desc) == 24
        k.map(descs + i * 2 * MiB, 2 * MiB, huge=True)
    k.u64(ring + 8, descs)  # prb_desc_ring.descs
    k.write(path, extra={"CRASHTIME": str(NEW_CRASH)})
    return path


# -- targets -----------------------------------------------------------------------------
@dataclass
class Servers:
    """The session's real servers (from tests/servers/fixtures.py) and the host's name."""

    ssh: object
    ftp: object
    smb: object


def target_url(kind: str, servers: Servers, root: str, port: int | None = None) -> tuple[str, str]:
    """(URL, config lines) for a target whose server-side root directory is ``root``."""
    if kind == "file":
        return f"file://{root}", ""
    if kind == "sftp":
        s = servers.ssh
        extra = f'KDUMP_HOST_KEY="{s.host_key}"\nKDUMP_SSH_IDENTITY="{s.client_key}"\n'
        return f"sftp://root@{s.host}:{port or s.port}{root}", extra
    if kind == "ftp":
        s = servers.ftp
        rel = os.path.relpath(root, s.root)
        return f"ftp://{s.user}:{s.password}@{s.host}:{port or s.port}/{rel}", ""
    if kind == "cifs":
        s = servers.smb
        rel = os.path.relpath(root, s.root)
        return f"cifs://{s.user}:{s.password}@{s.host}:{port or s.port}/{s.share}/{rel}", ""
    raise ValueError(kind)


def server_root(kind: str, servers: Servers, scratch: str, name: str) -> str:
    """A fresh directory where the target's server keeps its files."""
    base = {
        "file": scratch,
        "sftp": os.path.join(scratch, "sftp"),
        "ftp": getattr(servers.ftp, "root", ""),
        "cifs": getattr(servers.smb, "root", ""),
    }[kind]
    path = os.path.join(base, name)
    os.makedirs(path)
    return path


def server_port(kind: str, servers: Servers) -> int:
    return {"sftp": servers.ssh, "ftp": servers.ftp, "cifs": servers.smb}[kind].port


@contextlib.contextmanager
def tmpfs(path: str, size: int) -> Iterator[str]:
    """A tmpfs of ``size`` bytes on ``path``: every row's target root (fast, isolated, and
    gone at the end with whatever the row left)."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(path)


def snapshot(path: str) -> dict[str, tuple[str, int]]:
    """Every file and directory under ``path``: SHA-256 (files only) and mode."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, _, files in os.walk(path):
        out[os.path.relpath(dirpath, path) + "/"] = ("", os.stat(dirpath).st_mode)
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = (digest_of(p), os.stat(p).st_mode)
    return out


def digest_of(path: str, algorithm: str = checksum.SHA256) -> str:
    """The file's hex digest by ``algorithm`` (a key of kdump_capture.checksum.ALGORITHMS)."""
    h = checksum.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def diff_ranges(a: str, b: str) -> list[tuple[int, int]] | None:
    """Page-granular byte ranges where files ``a`` and ``b`` differ; None if sizes differ."""
    if os.path.getsize(a) != os.path.getsize(b):
        return None
    out: list[tuple[int, int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if not x:
                break
            if x != y:
                for i in range(0, len(x), PAGE):
                    if x[i : i + PAGE] != y[i : i + PAGE]:
                        lo = pos + i
                        if out and out[-1][1] == lo:
                            out[-1] = (out[-1][0], lo + PAGE)
                        else:
                            out.append((lo, lo + PAGE))
            pos += len(x)
    return out


def inspect(root: str, older: str, source: str) -> list[DirState]:
    entries = []
    for name in sorted(os.listdir(root)):
        if name in (older, FILLER):
            continue
        path = os.path.join(root, name)
        st = DirState(name, os.path.isdir(path))
        entries.append(st)
        if not st.is_dir:
            continue
        for f in sorted(os.listdir(path)):
            st.files[f] = os.path.getsize(os.path.join(path, f))
        if "README.txt" in st.files:
            with open(os.path.join(path, "README.txt"), errors="replace") as f:
                st.readme = f.read()
        if "manifest.json" in st.files:
            try:
                with open(os.path.join(path, "manifest.json")) as f:
                    st.manifest = json.load(f)
            except ValueError as e:
                st.manifest_error = str(e)
        if isinstance(st.manifest, dict):
            for fname, info in (st.manifest.get("files") or {}).items():
                p = os.path.join(path, fname)
                if not os.path.isfile(p):
                    st.verified.append(f"{fname}: missing")
                    continue
                try:  # the manifest's own checks: a malformed entry is a finding, not a crash
                    algorithm, want = checksum.recorded(info, fname)
                except ManifestError as e:
                    st.verified.append(str(e))
                    continue
                if (os.path.getsize(p), digest_of(p, algorithm)) != (info.get("size"), want):
                    st.verified.append(f"{fname}: does not match the manifest")
        if "vmcore" in st.files:
            st.vmcore_sha = digest_of(os.path.join(path, "vmcore"))
            st.vmcore_diff = diff_ranges(os.path.join(path, "vmcore"), source)
    return entries


# -- the engine ------------------------------------------------------------------------
class Engine:
    """Runs ``kdump-capture save`` for one row, optionally behind a ReadGate."""

    def __init__(self, conf: str) -> None:
        self.conf = conf
        self.pid = 0

    def run(
        self,
        source: str,
        at: list[tuple[float, Callable[[], None]]] = (),
        eio: list[tuple[int, int]] = (),
        timeout: float = BOUND,
    ) -> Run:
        """``at``: (fraction of the source, action) pairs; ``eio``: byte ranges failing EIO."""
        argv = [
            "prlimit",
            f"--as={ENGINE_AS}",
            sys.executable,
            "-m",
            "kdump_capture",
            "save",
            "--config",
            self.conf,
            "--vmcore",
            source,
            "--no-reboot",
        ]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        gate = ReadGate(source) if (at or eio) else None
        with gate or contextlib.nullcontext():
            size = os.path.getsize(source)
            for frac, action in at:
                gate.on_read(int(size * frac), action)
            for lo, hi in eio:
                gate.fail(lo, hi)
            t0 = time.monotonic()
            p = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.pid = p.pid
            if gate:
                gate.pids = {p.pid}
            timed_out = False
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                p.kill()
                out, err = p.communicate()
            elapsed = time.monotonic() - t0
        return Run(
            p.returncode,
            out,
            err,
            elapsed,
            timed_out,
            fired=list(gate.fired) if gate else [],
            eio=list(gate.failed_reads) if gate else [],
            planned=len(at),
        )


@dataclass
class Ctx:
    """What a row's fault needs: the target's server-side root, the engine, a proxy."""

    kind: str
    root: str
    engine: Engine
    proxy: DropProxy | None
    sources: dict[str, str]
    notes: list[str]

    def new_dump_dirs(self, older: str) -> list[str]:
        return [
            os.path.join(self.root, n)
            for n in os.listdir(self.root)
            if n not in (older, FILLER) and os.path.isdir(os.path.join(self.root, n))
        ]


# -- rows ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One fault. ``expect``: the exit code; ``message``: a regex the console's final line
    must match (the error line, or for exit 0 a warning line saying what happened);
    ``new``: what the target must hold besides the older dump afterwards: "complete" (one
    new complete dump, byte-identical to the source unless ``eio``), "none" (nothing), or
    "unfinished" (nothing complete; leftovers must say INCOMPLETE or FAILED).
    ``pending``: {target or "*": why this row fails today} (expected failures)."""

    id: str
    title: str
    kinds: tuple[str, ...]
    source: str
    expect: int
    message: str
    new: str
    proxy: bool = False
    tmpfs_size: int | None = None  # None: roomy
    eio: tuple[tuple[int, int], ...] = ()
    pending: dict[str, str] = field(default_factory=dict)

    def pending_for(self, kind: str) -> str | None:
        return self.pending.get(kind) or self.pending.get("*")


ROWS: dict[str, Row] = {}
_RUNNERS: dict[str, Callable[[Ctx, Row, str], list[Run]]] = {}


def row(**kw) -> Callable:
    def deco(fn: Callable[[Ctx, Row, str], list[Run]]) -> Callable:
        r = Row(**kw)
        ROWS[r.id] = r
        _RUNNERS[r.id] = fn
        return fn

    return deco


def _plain(ctx: Ctx, r: Row, older: str) -> list[Run]:
    return [ctx.engine.run(ctx.sources[r.source], eio=list(r.eio))]


def _drop_row(pct: int) -> None:
    @row(
        id=f"drop-{pct}",
        title=f"connection drops at {pct}% of the vmcore",
        kinds=NET,
        source="big",
        expect=0,
        message=r"connection lost",
        new="complete",
        proxy=True,
    )
    def _run(ctx: Ctx, r: Row, older: str) -> list[Run]:
        return [ctx.engine.run(ctx.sources[r.source], at=[(pct / 100, ctx.proxy.drop_now)])]


for _pct in (1, 50, 99):
    _drop_row(_pct)


@row(
    id="server-returns",
    title="server stops at 50% and returns within the retry window",
    kinds=NET,
    source="mid",
    expect=0,
    message=r"connection lost",
    new="complete",
    proxy=True,
)
def _server_returns(ctx: Ctx, r: Row, older: str) -> list[Run]:
    # The engine retries after DELAYS[0] and again DELAYS[1] later: the server is back
    # halfway between, so the first reconnect is refused and the second one works.
    back_after = DELAYS[0] + DELAYS[1] / 2

    def stop() -> None:
        ctx.proxy.stop()
        timer = threading.Timer(back_after, ctx.proxy.start)
        timer.daemon = True
        timer.start()

    return [ctx.engine.run(ctx.sources[r.source], at=[(0.5, stop)])]


@row(
    id="server-gone",
    title="server stops at 50% and stays away",
    kinds=NET,
    source="mid",
    expect=6,
    message=r"connection lost and \d+ retries failed",
    new="unfinished",
    proxy=True,
)
def _server_gone(ctx: Ctx, r: Row, older: str) -> list[Run]:
    return [ctx.engine.run(ctx.sources[r.source], at=[(0.5, ctx.proxy.stop)])]


@row(
    id="disk-full",
    title="target fills up at 50% (another writer takes the space)",
    kinds=KINDS,
    source="mid",
    expect=5,
    message=r"full|KDUMP_FREE_DISK_SIZE",
    new="none",
    tmpfs_size=(MID_MIB + 16) * MiB,
)
def _disk_full(ctx: Ctx, r: Row, older: str) -> list[Run]:
    # The tmpfs holds the older dump, the new one, its side files (4 MiB) and the margin
    # with a few MiB to spare: the pre-check passes, then the space goes mid-write.
    return [ctx.engine.run(ctx.sources[r.source], at=[(0.5, lambda: fill(ctx.root, FILLER))])]


@row(
    id="read-only",
    title="target is read-only",
    kinds=KINDS,
    source="small",
    expect=6,
    message=r"[Rr]ead-only|not writable",
    new="none",
)
def _read_only(ctx: Ctx, r: Row, older: str) -> list[Run]:
    subprocess.run(["mount", "-o", "remount,ro", ctx.root], check=True, capture_output=True)
    return _plain(ctx, r, older)


@row(
    id="dir-gone",
    title="dump directory disappears at 50%",
    kinds=KINDS,
    source="mid",
    expect=6,
    message=r"[Nn]o such file|not found|does not exist|not retrievable|gone",
    new="unfinished",
)
def _dir_gone(ctx: Ctx, r: Row, older: str) -> list[Run]:
    def remove() -> None:
        dirs = ctx.new_dump_dirs(older)
        if len(dirs) != 1:
            raise AssertionError(f"expected one new dump directory at 50%, found {dirs}")
        shutil.rmtree(dirs[0])

    return [ctx.engine.run(ctx.sources[r.source], at=[(0.5, remove)])]


@row(
    id="sigkill",
    title="engine SIGKILLed at 50%, then rerun",
    kinds=KINDS,
    source="mid",
    expect=0,
    message=r"deleting incomplete dump",
    new="complete",
)
def _sigkill(ctx: Ctx, r: Row, older: str) -> list[Run]:
    source = ctx.sources[r.source]
    first = ctx.engine.run(source, at=[(0.5, lambda: os.kill(ctx.engine.pid, signal.SIGKILL))])
    return [first, ctx.engine.run(source)]


@row(
    id="eio",
    title="vmcore has EIO ranges: 64 KiB at 25%, 4 KiB at 70% (item 10)",
    kinds=KINDS,
    source="mid",
    expect=0,
    message=r"unreadable|could not be read",
    new="complete",
    eio=(
        (MID_MIB * MiB // 4, MID_MIB * MiB // 4 + 16 * PAGE),
        (MID_MIB * MiB * 7 // 10 // PAGE * PAGE, MID_MIB * MiB * 7 // 10 // PAGE * PAGE + PAGE),
    ),
)
def _eio(ctx: Ctx, r: Row, older: str) -> list[Run]:
    return _plain(ctx, r, older)


def _corrupt(id: str, title: str, expect: int, message: str, new: str, pending: str = ""):
    row(
        id=f"corrupt-{id}",
        title=f"vmcore corrupt: {title}",
        kinds=KINDS,
        source=id,
        expect=expect,
        message=message,
        new=new,
        pending={"*": pending} if pending else {},
    )(_plain)


_corrupt("truncated", "truncated at 60%", 4, r"truncated", "none")
_corrupt("empty", "empty file", 4, r"empty", "none")
_corrupt("notes", "a note longer than its segment", 4, r"PT_NOTE", "none")
_corrupt("vmcoreinfo", "binary garbage in VMCOREINFO", 0, r"VMCOREINFO", "complete")
_corrupt("crashtime", "CRASHTIME 99999999999999999999 (item 8)", 0, r"CRASHTIME", "complete")
_corrupt("many-notes", "65535 PT_NOTEs of 16 MiB each (item 9)", 4, r"PT_NOTE", "none")
_corrupt("printk", "printk ring with count_bits 26 (item 7)", 0, r"dmesg", "complete")


def cases() -> list[tuple[str, str]]:
    """Every (row, target) pair of the matrix, in table order."""
    return [(r.id, k) for r in ROWS.values() for k in KINDS if k in r.kinds]


# -- running a row ---------------------------------------------------------------------
def run_row(
    row_id: str,
    kind: str,
    servers: Servers,
    scratch: str,
    sources: dict[str, str],
    templates: dict[str, str],
) -> Outcome:
    """Run one row against one target and collect everything ``check`` needs."""
    r = ROWS[row_id]
    # A neutral name: the row's own words in a path would match its message pattern.
    name = f"{kind}-{secrets.token_hex(4)}"
    root = server_root(kind, servers, scratch, name)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(tmpfs(root, r.tmpfs_size or 512 * MiB))
        template = templates[kind]
        older = os.path.basename(template)
        shutil.copytree(template, os.path.join(root, older))
        os.chmod(root, 0o700)
        before = snapshot(os.path.join(root, older))
        proxy = None
        port = None
        if r.proxy:
            proxy = stack.enter_context(DropProxy(server_port(kind, servers), ftp=kind == "ftp"))
            port = proxy.port
        url, extra = target_url(kind, servers, root, port)
        conf = os.path.join(scratch, f"{name}.conf")
        write_config(conf, url, extra)
        ctx = Ctx(kind, root, Engine(conf), proxy, sources, notes)
        runs = _RUNNERS[row_id](ctx, r, older)
        if proxy and not proxy.dropped and r.id.startswith(("drop", "server")):
            notes.append("the proxy never dropped a connection")
        older_path = os.path.join(root, older)
        after = snapshot(older_path) if os.path.isdir(older_path) else None
        entries = inspect(root, older, sources[r.source])
    return Outcome(
        row_id, kind, runs, older, before, after, entries, digest_of(sources[r.source]), notes
    )


def write_config(path: str, url: str, extra: str = "") -> None:
    """A sysconfig file; passwords travel in it (mode 0600), never in argv."""
    with open(path, "w") as f:
        f.write(
            f'KDUMP_SAVEDIR="{url}"\nKDUMP_NET_TIMEOUT={NET_TIMEOUT}\n'
            f"KDUMP_FREE_DISK_SIZE={MARGIN_MB}\n{extra}"
        )
    os.chmod(path, 0o600)


def make_template(kind: str, servers: Servers, scratch: str, source: str) -> str:
    """The older complete dump every row of ``kind`` starts with (saved by the engine)."""
    root = server_root(kind, servers, scratch, f"template-{kind}")
    url, extra = target_url(kind, servers, root)
    conf = os.path.join(scratch, f"template-{kind}.conf")
    write_config(conf, url, extra)
    run = Engine(conf).run(source)
    if run.rc != 0:
        raise RuntimeError(f"cannot make the older {kind} dump: {run.err}")
    [name] = [n for n in os.listdir(root) if parse_dump_name(n)]
    return os.path.join(root, name)


# -- the invariants --------------------------------------------------------------------
def check(o: Outcome) -> list[str]:
    """Every invariant of the matrix for one outcome; returns the violations (empty: ok).

    - the older complete dump is still there, unaltered (SHA-256 and mode of every file);
    - every engine process ended within BOUND, with a documented exit code, never 1 (a
      bug), and the row's expected code; no traceback on the console;
    - the console's final line says what happened, in one line;
    - nothing incomplete looks complete: a dump whose manifest says complete exists only
      after exit 0, matches its manifest and the source; anything else the row left says
      INCOMPLETE or FAILED in its README, and its manifest (if any) does not say complete.
    """
    r = ROWS[o.row]
    bad = list(o.notes)
    if o.older_after is None:
        bad.append(f"the older dump {o.older} was deleted")
    elif o.older_after != o.older_before:
        changed = sorted(
            k
            for k in set(o.older_before) | set(o.older_after)
            if o.older_before.get(k) != o.older_after.get(k)
        )
        bad.append(f"the older dump {o.older} was altered: {changed}")
    for i, run in enumerate(o.runs):
        last = i == len(o.runs) - 1
        if run.timed_out:
            bad.append(f"run {i + 1} did not end within {BOUND:.0f} s")
        elif run.elapsed > BOUND:
            bad.append(f"run {i + 1} took {run.elapsed:.0f} s (bound {BOUND:.0f} s)")
        killed = run.rc == -signal.SIGKILL and o.row == "sigkill" and not last
        if not killed and (run.rc not in EXIT_CODES or run.rc == 1):
            bad.append(f"run {i + 1}: exit code {run.rc} is not a documented one (1 = a bug)")
        if "Traceback" in run.err:
            bad.append(f"run {i + 1}: traceback on the console")
        if len(run.fired) != run.planned:
            bad.append(f"run {i + 1}: {run.planned - len(run.fired)} planned fault(s) never fired")
    final = o.final
    if final.rc != r.expect:
        bad.append(f"exit code {final.rc}, expected {r.expect}: {final.last_line!r}")
    if final.rc != 0:
        line = final.last_line
        if not line.startswith("kdump-capture: error: "):
            bad.append(f"the final console line is not the error line: {line!r}")
        elif not re.search(r.message, line):
            bad.append(f"the error line does not say what happened ({r.message}): {line!r}")
    else:
        if "Dump saved: " not in final.out:
            bad.append("exit 0 without 'Dump saved:' on the console")
        said = [ln for ln in final.err.splitlines() if re.search(r.message, ln)]
        if r.message and not said and not re.search(r.message, final.out):
            bad.append(f"no console line says what happened ({r.message})")
    complete = []
    for e in o.entries:
        if not e.is_dir:
            if not is_temp_name(e.name):
                bad.append(f"unexpected file {e.name} in the target root")
            continue
        if parse_dump_name(e.name) is None and not is_temp_name(e.name):
            bad.append(f"unexpected directory name {e.name}")
        if e.status == "complete":
            complete.append(e)
            if final.rc != 0:
                bad.append(f"{e.name} says complete but the engine exited {final.rc}")
            if e.verified:
                bad.append(f"{e.name}: {'; '.join(e.verified)}")
            if not (e.readme or "").startswith("Kernel crashdump\n"):
                bad.append(f"{e.name}: complete manifest but README does not say complete")
            continue
        if e.manifest_error:
            bad.append(f"{e.name}: unreadable manifest.json ({e.manifest_error})")
        visible = [f for f in e.files if not is_temp_name(f)]
        if visible and not re.search(r"INCOMPLETE|FAILED", e.readme or ""):
            bad.append(f"{e.name} is unfinished but its README does not say so: {visible}")
    if r.new == "complete":
        if len(complete) != 1:
            bad.append(f"expected one new complete dump, found {[e.name for e in complete]}")
        else:
            e = complete[0]
            if r.eio:
                bad += _check_eio(o, r, e)
            elif e.vmcore_diff != []:
                bad.append(f"{e.name}/vmcore differs from the source: {e.vmcore_diff}")
        leftovers = [e.name for e in o.entries if e not in complete and not is_temp_name(e.name)]
        if leftovers:
            bad.append(f"left behind besides the new dump: {leftovers}")
    elif r.new == "none":
        if o.entries:
            bad.append(f"expected nothing new on the target, found {[e.name for e in o.entries]}")
    elif complete:
        bad.append(f"a dump looks complete after a failure: {[e.name for e in complete]}")
    return bad


def _check_eio(o: Outcome, r: Row, e: DirState) -> list[str]:
    """EIO ranges: the rest is saved byte for byte, the bad ranges are zeros and recorded."""
    bad = []
    want = sorted(r.eio)
    if not o.final.eio:
        bad.append("no read failed: the EIO ranges were never read")
    if e.vmcore_diff is None:
        return bad + [f"{e.name}/vmcore has a different size than the source"]
    outside = [
        (lo, hi) for lo, hi in e.vmcore_diff if not any(a <= lo and hi <= b for a, b in want)
    ]
    if outside:
        bad.append(f"{e.name}/vmcore differs from the source outside the EIO ranges: {outside}")
    recorded = sorted(
        (u.get("offset"), u.get("offset", 0) + u.get("size", 0))
        for u in (e.manifest or {}).get("unreadable", [])
    )
    if recorded != want:
        bad.append(f"manifest records unreadable ranges {recorded}, expected {want}")
    if "could not be read" not in (e.readme or ""):
        bad.append("README does not mention the unreadable ranges")
    return bad


def summary(o: Outcome) -> str:
    """One line for the report: exit code, time and what the console said."""
    final = o.final
    line = final.last_line
    if final.rc == 0:  # the line saying what happened, if the row expects one
        said = [ln for ln in final.err.splitlines() if re.search(ROWS[o.row].message, ln)]
        line = "Dump saved" + (f"; {said[0].removeprefix('kdump: ')}" if said else "")
    line = re.sub(r"/tmp/\S*/", ".../", line)
    line = re.sub(r"://[^@/\s]*@", "://", line)  # no credentials in the report
    times = "+".join(f"{r.elapsed:.1f}" for r in o.runs)
    rcs = ",".join(str(r.rc) for r in o.runs)
    return f"exit {rcs} in {times} s: {line[:160]}"


def host() -> str:
    return socket.gethostname()
