"""Tests for the sysconfig parser, directive validation and Config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kdump_capture.config import (
    DIRECTIVES,
    Config,
    load_config,
    parse_sysconfig,
)
from kdump_capture.errors import ConfigError, NotSupported
from kdump_capture.urls import redact


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kdump"
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> Config:
    return load_config(write(tmp_path, text), overrides)


def error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value).replace(path, "FILE")


def value_of(text: str) -> str:
    (a,) = parse_sysconfig(text, "f")
    return a.value


# --- defaults -----------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg.warnings == []
    assert cfg["KDUMP_SAVEDIR"] == "file:///var/log/dump"
    assert [t.path for t in cfg.savedir] == ["/var/log/dump"]
    assert cfg.savedir[0].scheme == "file"
    assert cfg.keep_old_dumps == 5
    assert cfg.free_disk_size == 64 * 1024 * 1024
    assert cfg.dumplevel == 0
    assert cfg.dumpformat == "elf"
    assert cfg["KDUMP_DUMPFORMAT"] == "ELF"
    assert cfg.immediate_reboot is True
    assert cfg.verbose == 3
    assert cfg.runlevel == "1"
    assert cfg.dumpdev == cfg.transfer == cfg.host_key == ""
    assert cfg.net_timeout == 30
    assert cfg.ssh_identity == ()
    assert cfg.continue_on_error is True
    for name, default in [
        ("KDUMP_KERNELVER", ""),
        ("KDUMP_COMMANDLINE", ""),
        ("KDUMP_COMMANDLINE_APPEND", ""),
        ("KEXEC_OPTIONS", ""),
        ("KDUMP_NETCONFIG", "auto"),
        ("KDUMP_CONTINUE_ON_ERROR", "true"),
        ("KDUMP_CPUS", "1"),
        ("KDUMP_VERBOSE", "3"),
        ("KDUMP_RUNLEVEL", "1"),
        ("KDUMP_IMMEDIATE_REBOOT", "yes"),
    ]:
        assert cfg[name] == default
        assert cfg.location(name) == "default"
    assert list(cfg) == [d.name for d in DIRECTIVES]
    assert len(cfg) == len(DIRECTIVES)


def test_table_documents_every_directive() -> None:
    names = {d.name for d in DIRECTIVES}
    for required in """KDUMP_SAVEDIR KDUMP_KEEP_OLD_DUMPS KDUMP_FREE_DISK_SIZE KDUMP_DUMPLEVEL
        KDUMP_DUMPFORMAT KDUMP_IMMEDIATE_REBOOT KDUMP_VERBOSE KDUMP_RUNLEVEL KDUMP_DUMPDEV
        KDUMP_TRANSFER KDUMP_PRESCRIPT KDUMP_POSTSCRIPT KDUMP_CONTINUE_ON_ERROR
        KDUMP_REQUIRED_PROGRAMS KDUMP_COPY_KERNEL KDUMPTOOL_FLAGS MAKEDUMPFILE_OPTIONS KDUMP_CPUS
        KDUMP_NETCONFIG KDUMP_NET_TIMEOUT KDUMP_SMTP_SERVER KDUMP_SMTP_USER KDUMP_SMTP_PASSWORD
        KDUMP_NOTIFICATION_TO KDUMP_NOTIFICATION_CC KDUMP_HOST_KEY KDUMP_SSH_IDENTITY
        KDUMP_KERNELVER KDUMP_COMMANDLINE KDUMP_COMMANDLINE_APPEND KEXEC_OPTIONS KDUMP_AUTO_RESIZE
        KDUMP_FADUMP KDUMP_FADUMP_SHELL FADUMP_COMMANDLINE_APPEND KDUMP_CRASHKERNEL
        KDUMP_UPDATE_BOOTLOADER""".split():
        assert required in names
    for d in DIRECTIVES:
        assert d.doc and d.side in ("dump", "load")


def test_missing_file_gives_defaults_and_warning(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    cfg = load_config(path)
    assert cfg.warnings == [f"{path}: not found; using built-in defaults"]
    assert dict(cfg) == dict(load_config(None))


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(tmp_path))  # a directory


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "kdump"
    path.write_bytes(b"# ok\nKDUMP_TRANSFER='\xff'\n")
    with pytest.raises(ConfigError, match=r":2: not valid UTF-8$"):
        load_config(str(path))


def test_a_file_saved_with_a_byte_order_mark_parses(tmp_path: Path) -> None:
    """Notepad saves UTF-8 with a BOM (and \\r\\n): the first line was refused as 'expected
    NAME=value', a line that reads as exactly that."""
    path = tmp_path / "kdump"
    path.write_bytes(b'\xef\xbb\xbfKDUMP_DUMPLEVEL="7"\r\nKDUMP_DUMPFORMAT=lzo\r\n')
    cfg = load_config(str(path))
    assert (cfg.dumplevel, cfg.dumpformat, cfg.location("KDUMP_DUMPFORMAT")) == (
        7,
        "lzo",
        f"{path}:2",
    )
    assert cfg.warnings == []


