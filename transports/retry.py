"""Reconnect-and-resume support shared by the network transports.

Three pieces, all free of library imports so any transport can use them:

- ``is_connection_lost(exc)``: the pure predicate deciding whether an exception means
  "the connection broke" (worth a reconnect) as opposed to "the server said no".
  Transports convert their library's exceptions into our error tree first, so the
  predicate only knows the standard library and ``kdump_capture.errors``.
- ``retry_call``: run an operation, and on a lost connection reconnect and run it again,
  a bounded number of times with bounded delays taken from ``TransportSettings``.
  ``AuthError`` is never retried.
- ``ReplayBuffer``: the bytes a sink wrote recently, so after a reconnect it can replay
  everything the server had not confirmed yet.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import posixpath
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from kdump_capture.errors import AuthError, ConnectionLost, TransportError
from kdump_capture.urls import Target

from .base import Transport, TransportSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# A sink keeps this much recently written data for replay. 16 MiB covers several seconds
# of in-flight data on a fast link (SFTP pipelining keeps at most 8 MiB unacknowledged,
# FTP caps the socket send buffer far below this) at a cost the capture kernel can afford.
REPLAY_LIMIT = 16 << 20
# Sinks hand writes to the replay buffer in pieces of at most this size, so a write of
# any size leaves room for everything still unconfirmed (8 MiB at most).
REPLAY_STEP = 1 << 20

# Errnos that mean the path to the server broke, not that the server refused something.
CONNECTION_LOST_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    }
)

# FTP replies meaning the control or data connection went away (RFC 959): 421 service
# closing, 425 cannot open data connection, 426 connection closed; transfer aborted.
FTP_CONNECTION_REPLIES = ("421", "425", "426")


# Each wait for a server is bounded by the timeout, but a server that trickles a byte at a
# time resets every such wait: an FTP greeting, an SFTP reply or an S3 reply one byte a
# second held a save for good. An operation as a whole (a listing, a mkdir with its checks,
# a login, one S3 request) is bounded too, by this many timeouts.
OP_TIMEOUTS = 4
# A read of a file of known largest size (a manifest) may take the operation's deadline plus
# its size at this rate (a slow link's, 64 kbit/s): a server trickling a manifest held
# rotation for good.
MIN_READ_RATE = 8 << 10


@contextlib.contextmanager
def deadline(seconds: float, what: str, drop: Callable[[], None]) -> Iterator[threading.Event]:
    """Bound the body by ``seconds``: past them ``drop`` shuts the connection down, the
    waiting call fails, and so does the body, with ConnectionLost (retried as any drop).
    Yields the event set when the time is up (a body that reconnects must stop there)."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        log.warning("%s: not done within %.0f s; dropping the connection", what, seconds)
        try:
            drop()
        except Exception as e:  # closing on its own meanwhile
            log.debug("dropping the connection: %s", e)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    except Exception as e:
        if fired.is_set():
            raise ConnectionLost(f"{what}: not done within {seconds:.0f} s") from e
        raise
    else:
        # A socket shut down may also read as a clean end: a reply cut short, never taken.
        if fired.is_set():
            raise ConnectionLost(f"{what}: not done within {seconds:.0f} s")
    finally:
        timer.cancel()


