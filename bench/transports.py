"""Loopback throughput of each network transport against the reference client.

Starts the same throw-away servers the tests use (sshd, vsftpd, smbd, SeaweedFS on
127.0.0.1), uploads one file (default 1 GB) with our transport and with the reference client
(OpenSSH ``sftp -b``, ``curl -T``, ``smbclient put``, boto3 ``upload_file`` with our part
size), several runs each, and prints the medians and ratios; the table also goes to
bench/results/transports.md. CIFS has a second reference row for context (no goal):
``smbclient put --client-protection=sign``, since ours signs every request and smbclient by
default signs only the session setup (smbstatus's word on each session goes into the note),
and the CIFS rows give smbd's CPU per upload, to tell a client-bound upload from a
server-bound one. The S3 uploads run in child processes that also report their
peak RSS (VmHWM), both ours and boto3's.

Our sinks hash every byte they send (the manifest's checksum), which the reference clients
do not. Ours uploads twice in each round: with the checksum asked for (``--checksum``, by
default XXH3-128, the default KDUMP_CHECKSUM: the goal rows) and with the other one (SHA-256
beside XXH3-128: context rows that show what the cryptographic hash costs). Free page
reporting is off while it runs (``bench.measure.settled_memory``; ``--fresh-memory`` leaves
it on).

    python3 bench/transports.py [--size-mb 1024] [--runs 3] [--only s3] [--server-cpus 1]
        [--checksum sha256] [--fresh-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import (  # noqa: E402
    profile_lines,
    profile_threads,
    run_lines,
    settled_text,
    settled_unless,
)
from kdump_capture import checksum  # noqa: E402
from kdump_capture.errors import NotSupported  # noqa: E402
from kdump_capture.urls import Target, parse_target  # noqa: E402
from tests.servers.common import unix_user  # noqa: E402
from tests.servers.ftp import vsftpd  # noqa: E402
from tests.servers.s3 import REGION, seaweed  # noqa: E402
from tests.servers.samba import smbd  # noqa: E402
from tests.servers.sshd import sshd  # noqa: E402
from transports import open_transport  # noqa: E402
from transports.base import TransportSettings  # noqa: E402

CHUNK = 1 << 20  # what the engine hands a sink: 1 MiB memoryviews of one reused buffer
PASSWORD = "kdump-Bench-pw1"
SMBCLIENT = "smbclient put"
SMBCLIENT_SIGNED = "smbclient put --client-protection=sign"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transports.md")
PREVIOUS = "\n## Previous full run\n"
GOAL = 0.9  # the issue's: ours at least 0.9x the reference client's throughput


class Row(NamedTuple):
    """One line of the table: our medians against one reference client's."""

    label: str
    ref_label: str
    ours_s: float
    ref_s: float
    size: int
    ours_cpu_s: float
    ref_cpu_s: float
    goal: bool  # False: a row for context, not held to the 0.9x goal
    server_cpu_s: tuple[float, float] | None  # the server's CPU per upload: ours, reference
    ours_runs: tuple[float, ...] = ()  # wall seconds of every run, in the order they ran
    ref_runs: tuple[float, ...] = ()


def ours(target: Target, settings: TransportSettings, src: str) -> Callable[[str], None]:
    def upload(name: str) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open_transport(target, settings) as tr, open(src, "rb", buffering=0) as f:
            with tr.create(name) as sink:
                while n := f.readinto(buf):
                    sink.write(view[:n])
                sink.commit()

    return upload


