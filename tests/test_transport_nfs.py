"""NFS transport: mount arguments as pure data, and a clear error where the kernel has no NFS.

The real mount happens in the VM tests (the host kernel here has no NFS client).
"""

from __future__ import annotations

import os

import pytest

from kdump_capture.errors import TransportError
from kdump_capture.urls import parse_target
from transports import open_transport
from transports.base import TransportSettings
from transports.nfs import MountRequest, client_address, mount_error, mount_requests


def test_mount_requests_path_then_parent():
    reqs = mount_requests("10.0.2.2", "10.0.2.15", "/dumps/host1")
    assert reqs == [
        MountRequest(
            "10.0.2.2:/dumps/host1",
            "nfs4",
            "vers=4.1,addr=10.0.2.2,clientaddr=10.0.2.15",
            "/dumps/host1",
            "",
        ),
        MountRequest(
            "10.0.2.2:/dumps",
            "nfs4",
            "vers=4.1,addr=10.0.2.2,clientaddr=10.0.2.15",
            "/dumps",
            "host1",
        ),
    ]


def test_mount_requests_port_ipv6_and_root():
    [req] = mount_requests("fd00::2", "fd00::15", "/", port=20049)
    assert req.source == "[fd00::2]:/"
    assert req.data == "vers=4.1,addr=fd00::2,clientaddr=fd00::15,port=20049"
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
