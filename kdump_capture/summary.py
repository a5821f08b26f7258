"""Why the machine crashed, from the crashed kernel's log: the panic or oops line, the
crashing CPU/PID/command, RIP, the first call-trace frames, taint, release and uptime.

The log comes from the crashed kernel's memory: any bytes at all. Everything here is
bounded (lines scanned, line length, frames, field lengths) and made of plain string
operations and anchored regular expressions that cannot backtrack badly; the output is
printable ASCII. A log without a crash says so (``kind == "none"``).
"""

from __future__ import annotations

import os
import re
import stat

from .errors import NoDumpError, VmcoreError
from .record import Record

# What is read of a log: the last 16 MiB (a real log is a few hundred KiB; the ring is at
# most 32 MiB of text) and lines up to 4 KiB (a kernel record is at most 1 KiB of text,
# longer only after escaping); longer lines are cut before any pattern sees them.
MAX_TEXT = 16 << 20
MAX_LINE = 4096
# After the first crash line, the CPU/RIP/trace lines follow within a few dozen lines
# (register dump, code bytes, modules list); look no further than this.
WINDOW = 200
FRAMES = 8  # call-trace frames kept
MAX_FIELD = 200  # characters of one field shown (a panic message can be long)

# Lines that start a crash report, and what kind of report. Matched against the message
# (the "[ uptime] " prefix removed), at its start or after a "CPU: N PID: N" style prefix.
_HEADS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("panic", re.compile(r"Kernel panic - not syncing: ?")),
    ("BUG", re.compile(r"(?:kernel BUG at |BUG: )")),
    (
        "oops",
        re.compile(
            r"(?:Oops: |general protection fault|Unable to handle kernel |divide error: |"
            r"invalid opcode: |stack segment: |double fault: |Internal error: |"
            r"unable to handle page fault)"
        ),
    ),
)
_STAMP = re.compile(r"\[ *([0-9]{1,10})\.([0-9]{1,9})\] ")
# "CPU: 0 PID: 1 Comm: init Kdump: loaded Not tainted 6.1.0-57-cloud-amd64 #1 Debian ..."
# (6.10+: "CPU: 0 UID: 0 PID: 1 Comm: ..."). Comm is at most 15 characters and may hold
# blanks; the taint part is "Not tainted" or "Tainted: " + flag letters and blanks.
_CPU = re.compile(
    r"CPU: ([0-9]{1,6}) (?:UID: [0-9]{1,10} )?PID: ([0-9]{1,10}) Comm: (.{1,16}?) "
    r"(?:Kdump: loaded )?(Not tainted|Tainted: [A-Z ]{1,40}) +(\S{1,100})"
)
_RIP = re.compile(r"(?:RIP|pc|PC is at|NIP|epc|IP): ?")
_TRACE = re.compile(r"(?:Call Trace:|Call trace:|Backtrace:)")
_SKIP_FRAME = ("<TASK>", "</TASK>", "<IRQ>", "</IRQ>", "<NMI>", "</NMI>", "<#DF>", "</#DF>")


