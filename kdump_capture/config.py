"""Read /etc/sysconfig/kdump safely (parsed like sh, never executed) into a validated Config."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

from .errors import ConfigError, NotSupported, UrlError
from .record import Record
from .urls import Target, parse_savedir, redact

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import NoReturn

DEFAULT_PATH = "/etc/sysconfig/kdump"

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_RE = re.compile(r"[+-]?[0-9]+")
# Bare number = megabytes (SUSE's unit); K/M/G/T are binary multiples, as in df and makedumpfile.
_SIZE_RE = re.compile(r"([0-9]+)\s*(?:([KMGT])(?:I?B)?)?", re.I)
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BOOLS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_NETCONFIG_RE = re.compile(r"(?:auto|[^:\s/]+:(?:static|dhcp|dhcp4|dhcp6|auto6|auto))(?::force)?")
_HOST_KEY_RE = re.compile(r"\*|[A-Za-z0-9@.-]+\s+[A-Za-z0-9+/]+={0,2}(?:\s+.*)?", re.S)
# A name for dump directories: what a host name may hold, and no more (it becomes a path).
# What follows an unquoted "~" up to a "/" or ":" (bash's tilde-prefix), and a login name.
_TILDE_PREFIX = re.compile(r"[^/:\s;'\"$`\\]*")
_LOGIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DUMPFORMATS = ("none", "elf", "compressed", "lzo", "snappy", "zstd", "raw")
_KDUMPTOOL_FLAGS = ("NOSPARSE", "SPLIT", "SINGLE", "NOSPLIT", "XENALLDOMAINS")


class _Invalid(Exception):
    """A value does not fit its kind; carries the problem, not the location."""


# --- kinds: how a raw string value is checked and converted ------------------------------------


class Kind(Record):
    """How a directive's raw string is validated and converted to its typed value.

    ``convert`` raises ``_Invalid(problem)``; ``allowed`` completes the error message.
    ``empty_is_default``: an empty value means "use the default" (SUSE 2.x behaviour).
    """

    __slots__ = ("name", "allowed", "convert", "empty_is_default")

    def __init__(
        self,
        name: str,
        allowed: str,
        convert: Callable[[str], object],
        empty_is_default: bool = True,
    ) -> None:
        self.name = name
        self.allowed = allowed
        self.convert = convert
        self.empty_is_default = empty_is_default


def _text(value: str) -> str:
    return value


def _words(value: str) -> tuple[str, ...]:
    return tuple(value.split())


def _bool(value: str) -> bool:
    try:
        return _BOOLS[value.strip().lower()]
    except KeyError:
        raise _Invalid(f"{value!r} is not a yes/no value") from None


def _size(value: str) -> int:
    m = _SIZE_RE.fullmatch(value.strip())
    if not m:
        raise _Invalid(f"{value!r} is not a size")
    number, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return number * _SIZE_UNITS[unit]


def _int_kind(lo: int, hi: int | None, allowed: str | None = None) -> Kind:
    def convert(value: str) -> int:
        text = value.strip()
        if not _INT_RE.fullmatch(text):
            raise _Invalid(f"{value!r} is not an integer")
        n = int(text)
        if n < lo or (hi is not None and n > hi):
            raise _Invalid(f"{n} is out of range")
        return n

    return Kind("int", allowed or (f"{lo}-{hi}" if hi is not None else f"{lo} or more"), convert)


def _enum_kind(*choices: str) -> Kind:
    canonical = {c.lower(): c.lower() for c in choices}

    def convert(value: str) -> str:
        try:
            return canonical[value.strip().lower()]
        except KeyError:
            raise _Invalid(f"{value!r} is not a known value") from None

    return Kind("enum", ", ".join(choices), convert)


def _pattern_kind(
    name: str, pattern: re.Pattern[str], allowed: str, empty_is_default: bool
) -> Kind:
    def convert(value: str) -> str:
        if value and not pattern.fullmatch(value.strip()):
            raise _Invalid(f"{value!r} is not valid")
        return value.strip()

    return Kind(name, allowed, convert, empty_is_default)


def _kernel_cmdline(value: str) -> str:
    from .load.kexec import kernel_words  # the very splitter `load` uses

    try:
        kernel_words(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


def _kexec_options(value: str) -> str:
    from .load.kexec import kexec_words

    try:
        kexec_words(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


def _recipients(value: str) -> tuple:
    if not value.strip():
        return ()
    from .age import parse_recipients  # imports cryptography: only when encryption is on

    try:
        return parse_recipients(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _flags(value: str) -> tuple[str, ...]:
    flags = tuple(f.upper() for f in re.split(r"[\s,]+", value.strip()) if f)
    bad = [f for f in flags if f not in _KDUMPTOOL_FLAGS]
    if bad:
        raise _Invalid(f"unknown flag {bad[0]!r}")
    return flags


STR = Kind("str", "any text", _text, empty_is_default=False)
WORDS = Kind("words", "space-separated words", _words, empty_is_default=False)
BOOL = Kind("bool", "yes, no, true, false, 1, 0", _bool)
SIZE = Kind("size", "megabytes as 64, 64M, 64MB, 512K, 1G, 1GB (0 disables the check)", _size)
# Converted by Config itself (it needs parse_savedir's warnings); listed here for the message.
URLS = Kind(
    "url-list",
    "space-separated URLs: file:///path, nfs://host/path, cifs://[user[:pass]@]host/share/path, "
    "ftp://[user[:pass]@]host[:port]/path, sftp|ssh|scp://[user@]host[:port]/path, "
    "s3|s3+http://[key[:secret]@]host[:port]/bucket[/prefix]",
    _text,
)
RECIPIENTS = Kind(
    "recipients",
    "empty (no encryption), or age recipients separated by blanks: age1... X25519 keys, "
    "'ssh-ed25519 AAAA...' or 'ssh-rsa AAAA...' public keys (as age -r takes them)",
    _recipients,
    empty_is_default=False,
)
FLAGS = Kind("flags", ", ".join(_KDUMPTOOL_FLAGS), _flags, empty_is_default=False)
CMDLINE = Kind(
    "cmdline",
    'kernel options separated by blanks; double quotes ("...") must be balanced',
    _kernel_cmdline,
    empty_is_default=False,
)
KEXEC_ARGS = Kind(
    "kexec-args",
    "kexec options as on a shell command line; quotes must be balanced",
    _kexec_options,
    empty_is_default=False,
)
NETCONFIG = _pattern_kind(
    "netconfig",
    _NETCONFIG_RE,
    "auto, or IFACE:MODE with MODE static|dhcp|dhcp4|dhcp6|auto6|auto"
    ", optionally followed by :force",
    empty_is_default=True,  # SUSE 2.x: empty means auto
)
HOST_KEY = _pattern_kind(
    "host-key",
    _HOST_KEY_RE,
    "empty (use known_hosts), * (do not check), or '<type> <base64 key>'",
    empty_is_default=False,
)
HOSTNAME = _pattern_kind(
    "hostname",
    _HOSTNAME_RE,
    "empty (automatic), or up to 128 letters, digits, '.', '_' and '-'",
    empty_is_default=True,
)

# Goes into the signature's credential scope and a header: a newline there split a header.
S3_REGION = _pattern_kind(
    "region",
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"),
    "a region name such as us-east-1 (letters, digits, '_', '.' and '-')",
    empty_is_default=True,
)

# --- the directive table -----------------------------------------------------------------------


class Directive(Record):
    """One /etc/sysconfig/kdump variable: its default (as a raw string), kind and meaning."""

    __slots__ = ("name", "default", "kind", "doc", "side", "secret")

    def __init__(
        self,
        name: str,
        default: str,
        kind: Kind,
        doc: str,
        # "dump": used while saving; "load": used when loading the capture kernel
        side: str = "dump",
        secret: bool = False,
    ) -> None:
        self.name = name
        self.default = default
        self.kind = kind
        self.doc = doc
        self.side = side
        self.secret = secret


_d = Directive

# Defaults follow the 2009 seed tutorial where it names one, not SUSE's current template.
# fmt: off
DIRECTIVES: tuple[Directive, ...] = (
    # dump side
    _d("KDUMP_SAVEDIR", "file:///var/log/dump", URLS, "Target URL(s), tried in order"),
    _d("KDUMP_KEEP_OLD_DUMPS", "5", _int_kind(-2, None, "0 (keep all), -1 or -2 (delete all "
       "before writing), N>0 (keep N older dumps)"), "How many older dumps to keep"),
    _d("KDUMP_FREE_DISK_SIZE", "64", SIZE, "Free space to leave on the target (MB by default)"),
    _d("KDUMP_DUMPLEVEL", "0", _int_kind(0, 31), "Page-exclusion bitmask (makedumpfile -d)"),
    _d("KDUMP_DUMPFORMAT", "ELF",
       _enum_kind("none", "ELF", *_DUMPFORMATS[2:]),
       "Dump file format"),
    _d("KDUMP_CHECKSUM", "xxh3", _enum_kind("xxh3", "sha256"), "Checksum recorded in the "
       "manifest for every file: xxh3 (XXH3-128), or sha256 (~10x the CPU; sha256sum checks it)"),
    _d("KDUMP_IMMEDIATE_REBOOT", "yes", BOOL, "Reboot as soon as the dump is saved"),
    _d("KDUMP_VERBOSE", "3", _int_kind(0, 31), "Bitmask: 1 cmdline to syslog, 2 progress, "
       "4 cmdline to stdout, 8 debug transfer, 16 debug load"),
    _d("KDUMP_RUNLEVEL", "1", _enum_kind("1", "2", "3", "5", "s", "S"),
       "Run level of the capture kernel (historical)"),
    _d("KDUMP_DUMPDEV", "", STR, "Raw dump device; copied to KDUMP_SAVEDIR later (historical)"),
    _d("KDUMP_DUMPDEV_OVERWRITE", "no", BOOL, "Let a new crash overwrite a complete dump on "
       "KDUMP_DUMPDEV that was not recovered yet (default: keep it, refuse the new one)"),
    _d("KDUMP_TRANSFER", "", STR, "Custom command replacing the built-in save"),
    _d("KDUMP_PRESCRIPT", "", STR, "Command run before saving"),
    _d("KDUMP_POSTSCRIPT", "", STR, "Command run after saving"),
    _d("KDUMP_CONTINUE_ON_ERROR", "true", BOOL, "Go on to the next step after an error"),
    _d("KDUMP_REQUIRED_PROGRAMS", "", WORDS, "Extra programs to put into the capture initramfs"),
    _d("KDUMP_COPY_KERNEL", "no", BOOL, "Also save System.map and the kernel image"),
    _d("KDUMPTOOL_FLAGS", "", FLAGS, "Legacy kdumptool flags (deprecated)"),
    _d("MAKEDUMPFILE_OPTIONS", "", STR, "Extra makedumpfile options"),
    _d("KDUMP_CPUS", "1", _int_kind(0, None, "0 (all) or a number of CPUs"),
       "CPUs for the capture kernel and dump writer"),
    _d("KDUMP_NETCONFIG", "auto", NETCONFIG, "Network setup in the capture kernel"),
    # at most a day: a larger value overflowed time_t in the socket layer (a target error)
    _d("KDUMP_NET_TIMEOUT", "30", _int_kind(0, 86400), "Seconds to wait for the network"),
    _d("KDUMP_SAVE_TIMEOUT", "0", _int_kind(0, None, "0 (automatic: 8 x KDUMP_NET_TIMEOUT "
       "+ 60) or seconds"), "Seconds without progress before /init stops the save"),
    _d("KDUMP_SMTP_SERVER", "", STR, "SMTP server for notification mail"),
    _d("KDUMP_SMTP_USER", "", STR, "SMTP user name"),
    _d("KDUMP_SMTP_PASSWORD", "", STR, "SMTP password", secret=True),
    _d("KDUMP_NOTIFICATION_TO", "", STR, "Notification mail recipient"),
    _d("KDUMP_NOTIFICATION_CC", "", WORDS, "Notification mail copies (space-separated)"),
    _d("KDUMP_HOSTNAME", "", HOSTNAME, "This host's name in dump directory names on network "
       "targets (empty: /etc/hostname.kdump, host name, machine-id, MAC address)"),
    _d("KDUMP_HOST_KEY", "", HOST_KEY, "SSH host key of the target"),
    _d("KDUMP_SSH_IDENTITY", "", WORDS, "SSH private keys (space-separated)"),
    _d("KDUMP_S3_ACCESS_KEY", "", STR, "S3 access key id (when the URL names none)"),
    _d("KDUMP_S3_SECRET_KEY", "", STR, "S3 secret access key", secret=True),
    _d("KDUMP_S3_REGION", "us-east-1", S3_REGION, "S3 region used in signatures"),
    _d("KDUMP_S3_CA_BUNDLE", "", STR, "PEM file of extra CAs trusted for s3:// (https)"),
    _d("KDUMP_ENCRYPT_TO", "", RECIPIENTS, "Encrypt vmcore and dmesg.txt (age) to these "
       "public keys"),
    _d("KDUMP_ENCRYPT_SUMMARY", "no", BOOL, "With KDUMP_ENCRYPT_TO: also keep the crash "
       "summary in plain text in README.txt and manifest.json"),
    # load side
    _d("KDUMP_KERNELVER", "", STR, "Capture kernel version or image (empty: auto)", side="load"),
    _d("KDUMP_COMMANDLINE", "", CMDLINE, "Capture kernel command line (empty: derived)",
       side="load"),
    _d("KDUMP_COMMANDLINE_APPEND", "", CMDLINE, "Appended to the capture command line",
       side="load"),
    _d("KEXEC_OPTIONS", "", KEXEC_ARGS, "Extra kexec options (alias KDUMP_OPTIONS)",
       side="load"),
    _d("KDUMP_AUTO_RESIZE", "no", BOOL, "Resize the crash kernel reservation (ppc64)",
       side="load"),
    _d("KDUMP_FADUMP", "no", BOOL, "Use firmware-assisted dump (ppc64)", side="load"),
    _d("KDUMP_FADUMP_SHELL", "no", BOOL, "Shell after a firmware-assisted dump", side="load"),
    _d("FADUMP_COMMANDLINE_APPEND", "", CMDLINE, "Appended for firmware-assisted dump",
       side="load"),
    # SUSE 2.x defaults these to "auto" and "true"; this engine does not edit the boot loader,
    # so the defaults are off and turning either on fails with exit 9 (features.LOAD_UNSUPPORTED).
    _d("KDUMP_CRASHKERNEL", "", STR, "crashkernel= reservation to write into the boot loader",
       side="load"),
    _d("KDUMP_UPDATE_BOOTLOADER", "false", BOOL, "Write crashkernel= into the boot loader",
       side="load"),
)
# fmt: on

BY_NAME: dict[str, Directive] = {d.name: d for d in DIRECTIVES}
# The 2009 seed tutorial writes KEXEC_OPTIONS as KDUMP_OPTIONS.
ALIASES: dict[str, str] = {"KDUMP_OPTIONS": "KEXEC_OPTIONS"}


# --- the shell-subset parser -------------------------------------------------------------------


class Assignment(Record):
    """``name=value`` as found at ``line`` (the line where the name starts)."""

    __slots__ = ("name", "value", "line")

    def __init__(
        self,
        name: str,
        value: str,
        line: int,
    ) -> None:
        self.name = name
        self.value = value
        self.line = line


# No directive needs more than a few KiB; the caps keep "A=$A$A" repeated (each line doubles
# the value: 26 lines took 2.1 GB) and huge or endless files (--config /dev/zero) from using
# the little memory a capture kernel has. Checked while expanding, before the memory is used.
MAX_VALUE = 64 << 10  # one value, after expansion
MAX_VALUES = 1 << 20  # all values of a file together
MAX_FILE = 1 << 20  # the file itself

_BLANKS = " \t\r"  # \r: a file edited on Windows still parses
_WORD_END = _BLANKS + "\n"
_OPERATORS = ";&|<>()"


class _Lexer:
    """Reads sysconfig text statement by statement, keeping the line number current."""

    def __init__(self, text: str, filename: str, scope: Mapping[str, str]) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self.line = 1
        self.scope = scope  # fallback for $NAME not assigned earlier in the file
        self.assigned: dict[str, str] = {}
        self.current: str | None = None  # the name whose value is being read
        self.grown = 0  # characters expansions and quotes added to the current value
        self.total = 0  # characters of all values so far

    def fail(self, problem: str) -> NoReturn:
        where = f"{self.filename}:{self.line}"
        if self.current is not None:
            where += f": {self.current}"
        raise ConfigError(f"{where}: {problem}")

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def advance(self) -> str:
        ch = self.text[self.pos]
        self.pos += 1
        if ch == "\n":
            self.line += 1
        return ch

    def skip_blanks(self) -> None:
        while True:
            ch = self.peek()
            if ch and ch in _BLANKS:
                self.pos += 1
            elif ch == "\\" and (n := self.line_end(1)):
                self.pos += n
                self.advance()
            else:
                return

    def line_end(self, offset: int) -> int:
        """Characters of the line end at ``offset``: 1 for \\n, 2 for \\r\\n, else 0.

        A backslash before \\r\\n continues the line as before \\n: a file saved on
        Windows takes \\r as a blank everywhere else, and bash there would keep the
        backslash and \\r in the value and run the next line as a command.
        """
        i = self.pos + offset
        if self.text.startswith("\n", i):
            return 1
        return 2 if self.text.startswith("\r\n", i) else 0

    def skip_comment(self) -> None:
        while self.peek() not in ("", "\n"):
            self.pos += 1

    def read_name(self) -> str | None:
        m = _NAME_RE.match(self.text, self.pos)
        if not m:
            return None
        self.pos = m.end()
        return m.group()

    def statements(self) -> Iterator[Assignment]:
        while True:
            self.current = None
            self.skip_blanks()
            ch = self.peek()
            if ch == "":
                return
            if ch == "\n":
                self.advance()
                continue
            if ch == "#":
                self.skip_comment()
                continue
            yield from self.statement()

    def statement(self) -> Iterator[Assignment]:
        line = self.line
        name = self.read_name()
        if name == "export" and self.peek() in tuple(_BLANKS):
            self.skip_blanks()
            yield from self.export()
            return
        if name is None or self.peek() != "=":
            shown = f"{name!r} is not an assignment; " if name else ""
            self.fail(f"{shown}expected NAME=value (the file is parsed, not run as a script)")
        self.pos += 1
        yield self.assignment(name, line)

    def assignment(self, name: str, line: int) -> Assignment:
        """The value after ``NAME=`` up to the end of the statement."""
        self.current = name
        self.grown = 0
        value = self.read_word()
        self.grow(0, len(value))  # literal characters count too
        self.total += len(value)
        if self.total > MAX_VALUES:
            self.fail(f"the values of this file add up to more than {MAX_VALUES >> 10} KiB")
        self.assigned[name] = value
        self.end_of_statement()
        return Assignment(name, value, line)

    def grow(self, n: int, size: int | None = None) -> None:
        """Account ``n`` more characters of the current value (or its final ``size``)."""
        self.grown += n
        if (size if size is not None else self.grown) > MAX_VALUE:
            self.fail(f"the value is longer than {MAX_VALUE >> 10} KiB (after expansion)")

    def export(self) -> Iterator[Assignment]:
        """``export NAME=value`` assigns; ``export NAME`` alone changes nothing for us."""
        line = self.line
        name = self.read_name()
        if name is None:
            self.fail("expected a name after 'export'")
        if self.peek() == "=":
            self.pos += 1
            yield self.assignment(name, line)
            return
        self.skip_blanks()
        if self.peek() not in ("", "\n", "#"):
            self.fail("put one 'export NAME' per line")
        self.end_of_statement()

    def end_of_statement(self) -> None:
        self.skip_blanks()
        ch = self.peek()
        if ch == "#":
            self.skip_comment()
        elif ch == ";":
            self.fail("';' is not supported; put one assignment per line")
        elif ch not in ("", "\n"):
            self.fail("unexpected text after the value; quote values that contain spaces")

    def read_word(self) -> str:
        out: list[str] = []
        tilde_here = True  # bash expands an unquoted "~" at the start and after each ":"
        while True:
            ch = self.peek()
            if ch == "" or ch in _WORD_END or ch == ";":
                return "".join(out)
            if ch in _OPERATORS:
                self.fail(f"unquoted {ch!r} is not supported; quote the value")
            if ch == "~" and tilde_here:
                self.check_tilde()
            tilde_here = ch == ":"
            if ch == "\\":
                self.pos += 1
                nxt = self.peek()
                if n := self.line_end(0):
                    self.pos += n - 1
                    self.advance()  # line continuation
                elif nxt == "":
                    out.append("\\")
                else:
                    out.append(self.advance())
            elif ch == "'":
                out.append(self.read_single())
            elif ch == '"':
                out.append(self.read_double())
            elif ch == "$":
                out.append(self.read_dollar(quoted=False))
            elif ch == "`":
                self.fail_command_substitution("`...`")
            else:
                out.append(self.advance())

    def check_tilde(self) -> None:
        """Fail where bash would expand an unquoted tilde (``~``, ``~/x``, ``~user/x``) to
        a home directory: we do not, so the value would silently mean another path."""
        m = _TILDE_PREFIX.match(self.text, self.pos + 1)
        prefix = m.group() if m else ""
        if prefix in ("", "+", "-") or _LOGIN_RE.fullmatch(prefix):
            # A login name is not shown: an unquoted password may start with "~".
            shown = prefix if prefix in ("", "+", "-") else "NAME"
            self.fail(
                f"unquoted '~{shown}' at column {self.column()} would be a home directory in "
                "the shell; write the path out, or quote the '~' to mean it"
            )

    def read_single(self) -> str:
        start = self.line
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end < 0:
            self.line = start
            self.fail(f"unterminated single quote (opened on line {start})")
        self.grow(end - self.pos)
        value = self.text[self.pos : end]
        self.line += value.count("\n")
        self.pos = end + 1
        return value

    def read_double(self) -> str:
        start = self.line
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "":
                self.line = start
                self.fail(f"unterminated double quote (opened on line {start})")
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "\\":
                nxt = self.peek(1)
                if n := self.line_end(1):
                    self.pos += n
                    self.advance()
                elif nxt in ('"', "\\", "$", "`"):
                    self.pos += 2
                    out.append(nxt)
                else:  # POSIX: the backslash stays when it escapes nothing
                    self.pos += 1
                    out.append("\\")
            elif ch == "$":
                out.append(self.read_dollar(quoted=True))
            elif ch == "`":
                self.fail_command_substitution("`...`")
            else:
                out.append(self.advance())

    def read_dollar(self, quoted: bool) -> str:
        nxt = self.peek(1)
        if nxt == "(":
            self.fail_command_substitution("$(...)")
        if nxt == "{":
            end = self.text.find("}", self.pos + 2)
            inner = self.text[self.pos + 2 : end] if end >= 0 else ""
            if end < 0 or "\n" in inner:
                self.fail("unterminated ${...}")
            if not _NAME_RE.fullmatch(inner):
                self.fail("only $NAME and ${NAME} expansions are supported")
            column = self.column()
            self.pos = end + 1
            return self.expand(inner, column)
        m = _NAME_RE.match(self.text, self.pos + 1)
        if m:
            column = self.column()
            self.pos = m.end()
            return self.expand(m.group(), column)
        if nxt and (nxt.isdigit() or nxt in "@*#?-$!"):
            # The character is not shown: it may be part of a password ("pa$1word").
            self.fail(
                f"'$' at column {self.column()} starts a special parameter ($1, $$, ...), "
                "which is not supported; write '\\$' for a literal '$'"
            )
        if not quoted and nxt in ("'", '"'):
            self.fail(f"bash ${nxt}...{nxt} quoting is not supported")
        self.pos += 1
        return "$"

    def column(self) -> int:
        """The column (from 1) of the current position in its line."""
        return self.pos - self.text.rfind("\n", 0, self.pos)

    def expand(self, name: str, column: int) -> str:
        if name in self.assigned:
            value = self.assigned[name]
        elif name in self.scope:
            value = self.scope[name]
        else:
            # The name is not shown: in "Sup3r$ecret" or "ftp://u:pa$word@host/x" it is part
            # of a password (which the shell would have cut short).
            self.fail(
                f"'$' at column {column} expands a name not set earlier in this file; "
                "write '\\$' (or single quotes) for a literal '$'"
            )
        self.grow(len(value))  # before the caller copies it into the value
        return value

    def fail_command_substitution(self, form: str) -> NoReturn:
        self.fail(f"command substitution {form} is not allowed: the file is parsed, never executed")


def parse_sysconfig(
    text: str, filename: str = "<config>", scope: Mapping[str, str] | None = None
) -> list[Assignment]:
    """Parse shell-style ``NAME=value`` text without executing anything.

    Supports comments, ``export``, single/double quotes, backslash escapes, line
    continuations, concatenation and ``$NAME``/``${NAME}`` of names assigned earlier
    (or found in ``scope``); a leading UTF-8 byte-order mark is skipped. Anything else a
    shell would run raises ConfigError ``FILE:LINE: ...``. Values are never echoed in
    errors (they may be passwords).
    """
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"{filename}:{line}: NUL byte in the file")
    # A byte-order mark, as Windows editors save UTF-8 (like their \r\n, which the lexer
    # takes as blanks): not part of the first name.
    text = text.removeprefix("\ufeff")
    return list(_Lexer(text, filename, scope or {}).statements())


# --- loading and the Config object -------------------------------------------------------------


def load_config(path: str | None = DEFAULT_PATH, overrides: Iterable[str] = ()) -> Config:
    """Read the sysconfig file (``None``: defaults only), apply ``--set NAME=VALUE`` overrides,
    and validate every effective value.

    Raises ConfigError naming ``FILE:LINE`` or ``--set NAME``. A missing file is not an
    error: the defaults apply and a warning is recorded in ``cfg.warnings``.
    """
    warnings: list[str] = []
    raw = {d.name: d.default for d in DIRECTIVES}
    where = dict.fromkeys(raw, "default")
    if path is not None:
        path = os.fspath(path)
        text = _read(path, warnings)
        if text is not None:
            scope = {**raw, **{alias: raw[name] for alias, name in ALIASES.items()}}
            for a in parse_sysconfig(text, path, scope):
                name = ALIASES.get(a.name, a.name)
                if name not in BY_NAME:
                    warnings.append(f"{path}:{a.line}: unknown directive {a.name} (ignored)")
                    continue
                raw[name] = a.value
                where[name] = f"{path}:{a.line}"
    for item in overrides:
        given, sep, value = item.partition("=")
        if not sep or not _NAME_RE.fullmatch(given):
            shown = given if _NAME_RE.fullmatch(given) else "argument"
            raise ConfigError(f"--set {shown}: expected NAME=VALUE")
        name = ALIASES.get(given, given)
        if name not in BY_NAME:
            import difflib  # only for a misspelled name

            close = difflib.get_close_matches(name, list(BY_NAME) + list(ALIASES), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--set {given}: unknown directive{hint}")
        if len(value) > MAX_VALUE:
            raise ConfigError(f"--set {given}: the value is longer than {MAX_VALUE >> 10} KiB")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 (surrogate escapes)
            raise ConfigError(f"--set {given}: the value is not valid UTF-8") from None
        raw[name] = value
        where[name] = f"--set {given}"
    typed: dict[str, object] = {}
    for d in DIRECTIVES:
        if d.kind.empty_is_default and not raw[d.name].strip():
            raw[d.name] = d.default
        typed[d.name] = _convert(d, raw[d.name], where[d.name], warnings)
    if typed["KDUMP_TRANSFER"] and typed["KDUMP_ENCRYPT_TO"]:
        # The command replaces the built-in save, and with it the encryption: it gets the
        # plain /proc/vmcore. Refused here, so that `load` refuses it, not the crash.
        raise ConfigError(
            f"{_where(where['KDUMP_TRANSFER'], 'KDUMP_TRANSFER')}: replaces the built-in save, "
            f"which is what encrypts: with KDUMP_ENCRYPT_TO ({where['KDUMP_ENCRYPT_TO']}) the "
            "command would get the dump in plain text; encrypt in the command (age -R FILE) "
            "and leave KDUMP_ENCRYPT_TO empty, or drop KDUMP_TRANSFER"
        )
    return Config(raw, where, typed, warnings)


def _read(path: str, warnings: list[str]) -> str | None:
    from .bounds import read_small_file

    try:
        data = read_small_file(path, MAX_FILE)
    except FileNotFoundError:
        warnings.append(f"{path}: not found; using built-in defaults")
        return None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except ValueError as err:
        if "larger than" in str(err):
            raise ConfigError(
                f"{path}: larger than {MAX_FILE >> 10} KiB: not a kdump configuration"
            ) from None
        raise ConfigError(f"{err}: not a kdump configuration") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None


def _where(location: str, name: str) -> str:
    # "--set KDUMP_X" already names the directive.
    return location if location.startswith("--set ") else f"{location}: {name}"


def _convert(d: Directive, value: str, location: str, warnings: list[str]) -> object:
    if d.kind is URLS:
        try:
            targets, url_warnings = parse_savedir(value)
        except UrlError as err:  # urls.py keeps passwords out of its messages
            raise UrlError(f"{_where(location, d.name)}: {err}") from None
        warnings.extend(f"{location}: {w}" for w in url_warnings)
        return targets
    try:
        return d.kind.convert(value)
    except _Invalid as err:
        # A URL with a password given to the wrong directive is echoed here. The kinds quote
        # the value with repr(), which writes a tab between two URLs as the two characters
        # "\t" and so glues them into one word that redact() cannot take apart: redact the
        # value before it is quoted, then the message as a whole.
        problem = str(err).replace(repr(value), repr(redact(value)))
        if d.name == "KDUMP_DUMPLEVEL" and value.strip().lower() in _DUMPFORMATS:
            problem += " (a dump format belongs in KDUMP_DUMPFORMAT)"
        raise ConfigError(
            f"{_where(location, d.name)}: {redact(problem)}; allowed: {d.kind.allowed}"
        ) from None


class Config(Mapping[str, str]):
    """The effective configuration: raw string value of every directive, defaults applied.

    Iterates in table order over canonical names; ``cfg["KDUMP_OPTIONS"]`` is accepted as
    the alias of KEXEC_OPTIONS. Values were validated by load_config; the typed properties
    only hand out the converted values.
    """

    __slots__ = ("_raw", "_where", "_typed", "warnings")

    def __init__(
        self,
        raw: dict[str, str],
        where: dict[str, str],
        typed: dict[str, object],
        warnings: list[str],
    ) -> None:
        self._raw = raw
        self._where = where
        self._typed = typed
        self.warnings = warnings

    def __getitem__(self, name: str) -> str:
        return self._raw[ALIASES.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:  # no values: they may hold passwords
        return f"<Config {len(self)} directives, {len(self.warnings)} warnings>"

    def location(self, name: str) -> str:
        """Where the effective value came from: ``FILE:LINE``, ``--set NAME`` or ``default``."""
        return self._where[ALIASES.get(name, name)]

    def value(self, name: str) -> object:
        """The converted value of any directive (int, bool, str, tuple, list[Target])."""
        value = self._typed[ALIASES.get(name, name)]
        return list(value) if isinstance(value, list) else value

    def error(self, name: str, problem: str) -> ConfigError:
        """A ConfigError about a directive's effective value, naming where it was set."""
        return ConfigError(f"{_where(self.location(name), name)}: {problem}")

    def not_supported(self, name: str, what: str) -> NotSupported:
        """An error for a configured value this build cannot honour yet, naming its location."""
        return NotSupported(f"{_where(self.location(name), name)}: {what} is not supported yet")

    @property
    def savedir(self) -> list[Target]:
        return list(self._typed["KDUMP_SAVEDIR"])  # type: ignore[call-overload]

    @property
    def keep_old_dumps(self) -> int:
        return self._typed["KDUMP_KEEP_OLD_DUMPS"]  # type: ignore[return-value]

    @property
    def free_disk_size(self) -> int:
        """Bytes."""
        return self._typed["KDUMP_FREE_DISK_SIZE"]  # type: ignore[return-value]

    @property
    def dumplevel(self) -> int:
        return self._typed["KDUMP_DUMPLEVEL"]  # type: ignore[return-value]

    @property
    def dumpformat(self) -> str:
        """Lowercase: none, elf, compressed, lzo, snappy, zstd or raw."""
        return self._typed["KDUMP_DUMPFORMAT"]  # type: ignore[return-value]

    @property
    def checksum(self) -> str:
        """The algorithm as the manifest names it (a key of checksum.ALGORITHMS)."""
        from .checksum import from_config

        return from_config(self._typed["KDUMP_CHECKSUM"])  # type: ignore[arg-type]

    def not_available(self, name: str, problem: str) -> NotSupported:
        """NotSupported naming where ``name`` was set, for a value whose module is missing."""
        return NotSupported(f"{_where(self.location(name), name)}: {problem}")

    @property
    def immediate_reboot(self) -> bool:
        return self._typed["KDUMP_IMMEDIATE_REBOOT"]  # type: ignore[return-value]

    @property
    def verbose(self) -> int:
        return self._typed["KDUMP_VERBOSE"]  # type: ignore[return-value]

    @property
    def runlevel(self) -> str:
        return self._typed["KDUMP_RUNLEVEL"]  # type: ignore[return-value]

    @property
    def dumpdev(self) -> str:
        return self._typed["KDUMP_DUMPDEV"]  # type: ignore[return-value]

    @property
    def transfer(self) -> str:
        return self._typed["KDUMP_TRANSFER"]  # type: ignore[return-value]

    @property
    def net_timeout(self) -> int:
        """Seconds."""
        return self._typed["KDUMP_NET_TIMEOUT"]  # type: ignore[return-value]

    @property
    def save_timeout(self) -> int:
        """Seconds; 0: automatic (heartbeat.watchdog_timeout)."""
        return self._typed["KDUMP_SAVE_TIMEOUT"]  # type: ignore[return-value]

    @property
    def ssh_identity(self) -> tuple[str, ...]:
        return self._typed["KDUMP_SSH_IDENTITY"]  # type: ignore[return-value]

    @property
    def host_key(self) -> str:
        return self._typed["KDUMP_HOST_KEY"]  # type: ignore[return-value]

    @property
    def encrypt_to(self) -> tuple:
        """age recipients (kdump_capture.age.Recipient); empty: no encryption."""
        return self._typed["KDUMP_ENCRYPT_TO"]  # type: ignore[return-value]

    @property
    def encrypt_summary(self) -> bool:
        return self._typed["KDUMP_ENCRYPT_SUMMARY"]  # type: ignore[return-value]

    @property
    def continue_on_error(self) -> bool:
        return self._typed["KDUMP_CONTINUE_ON_ERROR"]  # type: ignore[return-value]

    def redacted_lines(self) -> list[str]:
        """``NAME="value"`` for every directive in table order, passwords replaced by ``***``.

        Secret directives are hidden whole; every other value goes through urls.redact,
        so a ``user:password@`` in KDUMP_SAVEDIR, or in a KDUMP_TRANSFER command, is
        hidden too. The output is valid input for this parser (and for sh).
        """
        lines = []
        for d in DIRECTIVES:
            value = self._raw[d.name]
            if d.secret and value:
                value = "***"
            else:
                value = redact(value)
            lines.append(f'{d.name}="{_dquote(value)}"')
        return lines


def _dquote(value: str) -> str:
    """Escape for the inside of double quotes: only these four are special there."""
    return re.sub(r'([\\"$`])', r"\\\1", value)