def test_line_continuations_in_a_file_saved_with_windows_line_ends(tmp_path: Path) -> None:
    """A backslash before \\r\\n was not a continuation: unquoted, the value kept a \\r
    and the next line was refused as "'crash' is not an assignment" (a piece of the value
    in the message); in double quotes the value kept the backslash and the \\r (a stray
    '\\' word on the capture kernel's command line). The same file with \\n reads whole."""
    lines = [
        'KDUMP_COMMANDLINE_APPEND="console=ttyS0 \\',
        'irqpoll"',
        "KDUMP_SAVEDIR=file:///var/\\",
        "crash",
        "KDUMP_DUMPLEVEL=31 \\",
        "  # a comment after a continued blank",
        "KDUMP_DUMPFORMAT=99",
    ]
    unix = load(tmp_path, "\n".join(lines[:6]) + "\n")
    path = tmp_path / "windows"
    path.write_bytes(("\r\n".join(lines[:6]) + "\r\n").encode())
    windows = load_config(str(path))
    for cfg in (unix, windows):
        assert cfg["KDUMP_COMMANDLINE_APPEND"] == "console=ttyS0 irqpoll"
        assert cfg["KDUMP_SAVEDIR"] == "file:///var/crash" and cfg.dumplevel == 31
    assert windows.location("KDUMP_DUMPLEVEL") == f"{path}:5"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    with pytest.raises(ConfigError, match=r":7: KDUMP_DUMPFORMAT: '99' is not"):
        load_config(str(path))