def shut_down(sock) -> None:
    """Shut a socket down both ways (a waiting recv returns at once); None is fine."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class CannotResume(ConnectionLost):
    """The connection broke and the server lacks bytes we no longer hold; retrying is futile."""


def is_connection_lost(exc: BaseException) -> bool:
    """True if ``exc`` means the connection broke and a reconnect may help."""
    if isinstance(exc, (AuthError, CannotResume)):
        return False
    if isinstance(exc, ConnectionLost):
        return True
    if isinstance(exc, TransportError):
        return False
    if isinstance(exc, (EOFError, socket.timeout, ConnectionError)):
        return True
    # Only transports.ftp raises ftplib's errors; the other transports need not import it
    # (and ssl with it: 7-10 ms of an SFTP save's start-up; smbprotocol and S3 load ssl anyway).
    ftplib = sys.modules.get("ftplib")
    if ftplib is not None and isinstance(exc, ftplib.error_temp):
        return str(exc)[:3] in FTP_CONNECTION_REPLIES
    if isinstance(exc, OSError):
        return exc.errno in CONNECTION_LOST_ERRNOS
    return False


def retry_delays(settings: TransportSettings) -> list[float]:
    """The waits before each retry: ``retry_delay`` doubling, capped at 4x."""
    base = max(0.0, settings.retry_delay)
    return [min(base * (2**i), base * 4) for i in range(max(0, settings.retries))]


def retry_call(
    op: Callable[[], T],
    reconnect: Callable[[], None],
    settings: TransportSettings,
    what: str,
    first_error: BaseException | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``op``; on a lost connection call ``reconnect`` and run ``op`` again.

    At most ``settings.retries`` retries. Errors that are not a lost connection
    propagate at once; a failing ``reconnect`` counts as a failed attempt (unless it is
    an ``AuthError``, which propagates). When attempts run out, raises ``ConnectionLost``.
    ``first_error``: the caller already saw the connection break; start by reconnecting.
    """
    delays = retry_delays(settings)
    last = first_error
    for attempt in range(1 if first_error is not None else 0, len(delays) + 1):
        if attempt:
            log.warning(
                "%s: connection lost (%s); retry %d of %d in %.1fs",
                what,
                last,
                attempt,
                len(delays),
                delays[attempt - 1],
            )
            sleep(delays[attempt - 1])
            try:
                reconnect()
            except Exception as e:
                if not is_connection_lost(e):
                    raise
                last = e
                continue
        try:
            return op()
        except Exception as e:
            if not is_connection_lost(e):
                raise
            last = e
    raise ConnectionLost(f"{what}: connection lost and {len(delays)} retries failed: {last}")


def _ring(size: int) -> mmap.mmap | bytearray:
    """``size`` zero bytes, resident at once, in a mapping of their own.

    Resident at once (MAP_POPULATE), as ``bytearray(size)`` is by zero-filling: a sink's
    memory is then the same whatever the file's size, and a capture kernel short of memory
    finds out when the sink is made, not halfway. A mapping of its own, not malloc: glibc
    raises its mmap threshold to the size of the first large block freed, so the second
    sink's 16 MiB ring came from the heap, and freeing it there gave nothing back to the
    kernel (``release`` would have freed nothing). Private: MAP_SHARED anonymous memory
    counts as shared memory (RssShmem), not the process's own.
    """
    if size <= 0:
        return bytearray()
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


