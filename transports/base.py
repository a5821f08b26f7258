"""The transport contract: what the engine needs from a dump target, and nothing about vmcores.

A transport is bound to one parsed target URL (``kdump_capture.urls.Target``). All paths
given to its methods are relative to the target's root directory (``Target.path``), use
``/`` as separator and never contain ``..``.

Atomic publish: ``create`` returns a ``Sink`` that writes under a temporary name in the
same directory (``TMP_PREFIX`` + name + random suffix); only ``Sink.commit`` makes the final
name appear. ``listdir`` hides temporary names. A reader never sees a half-written file
under its final name.

Never through a link: a shared target holds what other hosts left there, so every
operation treats a name inside the root as untrusted. ``listdir`` reports a symbolic link
(or a reparse point) as ``is_link``, never as a directory; ``listdir`` and ``read`` refuse
(``UnsafeFile``) a path that leads through one (a server that follows links itself, as
Samba does, shows some only there: when they are entered); ``read`` opens only regular
files, without blocking (FIFOs, devices are refused before they are opened) and up to a
size limit; ``remove_tree`` deletes a link itself and never what it points to. Only the
root directory itself (configured by the administrator) may be a link.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator

from kdump_capture import checksum
from kdump_capture.errors import KdumpError, TargetSettingError, TransportError, UnsafeFile
from kdump_capture.record import Record
from kdump_capture.urls import Target

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

TMP_PREFIX = ".kdump-tmp."

# Files hold all of memory: owner-only, on every target where the protocol can set modes.
FILE_MODE = 0o600
DIR_MODE = 0o700

# Below this, handing a buffer to the hashing thread (~20 us) costs more than the overlap
# saves: SHA-256 runs at ~2 GB/s, so 64 KiB take ~30 us.
OVERLAP_MIN = 64 << 10
# Write-behind: what we wrote goes to the disk as it comes and leaves the page cache once
# it is there. Left to itself the kernel keeps the whole dump cached and dirty until the
# final fsync. A capture kernel has tens of MiB to spare, so that means reclaim and
# writeback throttling in the middle of the dump. Even with 10 GiB free, the bench's save
# ELF -d 0 of its 2 GB sample (bench/RESULTS.md) took 5.9-7.0 s that way and 2.4-2.7 s
# with write-behind; most of the difference was system time in write(2) (a bare
# mmap + SHA-256 + write loop: 5.5-6.4 s without, 0.7-1.0 s with). Every FLUSH_STEP of
# new data starts its writeback; data more than CACHE_LAG behind the end is dropped from
# the cache (POSIX_FADV_DONTNEED writes dirty pages back and drops the clean ones).
FLUSH_STEP = 4 << 20
CACHE_LAG = 16 << 20


# A dump's completeness mark goes first when its directory is deleted, its README next: a
# deletion stopped half way (a signal, a dropped connection) must leave a dump that reads
# as incomplete, never a manifest beside a vmcore that is gone. Listings come in any order
# (creation order on btrfs and XFS).
MARKS_FIRST = ("manifest.json", "README.txt")


def removal_order(name: str) -> int:
    """Sort key for deleting a directory's entries: MARKS_FIRST, then the rest."""
    return MARKS_FIRST.index(name) if name in MARKS_FIRST else len(MARKS_FIRST)


def temp_name(name: str) -> str:
    """A temporary name for ``name`` in the same directory; hidden from listings."""
    return f"{TMP_PREFIX}{name}.{os.urandom(4).hex()}"  # secrets.token_hex(4), without hmac


def _hashing_thread() -> ThreadPoolExecutor:
    """The executor that hashes beside the sends: only with a second CPU, so a capture
    kernel on one CPU never imports concurrent.futures."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="checksum")


def is_temp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def bounded(chunks: Iterator[bytes], limit: int | None, what: str) -> Iterator[bytes]:
    """``chunks``, failing with ``UnsafeFile`` once they add up to more than ``limit`` bytes
    (a file may grow between the size check and the read)."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if limit is not None and total > limit:
            raise UnsafeFile(f"{what}: larger than {limit} bytes")
        yield chunk