# --- kinds: valid and invalid values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "attr", "expected"),
    [
        ("KDUMP_KEEP_OLD_DUMPS=0", "keep_old_dumps", 0),
        ("KDUMP_KEEP_OLD_DUMPS=-1", "keep_old_dumps", -1),
        ("KDUMP_KEEP_OLD_DUMPS=-2", "keep_old_dumps", -2),
        ("KDUMP_KEEP_OLD_DUMPS=12", "keep_old_dumps", 12),
        ("KDUMP_DUMPLEVEL=31", "dumplevel", 31),
        ("KDUMP_DUMPLEVEL=' 1 '", "dumplevel", 1),
        ("KDUMP_DUMPFORMAT=elf", "dumpformat", "elf"),
        ("KDUMP_DUMPFORMAT=Compressed", "dumpformat", "compressed"),
        ("KDUMP_DUMPFORMAT=ZSTD", "dumpformat", "zstd"),
        ("KDUMP_DUMPFORMAT=none", "dumpformat", "none"),
        ("KDUMP_DUMPFORMAT=raw", "dumpformat", "raw"),
        ("KDUMP_IMMEDIATE_REBOOT=No", "immediate_reboot", False),
        ("KDUMP_IMMEDIATE_REBOOT=FALSE", "immediate_reboot", False),
        ("KDUMP_IMMEDIATE_REBOOT=0", "immediate_reboot", False),
        ("KDUMP_IMMEDIATE_REBOOT=1", "immediate_reboot", True),
        ("KDUMP_IMMEDIATE_REBOOT=True", "immediate_reboot", True),
        ("KDUMP_CONTINUE_ON_ERROR=no", "continue_on_error", False),
        ("KDUMP_VERBOSE=0", "verbose", 0),
        ("KDUMP_VERBOSE=31", "verbose", 31),
        ("KDUMP_RUNLEVEL=3", "runlevel", "3"),
        ("KDUMP_RUNLEVEL=S", "runlevel", "s"),
        ("KDUMP_RUNLEVEL=s", "runlevel", "s"),
        ("KDUMP_NET_TIMEOUT=0", "net_timeout", 0),
        ("KDUMP_NET_TIMEOUT=120", "net_timeout", 120),
        ("KDUMP_SSH_IDENTITY='id_ed25519  /root/k2\n'", "ssh_identity", ("id_ed25519", "/root/k2")),
        ("KDUMP_HOST_KEY='*'", "host_key", "*"),
        ("KDUMP_HOST_KEY=*", "host_key", "*"),
        (
            "KDUMP_HOST_KEY='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH+/='",
            "host_key",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH+/=",
        ),
        ("KDUMP_DUMPDEV=/dev/sdb2", "dumpdev", "/dev/sdb2"),
        ("KDUMP_TRANSFER='cp /proc/vmcore /x'", "transfer", "cp /proc/vmcore /x"),
        # An empty value of a typed directive means its default (as SUSE's current tool does).
        ("KDUMP_DUMPLEVEL=", "dumplevel", 0),
        ("KDUMP_IMMEDIATE_REBOOT=''", "immediate_reboot", True),
        ("KDUMP_SAVEDIR=", "savedir", load_config(None).savedir),
    ],
)
def test_valid_values(tmp_path: Path, line: str, attr: str, expected: object) -> None:
    cfg = load(tmp_path, line + "\n")
    assert getattr(cfg, attr) == expected
    assert cfg.location(line.split("=")[0]) == f"{tmp_path / 'kdump'}:1"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KDUMP_CPUS", "0", 0),
        ("KDUMP_CPUS", "8", 8),
        ("KDUMP_NETCONFIG", "auto", "auto"),
        ("KDUMP_NETCONFIG", "eth0:dhcp4", "eth0:dhcp4"),
        ("KDUMP_NETCONFIG", "eth0:static:force", "eth0:static:force"),
        ("KDUMP_NETCONFIG", "auto:force", "auto:force"),
        ("KDUMP_NETCONFIG", "", "auto"),
        ("KDUMPTOOL_FLAGS", "NOSPARSE,split", ("NOSPARSE", "SPLIT")),
        ("KDUMP_NOTIFICATION_CC", "a@x b@y", ("a@x", "b@y")),
        ("KDUMP_FADUMP", "yes", True),
        ("KDUMP_UPDATE_BOOTLOADER", "false", False),
        ("KDUMP_CRASHKERNEL", "256M,high", "256M,high"),
    ],
)
def test_other_directives(tmp_path: Path, name: str, value: str, expected: object) -> None:
    assert load(tmp_path, f"{name}='{value}'\n").value(name) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("KDUMP_DUMPLEVEL=32", "KDUMP_DUMPLEVEL: 32 is out of range; allowed: 0-31"),
        ("KDUMP_DUMPLEVEL=-1", "KDUMP_DUMPLEVEL: -1 is out of range; allowed: 0-31"),
        ("KDUMP_DUMPLEVEL=1.5", "KDUMP_DUMPLEVEL: '1.5' is not an integer; allowed: 0-31"),
        ("KDUMP_DUMPLEVEL=٣", "KDUMP_DUMPLEVEL: '٣' is not an integer; allowed: 0-31"),
        (
            'KDUMP_DUMPLEVEL="ELF"',  # the seed tutorial's own typo
            "KDUMP_DUMPLEVEL: 'ELF' is not an integer (a dump format belongs in "
            "KDUMP_DUMPFORMAT); allowed: 0-31",
        ),
        (
            "KDUMP_KEEP_OLD_DUMPS=-3",
            "KDUMP_KEEP_OLD_DUMPS: -3 is out of range; allowed: 0 (keep all), -1 or -2 "
            "(delete all before writing), N>0 (keep N older dumps)",
        ),
        (
            "KDUMP_DUMPFORMAT=gzip",
            "KDUMP_DUMPFORMAT: 'gzip' is not a known value; "
            "allowed: none, ELF, compressed, lzo, snappy, zstd, raw",
        ),
        (
            "KDUMP_IMMEDIATE_REBOOT=maybe",
            "KDUMP_IMMEDIATE_REBOOT: 'maybe' is not a yes/no value; "
            "allowed: yes, no, true, false, 1, 0",
        ),
        ("KDUMP_VERBOSE=32", "KDUMP_VERBOSE: 32 is out of range; allowed: 0-31"),
        ("KDUMP_RUNLEVEL=4", "KDUMP_RUNLEVEL: '4' is not a known value; allowed: 1, 2, 3, 5, s, S"),
        ("KDUMP_NET_TIMEOUT=-5", "KDUMP_NET_TIMEOUT: -5 is out of range; allowed: 0-86400"),
        (
            "KDUMP_FREE_DISK_SIZE=lots",
            "KDUMP_FREE_DISK_SIZE: 'lots' is not a size; "
            "allowed: megabytes as 64, 64M, 64MB, 512K, 1G, 1GB (0 disables the check)",
        ),
        (
            "KDUMP_NETCONFIG=eth0:ppp",
            "KDUMP_NETCONFIG: 'eth0:ppp' is not valid; allowed: auto, or IFACE:MODE with MODE "
            "static|dhcp|dhcp4|dhcp6|auto6|auto, optionally followed by :force",
        ),
        (
            "KDUMP_HOST_KEY='host.example ssh-ed25519 AAAA'",
            "KDUMP_HOST_KEY: 'host.example ssh-ed25519 AAAA' is not valid; allowed: empty "
            "(use known_hosts), * (do not check), or '<type> <base64 key>'",
        ),
        (
            "KDUMPTOOL_FLAGS=FAST",
            "KDUMPTOOL_FLAGS: unknown flag 'FAST'; "
            "allowed: NOSPARSE, SPLIT, SINGLE, NOSPLIT, XENALLDOMAINS",
        ),
        (
            "KDUMP_CPUS=all",
            "KDUMP_CPUS: 'all' is not an integer; allowed: 0 (all) or a number of CPUs",
        ),
    ],
)
def test_invalid_values(tmp_path: Path, line: str, message: str) -> None:
    assert error(tmp_path, f"# header\n\n{line}\n") == f"FILE:3: {message}"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64", 64 << 20),
        ("64M", 64 << 20),
        ("64MB", 64 << 20),
        ("64mb", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("1GB", 1 << 30),
        ("1g", 1 << 30),
        ("512K", 512 << 10),
        ("512kb", 512 << 10),
        ("0", 0),
        ("2T", 2 << 40),
    ],
)
def test_free_disk_size_forms(tmp_path: Path, text: str, size: int) -> None:
    cfg = load(tmp_path, f"KDUMP_FREE_DISK_SIZE={text}\n")
    assert cfg.free_disk_size == size
    assert cfg["KDUMP_FREE_DISK_SIZE"] == text