class ReplayBuffer:
    """Copies of the most recently written byte ranges, at most ``limit`` bytes.

    Append-only streams replay from the offset the server confirmed (``since``);
    after a seek, sinks replay every range written since the last sync point (``all``).
    Must not keep the caller's memoryview: ``add`` copies, into one ring of ``limit``
    bytes allocated up front, so a long upload allocates nothing per write. The views
    that ``since`` and ``all`` return point into the ring: valid until the next ``add``.
    Sinks may also send straight from them (``since`` merges adjacent ranges).
    """

    def __init__(self, limit: int = REPLAY_LIMIT) -> None:
        self.limit = limit
        self._ring = _ring(limit)
        self._view = memoryview(self._ring)
        self._head = 0  # ring index of the next byte to store
        self._records: deque[tuple[int, int, int]] = deque()  # (offset, ring index, length)
        self._bytes = 0
        self.dropped = False

    def add(self, offset: int, data: bytes | memoryview) -> list[memoryview]:
        """Copy ``data``, written at ``offset``; returns the copy (two views if it wrapped)."""
        data = memoryview(data).cast("B")
        n = len(data)
        if n > self.limit:  # only the tail fits
            data, offset, n = data[n - self.limit :], offset + n - self.limit, self.limit
            self.dropped = True
        while self._records and self._bytes + n > self.limit:
            self._bytes -= self._records.popleft()[2]
            self.dropped = True
        if not self._records:
            self._head = 0  # empty: start over so the next ranges stay contiguous
        first = min(n, self.limit - self._head)
        self._ring[self._head : self._head + first] = data[:first]
        self._records.append((offset, self._head, first))
        copy = [self._view[self._head : self._head + first]]
        if first < n:  # wrap around
            self._ring[: n - first] = data[first:]
            self._records.append((offset + first, 0, n - first))
            copy.append(self._view[: n - first])
        self._head = (self._head + n) % self.limit
        self._bytes += n
        return copy

    def clear(self) -> None:
        """A sync point: everything written so far is confirmed by the server."""
        self._records.clear()
        self._bytes = 0
        self.dropped = False

    def release(self) -> None:
        """Give the ring back: the server has everything and nothing more will be written.

        A sink that reads its file back to hash it (after a seek) calls this first, so the
        read-back's buffers come in place of the ring, not on top of it: the read-back of
        the 100 MB kdump file of a 64 GiB machine over SFTP put 2.5-3 MiB above the ring
        (paramiko's thread buffers what arrives), that of a 1 GiB machine's 2 MB file 1 MiB.
        """
        self.clear()
        self.limit = self._head = 0
        ring, self._ring = self._ring, bytearray()
        self._view.release()  # views sliced from it stay valid: they hold the buffer
        self._view = memoryview(self._ring)
        if isinstance(ring, mmap.mmap):
            try:
                ring.close()
            except BufferError:  # a view from since() or all() still held: unmapped with it
                log.debug("replay ring still referenced; unmapped when the last view goes")

    @property
    def held(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def kept_from(self, offset: int, n: int) -> int:
        """Lowest offset still held after ``add(offset, <n bytes>)`` (append-only streams)."""
        held = self._bytes
        for off, _, length in self._records:
            if held + n <= self.limit:
                return off
            held -= length
        return offset + max(0, n - self.limit)

    @property
    def start(self) -> int:
        """Lowest stream offset still held (append-only streams)."""
        return self._records[0][0] if self._records else -1

    def all(self) -> list[tuple[int, memoryview]]:
        """Every held range in write order; a complete replay only if nothing was
        ``dropped``, or if the sink made sure the server has every range dropped."""
        return [(off, self._view[pos : pos + n]) for off, pos, n in self._records]

    @property
    def end(self) -> int:
        """Stream offset just past the last held byte (append-only streams)."""
        if not self._records:
            return 0
        off, _, n = self._records[-1]
        return off + n

    def since(self, confirmed: int) -> list[tuple[int, memoryview]]:
        """Ranges covering ``[confirmed, end)`` of an append-only stream, adjacent ones merged.

        Raises ``CannotResume`` if the buffer no longer holds byte ``confirmed``.
        """
        end = self.end
        if confirmed == end:
            return []
        if confirmed > end or not self._records or confirmed < self._records[0][0]:
            raise CannotResume(
                f"cannot resume: the server holds {confirmed} bytes but only bytes "
                f"{max(self.start, 0)}..{end} are still buffered for replay"
            )
        spans: list[list[int]] = []  # [offset, ring index, length]
        for off, pos, n in self._records:
            if off + n <= confirmed:
                continue
            skip = max(0, confirmed - off)
            off, pos, n = off + skip, pos + skip, n - skip
            last = spans[-1] if spans else None
            if last and last[0] + last[2] == off and last[1] + last[2] == pos:
                last[2] += n
            else:
                spans.append([off, pos, n])
        return [(off, self._view[pos : pos + n]) for off, pos, n in spans]


class RetryingTransport(Transport):
    """What the network transports share: a root path on the server, and operations that
    reconnect and retry when the connection breaks.

    Subclasses provide ``_open`` (connect, replacing any old connection), ``convert`` (a
    library exception to our error tree, once, here at the boundary) and ``_ensure_root``.
    """

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self.root = target.path

    def _p(self, relpath: str) -> str:
        return posixpath.join(self.root, relpath.strip("/")) if relpath.strip("/") else self.root

    def _open(self) -> None:
        raise NotImplementedError

    # Whether ``call`` bounds each attempt by OP_TIMEOUTS timeouts (``deadline``): S3
    # bounds each request instead, CIFS has its own.
    bounded_ops = True

    def _drop_connection(self) -> None:
        """Shut the connection's socket down (from another thread: ``deadline``)."""

    @property
    def op_deadline(self) -> float:
        return OP_TIMEOUTS * max(self.settings.timeout, 1.0)

    def read_deadline(self, limit: int | None) -> float | None:
        """Seconds a whole read of at most ``limit`` bytes may take, reconnects included
        (None: no limit given, as for a dump's own files, which move on as they go)."""
        return None if limit is None else self.op_deadline + limit / MIN_READ_RATE

    def _open_bounded(self) -> None:
        if not self.bounded_ops:
            return self._open()
        with deadline(self.op_deadline, f"connecting to {self.describe()}", self._drop_connection):
            self._open()

    def _ensure_root(self) -> None:
        raise NotImplementedError

    def convert(self, e: BaseException, what: str) -> Exception:
        raise NotImplementedError

    def connect(self) -> None:
        self._open_bounded()
        if not self.settings.read_only:
            what = f"creating {self.root}"
            try:
                self.call(self._ensure_root, what)
            except FileNotFoundError:
                # Not a directory we can make: a CIFS share the server does not have, or
                # a parent the protocol will not create. A target error, not a bug (exit 1).
                raise TransportError(
                    f"{self.describe()}: {what}: not found (a share or a directory above it "
                    "is missing)"
                ) from None

    def call(
        self,
        op: Callable[[], T],
        what: str,
        first_error: Exception | None = None,
        bounded: bool = True,
    ) -> T:
        """Run ``op`` against the server; reconnect and retry if the connection broke.

        Each attempt is bounded by ``op_deadline`` unless ``bounded`` is False (an
        operation whose length grows with the data it moves, such as a replay).
        """

        def attempt() -> T:
            try:
                return op()
            except Exception as e:
                raise self.convert(e, what) from e

        def guarded() -> T:
            if not (bounded and self.bounded_ops):
                return attempt()
            with deadline(self.op_deadline, what, self._drop_connection):
                return attempt()

        return retry_call(guarded, self._open_bounded, self.settings, what, first_error=first_error)

    def resumable(
        self,
        read_from: Callable[[int], Iterator[bytes]],
        what: str,
        within: float | None = None,
    ) -> Iterator[bytes]:
        """The chunks of ``read_from(offset)`` from offset 0 on. When the connection breaks
        in the middle, reconnect and go on from the byte reached (``read_from`` must refuse
        a file that changed meanwhile: nothing is spliced). Drops that brought nothing new
        count against ``settings.retries``; any progress starts the count again, so a
        server trickling bytes between drops is bounded by ``within`` seconds for the whole
        read (``read_deadline``)."""
        done = stalls = 0
        # The timer breaks a wait inside one chunk (a reply trickled a byte at a time, which
        # each recv's timeout never sees); once it has fired, no resume follows.
        guard = (
            deadline(within, what, self._drop_connection)
            if within is not None
            else contextlib.nullcontext(threading.Event())
        )
        with guard as late:
            while True:
                try:
                    for chunk in read_from(done):
                        if chunk:
                            stalls = 0
                        done += len(chunk)
                        if late.is_set():
                            raise ConnectionLost(f"{what}: past its deadline")
                        yield chunk
                    return
                except Exception as e:
                    if not is_connection_lost(e) or late.is_set():
                        raise
                    stalls += 1
                    if stalls > self.settings.retries:
                        n = self.settings.retries
                        raise ConnectionLost(
                            f"{what}: connection lost and {n} retries failed: {e}"
                        ) from e
                    log.info("%s: connection lost at byte %d (%s); reading on", what, done, e)
                    self.call(lambda: None, what, first_error=e)  # reconnect, waiting as usual
