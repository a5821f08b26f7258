"""FTP test servers on 127.0.0.1: pyftpdlib in a subprocess, and vsftpd."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from .common import LOOPBACK, banner_check, free_port, process

VSFTPD = "/usr/sbin/vsftpd"

_PYFTPD = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.exceptions import _FileReadWriteError


class Dtp(DTPHandler):
    # pyftpdlib 2.2 wraps the OSError of a failed file write without its errno and
    # replies "426 None"; report ENOSPC the way RFC 959 says (452) instead.
    def handle_error(self):
        err = sys.exc_info()[1]
        cause = err.__cause__ if isinstance(err, _FileReadWriteError) else None
        if isinstance(cause, OSError) and cause.errno == 28:
            self._resp = ("452 No space left on device; transfer aborted.", print)
            self.close()
            return
        super().handle_error()

from pyftpdlib.servers import FTPServer
port, root, user, password, perm = sys.argv[1:6]
auth = DummyAuthorizer()
auth.add_user(user, password, root, perm=perm)
auth.add_anonymous(root, perm=perm)
FTPHandler.authorizer = auth
FTPHandler.dtp_handler = Dtp
FTPHandler.auth_failed_timeout = 0.1  # the default 3 s delay only slows the tests
FTPHandler.permit_foreign_addresses = False
server = FTPServer(("127.0.0.1", int(port)), FTPHandler)
server.serve_forever()
"""


@dataclass(frozen=True)
class FtpServer:
    host: str
    port: int
    user: str
    password: str
    root: str  # server-side directory that FTP path "/" (pyftpdlib) maps to
    url_root: str  # the FTP path of ``root``: "/" for pyftpdlib, ``root`` for vsftpd


@contextlib.contextmanager
def pyftpd(
    workdir: str, root: str, user: str = "kdump", password: str = "s3cret", chmod: bool = True
) -> Iterator[FtpServer]:
    """``chmod=False``: the server refuses SITE CHMOD (550), as many hosted servers do.
    The server's umask is the caller's (it is a child process)."""
    os.makedirs(root, exist_ok=True)
    port = free_port()
    log = os.path.join(workdir, "pyftpd.log")
    perm = "elradfmwMT" if chmod else "elradfmwT"  # M: SITE CHMOD
    argv = [sys.executable, "-c", _PYFTPD, str(port), root, user, password, perm]
    with process(argv, log, "pyftpdlib", banner_check(port, b"220")):
        yield FtpServer(LOOPBACK, port, user, password, root, "/")


@contextlib.contextmanager
def vsftpd(
    workdir: str, root: str, user: str, password: str, extra: str = ""
) -> Iterator[FtpServer]:
    """vsftpd with a local user (PAM password), writable, passive ports on loopback.
    ``extra``: more vsftpd.conf lines (a configuration admins run: an upload-only account,
    a permissive umask), which win over the ones here."""
    os.makedirs(root, exist_ok=True)
    os.makedirs("/var/run/vsftpd/empty", exist_ok=True)  # its secure_chroot_dir
    port = free_port()
    pasv = free_port()
    conf = os.path.join(workdir, "vsftpd.conf")
    with open(conf, "w") as f:
        f.write(
            "listen=YES\nlisten_ipv6=NO\n"
            f"listen_address={LOOPBACK}\nlisten_port={port}\nbackground=NO\n"
            "anonymous_enable=NO\nlocal_enable=YES\nwrite_enable=YES\nlocal_umask=077\n"
            "chmod_enable=YES\npasv_enable=YES\n"
            f"pasv_address={LOOPBACK}\npasv_min_port={pasv}\npasv_max_port={pasv + 20}\n"
            "seccomp_sandbox=NO\nisolate=NO\nisolate_network=NO\ncheck_shell=NO\n"
            "pam_service_name=vsftpd\nuserlist_enable=NO\n"
            f"xferlog_enable=YES\nvsftpd_log_file={workdir}/vsftpd.xfer.log\n"
            "secure_chroot_dir=/var/run/vsftpd/empty\n"
        )
        f.write(extra)
    log = os.path.join(workdir, "vsftpd.log")
    with process([VSFTPD, conf], log, "vsftpd", banner_check(port, b"220")):
        yield FtpServer(LOOPBACK, port, user, password, root, root)
