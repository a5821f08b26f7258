"""How a host names its dumps on shared targets (issue 8, item 6): never a constant."""

from __future__ import annotations

import ipaddress
import os

import pytest

from kdump_capture import identity, policy
from kdump_capture.config import load_config
from kdump_capture.identity import host_identity, local_identity, route_interface
from kdump_capture.pipeline import SavePlan, save_to_target
from kdump_capture.sample import SampleSpec, write_sample
from kdump_capture.urls import Target, parse_target
from kdump_capture.vmcore import open_vmcore
from tests.servers.targets import SETTINGS, make_target

MID_A = "0123456789abcdef0123456789abcdef"
MID_B = "fedcba9876543210fedcba9876543210"
# A target with no local address on its route (connect() to broadcast fails with EACCES),
# and only the default route of ROUTES leads to.
NOWHERE = Target("ftp", "ftp", host="255.255.255.255", port=21, path="/d")
# /proc/net/route: a default route via eth0 and 10.1.0.0/16 via eth1 (little-endian hex).
ROUTES = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    "eth1\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    "eth2\t0000010A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # not up
)


def fake_root(tmp_path, files: dict[str, str] | None = None, name: str = "root") -> str:
    """A tree with the etc/, proc/ and sys/ files given (path: content)."""
    root = tmp_path / name
    for key, content in (files or {}).items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    return str(root)


def nic(name: str, mac: str, assign: str = "0") -> dict[str, str]:
    base = f"sys/class/net/{name}"
    return {f"{base}/address": mac + "\n", f"{base}/addr_assign_type": assign + "\n"}


def test_configured_name_wins(tmp_path):
    root = fake_root(tmp_path, {"etc/hostname.kdump": "other\n"})
    assert host_identity(NOWHERE, "web-01", root) == "web-01"


def test_hostname_kdump_then_kernel_hostname(tmp_path):
    root = fake_root(
        tmp_path, {"etc/hostname.kdump": "db 7\n", "proc/sys/kernel/hostname": "node\n"}
    )
    assert host_identity(NOWHERE, "", root) == "db_7"
    root = fake_root(tmp_path, {"proc/sys/kernel/hostname": "node\n"}, "r2")
    assert host_identity(NOWHERE, "", root) == "node"


@pytest.mark.parametrize("meaningless", ["(none)", "localhost", "localhost.localdomain", ""])
def test_machine_id_when_the_host_has_no_name(tmp_path, meaningless):
    root = fake_root(
        tmp_path, {"proc/sys/kernel/hostname": meaningless + "\n", "etc/machine-id": MID_A}
    )
    name = host_identity(NOWHERE, "", root)
    assert name.startswith("machine-") and len(name) == len("machine-") + 16
    assert MID_A not in name and MID_A[:16] not in name  # the id itself stays private
    assert host_identity(NOWHERE, "", root) == name  # stable
    other = fake_root(tmp_path, {"etc/machine-id": MID_B}, "b")
    assert host_identity(NOWHERE, "", other) != name


@pytest.mark.parametrize("bad", ["uninitialized", "0" * 32, MID_A[:31], MID_A.upper() + "x"])
def test_invalid_machine_id_falls_through_to_the_mac(tmp_path, bad):
    files = {"etc/machine-id": bad, "proc/net/route": ROUTES}
    root = fake_root(tmp_path, {**files, **nic("eth0", "52:54:00:12:34:56")})
    assert host_identity(NOWHERE, "", root) == "mac-525400123456"


def test_mac_of_the_interface_that_routes_to_the_target(tmp_path):
    root = fake_root(
        tmp_path,
        {
            "proc/net/route": ROUTES,
            **nic("eth0", "52:54:00:00:00:01"),
            **nic("eth1", "52:54:00:00:00:02"),
            **nic("eth2", "52:54:00:00:00:03"),
        },
    )
    assert route_interface(ipaddress.ip_address("10.1.2.3"), root) == "eth1"
    assert route_interface(ipaddress.ip_address("255.255.255.255"), root) == "eth0"
    assert host_identity(Target("ftp", "ftp", host="10.1.2.3"), "", root) == "mac-525400000002"
    assert host_identity(NOWHERE, "", root) == "mac-525400000001"