# S3 uploads in a child interpreter: wall time of the upload alone (imports excluded) and the
# child's peak RSS go to stdout as "SECONDS PEAK_BYTES".
S3_CHILD = r"""
import os, sys, time
sys.path.insert(0, ROOT)
which, src, key, part, port, bucket, algorithm = sys.argv[1:8]
ak, sk = os.environ["BENCH_S3_KEY"], os.environ["BENCH_S3_SECRET"]
part = int(part)
if which == "ours":
    from kdump_capture.urls import parse_target
    from transports import open_transport
    from transports.base import TransportSettings
    t = parse_target(f"s3+http://127.0.0.1:{port}/{bucket}")[0].replace(user=ak, password=sk)
    # the engine's default replay budget: 16 MiB = two 8 MiB parts, one in flight
    settings = TransportSettings(timeout=60.0, replay_bytes=2 * part, checksum=algorithm)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    def upload():
        with open_transport(t, settings) as tr, open(src, "rb", buffering=0) as f:
            with tr.create(key) as sink:
                while n := f.readinto(buf):
                    sink.write(view[:n])
                sink.commit()
    if os.environ.get("BENCH_PROFILE"):
        from bench.measure import profile_threads
        with open(os.environ["BENCH_PROFILE"], "w") as out:
            out.write(profile_threads(upload))
        sys.exit(0)
    start = time.monotonic()
    upload()
else:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=ak,
                     aws_secret_access_key=sk, region_name=REGION,
                     config=Config(s3={"addressing_style": "path"}))
    start = time.monotonic()
    c.upload_file(src, bucket, key, Config=TransferConfig(
        multipart_threshold=part, multipart_chunksize=part))
elapsed = time.monotonic() - start
with open("/proc/self/status") as f:
    peak = [int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")][0]
print(elapsed, peak)
"""
S3_PART = 8 << 20  # what the default 16 MiB replay budget gives (memory.s3_part_plan)


def s3_child(which: str, src: str, s3, peaks: list[int], algorithm: str) -> Callable[[str], None]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = S3_CHILD.replace("ROOT", repr(root)).replace("REGION", repr(REGION))

    def run(name: str, **extra: str) -> str:
        argv = [sys.executable, "-c", code, which, src, name, str(S3_PART), str(s3.port)]
        env = {**os.environ, "BENCH_S3_KEY": s3.access_key, "BENCH_S3_SECRET": s3.secret_key}
        p = subprocess.run(
            [*argv, s3.bucket, algorithm],
            capture_output=True,
            text=True,
            env={**env, **extra},
        )
        if p.returncode:  # the child's own words, not only its exit status
            raise RuntimeError(
                f"S3 upload by {which} ({name}, {algorithm}) exited with {p.returncode}:\n"
                + p.stderr[-3000:]
            )
        return p.stdout

    def upload(name: str) -> None:
        peaks.append(int(run(name).split()[1]))

    def profile(name: str) -> str:
        """One upload in the child under ``profile_threads``: its summary."""
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
            run(name, BENCH_PROFILE=out.name)
            return out.read()

    upload.profile = profile  # type: ignore[attr-defined]
    return upload


def profile_upload(fn: Callable[[str], None], cleanup: Callable[[str], None]) -> str:
    """A cProfile summary of one more upload by our client ``fn`` (untimed): every thread
    of it, whether it uploads in this process or in a child interpreter (S3)."""
    inner = getattr(fn, "fn", fn)  # ServerCpu: the upload alone
    child = getattr(inner, "profile", None)
    text = child("profile") if child else profile_threads(lambda: inner("profile"))
    cleanup("profile")
    return text


def command(argv_for: Callable[[str], list[str]]) -> Callable[[str], None]:
    def upload(name: str) -> None:
        subprocess.run(argv_for(name), check=True, capture_output=True)

    return upload


