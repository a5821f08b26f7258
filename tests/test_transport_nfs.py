"""NFS transport: mount arguments as pure data, and a clear error where the kernel has no NFS.

The real mount happens in the VM tests (the host kernel here has no NFS client).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from kdump_capture.errors import AuthError, ConnectionLost, TransportError
from kdump_capture.urls import parse_target
from transports import nfs, open_transport
from transports.base import TransportSettings
from transports.nfs import (
    MountRequest,
    _Libc,
    client_address,
    mount_error,
    mount_requests,
    soft_options,
)


def test_mount_requests_path_then_parent():
    reqs = mount_requests("10.0.2.2", "10.0.2.15", "/dumps/host1")
    assert reqs == [
        MountRequest(
            "10.0.2.2:/dumps/host1",
            "nfs4",
            "vers=4.1,addr=10.0.2.2,clientaddr=10.0.2.15,soft,timeo=50,retrans=2",
            "/dumps/host1",
            "",
        ),
        MountRequest(
            "10.0.2.2:/dumps",
            "nfs4",
            "vers=4.1,addr=10.0.2.2,clientaddr=10.0.2.15,soft,timeo=50,retrans=2",
            "/dumps",
            "host1",
        ),
    ]


def test_mount_requests_port_ipv6_and_root():
    [req] = mount_requests("fd00::2", "fd00::15", "/", port=20049)
    assert req.source == "[fd00::2]:/"
    assert req.data == (
        "vers=4.1,addr=fd00::2,clientaddr=fd00::15,soft,timeo=50,retrans=2,port=20049"
    )
    reqs = mount_requests("10.0.2.2", "10.0.2.15", "/top")
    assert reqs[1].source == "10.0.2.2:/" and reqs[1].subdir == "top"


def test_client_address_on_loopback():
    assert client_address("127.0.0.1", 2049) == "127.0.0.1"


def test_mount_error_messages():
    req = mount_requests("10.0.2.2", "10.0.2.15", "/d")[0]
    assert "not supported by this kernel" in str(mount_error(req, 19))
    assert "the nfs and nfsv4 modules" in str(mount_error(req, 19))
    [v3, _] = mount_requests("10.0.2.2", "10.0.2.15", "/d", version="3")
    assert "nfs is not supported" in str(mount_error(v3, 19))  # not "nfs4"
    assert "the nfs and nfsv3 modules" in str(mount_error(v3, 19))


def test_connect_without_kernel_nfs_is_a_clear_transport_error():
    with open("/proc/filesystems") as f:
        kernel_has_nfs4 = "nfs4" in f.read()
    # Without an NFS client: ENODEV, named clearly. With one: nothing serves 127.0.0.1.
    match = r"127\.0\.0\.1:/export" if kernel_has_nfs4 else r"nfs4 is not supported by this kernel"
    target, _ = parse_target("nfs://127.0.0.1/export/dumps")
    before = {d for d in os.listdir("/run") if d.startswith("kdump-nfs-")}
    with pytest.raises(TransportError, match=match):
        open_transport(target, TransportSettings(timeout=3)).connect()
    assert {d for d in os.listdir("/run") if d.startswith("kdump-nfs-")} == before


@pytest.mark.parametrize(
    ("timeout", "timeo"),
    [(30, 50), (60, 100), (5, 10), (1, 10)],  # tenths of a second, at least 1 s
)
def test_soft_mount_gives_up_after_about_the_timeout(timeout, timeo):
    assert soft_options(timeout) == ["soft", f"timeo={timeo}", "retrans=2"]
    # over TCP the client waits timeo, 2*timeo, 3*timeo (nfs(5)): about the timeout
    assert (1 + 2 + 3) * timeo / 10 == pytest.approx(max(timeout, 6), rel=0.1)
    [req, _] = mount_requests("10.0.2.2", "10.0.2.15", "/d/h", timeout=timeout)
    assert ",soft," in req.data and "hard" not in req.data


class _HangingMount(_Libc):
    """Test-only: a mount(2) that never returns, like one against a server that accepts the
    connection and then never answers."""

    def mount(self, req, target):
        while True:
            time.sleep(60)


def test_a_hanging_mount_is_killed_after_the_timeout(tmp_path):
    req = mount_requests("10.0.2.2", "10.0.2.15", "/d")[0]
    t0 = time.monotonic()
    code = _HangingMount().mount_within(req, str(tmp_path), 2.0)
    elapsed = time.monotonic() - t0
    assert code == errno.ETIMEDOUT
    assert 2.0 <= elapsed < 6.0
    assert "timed out" in str(mount_error(req, code))


def test_mount_child_reports_the_errno(tmp_path):
    """The real mount(2) in the child: nothing to mount here, an errno comes back at once."""
    req = MountRequest("10.0.2.2:/nothing", "no-such-fs-type", "", "/nothing", "")
    code = _Libc().mount_within(req, str(tmp_path), 5.0)
    assert code == errno.ENODEV


def test_mount_requests_for_nfsv3():
    reqs = mount_requests("10.0.2.2", "10.0.2.15", "/vol/dumps", version="3")
    assert [(r.source, r.fstype, r.subdir) for r in reqs] == [
        ("10.0.2.2:/vol/dumps", "nfs", ""),
        ("10.0.2.2:/vol", "nfs", "dumps"),
    ]
    # nolock: the capture kernel runs no lock or status daemon; no clientaddr (NFSv4 only)
    assert reqs[0].data == (
        "vers=3,proto=tcp,mountproto=tcp,nolock,addr=10.0.2.2,soft,timeo=50,retrans=2"
    )
    [req] = mount_requests("fd00::2", "fd00::15", "/", port=2049, version="3")
    assert req.data.startswith("vers=3,proto=tcp6,mountproto=tcp6,nolock,addr=fd00::2,")
    assert req.data.endswith(",port=2049")
    assert [r.data.split(",")[0] for r in mount_requests("h", "c", "/", version="4.0")] == [
        "vers=4.0"
    ]


class _ScriptedServer(_Libc):
    """Test-only: mount(2) answers as a server speaking only some versions would (the real
    mounts run in the VM tests); the mount point stays a plain directory."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers  # (version, source) -> errno; missing: 0 (mounted)
        self.tried: list[tuple[str, str]] = []

    def mount_within(self, req, target, timeout):
        key = (req.data.split(",")[0].removeprefix("vers="), req.source)
        self.tried.append(key)
        return self.answers.get(key, 0)

    def umount(self, target, flags=0):
        return 0


