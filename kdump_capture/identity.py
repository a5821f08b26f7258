"""How this machine names itself in dump directories on shared (network) targets.

Rotation on a shared target counts and deletes only the dumps whose names start with
this name, so it must differ between machines and stay the same across crashes. A
constant fallback (the old "unknown") made every nameless host rotate the others' dumps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket

from .urls import Target

log = logging.getLogger(__name__)

# Dump directory names stay below NAME_MAX (255) with the time stamp and a sequence number.
MAX_NAME = 128
# Names a capture kernel (or an unconfigured machine) may carry that say nothing.
_MEANINGLESS = {"", "(none)", "localhost", "localhost.localdomain", "localhost6"}
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
# systemd's advice: never show the machine-id itself; derive an id for the application.
_APP_KEY = b"kdump-capture host identity"
# /sys/class/net/IF/addr_assign_type: 1 means a random address, new at every boot.
_RANDOM_MAC = "1"
RTF_UP = 0x1


def host_identity(target: Target, configured: str = "", root: str = "/") -> str:
    """This host's name in dump directory names on ``target``.

    In order: ``configured`` (KDUMP_HOSTNAME); ``/etc/hostname.kdump``; the kernel's host
    name unless it is empty or localhost; an id derived from ``/etc/machine-id``; the MAC
    address of the interface that routes to the target (else of the first interface with
    a permanent one); the local address of that route. If all of them fail, a random name
    with a warning: then rotation never deletes another host's dumps, only never ours.
    ``root``: where /etc, /proc and /sys are (tests pass a fake tree).
    """
    if configured.strip():
        return safe_name(configured)
    sources = (
        lambda: _read(root, "etc/hostname.kdump"),
        lambda: _kernel_hostname(root),
        lambda: _machine_id(root),
        lambda: _route_mac(target, root),
        lambda: _route_address(target),
    )
    for source in sources:
        name = source()
        if name:
            return safe_name(name)
    name = f"unnamed-{secrets.token_hex(6)}"
    log.warning(
        "this host has no name, machine-id or network address to name its dumps by; "
        "using %s (set KDUMP_HOSTNAME so that rotation finds this host's older dumps)",
        name,
    )
    return name


def local_identity(root: str = "/") -> str:
    """The name this machine gives itself without the network: what ``initramfs build``
    writes into the capture kernel's KDUMP_HOSTNAME ("" if it has none)."""
    for name in (_read(root, "etc/hostname.kdump"), _kernel_hostname(root), _machine_id(root)):
        if name := config_name(name):
            return name
    return ""


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, '.', '_' and '-' replaced, capped.

    What a save names its dumps by: it must not change between versions, or rotation stops
    finding a host's older dumps (``config_name`` is the stricter form the builder packs).
    """
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name.strip())[:MAX_NAME]


def config_name(name: str) -> str:
    """``name`` as KDUMP_HOSTNAME takes it: ASCII letters, digits, '.', '_' and '-', no
    leading punctuation ("" if nothing is left). ``initramfs build`` packs it: a name with
    a non-ASCII letter or a leading '_' made the capture kernel's configuration fail."""
    kept = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in name.strip())
    return kept.lstrip("._-")[:MAX_NAME]


def _read(root: str, relpath: str, limit: int = 4096) -> str:
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            return f.read(limit).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _kernel_hostname(root: str) -> str:
    name = _read(root, "proc/sys/kernel/hostname")
    return "" if name.lower() in _MEANINGLESS else name


def _machine_id(root: str) -> str:
    mid = _read(root, "etc/machine-id")
    if not _MACHINE_ID.fullmatch(mid) or not int(mid, 16):
        return ""
    digest = hmac.new(bytes.fromhex(mid), _APP_KEY, hashlib.sha256).hexdigest()
    return f"machine-{digest[:16]}"


def _target_ip(target: Target) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = target.host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, target.port or 9, type=socket.SOCK_DGRAM)
        return ipaddress.ip_address(infos[0][4][0])
    except (OSError, ValueError, IndexError):
        return None


def route_interface(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, root: str = "/") -> str:
    """The interface of the most specific up route to ``ip`` in the main routing table."""
    best: tuple[int, int, str] | None = None  # (prefix length, -metric, interface)
    if ip.version == 4:
        lines = _read(root, "proc/net/route", 1 << 20).splitlines()[1:]
        for line in lines:
            f = line.split()
            try:
                iface, dst, flags, metric, mask = f[0], f[1], f[3], f[6], f[7]
                dst_n = int.from_bytes(bytes.fromhex(dst), "little")
                mask_n = int.from_bytes(bytes.fromhex(mask), "little")
                up = int(flags, 16) & RTF_UP
                cand = (bin(mask_n).count("1"), -int(metric), iface)
            except (IndexError, ValueError):
                continue
            if up and int(ip) & mask_n == dst_n & mask_n and (best is None or cand > best):
                best = cand
    else:
        for line in _read(root, "proc/net/ipv6_route", 1 << 20).splitlines():
            f = line.split()
            try:
                net = ipaddress.IPv6Network((int(f[0], 16), int(f[1], 16)), strict=False)
                up = int(f[8], 16) & RTF_UP
                cand = (net.prefixlen, -int(f[5], 16), f[9])
            except (IndexError, ValueError):
                continue
            if up and ip in net and (best is None or cand > best):
                best = cand
    return best[2] if best else ""


def _mac(root: str, iface: str) -> str:
    if not iface or "/" in iface or iface in (".", ".."):
        return ""
    base = os.path.join("sys/class/net", iface)
    mac = _read(root, os.path.join(base, "address")).lower()
    if not _MAC.fullmatch(mac) or mac in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
        return ""
    if _read(root, os.path.join(base, "addr_assign_type")) == _RANDOM_MAC:
        return ""  # a new one at every boot: would not find our older dumps
    return mac


def _route_mac(target: Target, root: str) -> str:
    ip = _target_ip(target)
    mac = _mac(root, route_interface(ip, root)) if ip is not None else ""
    if not mac:
        try:
            names = sorted(os.listdir(os.path.join(root, "sys/class/net")))
        except OSError:
            names = []
        mac = next((m for m in (_mac(root, n) for n in names if n != "lo") if m), "")
    return f"mac-{mac.replace(':', '')}" if mac else ""


def _route_address(target: Target) -> str:
    """Our address on the route to the target (a UDP connect sends nothing)."""
    try:
        fam = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((target.host.strip("[]"), target.port or 9))
            return s.getsockname()[0]
    except OSError:
        return ""