@pytest.mark.parametrize("text", ["64X", "-1", "1.5G", "G", "64 M B", "MB64"])
def test_free_disk_size_invalid(tmp_path: Path, text: str) -> None:
    assert error(tmp_path, f"KDUMP_FREE_DISK_SIZE='{text}'\n").startswith(
        f"FILE:1: KDUMP_FREE_DISK_SIZE: {text!r} is not a size; allowed: megabytes"
    )


def test_savedir_forms_and_warnings(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "KDUMP_SAVEDIR='/var/crash nfs:///nfsserver02:/dumps ftp://u:p%40ss@h:2121/d'\n",
    )
    first, nfs, ftp = cfg.savedir
    assert (first.scheme, first.path) == ("file", "/var/crash")
    assert (nfs.scheme, nfs.host, nfs.path) == ("nfs", "nfsserver02", "/dumps")
    assert (ftp.user, ftp.password, ftp.port) == ("u", "p@ss", 2121)
    path = tmp_path / "kdump"
    assert cfg.warnings == [
        f"{path}:1: KDUMP_SAVEDIR '/var/crash' has no scheme; treating it as file:///var/crash"
    ]


def test_bad_savedir_names_location_and_hides_password(tmp_path: Path) -> None:
    msg = error(tmp_path, "\nKDUMP_SAVEDIR=ftp://bob:hunter2@host:99999/x\n")
    assert msg.startswith("FILE:2: KDUMP_SAVEDIR: target ")
    assert "port" in msg
    assert "hunter2" not in msg
    msg = error(tmp_path, "KDUMP_SAVEDIR=gopher://bob:hunter2@host/x\n")
    assert "unknown scheme" in msg and "hunter2" not in msg


SEED_CONFIG = """\
KDUMP_KERNELVER=""
KDUMP_COMMANDLINE=""
KDUMP_COMMANDLINE_APPEND="MAXCPUS=1 "
KDUMP_OPTIONS="--args-linux "
KDUMP_RUNLEVEL="1"
KDUMP_IMMEDIATE_REBOOT="yes"
KDUMP_TRANSFER=""
KDUMP_SAVEDIR="nfs:///nfsserver02:/dumps"
KDUMP_KEEP_OLD_DUMPS=5
KDUMP_FREE_DISK_SIZE=64MB
KDUMP_DUMPDEV=""
KDUMP_VERBOSE=3
KDUMP_DUMPLEVEL=0
KDUMP_DUMPFORMAT="ELF"
"""


def test_seed_tutorial_configuration(tmp_path: Path) -> None:
    cfg = load(tmp_path, SEED_CONFIG)
    assert cfg.warnings == []
    assert cfg["KDUMP_COMMANDLINE_APPEND"] == "MAXCPUS=1 "
    assert cfg["KEXEC_OPTIONS"] == "--args-linux "
    assert (cfg.savedir[0].scheme, cfg.savedir[0].host) == ("nfs", "nfsserver02")
    assert cfg.free_disk_size == 64 << 20
    assert cfg.dumpformat == "elf"


def test_only_the_effective_value_is_validated(tmp_path: Path) -> None:
    cfg = load(tmp_path, "KDUMP_DUMPLEVEL=99\nKDUMP_DUMPLEVEL=1\n")
    assert cfg.dumplevel == 1
    assert cfg.location("KDUMP_DUMPLEVEL").endswith(":2")


def test_unknown_directive_warns(tmp_path: Path) -> None:
    cfg = load(tmp_path, "\nKDUMP_FOO=1\nkdump_savedir=/x\n")
    path = tmp_path / "kdump"
    assert cfg.warnings == [
        f"{path}:2: unknown directive KDUMP_FOO (ignored)",
        f"{path}:3: unknown directive kdump_savedir (ignored)",
    ]
    assert "KDUMP_FOO" not in cfg


def test_savedir_unicode_digit_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config(None, ["KDUMP_SAVEDIR=ftp://h:²/x"])


