"""manifest.json read back: bounded, validated and typed, whoever wrote it.

Manifests are read by rotation (on shared targets, where another host may have left any
bytes under a dump-like name), by ``verify`` and by anything else that needs a dump's
state. This is the only reader: the size cap, the nesting limit, the schema check and the
file-name rule live here once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from transports.base import Entry, Transport

from . import checksum
from .errors import ManifestError
from .record import Record
from .report import MANIFEST, README

# Ours are 1-2 KiB (four files, a few notes); 1 MiB leaves room for long notes and still
# bounds what a hostile manifest costs a capture kernel with tens of MiB free.
MAX_BYTES = 1 << 20
# Ours nest three deep (top, files, one file); json's own recursion would stop near 1000
# with RecursionError only after building that much.
MAX_DEPTH = 8
# We write four files; a few more leaves room for later versions.
MAX_FILES = 64
# Values of any kind: ours have about 60, plus 4 per recorded unreadable range (at most
# vmcore.MAX_RECORDED_RANGES, 256) and one per note. Bounds what json.loads builds to a few
# MiB whatever the bytes.
MAX_ITEMS = 8192
# A name on any target: NAME_MAX on Linux, and what SMB and FTP servers accept.
MAX_NAME = 255
MAX_TEXT = 64 << 10

COMPLETE = "complete"
FAILED = "failed"
# Saved, but only part of the source (report.DumpRecord): never complete.
INCOMPLETE = "incomplete"
STATUSES = (COMPLETE, FAILED, INCOMPLETE)

# A JSON string, possessive so that each byte is looked at once; an unterminated one runs to
# the end (json rejects it later).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.S)
# An array or object with nothing nested inside: removed level by level to measure depth.
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


class FileRecord(Record):
    """What the manifest says about one file of the dump."""

    __slots__ = ("size", "digest", "algorithm")

    def __init__(
        self,
        size: int,
        digest: str,
        algorithm: str = checksum.SHA256,  # a key of checksum.ALGORITHMS
    ) -> None:
        self.size = size
        self.digest = digest
        self.algorithm = algorithm


class Manifest(Record):
    """The parts of manifest.json that programs act on."""

    __slots__ = ("status", "files", "error")

    def __init__(
        self,
        status: str,
        files: dict[str, FileRecord],
        error: str | None = None,
    ) -> None:
        self.status = status
        self.files = files
        self.error = error

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE


def plain_name(name: object) -> bool:
    """A file name inside the dump directory: no path, no "..", nothing a reader could
    take for another file (so ``verify`` never reads /etc/hostname or ../x)."""
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and name.isprintable()
    )


def _check_shape(data: bytes, where: str) -> None:
    """Refuse deep nesting and too many values before json builds any of it: 1 MiB of
    "[[],[],..." would take json's recursion to its limit, or become ~20 MiB of lists."""
    bare = _STRING.sub(b'""', data)
    if bare.count(b",") + bare.count(b"[") + bare.count(b"{") > MAX_ITEMS:
        raise ManifestError(f"{where}: more than {MAX_ITEMS} values")
    for _ in range(MAX_DEPTH):
        bare, n = _INNERMOST.subn(b"0", bare)
        if not n:
            break
    if b"[" in bare or b"{" in bare:
        raise ManifestError(f"{where}: nested deeper than {MAX_DEPTH} levels, or unbalanced")


def _text(doc: dict, key: str, where: str, optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ManifestError(f"{where}: {key!r} is not a string")
    return value


def _files(doc: dict, where: str) -> dict[str, FileRecord]:
    files = doc.get("files", {})
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: 'files' is not an object")
    if len(files) > MAX_FILES:
        raise ManifestError(f"{where}: {len(files)} files listed, more than {MAX_FILES}")
    out = {}
    for name, info in files.items():
        if not plain_name(name):
            raise ManifestError(f"{where}: file name {name[:80]!r} is not a plain name")
        if not isinstance(info, dict):
            raise ManifestError(f"{where}: {name}: not an object")
        size = info.get("size")
        if type(size) is not int or size < 0:
            raise ManifestError(f"{where}: {name}: 'size' is missing or not a byte count")
        algorithm, digest = checksum.recorded(info, f"{where}: {name}")
        out[name] = FileRecord(size, digest, algorithm)
    return out


def document(data: bytes, where: str) -> dict:
    """The JSON object in ``data``, bounded in size, depth and values before json builds
    anything; ``ManifestError`` naming ``where`` otherwise. Callers still check every field
    they use (``parse`` for rotation and verify, ``fleet`` for the listing)."""
    if len(data) > MAX_BYTES:
        raise ManifestError(f"{where}: larger than {MAX_BYTES} bytes")
    _check_shape(data, where)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{where}: not valid JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: not a JSON object")
    return doc


def read_document(transport: Transport, relpath: str) -> dict:
    """``document`` of the file ``relpath``: at most MAX_BYTES of a regular file, read
    through no link and without blocking (``Transport.read``)."""
    data = b"".join(transport.read(relpath, limit=MAX_BYTES))
    return document(data, f"{transport.describe()}/{relpath}")


def parse(data: bytes, where: str) -> Manifest:
    """The manifest in ``data``; ``ManifestError`` naming ``where`` if it is not one of ours."""
    return of_document(document(data, where), where)


def of_document(doc: dict, where: str) -> Manifest:
    """The manifest a ``document`` holds, every field it acts on checked."""
    status = _text(doc, "status", where)
    if status not in STATUSES:
        raise ManifestError(f"{where}: unknown status {status[:40]!r}")
    return Manifest(status, _files(doc, where), _text(doc, "error", where, optional=True))


def files_differ(m: Manifest, entries: Iterable[Entry]) -> str | None:
    """Why the files in the dump's directory are not the ones ``m`` records (``entries``:
    its listing on the target), else None: one is missing (a vmcore removed to save space)
    or of another size (cut short when the target lost data, rewritten). Only regular
    files count, never a link. README.txt is not compared: one that cannot be written
    after the manifest is only a warning (``pipeline._publish_record``)."""
    listed = {e.name: e.size for e in entries if not (e.is_dir or e.is_link)}
    for name, rec in sorted(m.files.items()):
        if name == README:
            continue
        size = listed.get(name)
        if size is None:
            return f"{name}, which the manifest lists, is missing"
        if size != rec.size:
            return f"{name} holds {size} bytes, the manifest says {rec.size}"
    return None


def read(transport: Transport, dumpdir: str) -> Manifest:
    """The manifest of ``dumpdir`` on ``transport``: at most MAX_BYTES of a regular file,
    read through no link and without blocking (``Transport.read``)."""
    relpath = f"{dumpdir}/{MANIFEST}"
    data = b"".join(transport.read(relpath, limit=MAX_BYTES))
    return parse(data, f"{transport.describe()}/{relpath}")
