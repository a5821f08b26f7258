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

from kdump_capture.errors import AuthError, ConnectionLost, TargetFull, TransportError, UnsafeFile
from kdump_capture.urls import Target

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
from .retry import (
    REPLAY_STEP,
    CannotResume,
    ReplayBuffer,
    RetryingTransport,
    deadline,
    is_connection_lost,
    retry_call,
    shut_down,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 21
READ_CHUNK = 1 << 20
# Seconds a read-only session reuses its listing of the root (``_root_list``).
ROOT_REUSE = 30.0
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
    if isinstance(e, (TransportError, FileExistsError)) or not_the_servers(e):
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


# Owner and group may hold blanks ("domain users" on AD-backed servers): they are whatever
# lies between the link count and the first size-and-date.
_LS_LINE = re.compile(
    r"^([-dlbcps])[-rwxsStTl+.@]{9}\S*\s+\d+\s+\S.*?\s+(\d+)\s+"
    r"\w{3}\s+\d{1,2}\s+(?:\d{1,2}:\d{2}|\d{4})\s(.+)$"
)
# What the type letter of a Unix LIST line means, for messages about refused names.
_LETTER_KIND = {
    "d": "a directory",
    "l": "a symbolic link",
    "p": "a FIFO",
    "c": "a device",
    "b": "a device",
    "s": "a socket",
    "?": "listed twice by the server (a forged line)",
    "": "not shown as a regular file by the server's LIST",
}


def parse_list_line(line: str) -> tuple[str, str, int] | None:
    """(name, type letter, size) from one line of a Unix-style LIST reply (what vsftpd,
    pyftpdlib and most servers send); None if the line is not in that format."""
    m = _LS_LINE.match(line)
    if not m:
        return None
    kind, size, name = m.groups()
    if kind == "l":
        name = name.split(" -> ", 1)[0]
    return name, kind, int(size)


def _int(text: str) -> int:
    """A size fact from the server; 0 if it is not a number."""
    return int(text) if text.isdigit() and len(text) < 20 else 0


# A server may send anything: what a reply and a listing may hold before we hang up. A
# greeting of endless "220-" lines, or a listing that never ends, grew a save past 5 GB.
MAX_CONTROL_REPLY = 64 << 10
MAX_LISTING = 8 << 20


class _TooLong(Exception):
    pass


class BoundedFTP(ftplib.FTP):
    """ftplib.FTP with every multi-line reply and every listing bounded (ftplib bounds one
    line, 8 KiB, not how many); past a bound the connection is closed and the operation
    fails with a TransportError."""

    def getmultiline(self) -> str:
        line = self.getline()
        if line[3:4] != "-":
            return line
        code, parts, size = line[:3], [line], len(line)
        while True:
            nextline = self.getline()
            parts.append(nextline)
            size += len(nextline) + 1
            if size > MAX_CONTROL_REPLY:
                self.close()
                raise TransportError(
                    f"{self.host}: the FTP server sent a reply longer than "
                    f"{MAX_CONTROL_REPLY >> 10} KiB; hung up"
                )
            if nextline[:3] == code and nextline[3:4] != "-":
                return "\n".join(parts)

    def retrlines(self, cmd, callback=None):
        total = 0
        take = callback or ftplib.print_line

        def counted(line: str) -> None:
            nonlocal total
            total += len(line) + 1
            if total > MAX_LISTING:
                raise _TooLong
            take(line)

        try:
            return super().retrlines(cmd, counted)
        except _TooLong:
            self.close()
            raise TransportError(
                f"{self.host}: {cmd.split()[0]} sent more than {MAX_LISTING >> 20} MiB; hung up"
            ) from None


def quit_within(ftp: ftplib.FTP, seconds: float) -> None:
    """QUIT, waiting at most ``seconds`` for the goodbye (trickled, it held the save);
    the connection is closed either way."""
    try:
        with deadline(seconds, "closing the FTP session", lambda: shut_down(ftp.sock)):
            ftp.quit()
    except Exception:
        ftp.close()


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
        super().__init__(name, transport.settings.checksum)
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

    def _call(
        self,
        op: Callable[[], T],
        what: str,
        first_error: Exception | None,
        bounded: bool = True,
    ) -> T:
        """``op`` on this sink's control connection, retried on a new one if it breaks;
        each attempt within the transport's ``op_deadline`` unless it replays data."""

        def attempt() -> T:
            try:
                return op()
            except Exception as e:
                raise convert(e, what) from e

        def guarded() -> T:
            if not bounded:
                return attempt()
            ftp = self._ftp
            with deadline(self._t.op_deadline, what, lambda: shut_down(ftp and ftp.sock)):
                return attempt()

        if self._ftp is None:
            self._reconnect()
        return retry_call(guarded, self._reconnect, self._t.settings, what, first_error=first_error)

    def _start(self) -> None:
        self._ftp.storbinary(f"STOR {self._tmp}", io.BytesIO(b""))
        self._t.chmod(self._ftp, self._tmp, "600")
        try:
            self._open_data()
        except ftplib.error_perm as e:
            if str(e)[:3] not in ("550", "553"):  # 552: a quota, reported as it is
                raise
            # STOR was taken, APPE on the same file is not: an upload-only account
            # (vsftpd's anonymous uploads without anon_other_write_enable, or with
            # chown_uploads, which hands the file to another user at once).
            raise TransportError(
                f"{self._tmp}: the FTP server took the file but refuses to append to it "
                f"({str(e).strip()}): a save appends to its files (APPE) and renames them "
                "(RNFR/RNTO), which this account may not do; vsftpd: an anonymous upload "
                "account needs anon_other_write_enable=YES and no chown_uploads"
            ) from e

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
            self._call(self._resume, f"resuming {self._tmp}", first_error=err, bounded=False)

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
        ftp = self._ftp
        what = f"finishing {self._tmp}"
        with deadline(self._t.op_deadline, what, lambda: shut_down(ftp.sock)):
            reply = ftp.voidresp()  # trickled, it held the save
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
        return FileInfo(self.name, size, self._digest(), self.algorithm)

    def _publish(self) -> None:
        try:
            self._ftp.rename(self._tmp, self._final)
        except ftplib.error_perm:
            # A retry after a lost reply: the rename may already have happened.
            if size_of(self._ftp, self._final) != self.size or size_of(self._ftp, self._tmp) >= 0:
                raise

    def _quit(self) -> None:
        if self._ftp is not None:
            quit_within(self._ftp, self._t.op_deadline)
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
        self._list_a = True  # whether the server takes "LIST -a PATH"
        # The server's refusal of the last listing, if it refused (else None)
        self._refused: str | None = None
        self._refused_at = ""
        # (time, entries) of the root, reused by a read-only session's lookups (below).
        self._root_seen: tuple[float, list[Entry]] | None = None

    @property
    def ftp(self) -> ftplib.FTP:
        if self._ftp is None or self._ftp.sock is None:  # never opened, or hung up on
            raise ConnectionLost(f"{self.describe()}: not connected")
        return self._ftp

    def _ensure_root(self) -> None:
        self._makedirs(self.root)

    def _open(self) -> None:
        self.close()
        self._ftp = self.login()

    def login(self) -> ftplib.FTP:
        """A new logged-in control connection (passive, binary), within ``op_deadline``
        (a greeting trickled a byte a second held a save for good)."""
        ftp = BoundedFTP(timeout=self.settings.timeout)
        what = f"connecting to {self.describe()}"
        try:
            with deadline(self.op_deadline, what, lambda: shut_down(ftp.sock)):
                ftp.connect(self.target.host, self.port)
                # ftplib sends "anonymous@" as the password of an anonymous login.
                ftp.login(self.target.user or "anonymous", self.target.password or "")
                ftp.set_pasv(True)
                ftp.voidcmd("TYPE I")
        except Exception as e:
            ftp.close()
            text = str(e)
            if text.startswith("421") and "connections" in text.lower():
                # vsftpd's max_per_ip=1 and the like: an upload holds a second connection
                what += (
                    " (a save keeps two connections to the server open: one for the upload, "
                    "one for its other commands; the server must allow two from this host)"
                )
            raise convert(e, what) from e
        return ftp

    def _drop_connection(self) -> None:
        shut_down(self._ftp.sock if self._ftp is not None else None)

    def _open_bounded(self) -> None:
        self._open()  # login() bounds itself (the sinks' own connections log in too)

    def close(self) -> None:
        if self._ftp is not None:
            quit_within(self._ftp, self.op_deadline)
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
            if self._is_dir(path) or self.binary_size(path) >= 0:
                raise FileExistsError(errno.EEXIST, f"{path} exists")
            try:
                self._mkd(path)
            except ftplib.error_perm:
                # Taken by what neither CWD nor SIZE sees (a FIFO, a device, a dangling
                # link): the next name will do.
                parent, name = posixpath.split(path)
                if any(e.name == name for e in self._list(parent)):
                    raise FileExistsError(errno.EEXIST, f"{path} exists") from None
                raise

        self.call(mk, f"creating {path}")

    def create(self, relpath: str) -> Sink:
        path = self._p(relpath)
        return FtpSink(self, posixpath.dirname(path), posixpath.basename(path))

    def _unix_list(self, path: str) -> dict[str, tuple[str, int]] | None:
        """{name: (type letter, size)} from a Unix-style LIST; None if the server's LIST is
        not in that format. Unlike MLSD on pyftpdlib (which follows links to tell a file
        from a directory), LIST shows a link as a link, and a FIFO as a FIFO."""
        lines: list[str] = []
        try:
            if not self._list_a:
                raise ftplib.error_perm("550 LIST -a is not understood here")
            reply = self.ftp.retrlines(f"LIST -a {path}", lines.append)
        except ftplib.error_perm:
            # pyftpdlib takes "-a DIR" for a path; vsftpd hides dot files without -a.
            lines = []
            try:
                reply = self.ftp.retrlines(f"LIST {path}", lines.append)
            except ftplib.error_perm as e:
                if str(e)[:3] != "550":
                    return None
                self._refused = str(e).strip()  # or no such directory: the caller asks
                return {}
            self._list_a = False
        if not lines and "failed to open directory" in reply:
            # vsftpd's 226 for a directory it cannot read (or that does not exist)
            self._refused = reply.strip()
        out: dict[str, tuple[str, int]] = {}
        unparsed = 0
        for line in lines:
            if line.startswith("total"):
                continue
            parsed = parse_list_line(line)
            if parsed is None:
                # A name with a newline in it splits its line in two: the server's format
                # is still Unix-style, and the lines it does parse still tell links apart.
                unparsed += 1
                continue
            name, kind, size = parsed
            if name in (".", ".."):
                continue
            if out.get(name, (kind, size)) != (kind, size):
                # Two lines for one name: one was forged inside another entry's name.
                kind, size = "?", 0
            out[name] = (kind, size)
        if unparsed and not out:
            return None  # not a Unix-style LIST at all
        return out

    def _list(self, path: str) -> list[Entry]:
        """All entries, temporary ones included, links marked: MLSD for names and sizes,
        checked against LIST for links; else LIST alone; else NLST plus SIZE. A listing
        the server refused is empty, with ``_refused`` set to its reply."""
        self._refused, self._refused_at = None, path
        unix = self._unix_list(path)
        try:
            facts = list(self.ftp.mlsd(path, facts=["type", "size"]))
        except ftplib.error_perm as e:
            if str(e)[:3] == "550":
                self._refused = self._refused or str(e).strip()
                return []
            facts = None
        if facts is None:
            if unix is not None:
                return [
                    Entry(n, k == "d", 0 if k == "d" else size, k in ("l", "?"))
                    for n, (k, size) in unix.items()
                ]
            return self._list_nlst(path)
        out = []
        for name, f in facts:
            kind = f.get("type", "").lower()
            if kind in ("cdir", "pdir") or name in (".", ".."):
                continue
            # A name LIST does not show, shows as a link, or shows twice ("?") is never
            # descended into.
            link = "slink" in kind or (unix is not None and unix.get(name, ("l",))[0] in ("l", "?"))
            is_dir = kind == "dir" and not link
            out.append(Entry(name, is_dir, 0 if is_dir else _int(f.get("size", "0")), link))
        return out

    def _list_nlst(self, path: str) -> list[Entry]:
        """Neither MLSD nor a Unix LIST: bare NLST names plus SIZE (links cannot be told)."""
        try:
            names = self.ftp.nlst(path)
        except ftplib.error_perm:
            return []
        out = []
        for n in names:
            name = posixpath.basename(n.rstrip("/"))
            if name in (".", ".."):
                continue
            full = posixpath.join(path, name)
            size = self.size_of(full)
            is_dir = size < 0 and self._is_dir(full)
            out.append(Entry(name, is_dir, max(size, 0)))
        return out

    def _root_list(self, fresh: bool) -> list[Entry]:
        """The root's listing. Every lookup starts there (no step may be a link), so on a
        target shared by a fleet (thousands of dump directories) each read or listing
        below the root cost a listing of all of them, twice (LIST and MLSD): ``list`` of
        1,000 dumps took 67 s, 5,000 quadratically more. A read-only session (``list``,
        ``verify``, ``status``, ``notify``: nothing is deleted or written through what it
        finds) reuses one listing of the root for up to ``ROOT_REUSE`` seconds; the
        root's own listing is always fresh, and a session that writes always lists."""
        now = time.monotonic()
        seen = self._root_seen
        if not fresh and self.settings.read_only and seen and now - seen[0] < ROOT_REUSE:
            self._refused, self._refused_at = None, self._p("")
            return seen[1]
        entries = self._list(self._p(""))
        self._root_seen = None if self._refused else (now, entries)
        return entries

    def _lookup(self, relpath: str) -> Entry | None:
        """The entry of ``relpath`` in its parent's listing, after checking that every
        directory on the way is a directory and not a link; None if it does not exist."""
        parts = [p for p in relpath.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UnsafeFile(f"{relpath!r}: '.' and '..' are not allowed in a target path")
        entry = None
        for i, part in enumerate(parts):
            if entry is not None and not entry.is_dir:
                where = self._p("/".join(parts[:i]))
                raise UnsafeFile(f"{where}: a link or a file, not a directory")
            if i == 0:
                listing = self._root_list(fresh=False)
            else:
                listing = self._list(self._p("/".join(parts[:i])))
            entry = next((e for e in listing if e.name == part), None)
            if entry is None:
                return None
        return entry

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)

        def ls() -> list[Entry]:
            if relpath.strip("/"):
                entry = self._lookup(relpath)
                if entry is None:
                    refused, parent = self._refused, self._refused_at
                    if refused and self.settings.read_only and self._is_dir(path):
                        self._unlisted(parent, refused)  # the parent: no link check
                    return []
                if not entry.is_dir:
                    raise UnsafeFile(f"{path}: a link or a file, not a directory")
            entries = self._list(path) if relpath.strip("/") else self._root_list(fresh=True)
            if not entries and self._refused and self._is_dir(path):
                self._unlisted(path, self._refused)
            return entries

        entries = self.call(ls, f"listing {path}")
        return sorted((e for e in entries if not is_temp_name(e.name)), key=lambda e: e.name)

    def _unlisted(self, path: str, reply: str) -> None:
        """A directory that is there (CWD works) and that the server will not list: an
        upload-only account (vsftpd's ``dirlist_enable=NO``, an anonymous ``incoming``
        directory of mode 0733, a pyftpdlib user without the ``l`` permission). A save goes
        on, judging nothing it cannot see (as S3 with a write-only key); a listing fails
        rather than read as "no dumps"."""
        if self.settings.read_only:
            raise TransportError(
                f"listing {path}: the FTP server will not list it ({reply}): an upload-only "
                "account; list and verify with an account that may list"
            )
        self.note_once(
            f"the FTP server will not list {path} ({reply}): an upload-only account: the "
            "dumps already there were not looked at, so none were rotated "
            "(KDUMP_KEEP_OLD_DUMPS did not apply) and no leftovers of failed saves removed"
        )

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        path = self._p(relpath)

        def check() -> None:
            entry = self._lookup(relpath)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, f"{path}: no such file")
            unix = self._unix_list(posixpath.dirname(path))
            # Without a Unix LIST (MLSD only) the server cannot tell; with one, a name it
            # does not show as a regular file is refused.
            kind = "-" if unix is None else unix.get(entry.name, ("",))[0]
            if entry.is_dir or entry.is_link or kind != "-":
                what = _LETTER_KIND.get(kind, "a directory or a link")
                # Checked before RETR: a server opening a FIFO would block.
                raise UnsafeFile(f"{path}: {what}; only regular files are read")
            check_size(entry.size, limit, path)

        self.call(check, f"reading {path}")
        seen: list = []
        return self.resumable(
            lambda at: self._retr(path, limit, at, seen),
            f"reading {path}",
            within=self.read_deadline(limit),
        )

    def _retr(self, path: str, limit: int | None, offset: int, seen: list) -> Iterator[bytes]:
        """``path`` from ``offset`` (REST); ``seen``: the SIZE and MDTM of an earlier RETR of
        the same read, which this one must find again (none yet: they are recorded there)."""
        try:
            self.ftp.voidcmd("TYPE I")  # listings (retrlines) switch the session to ASCII
            same_file(seen, (size_of(self.ftp, path), self._mdtm(path)), path)
            conn = self.ftp.transfercmd(f"RETR {path}", rest=offset or None)
            try:
                with conn:
                    yield from bounded(iter(lambda: conn.recv(READ_CHUNK), b""), limit, path)
            except UnsafeFile:
                # We hung up mid-transfer: the session's reply is unknown; start afresh.
                self.close()
                raise
            self.ftp.voidresp()
        except Exception as e:
            raise convert(e, f"reading {path}") from e

    def _mdtm(self, path: str) -> str | None:
        """The server's modification time of ``path`` (MDTM, RFC 3659), None without it."""
        try:
            return self.ftp.voidcmd(f"MDTM {path}")
        except ftplib.error_perm:
            return None

    def remove_tree(self, relpath: str) -> None:
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        path = self._p(relpath)

        def rm() -> None:
            entry = self._lookup(relpath)
            if entry is None:
                return
            if entry.is_dir:
                self._rmtree(path)
            else:
                self.ftp.delete(path)  # a link goes, not what it points to

        self.call(rm, f"removing {path}")

    def _rmtree(self, path: str) -> None:
        for e in sorted(self._list(path), key=lambda e: removal_order(e.name)):
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
