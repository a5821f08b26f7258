"""/init's network set-up against a DHCP server on a LAN: the capture side runs in a network
namespace of its own, the server in another, joined by a veth pair, as a capture kernel and
its LAN's DHCP server are. The server is a small DHCP responder written here, so that it can
misbehave as real LANs do (a /32 lease, a slow offer, replies to other clients); a full DHCP
server (qemu's) leases the capture kernel's address in every VM cycle (tests/test_e2e_vm.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from initramfs import builder

INIT = Path(__file__).resolve().parent.parent / "initramfs" / "init"

# The LAN: a DHCP server on s0 (10.9.0.1), leasing ``lease`` with ``mask`` and ``router``;
# ``chatter``: it also broadcasts replies meant for other clients, every 0.3 s.
SERVER = r"""
import json, os, socket, struct, subprocess, sys, threading, time
cfg = json.loads(sys.argv[1])
# gone with the client (its end of our stdin closes), even when the client is killed
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
print("ready", flush=True)
while subprocess.run(["ip", "link", "show", "s0"], capture_output=True).returncode:
    time.sleep(0.05)
subprocess.run("ip link set lo up; ip link set s0 up; ip addr add 10.9.0.1/24 dev s0",
               shell=True, check=True)
BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b"s0")  # SO_BINDTODEVICE: broadcasts leave by s0
s.bind(("0.0.0.0", 67))
def reply(kind, xid, chaddr):
    head = BOOTP.pack(2, 1, 6, 0, xid, 0, 0x8000, bytes(4), socket.inet_aton(cfg["lease"]),
                      bytes(4), bytes(4), chaddr, bytes(64), bytes(128), 0x63825363)
    opts = bytes([53, 1, kind, 54, 4]) + socket.inet_aton("10.9.0.1")
    opts += bytes([1, 4]) + socket.inet_aton(cfg["mask"])
    if cfg.get("router"):
        opts += bytes([3, 4]) + socket.inet_aton(cfg["router"])
    if cfg.get("dns"):
        opts += bytes([6, 4]) + socket.inet_aton(cfg["dns"])
    return head + opts + bytes([255])
def chatter():
    other = BOOTP.pack(2, 1, 6, 0, 12345, 0, 0x8000, bytes(4), socket.inet_aton("10.9.0.77"),
                       bytes(4), bytes(4), bytes(16), bytes(64), bytes(128), 0x63825363)
    while True:
        s.sendto(other + bytes([53, 1, 2, 255]), ("255.255.255.255", 68))
        time.sleep(0.3)
if cfg.get("chatter"):
    threading.Thread(target=chatter, daemon=True).start()
while True:
    pkt = s.recv(4096)
    if len(pkt) < BOOTP.size or pkt[0] != 1:
        continue
    f = BOOTP.unpack_from(pkt)
    kind = pkt[BOOTP.size + 2]
    if cfg.get("silent"):
        continue
    if kind == 1:
        time.sleep(cfg.get("delay", 0))  # ISC dhcpd pings the address first: 1 s
    if kind in (1, 3):  # DISCOVER -> OFFER, REQUEST -> ACK
        s.sendto(reply(2 if kind == 1 else 5, f[4], f[11]), ("255.255.255.255", 68))
"""

# The capture side: makes the veth pair, gives s0 to the server's namespace, runs /init's
# ``network_up`` with the plan's network part, and prints the outcome as JSON.
CLIENT = r"""
import importlib.machinery, importlib.util, json, subprocess, sys, time
loader = importlib.machinery.SourceFileLoader("kdump_capture_init", sys.argv[1])
spec = importlib.util.spec_from_loader(loader.name, loader)
init = importlib.util.module_from_spec(spec)
loader.exec_module(init)
net, server_cfg, server_code = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
packed = json.loads(server_cfg).get("packed_resolv")
if packed is not None:  # the image's /etc, with the resolv.conf the builder packed
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/etc"], check=True)
    with open("/etc/resolv.conf", "w") as f:
        f.write(packed)
# this namespace's interfaces in /sys/class/net, as in a capture kernel
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
server = subprocess.Popen(["unshare", "--net", sys.executable, "-c", server_code, server_cfg],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
try:
    assert server.stdout.readline() == "ready\n"
    subprocess.run(f"ip link add eth0 type veth peer name s0 netns {server.pid}",
                   shell=True, check=True)
    started = time.monotonic()
    try:
        init.network_up(net)
        error = ""
    except OSError as e:
        error = init.why(e)
    out = {"seconds": time.monotonic() - started, "error": error}
    out["addr"] = subprocess.run(["ip", "-4", "-o", "addr", "show", "eth0"],
                                 capture_output=True, text=True).stdout
    out["routes"] = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    if packed is not None:
        out["resolv"] = open("/etc/resolv.conf").read()
    print("RESULT " + json.dumps(out), flush=True)
finally:
    server.kill()
"""


def _network_up(net: dict, server: dict) -> dict:
    """/init's network_up in a namespace of its own, against SERVER configured by ``server``."""
    r = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-c", textwrap.dedent(CLIENT), str(INIT)]
        + [json.dumps(net), json.dumps(server), SERVER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]) | {"log": r.stdout + r.stderr}


