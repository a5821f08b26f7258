"""An NFSv4 server for VM tests: nfs-ganesha exporting a host directory as /dumps.

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
CONF = """\
NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1;
                 Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Grace_Period = 1; Lease_Lifetime = 10; }}
EXPORT {{ Export_Id = 1; Path = {path}; Pseudo = /dumps; Access_Type = RW;
         Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys;
         FSAL {{ Name = VFS; }} }}
"""


@contextlib.contextmanager
def ganesha(workdir: str, export: str, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ganesha.nfsd in the foreground; yields the exported directory."""
    binary = shutil.which("ganesha.nfsd")
    if binary is None:
        raise RuntimeError("ganesha.nfsd not found (apt-get install nfs-ganesha nfs-ganesha-vfs)")
    os.makedirs(export, exist_ok=True)
    conf = os.path.join(workdir, "ganesha.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(port=NFS_PORT, path=export))
    log = os.path.join(workdir, "ganesha.log")
    argv = [binary, "-F", "-f", conf, "-L", log, "-p", os.path.join(workdir, "ganesha.pid")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ganesha.nfsd exited ({proc.returncode}); see {log}")
            try:
                socket.create_connection(("127.0.0.1", NFS_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ganesha.nfsd not listening on {NFS_PORT}; see {log}"
                    ) from None
                time.sleep(0.2)
        yield export
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