class CrashSummary(Record):
    """What an admin reads first. Fields are None when the log does not say."""

    __slots__ = (
        "kind",
        "headline",
        "panic",
        "cpu",
        "pid",
        "comm",
        "rip",
        "trace",
        "taint",
        "release",
        "uptime",
        "source",
    )

    def __init__(
        self,
        kind: str = "none",  # "panic", "oops", "BUG" or "none" (no crash report in the log)
        headline: str | None = None,  # the first crash line (oops/BUG, else the panic line)
        panic: str | None = None,  # the "Kernel panic - not syncing: ..." line
        cpu: int | None = None,
        pid: int | None = None,
        comm: str | None = None,
        rip: str | None = None,
        trace: list[str] | None = None,
        taint: str | None = None,
        release: str | None = None,
        uptime: float | None = None,  # seconds since boot at the headline
        source: str = "log",  # where it came from; "none" when there was no log
    ) -> None:
        self.kind = kind
        self.headline = headline
        self.panic = panic
        self.cpu = cpu
        self.pid = pid
        self.comm = comm
        self.rip = rip
        self.trace = [] if trace is None else trace
        self.taint = taint
        self.release = release
        self.uptime = uptime
        self.source = source

    def as_dict(self) -> dict:
        return {**super().as_dict(), "trace": list(self.trace)}

    @classmethod
    def from_dict(cls, doc: object) -> CrashSummary | None:
        """A summary read back from a manifest (untrusted): only well-typed fields."""
        if not isinstance(doc, dict):
            return None
        out = cls()
        for name in ("kind", "headline", "panic", "comm", "rip", "taint", "release", "source"):
            v = doc.get(name)
            if isinstance(v, str):
                setattr(out, name, clean(v))
        for name in ("cpu", "pid"):
            v = doc.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32:
                setattr(out, name, v)
        v = doc.get("uptime")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e10:
            out.uptime = float(v)
        frames = doc.get("trace")
        if isinstance(frames, list):
            out.trace = [clean(f) for f in frames[:FRAMES] if isinstance(f, str)]
        return out

    def lines(self) -> list[str]:
        """The summary as text lines for README.txt and `kdump-capture summary`."""
        if self.source == "none":
            return ["Crash summary  : unknown (the crashed kernel's log could not be read)"]
        if self.kind == "none":
            return ["Crash summary  : no panic, oops or BUG found in the crashed kernel's log"]
        out = [f"Crash          : {self.headline or self.panic}"]
        if self.panic and self.panic != self.headline:
            out.append(f"Panic          : {self.panic}")
        if self.cpu is not None or self.pid is not None or self.comm is not None:
            who = []
            if self.cpu is not None:
                who.append(f"CPU {self.cpu}")
            if self.pid is not None:
                who.append(f"PID {self.pid}")
            if self.comm is not None:
                who.append(f"command {self.comm}")
            out.append(f"Crashing task  : {', '.join(who)}")
        if self.rip:
            out.append(f"RIP            : {self.rip}")
        if self.trace:
            out.append(f"Call trace     : {self.trace[0]}")
            out += [f"                 {f}" for f in self.trace[1:]]
        if self.taint:
            out.append(f"Taint          : {self.taint}")
        if self.release:
            out.append(f"Kernel (log)   : {self.release}")
        if self.uptime is not None:
            out.append(f"Uptime         : {self.uptime:.6f} s at the crash")
        return out

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines())


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """Printable ASCII, at most ``limit`` characters (an ellipsis marks a cut)."""
    s = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1]).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _split(line: str) -> tuple[float | None, str]:
    """(uptime, message) of one log line; continuation lines have no time stamp."""
    m = _STAMP.match(line)
    if not m:
        return None, line.strip()
    frac = m.group(2)
    return int(m.group(1)) + int(frac) / 10 ** len(frac), line[m.end() :].strip()


def _head(msg: str) -> str | None:
    """The kind of crash report this message starts, if any."""
    for kind, rx in _HEADS:
        if rx.match(msg):
            return kind
    return None


def summarize(log: str | bytes | None) -> CrashSummary:
    """The crash summary of a kernel log (the text ``dmesg.txt`` holds). Never raises for
    any input; None: no log."""
    if log is None:
        return CrashSummary(source="none")
    if isinstance(log, (bytes, bytearray, memoryview)):
        log = bytes(log[-MAX_TEXT:]).decode("ascii", "replace")
    elif len(log) > MAX_TEXT:
        log = log[-MAX_TEXT:]
    lines = log.split("\n")
    out = CrashSummary()
    start = None
    for i, raw in enumerate(lines):
        uptime, msg = _split(raw[:MAX_LINE])
        kind = _head(msg)
        if kind is None:
            continue
        text = clean(msg)
        if kind == "panic":
            if out.panic is None:
                out.panic = text
                if start is None:
                    start, out.kind, out.headline, out.uptime = i, kind, text, uptime
            break  # nothing after the panic matters
        if start is None:
            start, out.kind, out.headline, out.uptime = i, kind, text, uptime
    if start is None:
        return out
    _details(out, lines, start)
    return out