def test_savedir_error_hides_password_with_slash() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["KDUMP_SAVEDIR=ftp://u:pa/ss@h/y"])
    assert "pa/ss" not in str(info.value)


def test_not_supported_names_the_location(tmp_path: Path) -> None:
    cfg = load(tmp_path, "\nKDUMP_DUMPFORMAT=zstd\n")
    err = cfg.not_supported("KDUMP_DUMPFORMAT", "format 'zstd'")
    assert isinstance(err, NotSupported) and err.exit_code == 9
    assert (
        str(err) == f"{tmp_path / 'kdump'}:2: KDUMP_DUMPFORMAT: format 'zstd' is not supported yet"
    )


# --- quoting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("X=plain", "plain"),
        ("X=", ""),
        ("X=''", ""),
        ('X=""', ""),
        ("X='two  words'", "two  words"),
        ('X="two  words"', "two  words"),
        ("X='$HOME \\n \"'", '$HOME \\n "'),
        ('X="a\\"b"', 'a"b'),
        ('X="back\\\\slash"', "back\\slash"),
        ('X="dollar \\$HOME"', "dollar $HOME"),
        ('X="tick \\`"', "tick `"),
        ('X="keep \\n and \\x"', "keep \\n and \\x"),
        ("X=a\\ b", "a b"),
        ("X=\\$\\'\\\"", "$'\""),
        ('X=\\"That\\\'s\\ impossible\\!\\"\\ he\\ said.', '"That\'s impossible!" he said.'),
        ("X=\"a\"'b'c", "abc"),
        ("X='it'\\''s'", "it's"),
        ("X=value # trailing comment", "value"),
        ("X=value\t# tab comment", "value"),
        ("X='a # b' # c", "a # b"),
        ('X="a # b"', "a # b"),
        ("X=a#b", "a#b"),
        ("X=#notacomment", "#notacomment"),
        ("export X=exported", "exported"),
        ("  X=indented  ", "indented"),
        ("X=cost$", "cost$"),
        ('X="cost $"', "cost $"),
        ("X='$(not run)'", "$(not run)"),
        ("X='`not run`'", "`not run`"),
        ('X="line1\nline2"', "line1\nline2"),
        ("X='line1\nline2'", "line1\nline2"),
        ('X="joined\\\ncontinued"', "joinedcontinued"),
        ("X=joined\\\ncontinued", "joinedcontinued"),
        ("X='no\\\njoin'", "no\\\njoin"),
        ("X=crlf\r", "crlf"),
        ("X=*", "*"),
        ("X=ünïcødé", "ünïcødé"),
    ],
)
def test_quoting(text: str, value: str) -> None:
    assert value_of(text + "\n") == value


def test_comments_and_blank_lines() -> None:
    text = "#!/bin/sh\n# comment\n\n   # indented comment\nA=1\n\n# end\n"
    assert [(a.name, a.value, a.line) for a in parse_sysconfig(text, "f")] == [("A", "1", 5)]


def test_expansion_of_earlier_names() -> None:
    text = 'BASE=/var\nA=$BASE/x\nB="${BASE}/y"\nC=\'$BASE\'\nKDUMP_VERBOSE="$KDUMP_VERBOSE"\n'
    got = {a.name: a.value for a in parse_sysconfig(text, "f", {"KDUMP_VERBOSE": "3"})}
    assert got == {"BASE": "/var", "A": "/var/x", "B": "/var/y", "C": "$BASE", "KDUMP_VERBOSE": "3"}


