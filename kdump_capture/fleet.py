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
import re
import time
from dataclasses import asdict, dataclass

from transports.base import Transport

from . import manifest, policy
from .errors import ConnectionLost, KdumpError, TransportError
from .report import AGE_SUFFIX, MANIFEST
from .summary import CrashSummary, clean

# Crash times shown: 2000-01-01 to 2100-01-01 (anything else is not a time we wrote).
TIME_RANGE = (946684800, 4102444800)


@dataclass
class Listed:
    """One line of the listing."""

    directory: str
    host: str
    crash_time: int | None
    kernel: str
    status: str  # complete, failed, incomplete or damaged (files unlike the manifest's)
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


def list_dumps(transport: Transport) -> list[Listed]:
    """Every dump directory on the target (all hosts), newest crash first."""
    out: list[Listed] = []
    for entry in transport.listdir(""):
        if not entry.is_dir:
            continue  # files, and links (never listed as directories)
        parsed = policy.parse_dump_name(entry.name)
        if parsed is None:
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