def move_servers(cpus: set[int]) -> None:
    """Pin every process this one started (the servers; their later children inherit it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):  # exited meanwhile
            for tid in os.listdir(f"/proc/{pid}/task"):  # every thread (SeaweedFS has many)
                os.sched_setaffinity(int(tid), cpus)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads: ours uploads in-process) and of its reaped
    children (the reference clients and our S3 child); the servers are never reaped here."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(
    fn: Callable[[str], None], name: str, cleanup: Callable[[str], None]
) -> tuple[float, float]:
    """Wall and client CPU seconds of one upload.

    An upload that counts the server's CPU (``ServerCpu``) waits for the server afterwards,
    outside the time measured: the client is done when ``fn`` returns.
    """
    cpu = cpu_seconds()
    start = time.monotonic()
    fn(name)
    elapsed = time.monotonic() - start
    cpu = cpu_seconds() - cpu
    settle = getattr(fn, "settle", None)
    if settle is not None:
        settle()
    cleanup(name)
    return elapsed, cpu


def hash_seconds(src: str, algorithm: str) -> float:
    """Time to read and hash the source alone, as our sinks hash while they upload (1 MiB
    updates): work the reference clients do not do, on the same CPU."""
    h = checksum.new(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f:
        start = time.monotonic()
        while n := f.readinto(buf):
            h.update(view[:n])
        return time.monotonic() - start


def read_seconds(src: str) -> float:
    """Time to read the source alone (both clients read it): what the hash time includes."""
    buf = bytearray(CHUNK)
    with open(src, "rb", buffering=0) as f:
        start = time.monotonic()
        while f.readinto(buf):
            pass
        return time.monotonic() - start


def tree_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds of a server and all its processes, and how many children it has now.

    smbd forks one child per connection; once it has reaped that child, the child's time is
    in the master's cutime/cstime, so live children plus the master's own and reaped time
    cover every connection, past and present.
    """
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    # fields[0] is field 3 of proc(5) (state): utime is field 14, cutime 16.
    total = sum(int(x) for x in stats[pid][11:15])
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        total += int(stats[child][11]) + int(stats[child][12])
    return total / tick, len(children.get(pid, []))


class ServerCpu:
    """``fn`` that also records the server's CPU seconds per upload, counted once the
    connection's server process has exited (so its last replies are in).

    The wait for that exit is ``settle``, which ``timed`` calls after it stopped the clock:
    inside the upload it added up to one 20 ms poll to every timed run.
    """

    def __init__(self, pid: int, fn: Callable[[str], None]) -> None:
        self.pid, self.fn = pid, fn
        self.spent: list[float] = []
        self._before: tuple[float, int] | None = None

    def __call__(self, name: str) -> None:
        self._before = tree_cpu(self.pid)
        self.fn(name)

    def settle(self) -> None:
        assert self._before is not None, "settle() follows an upload"
        (before, kids), self._before = self._before, None
        deadline = time.monotonic() + 10
        after, now = tree_cpu(self.pid)
        while now > kids and time.monotonic() < deadline:
            time.sleep(0.02)
            after, now = tree_cpu(self.pid)
        self.spent.append(after - before)


