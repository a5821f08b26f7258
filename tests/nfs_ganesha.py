"""An NFS server for VM tests: nfs-ganesha exporting a host directory as /dumps.

The host kernel has no NFS server, and ganesha runs in user space; only a guest kernel
mounts it (at 10.0.2.2, qemu's address for the host). Port 2049 on 127.0.0.1 is fixed:
the kernel NFS client in the guest always connects to 2049.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

NFS_PORT = 2049
# What the server speaks: "4" (NFSv4.0, 4.1 and 4.2), "4.0" (an older NFSv4 server) or "3"
# (a server without NFSv4, as a NAS with its defaults; it needs rpcbind, see rpcbind()).
SERVED = {
    "4": ("4", ""),
    "4.0": ("4", "Minor_Versions = 0;"),
    "3": ("3", ""),
}
CONF = """\
NFS_CORE_PARAM {{ Protocols = {protocols}; NFS_Port = {port}; Bind_addr = 127.0.0.1;
                 MNT_Port = 20048; Mount_Path_Pseudo = true;
                 Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Grace_Period = 1; Lease_Lifetime = 10; {minors} }}
EXPORT {{ Export_Id = 1; Path = {path}; Pseudo = /dumps; Access_Type = {access};
         Squash = {squash}; Protocols = {protocols}; Transports = TCP; SecType = sys;
         FSAL {{ Name = VFS; }} }}
"""


def _wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port}") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def rpcbind() -> Iterator[None]:
    """rpcbind in the foreground, for an NFSv3 server: the guest kernel asks it (port 111)
    where mountd is. Only in a network and mount namespace of the caller's own
    (tests/nfs_isolated.py): it listens on every address and takes /run/rpcbind.sock."""
    binary = shutil.which("rpcbind")
    if binary is None:
        raise RuntimeError("rpcbind not found (apt-get install rpcbind)")
    proc = subprocess.Popen([binary, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(111, proc, "rpcbind", 15)
        yield
    finally:
        _stop(proc)


@contextlib.contextmanager
def ganesha(
    workdir: str,
    export: str,
    startup_timeout: float = 30.0,
    served: str = "4",
    root_squash: bool = False,
    read_only: bool = False,
) -> Iterator[str]:
    """Run ganesha.nfsd in the foreground; yields the exported directory. ``served``: the
    NFS versions it speaks (SERVED); ``root_squash``: root's requests run as nobody, as
    most exports are set up by default; ``read_only``: an export nobody may write."""
    binary = shutil.which("ganesha.nfsd")
    if binary is None:
        raise RuntimeError("ganesha.nfsd not found (apt-get install nfs-ganesha nfs-ganesha-vfs)")
    os.makedirs(export, exist_ok=True)
    conf = os.path.join(workdir, "ganesha.conf")
    protocols, minors = SERVED[served]
    with open(conf, "w") as f:
        squash = "Root_Squash" if root_squash else "No_Root_Squash"
        f.write(
            CONF.format(
                port=NFS_PORT,
                path=export,
                protocols=protocols,
                minors=minors,
                squash=squash,
                access="RO" if read_only else "RW",
            )
        )
    log = os.path.join(workdir, "ganesha.log")
    argv = [binary, "-F", "-f", conf, "-L", log, "-p", os.path.join(workdir, "ganesha.pid")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(NFS_PORT, proc, f"ganesha.nfsd (see {log})", startup_timeout)
        yield export
    finally:
        _stop(proc)