@pytest.mark.parametrize(
    ("mask", "prefix", "host_route"),
    [("255.255.255.0", 24, False), ("255.255.255.255", 32, True)],
    ids=["/24", "/32"],
)
def test_dhcp_lease_with_a_default_route(mask, prefix, host_route):
    """A lease and its router. A /32 lease with a router outside it, as Google Cloud's DHCP
    hands out: the default route was refused (ENETUNREACH) and the network failed. The
    router is reached through a host route on the link, as dhclient-script does."""
    got = _network_up(
        {"mode": "dhcp", "ifname": "eth0", "timeout": 20},
        {"lease": "10.9.0.5", "mask": mask, "router": "10.9.0.1"},
    )
    assert got["error"] == "", got["log"]
    assert f"10.9.0.5/{prefix}" in got["addr"]
    assert "default via 10.9.0.1 dev eth0" in got["routes"]
    assert ("10.9.0.1 dev eth0 scope link" in got["routes"]) == host_route


def test_a_lease_s_name_server_keeps_the_packed_search_domains():
    """The lease's name server replaces the packed ones; the host's search domains and
    options, which DHCP did not give, stay (a target named by its short name)."""
    packed = "nameserver 192.0.2.53\nsearch lan\noptions timeout:2\n"
    got = _network_up(
        {"mode": "dhcp", "ifname": "eth0", "timeout": 20},
        {"lease": "10.9.0.5", "mask": "255.255.255.0", "dns": "10.9.0.53", "packed_resolv": packed},
    )
    assert got["error"] == "", got["log"]
    assert got["resolv"] == "nameserver 10.9.0.53\nsearch lan\noptions timeout:2\n"


def test_kdump_net_timeout_0_leaves_dhcp_the_time_the_transports_get():
    """KDUMP_NET_TIMEOUT=0 (SUSE 2.x: no ping wait) gave DHCP 1 s, carrier included: no
    lease from a server that pings the address before offering it (ISC dhcpd's default,
    1 s), while the transports wait at least 5 s for a server with the same value. The
    network gets those 5 s too."""
    got = _network_up(
        {"mode": "dhcp", "ifname": "eth0", "timeout": 0},
        {"lease": "10.9.0.5", "mask": "255.255.255.0", "router": "10.9.0.1", "delay": 1.5},
    )
    assert got["error"] == "", got["log"]
    assert "10.9.0.5/24" in got["addr"]


def test_dhcp_ends_at_its_deadline_on_a_busy_network():
    """A server that does not answer us, on a LAN where replies to other clients are
    broadcast to port 68 more often than our resend interval: each one restarted the
    socket's timeout, so the wait never ended (still waiting after 20 s of a 5 s
    KDUMP_NET_TIMEOUT; the save never ran). It ends at the deadline."""
    got = _network_up(
        {"mode": "dhcp", "ifname": "eth0", "timeout": 5},
        {"lease": "10.9.0.5", "mask": "255.255.255.0", "silent": True, "chatter": True},
    )
    assert got["error"] == "no DHCP answer on eth0", got["log"]
    assert got["seconds"] < 8, got


# /init loaded as a module (argv[1]) in a network and mount namespace of a test's own, with
# this namespace's interfaces in /sys/class/net, as in a capture kernel; ``sh`` runs a
# command line there.
INIT_IN_NAMESPACE = r"""
import importlib.machinery, importlib.util, json, subprocess, sys, time
loader = importlib.machinery.SourceFileLoader("kdump_capture_init", sys.argv[1])
spec = importlib.util.spec_from_loader(loader.name, loader)
init = importlib.util.module_from_spec(spec)
loader.exec_module(init)
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
sh = lambda c: subprocess.run(c, shell=True, check=True)
"""


# The building host has the NIC as ens3 (udev's name); the capture kernel, without udev,
# names it eth0. The builder's plan for KDUMP_NETCONFIG=ens3:dhcp, then /init's choice.
RENAMED = (
    INIT_IN_NAMESPACE
    + r"""
from initramfs import builder
sh("ip link add ens3 address 52:54:00:12:34:56 type veth peer name peer0")
sh("ip link add eth9 type veth peer name peer9")  # another NIC
sh("ip addr add 192.168.7.10/24 dev ens3; ip link set ens3 up; ip link set peer0 up")
sh("ip route add default via 192.168.7.1 dev ens3")
net = builder.host_interface(builder.parse_netconfig(sys.argv[2], True, 2))
sh("ip link set ens3 name eth0")  # the capture kernel's name for it
try:
    print("PICKED", init.pick_interface(net.as_dict(), time.monotonic() + 2))
except OSError as e:
    print("FAILED", init.why(e))
"""
)


