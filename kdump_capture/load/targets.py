"""``check`` tries every target before a crash does.

A wrong password, an unknown host key, a mistyped directory or an export that takes no
writes is otherwise found only at the crash, when the dump is lost. ``check`` connects to
each ``KDUMP_SAVEDIR`` target as the save would (same transport, credentials, host key and
time limits), lists its directory and asks its free space; with ``--write-test`` it also
writes a small file in a directory of its own (``.kdump-capture-check-*``: no dump name, so
rotation and ``list`` never take it for one), reads it back and deletes both.

What it cannot tell: the capture kernel reaches the target through its own network set-up
(``KDUMP_NETCONFIG``), which the running system does not use.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import Interrupted, KdumpError

log = logging.getLogger(__name__)

PROBE_PREFIX = ".kdump-capture-check-"
PROBE_DATA = b"kdump-capture check: this file is deleted at once\n"


@dataclass
class TargetReport:
    target: str  # redacted
    problem: str | None  # None: the target works
    free: int | None = None  # bytes, when the protocol tells
    wrote: bool = False
    how: str = ""  # what was done, when not the usual

    def line(self) -> str:
        if self.problem:
            return f"target:         {self.target}: FAILED: {self.problem}"
        how = self.how or (
            "written, read back and deleted a test file" if self.wrote else "reachable, listed"
        )
        free = f"; {self.free / (1 << 30):.1f} GiB free" if self.free is not None else ""
        return f"target:         {self.target}: ok ({how}{free})"


def probe_target(target, settings, write: bool) -> TargetReport:
    """Try one target as the save would; never raises for what the target does."""
    from transports import open_transport

    shown = target.redacted()
    if target.scheme == "file" and not write and not os.path.lexists(target.path):
        # Read-only, nothing is created; the save creates the directory (0700).
        parent = os.path.dirname(target.path.rstrip("/")) or "/"
        while not os.path.isdir(parent) and parent != "/":
            parent = os.path.dirname(parent)
        try:
            st = os.statvfs(parent)
        except OSError as e:
            return TargetReport(shown, f"{parent}: {e.strerror}")
        how = f"does not exist yet: the save creates it in {parent}"
        return TargetReport(shown, None, st.f_bavail * st.f_frsize, how=how)
    try:
        with open_transport(target, settings) as tr:
            tr.listdir("")
            free = tr.free_space("")
            if write:
                _write_test(tr)
    except Interrupted:
        raise  # SIGTERM: the probe's directory is gone (_write_test), the other targets wait
    except KdumpError as e:
        return TargetReport(shown, str(e))
    except OSError as e:  # a transport that let one through: still the target's answer
        return TargetReport(shown, e.strerror or str(e))
    return TargetReport(shown, None, free, write)


def _write_test(tr) -> None:
    name = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        # Inside the try: a signal while waiting for the reply to the mkdir leaves the
        # directory made on the server all the same.
        tr.makedir(name)
        sink = tr.create(f"{name}/probe")
        try:
            sink.write(PROBE_DATA)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        back = b"".join(tr.read(f"{name}/probe", limit=len(PROBE_DATA)))
        if back != PROBE_DATA:
            raise KdumpError(
                f"{tr.describe()}: the test file read back differs from what was written"
            )
    except BaseException:
        try:
            tr.remove_tree(name)
        except (KdumpError, OSError) as e:  # the first error is the one to report
            log.warning("%s/%s: the test directory may be left there: %s", tr.describe(), name, e)
        raise
    tr.remove_tree(name)


def probe_targets(cfg: Mapping[str, str], write: bool) -> list[TargetReport]:
    from ..cli import transport_settings

    settings = transport_settings(cfg, replay_bytes=4 << 20, read_only=not write)
    return [probe_target(t, settings, write) for t in cfg.savedir]