def _details(out: CrashSummary, lines: list[str], start: int) -> None:
    """CPU/PID/command, taint, release, RIP and trace from the lines after the headline."""
    in_trace = False
    for raw in lines[start : start + WINDOW]:
        _, msg = _split(raw[:MAX_LINE])
        if in_trace:
            if msg in _SKIP_FRAME or msg.startswith("? "):
                continue  # markers, and unreliable frames (guesses from the stack)
            if msg and _looks_like_frame(msg):
                if len(out.trace) < FRAMES:
                    out.trace.append(clean(msg, 120))
                continue
            in_trace = False  # the trace ended; this line may be the RIP line
        if out.cpu is None:
            m = _CPU.match(msg)
            if m:
                out.cpu, out.pid = int(m.group(1)), int(m.group(2))
                out.comm = clean(m.group(3), 16)
                taint = m.group(4)
                flags = " ".join(taint[9:].split())  # positional letters: "G      OE" -> "G OE"
                out.taint = "Not tainted" if taint == "Not tainted" else clean(flags)
                out.release = clean(m.group(5), 100)
                continue
        if out.rip is None:
            m = _RIP.match(msg)
            if m:
                out.rip = clean(msg[m.end() :]) or None
                continue
        if _TRACE.match(msg):
            if out.trace:
                break  # a second trace (another CPU, a nested report): keep the first
            in_trace = True
            continue
        if out.trace and out.rip is not None and out.cpu is not None:
            break


def _looks_like_frame(msg: str) -> bool:
    """``func+0x16/0x20 [module]`` or ``[<addr>] func+0x..`` (arm), not a register line."""
    word = msg.split(" ", 1)[0]
    if word.startswith("[<"):
        return True
    return "+0x" in word and "/0x" in word