def mode_kind(mode: int) -> str:
    """What a file mode is, for messages about files we refuse to open."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def require_regular(mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise UnsafeFile(f"{what}: {mode_kind(mode)}; only regular files are read")


def check_size(size: int, limit: int | None, what: str) -> None:
    if limit is not None and size > limit:
        raise UnsafeFile(f"{what}: {size} bytes, more than the {limit} allowed")


def same_file(seen: list, now: tuple, what: str) -> None:
    """For a read that goes on after a drop: ``now`` is what the server tells of the file
    just opened (size, modification time); ``seen`` holds what the first open of the same
    read saw, or nothing yet (then ``now`` is recorded there). Refuses a file that changed
    in between, so that nothing is spliced."""
    if seen and seen[0] != now:
        raise TransportError(f"{what}: changed on the server while it was read")
    seen[:] = [now]


def load_ca_bundle(context, path: str) -> None:
    """Add the CAs in ``path`` (KDUMP_S3_CA_BUNDLE) to the ``ssl.SSLContext`` ``context``.

    TargetSettingError (exit 2) unless it is an absolute path to a regular file that holds
    PEM certificates. The builder checks the same at ``load``: an image never packs a bundle
    the capture kernel cannot use, and a hand-run save says what ``load`` would have said.
    """
    import ssl

    if not os.path.isabs(path):
        problem = "not an absolute path"
    elif not os.path.isfile(path):  # missing, a directory, a FIFO (OpenSSL would wait on it)
        problem = "not a file" if os.path.exists(path) else "no such file"
    else:
        try:
            context.load_verify_locations(cafile=path)
            return
        except (OSError, ssl.SSLError) as e:
            problem = f"no PEM certificates in it ({e})"
    raise TargetSettingError(f"KDUMP_S3_CA_BUNDLE={path}: {problem}")


def not_the_servers(e: BaseException) -> bool:
    """An error of ours raised inside a transport call (Interrupted: the watchdog's or a
    user's signal), which a transport's ``convert`` must pass on as it is: wrapped as a
    target error it changed the exit code from 130 to 6."""
    return isinstance(e, KdumpError) and not isinstance(e, TransportError)


class TransportSettings(Record):
    """What transports may need from the configuration, as plain data (no globals).

    ``timeout`` bounds every single network wait (connect, read, write) in seconds.
    ``retries`` and ``retry_delay`` bound reconnect-and-resume attempts.
    """

    __slots__ = (
        "timeout",
        "retries",
        "retry_delay",
        "ssh_identity",
        "host_key",
        "known_hosts",
        "debug",
        "replay_bytes",
        "expected_size",
        "checksum",
        "read_only",
        "extra",
    )
    _unshown = ("extra",)

    def __init__(
        self,
        timeout: float = 30.0,
        retries: int = 3,
        retry_delay: float = 2.0,
        ssh_identity: tuple[str, ...] = (),
        host_key: str = "",
        known_hosts: tuple[str, ...] = (),
        debug: bool = False,
        # bytes a sink keeps for resuming after a dropped connection (see retry.ReplayBuffer);
        # the engine lowers it in a capture kernel with little memory
        replay_bytes: int = 16 << 20,
        # the largest file the engine expects to write (bytes, 0: unknown); S3 sizes its parts
        # by it to stay under 10,000 parts
        expected_size: int = 0,
        # what ``Sink.commit`` hashes each file with (a key of kdump_capture.checksum.ALGORITHMS)
        checksum: str = checksum.SHA256,
        # list and verify: connecting creates nothing and needs no write access
        read_only: bool = False,
        # scheme-specific settings (S3 keys, region, CA bundle): may hold secrets, so not in repr
        extra: dict[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.ssh_identity = ssh_identity
        self.host_key = host_key
        self.known_hosts = known_hosts
        self.debug = debug
        self.replay_bytes = replay_bytes
        self.expected_size = expected_size
        self.checksum = checksum
        self.read_only = read_only
        self.extra = {} if extra is None else extra


class Entry(Record):
    """One directory entry as a transport lists it.

    ``is_dir`` is true only for a real directory, never for a link to one; ``is_link``
    marks a symbolic link or reparse point, which the engine never descends into or reads.
    """

    __slots__ = ("name", "is_dir", "size", "is_link")

    def __init__(
        self,
        name: str,
        is_dir: bool,
        size: int = 0,
        is_link: bool = False,
    ) -> None:
        self.name = name
        self.is_dir = is_dir
        self.size = size
        self.is_link = is_link


class FileInfo(Record):
    """What ``Sink.commit`` verified about a published file: its digest by ``algorithm``
    (a key of kdump_capture.checksum.ALGORITHMS)."""

    __slots__ = ("name", "size", "digest", "algorithm")

    def __init__(
        self,
        name: str,
        size: int,
        digest: str,
        algorithm: str = checksum.SHA256,
    ) -> None:
        self.name = name
        self.size = size
        self.digest = digest
        self.algorithm = algorithm


class WriteBehind:
    """Writeback and cache dropping behind the end of a file being written (see CACHE_LAG).

    Advice only: a filesystem without it keeps its pages and nothing else changes; errors
    of the writeback itself come back from the fsync that ends every sink.
    """

    def __init__(self, fd: int, base: int = 0) -> None:
        self.fd = fd
        self.kicked = base  # writeback started below this file offset
        self.dropped = base  # dropped from the page cache below this file offset

    def wrote_to(self, end: int) -> None:
        """The data ends at file offset ``end`` now (writes behind it change nothing)."""
        if end - self.kicked < FLUSH_STEP:
            return
        end &= ~(FLUSH_STEP - 1)  # whole steps: the last page is still growing
        drop = end - CACHE_LAG
        dontneed = os.POSIX_FADV_DONTNEED
        try:
            os.posix_fadvise(self.fd, self.kicked, end - self.kicked, dontneed)
            if drop - self.dropped >= FLUSH_STEP:
                os.posix_fadvise(self.fd, self.dropped, drop - self.dropped, dontneed)
                self.dropped = drop
        except OSError:
            pass
        self.kicked = end

    def drop_all(self) -> None:
        """After the fsync: the whole file leaves the cache."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


class Sink(ABC):
    """A new file being written on the target under a temporary name.

    Contract:
    - ``write`` takes bytes or a memoryview and must not keep a reference to it after
      returning (the engine reuses its buffers).
    - ``seek`` is only available when ``seekable`` is true; the engine never seeks otherwise.
    - ``commit`` flushes, checks that the target holds exactly the bytes written (fsync,
      final server reply, or remote size), renames to the final name, and returns the
      size and checksum (``algorithm``: SHA-256 unless the engine chose another) of the
      published file.
    - ``abort`` removes the temporary file, never raises, and may be called after a failed
      ``commit``. Using a sink as a context manager aborts it unless it was committed.
    """

    seekable: bool = False

    def __init__(self, name: str, algorithm: str = checksum.SHA256) -> None:
        self.name = name
        self.algorithm = algorithm
        self._hash = checksum.new(algorithm)
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
        the send time (XXH3, ~0.05 s per GB, hardly needs it). Joins before returning: the
        caller's buffer is not kept. If the body raises, hash and position stay as they were.
        """
        n = len(data)
        if not (self._overlap and self._hash_valid and self._pos == self._end) or n < OVERLAP_MIN:
            yield
            self._account(data)
            return
        before = self._hash.copy()
        if self._hasher is None:
            self._hasher = _hashing_thread()
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
            self._hasher = _hashing_thread()
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

    def _digest(self) -> str:
        """The file's checksum (``algorithm``): streamed when writes were append-only, else
        read back."""
        self._stop_hashing()
        if self._hash_valid:
            return self._hash.hexdigest()
        h = checksum.new(self.algorithm)
        for chunk in self._read_back():
            h.update(chunk)
        return h.hexdigest()

    def _read_back(self) -> Iterator[bytes]:
        """Yield the temporary file's content (needed only by seekable sinks; on a network
        target it goes on where a dropped connection broke it)."""
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


class Claim:
    """This process's hold on one dump directory (``Transport.claim``); ``release`` ends it,
    and so does the end of the process, a SIGKILL included: nothing is left to block the
    next run."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Never raises; a second call does nothing."""
        done, self._release = self._release, None
        if done is not None:
            with contextlib.suppress(OSError):
                done()