def test_ipv6_route(tmp_path):
    routes = (
        "fd000000000000000000000000000000 08 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     ens4\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000001 00000000 00000003     ens3\n"
    )
    root = fake_root(tmp_path, {"proc/net/ipv6_route": routes})
    assert route_interface(ipaddress.ip_address("fd00::5"), root) == "ens4"
    assert route_interface(ipaddress.ip_address("2001:db8::1"), root) == "ens3"


def test_random_or_empty_macs_are_skipped(tmp_path):
    root = fake_root(
        tmp_path,
        {
            "proc/net/route": ROUTES,
            **nic("eth0", "52:54:00:00:00:01", assign="1"),  # random: new at every boot
            **nic("lo", "00:00:00:00:00:00"),
            **nic("wlan0", "52:54:00:00:00:09"),
        },
    )
    # eth0 routes to the target but its address is random: the first permanent one.
    assert host_identity(NOWHERE, "", root) == "mac-525400000009"


def test_route_address_when_there_is_nothing_else(tmp_path):
    root = fake_root(tmp_path)
    target, _ = parse_target("ftp://127.0.0.1:21/d")
    assert host_identity(target, "", root) == "127.0.0.1"


def test_never_a_constant(tmp_path, caplog):
    root = fake_root(tmp_path)
    first, second = host_identity(NOWHERE, "", root), host_identity(NOWHERE, "", root)
    assert first.startswith("unnamed-") and second.startswith("unnamed-") and first != second
    assert "set KDUMP_HOSTNAME" in caplog.text


def test_local_identity_for_the_initramfs(tmp_path):
    assert local_identity(fake_root(tmp_path, {"etc/machine-id": MID_A})).startswith("machine-")
    assert local_identity(fake_root(tmp_path, name="e")) == ""


def test_names_are_safe_and_bounded():
    assert identity.safe_name("a/../b c") == "a_.._b_c"
    assert len(identity.safe_name("x" * 1000)) == identity.MAX_NAME


def test_two_identities_never_rotate_each_other(tmp_path, request):
    """Two nameless machines told apart by their machine-ids share one FTP target, each
    keeping one older dump: each ends with exactly its own two newest dumps."""
    target = make_target("ftp", request)
    t, _ = parse_target(target.url)
    names = [
        host_identity(t, "", fake_root(tmp_path, {"etc/machine-id": mid}, f"r{i}"))
        for i, mid in enumerate((MID_A, MID_B))
    ]
    assert names[0] != names[1]
    sample = tmp_path / "vmcore"
    write_sample(str(sample), SampleSpec(ram_mib=2))
    made: dict[str, list[str]] = {n: [] for n in names}
    with open_vmcore(str(sample)) as vm:
        for _ in range(3):
            for n in names:
                plan = SavePlan([t], "raw", 0, 1, 0, SETTINGS, hostname=n)
                made[n].append(save_to_target(vm, plan, t).directory)
    left = sorted(os.listdir(target.server_dir))
    for n in names:
        mine = [d for d in left if policy.parse_dump_name(d)[0] == n]
        assert mine == made[n][-2:]


@pytest.mark.parametrize(
    "raw, safe",
    [("wéb01", "w_b01"), ("_web01", "web01"), ("-web01", "web01"), (".web01", "web01"),
     ("web01²", "web01_"), ("٣host", "host")],
)  # fmt: skip
def test_safe_names_are_names_the_configuration_takes(raw, safe):
    """The builder packs local_identity() as KDUMP_HOSTNAME; a name with a non-ASCII letter
    or a leading '_', '-' or '.' passed safe_name but not the capture kernel's
    configuration, which then failed with exit 2 at the crash. A save itself keeps naming
    its dumps as before (safe_name): rotation must find the older ones."""
    assert identity.config_name(raw) == safe
    assert identity.safe_name("wéb01") == "wéb01" and identity.safe_name("_x") == "_x"
    assert load_config(None, [f"KDUMP_HOSTNAME={safe}"])["KDUMP_HOSTNAME"] == safe


def test_a_name_with_nothing_safe_left_falls_through(tmp_path):
    root = fake_root(tmp_path, {"etc/hostname.kdump": "___", "etc/machine-id": MID_A})
    assert local_identity(root).startswith("machine-")
