"""bench/transports.py's timing: what it measures of one upload."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from bench import transports as bt


def test_the_wait_for_the_server_is_not_timed():
    """ServerCpu waits after an upload until the connection's server process has exited,
    to count its CPU. That wait is the server's, not the client's: ``timed`` stops the clock
    before it (it once added up to a 20 ms poll to every CIFS run, ours and smbclient's)."""

    def upload(name: str) -> None:
        # A "connection process" of this process that outlives the upload by 0.5 s, reaped
        # by a thread as smbd reaps its children.
        child = subprocess.Popen(["sleep", "0.5"])
        threading.Thread(target=child.wait, daemon=True).start()

    counted = bt.ServerCpu(os.getpid(), upload)
    cleaned: list[str] = []
    start = time.monotonic()
    elapsed, _ = bt.timed(counted, "x", cleaned.append)
    total = time.monotonic() - start
    assert elapsed < 0.25, elapsed
    assert total >= 0.45, "settle() returned before the server's process exited"
    assert cleaned == ["x"]
    assert len(counted.spent) == 1 and counted.spent[0] >= 0
