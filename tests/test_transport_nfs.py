"""NFS transport: mount arguments as pure data, and a clear error where the kernel has no NFS.

The real mount happens in the VM tests (the host kernel here has no NFS client).
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from kdump_capture.errors import TransportError
from kdump_capture.urls import parse_target
from transports import open_transport
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