def test_expansion_in_a_real_file(tmp_path: Path) -> None:
    text = (
        "D=/srv/dumps\n"
        'KDUMP_SAVEDIR="file://$D"\n'
        'KDUMP_COMMANDLINE_APPEND="$KDUMP_COMMANDLINE_APPEND x"\n'
    )
    cfg = load(tmp_path, text)
    assert cfg.savedir[0].path == "/srv/dumps"
    assert cfg["KDUMP_COMMANDLINE_APPEND"] == " x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "A=$UNSET",
            "f:1: A: '$' at column 3 expands a name not set earlier in this file; "
            "write '\\$' (or single quotes) for a literal '$'",
        ),
        ("A=${X:-d}", "f:1: A: only $NAME and ${NAME} expansions are supported"),
        ("A=${X", "f:1: A: unterminated ${...}"),
        (
            "A=$1",
            "f:1: A: '$' at column 3 starts a special parameter ($1, $$, ...), "
            "which is not supported; write '\\$' for a literal '$'",
        ),
        (
            "A=x$$",
            "f:1: A: '$' at column 4 starts a special parameter ($1, $$, ...), "
            "which is not supported; write '\\$' for a literal '$'",
        ),
        ("A=$'x'", "f:1: A: bash $'...' quoting is not supported"),
        ("A='open", "f:1: A: unterminated single quote (opened on line 1)"),
        ('A="open\n\n', "f:1: A: unterminated double quote (opened on line 1)"),
        ("A=1; B=2", "f:1: A: ';' is not supported; put one assignment per line"),
        ("A=x y", "f:1: A: unexpected text after the value; quote values that contain spaces"),
        ("A=x|y", "f:1: A: unquoted '|' is not supported; quote the value"),
        ("A=>x", "f:1: A: unquoted '>' is not supported; quote the value"),
        (
            "echo hi",
            "f:1: 'echo' is not an assignment; expected NAME=value "
            "(the file is parsed, not run as a script)",
        ),
        ("=x", "f:1: expected NAME=value (the file is parsed, not run as a script)"),
        (
            "A+=x",
            "f:1: 'A' is not an assignment; expected NAME=value "
            "(the file is parsed, not run as a script)",
        ),
        ("\0", "f:1: NUL byte in the file"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sysconfig(text + "\n", "f")
    assert str(info.value) == message


@pytest.mark.parametrize(
    "line",
    [
        'KDUMP_SMTP_PASSWORD="Sup3r$ecretPw"',  # bash would have cut it to "Sup3r"
        'KDUMP_SMTP_PASSWORD="Sup3r${ecretPw}"',
        'KDUMP_SAVEDIR="ftp://dump:Tr0ub4dor$ecretPw@ftp.example.com/crash"',
        'KDUMP_S3_SECRET_KEY="wJalr$1ecretPw"',
        "KDUMP_SMTP_PASSWORD=~ecretPw",
        'KDUMP_TRANSFER="curl -u u:x$ecretPw ftp://h/"',
    ],
)
def test_syntax_errors_never_show_a_piece_of_the_value(tmp_path: Path, line: str) -> None:
    """A '$' or '~' inside a password is refused (the shell would expand it), but the error
    printed the name after it, most of the password, into the console and the journal."""
    msg = error(tmp_path, line + "\n")
    assert msg.startswith("FILE:1: ") and "column" in msg
    assert "ecret" not in msg


def test_multiline_values_keep_line_numbers(tmp_path: Path) -> None:
    text = (
        "# comment\n"  # 1
        'KDUMP_COMMANDLINE="root=/dev/sda1\n'  # 2
        "  quiet\n"  # 3
        '  console=ttyS0"\n'  # 4
        "KDUMP_TRANSFER='a\n"  # 5
        "b' # comment\n"  # 6
        "KDUMP_PRESCRIPT=x\\\n"  # 7
        "y\n"  # 8
        "KDUMP_DUMPLEVEL=99\n"  # 9
    )
    assert error(tmp_path, text) == "FILE:9: KDUMP_DUMPLEVEL: 99 is out of range; allowed: 0-31"
    cfg = load(tmp_path, text.replace("=99", "=1"))
    assert cfg["KDUMP_COMMANDLINE"] == "root=/dev/sda1\n  quiet\n  console=ttyS0"
    assert cfg.location("KDUMP_COMMANDLINE").endswith(":2")
    assert cfg.location("KDUMP_TRANSFER").endswith(":5")
    assert cfg.location("KDUMP_PRESCRIPT").endswith(":7")
    assert cfg["KDUMP_PRESCRIPT"] == "xy"
    assert cfg.location("KDUMP_DUMPLEVEL").endswith(":9")


def test_syntax_error_inside_multiline_value_names_its_own_line() -> None:
    text = 'A="one\ntwo\nthree $(id)\nfour"\n'
    with pytest.raises(ConfigError, match=r"^f:3: A: command substitution \$\(\.\.\.\)"):
        parse_sysconfig(text, "f")


# --- command substitution is rejected, never executed -------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        'KDUMP_TRANSFER="$(touch {m})"',
        "KDUMP_TRANSFER=$(touch {m})",
        'KDUMP_TRANSFER="`touch {m}`"',
        "KDUMP_TRANSFER=`touch {m}`",
        "KDUMP_TRANSFER=x$((1+1))",
        'KDUMP_SAVEDIR="file:///tmp/$(touch {m})"',
    ],
)
def test_command_substitution_rejected_not_run(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "executed"
    msg = error(tmp_path, "# x\n" + template.format(m=marker) + "\n")
    assert msg.startswith("FILE:2: KDUMP_")
    assert "command substitution" in msg and "never executed" in msg
    assert not marker.exists()


def test_command_substitution_in_single_quotes_is_literal(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    cfg = load(tmp_path, f"KDUMP_TRANSFER='$(touch {marker})'\n")
    assert cfg.transfer == f"$(touch {marker})"
    assert not marker.exists()


# --- alias and overrides ------------------------------------------------------------------------


def test_kdump_options_alias(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'KDUMP_OPTIONS="--args-linux "\n')
    assert cfg["KEXEC_OPTIONS"] == "--args-linux "
    assert cfg["KDUMP_OPTIONS"] == "--args-linux "
    assert cfg.location("KEXEC_OPTIONS").endswith(":1")
    assert cfg.warnings == []
    assert "KDUMP_OPTIONS" not in list(cfg)
    assert load_config(None, ["KDUMP_OPTIONS=-s"])["KEXEC_OPTIONS"] == "-s"


def test_override_wins_over_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "KDUMP_DUMPLEVEL=1\nKDUMP_SAVEDIR=file:///a\n",
        ("KDUMP_SAVEDIR=file:///b  file:///c", "KDUMP_DUMPLEVEL=0"),
    )
    assert [t.path for t in cfg.savedir] == ["/b", "/c"]
    assert cfg.location("KDUMP_SAVEDIR") == "--set KDUMP_SAVEDIR"
    assert cfg.dumplevel == 0


def test_override_fixes_a_bad_file_value(tmp_path: Path) -> None:
    cfg = load(tmp_path, "KDUMP_DUMPLEVEL=99\n", ("KDUMP_DUMPLEVEL=3",))
    assert cfg.dumplevel == 3


def test_override_value_is_literal() -> None:
    cfg = load_config(None, ["KDUMP_TRANSFER='$(x)' \"y\""])
    assert cfg.transfer == "'$(x)' \"y\""


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("KDUMP_SAVEDRI=/x", "--set KDUMP_SAVEDRI: unknown directive; did you mean KDUMP_SAVEDIR?"),
        ("ZZZ=1", "--set ZZZ: unknown directive"),
        ("KDUMP_SAVEDIR", "--set KDUMP_SAVEDIR: expected NAME=VALUE"),
        ("=x", "--set argument: expected NAME=VALUE"),
        ("KDUMP_DUMPLEVEL=x", "--set KDUMP_DUMPLEVEL: 'x' is not an integer; allowed: 0-31"),
        ("KDUMP_OPTIONS=-s", None),
    ],
)
def test_override_errors(item: str, message: str | None) -> None:
    if message is None:
        load_config(None, [item])
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    assert str(info.value) == message