@pytest.mark.parametrize("netconfig", ["ens3:dhcp", "ens3:static"])
def test_an_interface_named_by_udev_is_found_by_its_mac_in_the_capture_kernel(netconfig):
    """KDUMP_NETCONFIG=ens3:dhcp or ens3:static: the capture kernel has no interface named
    ens3 (no udev renames it there), and /init failed with "no network interface found
    (have: ['eth0', ...])": DEV:dhcp packed no MAC, and DEV:static an empty one (`ip -4
    addr` does not show the link's address). Both pack DEV's MAC, and /init finds the NIC
    by it."""
    r = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-c", RENAMED, str(INIT), netconfig],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=INIT.parent.parent,
    )
    assert "PICKED eth0" in r.stdout, r.stdout + r.stderr


# The capture kernel's /etc is the image's: an empty tmpfs here, filled with what the
# builder packs for name resolution, then a look-up as a transport makes it.
RESOLVE = r"""
import json, os, socket, subprocess, sys
files = json.loads(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/etc"], check=True)
for dest, text in files.items():
    with open("/" + dest, "w") as f:
        f.write(text)
try:
    print("RESOLVED", socket.getaddrinfo(sys.argv[2], 22, type=socket.SOCK_STREAM)[0][4][0])
except OSError as e:
    print("FAILED", e)
"""


def test_a_target_named_in_etc_hosts_resolves_in_the_capture_kernel(tmp_path):
    """The dump server is known to this host by /etc/hosts (no DNS has it): the image
    packed no /etc/hosts, nor a resolv.conf for a static address, and a save to
    sftp://dumpserver.lan/... failed with "Temporary failure in name resolution". The
    image now carries the hosts file, the host's name servers (not a loopback stub) and
    search domains, and an nsswitch.conf that reads the file first."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.9.0.1 dumpserver.lan dumpserver\n")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# stub\nnameserver 127.0.0.53\nnameserver 10.9.0.53\nsearch lan\n")
    files = builder.resolver_files(str(hosts), (str(tmp_path / "absent"), str(resolv)))
    assert files["etc/resolv.conf"] == b"nameserver 10.9.0.53\nsearch lan\n"
    text = json.dumps({k: v.decode() for k, v in files.items()})
    for name in ("dumpserver.lan", "dumpserver"):
        r = subprocess.run(
            ["unshare", "--mount", "--net", sys.executable, "-c", RESOLVE, text, name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.stdout.strip() == "RESOLVED 10.9.0.1", r.stdout + r.stderr


# Two NICs, a cable in the second only (the first's peer stays down: no carrier). veth
# pairs stand for the NICs: is_hardware takes them for PCI devices.
TWO_NICS = (
    INIT_IN_NAMESPACE
    + r"""
sh("ip link add eth0 type veth peer name p0")
sh("ip link add eth1 type veth peer name p1; ip link set p1 up")
init.is_hardware = lambda name: name.startswith("eth")
print("PICKED", init.pick_interface({"mode": "dhcp", "timeout": 5}, time.monotonic() + 5))
"""
)


def test_auto_takes_the_nic_that_has_a_link():
    """KDUMP_NETCONFIG=auto on a machine with two NICs and a cable in the second: /init
    took the first NIC, waited for its carrier until KDUMP_NET_TIMEOUT and failed DHCP on
    it. It brings each NIC up and takes the first that gets a link."""
    r = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-c", TWO_NICS, str(INIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "PICKED eth1" in r.stdout, r.stdout + r.stderr


# A DEV:dhcp image records DEV's MAC; the NIC is replaced (a new MAC) and the machine boots.
REPLACED = r"""
import json, subprocess, sys
from kdump_capture.config import load_config
from kdump_capture.load import rebuild
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
sh = lambda c: subprocess.run(c, shell=True, check=True)
sh("ip link add ens3 address 52:54:00:12:34:56 type veth peer name peer0")
cfg = load_config(None, ["KDUMP_SAVEDIR=sftp://root@10.0.0.9/d", "KDUMP_NETCONFIG=ens3:dhcp"])
args = dict(kernel_version="9.9.9-test", modules_root=None, compress="zstd",
            target_device="", target_fstype="")
before = rebuild.image_inputs(cfg, **args)
same = rebuild.image_inputs(cfg, **args)
sh("ip link set ens3 address 52:54:00:ab:cd:ef")
after = rebuild.image_inputs(cfg, **args)
print("CHANGED", json.dumps(sorted(k for k in before if before[k] != after[k])),
      json.dumps(sorted(k for k in before if before[k] != same[k])))
"""


def test_a_replaced_nic_makes_the_image_stale():
    """KDUMP_NETCONFIG=ens3:dhcp packs ens3's MAC (the capture kernel finds the NIC by
    it). A NIC replaced after the image was built left the image as it was ("up to date"):
    the capture kernel then looked for the old MAC, found no interface and reached no
    target. The NIC the image looks for is one of its inputs."""
    r = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-c", REPLACED],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=INIT.parent.parent,
    )
    assert 'CHANGED ["network interface"] []' in r.stdout, r.stdout + r.stderr
