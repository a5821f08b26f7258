"""CIFS/SMB transport (cifs:// and smb:// targets) over smbprotocol, SMB 2/3.

Connections live in a cache owned by the transport (never smbclient's global one).
Encryption is used whenever the server asks for it. Uploads pipeline WRITE requests at
explicit offsets, wait for every reply with a bounded timeout, and after a dropped
connection reopen the temporary file and replay from the first WRITE the server did not
acknowledge (its file size alone may cover a hole: WRITEs in flight complete in any order).
SMB cannot set Unix modes: what we create gets an owner-only DACL when the share's
defaults would let others in (smbacl).

smbprotocol waits for most replies (create, close, query, session setup) without a
timeout, so a server that stops answering would hang them for good. Every such call runs
under ``CifsTransport.deadline``: when the configured timeout passes without an answer,
the connection's socket is shut down, which wakes the waiting call, and it fails as a
lost connection (retried like any other).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import smbclient
from smbclient._io import SMBDirectoryIO, SMBFileIO, _chunk_size
from smbprotocol import MAX_PAYLOAD_SIZE
from smbprotocol import exceptions as smbexc
from smbprotocol.connection import Connection, Request
from smbprotocol.file_info import FileAttributes, FileInformationClass
from smbprotocol.header import NtStatus
from smbprotocol.open import CreateOptions, SMB2WriteResponse

from kdump_capture.errors import AuthError, ConnectionLost, TargetFull, TransportError, UnsafeFile
from kdump_capture.urls import Target

from . import smbacl
from .base import (
    Entry,
    FileInfo,
    Sink,
    TransportSettings,
    bounded,
    check_size,
    is_temp_name,
    not_the_servers,
    removal_order,
    same_file,
    temp_name,
)
from .retry import REPLAY_STEP, ReplayBuffer, RetryingTransport, deadline, is_connection_lost
from .smb2write import post_write

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 445
# One WRITE request (at most the server's max write size; Samba offers 8 MiB). Each
# request still costs ~0.3 ms of Python, so larger is cheaper per byte; see bench/results.
WRITE_PIECE = 4 << 20
# Unconfirmed WRITE data: two pieces keep the server busy while we wait for one reply.
# Together with one piece being filled and one write being buffered this stays within
# the 16 MiB replay buffer, which drops nothing the server has not confirmed anyway.
MAX_INFLIGHT = 8 << 20
READ_CHUNK = 1 << 20
# Seconds a read-only session reuses its listing of the root (``_root_listing``).
ROOT_REUSE = 30.0
# Credits WRITEs leave unused: the engine stats the share (free space, sizes) while WRITEs
# are in flight, and smbprotocol fails a request at once when no credit is left. Samba
# grants 64 at first, so a 4 MiB WRITE would take every one of them.
CREDIT_RESERVE = 8
# MS-ERREF 2.3.1: what Samba answers on a read-only filesystem (smbprotocol has no name
# for it and would print "Unknown NtStatus").
STATUS_MEDIA_WRITE_PROTECTED = 0xC00000A2

_AUTH_ERRORS = (
    smbexc.SMBAuthenticationError,
    smbexc.LogonFailure,
    smbexc.WrongPassword,
    smbexc.PasswordExpired,
)
_LOST_ERRORS = (smbexc.SMBConnectionClosed, smbexc.NetworkNameDelegated)
_DIRECTORY = FileAttributes.FILE_ATTRIBUTE_DIRECTORY
# Symbolic links and junctions on Windows; opened as themselves, never followed.
_REPARSE = FileAttributes.FILE_ATTRIBUTE_REPARSE_POINT
# FILE_ATTRIBUTE_DEVICE (MS-FSCC 2.6), which smbprotocol does not name.
_DEVICE = 0x40


def convert(e: BaseException, what: str) -> Exception:
    """Map an smbprotocol/socket exception to our error tree (the module boundary)."""
    if isinstance(e, (TransportError, FileNotFoundError, FileExistsError)) or not_the_servers(e):
        return e
    if isinstance(e, ValueError) and isinstance(e.__cause__, OSError):
        e = e.__cause__  # smbprotocol wraps socket errors of connect() in ValueError
    if isinstance(e, _AUTH_ERRORS):
        return AuthError(f"{what}: the server refused our credentials ({type(e).__name__})")
    if isinstance(e, smbexc.DiskFull) or (
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    ):
        return TargetFull(f"{what}: target is full")
    if isinstance(e, _LOST_ERRORS) or is_connection_lost(e):
        return ConnectionLost(f"{what}: connection lost ({e})")
    if isinstance(e, OSError) and not isinstance(e, smbexc.SMBOSError) and e.errno == errno.EBADF:
        # smbprotocol's reader thread closes the socket when the peer resets it; our next
        # send then fails on the closed descriptor.
        return ConnectionLost(f"{what}: connection lost (socket closed)")
    if isinstance(e, smbexc.SMBException) and "timeout" in str(e).lower():
        return ConnectionLost(f"{what}: {e}")
    if isinstance(e, smbexc.SMBOSError) and e.ntstatus == STATUS_MEDIA_WRITE_PROTECTED:
        return TransportError(f"{what}: the share is read-only (STATUS_MEDIA_WRITE_PROTECTED)")
    if isinstance(e, smbexc.SMBOSError) and e.ntstatus == NtStatus.STATUS_ACCESS_DENIED:
        return TransportError(
            f"{what}: access denied (STATUS_ACCESS_DENIED): the share's user lacks the "
            "permission (the share's 'force user', 'write list' or 'read only', or the "
            "directory's own permissions)"
        )
    if isinstance(e, OSError) and e.errno == errno.ENOENT:
        return FileNotFoundError(errno.ENOENT, f"{what}: no such file")
    if isinstance(e, OSError) and e.errno == errno.EEXIST:
        return FileExistsError(errno.EEXIST, f"{what}: exists")
    return TransportError(f"{what}: {type(e).__name__}: {e}")


def no_delay(conn: Connection) -> None:
    """TCP_NODELAY on a connection's socket, as Samba sets it on its own client's and
    server's sockets (smb.conf "socket options" default).

    With Nagle's algorithm the last, partial segment of each WRITE waits until the server
    has acknowledged everything before it, and small requests behind a WRITE (a stat while
    WRITEs are in flight) wait the same way. Measured, the gain is within this machine's
    noise: bench/transports.py --only cifs --size-mb 512 --runs 4, with and without, twice
    each, alternating: 636 and 523 MB/s with it, 439 and 647 MB/s without.
    """
    sock = getattr(conn.transport, "_sock", None)  # smbprotocol 1.x's Tcp transport
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class _Item:
    """One entry of a directory query, with what tells a link from a directory."""

    name: str
    attributes: int
    file_id: int
    size: int
    link: bool

    @property
    def is_dir(self) -> bool:
        return bool(self.attributes & _DIRECTORY) and not self.link


@dataclass(frozen=True)
class _Listing:
    """A directory query: the file ids of "." and ".." (0 if the server sends none)."""

    dot: int
    dotdot: int
    items: dict[str, _Item]


class CifsSink(Sink):
    """A file on the share written with pipelined WRITE requests at explicit offsets.

    Writes are copied once, into the replay buffer; WRITE requests of ``WRITE_PIECE``
    bytes go out straight from it (``smb2write``), so the engine's 1 MiB writes become
    fewer, larger requests. A range leaves the replay buffer only after the server
    confirmed it.
    """

    seekable = True

    def __init__(self, transport: CifsTransport, unc_dir: str, name: str) -> None:
        super().__init__(name, transport.settings.checksum)
        self._t = transport
        self._final = f"{unc_dir}\\{name}"
        self._tmp = f"{unc_dir}\\{temp_name(name)}"
        self._replay = ReplayBuffer(transport.settings.replay_bytes)
        # Unconfirmed writes must stay replayable: half the ring at most.
        self._max_inflight = min(MAX_INFLIGHT, transport.settings.replay_bytes // 2)
        self._piece = min(WRITE_PIECE, transport.settings.replay_bytes // 4)
        self._positional = False
        self._pending: deque[tuple[Request, int, int]] = deque()  # (request, offset, size)
        self._inflight = 0
        self._unsent = 0  # append-only: first offset not sent yet (the rest is buffered)
        self._acked = 0  # append-only: every byte below it has its WRITE acknowledged
        self._raw = None
        try:
            self._t.call(lambda: self._open("xb"), f"creating {self._tmp}")
        except FileNotFoundError as e:
            # In the directory we just made: Samba answers so for a name its "veto files"
            # matches (admins veto dot files: /.*/), or the directory is gone.
            raise TransportError(
                f"creating {self._tmp}: the server says there is no such name (does the "
                "share veto names like '.kdump-tmp.*', such as 'veto files = /.*/'? or was "
                "the directory removed?)"
            ) from e
        self._t.restrict(self._tmp, is_dir=False)  # before any byte of memory goes in

    def _open(self, mode: str) -> None:
        self._pending.clear()
        self._inflight = 0
        # Shared (read, write, delete): after a dropped connection the server may still hold
        # the old handle until it notices the dead session, and a handle that denied
        # sharing would refuse our reopen or the final rename (STATUS_SHARING_VIOLATION)
        # and cost the dump.
        # The file is ours alone (a unique temporary name with an owner-only DACL).
        self._raw = smbclient.open_file(
            self._tmp, mode=mode, buffering=0, share_access="rwd", **self._t.kw
        )

    def _send(self, offset: int, view: memoryview) -> None:
        fd = self._raw.fd
        conn = fd.connection
        done = 0
        while done < len(view):
            window = conn.sequence_window
            spare = window["high"] - window["low"] - CREDIT_RESERVE
            if spare < 1 and self._pending:
                self._ack_one()  # its reply returns credits
                continue
            want = min(len(view) - done, conn.max_write_size, max(spare, 1) * MAX_PAYLOAD_SIZE)
            size, credits = _chunk_size(conn, want, "write")
            if (size < want or self._inflight + size > self._max_inflight) and self._pending:
                self._ack_one()
                continue
            req = post_write(
                fd, offset + done, view[done : done + size], credits, self._t.settings.timeout
            )
            self._pending.append((req, offset + done, size))
            self._inflight += size
            done += size

    def _push(self, flush: bool = False) -> None:
        """Send buffered bytes in requests of ``self._piece`` bytes; all of them if ``flush``."""
        if self._replay.end - self._unsent < (1 if flush else self._piece):
            return
        spans = self._replay.since(self._unsent)
        for i, (off, view) in enumerate(spans):
            for start in range(0, len(view), self._piece):
                piece = view[start : start + self._piece]
                if len(piece) < self._piece and i == len(spans) - 1 and not flush:
                    return  # wait for a full piece
                self._send(off + start, piece)
                self._unsent = off + start + len(piece)

    def _make_room(self, offset: int, n: int) -> None:
        """Before buffering ``n`` more bytes: settle what the buffer would drop."""
        if self._positional:
            if self._replay.held + n > self._replay.limit:
                self._drain()
                self._hashed_below()
                self._replay.clear()  # a sync point: the server confirmed everything
            return
        keep = self._replay.kept_from(offset, n)
        if self._unsent < keep:
            self._push(flush=True)
        while self._pending and self._pending[0][1] < keep:
            self._ack_one()
        self._hashed_below(keep)

    def _ack_one(self) -> None:
        req, offset, size = self._pending[0]
        resp = self._raw.fd.connection.receive(req, timeout=self._t.settings.timeout)
        self._pending.popleft()
        self._inflight -= size
        wr = SMB2WriteResponse()
        wr.unpack(resp["data"].get_value())
        if wr["count"].get_value() != size:
            raise TransportError(f"{self._tmp}: server wrote {wr['count'].get_value()} of {size}")
        if offset == self._acked:  # replies are taken in the order the WRITEs went out
            self._acked = offset + size

    def _drain(self) -> None:
        while self._pending:
            self._ack_one()

    def _resume(self) -> None:
        with self._t.deadline(f"reopening {self._tmp}"):
            self._open("r+b")
        if self._positional:
            for off, data in self._replay.all():
                self._send(off, data)
        else:
            with self._t.deadline(f"stat {self._tmp}"):
                size = smbclient.stat(self._tmp, **self._t.kw).st_size
            # The size says where the server's last applied WRITE ended, not that it holds
            # everything before: with several in flight it may have applied a later one and
            # never an earlier one. Only acknowledged WRITEs count (and only what the
            # server still has, should it have lost acknowledged bytes).
            confirmed = min(size, self._acked)
            log.info(
                "%s: resuming at byte %d of %d (the server's size: %d)",
                self._tmp,
                confirmed,
                self._replay.end,
                size,
            )
            self._acked = confirmed
            for off, view in self._replay.since(confirmed):
                self._send(off, view)
            self._unsent = max(self._unsent, self._replay.end)
        self._drain()

    def _guarded(self, op: Callable[[], None], what: str) -> None:
        try:
            op()
        except Exception as e:
            err = convert(e, what)
            if not is_connection_lost(err):
                raise err from e
            # Not bounded as a whole: its writes wait for each reply with the timeout.
            self._t.call(
                self._resume, f"resuming {self._tmp}", first_error=err, whole_timeout=False
            )

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), REPLAY_STEP):
            self._store(self._pos, view[start : start + REPLAY_STEP])

    def _store(self, offset: int, piece: memoryview) -> None:
        what = f"writing {self._tmp}"
        self._guarded(lambda: self._make_room(offset, len(piece)), what)
        # Buffered bytes count as written: commit and seek flush them. They are hashed
        # from the buffer, on the helper thread, while this thread goes on.
        self._account_copy(self._replay.add(offset, piece))
        if self._positional:
            self._guarded(lambda: self._send(offset, piece), what)
        else:
            self._guarded(self._push, what)

    def _sync(self) -> None:
        def flush() -> None:
            if not self._positional:
                self._push(flush=True)
            self._drain()

        self._guarded(flush, f"writing {self._tmp}")
        self._hashed_below()
        self._replay.clear()

    def seek(self, offset: int) -> None:
        self._sync()
        self._positional = True
        self._pos = offset

    def _read_back(self) -> Iterator[bytes]:
        return self._t.resumable(lambda at: self._t.read_unc(self._tmp, at), f"reading {self._tmp}")

    def commit(self) -> FileInfo:
        self._sync()
        self._replay.release()  # confirmed: the read-back below needs the memory
        what = f"closing {self._tmp}"
        try:
            with self._t.deadline(what):
                self._raw.close()
                size = smbclient.stat(self._tmp, **self._t.kw).st_size
        except Exception as e:
            err = convert(e, what)
            if not is_connection_lost(err):
                raise err from e
            # Every WRITE was answered (the sync above): the server has the whole file and
            # closes our handle with the session.
            size = self._t.call(
                lambda: smbclient.stat(self._tmp, **self._t.kw).st_size, what, first_error=err
            )
        if size != self.size:
            raise TransportError(f"{self._tmp}: wrote {self.size} bytes but the server has {size}")
        digest = self._digest()
        self._t.call(
            lambda: smbclient.replace(self._tmp, self._final, **self._t.kw),
            f"renaming {self._tmp} to {self._final}",
        )
        self.committed = True
        return FileInfo(self.name, size, digest, self.algorithm)

    def abort(self) -> None:
        self._stop_hashing()
        try:
            if self._raw is not None:
                self._pending.clear()
                with self._t.deadline(f"closing {self._tmp}"):
                    self._raw.close()
        except Exception as e:
            log.debug("closing %s: %s", self._tmp, e)
        try:
            self._t.call(lambda: smbclient.remove(self._tmp, **self._t.kw), "removing temp")
        except Exception as e:
            log.debug("removing %s: %s", self._tmp, e)


class CifsTransport(RetryingTransport):
    """Dumps to a directory on an SMB share: cifs://[user[:password]@]host[:port]/share/path."""

    scheme = "cifs"
    can_seek = True
    bounded_ops = False  # each call and the connection run under ``deadline`` (below)

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self.port = target.port or DEFAULT_PORT
        self._cache: dict = {}
        self._acl_ok = True  # false once the server would not make something owner-only
        self.kw = {
            "port": self.port,
            "username": target.user,
            "password": target.password,
            "connection_cache": self._cache,
            "connection_timeout": max(1, int(settings.timeout)),
        }
        # One wait for a reply: the configured network timeout (at least 1 s).
        self._wait = max(1.0, settings.timeout)
        # (time, listing) of the root, reused by a read-only session's walks (below).
        self._root_seen: tuple[float, _Listing] | None = None
        self.root = f"\\\\{target.host}\\{target.share}"
        for part in target.share_path.split("/"):
            if part:
                self.root += f"\\{part}"

    def _p(self, relpath: str) -> str:
        parts = [p for p in relpath.split("/") if p]
        for p in parts:
            if ":" in p:
                raise TransportError(f"{p!r}: CIFS names cannot contain ':'")
        return "\\".join([self.root, *parts])

    def _ensure_root(self) -> None:
        # Stat first: a share's root may refuse a create-or-open even though it exists.
        try:
            if smbclient.stat(self.root, **self.kw):
                return
        except smbexc.SMBOSError as e:
            if e.errno != errno.ENOENT:
                raise
            if not self.target.share_path.strip("/"):
                # The share itself (or the server could not open it: a VFS module it lacks):
                # nothing here for us to create.
                raise FileNotFoundError(errno.ENOENT, f"{self.root}: no such share") from e
        # Each missing directory below the share, made owner-only like the dump directories.
        cur = f"\\\\{self.target.host}\\{self.target.share}"
        for part in self.target.share_path.split("/"):
            if not part:
                continue
            cur += f"\\{part}"
            try:
                smbclient.mkdir(cur, **self.kw)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                continue
            self.restrict(cur, is_dir=True)

    def restrict(self, path: str, is_dir: bool) -> None:
        """Owner-only access to what we just created (smbacl); a server that refuses gets
        one warning per dump and a note in its README (it is not asked again), and the dump
        goes on."""
        if not self._acl_ok:
            return
        try:
            self.call(lambda: smbacl.restrict(path, is_dir, **self.kw), f"securing {path}")
        except TransportError as e:  # the server refused, or sent a descriptor we cannot read
            if isinstance(e, ConnectionLost):
                raise
            self._acl_ok = False
            self.note_once(
                f"the SMB server would not make {path} owner-only ({e}): the dump's files "
                "and directories have the share's default permissions and may be readable "
                "by other users of the server"
            )

    def deadline(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Bound the body's network waits by the timeout: past it, shut the sockets down.

        The waiting call then fails, and so does the body, with ConnectionLost
        (retry.deadline).
        """
        return deadline(self._wait, what, self._shut_sockets)

    def _shut_sockets(self) -> None:
        for conn in list(self._cache.values()):
            try:
                conn.transport.close()
            except Exception as e:  # already closed, or closing on its own
                log.debug("shutting down the SMB socket: %s", e)

    def call(
        self,
        op: Callable[[], T],
        what: str,
        first_error: Exception | None = None,
        whole_timeout: bool = True,
    ) -> T:
        """Like RetryingTransport.call; each attempt runs under ``deadline`` unless told not
        to (an operation whose every wait is bounded already)."""
        if whole_timeout:
            inner = op

            def op() -> T:
                with self.deadline(what):
                    return inner()

        return super().call(op, what, first_error)

    def _open(self) -> None:
        with self.deadline(f"connecting to {self.describe()}"):
            self._open_session()

    def _open_session(self) -> None:
        self._drop()  # a reconnect: the old connection is lost, no goodbye to it
        try:
            smbclient.register_session(
                self.target.host,
                username=self.target.user,
                password=self.target.password,
                port=self.port,
                connection_timeout=max(1, int(self.settings.timeout)),
                connection_cache=self._cache,
                # NTLM: the capture kernel has no Kerberos tickets to negotiate with.
                auth_protocol="ntlm",
            )
            for conn in self._cache.values():
                no_delay(conn)
        except Exception as e:
            self._drop()
            err = convert(e, f"connecting to {self.describe()}")
            if isinstance(e, (OSError, ValueError)) and not isinstance(err, AuthError):
                # Any socket failure while connecting (smbprotocol can leave EBADF behind
                # when its reader thread closed the socket first) is a lost connection.
                err = ConnectionLost(str(err))
            raise err from e

    def _drop(self) -> None:
        """Forget the connections without logging off: a server that stopped answering would
        only make the logoff wait out the timeout (``close`` logs off, under ``deadline``)."""
        for conn in list(self._cache.values()):
            try:
                conn.transport.close()
            except Exception as e:
                log.debug("dropping SMB connection: %s", e)
        self._cache.clear()

    def close(self) -> None:
        try:
            with self.deadline("closing the SMB connection"):  # a tree disconnect waits forever
                for conn in list(self._cache.values()):
                    try:
                        conn.disconnect(timeout=self.settings.timeout)
                    except Exception as e:
                        log.debug("closing SMB connection: %s", e)
        except ConnectionLost as e:
            # The deadline shut the sockets down: the connection is gone, which is all
            # close is for. Never raised: after a complete dump the save would count this
            # target failed and write the whole dump again to the next one (or exit 6).
            log.debug("%s", e)
        self._cache.clear()

    def convert(self, e: BaseException, what: str) -> Exception:
        return convert(e, what)

    def makedir(self, relpath: str) -> None:
        path = self._p(relpath)
        self.call(lambda: smbclient.mkdir(path, **self.kw), f"creating {path}")
        self.restrict(path, is_dir=True)

    def create(self, relpath: str) -> Sink:
        path = self._p(relpath)
        unc_dir, _, name = path.rpartition("\\")
        return CifsSink(self, unc_dir, name)

    def _query(self, path: str) -> _Listing:
        """List a directory with file ids, "." and ".." included.

        Samba follows a symbolic link on the server and shows it as the directory it
        points to: no reparse point, no flag. What gives it away is its file id (the same
        as its target's, when the target sits beside it) or, inside, a ".." that is not
        the directory we came from. Windows links are reparse points.
        """
        raw = []
        opts = CreateOptions.FILE_OPEN_REPARSE_POINT
        with SMBDirectoryIO(path, share_access="rwd", create_options=opts, **self.kw) as fd:
            info = FileInformationClass.FILE_ID_FULL_DIRECTORY_INFORMATION
            for d in fd.query_directory("*", info):
                raw.append(
                    (
                        d["file_name"].get_value().decode("utf-16-le", "replace"),
                        d["file_attributes"].get_value(),
                        d["file_id"].get_value(),
                        d["end_of_file"].get_value(),
                    )
                )
        ids: dict[int, int] = {}
        for name, _, fid, _ in raw:
            if name not in (".", "..") and fid:
                ids[fid] = ids.get(fid, 0) + 1
        dot = dotdot = 0
        items = {}
        for name, attrs, fid, size in raw:
            if name == ".":
                dot = fid
            elif name == "..":
                dotdot = fid
            else:
                link = bool(attrs & _REPARSE) or ids.get(fid, 0) > 1
                items[name] = _Item(name, attrs, fid, size, link)
        return _Listing(dot, dotdot, items)

    def _child(self, parent: _Listing, path: str) -> _Listing:
        """Query a directory that ``parent`` lists; ``UnsafeFile`` if the server got there
        through a link (its ".." is not ``parent``)."""
        sub = self._query(path)
        if parent.dot and sub.dotdot and sub.dotdot != parent.dot:
            raise UnsafeFile(f"{path}: reached through a link on the server; not followed")
        return sub

    def _root_listing(self, fresh: bool) -> _Listing:
        """The root's listing. Every walk starts there (a link is told by its file id among
        its siblings'), so on a target shared by a fleet (thousands of dump directories)
        each read or listing below the root cost a listing of all of them: ``list`` of
        1,000 dumps took 246 s, of 5,000 hours. A read-only session (``list``, ``verify``,
        ``status``, ``notify``: nothing is deleted or written through what it finds)
        reuses one listing of the root for up to ``ROOT_REUSE`` seconds; the root's own
        listing is always fresh, and a session that writes always walks afresh."""
        now = time.monotonic()
        seen = self._root_seen
        if not fresh and self.settings.read_only and seen and now - seen[0] < ROOT_REUSE:
            return seen[1]
        listing = self._query(self.root)
        self._root_seen = (now, listing)
        return listing

    def _walk(self, relpath: str) -> _Listing | None:
        """The listing of directory ``relpath``, no step of it a link; None if missing."""
        parts = [p for p in relpath.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UnsafeFile(f"{relpath!r}: '.' and '..' are not allowed in a target path")
        try:
            cur = self._root_listing(fresh=not parts)
            path = self.root
            for part in parts:
                item = cur.items.get(part)
                path = f"{path}\\{part}"
                if item is None:
                    return None
                if not item.is_dir:
                    raise UnsafeFile(f"{path}: a link or a file, not a directory")
                cur = self._child(cur, path)
        except smbexc.SMBOSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return cur

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)

        def ls() -> list[Entry]:
            listing = self._walk(relpath)
            if listing is None:
                return []
            return [
                Entry(i.name, i.is_dir, 0 if i.is_dir else i.size, i.link)
                for i in listing.items.values()
            ]

        entries = self.call(ls, f"listing {path}")
        return sorted((e for e in entries if not is_temp_name(e.name)), key=lambda e: e.name)

    def read_unc(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Stream one of our own temporary files back from ``offset`` (a seeked sink's
        checksum)."""
        what = f"reading {path}"
        try:
            with self.deadline(what):
                f = smbclient.open_file(path, mode="rb", **self.kw)
                f.seek(offset)
            try:
                while True:
                    with self.deadline(what):
                        chunk = f.read(READ_CHUNK)
                    if not chunk:
                        break
                    yield chunk
            finally:
                with self.deadline(what):
                    f.close()
        except Exception as e:
            raise convert(e, what) from e

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        path = self._p(relpath)
        parent, _, name = relpath.strip("/").rpartition("/")

        def check() -> None:
            listing = self._walk(parent)
            item = listing.items.get(name) if listing is not None else None
            if item is None:
                raise FileNotFoundError(errno.ENOENT, f"{path}: no such file")
            if item.link or item.attributes & (_DIRECTORY | _DEVICE):
                raise UnsafeFile(f"{path}: a link, directory or device; only files are read")
            check_size(item.size, limit, path)

        self.call(check, f"reading {path}")
        seen: list = []
        return self.resumable(
            lambda at: self._read_file(path, limit, at, seen),
            f"reading {path}",
            within=self.read_deadline(limit),
        )

    def _read_file(self, path: str, limit: int | None, offset: int, seen: list) -> Iterator[bytes]:
        """``path`` from ``offset``; ``seen``: (size, last write) of an earlier open of the
        same read, which this one must find again (none yet: it is recorded there)."""
        what = f"reading {path}"
        opts = CreateOptions.FILE_OPEN_REPARSE_POINT  # a link swapped in is opened as itself
        want = READ_CHUNK if limit is None else min(READ_CHUNK, limit + 1)
        try:
            f = SMBFileIO(path, mode="r", share_access="rw", create_options=opts, **self.kw)
            with self.deadline(what):
                f.open()
            try:
                if f.fd.file_attributes & (_REPARSE | _DIRECTORY | _DEVICE):
                    raise UnsafeFile(f"{path}: a link or device; only files are read")
                check_size(f.fd.end_of_file, limit, path)
                same_file(seen, (f.fd.end_of_file, f.fd.last_write_time), path)
                f.seek(offset)

                def chunks() -> Iterator[bytes]:
                    while True:
                        with self.deadline(what):
                            chunk = f.read(want)
                        if not chunk:
                            return
                        yield chunk

                yield from bounded(chunks(), limit, path)
            finally:
                with self.deadline(what):
                    f.close()
        except Exception as e:
            raise convert(e, what) from e

    def remove_tree(self, relpath: str) -> None:
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        path = self._p(relpath)
        parent, _, name = relpath.strip("/").rpartition("/")

        def rm() -> None:
            listing = self._walk(parent)
            item = listing.items.get(name) if listing is not None else None
            if item is None:
                return
            if item.link:
                self._remove_link(path, item)
            elif item.is_dir:
                try:
                    inside = self._child(listing, path)
                except UnsafeFile:
                    self._remove_link(path, item)
                    return
                self._rmtree(inside, path)
            else:
                smbclient.remove(path, **self.kw)

        self.call(rm, f"removing {path}")

    def _rmtree(self, listing: _Listing, path: str) -> None:
        """Delete what ``listing`` (of ``path``) shows, then ``path``."""
        for item in sorted(listing.items.values(), key=lambda i: removal_order(i.name)):
            child = f"{path}\\{item.name}"
            if item.link:
                self._remove_link(child, item)
            elif item.is_dir:
                self._rmtree(self._child(listing, child), child)
            else:
                smbclient.remove(child, **self.kw)
        try:
            smbclient.rmdir(path, **self.kw)
        except smbexc.SMBOSError as e:
            if e.errno != errno.ENOENT:
                raise

    def _remove_link(self, path: str, item: _Item) -> None:
        """Delete a link itself (smbclient opens it with FILE_OPEN_REPARSE_POINT). Samba
        follows links, so it removes one to a directory only while that is empty."""
        try:
            if item.attributes & _DIRECTORY:
                smbclient.rmdir(path, **self.kw)
            else:
                smbclient.remove(path, **self.kw)
        except smbexc.SMBOSError as e:
            raise UnsafeFile(
                f"{path}: a link on the server, which SMB cannot delete without following "
                f"it; left alone ({e.strerror})"
            ) from e

    def remove_file(self, relpath: str) -> None:
        path = self._p(relpath)

        def rm() -> None:
            try:
                smbclient.remove(path, **self.kw)
            except smbexc.SMBOSError as e:
                if e.errno != errno.ENOENT:
                    raise

        self.call(rm, f"removing {path}")

    def free_space(self, relpath: str = "") -> int | None:
        path = self._p(relpath)
        try:
            st = self.call(lambda: smbclient.stat_volume(path, **self.kw), f"statfs {path}")
        except FileNotFoundError as e:  # removed on the server meanwhile: the target failed
            raise TransportError(f"statfs {path}: no such file or directory") from e
        return st.caller_available_size