# --- redaction ----------------------------------------------------------------------------------


def test_redacted_lines(tmp_path: Path) -> None:
    text = (
        "KDUMP_SAVEDIR='ftp://bob:s3cr%40t@host/d  cifs://al:pw2@srv/share/x sftp://u@h/p'\n"
        "KDUMP_SMTP_PASSWORD='mailpw'\n"
        "KDUMP_COMMANDLINE='a \"b\" $c `d` \\e'\n"
    )
    cfg = load(tmp_path, text)
    lines = cfg.redacted_lines()
    out = "\n".join(lines)
    for secret in ("s3cr", "pw2", "mailpw"):
        assert secret not in out
    assert lines[0] == (
        'KDUMP_SAVEDIR="ftp://bob:***@host/d  cifs://al:***@srv/share/x sftp://u@h/p"'
    )
    assert 'KDUMP_SMTP_PASSWORD="***"' in lines
    assert 'KDUMP_COMMANDLINE="a \\"b\\" \\$c \\`d\\` \\\\e"' in lines
    assert [line.split("=")[0] for line in lines] == [d.name for d in DIRECTIVES]
    assert "s3cr" not in repr(cfg) and "mailpw" not in repr(cfg)
    assert "mailpw" not in repr(cfg.savedir)


def test_redacted_lines_read_back(tmp_path: Path) -> None:
    text = "KDUMP_COMMANDLINE='multi\nline \"q\" $x `y` \\\\z'\nKDUMP_DUMPFORMAT=zstd\n"
    cfg = load(tmp_path, text)
    again = load(tmp_path, "\n".join(cfg.redacted_lines()) + "\n")
    assert dict(again) == dict(cfg)


def test_empty_smtp_password_is_shown_empty() -> None:
    assert 'KDUMP_SMTP_PASSWORD=""' in load_config(None).redacted_lines()


# --- properties ---------------------------------------------------------------------------------

values = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_categories=("Cs",),
        exclude_characters="\0",
    ),
    max_size=40,
)


def dquote(v: str) -> str:
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in v) + '"'


def squote(v: str) -> str:
    return "'" + v.replace("'", "'\\''") + "'"


@given(v=values, comment=st.booleans())
def test_round_trip_double_quotes(v: str, comment: bool) -> None:
    text = f"# before\nNAME={dquote(v)}" + (" # after\n" if comment else "\n") + "NEXT=1\n"
    first, second = parse_sysconfig(text, "f")
    assert (first.name, first.value, first.line) == ("NAME", v, 2)
    assert second.line == 3 + v.count("\n")


@given(v=values)
def test_round_trip_single_quotes(v: str) -> None:
    (a,) = parse_sysconfig(f"export NAME={squote(v)}\n", "f")
    assert a.value == v


