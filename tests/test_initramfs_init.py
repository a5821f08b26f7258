"""Pure parts of /init: DHCP packets, superblock probing, finish policy, cmdline options."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

INIT = Path(__file__).resolve().parent.parent / "initramfs" / "init"


def _load_init():
    loader = importlib.machinery.SourceFileLoader("kdump_capture_init", str(INIT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


init = _load_init()


def test_init_is_executable_python_with_packed_interpreter_shebang():
    text = INIT.read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    assert INIT.stat().st_mode & 0o111


def test_cmdline_options():
    opts = init.parse_cmdline("ro console=ttyS0 kdump_capture.finish=poweroff kdump_capture.break")
    assert opts == {"finish": "poweroff", "break": "1"}


@pytest.mark.parametrize(
    ("ok", "cmdline", "shell", "expected"),
    [
        (True, {}, "/usr/bin/sh", "reboot"),
        (False, {}, "/usr/bin/sh", "shell"),
        (False, {}, "", "shell-python"),
        (True, {"finish": "poweroff"}, "", "poweroff"),
    ],
)
def test_finish_action(ok, cmdline, shell, expected):
    plan = {"on_success": "reboot", "on_failure": "shell", "shell": shell}
    assert init.finish_action(plan, ok, cmdline) == expected


def _reply(msgtype: int, xid: int, yiaddr: str, opts: bytes) -> bytes:
    head = init.BOOTP.pack(
        2,
        1,
        6,
        0,
        xid,
        0,
        0,
        b"\0" * 4,
        socket.inet_aton(yiaddr),
        b"\0" * 4,
        b"\0" * 4,
        b"\x52\x54\0\x12\x34\x56".ljust(16, b"\0"),
        b"\0" * 64,
        b"\0" * 128,
        init.DHCP_COOKIE,
    )
    return head + bytes([53, 1, msgtype]) + opts + b"\0\0" + bytes([255])


def test_dhcp_request_layout():
    mac = bytes.fromhex("525400123456")
    pkt = init.dhcp_packet(
        init.DHCPREQUEST,
        0xDEADBEEF,
        mac,
        socket.inet_aton("10.0.2.15"),
        socket.inet_aton("10.0.2.2"),
    )
    f = init.BOOTP.unpack_from(pkt)
    assert f[0] == 1 and f[4] == 0xDEADBEEF and f[6] == 0x8000 and f[11][:6] == mac
    assert f[14] == 0x63825363
    opts = pkt[240:]
    assert opts[:3] == bytes([53, 1, 3])
    assert bytes([50, 4]) + socket.inet_aton("10.0.2.15") in opts
    assert bytes([54, 4]) + socket.inet_aton("10.0.2.2") in opts
    assert opts[-1] == 255


def test_dhcp_ack_parsing_and_foreign_xid():
    opts = (
        bytes([1, 4])
        + socket.inet_aton("255.255.255.0")
        + bytes([3, 4])
        + socket.inet_aton("10.0.2.2")
        + bytes([6, 8])
        + socket.inet_aton("10.0.2.3")
        + socket.inet_aton("1.1.1.1")
    )
    pkt = _reply(init.DHCPACK, 7, "10.0.2.15", opts)
    addr, parsed = init.parse_dhcp(pkt, 7)
    assert socket.inet_ntoa(addr) == "10.0.2.15"
    assert parsed[53] == bytes([init.DHCPACK])
    assert init.mask_to_prefix(parsed[1]) == 24
    assert parsed[6] == socket.inet_aton("10.0.2.3") + socket.inet_aton("1.1.1.1")
    assert init.parse_dhcp(pkt, 8) is None
    assert init.parse_dhcp(pkt[:100], 7) is None


def test_prefix_mask_round_trip():
    for p in (0, 8, 16, 23, 24, 32):
        assert init.mask_to_prefix(socket.inet_aton(init.prefix_to_mask(p))) == p


def test_struct_sizes_match_kernel_abi():
    assert init.RTENTRY.size == 120  # sizeof(struct rtentry) on x86_64
    assert init.IFREQ_ADDR.size == 40  # sizeof(struct ifreq)
    assert struct.calcsize("=HH4s8x") == 16  # sizeof(struct sockaddr_in)


def _mkfs(tmp_path: Path, tool: list[str]) -> bytes:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} is not installed (setup.sh installs it)")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run([*tool, str(img)], check=True, capture_output=True)
    return img.read_bytes()[:65536]


def test_probe_ext4_label_and_uuid(tmp_path):
    uuid = "0b7f3c5e-1111-4222-8333-444455556666"
    head = _mkfs(tmp_path, ["mkfs.ext4", "-q", "-L", "crashdisk", "-U", uuid])
    info = init.probe_superblock(head)
    assert info == {"TYPE": "ext4", "UUID": uuid, "LABEL": "crashdisk"}
    assert init.matches("LABEL=crashdisk", "/dev/vda", info)
    assert init.matches(f"UUID={uuid.upper()}", "/dev/vda", info)
    assert not init.matches("LABEL=other", "/dev/vda", info)
    assert init.matches("/dev/vda", "/dev/vda", {})


def test_probe_unknown_is_empty():
    assert init.probe_superblock(b"\0" * 65536) == {}
