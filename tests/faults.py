"""Test-only fault injection around a real engine process: gated vmcore reads and filesystems
that fill up. Nothing here touches production code.

``ReadGate`` puts a fanotify pre-content watch (Linux >= 6.14; ext4, xfs or btrfs) on a
vmcore file. Every read of it by another process then waits until the gate answers, and the
gate knows the exact byte range asked for. That gives two things no timing can:

Only the reads of the processes in ``pids`` are steered (set it right after starting the
engine: it reads nothing before its imports are done).

- ``on_read(offset, action)``: run ``action`` (drop a connection, fill the disk, SIGKILL the
  engine) while the engine is blocked just before reading the chunk holding ``offset``;
  everything before that chunk has been read and handed to the target already.
- ``fail(lo, hi)``: reads overlapping ``[lo, hi)`` fail with EIO, as /proc/vmcore does for
  memory the crashed kernel cannot provide.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]

# <linux/fanotify.h>
FAN_CLOEXEC = 0x1
FAN_CLASS_PRE_CONTENT = 0x8
FAN_MARK_ADD = 0x1
FAN_PRE_ACCESS = 0x00100000
FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_EVENT_INFO_TYPE_RANGE = 6
AT_FDCWD = -100
EVENT_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
RANGE_INFO = struct.Struct("=BBHIQQ")  # info_type, pad, len, pad, offset, count
RESPONSE = struct.Struct("=iI")  # fd, response


def deny_errno(err: int) -> int:
    """FAN_DENY_ERRNO(err): refuse the read and make it fail with ``err``."""
    return FAN_DENY | ((err & 0xFF) << 24)


class ReadGate:
    """Hold and steer other processes' reads of one file (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._actions: list[tuple[int, Callable[[], None]]] = []
        self._bad: list[tuple[int, int]] = []
        self.failed_reads: list[tuple[int, int]] = []  # (offset, count) answered with EIO
        self.fired: list[int] = []  # offsets of the reads that ran an action
        self.errors: list[BaseException] = []
        #: the processes whose reads are steered; everybody else reads unhindered
        self.pids: set[int] = set()
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    def on_read(self, offset: int, action: Callable[[], None]) -> ReadGate:
        """Run ``action`` once, before the first read that reaches past ``offset``."""
        self._actions.append((offset, action))
        self._actions.sort(key=lambda a: a[0])
        return self

    def fail(self, lo: int, hi: int) -> ReadGate:
        """Reads overlapping ``[lo, hi)`` fail with EIO."""
        self._bad.append((lo, hi))
        return self

    def __enter__(self) -> ReadGate:
        fd = _libc.fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            e = ctypes.get_errno()
            raise RuntimeError(f"fanotify_init: {os.strerror(e)} (needs root and Linux >= 6.14)")
        if _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD, self.path.encode()):
            e = ctypes.get_errno()
            os.close(fd)
            raise RuntimeError(
                f"fanotify pre-content watch on {self.path}: {os.strerror(e)} "
                "(needs Linux >= 6.14 and ext4, xfs or btrfs)"
            )
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="read-gate", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(10)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
        if self.errors and exc[0] is None:
            raise self.errors[0]

    def _serve(self) -> None:
        poll = select.poll()
        poll.register(self._fd, select.POLLIN)
        poll.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poll.poll()}
            if self._wake_r in ready:
                return
            buf = os.read(self._fd, 65536)
            pos = 0
            while pos + EVENT_META.size <= len(buf):
                ev_len, _, _, meta_len, _, efd, pid = EVENT_META.unpack_from(buf, pos)
                offset, count = self._range(buf[pos + meta_len : pos + ev_len])
                answer = FAN_ALLOW
                if pid in self.pids and offset is not None:
                    answer = self._decide(offset, count)
                try:
                    os.write(self._fd, RESPONSE.pack(efd, answer))
                except OSError as e:  # the reader died meanwhile (SIGKILL rows)
                    if e.errno != errno.ENOENT:
                        self.errors.append(e)
                os.close(efd)
                pos += ev_len

    @staticmethod
    def _range(info: bytes) -> tuple[int | None, int]:
        pos = 0
        while pos + 4 <= len(info):
            kind, _, length = struct.unpack_from("=BBH", info, pos)
            if kind == FAN_EVENT_INFO_TYPE_RANGE:
                _, _, _, _, offset, count = RANGE_INFO.unpack_from(info, pos)
                return offset, count
            pos += max(length, 4)
        return None, 0

    def _decide(self, offset: int, count: int) -> int:
        while self._actions and offset + count > self._actions[0][0]:
            _, action = self._actions.pop(0)
            self.fired.append(offset)
            try:
                action()
            except BaseException as e:  # reported by __exit__; the reader must not hang
                self.errors.append(e)
        if any(offset < hi and lo < offset + count for lo, hi in self._bad):
            self.failed_reads.append((offset, count))
            return deny_errno(errno.EIO)
        return FAN_ALLOW


def fill(path: str, name: str = ".filler", leave: int = 0) -> str:
    """Another writer takes the free space of the filesystem holding ``path``, all of it
    or all but ``leave`` bytes (as ``statvfs`` counts them)."""
    filler = os.path.join(path, name)
    st = os.statvfs(path)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = bytes(1 << 20)
        while want > 0:
            try:
                want -= os.write(fd, block[: min(len(block), want)])
            except OSError as e:
                if e.errno != errno.ENOSPC or leave:
                    raise
                break  # metadata took the last blocks: full is full
    finally:
        os.close(fd)
    return filler
