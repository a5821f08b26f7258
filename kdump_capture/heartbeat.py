"""The save's heartbeat to the capture kernel's /init, which stops a save that hangs.

/init runs the save with the write end of a pipe and its number in ``KDUMP_HEARTBEAT_FD``.
The save writes a line with the number of source bytes done so far whenever progress is
made (at most once a second). /init also counts the save's own reads and writes (the
``rchar``/``wchar`` of /proc/PID/io, over the save and its children), so work that moves
no dump bytes (page filtering, a KDUMP_TRANSFER command) counts as progress too. When
neither moves for the watchdog's timeout (KDUMP_SAVE_TIMEOUT), /init sends SIGUSR1, which
the save turns into a recorded failure; after a grace period it sends SIGKILL. When the
SIGUSR1 came while a KDUMP_PRESCRIPT or KDUMP_POSTSCRIPT hung, the save may instead stop
that script and go on (KDUMP_CONTINUE_ON_ERROR): it writes the line ``resumed``, and /init
takes back the SIGKILL and watches it afresh.
docs/ARCHITECTURE.md ("Watchdog") describes the protocol.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .progress import Progress

log = logging.getLogger(__name__)

ENV = "KDUMP_HEARTBEAT_FD"
# At most one line a second: /init measures silence in tens of seconds.
INTERVAL = 1.0
# After SIGUSR1, how long /init waits before SIGKILL: enough to write the failure record
# (README and manifest, a few KiB) to a target that still answers.
GRACE = 15
# The line that cancels the SIGKILL after a SIGUSR1 (Heartbeat.resumed; /init's _watch).
RESUMED = b"resumed"


def watchdog_timeout(save_timeout: int, net_timeout: int) -> int:
    """Seconds without progress after which /init stops the save (KDUMP_SAVE_TIMEOUT).

    0 means automatic: a network call may wait KDUMP_NET_TIMEOUT (at least 5 s) for the
    reconnect and again for the call, four times (three retries), plus 14 s of backoff,
    all without a byte of progress: 8 waits plus a minute of margin (300 s by default).
    """
    if save_timeout > 0:
        return save_timeout
    return 8 * max(net_timeout, 5) + 60


class Heartbeat:
    """Writes progress lines to /init's pipe; does nothing without one. Never blocks."""

    def __init__(self, fd: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.fd = fd
        self.clock = clock
        self.last = float("-inf")
        if fd is not None:
            os.set_blocking(fd, False)  # a full pipe drops a beat; it never stalls the save

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Heartbeat:
        """The pipe /init passed in ``KDUMP_HEARTBEAT_FD``; a value that is not one is ignored."""
        text = environ.get(ENV, "")
        if not text.isdigit():
            return cls(None)
        fd = int(text)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise OSError(f"{ENV}={fd} is not a pipe")
        except OSError as e:
            log.warning("no heartbeat to /init: %s", e)
            return cls(None)
        return cls(fd)

    def beat(self, done: int, force: bool = False) -> None:
        """Tell /init that ``done`` source bytes are through (rate-limited unless ``force``)."""
        if self.fd is None:
            return
        now = self.clock()
        if not force and now - self.last < INTERVAL:
            return
        self.last = now
        try:
            os.write(self.fd, f"{done}\n".encode())
        except BlockingIOError:
            pass  # /init is behind; the next beat will do
        except OSError as e:  # /init is gone (EPIPE): nobody to tell
            log.debug("heartbeat: %s", e)
            self.fd = None

    def resumed(self) -> None:
        """Tell /init that the save, stopped by its SIGUSR1 while one of the
        administrator's commands made no progress, stopped that command and goes on
        (KDUMP_CONTINUE_ON_ERROR): /init then does not kill it, and watches it afresh."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, RESUMED + b"\n")
        except OSError as e:  # a full pipe: /init kills the save after GRACE, as before
            log.warning("heartbeat: could not tell /init the save goes on: %s", e)

    def around(self, progress: Progress) -> Progress:
        """``progress`` with a beat at every update."""
        return progress if self.fd is None else _BeatingProgress(progress, self)


class _BeatingProgress:
    def __init__(self, inner: Progress, heartbeat: Heartbeat) -> None:
        self.inner = inner
        self.heartbeat = heartbeat
        self.done = 0

    def start(self, label: str, total: int | None) -> None:
        self.inner.start(label, total)
        self.heartbeat.beat(self.done, force=True)

    def update(self, n: int) -> None:
        self.inner.update(n)
        self.done += n
        self.heartbeat.beat(self.done)

    def finish(self) -> None:
        self.inner.finish()
        self.heartbeat.beat(self.done, force=True)