def _connect(answers, path="/vol/dumps"):
    target, _ = parse_target(f"nfs://127.0.0.1{path}")
    t = open_transport(target, TransportSettings(timeout=3))
    server = t._libc = _ScriptedServer(answers)
    try:
        t.connect()
        return t, server, None
    except TransportError as e:
        return t, server, e


NOT_SPOKEN = errno.EPROTONOSUPPORT


def test_a_server_with_only_nfsv3_is_mounted_with_nfsv3():
    src = "127.0.0.1:/vol/dumps"
    t, server, err = _connect({("4.1", src): NOT_SPOKEN, ("4.0", src): NOT_SPOKEN})
    assert err is None
    assert server.tried == [("4.1", src), ("4.0", src), ("3", src)]
    t.makedir("d")  # the file transport runs on the mount point
    t.close()


def test_a_server_with_only_nfsv4_0_is_mounted_with_4_0():
    src = "127.0.0.1:/vol/dumps"
    t, server, err = _connect({("4.1", src): NOT_SPOKEN})
    assert err is None and server.tried == [("4.1", src), ("4.0", src)]
    t.close()


def test_no_nfsv4_pseudo_root_goes_straight_to_nfsv3():
    """ENOENT for the path and its parent (a server exporting no NFSv4 pseudo root):
    mount.nfs goes to NFSv3 without trying another NFSv4 minor version."""
    answers = {
        ("4.1", "127.0.0.1:/vol/dumps"): errno.ENOENT,
        ("4.1", "127.0.0.1:/vol"): errno.ENOENT,
    }
    t, server, err = _connect(answers)
    assert err is None
    assert server.tried == [
        ("4.1", "127.0.0.1:/vol/dumps"),
        ("4.1", "127.0.0.1:/vol"),
        ("3", "127.0.0.1:/vol/dumps"),
    ]
    t.close()


