"""A throw-away Samba server on 127.0.0.1 with its own state directories and passdb."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .common import LOOPBACK, free_port, port_check, process, run

SMBD = "/usr/sbin/smbd"
SHARE = "dumps"
SMB_USER = "root"  # a passdb entry of our own; the system password is never touched


@dataclass(frozen=True)
class SmbServer:
    host: str
    port: int
    user: str
    password: str
    share: str
    root: str  # server-side directory of the share
    conf: str


@contextlib.contextmanager
def smbd(
    workdir: str, root: str, password: str = "smb-s3cret", masks: bool = True, extra: str = ""
) -> Iterator[SmbServer]:
    """``masks=False``: Samba's default create and directory masks (0744, 0755), so the
    modes of what a client creates are up to the client (tests of our own modes).
    ``extra``: more lines for the share (a configuration admins run)."""
    os.makedirs(root, exist_ok=True)
    dirs = {k: os.path.join(workdir, k) for k in ("private", "lock", "state", "cache", "pid")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    port = free_port()
    conf = os.path.join(workdir, "smb.conf")
    with open(conf, "w") as f:
        f.write(
            "[global]\n"
            "server role = standalone server\n"
            f"smb ports = {port}\n"
            f"interfaces = {LOOPBACK}\nbind interfaces only = yes\n"
            f"private dir = {dirs['private']}\nlock directory = {dirs['lock']}\n"
            f"state directory = {dirs['state']}\ncache directory = {dirs['cache']}\n"
            f"pid directory = {dirs['pid']}\nncalrpc dir = {dirs['state']}/ncalrpc\n"
            f"passdb backend = tdbsam:{dirs['private']}/passdb.tdb\n"
            f"log file = {workdir}/smbd.log\nlog level = 1\n"
            "load printers = no\nprinting = bsd\nprintcap name = /dev/null\n"
            "disable spoolss = yes\nserver min protocol = SMB2_10\n"
            "map to guest = never\nrestrict anonymous = 2\n"
            f"[{SHARE}]\npath = {root}\nread only = no\n"
        )
        if masks:
            f.write(
                "create mask = 0600\nforce create mode = 0600\n"
                "directory mask = 0700\nforce directory mode = 0700\n"
            )
        f.write(extra)
    run(["smbpasswd", "-c", conf, "-a", "-s", SMB_USER], input=f"{password}\n{password}\n")
    log = os.path.join(workdir, "smbd.log")
    argv = [SMBD, "--foreground", "--no-process-group", "-s", conf, "--debug-stdout"]
    with process(argv, log, "smbd", port_check(port)):
        yield SmbServer(LOOPBACK, port, SMB_USER, password, SHARE, root, conf)
