"""`kdump-capture list`: every dump on a target, all hosts, newest first.

One line per dump: host, crash time, kernel, status, format and level, size, panic line.
Manifests are untrusted (any host of a fleet, or anyone who can write the target, may have
left any bytes under a dump-like name): each is read through ``manifest.read_document``
(bounded size, nesting and value count; no link followed and no special file opened, on
every transport), every field is type-checked and cleaned before it is shown, and a manifest that
cannot be read costs only its own line ("failed", with the reason). Only ``listdir`` and
``read`` are called: nothing on the target is changed.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
from dataclasses import asdict, dataclass

from transports.base import Transport

from . import manifest, policy
from .errors import ConnectionLost, KdumpError, TransportError
from .report import AGE_SUFFIX, MANIFEST
from .summary import CrashSummary, clean

log = logging.getLogger(__name__)

# Crash times shown: 2000-01-01 to 2100-01-01 (anything else is not a time we wrote).
TIME_RANGE = (946684800, 4102444800)

# Another kdump's dump directory on the same target (admins migrating to us point `list`
# at their /var/crash): listed with status "unchecked" (no manifest to check it against) or
# "incomplete" (its own mark says so), never rotated (policy only ever takes our names).
# Red Hat kdump-utils: <ip>-YYYY-MM-DD-HH:MM:SS, its raw-device recovery YYYY-MM-DD-HH:MM;
# SUSE kdump 1.x: [<ip>-]YYYY-MM-DD-HH:MM, 2.x: [<host>-]YYYY-MM-DD-HH-MM; Debian
# kdump-tools: [<ip or host>-]YYYYMMDDHHMM. All in the crashed machine's local time.
_OTHER_NAME = re.compile(
    r"(?:(?P<host>.+)-)?(?P<stamp>\d{4}-\d{2}-\d{2}-\d{2}[-:]\d{2}(?::\d{2})?|\d{12})",
    re.ASCII,
)
_STAMP_FORMATS = ("%Y-%m-%d-%H:%M:%S", "%Y-%m-%d-%H:%M", "%Y-%m-%d-%H-%M", "%Y%m%d%H%M")
# The files that make a directory another kdump's, and what each tool leaves unfinished:
# Red Hat renames vmcore-incomplete (and vmcore-dmesg-incomplete.txt) once it is whole,
# Debian dump-incomplete and vmcore-incomplete; SUSE 2.x writes a README.txt saying
# "the crash dump is likely incomplete" first and replaces it at the end (1.x marks nothing).
_REDHAT = ("vmcore-dmesg.txt", "vmcore-dmesg-incomplete.txt", "kexec-dmesg.log", "vmcore.flat")
_DEBIAN = re.compile(
    r"(?:dump|dmesg|vmcore)\.\d{12}(?:\.\w{1,5})?|dump-incomplete(?:\.\w{1,5})?", re.ASCII
)
_SUSE_PLACEHOLDER = b"the crash dump is likely incomplete"
_VMCORE = re.compile(r"vmcore(?:\.flat|\d+|\.\d{12})?|dump\.\d{12}(?:\.\w{1,5})?", re.ASCII)


@dataclass
class Listed:
    """One line of the listing."""

    directory: str
    host: str
    crash_time: int | None
    kernel: str
    # complete, failed, incomplete or damaged (files unlike the manifest's); unchecked:
    # another kdump's dump (no manifest: nothing says whether it is whole)
    status: str
    format: str
    level: int | None
    size: int  # bytes of the files in the directory, as listed
    panic: str  # the panic/oops line, "(encrypted)", "(no panic in the log)" or "-"
    note: str = ""  # why a line says less than it could (an unreadable manifest)

    def line(self) -> str:
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.crash_time))
            if self.crash_time is not None
            else "unknown-time"
        )
        level = "-" if self.level is None else f"-d {self.level}"
        panic = self.panic + (f" [{self.note}]" if self.note else "")
        return (
            f"{self.host:<20} {when:<19} {self.kernel:<24} {self.status:<10} "
            f"{self.format:<14} {level:<5} {_size(self.size):>9}  {panic}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_manifest(transport: Transport, relpath: str) -> dict:
    """A manifest read as untrusted input, by the one bounded reader (``manifest``): at
    most 1 MiB of a regular file, no link followed and nothing that blocks opened, nesting
    and values bounded before ``json`` builds anything. Raises ManifestError with the reason."""
    return manifest.read_document(transport, relpath)


def _text(doc: dict, key: str, limit: int = 60) -> str | None:
    v = doc.get(key)
    return clean(v, limit) or None if isinstance(v, str) else None


def _int(doc: dict, key: str, lo: int, hi: int) -> int | None:
    v = doc.get(key)
    return v if type(v) is int and lo <= v <= hi else None


def _short_format(doc: dict) -> str:
    """ "kdump-compressed (zlib), flattened (...)" -> "kdump-zlib+flat"; "+age" if encrypted."""
    text = _text(doc, "dump_format", 100) or "-"
    m = re.match(r"kdump-compressed \((\w{1,10})\)", text)
    out = f"kdump-{m.group(1)}" if m else text.split(",")[0].split(" (")[0][:14]
    if doc.get("flattened") is True:
        out += "+flat"
    if isinstance(doc.get("encryption"), dict):
        out += "+age"
    return out


def _panic(doc: dict) -> str:
    found = doc.get("crash_summary")
    if not isinstance(found, dict):
        return "-"
    if found.get("encrypted") is True:
        return "(encrypted)"
    summary = CrashSummary.from_dict(found)
    if summary is None or summary.source == "none":
        return "-"
    if summary.kind == "none":
        return "(no panic in the log)"
    return summary.headline or summary.panic or "-"


def _stamp_time(stamp: str) -> int | None:
    try:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%d-%H-%M-%S"))
    except ValueError:
        return None


# ``list_dumps``'s ``only`` when every host's dumps are wanted (``list``).
ALL_HOSTS = object()


def list_dumps(transport: Transport, only: str | None | object = ALL_HOSTS) -> list[Listed]:
    """Every dump directory on the target (all hosts), newest crash first.

    ``only``: only that host's dumps of ours (None: the unprefixed names of a local
    target, as the save names them), filtered by name before anything else is listed or
    read: ``status`` and ``notify`` need this host's few dumps, and on a target shared by
    a fleet reading every other host's manifest took a request or more per dump
    (minutes at a boot for thousands of dumps)."""
    out: list[Listed] = []
    for entry in transport.listdir(""):
        if not entry.is_dir:
            continue  # files, and links (never listed as directories)
        parsed = policy.parse_dump_name(entry.name)
        if only is not ALL_HOSTS and (parsed is None or parsed[0] != only):
            continue
        if parsed is None:
            other = _other_kdump(transport, entry.name)
            if other is not None:
                out.append(other)
            continue
        host, stamp, _seq = parsed
        try:
            files, unreadable = transport.listdir(entry.name), ""
        except ConnectionLost:
            raise
        except TransportError as e:
            # one directory we may not enter (another host's 0700 dump) costs its line only
            files, unreadable = [], str(e).rpartition(f"{entry.name}: ")[2] or str(e)
        item = Listed(
            directory=clean(entry.name, 255),
            host=clean(host, 60) if host else "-",
            crash_time=_stamp_time(stamp),
            kernel="-",
            status=policy.INCOMPLETE,
            format="-",
            level=None,
            size=sum(e.size for e in files if not e.is_dir),
            panic="-",
        )
        if unreadable:
            item.status = policy.FAILED
            item.note = f"cannot list: {clean(unreadable, 120)}"
        elif any(e.name == MANIFEST and not e.is_dir for e in files):
            relpath = f"{entry.name}/{MANIFEST}"
            try:
                doc = read_manifest(transport, relpath)
                _fill(item, doc, host)
                if item.status == policy.COMPLETE:
                    where = f"{transport.describe()}/{relpath}"
                    damage = manifest.files_differ(manifest.of_document(doc, where), files)
                    if damage is not None:  # as rotation counts it
                        item.status = policy.DAMAGED
                        item.note = clean(damage, 120)
            except KdumpError as e:
                item.status = policy.FAILED
                # the reason, without the path that leads every transport's message
                reason = str(e).partition(f"{relpath}: ")[2] or str(e)
                item.note = f"manifest unreadable: {clean(reason, 120)}"
        elif any(e.name.endswith(AGE_SUFFIX) for e in files):
            item.format = "+age"
        out.append(item)
    out.sort(key=lambda i: (i.crash_time or 0, i.directory), reverse=True)
    return out


def _other_kdump(transport: Transport, name: str) -> Listed | None:
    """The line of another kdump tool's dump directory ``name``, or None if it is not one."""
    m = _OTHER_NAME.fullmatch(name)
    if m is None:
        return None
    try:
        files = [e for e in transport.listdir(name) if not (e.is_dir or e.is_link)]
    except ConnectionLost:
        raise
    except TransportError:
        return None  # not ours and not listable: nothing to say of it
    names = {e.name for e in files}
    if any(n in names for n in _REDHAT):
        tool = "Red Hat kdump"
    elif any(_DEBIAN.fullmatch(n) for n in names):
        tool = "Debian kdump-tools"
    elif names & {"README.txt", "dmesg.txt", "dmesg", "vmcore"}:
        tool = "SUSE kdump"
    else:
        return None
    if any("-incomplete" in n for n in names):
        status, why = policy.INCOMPLETE, "its -incomplete file is still there"
    elif tool == "SUSE kdump" and _suse_placeholder(transport, f"{name}/README.txt", names):
        status, why = policy.INCOMPLETE, "its README.txt is still the placeholder"
    elif any(_VMCORE.fullmatch(n) for n in names):
        status, why = "unchecked", "no manifest to check it against"
    else:
        status, why = policy.FAILED, "no vmcore"
    host, stamp = m.group("host"), m.group("stamp")
    when = None
    for fmt in _STAMP_FORMATS:
        try:
            when = calendar.timegm(time.strptime(stamp, fmt))
            break
        except ValueError:
            continue
    return Listed(
        directory=clean(name, 255),
        host=clean(host, 60) if host else "-",
        crash_time=when,
        kernel="-",
        status=status,
        format="+flat" if "vmcore.flat" in names else "-",
        level=None,
        size=sum(e.size for e in files),
        panic="-",
        note=f"made by {tool}, local time: {why}; never rotated",
    )


