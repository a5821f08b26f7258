"""The transport contract: what the engine needs from a dump target, and nothing about vmcores.

A transport is bound to one parsed target URL (``kdump_capture.urls.Target``). All paths
given to its methods are relative to the target's root directory (``Target.path``), use
``/`` as separator and never contain ``..``.

Atomic publish: ``create`` returns a ``Sink`` that writes under a temporary name in the
same directory (``TMP_PREFIX`` + name + random suffix); only ``Sink.commit`` makes the final
name appear. ``listdir`` hides temporary names. A reader never sees a half-written file
under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kdump_capture.errors import TransportError
from kdump_capture.urls import Target

log = logging.getLogger(__name__)

TMP_PREFIX = ".kdump-tmp."

# Files hold all of memory: owner-only, on every target where the protocol can set modes.
FILE_MODE = 0o600
DIR_MODE = 0o700

# Below this, handing a buffer to the hashing thread (~20 us) costs more than the overlap
# saves: SHA-256 runs at ~2 GB/s, so 64 KiB take ~30 us.
OVERLAP_MIN = 64 << 10


def temp_name(name: str) -> str:
    """A temporary name for ``name`` in the same directory; hidden from listings."""
    return f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


@dataclass(frozen=True)
class TransportSettings:
    """What transports may need from the configuration, as plain data (no globals).

    ``timeout`` bounds every single network wait (connect, read, write) in seconds.
    ``retries`` and ``retry_delay`` bound reconnect-and-resume attempts.
    """

    timeout: float = 30.0
    retries: int = 3
    retry_delay: float = 2.0
    ssh_identity: tuple[str, ...] = ()
    host_key: str = ""
    known_hosts: tuple[str, ...] = ()
    debug: bool = False
    #: bytes a sink keeps for resuming after a dropped connection (see retry.ReplayBuffer);
    #: the engine lowers it in a capture kernel with little memory
    replay_bytes: int = 16 << 20
    #: the largest file the engine expects to write (bytes, 0: unknown); S3 sizes its parts
    #: by it to stay under 10,000 parts
    expected_size: int = 0
    #: scheme-specific settings (S3 keys, region, CA bundle): may hold secrets, so not in repr
    extra: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Entry:
    """One directory entry as a transport lists it."""

    name: str
    is_dir: bool
    size: int = 0


@dataclass(frozen=True)
class FileInfo:
    """What ``Sink.commit`` verified about a published file."""

    name: str
    size: int
    sha256: str


class Sink(ABC):
    """A new file being written on the target under a temporary name.

    Contract:
    - ``write`` takes bytes or a memoryview and must not keep a reference to it after
      returning (the engine reuses its buffers).
    - ``seek`` is only available when ``seekable`` is true; the engine never seeks otherwise.
    - ``commit`` flushes, checks that the target holds exactly the bytes written (fsync,
      final server reply, or remote size), renames to the final name, and returns the
      size and SHA-256 of the published file.
    - ``abort`` removes the temporary file, never raises, and may be called after a failed
      ``commit``. Using a sink as a context manager aborts it unless it was committed.
    """

    seekable: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._hash = hashlib.sha256()
        self._pos = 0
        self._end = 0
        self._hash_valid = True
        self._hasher: ThreadPoolExecutor | None = None
        # A hashing thread only pays off with a second CPU (capture kernels often get one).
        self._overlap = len(os.sched_getaffinity(0)) > 1
        self._queued: deque[tuple[int, Future]] = deque()  # (offset, hash of a kept copy)
        self.committed = False

    # -- helpers for implementations -------------------------------------------------
    def _account(self, data: bytes | memoryview) -> None:
        """Track position and hash; call from ``write`` after the bytes went out."""
        n = len(data)
        if self._hash_valid and self._pos == self._end:
            self._hash.update(data)
        else:
            self._hash_valid = False
        self._pos += n
        self._end = max(self._end, self._pos)

    @contextlib.contextmanager
    def _accounting(self, data: bytes | memoryview) -> Iterator[None]:
        """``_account`` around the body of ``write``, hashing on a helper thread meanwhile.

        hashlib and socket sends both release the GIL, so the SHA-256 (~0.5 s per GB)
        runs on the second core while the body sends the same bytes, instead of adding to
        the send time. Joins before returning: the caller's buffer is not kept. If the
        body raises, hash and position stay as they were.
        """
        n = len(data)
        if not (self._overlap and self._hash_valid and self._pos == self._end) or n < OVERLAP_MIN:
            yield
            self._account(data)
            return
        before = self._hash.copy()
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        done = self._hasher.submit(self._hash.update, data)
        sent = False
        try:
            yield
            sent = True
        finally:
            done.result()
            if not sent:
                self._hash = before
        self._pos += n
        self._end = max(self._end, self._pos)

    def _account_copy(self, parts: list[memoryview]) -> None:
        """``_account`` for a sink's own copy of the bytes: hashed later, on the helper thread.

        The write returns without waiting, so hashing overlaps whatever comes next. The
        sink must leave the copy unchanged until ``_hashed_below`` passes its offset.
        """
        if not (self._overlap and self._hash_valid and self._pos == self._end):
            for p in parts:
                self._account(p)
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        for p in parts:
            self._queued.append((self._pos, self._hasher.submit(self._hash.update, p)))
            self._pos += len(p)
        self._end = self._pos

    def _hashed_below(self, offset: float = float("inf")) -> None:
        """Wait until every copy queued by ``_account_copy`` before ``offset`` is hashed."""
        while self._queued and self._queued[0][0] < offset:
            self._queued.popleft()[1].result()

    def _stop_hashing(self) -> None:
        """End the hashing thread (commit and abort call this; a new write restarts it)."""
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None
        self._queued.clear()

    def _sha256(self) -> str:
        """The file's SHA-256: streamed when writes were append-only, else read back."""
        self._stop_hashing()
        if self._hash_valid:
            return self._hash.hexdigest()
        h = hashlib.sha256()
        for chunk in self._read_back():
            h.update(chunk)
        return h.hexdigest()

    def _read_back(self) -> Iterator[bytes]:
        """Yield the temporary file's content (needed only by seekable sinks)."""
        raise TransportError(f"{self.name}: cannot read back a file on this target")

    # -- the contract ----------------------------------------------------------------
    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._end

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    def seek(self, offset: int) -> None:
        raise TransportError(f"{self.name}: this target cannot seek")

    @abstractmethod
    def commit(self) -> FileInfo: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


