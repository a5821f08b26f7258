"""Child process of test_read_back_after_a_seek_stays_within_the_writes_memory.

Reads a JSON object on stdin (``url``, ``host_key``, ``ssh_identity``: a test target and
what logs in to it), writes a file of ``mib`` MiB to it with a seek back to its start (as
the kdump writer does, so the commit reads the file back to hash it), and prints a JSON
object: ``before`` the resident KiB just before ``commit`` and ``peak`` the high-water mark
during it. A process of its own, so what earlier tests left in malloc's arenas cannot
absorb what the read-back allocates.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from kdump_capture.urls import parse_target
from transports import open_transport
from transports.base import TransportSettings

MiB = 1 << 20


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def main() -> int:
    job = json.load(sys.stdin)
    settings = TransportSettings(timeout=10.0, retries=3, retry_delay=0.05).replace(
        host_key=job.get("host_key", ""),
        ssh_identity=tuple(job.get("ssh_identity", ())),
    )
    target, _ = parse_target(job["url"])
    with open_transport(target, settings) as tr:
        # A small file first, as the save writes README.txt before the vmcore: freeing its
        # ring raises glibc's mmap threshold, so a ring from malloc would now be in the heap.
        with tr.create("README.txt") as sink:
            sink.write(b"placeholder")
            sink.commit()
        return measure(tr, job["mib"])


def measure(tr, mib: int) -> int:
    block = os.urandom(MiB)
    with tr.create("dump") as sink:
        sink.write(bytes(4096))
        for _ in range(mib):
            sink.write(block)
        sink.seek(0)
        sink.write(b"H" * 4096)
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux 4.0)
        info = sink.commit()
        peak = status("VmHWM")
    expect = hashlib.sha256(b"H" * 4096 + block * mib).hexdigest()
    json.dump({"before": before, "peak": peak, "ok": info.digest == expect}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
