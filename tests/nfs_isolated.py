"""One crash-capture cycle against an NFS server that speaks only some versions, in a network
and mount namespace of its own: ``unshare --net --mount --propagation private -- python3 -m
tests.nfs_isolated WORK SERVED CONFIG``.

An NFSv3 server needs rpcbind on port 111, which listens on every address and owns
/run/rpcbind.sock: here it, ganesha and qemu (whose user-mode network takes the guest's
10.0.2.2 to this namespace's loopback) run where nothing else can see them. The result goes
to WORK/result.json; the dump is in WORK/export, on the host's file system.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from tests import capture_cycle, nfs_ganesha, vmkit


def isolate() -> None:
    """Loopback up, with a second address: glibc's getaddrinfo (AI_ADDRCONFIG, as ganesha
    asks) finds no IPv4 host address if 127.0.0.1 is the only one. A private /run."""
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"],
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "kdump-test-run", "/run"],
    ):
        subprocess.run(argv, check=True)


def main(work: Path, served: str, config: str) -> None:
    isolate()
    kernel = vmkit.get_kernel()  # cached by the caller (no network here to download it)
    with nfs_ganesha.rpcbind() if served == "3" else contextlib.nullcontext():
        with nfs_ganesha.ganesha(str(work), str(work / "export"), served=served):
            res = capture_cycle.run_cycle(kernel, config, work / "cycle", net=True, timeout=600)
    (work / "result.json").write_text(
        json.dumps(
            {
                "save_rc": res.save_rc,
                "finish": res.finish,
                "returncode": res.returncode,
                "marker": res.marker,
                "log_path": str(res.log_path),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
