"""SFTP transport (ssh://, sftp://, scp:// targets) over paramiko, with resumable uploads.

Host keys come only from configuration (``host_key``) or known_hosts files: no
trust-on-first-use, no prompts, no agent. Uploads pipeline large WRITE requests and keep
a replay buffer, so a dropped connection resumes from the size the server holds.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import posixpath
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
from paramiko.sftp import (
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_READ,
    CMD_STATUS,
    CMD_WRITE,
    int64,
)
from paramiko.ssh_exception import IncompatiblePeer

from kdump_capture.bounds import read_small_file
from kdump_capture.errors import AuthError, ConnectionLost, TargetFull, TransportError, UnsafeFile
from kdump_capture.urls import Target

from .base import (
    DIR_MODE,
    FILE_MODE,
    Entry,
    FileInfo,
    Sink,
    TransportSettings,
    bounded,
    check_size,
    is_temp_name,
    mode_kind,
    not_the_servers,
    removal_order,
    require_regular,
    same_file,
    temp_name,
)
from .retry import (
    REPLAY_STEP,
    ReplayBuffer,
    RetryingTransport,
    deadline,
    is_connection_lost,
    shut_down,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
DEFAULT_USER = "root"
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")

# Fastest ciphers first: AES-GCM and AES-CTR use AES-NI through OpenSSL; chacha20 is
# not offered by paramiko. Anything else the server insists on stays allowed after them.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
# Reads (the read-back that hashes a seeked file, manifests) keep at most this much
# requested and unread. paramiko's prefetch asks for the whole file at once, and with a
# request limit it can still end up buffering all of it (once its count of outstanding
# requests touches zero it stops consuming, but its thread goes on asking); a capture at
# crashkernel=128M was OOM-killed hashing back a 21 MB dump. 64 requests of 32 KiB (the
# read size every SFTP server accepts), or 8 of OpenSSH's 255 KiB (limits@openssh.com):
# paramiko's cost is mostly per reply, and reading back 22 MB on one CPU took 0.11 s of
# client CPU in 32 KiB replies, 0.06-0.07 s in 255 KiB ones (loopback, OpenSSH 9.2).
READ_AHEAD = 2 << 20
READ_REQUEST = 32 << 10
MAX_READ = 256 << 10
# Our receive window (only matters for reads): twice the read-ahead, so one round trip
# never stalls a stream, and a bound on what the server may send before we read it.
WINDOW_SIZE = 2 * READ_AHEAD
MAX_PACKET = 256 << 10
# The SFTP draft requires servers to accept 32 KiB writes; OpenSSH announces 255 KiB via
# limits@openssh.com, which cuts per-request overhead by eight.
MIN_WRITE = 32 << 10
# Unacknowledged WRITE data in flight: enough to cover the bandwidth-delay product of a
# LAN, and well below the replay buffer so every unconfirmed byte can be replayed.
MAX_INFLIGHT = 8 << 20
# Read-back hands out chunks of this size: large enough that the consumer (SHA-256) runs
# in few calls, small enough that the chunk and its bytes copy add little to READ_AHEAD.
READ_CHUNK = 256 << 10
# SSH_FXP_WRITE (draft-ietf-secsh-filexfer-02, 6.4): length, type, request id, handle
# length, then the handle, then offset and data length, then the data.
SFTP_WRITE_HEAD = struct.Struct(">IBII")
SFTP_WRITE_TAIL = struct.Struct(">QI")
# statvfs@openssh.com (OpenSSH PROTOCOL, 3.4): f_flag bit of a read-only filesystem
SSH_FXE_STATVFS_ST_RDONLY = 0x1

TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# OpenSSH key type names, and the host key algorithms that negotiate each of them.
_KEY_ALGOS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


class QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once (TCP_QUICKACK, re-armed after
    every read: Linux drops back to delayed ACKs on its own).

    A server's Nagle algorithm holds a small reply while an earlier packet of its own is
    unacknowledged, and a client with nothing to send delays that ACK by up to 40 ms: here
    OpenSSH's hostkeys-00 message after authentication held the answer to our channel open
    for 41 ms (sshd sets TCP_NODELAY only for interactive sessions). Wherever else the
    server sends twice in a row the same can happen (not measured one by one). One
    setsockopt per read costs 0.23 us here; paramiko reads with recv, twice per packet.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        try:
            self.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        except OSError:
            pass
        return data


def quickack_socket(sock: socket.socket) -> socket.socket:
    """``sock`` as a QuickAckSocket (its timeout kept), or itself where TCP_QUICKACK does
    not exist (it is Linux's)."""
    if TCP_QUICKACK is None:
        return sock
    timeout = sock.gettimeout()
    quick = QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    quick.settimeout(timeout)
    return quick


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: bare on port 22, else [host]:port."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def expected_keys(target: Target, settings: TransportSettings) -> dict[str, str] | None:
    """Acceptable host keys as {type: base64}; None means "any" (host_key '*').

    Raises AuthError when nothing is configured for this host.
    """
    host, port = target.host, target.port or DEFAULT_PORT
    if settings.host_key.strip() == "*":
        return None
    if settings.host_key.strip():
        parts = settings.host_key.split()
        if len(parts) < 2:
            raise AuthError(f"host key {settings.host_key!r} is not '<type> <base64>'")
        return {parts[0]: parts[1]}
    files = settings.known_hosts or (os.path.expanduser("~/.ssh/known_hosts"),)
    keys = paramiko.HostKeys()
    revoked: set[str] = set()
    for path in files:
        try:
            load_known_hosts(path, keys, revoked)
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as e:
            raise AuthError(f"cannot read known_hosts file {path}: {e}") from e
    name = known_hosts_name(host, port)
    entry = keys.lookup(name)
    if not entry:
        raise AuthError(
            f"no host key for {name} in {', '.join(files)}; "
            "set KDUMP_HOST_KEY or add the key to known_hosts (keys are never trusted on first use)"
        )
    found = {ktype: entry[ktype].get_base64() for ktype in entry.keys()}
    usable = {t: k for t, k in found.items() if k not in revoked}
    if not usable:
        raise AuthError(f"the host key of {name} is marked @revoked in {', '.join(files)}")
    return usable


def load_known_hosts(path: str, keys: paramiko.HostKeys, revoked: set[str]) -> None:
    """The host keys of an OpenSSH known_hosts file into ``keys``, the keys of its
    ``@revoked`` lines into ``revoked`` (for every host: stricter than ssh). Skipped, as ssh
    skips what it cannot use: ``@cert-authority`` lines (certificates are not checked here,
    the host needs a plain line too) and lines that do not parse. paramiko's own loader
    raised on both, and a save with SSH CAs in known_hosts ended in an internal error."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            marker = ""
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                line = line.strip()
                if marker != "@revoked":
                    continue
            try:
                entry = HostKeyEntry.from_line(line, lineno)
            except (paramiko.SSHException, InvalidHostKey, ValueError) as e:
                log.debug("%s:%d: skipped (%s)", path, lineno, e)
                continue
            if entry is None:
                continue
            if marker:
                revoked.add(entry.key.get_base64())
                continue
            for hostname in entry.hostnames:
                keys.add(hostname, entry.key.get_name(), entry.key)


# An OpenSSH private key is a few KiB (RSA 16384 bits: about 12 KiB).
MAX_KEY_FILE = 64 << 10


def load_identities(settings: TransportSettings) -> list[paramiko.PKey]:
    """Private keys from ``ssh_identity``, or the usual ~/.ssh defaults that exist."""
    paths = settings.ssh_identity or tuple(
        p
        for p in (os.path.expanduser(f"~/.ssh/{n}") for n in DEFAULT_IDENTITIES)
        if os.path.exists(p)
    )
    keys = []
    for path in paths:
        path = path if os.path.isabs(path) else os.path.expanduser(f"~/.ssh/{path}")
        try:
            read_small_file(path, MAX_KEY_FILE)  # no FIFO, no /dev/zero: paramiko reads it all
            keys.append(paramiko.PKey.from_path(path))
        except paramiko.PasswordRequiredException:
            log.warning("ssh key %s is passphrase-protected; skipping it", path)
        except (OSError, paramiko.SSHException, ValueError) as e:
            log.warning("cannot load ssh key %s: %s", path, e)
    return keys


class _Replies:
    """Collects the answers to our READ and WRITE requests (paramiko hands a reply to the
    object registered with its request, whatever request the caller waits for)."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.got[num] = (t, msg)


def read_pipelined(
    sftp: paramiko.SFTPClient,
    handle: bytes,
    size: int,
    request: int = READ_REQUEST,
    start: int = 0,
) -> Iterator[bytes]:
    """Bytes ``start`` to ``size`` of an open file, in order, in READs of ``request`` bytes
    with at most READ_AHEAD requested and not yet consumed. Short replies (a server may send
    less) are completed in place; a reply longer than its request is a TransportError."""
    replies = _Replies()
    pending: deque[tuple[int, int, int]] = deque()  # (request id, offset, length)
    asked = start
    out = bytearray()

    def ask(offset: int, n: int) -> int:
        return sftp._async_request(replies, CMD_READ, handle, int64(offset), n)

    def answer(num: int, offset: int, n: int) -> bytes:
        while num not in replies.got:
            sftp._read_response()  # one packet, handed to its requester
        t, msg = replies.got.pop(num)
        if t == CMD_STATUS:
            sftp._convert_status(msg)  # raises: EOFError (the file shrank) or an I/O error
        if t != CMD_DATA:
            raise TransportError(f"unexpected SFTP reply {t} to READ")
        data = msg.get_string()
        if len(data) > n:  # would shift every later byte: a corrupt read-back, not a short one
            raise TransportError(
                f"SFTP READ at offset {offset} returned {len(data)} bytes, {n} were asked for"
            )
        return data

    while pending or asked < size:
        while asked < size and len(pending) * request < READ_AHEAD:
            n = min(request, size - asked)
            pending.append((ask(asked, n), asked, n))
            asked += n
        num, offset, n = pending.popleft()
        data = answer(num, offset, n)
        out += data
        while len(data) < n:  # a short reply: ask for the rest before going on
            offset, n = offset + len(data), n - len(data)
            data = answer(ask(offset, n), offset, n)
            if not data:
                raise TransportError(f"SFTP READ at {offset} returned nothing before the end")
            out += data
        if len(out) >= READ_CHUNK or not pending:
            yield bytes(out)
            out.clear()


class SftpSink(Sink):
    """A remote file written with pipelined WRITE requests at explicit offsets."""

    seekable = True

    def __init__(self, transport: SftpTransport, directory: str, name: str) -> None:
        super().__init__(name, transport.settings.checksum)
        self._t = transport
        self._final = posixpath.join(directory, name)
        self._tmp = posixpath.join(directory, temp_name(name))
        self._inflight: deque[tuple[int, int]] = deque()  # (request id, bytes)
        self._inflight_bytes = 0
        self._replay = ReplayBuffer(transport.settings.replay_bytes)
        # Unacknowledged data must stay replayable: half the ring at most.
        self._max_inflight = min(MAX_INFLIGHT, transport.settings.replay_bytes // 2)
        self._positional = False  # true once the engine seeked: replay by offset
        self._handle = b""
        self._file: paramiko.SFTPFile | None = None
        # WRITE replies land here whoever reads them: the transport's channel serves the
        # engine's listings and free-space checks while our writes are in flight.
        self._replies = _Replies()
        self._t.call(lambda: self._open(create=True), f"creating {self._tmp}")

    def _close_file(self) -> None:
        """Close the remote handle (best effort: abort, or a connection already lost)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception as e:
                log.debug("closing %s: %s", self._tmp, e)

    # -- low level, on the current connection ----------------------------------------
    def _open(self, create: bool) -> None:
        """Open the temp file on the transport's SFTP channel (one session per connection,
        as OpenSSH's sftp uses: opening a session costs the server a login shell)."""
        self._sftp = sftp = self._t.sftp
        f = sftp.open(self._tmp, "wbx" if create else "r+b")
        if create:
            self._t.set_mode(self._tmp, FILE_MODE, f)
        self._file = f
        self._handle = f.handle
        self._inflight.clear()
        self._inflight_bytes = 0
        self._replies.got.clear()

    def _post_write(self, offset: int, piece: memoryview) -> int:
        """Send one WRITE request; returns its id. Like paramiko's ``_async_request`` but
        with one copy of the data instead of about six (message, framing, and a copy of
        the rest after every partial channel send)."""
        sftp = self._sftp
        with sftp._lock:  # request ids are shared with the client's other requests
            num = sftp.request_number
            sftp._expecting[num] = self._replies
            sftp.request_number += 1
        handle = self._handle
        length = SFTP_WRITE_HEAD.size - 4 + len(handle) + SFTP_WRITE_TAIL.size + len(piece)
        packet = memoryview(
            SFTP_WRITE_HEAD.pack(length, CMD_WRITE, num, len(handle))
            + handle
            + SFTP_WRITE_TAIL.pack(offset, len(piece))
            + piece
        )
        chan = sftp.sock
        while packet:
            sent = chan.send(packet)
            if sent <= 0:
                raise EOFError("SFTP channel closed")
            packet = packet[sent:]
        return num

    def _send(self, offset: int, view: memoryview) -> None:
        sftp, step = self._sftp, self._t.write_size
        for i in range(0, len(view), step):
            piece = view[i : i + step]
            num = self._post_write(offset + i, piece)
            self._inflight.append((num, len(piece)))
            self._inflight_bytes += len(piece)
            while self._inflight_bytes > self._max_inflight or (
                self._inflight and sftp.sock.recv_ready()
            ):
                self._ack_one()

    def _ack_one(self) -> None:
        num, n = self._inflight.popleft()
        self._inflight_bytes -= n
        sftp, got = self._sftp, self._replies.got
        while num not in got:
            sftp._read_response()  # one packet, handed to whoever asked for it
        t, msg = got.pop(num)
        if t != CMD_STATUS:
            raise TransportError(f"{self._tmp}: unexpected SFTP reply {t} to WRITE")
        sftp._convert_status(msg)  # raises IOError on an error status

    def _drain(self, keep: int = 0) -> None:
        """Wait for replies until at most ``keep`` bytes are unacknowledged."""
        while self._inflight and self._inflight_bytes > keep:
            self._ack_one()

    def _resume(self) -> None:
        """After a reconnect: reopen the temp file and replay what the server lacks."""
        self._open(create=False)
        if self._positional:
            for off, data in self._replay.all():
                self._send(off, memoryview(data))
        else:
            confirmed = self._file.stat().st_size
            log.info("%s: resuming at byte %d of %d", self._tmp, confirmed, self._replay.end)
            for off, view in self._replay.since(confirmed):
                self._send(off, view)
        self._drain()

    def _renewed(self) -> bool:
        """Whether the transport is connected again on a new connection since our file was
        opened (an operation of its own, a listing or a free-space check, found the old one
        broken): our handle belonged to the old connection."""
        return self._t._sftp is not None and self._sftp is not self._t._sftp

    def _guarded(self, op, what: str) -> None:
        try:
            op()
        except Exception as e:
            err = self._t.convert(e, what)
            if self._renewed():
                # The transport is connected again already: reopen and replay on it.
                log.info("%s: the connection was renewed under it; resuming", self._tmp)
                self._t.call(self._resume, f"resuming {self._tmp}", bounded=False)
                return
            if not is_connection_lost(err):
                raise self._space_check(err) from e
            self._t.call(self._resume, f"resuming {self._tmp}", first_error=err, bounded=False)

    def _space_check(self, err: Exception) -> Exception:
        """SFTP v3 reports ENOSPC as a generic failure: ask statvfs whether we are full."""
        if isinstance(err, TransportError) and not isinstance(err, TargetFull):
            try:
                free = self._t.free_space()
            except TransportError:
                free = None
            if free is not None and free < MAX_INFLIGHT + self._t.write_size:
                return TargetFull(f"{self._tmp}: target is full ({free} bytes left): {err}")
        return err

    # -- the contract ----------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._accounting(view):
            for start in range(0, len(view), REPLAY_STEP):
                self._store(self._pos + start, view[start : start + REPLAY_STEP])

    def _store(self, offset: int, piece: memoryview) -> None:
        if self._positional and self._replay.held + len(piece) > self._replay.limit:
            # After a seek a resume replays every range held, in write order, so the ring
            # may drop its oldest ranges only once the server acknowledged them (replies
            # come in request order). It drops whole ranges (up to REPLAY_STEP) until the
            # new one fits: what stays holds at least limit - piece - REPLAY_STEP bytes,
            # so at most that much may be unacknowledged. (Waiting for every reply here,
            # and at every seek, stalled the pipeline: 21 ms a seek on loopback.)
            keep = self._replay.limit - len(piece) - REPLAY_STEP
            self._guarded(lambda: self._drain(keep), f"writing {self._tmp}")
        self._replay.add(offset, piece)
        self._guarded(lambda: self._send(offset, piece), f"writing {self._tmp}")

    def _sync(self) -> None:
        self._guarded(self._drain, f"writing {self._tmp}")
        self._replay.clear()

    def seek(self, offset: int) -> None:
        if not self._positional:
            # From here on a resume replays by offset everything the ring holds: start
            # from a point where the server has all the append-only stream so far.
            self._sync()
            self._positional = True
        self._pos = offset

    def _read_back(self) -> Iterator[bytes]:
        seen: list = []
        return self._t.resumable(
            lambda at: self._t.read_path(self._tmp, offset=at, seen=seen), f"reading {self._tmp}"
        )

    def commit(self) -> FileInfo:
        self._sync()
        self._replay.release()  # confirmed: the read-back below needs the memory
        what = f"closing {self._tmp}"
        try:
            f, self._file = self._file, None
            # Every WRITE is acknowledged: the CLOSE reply owes nothing to the data, and a
            # server that trickles it is dropped like any operation past its deadline.
            with deadline(self._t.op_deadline, what, self._t._drop_connection):
                f.close()
                size = self._sftp.stat(self._tmp).st_size
        except Exception as e:
            err = self._t.convert(e, what)
            renewed = self._renewed()
            if not (renewed or is_connection_lost(err)):
                raise err from e
            # Every WRITE was acknowledged (the sync above): the server has the whole file,
            # and its sftp-server closed our handle when the connection went. A connection
            # the transport renewed already is used as it is.
            first = None if renewed else err
            size = self._t.call(lambda: self._t.sftp.stat(self._tmp).st_size, what, first)
        if size != self.size:
            raise TransportError(f"{self._tmp}: wrote {self.size} bytes but the server has {size}")
        digest = self._digest()
        self._t.call(self._publish, f"renaming {self._tmp} to {self._final}")
        self.committed = True
        return FileInfo(self.name, size, digest, self.algorithm)

    def _publish(self) -> None:
        try:
            self._t.rename_over(self._tmp, self._final)
        except OSError:
            # A retry after a lost reply: the rename may already have happened.
            if self._t.size_of(self._final) != self.size or self._t.size_of(self._tmp) >= 0:
                raise

    def abort(self) -> None:
        self._stop_hashing()
        self._close_file()
        try:
            self._t.sftp.remove(self._tmp)
        except Exception as e:
            log.debug("removing %s: %s", self._tmp, e)


class SftpTransport(RetryingTransport):
    """Dumps to a directory on an SSH server through its SFTP subsystem."""

    scheme = "sftp"
    can_seek = True

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self.port = target.port or DEFAULT_PORT
        self.user = target.user or DEFAULT_USER
        self._ssh: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.write_size = MIN_WRITE
        self.read_size = READ_REQUEST
        self._statvfs = True
        self._posix_rename = True

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            raise ConnectionLost(f"{self.describe()}: not connected")
        return self._sftp

    # -- connection --------------------------------------------------------------------
    def _ensure_root(self) -> None:
        self._makedirs(self.root)

    def _drop_connection(self) -> None:
        shut_down(self._ssh.sock if self._ssh is not None else None)

    def _open(self) -> None:
        self.close()
        expected = expected_keys(self.target, self.settings)
        where = f"{self.user}@{known_hosts_name(self.target.host, self.port)}"
        timeout = self.settings.timeout
        try:
            sock = socket.create_connection((self.target.host, self.port), timeout=timeout)
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {where}: {e.strerror or e}") from e
        # Nagle's algorithm would hold each small READ request of a pipelined read (and the
        # tail of each WRITE) until the server acknowledges what went before, and a server
        # that delays its ACKs answers 40 ms later: a read-back of 32 MiB on loopback took
        # 0.13-0.43 s with it, 0.03-0.08 s without (paramiko leaves it on; sshd turns it off
        # on its side only for interactive sessions).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = quickack_socket(sock)
        ssh = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET
        )
        self._ssh = ssh
        opts = ssh.get_security_options()
        opts.ciphers = [c for c in FAST_CIPHERS if c in opts.ciphers] + [
            c for c in opts.ciphers if c not in FAST_CIPHERS
        ]
        if expected is not None:
            algos = [a for t in expected for a in _KEY_ALGOS.get(t, (t,))]
            usable = [a for a in algos if a in opts.key_types]
            if not usable:
                raise AuthError(f"{where}: unsupported host key type(s) {', '.join(expected)}")
            opts.key_types = usable
        ssh.banner_timeout = ssh.handshake_timeout = ssh.auth_timeout = timeout
        try:
            ssh.start_client(timeout=timeout)
            self._check_host_key(ssh.get_remote_server_key(), expected, where)
            self._authenticate(ssh, where)
            self._sftp = self.channel()
            self.read_size, self.write_size = self._limits()
        except Exception as e:
            self.close()
            if isinstance(e, IncompatiblePeer) and expected is not None and "host key" in str(e):
                # The server has no key of a type known for it (reinstalled with other
                # keys, or only RSA where an ed25519 key was recorded): an unknown key.
                raise AuthError(
                    f"{where}: host key unknown: the server offers no key of the type(s) "
                    f"configured for it ({', '.join(expected)}); refused"
                ) from e
            raise self.convert(e, f"connecting to {where}") from e
        log.debug("%s: connected, cipher %s", where, ssh.remote_cipher)

    def _check_host_key(self, key: paramiko.PKey, expected: dict | None, where: str) -> None:
        if expected is None:
            log.warning(
                "%s: accepting any host key (host key '*'); got %s %s",
                where,
                key.get_name(),
                fingerprint(key),
            )
            return
        if expected.get(key.get_name()) != key.get_base64():
            raise AuthError(
                f"{where}: host key mismatch or unknown: server offered {key.get_name()} "
                f"{fingerprint(key)}, which is not the configured key"
            )

    def _authenticate(self, ssh: paramiko.Transport, where: str) -> None:
        tried = []
        for key in load_identities(self.settings):
            tried.append(f"{key.get_name()} key {fingerprint(key)}")
            try:
                ssh.auth_publickey(self.user, key)
            except paramiko.AuthenticationException:
                continue
            if ssh.is_authenticated():
                return
        if self.target.password is not None:
            tried.append("password")
            try:
                ssh.auth_password(self.user, self.target.password)
            except paramiko.AuthenticationException:
                pass
            if ssh.is_authenticated():
                return
        raise AuthError(
            f"{where}: authentication failed (tried: {', '.join(tried) or 'no keys, no password'})"
        )

    def channel(self) -> paramiko.SFTPClient:
        """A new SFTP session on the current SSH connection (the transport opens one).

        Every wait is bounded by the timeout: opening the channel by paramiko's own
        timeout, requests by the channel's; starting the subsystem waits with none, so the
        connection is closed if the server does not answer in time (the wait then fails).
        """
        ssh = self._ssh
        if ssh is None or not ssh.is_active():
            raise ConnectionLost(f"{self.describe()}: not connected")
        timeout = self.settings.timeout
        chan = ssh.open_session(
            window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET, timeout=timeout
        )
        chan.settimeout(timeout)
        timer = threading.Timer(timeout, ssh.close)
        timer.daemon = True
        timer.start()
        try:
            chan.invoke_subsystem("sftp")
        finally:
            timer.cancel()
        try:
            return paramiko.SFTPClient(chan)
        except (paramiko.SFTPError, paramiko.SSHException) as e:
            if not ssh.is_active():
                raise  # the connection went: a drop, retried as any
            raise self._no_sftp(chan, e) from e

    def _no_sftp(self, chan: paramiko.Channel, e: Exception) -> TransportError:
        """The session ended or sent text where the SFTP version belongs, the connection
        still up: sshd ran the subsystem through the account's login shell (an external
        ``Subsystem sftp /usr/lib/openssh/sftp-server``), and the shell refused it (nologin,
        /bin/false, a restricted shell) or printed a message first (start-up files). The
        same on every attempt: a TransportError, not a lost connection. OpenSSH's sftp says
        "Received message too long" here."""
        got = bytearray()
        end = time.monotonic() + 1.0  # the rest of a shell's message follows at once
        while len(got) < 200 and time.monotonic() < end:
            if chan.recv_ready():
                got += chan.recv(200)
            elif chan.recv_stderr_ready():
                got += chan.recv_stderr(200)
            elif chan.exit_status_ready() or chan.closed:
                break
            else:
                time.sleep(0.02)
        text = " ".join(got.decode("utf-8", "replace").split())[:200]
        status = chan.recv_exit_status() if chan.exit_status_ready() else None
        if isinstance(e, paramiko.SFTPError):  # text: its first bytes went to the length
            said = f"it sent text instead of SFTP: '...{text}'"
        else:
            said = "the session ended before SFTP started"
            said += f" (exit status {status})" if status is not None else ""
            said += f": '{text}'" if text else ""
        return TransportError(
            f"{self.user}@{known_hosts_name(self.target.host, self.port)}: the server did not "
            f"start SFTP for {self.user}: {said}. sshd runs an external sftp-server through "
            "the account's login shell, which must run it (not nologin, false or a restricted "
            "shell) and print nothing for non-interactive logins: use 'Subsystem sftp "
            "internal-sftp' or 'ForceCommand internal-sftp' for this account, or quiet its "
            "shell"
        )

    def _limits(self) -> tuple[int, int]:
        """The largest READ and WRITE the server takes (limits@openssh.com), else 32 KiB;
        kept within what our read-ahead and write path are sized for."""
        try:
            t, msg = self.sftp._request(CMD_EXTENDED, "limits@openssh.com")
        except OSError:
            return READ_REQUEST, MIN_WRITE
        if t != CMD_EXTENDED_REPLY:
            return READ_REQUEST, MIN_WRITE
        msg.get_int64()  # max packet length
        max_read = msg.get_int64()
        max_write = msg.get_int64()
        read = max(READ_REQUEST, min(max_read, MAX_READ)) if max_read else READ_REQUEST
        write = max(MIN_WRITE, min(max_write, 1 << 20)) if max_write else MIN_WRITE
        return read, write

    def close(self) -> None:
        for thing in (self._sftp, self._ssh):
            if thing is not None:
                try:
                    thing.close()
                except Exception as e:
                    log.debug("closing ssh connection: %s", e)
        self._sftp = self._ssh = None

    def convert(self, e: BaseException, what: str) -> Exception:
        """Map a paramiko/socket exception to our error tree (the module boundary)."""
        if isinstance(e, (TransportError, FileExistsError, FileNotFoundError)) or not_the_servers(
            e
        ):
            return e
        if isinstance(e, (paramiko.BadHostKeyException, paramiko.AuthenticationException)):
            return AuthError(f"{what}: {e}")
        if isinstance(e, IncompatiblePeer):
            # No algorithm in common: the same on every attempt, not a lost connection.
            return TransportError(f"{what}: {e}")
        lost = self._ssh is None or not self._ssh.is_active()
        if (
            lost
            or isinstance(e, (EOFError, socket.timeout, paramiko.SSHException))
            or is_connection_lost(e)
        ):
            return ConnectionLost(f"{what}: connection lost ({e or type(e).__name__})")
        if isinstance(e, OSError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return TargetFull(f"{what}: target is full")
            if e.errno == errno.ENOENT:
                return FileNotFoundError(e.errno, f"{what}: no such file")
            if e.errno is None and self._read_only():
                return TransportError(f"{what}: the target's filesystem is read-only ({e})")
            return TransportError(f"{what}: {e.strerror or e}")
        return TransportError(f"{what}: {type(e).__name__}: {e}")

    def _read_only(self) -> bool:
        """SFTP v3 answers EROFS with a bare "Failure": statvfs@openssh.com tells."""
        if not self._statvfs or self._sftp is None:
            return False
        try:
            t, msg = self._sftp._request(CMD_EXTENDED, "statvfs@openssh.com", self.root)
            flags = struct.unpack(">11Q", msg.get_remainder()[: 11 * 8])[9]
        except Exception as e:  # only an explanation: never a new failure
            log.debug("statvfs for an explanation: %s", e)
            return False
        return t == CMD_EXTENDED_REPLY and bool(flags & SSH_FXE_STATVFS_ST_RDONLY)

    # -- directory operations --------------------------------------------------------
    def size_of(self, path: str) -> int:
        try:
            return self.sftp.stat(path).st_size or 0
        except FileNotFoundError:
            return -1
        except OSError as e:
            if e.errno == errno.ENOENT:
                return -1
            raise

    def rename_over(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``, replacing ``dst``: posix-rename@openssh.com; on a server
        without it (not OpenSSH's: "unsupported", or OpenSSH's denying it: ``internal-sftp -P
        posix-rename`` or an allow-list ``-p`` without it, "Permission denied") SFTP v3's
        RENAME, which never replaces: ``dst`` is removed first. Only README.txt replaces a
        file (its placeholder), so only it can be missing for a moment."""
        if self._posix_rename:
            try:
                self.sftp.posix_rename(src, dst)
                return
            except OSError as e:
                # A status reply without errno, or EACCES; anything else is the rename's own.
                if e.errno not in (None, errno.EACCES) or self.size_of(src) < 0:
                    raise
                refused = e
            if self.size_of(dst) >= 0:
                self.sftp.remove(dst)
            self.sftp.rename(src, dst)
            self._posix_rename = False
            log.info(
                "%s: the server refuses posix-rename@openssh.com (%s); renaming with SFTP "
                "RENAME instead (a file it replaces is removed first)",
                self.describe(),
                refused.strerror or refused,
            )
            return
        if self.size_of(dst) >= 0:
            self.sftp.remove(dst)
        self.sftp.rename(src, dst)

    def _makedirs(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        cur = "/" if path.startswith("/") else ""
        for p in parts:
            cur = posixpath.join(cur, p)
            try:
                if stat.S_ISDIR(self.sftp.stat(cur).st_mode or 0):
                    continue
                raise TransportError(f"{cur} exists and is not a directory")
            except FileNotFoundError:
                self.sftp.mkdir(cur, DIR_MODE)
                self.set_mode(cur, DIR_MODE)

    def makedir(self, relpath: str) -> None:
        path = self._p(relpath)

        def mk() -> None:
            if self.size_of(path) >= 0:
                raise FileExistsError(errno.EEXIST, f"{path} exists")
            self.sftp.mkdir(path, DIR_MODE)
            self.set_mode(path, DIR_MODE)

        self.call(mk, f"creating {path}")

    def set_mode(self, path: str, mode: int, f: paramiko.SFTPFile | None = None) -> None:
        """chmod ``path`` (through its open handle ``f`` if given). A server that refuses
        (OpenSSH's ``internal-sftp -P setstat,fsetstat``) costs nothing when its umask gave
        the mode already (``-u 077``); otherwise it is warned about once per dump and noted
        in its README: the modes are the server's umask's, as with FTP without SITE CHMOD."""
        try:
            if f is not None:
                f.chmod(mode)
            else:
                self.sftp.chmod(path, mode)
            return
        except PermissionError as e:
            refused = e
        st = f.stat() if f is not None else self.sftp.stat(path)
        got = stat.S_IMODE(st.st_mode or 0)
        if got & ~mode & 0o777:
            what = "files" if f is not None else "directories"
            self.note_once(
                f"the SFTP server refused to set modes ({refused.strerror or refused}): the "
                f"dump's {what} have the mode its umask gives them ({got:04o}) and may be "
                "readable by other users of the server"
            )

    def create(self, relpath: str) -> Sink:
        path = self._p(relpath)
        return SftpSink(self, posixpath.dirname(path), posixpath.basename(path))

    def _lstat_below_root(self, relpath: str) -> paramiko.SFTPAttributes | None:
        """lstat each step of ``relpath`` below the root (READDIR and OPEN would follow a
        link); ``UnsafeFile`` on a link or a non-directory on the way. Returns the attributes
        of the last step, None for the root."""
        parts = [p for p in relpath.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UnsafeFile(f"{relpath!r}: '.' and '..' are not allowed in a target path")
        attrs = None
        for i in range(len(parts)):
            path = posixpath.join(self.root, *parts[: i + 1])
            attrs = self.sftp.lstat(path)
            if i < len(parts) - 1 and not stat.S_ISDIR(attrs.st_mode or 0):
                raise UnsafeFile(f"{path}: {mode_kind(attrs.st_mode or 0)}, not a directory")
        return attrs

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)

        def ls() -> list[Entry]:
            try:
                attrs = self._lstat_below_root(relpath)
                if attrs is not None and not stat.S_ISDIR(attrs.st_mode or 0):
                    raise UnsafeFile(f"{path}: {mode_kind(attrs.st_mode or 0)}, not a directory")
                # OpenSSH's READDIR reports lstat() attributes: a link is S_IFLNK.
                listing = self.sftp.listdir_attr(path)
            except FileNotFoundError:
                return []
            out = []
            for a in listing:
                if is_temp_name(a.filename):
                    continue
                mode = a.st_mode or 0
                link = stat.S_ISLNK(mode)
                out.append(Entry(a.filename, stat.S_ISDIR(mode), a.st_size or 0, link))
            return sorted(out, key=lambda e: e.name)

        return self.call(ls, f"listing {path}")

    def read_path(
        self, path: str, limit: int | None = None, offset: int = 0, seen: list | None = None
    ) -> Iterator[bytes]:
        """Stream a file from ``offset``; its own temporary files, and names ``read``
        checked, only. ``seen``: the (size, mtime) of an earlier open of the same read,
        which this one must find again (none yet: it is recorded there)."""
        try:
            with self.sftp.open(path, "rb") as f:
                st = f.stat()  # FSTAT: what was opened, whatever the name pointed to
                require_regular(st.st_mode or 0, path)
                check_size(st.st_size or 0, limit, path)
                size = st.st_size or 0
                if seen is not None:
                    same_file(seen, (size, st.st_mtime), path)
                chunks = read_pipelined(self.sftp, f.handle, size, self.read_size, offset)
                yield from bounded(chunks, limit, path)
        except Exception as e:
            raise self.convert(e, f"reading {path}") from e

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        path = self._p(relpath)

        def check() -> None:
            attrs = self._lstat_below_root(relpath)
            if attrs is None:
                raise UnsafeFile(f"{path}: the target root is not a file")
            # Checked before OPEN: the server's open() of a FIFO would block.
            require_regular(attrs.st_mode or 0, path)
            check_size(attrs.st_size or 0, limit, path)

        self.call(check, f"reading {path}")
        seen: list = []
        return self.resumable(
            lambda at: self.read_path(path, limit, at, seen),
            f"reading {path}",
            within=self.read_deadline(limit),
        )

    def remove_tree(self, relpath: str) -> None:
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        path = self._p(relpath)

        def rm() -> None:
            try:
                attrs = self._lstat_below_root(relpath)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(attrs.st_mode or 0):
                self._rmtree(path)
            else:
                self.sftp.remove(path)  # a link goes, not what it points to

        self.call(rm, f"removing {path}")

    def _rmtree(self, path: str) -> None:
        try:
            attrs = self.sftp.listdir_attr(path)
        except FileNotFoundError:
            return
        for a in sorted(attrs, key=lambda a: removal_order(a.filename)):
            child = posixpath.join(path, a.filename)
            if stat.S_ISDIR(a.st_mode or 0):
                self._rmtree(child)
            else:
                self.sftp.remove(child)
        self.sftp.rmdir(path)

    def remove_file(self, relpath: str) -> None:
        path = self._p(relpath)

        def rm() -> None:
            try:
                self.sftp.remove(path)
            except FileNotFoundError:
                pass

        self.call(rm, f"removing {path}")

    def free_space(self, relpath: str = "") -> int | None:
        """Free bytes via statvfs@openssh.com; None if the server lacks the extension."""
        if not self._statvfs:
            return None
        path = self._p(relpath)

        def ask() -> tuple[int, paramiko.Message] | None:
            try:
                return self.sftp._request(CMD_EXTENDED, "statvfs@openssh.com", path)
            except OSError as e:
                # An SFTP status reply (no errno) means the server lacks the extension; a
                # timeout (no errno either) means it did not answer.
                # EACCES: OpenSSH's sftp-server denying it (``-P statvfs``, or an allow-list
                # ``-p`` without it, as drop-box accounts are locked down).
                refused = e.errno is None or e.errno == errno.EACCES
                if refused and not isinstance(e, TimeoutError) and not self._ssh_lost():
                    self._statvfs = False
                    log.info(
                        "%s: server cannot report free space (statvfs@openssh.com: %s); "
                        "not checking it",
                        self.describe(),
                        e.strerror or e,
                    )
                    return None
                err = self.convert(e, f"statvfs {path}")
                if isinstance(err, FileNotFoundError):  # removed on the server meanwhile
                    err = TransportError(f"statvfs {path}: no such file or directory")
                raise err from e

        # A check mid-save may be the first request after the connection broke: it
        # reconnects, and the open file resumes on the new connection when it next writes.
        # Not bounded as a whole: its reply comes behind the open file's WRITEs (up to 8 MiB
        # in flight on this channel), which a slow link takes longer than the deadline.
        reply = self.call(ask, f"statvfs {path}", bounded=False)
        if reply is None:
            return None
        t, msg = reply
        if t != CMD_EXTENDED_REPLY:
            return None
        fields = struct.unpack(">11Q", msg.get_remainder()[: 11 * 8])
        frsize, bavail = fields[1], fields[4]
        return frsize * bavail

    def _ssh_lost(self) -> bool:
        return self._ssh is None or not self._ssh.is_active()
