"""Loopback throughput of each network transport against the reference client.

Starts the same throw-away servers the tests use (sshd, vsftpd, smbd on 127.0.0.1),
uploads one file (default 1 GB) with our transport and with the reference client
(OpenSSH ``sftp -b``, ``curl -T``, ``smbclient put``), several runs each, and prints
the medians and ratios; the table also goes to bench/results/transports.md.

    python3 bench/transports.py [--size-mb 1024] [--runs 3]
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
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdump_capture.urls import Target, parse_target  # noqa: E402
from tests.servers.common import unix_user  # noqa: E402
from tests.servers.ftp import vsftpd  # noqa: E402
from tests.servers.samba import smbd  # noqa: E402
from tests.servers.sshd import sshd  # noqa: E402
from transports import open_transport  # noqa: E402
from transports.base import TransportSettings  # noqa: E402

CHUNK = 1 << 20  # what the engine hands a sink: 1 MiB memoryviews of one reused buffer
PASSWORD = "kdump-Bench-pw1"


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


def command(argv_for: Callable[[str], list[str]]) -> Callable[[str], None]:
    def upload(name: str) -> None:
        subprocess.run(argv_for(name), check=True, capture_output=True)

    return upload


def timed(fn: Callable[[str], None], name: str, cleanup: Callable[[str], None]) -> float:
    start = time.monotonic()
    fn(name)
    elapsed = time.monotonic() - start
    cleanup(name)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the medians here (bench/run.py reads them)")
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
    load_before = os.getloadavg()[0]
    settings = TransportSettings(timeout=60.0)
    try:
        with contextlib.ExitStack() as stack:
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
            netrc = os.path.join(work, "netrc")
            with open(netrc, "w") as f:
                f.write(f"machine 127.0.0.1 login {user} password {PASSWORD}\n")
            smbauth = os.path.join(work, "smbauth")
            with open(smbauth, "w") as f:
                f.write(f"username = {smb.user}\npassword = {smb.password}\n")
            for path in (netrc, smbauth):
                os.chmod(path, 0o600)

            ssh_settings = TransportSettings(
                timeout=60.0, ssh_identity=(ssh.client_key,), host_key=ssh.host_key
            )
            cases = [
                (
                    "sftp",
                    "OpenSSH sftp -b",
                    ours(_t(f"sftp://root@127.0.0.1:{ssh.port}{ssh_dir}"), ssh_settings, src),
                    command(lambda n: _sftp_argv(ssh, work, src, ssh_dir, n)),
                    lambda n: os.unlink(os.path.join(ssh_dir, n)),
                ),
                (
                    "ftp (vsftpd)",
                    "curl -T",
                    # The password goes into the Target, not a URL or argv (curl: netrc).
                    ours(
                        replace(
                            _t(f"ftp://{user}@127.0.0.1:{ftp.port}{ftp_root}"), password=PASSWORD
                        ),
                        settings,
                        src,
                    ),
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
                    lambda n: os.unlink(os.path.join(ftp_root, n)),
                ),
                (
                    "cifs (smbd)",
                    "smbclient put",
                    ours(
                        replace(
                            _t(f"cifs://{smb.user}@127.0.0.1:{smb.port}/{smb.share}"),
                            password=smb.password,
                        ),
                        settings,
                        src,
                    ),
                    command(
                        lambda n: [
                            "smbclient",
                            f"//127.0.0.1/{smb.share}",
                            "-p",
                            str(smb.port),
                            "-A",
                            smbauth,
                            "-c",
                            f"put {src} {n}",
                        ]
                    ),
                    lambda n: os.unlink(os.path.join(smb.root, n)),
                ),
            ]
            for label, ref_label, mine, ref, cleanup in cases:
                # Alternate ours and the reference, so both see the same background load.
                t_mine, t_ref = [], []
                for i in range(args.runs):
                    t_mine.append(timed(mine, f"ours-{i}", cleanup))
                    t_ref.append(timed(ref, f"ref-{i}", cleanup))
                m_mine, m_ref = statistics.median(t_mine), statistics.median(t_ref)
                rows.append((label, ref_label, m_mine, m_ref, size))
                print(
                    f"{label:14} ours {size / m_mine / 1e6:7.1f} MB/s  "
                    f"{ref_label} {size / m_ref / 1e6:7.1f} MB/s  ratio {m_ref / m_mine:.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(rows, args, (load_before, os.getloadavg()[0]))


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


def _write(rows, args, load: tuple[float, float]) -> None:
    """Print the table; with --json, also the figures for bench/run.py (which writes the
    results files: nothing under bench/results is written by hand or by this alone)."""
    lines = [
        "| transport | ours MB/s | reference | reference MB/s | ratio |",
        "|---|---:|---|---:|---:|",
    ]
    for label, ref_label, m_mine, m_ref, size in rows:
        lines.append(
            f"| {label} | {size / m_mine / 1e6:.1f} | {ref_label} | "
            f"{size / m_ref / 1e6:.1f} | {m_ref / m_mine:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        cpus = sorted(os.sched_getaffinity(0))
        doc = {
            "command": f"python3 bench/transports.py --size-mb {args.size_mb} --runs {args.runs}"
            f" (CPUs {cpus})",
            "load": list(load),
            "rows": [
                {"label": a, "ref_label": b, "ours_s": c, "ref_s": d, "size": e}
                for a, b, c, d, e in rows
            ],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f)


if __name__ == "__main__":
    main()