def _suse_placeholder(transport: Transport, relpath: str, names: set[str]) -> bool:
    if "README.txt" not in names:
        return False
    try:
        head = b"".join(transport.read(relpath, limit=4096))
    except ConnectionLost:
        raise
    except KdumpError:
        return False  # unreadable, or larger than the placeholder: the vmcore decides
    return _SUSE_PLACEHOLDER in head


def _fill(item: Listed, doc: dict, host: str | None) -> None:
    status = doc.get("status")
    item.status = (
        status if status in (policy.COMPLETE, policy.FAILED, policy.INCOMPLETE) else "failed"
    )
    if status not in (policy.COMPLETE, policy.FAILED, policy.INCOMPLETE):
        item.note = "manifest has no known status"
    crash = _int(doc, "crash_time", *TIME_RANGE)
    if crash is not None:
        item.crash_time = crash
    item.kernel = _text(doc, "kernel_release", 64) or "-"
    if host is None:  # a local target's names carry no host: the manifest says
        item.host = _text(doc, "host", 60) or "-"
    item.format = _short_format(doc)
    item.level = _int(doc, "dump_level", 0, 31)
    item.panic = _panic(doc)


def as_json(items: list[Listed]) -> str:
    return json.dumps([asdict(i) for i in items], indent=2)