def _read_text(path: str, follow: bool) -> tuple[bytes, bytes, bool]:
    """The first 64 bytes of a file, its last MAX_TEXT bytes, and whether it can be read at
    any offset (a regular file or a block device). ``follow``: a path named on the command
    line may be a link (``/dev/stdin``); a dump directory's files are never read through
    one. A pipe is read once, to its end."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise NoDumpError(f"{path}: cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(64)
        if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            f.seek(max(0, st.st_size - MAX_TEXT))
            return head, f.read(MAX_TEXT), True
        if stat.S_ISCHR(st.st_mode):  # /dev/zero, a tty: endless, or no log
            raise VmcoreError(f"{path}: a character device, neither a dump file nor a log")
        if b"\0" in head:
            # A dump or binary data in a pipe: the caller refuses both from what it has;
            # reading on could take for ever (an endless stream).
            return head, head, False
        tail = bytearray(head)
        while chunk := f.read(1 << 20):
            tail += chunk
            del tail[: max(0, len(tail) - MAX_TEXT)]
        return head, bytes(tail), False


def summary_of(path: str, follow: bool = True, incomplete: list[str] | None = None) -> CrashSummary:
    """The crash summary of a dump file (ELF, kdump-compressed, flattened), a dmesg.txt,
    or a dump directory (its dmesg.txt, else its vmcore, else its manifest's summary).
    A dump file that holds less than its headers promise puts its path and why into
    ``incomplete``.

    A file that is neither a dump nor text (empty, or holding NUL bytes, which a dmesg.txt
    never does: its writer escapes them) is a VmcoreError, never "no panic found"."""
    from .dumpfile import open_dump
    from .report import AGE_MAGIC, ENCRYPTED_HINT

    if os.path.isdir(path):
        names = os.listdir(path)
        summary = _summary_of_dir(path, names, incomplete)
        if incomplete is not None and not incomplete:
            why = _dir_incomplete(path, set(names))
            if why:
                incomplete[:] = [path, why]
        return summary
    head, text, regular = _read_text(path, follow)
    if head.startswith(AGE_MAGIC):
        raise VmcoreError(f"{path}: {ENCRYPTED_HINT}")
    if head[:4] == b"\x7fELF" or head[:8] == b"KDUMP   " or head[:12] == b"makedumpfile":
        if not regular:
            raise VmcoreError(
                f"{path}: a dump read from a pipe: its log is read at random offsets; save "
                "it to a file first"
            )
        with open_dump(path) as dump:
            summary = summarize(dump.dmesg())
        if dump.incomplete and incomplete is not None:
            incomplete[:] = [path, dump.incomplete]
        return summary
    if not text:
        raise VmcoreError(f"{path}: empty: neither a dump nor a kernel log (dmesg.txt)")
    if b"\0" in text:
        from .dumpfile import packed_with

        packed = packed_with(head)
        raise VmcoreError(
            f"{path}: binary data: neither an ELF, kdump-compressed or flattened dump nor a "
            "kernel log (dmesg.txt)"
            + (f"; it is {packed}-compressed as a whole: decompress it first" if packed else "")
        )
    return summarize(text)


# Other kdumps' logs and dumps in their directories (after ours): Red Hat kdump-utils
# vmcore-dmesg.txt and vmcore or vmcore.flat; SUSE kdump 2.x dmesg; Debian kdump-tools
# dmesg.YYYYMMDDHHMM and dump.YYYYMMDDHHMM. Never an unfinished one (vmcore-incomplete).
_OTHER_LOGS = ("vmcore-dmesg.txt", "dmesg")
_OTHER_DUMPS = ("vmcore.flat",)
_DEBIAN_LOG = re.compile(r"dmesg\.\d{12}", re.ASCII)
_DEBIAN_DUMP = re.compile(r"dump\.\d{12}", re.ASCII)
# What a save that did not finish leaves in README.txt: ours, and SUSE kdump 2.x's.
_PLACEHOLDERS = (b"saving the dump was interrupted", b"the crash dump is likely incomplete")


def _summary_of_dir(path: str, names: list[str], incomplete: list[str] | None) -> CrashSummary:
    from transports.base import mode_kind

    from .decrypt import read_manifest
    from .report import DMESG, MANIFEST, VMCORE

    logs = [DMESG, *_OTHER_LOGS, *sorted(n for n in names if _DEBIAN_LOG.fullmatch(n))]
    dumps = [VMCORE, *_OTHER_DUMPS, *sorted(n for n in names if _DEBIAN_DUMP.fullmatch(n))]
    for name in (*logs, *dumps):
        p = os.path.join(path, name)
        if not os.path.lexists(p):
            continue
        # A dump directory's files, never a link or a FIFO in their place (another host may
        # write a shared target; a FIFO would wait for a writer for good). A path given by
        # itself may be one: `... | kdump-capture summary /dev/stdin`.
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise VmcoreError(f"{p}: {mode_kind(st.st_mode)}; only regular files are read")
        if name in logs and not st.st_size:
            continue  # an empty ring saved as it was: the vmcore says the same
        return summary_of(p, follow=False, incomplete=incomplete)
    if os.path.lexists(os.path.join(path, MANIFEST)):
        doc = read_manifest(path)
        found = doc.get("crash_summary")
        if isinstance(found, dict) and not found.get("encrypted"):
            summary = CrashSummary.from_dict(found)
            if summary is not None:
                return summary
        if doc.get("encryption"):
            raise VmcoreError(
                f"{path}: the dump is encrypted and its summary with it; decrypt it first "
                "(kdump-capture decrypt --identity KEY DIR)"
            )
    where = f"summary in {MANIFEST}" if MANIFEST in names else f"{MANIFEST}"
    why = _dir_incomplete(path, set(names))
    raise NoDumpError(f"{path}: no {DMESG}, {VMCORE} or {where}" + (f" ({why})" if why else ""))


def _dir_incomplete(path: str, names: set[str]) -> str | None:
    """Why the dump in directory ``path`` did not finish, as far as it tells, else None."""
    from . import policy
    from .decrypt import read_manifest
    from .errors import KdumpError
    from .report import MANIFEST, README

    if MANIFEST in names:
        try:
            doc = read_manifest(path)
        except KdumpError as e:
            return f"its {MANIFEST} is unreadable ({e})"
        status = doc.get("status")
        if status != "complete":
            error = doc.get("error")
            why = f": {clean(error, 200)}" if isinstance(error, str) and error else ""
            return f"its {MANIFEST} says {clean(str(status), 40)!r}{why}"
        return None
    unfinished = sorted(n for n in names if "-incomplete" in n)
    if unfinished:
        return f"{clean(unfinished[0], 60)} is there: its save did not finish"
    if README in names:
        try:  # never through a link, never waiting on a FIFO
            fd = os.open(os.path.join(path, README), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = -1
        if fd >= 0:
            with os.fdopen(fd, "rb") as f:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                head = f.read(4096) if regular else b""
        if fd >= 0 and any(mark in head for mark in _PLACEHOLDERS):
            return f"its {README} is still the placeholder: its save did not finish"
    if policy.parse_dump_name(os.path.basename(os.path.abspath(path))) is not None:
        return f"no {MANIFEST}: its save did not finish"
    return None
