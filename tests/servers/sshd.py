"""A throw-away OpenSSH server on 127.0.0.1 with its own host key, client key and config."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .common import LOOPBACK, banner_check, free_port, process, run

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    host_key: str  # "<type> <base64>" as KDUMP_HOST_KEY spells it
    client_key: str  # private key file authorized for root
    known_hosts: str  # a known_hosts file naming this server as [host]:port
    workdir: str


@contextlib.contextmanager
def sshd(workdir: str, subsystem: str = SFTP_SERVER, extra: str = "") -> Iterator[SshServer]:
    """``subsystem``: the command sshd runs for SFTP (OpenSSH's sftp-server, or a wrapper
    around it that misbehaves). ``extra``: more sshd_config lines, after ours (``Match``
    blocks included: a configuration admins run)."""
    os.makedirs(workdir, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    hostkey = os.path.join(workdir, "ssh_host_ed25519_key")
    clientkey = os.path.join(workdir, "id_ed25519")
    for path in (hostkey, clientkey):
        if not os.path.exists(path):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path])
    with open(clientkey + ".pub") as f:
        pub = f.read()
    authorized = os.path.join(workdir, "authorized_keys")
    with open(authorized, "w") as f:
        f.write(pub)
    os.chmod(authorized, 0o600)
    with open(hostkey + ".pub") as f:
        ktype, kb64 = f.read().split()[:2]
    port = free_port()
    known = os.path.join(workdir, "known_hosts")
    with open(known, "w") as f:
        f.write(f"[{LOOPBACK}]:{port} {ktype} {kb64}\n")
    conf = os.path.join(workdir, "sshd_config")
    with open(conf, "w") as f:
        f.write(
            f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {hostkey}\n"
            f"PidFile {workdir}/sshd.pid\nAuthorizedKeysFile {authorized}\n"
            "PermitRootLogin yes\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nMaxStartups 50\nMaxSessions 50\n"
            f"Subsystem sftp {subsystem}\n"
        )
        f.write(extra)
    log = os.path.join(workdir, "sshd.log")
    argv = [SSHD, "-D", "-e", "-f", conf]
    with process(argv, log, "sshd", banner_check(port, b"SSH-")):
        yield SshServer(LOOPBACK, port, f"{ktype} {kb64}", clientkey, known, workdir)