@given(v=values)
def test_round_trip_through_redacted_lines(v: str) -> None:
    assume(redact(v) == v)  # "x:y@z" is shown as "x:***@z" in every value
    # KDUMP_PRESCRIPT: free text (a command line must have balanced quotes)
    cfg = load_config(None, [f"KDUMP_PRESCRIPT={v}"])
    (line,) = [x for x in cfg.redacted_lines() if x.startswith("KDUMP_PRESCRIPT=")]
    (a,) = parse_sysconfig(line, "f")
    assert a.value == v


_TOKENS = list("AB_=$'\"\\`#(){}; \t\n\rx1-:/@é") + [
    "KDUMP_DUMPLEVEL=",
    "KDUMP_SAVEDIR=",
    "KDUMP_FREE_DISK_SIZE=",
    "export ",
    "ftp://",
    "file://",
]
shellish = st.lists(st.sampled_from(_TOKENS), max_size=30).map("".join)


@settings(max_examples=300)
@given(text=st.one_of(shellish, st.text(max_size=80)))
def test_parser_only_raises_config_error(text: str) -> None:
    try:
        parse_sysconfig(text, "f")
    except ConfigError:
        pass


@settings(max_examples=100)
@given(text=shellish)
def test_load_only_raises_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "kdump"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path))
    except ConfigError:
        pass


def test_s3_secret_redacted(tmp_path: Path) -> None:
    text = (
        "KDUMP_SAVEDIR='s3://AKID:s3-Secret%2Fkey@store:9000/dumps/fleet'\n"
        "KDUMP_S3_ACCESS_KEY='AKIDPLAIN'\n"
        "KDUMP_S3_SECRET_KEY='wJalr/K7MDENG+bPxRfiCY'\n"
        "KDUMP_S3_CA_BUNDLE=/etc/kdump/ca.pem\n"
    )
    cfg = load(tmp_path, text)
    out = "\n".join(cfg.redacted_lines())
    for secret in ("s3-Secret", "wJalr", "K7MDENG"):
        assert secret not in out and secret not in repr(cfg) and secret not in repr(cfg.savedir)
    assert 'KDUMP_SAVEDIR="s3://AKID:***@store:9000/dumps/fleet"' in out
    assert 'KDUMP_S3_SECRET_KEY="***"' in out
    assert 'KDUMP_S3_ACCESS_KEY="AKIDPLAIN"' in out
    assert 'KDUMP_S3_REGION="us-east-1"' in out  # the default


def test_s3_secret_not_in_transport_settings_repr(tmp_path: Path) -> None:
    from kdump_capture.cli import transport_settings

    cfg = load(tmp_path, "KDUMP_S3_SECRET_KEY='wJalr/K7MDENG+bPxRfiCY'\n")
    settings = transport_settings(cfg)
    assert settings.extra["s3_secret_key"] == "wJalr/K7MDENG+bPxRfiCY"
    assert "wJalr" not in repr(settings)


@pytest.mark.parametrize(
    "line, prefix",
    [
        ("KDUMP_SSH_IDENTITY=~/.ssh/id_ed25519", "~"),
        ("KDUMP_SSH_IDENTITY=~root/.ssh/id_rsa", "~NAME"),
        ("KDUMP_SSH_IDENTITY=/etc/key:~/key", "~"),
        ("export KDUMP_SSH_IDENTITY=~", "~"),
    ],
)
def test_a_tilde_the_shell_would_expand_is_an_error(tmp_path: Path, line: str, prefix: str):
    """bash expands an unquoted "~" at the start of a value and after each ":"; we kept it
    literal, so KDUMP_SSH_IDENTITY=~/.ssh/id_rsa became /root/.ssh/~/.ssh/id_rsa at the
    crash (exit 7). Where the shell would expand it, it is now a clear error."""
    msg = error(tmp_path, line + "\n")
    assert msg.startswith("FILE:1: KDUMP_SSH_IDENTITY: ")
    assert f"unquoted '{prefix}' at column " in msg and "would be a home directory" in msg


@pytest.mark.parametrize(
    "line, value",
    [
        ('KDUMP_SSH_IDENTITY="~/.ssh/id"', "~/.ssh/id"),  # quoted: the shell keeps it too
        ("KDUMP_SSH_IDENTITY=\\~/x", "~/x"),
        ("KDUMP_SSH_IDENTITY=a~b", "a~b"),
        ("KDUMP_SAVEDIR=ftp://u:~pw@host/x", "ftp://u:~pw@host/x"),  # "~pw@host" is no login
    ],
)
def test_a_tilde_the_shell_keeps_is_kept(tmp_path: Path, line: str, value: str):
    cfg = load(tmp_path, line + "\n")
    assert value in (cfg["KDUMP_SSH_IDENTITY"], cfg["KDUMP_SAVEDIR"])