class Transport(ABC):
    """One connection to one dump target. About ten methods; see the module docstring."""

    #: short name for logs, e.g. "file", "sftp"
    scheme: str = ""
    #: whether this transport's sinks support ``seek`` (random-access formats need it)
    can_seek: bool = False

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        self.target = target
        self.settings = settings
        #: what the dump's README must say about this target (e.g. modes it could not set)
        self.notes: list[str] = []

    def note_once(self, note: str) -> None:
        """Warn once per transport, so once per dump (not per file), and keep it for the
        dump's README: for what the target would not do, like setting a file's mode."""
        if note not in self.notes:
            self.notes.append(note)
            log.warning("%s: %s", self.describe(), note)

    def describe(self) -> str:
        """The target URL with any password redacted; safe for logs."""
        return self.target.redacted()

    @abstractmethod
    def connect(self) -> None:
        """Open the connection (or mount) and make sure the root directory exists (0700)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; never raises."""

    @abstractmethod
    def makedir(self, relpath: str) -> None:
        """Create one directory (mode 0700). Raises FileExistsError if it exists."""

    @abstractmethod
    def create(self, relpath: str) -> Sink:
        """Start a new file (mode 0600) that appears under ``relpath`` on commit."""

    @abstractmethod
    def listdir(self, relpath: str = "") -> list[Entry]:
        """Entries of a directory, temporary names excluded; [] if it does not exist."""

    @abstractmethod
    def read(self, relpath: str) -> Iterator[bytes]:
        """Stream a committed file back (for ``verify`` and manifests)."""

    @abstractmethod
    def remove_tree(self, relpath: str) -> None:
        """Delete a directory and everything in it (including temporary files)."""

    @abstractmethod
    def free_space(self, relpath: str = "") -> int | None:
        """Bytes available to us below ``relpath``, or None if the protocol cannot tell."""

    def remove_file(self, relpath: str) -> None:
        """Delete one file; default: not needed by the engine except for re-publishing."""
        raise TransportError(f"{self.describe()}: cannot remove {relpath}")

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
