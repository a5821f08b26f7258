"""FTP transport (ftp:// targets) over ftplib: passive, binary, resumable with SIZE + APPE.

An upload creates the temporary file empty, tries ``SITE CHMOD 600`` on it, then streams
the data with APPE on one data connection we write to directly. A dropped connection
resumes from the size the server reports. Commit checks the final 226 reply and SIZE
before RNFR/RNTO. FTP cannot report free space.
"""

from __future__ import annotations

import errno
import ftplib
import io
import logging
import posixpath
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from kdump_capture.errors import AuthError, ConnectionLost, TargetFull, TransportError
from kdump_capture.urls import Target

from .base import Entry, FileInfo, Sink, TransportSettings, is_temp_name, temp_name
from .retry import (
    REPLAY_STEP,
    CannotResume,
    ReplayBuffer,
    RetryingTransport,
    is_connection_lost,
    retry_call,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 21
READ_CHUNK = 1 << 20
# Cap the data socket's send buffer (the kernel doubles it) so the bytes the server has
# not yet written stay far inside the 16 MiB replay buffer, with room for the server's
# receive buffer (Linux autotunes it up to 6 MiB).
SNDBUF = 2 << 20
# So FTP keeps at least this much for replay whatever the budget: unlike SFTP and SMB, it
# has no acknowledgements to bound what is in flight.
MIN_REPLAY = 12 << 20
# What the server holds is known only by asking (SIZE). The socket buffers above are not
# all there is: anything between (a proxy, a router's queue) holds bytes too, and an FTP
# upload dropped at 99% through a buffering proxy lost its dump ("cannot resume"). So
# every CONFIRM_EVERY bytes the sink asks, on the transport's own control connection (idle
# while the sink transfers), and waits while more than MAX_UNCONFIRMED is on the way: at
# most MAX_UNCONFIRMED + CONFIRM_EVERY + REPLAY_STEP (11 MiB) is ever unconfirmed, all of
# it in the replay buffer. On loopback the server is rarely that far behind.
CONFIRM_EVERY = 4 << 20
MAX_UNCONFIRMED = 6 << 20
# While waiting, ask again this often: the server writes what is on the way at disk or
# network speed, a few milliseconds per MiB.
CONFIRM_POLL = 0.005
# Replies that mean the target is full: RFC 959 452/552, and servers that say it in 426/451.
_FULL_CODES = ("452", "552")
_FULL_TEXT = re.compile(r"no space|disk full|quota|exceed", re.I)


def convert(e: BaseException, what: str) -> Exception:
    """Map an ftplib/socket exception to our error tree (the module boundary)."""
    if isinstance(e, (TransportError, FileExistsError)):
        return e
    text = str(e)
    code = text[:3]
    if isinstance(e, ftplib.Error) and (code in _FULL_CODES or _FULL_TEXT.search(text)):
        return TargetFull(f"{what}: target is full ({text})")
    if isinstance(e, ftplib.error_perm) and code == "530":
        return AuthError(f"{what}: login refused ({text})")
    if is_connection_lost(e) or isinstance(e, (EOFError, ftplib.error_reply)):
        return ConnectionLost(f"{what}: connection lost ({text or type(e).__name__})")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetFull(f"{what}: target is full")
    if isinstance(e, ftplib.error_temp):
        return ConnectionLost(f"{what}: temporary failure ({text})")
    return TransportError(f"{what}: {text or type(e).__name__}")


_LS_LINE = re.compile(
    r"^([-dlbcps])[-rwxsStTl+.@]{9}\S*\s+\d+\s+\S+\s+\S+\s+(\d+)\s+"
    r"\w{3}\s+\d{1,2}\s+(?:\d{1,2}:\d{2}|\d{4})\s(.+)$"
)


def parse_list_line(line: str) -> Entry | None:
    """One line of a Unix-style LIST reply (what vsftpd and most servers send)."""
    m = _LS_LINE.match(line)
    if not m:
        return None
    kind, size, name = m.groups()
    if kind == "l":
        name = name.split(" -> ", 1)[0]
    return Entry(name, kind == "d", 0 if kind == "d" else int(size))


def size_of(ftp: ftplib.FTP, path: str) -> int:
    """SIZE of a file, -1 if it does not exist (or is a directory)."""
    try:
        size = ftp.size(path)
    except ftplib.error_perm:
        return -1
    return -1 if size is None else size


class FtpSink(Sink):
    """One STOR/APPE data connection we write to; not seekable.

    The sink logs in a control connection of its own: FTP cannot run other commands on
    a session while it transfers, and the transport stays usable for listings.
    """

    def __init__(self, transport: FtpTransport, directory: str, name: str) -> None:
        super().__init__(name)
        self._t = transport
        self._final = posixpath.join(directory, name)
        self._tmp = posixpath.join(directory, temp_name(name))
        self._replay = ReplayBuffer(max(MIN_REPLAY, transport.settings.replay_bytes))
        self._data: socket.socket | None = None
        self._ftp: ftplib.FTP | None = None
        self._resumed_at = -1
        self._next_confirm = CONFIRM_EVERY
        self._call(self._start, f"creating {self._tmp}", first_error=None)

    def _reconnect(self) -> None:
        self._close_data()
        if self._ftp is not None:
            self._ftp.close()
            self._ftp = None
        self._ftp = self._t.login()

    def _call(self, op: Callable[[], T], what: str, first_error: Exception | None) -> T:
        def guarded() -> T:
            try:
                return op()
            except Exception as e:
                raise convert(e, what) from e

        if self._ftp is None:
            self._reconnect()
        return retry_call(guarded, self._reconnect, self._t.settings, what, first_error=first_error)

    def _start(self) -> None:
        self._ftp.storbinary(f"STOR {self._tmp}", io.BytesIO(b""))
        self._t.chmod(self._ftp, self._tmp, "600")
        self._open_data()

    def _open_data(self) -> None:
        self._ftp.voidcmd("TYPE I")  # listings (retrlines) switch a session to ASCII
        self._data = self._ftp.transfercmd(f"APPE {self._tmp}")
        self._data.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)

    def _close_data(self) -> None:
        if self._data is not None:
            try:
                self._data.close()
            finally:
                self._data = None

    def _failed(self, e: BaseException, what: str) -> Exception:
        """Classify a data-connection failure by the server's reply, if it sent one."""
        self._close_data()
        err = convert(e, what)
        if not is_connection_lost(err):
            return err
        try:
            self._ftp.getresp()  # 226 (it saw EOF) or an error reply
        except Exception as reply_error:
            reply = convert(reply_error, what)
            if not is_connection_lost(reply):
                return reply  # the server refused the data (full, denied): no resume
        return err

    def _resume(self) -> None:
        size = self._ftp.size(self._tmp)
        if size is None:
            raise TransportError(f"{self._tmp}: the server cannot report SIZE; cannot resume")
        if size == self._resumed_at:
            # The server aborted twice at the same byte: a server-side failure it does not
            # name (pyftpdlib says "426 None" when its disk is full), not the network.
            raise CannotResume(f"{self._tmp}: the server keeps aborting the upload at byte {size}")
        self._resumed_at = size
        log.info("%s: resuming at byte %d of %d", self._tmp, size, self._replay.end)
        self._open_data()
        for _, view in self._replay.since(size):
            self._data.sendall(view)

    def _guarded(self, op: Callable[[], None], what: str) -> None:
        try:
            op()
        except Exception as e:
            err = self._failed(e, what)
            if not is_connection_lost(err):
                raise err from e
            self._call(self._resume, f"resuming {self._tmp}", first_error=err)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._accounting(view):
            for start in range(0, len(view), REPLAY_STEP):
                self._store(self._pos + start, view[start : start + REPLAY_STEP])

    def _store(self, offset: int, piece: memoryview) -> None:
        self._replay.add(offset, piece)
        self._guarded(lambda: self._data.sendall(piece), f"writing {self._tmp}")
        if self._replay.end >= self._next_confirm:
            self._next_confirm = self._replay.end + CONFIRM_EVERY
            self._guarded(self._confirm, f"writing {self._tmp}")

    def _confirm(self) -> None:
        """Wait until the server holds all but MAX_UNCONFIRMED bytes of what was sent; a
        server that takes nothing for the timeout counts as a lost connection."""
        end, last, since = self._replay.end, -1, time.monotonic()
        while True:
            held = self._t.call(lambda: self._t.binary_size(self._tmp), f"SIZE {self._tmp}")
            if held < 0:
                raise TransportError(f"{self._tmp}: the file is gone from the server")
            if end - held <= MAX_UNCONFIRMED:
                return
            now = time.monotonic()
            if held != last:
                last, since = held, now
            elif now - since > self._t.settings.timeout:
                raise ConnectionLost(
                    f"{self._tmp}: the server took nothing for "
                    f"{self._t.settings.timeout:.0f} s (it holds {held} of {end} bytes)"
                )
            time.sleep(CONFIRM_POLL)

    def _finish(self) -> None:
        """Close the data connection and require the server's transfer-complete reply."""
        data, self._data = self._data, None
        data.shutdown(socket.SHUT_WR)
        data.close()
        reply = self._ftp.voidresp()
        if not reply.startswith(("226", "250")):
            raise TransportError(f"{self._tmp}: unexpected end-of-transfer reply {reply!r}")

    def commit(self) -> FileInfo:
        self._guarded(self._finish, f"finishing {self._tmp}")
        size = self._call(lambda: self._ftp.size(self._tmp), f"SIZE {self._tmp}", None)
        if size != self.size:
            raise TransportError(f"{self._tmp}: wrote {self.size} bytes but the server has {size}")
        self._call(self._publish, f"renaming {self._tmp} to {self._final}", None)
        self.committed = True
        self._quit()
        return FileInfo(self.name, size, self._sha256())

    def _publish(self) -> None:
        try:
            self._ftp.rename(self._tmp, self._final)
        except ftplib.error_perm:
            # A retry after a lost reply: the rename may already have happened.
            if size_of(self._ftp, self._final) != self.size or size_of(self._ftp, self._tmp) >= 0:
                raise

    def _quit(self) -> None:
        if self._ftp is not None:
            try:
                self._ftp.quit()
            except Exception:
                self._ftp.close()
            self._ftp = None

    def abort(self) -> None:
        self._stop_hashing()
        if self._data is not None:
            try:
                self._close_data()
                self._ftp.getresp()
            except Exception as e:
                log.debug("closing transfer of %s: %s", self._tmp, e)
        try:
            self._call(lambda: self._ftp.delete(self._tmp), f"removing {self._tmp}", None)
        except Exception as e:
            log.debug("removing %s: %s", self._tmp, e)
        self._quit()