@dataclass
class OwnDump:
    """One of this host's dumps on a target (``own_dumps``): the target's URL without its
    password, and the dump's line."""

    target: str
    item: Listed

    @property
    def key(self) -> str:
        return f"{self.target}|{self.item.directory}"


def own_dumps(cfg) -> tuple[str, list[OwnDump]]:
    """This host's name and its dumps of ours on every KDUMP_SAVEDIR target, read as
    ``list`` reads them (``status`` and ``notify``; a target that fails is a warning: the
    others are still looked at). Kept here, without mail: ``status`` runs in a first kernel
    from a capture image's runtime, which has no smtplib or email."""
    from transports import open_transport

    from .cli import transport_settings
    from .identity import host_identity, local_identity

    configured = cfg["KDUMP_HOSTNAME"] or local_identity()
    settings = transport_settings(cfg, replay_bytes=4 << 20, read_only=True)
    found: list[OwnDump] = []
    shown_host = configured or "this host"
    for target in cfg.savedir:
        shown = target.redacted()
        try:
            host = None if target.scheme == "file" else host_identity(target, configured)
            with open_transport(target, settings) as tr:
                # Only this host's dumps of ours, chosen by name before anything is read:
                # not other hosts' (a fleet's target), nor other kdumps' directories.
                items = list_dumps(tr, host)
        except KdumpError as e:
            log.warning("%s: cannot look for dumps: %s", shown, e)
            continue
        if host:
            shown_host = host
        found += [OwnDump(shown, i) for i in items]
    return shown_host, found
