"""NFS transport (nfs:// targets): the kernel's NFS client via mount(2), then local files.

The capture kernel has no mount.nfs helper (busybox cannot do NFSv4), so we call
mount(2) directly with the options mount.nfs would compute (server address and our
client address). Everything after the mount is the file transport, rooted at the mount
point. If the target directory does not exist yet on the server, its parent is mounted
and the directory created below it (as SUSE's kdump did).

The version is negotiated as mount.nfs does when none is given (SUSE's and Debian's kdump
mount that way): NFSv4.1, then 4.0, then NFSv3 (``nolock``: the capture kernel runs no
lock or status daemon). Many servers speak less than 4.1: a NAS with only NFSv3 enabled
(NetApp ONTAP's default, for one) or an older NFSv4.0 server.

A server that stops answering must not hang the capture kernel: the mount is soft, with
``timeo``/``retrans`` chosen so that a call fails after about the configured timeout
(KDUMP_NET_TIMEOUT) without an answer, and mount(2) itself runs in a child process that is
killed when it takes longer than that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import posixpath
import select
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kdump_capture.errors import AuthError, ConnectionLost, TransportError
from kdump_capture.urls import Target

from .base import Entry, Sink, Transport, TransportSettings
from .file import FileTransport

log = logging.getLogger(__name__)

NFS_PORT = 2049
MNT_DETACH = 2
# The versions tried, in order. NFSv4.1 first: no rpcbind, no lockd, one TCP connection.
# NFSv3 asks the server's rpcbind (port 111) where its mountd and (without a port in the
# URL) its NFS service are.
NFS_VERSIONS = ("4.1", "4.0", "3")
# Answers meaning "not this version": the next one is tried (mount.nfs does the same).
# EPROTONOSUPPORT is the server's RPC version mismatch (or NFS4ERR_MINOR_VERS_MISMATCH),
# EINVAL a minor version this kernel's client lacks.
NEXT_MINOR = frozenset({errno.EPROTONOSUPPORT, errno.EINVAL})
# Answers to NFSv4 after which NFSv3 is still worth a try, as mount.nfs falls back: a server
# without NFSv4 (no pseudo root: ENOENT; old Linux servers: EPERM; nothing on port 2049:
# ECONNREFUSED, where NFSv3 may live on a port rpcbind names).
V3_AFTER_V4 = NEXT_MINOR | {errno.ENOENT, errno.EPERM, errno.ECONNREFUSED}
# Retransmissions of a call before a soft mount gives up. Over TCP the client waits timeo,
# then 2*timeo, then 3*timeo (linear backoff, nfs(5)): 6*timeo in all with 2 retransmissions.
NFS_RETRANS = 2
# After SIGKILL, how long to wait for a mount(2) child to go (NFS waits are killable).
KILL_GRACE = 5.0


@dataclass(frozen=True)
class MountRequest:
    """The arguments of one mount(2) call, and the directory below it to use."""

    source: str
    fstype: str
    data: str
    export: str
    subdir: str


# The addresses of a server name tried in turn, at most (a name may have one per network).
MAX_ADDRESSES = 8
# Answers after which the server's next address is tried (nothing there answered at once);
# a server that does not answer in time has used the time for all of them.
NEXT_ADDRESS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def resolve(host: str, port: int) -> list[str]:
    """The server's IP addresses, in the resolver's order (the kernel's NFS client cannot
    resolve names)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TransportError(f"cannot resolve NFS server {host!r}: {e.strerror}") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))[:MAX_ADDRESSES]


def client_address(server_ip: str, port: int) -> str:
    """Our address on the route to the server: connect a UDP socket (sends nothing)."""
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((server_ip, port))
        except OSError as e:
            raise ConnectionLost(f"no route to NFS server {server_ip}: {e.strerror}") from e
        return s.getsockname()[0]