class FtpTransport(RetryingTransport):
    """Dumps to a directory on an FTP server (anonymous when the URL has no user)."""

    scheme = "ftp"

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self.port = target.port or DEFAULT_PORT
        self._ftp: ftplib.FTP | None = None
        self._chmod_ok = True
        self._told_free = False

    @property
    def ftp(self) -> ftplib.FTP:
        if self._ftp is None:
            raise ConnectionLost(f"{self.describe()}: not connected")
        return self._ftp

    def _ensure_root(self) -> None:
        self._makedirs(self.root)

    def _open(self) -> None:
        self.close()
        self._ftp = self.login()

    def login(self) -> ftplib.FTP:
        """A new logged-in control connection (passive, binary)."""
        ftp = ftplib.FTP(timeout=self.settings.timeout)
        try:
            ftp.connect(self.target.host, self.port)
            # ftplib sends "anonymous@" as the password of an anonymous login.
            ftp.login(self.target.user or "anonymous", self.target.password or "")
            ftp.set_pasv(True)
            ftp.voidcmd("TYPE I")
        except Exception as e:
            ftp.close()
            raise convert(e, f"connecting to {self.describe()}") from e
        return ftp

    def close(self) -> None:
        if self._ftp is not None:
            try:
                self._ftp.quit()
            except Exception:
                self._ftp.close()
            self._ftp = None

    def convert(self, e: BaseException, what: str) -> Exception:
        return convert(e, what)

    def chmod(self, ftp: ftplib.FTP, path: str, mode: str) -> None:
        """SITE CHMOD if the server has it; if not, warn once per dump and say so in its
        README: files and directories then keep the modes the server's umask gives them."""
        if not self._chmod_ok:
            return
        try:
            ftp.voidcmd(f"SITE CHMOD {mode} {path}")
        except ftplib.error_perm as e:
            self._chmod_ok = False
            self.note_once(
                f"the FTP server refused SITE CHMOD ({str(e).strip()}): the dump's files and "
                "directories have the modes of the server's umask and may be readable by "
                "other users of the server"
            )

    def size_of(self, path: str) -> int:
        return size_of(self.ftp, path)

    def binary_size(self, path: str) -> int:
        """SIZE after TYPE I: a listing leaves the session in ASCII, where vsftpd refuses SIZE."""
        self.ftp.voidcmd("TYPE I")
        return size_of(self.ftp, path)

    def _is_dir(self, path: str) -> bool:
        try:
            self.ftp.cwd(path)
        except ftplib.error_perm:
            return False
        self.ftp.cwd("/")
        return True

    def _mkd(self, path: str) -> None:
        self.ftp.mkd(path)
        self.chmod(self.ftp, path, "700")

    def _makedirs(self, path: str) -> None:
        cur = ""
        for part in [p for p in path.split("/") if p]:
            cur = f"{cur}/{part}"
            if not self._is_dir(cur):
                try:
                    self._mkd(cur)
                except ftplib.error_perm:
                    if not self._is_dir(cur):  # lost a race, or really cannot create
                        raise

    def makedir(self, relpath: str) -> None:
        path = self._p(relpath)

        def mk() -> None:
            if self._is_dir(path) or self.size_of(path) >= 0:
                raise FileExistsError(errno.EEXIST, f"{path} exists")
            self._mkd(path)

        self.call(mk, f"creating {path}")

    def create(self, relpath: str) -> Sink:
        path = self._p(relpath)
        return FtpSink(self, posixpath.dirname(path), posixpath.basename(path))

    def _list(self, path: str) -> list[Entry]:
        """All entries, temporary ones included: MLSD, else NLST plus SIZE."""
        try:
            facts = list(self.ftp.mlsd(path, facts=["type", "size"]))
        except ftplib.error_perm as e:
            if str(e)[:3] == "550":
                return []
            return self._list_nlst(path)
        out = []
        for name, f in facts:
            kind = f.get("type", "").lower()
            if kind in ("cdir", "pdir") or name in (".", ".."):
                continue
            is_dir = kind == "dir"
            out.append(Entry(name, is_dir, 0 if is_dir else int(f.get("size", 0))))
        return out

    def _list_nlst(self, path: str) -> list[Entry]:
        """Without MLSD: ``LIST -a`` in Unix ls format, else bare NLST names plus SIZE."""
        lines: list[str] = []
        try:
            self.ftp.retrlines(f"LIST -a {path}", lines.append)
        except ftplib.error_perm:
            return []
        parsed = [parse_list_line(line) for line in lines if not line.startswith("total")]
        if parsed and all(p is not None for p in parsed):
            return [p for p in parsed if p.name not in (".", "..")]
        out = []
        for n in self.ftp.nlst(path):
            name = posixpath.basename(n.rstrip("/"))
            if name in (".", ".."):
                continue
            full = posixpath.join(path, name)
            size = self.size_of(full)
            is_dir = size < 0 and self._is_dir(full)
            out.append(Entry(name, is_dir, max(size, 0)))
        return out

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)
        entries = self.call(lambda: self._list(path), f"listing {path}")
        return sorted((e for e in entries if not is_temp_name(e.name)), key=lambda e: e.name)

    def read(self, relpath: str) -> Iterator[bytes]:
        path = self._p(relpath)
        try:
            self.ftp.voidcmd("TYPE I")  # listings (retrlines) switch the session to ASCII
            conn = self.ftp.transfercmd(f"RETR {path}")
            with conn:
                while chunk := conn.recv(READ_CHUNK):
                    yield chunk
            self.ftp.voidresp()
        except Exception as e:
            raise convert(e, f"reading {path}") from e

    def remove_tree(self, relpath: str) -> None:
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        path = self._p(relpath)
        self.call(lambda: self._rmtree(path), f"removing {path}")

    def _rmtree(self, path: str) -> None:
        if not self._is_dir(path):
            return
        for e in self._list(path):
            child = posixpath.join(path, e.name)
            if e.is_dir:
                self._rmtree(child)
            else:
                self.ftp.delete(child)
        self.ftp.rmd(path)

    def remove_file(self, relpath: str) -> None:
        path = self._p(relpath)

        def rm() -> None:
            try:
                self.ftp.delete(path)
            except ftplib.error_perm:
                if self.size_of(path) >= 0:
                    raise

        self.call(rm, f"removing {path}")

    def free_space(self, relpath: str = "") -> int | None:
        if not self._told_free:
            log.info("%s: FTP cannot report free space; not checking it", self.describe())
            self._told_free = True
        return None