def smbstatus(conf: str) -> dict:
    """smbd's sessions and tree connects now (``smbstatus --json``)."""
    out = subprocess.run(
        ["smbstatus", "-s", conf, "--json"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def smbstatus_signing(conf: str) -> str:
    """The signing of the one session smbd has now, as smbstatus reports it: "full" (every
    message signed), "partial" (only the session setup) or "none", with the algorithm."""
    sessions = list(smbstatus(conf).get("sessions", {}).values())
    if len(sessions) != 1:
        return f"unknown ({len(sessions)} sessions)"
    sign = sessions[0]["signing"]
    return f"{sign['degree']} ({sign['cipher']})"


def smbclient_signing(argv: list[str], conf: str) -> str:
    """smbstatus's view of a session of ``smbclient`` (``argv`` without ``-c``), taken
    while it waits on its standard input for a command."""
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if smbstatus(conf).get("tcons"):  # session set up and share connected
                return smbstatus_signing(conf)
            time.sleep(0.05)
        return "unknown (no session within 10 s)"
    finally:
        p.kill()
        p.wait()


def cifs_signing(target: Target, settings: TransportSettings, conf: str) -> str:
    """What our SMB session negotiated with the bench's smbd: dialect, signing, encryption."""
    from smbprotocol.connection import SecurityMode, SigningAlgorithms

    algorithms = {v: k for k, v in vars(SigningAlgorithms).items() if k.isupper()}
    with open_transport(target, settings) as tr:
        tr.listdir()  # a session and a tree connect, for smbstatus
        degree = smbstatus_signing(conf)
        conn = next(iter(tr._cache.values()))
        session = next(iter(conn.session_table.values()))
        required = bool(conn.server_security_mode & SecurityMode.SMB2_NEGOTIATE_SIGNING_REQUIRED)
        algorithm = algorithms.get(conn.signing_algorithm_id, "HMAC_SHA256 or AES_CMAC")
        return (
            f"dialect {conn.dialect:#x}; ours signs every request: "
            f"{session.signing_required} ({algorithm}, smbprotocol's require_signing default; "
            f"smbstatus: signing {degree}), encrypts: {session.encrypt_data}; "
            f"the server requires signing: {required}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the transports named (e.g. s3)")
    ap.add_argument("--json", help="also write the medians here (bench/run.py reads them)")
    ap.add_argument(
        "--checksum",
        default="xxh3",
        choices=sorted(checksum.BY_CONFIG),
        help="what our sinks hash each file with in the goal rows (KDUMP_CHECKSUM; default "
        "xxh3); the other one is uploaded too, as context",
    )
    ap.add_argument(
        "--server-cpus",
        default="",
        help="move the servers to these CPUs (e.g. 1), so that only the clients share the "
        "bench's own CPUs, as in a capture kernel whose server is another machine; default: "
        "the servers share the clients' CPUs",
    )
    ap.add_argument(
        "--fresh-memory",
        action="store_true",
        help="leave free page reporting on (see bench.measure.settled_memory)",
    )
    args = ap.parse_args()
    size = args.size_mb * 1_000_000
    work = tempfile.mkdtemp(prefix="kdump-bench-")
    os.chmod(work, 0o755)
    src = os.path.join(work, "vmcore.src")
    with open(src, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    rows = []
    profiles: dict[str, str] = {}  # what limits each missed goal
    notes: dict = {}
    s3_peaks: dict[str, list[int]] = {"ours": [], "boto3": []}
    load_before = os.getloadavg()[0]
    algorithm = checksum.BY_CONFIG[args.checksum]
    # Each round uploads once per algorithm: the one asked for, then the other one.
    algorithms = [algorithm]
    if algorithm == checksum.XXH3:
        algorithms.append(checksum.SHA256)
    elif xxh3_available():
        algorithms.append(checksum.XXH3)
    settings = TransportSettings(timeout=60.0, checksum=algorithm)
    try:
        with contextlib.ExitStack() as stack:
            notes["memory"] = stack.enter_context(settled_unless(args.fresh_memory))
            ssh = stack.enter_context(sshd(os.path.join(work, "sshd")))
            ssh_dir = os.path.join(work, "sftp-out")
            os.makedirs(ssh_dir, mode=0o700)
            user = stack.enter_context(unix_user(PASSWORD))
            ftp_root = os.path.join(work, "ftp-out")
            os.makedirs(ftp_root)
            os.chmod(ftp_root, 0o777)
            os.makedirs(os.path.join(work, "vsftpd"))
            ftp = stack.enter_context(
                vsftpd(os.path.join(work, "vsftpd"), ftp_root, user, PASSWORD)
            )
            smb = stack.enter_context(
                smbd(os.path.join(work, "smbd"), os.path.join(work, "smb-out"))
            )
            s3 = stack.enter_context(seaweed(os.path.join(work, "weed")))
            if args.server_cpus:
                move_servers({int(c) for c in args.server_cpus.split(",")})
            netrc = os.path.join(work, "netrc")
            with open(netrc, "w") as f:
                f.write(f"machine 127.0.0.1 login {user} password {PASSWORD}\n")
            smbauth = os.path.join(work, "smbauth")
            with open(smbauth, "w") as f:
                f.write(f"username = {smb.user}\npassword = {smb.password}\n")
            for path in (netrc, smbauth):
                os.chmod(path, 0o600)

            cifs_target = _t(f"cifs://{smb.user}@127.0.0.1:{smb.port}/{smb.share}").replace(
                password=smb.password
            )
            ssh_settings = TransportSettings(
                timeout=60.0,
                ssh_identity=(ssh.client_key,),
                host_key=ssh.host_key,
                checksum=algorithm,
            )
            smbclient = [
                "smbclient", f"//127.0.0.1/{smb.share}", "-p", str(smb.port), "-A", smbauth,
            ]  # fmt: skip
            # Samba's client signs only the session setup unless the server requires more;
            # ours signs every request. The signed row shows what that costs smbclient.
            smb_sign = [*smbclient, "--client-protection=sign"]
            with open(os.path.join(work, "smbd", "pid", "smbd.pid")) as f:
                smbd_pid = int(f.read())
            smbd_cpu: dict[str, list[float]] = {}

            def on_smbd(key: str, fn: Callable[[str], None]) -> Callable[[str], None]:
                counted = ServerCpu(smbd_pid, fn)
                smbd_cpu[key] = counted.spent
                return counted

            # (label, ours, [(reference label, reference, counts for the goal)], cleanup)
            cases = [
                (
                    "sftp",
                    {
                        a: ours(
                            _t(f"sftp://root@127.0.0.1:{ssh.port}{ssh_dir}"),
                            ssh_settings.replace(checksum=a),
                            src,
                        )
                        for a in algorithms
                    },
                    [
                        (
                            "OpenSSH sftp -b",
                            command(lambda n: _sftp_argv(ssh, work, src, ssh_dir, n)),
                            True,
                        )
                    ],
                    lambda n: os.unlink(os.path.join(ssh_dir, n)),
                ),
                (
                    "ftp (vsftpd)",
                    # The password goes into the Target, not a URL or argv (curl: netrc).
                    {
                        a: ours(
                            _t(f"ftp://{user}@127.0.0.1:{ftp.port}{ftp_root}").replace(
                                password=PASSWORD
                            ),
                            settings.replace(checksum=a),
                            src,
                        )
                        for a in algorithms
                    },
                    [
                        (
                            "curl -T",
                            command(
                                lambda n: [
                                    "curl",
                                    "-sS",
                                    "--netrc-file",
                                    netrc,
                                    "-T",
                                    src,
                                    f"ftp://127.0.0.1:{ftp.port}{ftp_root}/{n}",
                                ]
                            ),
                            True,
                        )
                    ],
                    lambda n: os.unlink(os.path.join(ftp_root, n)),
                ),
                (
                    "cifs (smbd)",
                    {
                        a: on_smbd(
                            f"ours {a}", ours(cifs_target, settings.replace(checksum=a), src)
                        )
                        for a in algorithms
                    },
                    [
                        (
                            SMBCLIENT,
                            on_smbd(
                                SMBCLIENT, command(lambda n: [*smbclient, "-c", f"put {src} {n}"])
                            ),
                            True,
                        ),
                        (
                            SMBCLIENT_SIGNED,
                            on_smbd(
                                SMBCLIENT_SIGNED,
                                command(lambda n: [*smb_sign, "-c", f"put {src} {n}"]),
                            ),
                            False,  # context: the goal stays against smbclient's defaults
                        ),
                    ],
                    lambda n: os.unlink(os.path.join(smb.root, n)),
                ),
                (
                    "s3 (SeaweedFS)",
                    {a: s3_child("ours", src, s3, s3_peaks["ours"], a) for a in algorithms},
                    [
                        (
                            "boto3 upload_file",
                            s3_child("boto3", src, s3, s3_peaks["boto3"], algorithm),
                            True,
                        )
                    ],
                    lambda n: s3.client().delete_object(Bucket=s3.bucket, Key=n),
                ),
            ]
            if args.only:
                cases = [c for c in cases if c[0].split()[0] in args.only.split(",")]
            for label, mine, refs, cleanup in cases:
                # Alternate ours and the references, so all see the same background load.
                t_mine: dict[str, list[tuple[float, float]]] = {a: [] for a in mine}
                t_refs: list[list[tuple[float, float]]] = [[] for _ in refs]
                for i in range(args.runs):
                    for a, fn in mine.items():
                        t_mine[a].append(timed(fn, f"ours-{i}", cleanup))
                    for j, (_, ref, _) in enumerate(refs):
                        t_refs[j].append(timed(ref, f"ref{j}-{i}", cleanup))
                for a, times in t_mine.items():
                    m_mine = statistics.median(t for t, _ in times)
                    c_mine = statistics.median(c for _, c in times)
                    name = checksum.ALGORITHMS[a].config.upper()  # a row's own checksum
                    mine_label = label if a == algorithm else f"{label}, {name}"
                    for (ref_label, _, goal), t_ref in zip(refs, t_refs, strict=True):
                        m_ref = statistics.median(t for t, _ in t_ref)
                        c_ref = statistics.median(c for _, c in t_ref)
                        server = (
                            (
                                statistics.median(smbd_cpu[f"ours {a}"]),
                                statistics.median(smbd_cpu[ref_label]),
                            )
                            if ref_label in smbd_cpu
                            else None
                        )
                        row = Row(
                            mine_label, ref_label, m_mine, m_ref, size, c_mine, c_ref,
                            goal and a == algorithm, server,
                            tuple(t for t, _ in times), tuple(t for t, _ in t_ref),
                        )  # fmt: skip
                        rows.append(row)
                        print(
                            f"{mine_label:14} ours {size / m_mine / 1e6:7.1f} MB/s  "
                            f"{ref_label} {size / m_ref / 1e6:7.1f} MB/s  "
                            f"ratio {m_ref / m_mine:.2f}  "
                            f"client CPU s ours {c_mine:.2f} reference {c_ref:.2f}"
                            + (
                                f"  server CPU s ours {server[0]:.2f} reference {server[1]:.2f}"
                                if server
                                else ""
                            ),
                            flush=True,
                        )
                if any(r.goal and r.ref_s / r.ours_s < GOAL for r in rows if r.label == label):
                    profiles[f"{label} upload, ours"] = profile_upload(mine[algorithm], cleanup)
                if label.startswith("cifs"):
                    notes["cifs"] = (
                        f"{cifs_signing(cifs_target, settings, smb.conf)}; smbstatus, "
                        f"{SMBCLIENT}: signing {smbclient_signing(smbclient, smb.conf)}, "
                        f"{SMBCLIENT_SIGNED}: signing {smbclient_signing(smb_sign, smb.conf)} "
                        '("full": every message signed; "partial": the session setup only)'
                    )
            notes["hash_s"] = {
                checksum.ALGORITHMS[a].what: statistics.median(
                    hash_seconds(src, a) for _ in range(3)
                )
                for a in algorithms
            }
            notes["read_s"] = statistics.median(read_seconds(src) for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(rows, args, (load_before, os.getloadavg()[0]), s3_peaks, notes, profiles)


def _args(args) -> str:
    """The options that shape the figures, for the report's command line."""
    out = f"--size-mb {args.size_mb} --runs {args.runs}"
    if args.only:
        out += f" --only {args.only}"
    if args.server_cpus:
        out += f" --server-cpus {args.server_cpus}"
    if args.checksum != "xxh3":
        out += f" --checksum {args.checksum}"
    return out


def checksum_note(notes: dict) -> str:
    """What the checksum our sinks compute costs alone, on the bench's CPUs."""
    if "hash_s" not in notes:
        return ""
    each = ", ".join(f"{what} {s:.2f} s" for what, s in notes["hash_s"].items())
    return (
        "Ours computes the file's checksum while it uploads (the manifest's); the reference "
        f"clients do not. Reading and hashing the source alone takes: {each} (reading alone "
        f"{notes['read_s']:.2f} s), on the CPUs the bench runs on."
    )


def memory_note(info: dict | None) -> str:
    """How the run treated memory that the host takes back: the servers write every upload
    into new page cache (bench.measure.settled_memory)."""
    return f"Memory: {settled_text(info)}."


CONTEXT_NOTE = (
    "\\* context, not a goal: the 0.9x goal is ours with the checksum asked for (XXH3-128, "
    "the default KDUMP_CHECKSUM) against the reference's default settings; server CPU s: the "
    "server's processes (smbd and its per-connection child) per upload."
)


def xxh3_available() -> bool:
    """Whether this Python can hash with XXH3 (the xxhash package), as our sinks would."""
    try:
        checksum.new(checksum.XXH3)
    except NotSupported:
        return False
    return True


def _sftp_argv(ssh, work: str, src: str, out: str, name: str) -> list[str]:
    batch = os.path.join(work, "sftp.batch")
    with open(batch, "w") as f:
        f.write(f"put {src} {out}/{name}\n")
    return [
        "sftp", "-q", "-b", batch, "-P", str(ssh.port), "-i", ssh.client_key,
        "-o", f"UserKnownHostsFile={ssh.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "root@127.0.0.1",
    ]  # fmt: skip


def _t(url: str) -> Target:
    return parse_target(url)[0]


def _write(
    rows,
    args,
    load: tuple[float, float],
    s3_peaks: dict[str, list[int]],
    notes: dict,
    profiles: dict[str, str],
) -> None:
    lines = [
        "# Transport throughput on loopback",
        "",
        f"`python3 bench/transports.py {_args(args)}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, median of {args.runs} runs; "
        "ratio = reference time / our time, higher is better; 1-minute load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after).",
        "",
        "| transport | ours MB/s | reference | reference MB/s | ratio "
        "| client CPU s: ours | reference | server CPU s: ours | reference |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        server = [f"{x:.2f}" for x in r.server_cpu_s] if r.server_cpu_s else ["-", "-"]
        lines.append(
            f"| {r.label} | {r.size / r.ours_s / 1e6:.1f} | {r.ref_label} | "
            f"{r.size / r.ref_s / 1e6:.1f} | {r.ref_s / r.ours_s:.2f}{'' if r.goal else ' *'} | "
            f"{r.ours_cpu_s:.2f} | {r.ref_cpu_s:.2f} | {server[0]} | {server[1]} |"
        )
    if not all(r.goal for r in rows):
        lines += ["", CONTEXT_NOTE]
    lines += ["", *run_lines([r._asdict() for r in rows])]
    lines += ["", checksum_note(notes), "", memory_note(notes.get("memory"))]
    if "cifs" in notes:
        lines += ["", f"CIFS: {notes['cifs']}."]
    lines += profile_lines(profiles)
    if s3_peaks["ours"]:
        lines += [
            "",
            f"S3: {S3_PART >> 20} MiB parts for both; boto3 `upload_file` with its default 10 "
            "threads (parts in flight), ours with one part uploading while the next fills. "
            f"Peak RSS of the uploading process ({args.size_mb} MB, worst of the runs): ours "
            f"{max(s3_peaks['ours']) / 2**20:.1f} MiB, boto3 "
            f"{max(s3_peaks['boto3']) / 2**20:.1f} MiB.",
        ]
    if args.json:
        doc = {
            "command": f"python3 bench/transports.py {_args(args)}"
            f" (CPUs {sorted(os.sched_getaffinity(0))})",
            "load": list(load),
            "rows": [
                {
                    "label": r.label,
                    "ref_label": r.ref_label,
                    "ours_s": r.ours_s,
                    "ref_s": r.ref_s,
                    "size": r.size,
                    "ours_cpu_s": r.ours_cpu_s,
                    "ref_cpu_s": r.ref_cpu_s,
                    "goal": r.goal,
                    "ours_runs": list(r.ours_runs),
                    "ref_runs": list(r.ref_runs),
                    **(
                        {
                            "ours_server_cpu_s": r.server_cpu_s[0],
                            "ref_server_cpu_s": r.server_cpu_s[1],
                        }
                        if r.server_cpu_s
                        else {}
                    ),
                }
                for r in rows
            ],
            "context_note": CONTEXT_NOTE,
            "profiles": profiles,
            "notes": {**notes, "checksum": checksum_note(notes)},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    old = open(RESULTS).read() if args.only and os.path.exists(RESULTS) else ""
    with open(RESULTS, "w") as f:
        f.write(with_last_full_run("\n".join(lines) + "\n", old))
    print(f"wrote {RESULTS}")


def with_last_full_run(new: str, old: str) -> str:
    """The results file after a run: ``new``, and when ``old`` is the file a partial run
    (``--only``) found, the last full run's table below it (only that one)."""
    if PREVIOUS in old:  # the file holds a partial run above the last full one
        old = old.split(PREVIOUS, 1)[1]
    elif old:
        old = old.split("\n", 1)[1]  # a full run: all of it but its title
    return new + PREVIOUS + old if old else new


if __name__ == "__main__":
    main()