# Abstract Unix socket names (no file to leave behind) of the default claims.
CLAIM_PREFIX = b"\0kdump-capture/claim/"


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

    def expect(self, size: int) -> None:
        """The largest file this save will write, once its writer can tell (an upper bound,
        before ``connect``): at first it is only what the source's size implies."""
        self.settings = self.settings.replace(expected_size=size)

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
        """Entries of a directory, temporary names excluded; [] if it does not exist.

        Raises ``UnsafeFile`` if ``relpath`` is, or passes through, a link.
        """

    @abstractmethod
    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        """Stream a committed regular file back (for ``verify`` and manifests).

        Raises ``UnsafeFile`` (before reading a byte, and without blocking) if ``relpath``
        is a link, passes through one, or is not a regular file, and if the file holds
        more than ``limit`` bytes (checked before reading and again while reading).
        """

    @abstractmethod
    def remove_tree(self, relpath: str) -> None:
        """Delete a directory and everything in it (including temporary files).

        Never descends into a link: a link (at ``relpath`` or inside) is deleted itself,
        or, where the protocol cannot delete it without following it, left alone and
        reported with ``UnsafeFile``. A missing ``relpath`` is not an error.
        """

    @abstractmethod
    def free_space(self, relpath: str = "") -> int | None:
        """Bytes available to us below ``relpath``, or None if the protocol cannot tell."""

    def settle(self) -> bool:
        """Have ``free_space`` count what was deleted, where the protocol can: a btrfs
        filesystem gives freed blocks back only when its transaction commits (30 s by
        default). False when it cannot (the default: the engine then waits a while)."""
        return False

    def remove_file(self, relpath: str) -> None:
        """Delete one file; default: not needed by the engine except for re-publishing."""
        raise TransportError(f"{self.describe()}: cannot remove {relpath}")

    def claim(self, relpath: str) -> Claim | None:
        """Hold the dump directory ``relpath`` against our other processes on this host, or
        None when one of them holds it: it is writing that dump (an admin's ``save`` beside
        the boot-time ``recover``), or deleting it. A directory without a manifest is a dump
        in the making while it is claimed, and left by a killed run once it is not.

        Default: an abstract Unix socket named after the target and ``relpath``, which the
        kernel frees when the process ends; a system that cannot make one claims nothing
        (each run then goes ahead, as before claims existed).
        """
        import hashlib
        import socket  # only here: a save to a file target does without it (FileTransport)

        key = hashlib.sha256(f"{self.describe()}/{relpath}".encode()).hexdigest()[:48]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(CLAIM_PREFIX + key.encode())
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                return None
            log.debug("cannot claim %s/%s: %s", self.describe(), relpath, e)
            return Claim(lambda: None)
        return Claim(s.close)

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