def soft_options(timeout: float) -> list[str]:
    """Mount options that make a call fail after about ``timeout`` s without an answer.

    A hard mount (the default) retries forever: the capture kernel would hang for good.
    ``timeo`` is in tenths of a second; the waits add up to (1 + 2 + 3) * timeo.
    """
    steps = sum(range(1, NFS_RETRANS + 2))
    timeo = max(10, int(timeout * 10) // steps)  # at least 1 s per wait
    return ["soft", f"timeo={timeo}", f"retrans={NFS_RETRANS}"]


def mount_requests(
    server_ip: str,
    client_ip: str,
    path: str,
    port: int | None = None,
    timeout: float = 30.0,
    version: str = NFS_VERSIONS[0],
) -> list[MountRequest]:
    """The mounts to try for ``path`` with one NFS version, in order: the path itself,
    then its parent."""
    if version == "3":
        proto = "tcp6" if ":" in server_ip else "tcp"  # the kernel checks they agree
        fstype = "nfs"
        opts = ["vers=3", f"proto={proto}", f"mountproto={proto}", "nolock", f"addr={server_ip}"]
    else:
        fstype = "nfs4"
        opts = [f"vers={version}", f"addr={server_ip}", f"clientaddr={client_ip}"]
    opts += soft_options(timeout)
    if port is not None:
        opts.append(f"port={port}")
    data = ",".join(opts)
    host = f"[{server_ip}]" if ":" in server_ip else server_ip
    out = [MountRequest(f"{host}:{path}", fstype, data, path, "")]
    if path != "/":
        parent, name = posixpath.split(path.rstrip("/"))
        out.append(MountRequest(f"{host}:{parent or '/'}", fstype, data, parent or "/", name))
    return out


def mount_error(req: MountRequest, err: int) -> TransportError:
    """A clear message for a failed mount(2)."""
    text = os.strerror(err)
    if err == errno.ENODEV:
        return TransportError(
            f"cannot mount {req.source}: {req.fstype} is not supported by this kernel "
            f"(ENODEV); the nfs and nfsv{version_of(req)[0]} modules must be loaded"
        )
    if err in (errno.EACCES, errno.EPERM):
        return AuthError(f"cannot mount {req.source}: the server refused access ({text})")
    if err in (errno.ETIMEDOUT, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ConnectionLost(f"cannot mount {req.source}: {text}")
    return TransportError(f"cannot mount {req.source}: {text}")


def version_of(req: MountRequest) -> str:
    """The NFS version a request mounts (its first option)."""
    return req.data.split(",", 1)[0].removeprefix("vers=")


def server_of(req: MountRequest) -> str:
    """The server address a request mounts from (its source before ``:/path``)."""
    return req.source.split(":/", 1)[0]


def negotiation_error(failed: list[tuple[MountRequest, int]]) -> TransportError:
    """The error of a negotiation in which every version failed (one request per version,
    the last tried). The first answer that is not "not this version" decides its kind (a
    server without NFSv4 that refuses us NFSv3 is a refusal); every version's answer is
    named."""
    req, code = next(((r, c) for r, c in failed if c not in NEXT_MINOR), failed[-1])
    err = mount_error(req, code)
    if len(failed) == 1:
        return err
    several = len({server_of(r) for r, _ in failed}) > 1  # addresses
    tried = "; ".join(
        f"NFSv{version_of(r)}{' at ' + server_of(r) if several else ''}: {os.strerror(c)}"
        for r, c in failed
    )
    return type(err)(f"{err} (versions tried: {tried})")


class _Libc:
    """mount(2)/umount2(2) through ctypes; errno is returned, not raised."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def mount(self, req: MountRequest, target: str) -> int:
        rc = self._libc.mount(
            req.source.encode(), target.encode(), req.fstype.encode(), 0, req.data.encode()
        )
        return ctypes.get_errno() if rc != 0 else 0

    def umount(self, target: str, flags: int = 0) -> int:
        rc = self._libc.umount2(target.encode(), flags)
        return ctypes.get_errno() if rc != 0 else 0

    def mount_within(self, req: MountRequest, target: str, timeout: float) -> int:
        """mount(2) in a child process, killed after ``timeout`` s (errno ETIMEDOUT).

        The kernel's NFS client may wait long for a server that accepts connections but
        never answers; a child can be killed, a thread in mount(2) cannot.
        """
        pid = os.fork()
        if pid == 0:  # the child: one system call, then out without any Python clean-up
            code = errno.EIO
            try:
                code = self.mount(req, target)
            finally:
                os._exit(min(code, 255))
        pidfd = os.pidfd_open(pid)
        try:
            if select.select([pidfd], [], [], timeout)[0]:
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                return code if code >= 0 else errno.EIO  # the child died of a signal
            log.warning("mount %s: no answer within %.0f s; giving up", req.source, timeout)
            os.kill(pid, signal.SIGKILL)
            if select.select([pidfd], [], [], KILL_GRACE)[0]:
                os.waitpid(pid, 0)
            else:
                log.warning("mount %s: the mount process %d does not end", req.source, pid)
        finally:
            os.close(pidfd)
        if os.path.ismount(target):  # it finished after all while being killed
            self.umount(target, MNT_DETACH)
        return errno.ETIMEDOUT


def _why_not_writable(directory: str) -> str:
    """Why the export's ``directory`` takes no writes, found by trying one (a directory
    that is removed at once); "" when it does take one after all."""
    probe = os.path.join(directory, f".kdump-capture-probe-{os.getpid()}")
    try:
        os.mkdir(probe, 0o700)
    except OSError as e:
        if e.errno == errno.EROFS:
            return " (the export is read-only)"
        if e.errno in (errno.EACCES, errno.EPERM):
            return (
                " (the capture kernel writes as root: an export with root_squash, most"
                " servers' default, maps it to the anonymous user; export with no_root_squash"
                " for this host, or let the anonymous user write the directory)"
            )
        return f" ({e.strerror})"
    os.rmdir(probe)
    return ""


class NfsTransport(Transport):
    """Mounts the export on a private directory and writes there like ``file``."""

    scheme = "nfs"
    can_seek = True

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self._mountpoint = ""
        self._fs: FileTransport | None = None
        self._libc = _Libc()

    @property
    def fs(self) -> FileTransport:
        if self._fs is None:
            raise TransportError(f"{self.describe()}: not mounted")
        return self._fs

    def connect(self) -> None:
        port = self.target.port
        addresses = resolve(self.target.host, port or NFS_PORT)
        base = "/run" if os.access("/run", os.W_OK) else None
        self._mountpoint = tempfile.mkdtemp(prefix="kdump-nfs-", dir=base)
        deadline = time.monotonic() + self.settings.timeout
        failed: list[tuple[MountRequest, int]] = []
        for n, server_ip in enumerate(addresses, 1):
            try:
                client_ip = client_address(server_ip, port or NFS_PORT)
            except ConnectionLost:
                if n < len(addresses):
                    continue
                self.close()
                raise
            failed += self._negotiate(server_ip, client_ip, deadline)
            if self._fs is not None:
                return
            code = failed[-1][1]
            if code not in NEXT_ADDRESS or n == len(addresses) or time.monotonic() >= deadline:
                break
            log.warning(
                "NFS server %s at %s: %s; trying its next address",
                self.target.host,
                server_ip,
                os.strerror(code),
            )
        self.close()
        raise negotiation_error(failed)

    def _negotiate(
        self, server_ip: str, client_ip: str, deadline: float
    ) -> list[tuple[MountRequest, int]]:
        """Mount from one address of the server, each version in turn (NFS_VERSIONS); on
        success self._fs is set. Returns the failed requests (the last of each version)."""
        port, timeout = self.target.port, self.settings.timeout
        failed: list[tuple[MountRequest, int]] = []
        for version in NFS_VERSIONS:
            if failed:
                code = failed[-1][1]
                if code not in V3_AFTER_V4:
                    break
                if version != "3" and code not in NEXT_MINOR:
                    continue  # no NFSv4 here at all: straight to NFSv3, as mount.nfs goes
                log.info(
                    "NFS server %s: NFSv%s: %s; trying NFSv%s",
                    self.target.host,
                    version_of(failed[-1][0]),
                    os.strerror(code),
                    version,
                )
            reqs = mount_requests(server_ip, client_ip, self.target.path, port, timeout, version)
            for req in reqs:
                left = max(deadline - time.monotonic(), 1.0)
                code = self._libc.mount_within(req, self._mountpoint, left)
                if code == 0:
                    log.info("mounted %s on %s (%s)", req.source, self._mountpoint, req.data)
                    self._use_mount(req)
                    return []
                if code != errno.ENOENT or req is reqs[-1]:
                    failed.append((req, code))
                    break
        return failed

    def _use_mount(self, req: MountRequest) -> None:
        """The file transport on the mounted export. A directory root may not write (an
        export with root_squash, the default of most servers, makes the capture kernel's
        root the anonymous user): unmounted, and said in terms of the export."""
        root = os.path.join(self._mountpoint, req.subdir)
        fs = FileTransport(self.target, self.settings, root=root)
        try:
            fs.connect()
        except TransportError as e:
            where = req.source.rstrip("/") + ("/" + req.subdir if req.subdir else "")
            text = str(e)
            for local, remote in ((root, where), (root.rstrip("/"), where)):
                text = text.replace(local, remote)
            text = text.replace(self._mountpoint, req.source)
            text += _why_not_writable(root if os.path.isdir(root) else self._mountpoint)
            self.close()
            raise type(e)(text) from None
        self._fs = fs

    def close(self) -> None:
        self._fs = None
        if not self._mountpoint:
            return
        if os.path.ismount(self._mountpoint):
            code = self._libc.umount(self._mountpoint)
            if code:
                log.warning("umount %s: %s; detaching", self._mountpoint, os.strerror(code))
                self._libc.umount(self._mountpoint, MNT_DETACH)
        try:
            os.rmdir(self._mountpoint)
        except OSError as e:
            log.debug("removing %s: %s", self._mountpoint, e)
        self._mountpoint = ""

    def makedir(self, relpath: str) -> None:
        self.fs.makedir(relpath)

    def create(self, relpath: str) -> Sink:
        return self.fs.create(relpath)

    def listdir(self, relpath: str = "") -> list[Entry]:
        return self.fs.listdir(relpath)

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        return self.fs.read(relpath, limit)

    def remove_tree(self, relpath: str) -> None:
        self.fs.remove_tree(relpath)

    def remove_file(self, relpath: str) -> None:
        self.fs.remove_file(relpath)

    def free_space(self, relpath: str = "") -> int | None:
        return self.fs.free_space(relpath)