@pytest.mark.parametrize("code", [errno.EACCES, errno.ETIMEDOUT, errno.EHOSTUNREACH])
def test_a_refusal_or_a_silent_server_is_not_asked_again(code):
    """Access denied, or no answer within the timeout: another version would not help,
    and a silent server must not cost the timeout once per version."""
    t, server, err = _connect({("4.1", "127.0.0.1:/vol/dumps"): code})
    assert server.tried == [("4.1", "127.0.0.1:/vol/dumps")]
    assert err is not None and "versions tried" not in str(err)
    assert isinstance(err, AuthError if code == errno.EACCES else ConnectionLost)
    assert not t._mountpoint  # removed


def test_every_version_refused_names_each_answer():
    """A server without NFSv4 that refuses us NFSv3 is a refusal (AuthError, exit 7), and
    the message names what each version answered."""
    src = "127.0.0.1:/vol/dumps"
    answers = {("4.1", src): NOT_SPOKEN, ("4.0", src): NOT_SPOKEN, ("3", src): errno.EACCES}
    _, server, err = _connect(answers)
    assert isinstance(err, AuthError), err
    assert str(err).startswith(f"cannot mount {src}: the server refused access")
    assert "NFSv4.1: Protocol not supported; NFSv4.0: Protocol not supported; " in str(err)
    assert "NFSv3: Permission denied" in str(err)
    assert len(server.tried) == 3


def test_a_server_name_with_a_dead_address_is_mounted_from_the_next(monkeypatch):
    """A name with two addresses (one per network, say), the first refusing connections:
    NFS mounted from the first only, while the other transports try every address."""
    monkeypatch.setattr(nfs, "resolve", lambda host, port: ["127.0.0.2", "127.0.0.1"])
    dead = "127.0.0.2:/vol/dumps"
    answers = {(v, dead): errno.ECONNREFUSED for v in ("4.1", "3")}
    t, server, err = _connect(answers)
    assert err is None, err
    assert server.tried == [("4.1", dead), ("3", dead), ("4.1", "127.0.0.1:/vol/dumps")]
    t.close()
    # every address refusing: one error naming each address's answers
    answers.update({(v, "127.0.0.1:/vol/dumps"): errno.ECONNREFUSED for v in ("4.1", "3")})
    _, server, err = _connect(answers)
    assert isinstance(err, ConnectionLost), err
    assert "NFSv4.1 at 127.0.0.2: Connection refused" in str(err)
    assert "NFSv3 at 127.0.0.1: Connection refused" in str(err)
    assert len(server.tried) == 4


def test_resolve_gives_each_address_once():
    assert nfs.resolve("127.0.0.1", 2049) == ["127.0.0.1"]
    assert set(nfs.resolve("localhost", 2049)) <= {"127.0.0.1", "::1"}


class _ReadOnlyExport(_ScriptedServer):
    """Test-only: the "export" is a read-only tmpfs really mounted on the mount point."""

    def mount_within(self, req, target, timeout):
        super().mount_within(req, target, timeout)
        return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "ro", target]).returncode

    def umount(self, target, flags=0):
        return _Libc.umount(self, target, flags)


def test_an_export_that_takes_no_writes_is_named_with_the_reason():
    """A mounted export whose directory takes no writes was "target directory
    /run/kdump-nfs-XXXX/ is not writable": a private mount point nobody knows, no reason.
    The export is named, with why (read-only here; root_squash gets its own hint, in the VM
    test), and it is unmounted."""
    target, _ = parse_target("nfs://127.0.0.1/vol/dumps")
    t = open_transport(target, TransportSettings(timeout=3))
    t._libc = _ReadOnlyExport({})
    with pytest.raises(TransportError) as e:
        t.connect()
    assert str(e.value) == (
        "target directory 127.0.0.1:/vol/dumps is not writable (the export is read-only)"
    )
    assert not t._mountpoint
    with open("/proc/self/mounts") as f:
        assert "kdump-nfs-" not in f.read()
