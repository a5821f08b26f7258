"""The files that describe a dump: README.txt for people, manifest.json for programs."""

from __future__ import annotations

import json
import time

from . import __version__
from .record import Record
from .urls import redact

MANIFEST = "manifest.json"
README = "README.txt"
VMCORE = "vmcore"
DMESG = "dmesg.txt"
SUMMARY = "summary.txt"  # written only encrypted (summary.txt.age): the plain one is README's
AGE_SUFFIX = ".age"
# How an age file begins (its version line): commands that read dumps name it, not "malformed".
AGE_MAGIC = b"age-encryption.org/"
ENCRYPTED_HINT = (
    "encrypted (age); decrypt it first (kdump-capture decrypt --identity KEY DIR, or age -d)"
)

PLACEHOLDER = (
    "Kernel crashdump (INCOMPLETE)\n"
    "-----------------------------\n\n"
    "This file is replaced when the dump is finished.\n"
    "If you see this text, saving the dump was interrupted: the dump is incomplete.\n"
)


class DumpRecord(Record):
    """Everything README.txt and manifest.json say about one dump."""

    __slots__ = (
        "status",
        "host",
        "target",
        "directory",
        "crash_time",
        "kernel_release",
        "dump_level",
        "dump_format",
        "flattened",
        "source",
        "source_size",
        "started",
        "finished",
        "pages_total",
        "pages_written",
        "files",
        "notes",
        "error",
        "unreadable",
        "unreadable_bytes",
        "crash_summary",
        "encryption",
    )

    def __init__(
        self,
        status: str,  # "complete", "incomplete" (saved, but only part of the source) or "failed"
        host: str,
        target: str,  # redacted URL
        directory: str,
        crash_time: int | None,
        kernel_release: str | None,
        dump_level: int,
        dump_format: str,
        flattened: bool = False,
        source: str = "",
        source_size: int | None = None,
        started: float = 0.0,
        finished: float = 0.0,
        pages_total: int = 0,
        pages_written: int = 0,
        files: dict[str, dict] | None = None,  # name -> {size, algorithm, <it>}
        notes: list[str] | None = None,
        error: str | None = None,
        # source ranges that could not be read and are zeros in the vmcore:
        # {"offset", "size", "paddr" (None if not in a PT_LOAD)}
        unreadable: list[dict] | None = None,
        unreadable_bytes: int = 0,
        # summary.CrashSummary.as_dict(), or {"encrypted": true} when it is kept only inside
        # the encrypted files; None: not known (a dump from before summaries)
        crash_summary: dict | None = None,
        # {"format": "age-encryption.org/v1", "recipients": [public keys]} when encrypted
        encryption: dict | None = None,
    ) -> None:
        self.status = status
        self.host = host
        self.target = target
        self.directory = directory
        self.crash_time = crash_time
        self.kernel_release = kernel_release
        self.dump_level = dump_level
        self.dump_format = dump_format
        self.flattened = flattened
        self.source = source
        self.source_size = source_size
        self.started = started
        self.finished = finished
        self.pages_total = pages_total
        self.pages_written = pages_written
        self.files = {} if files is None else files
        self.notes = [] if notes is None else notes
        self.error = error
        self.unreadable = [] if unreadable is None else unreadable
        self.unreadable_bytes = unreadable_bytes
        self.crash_summary = crash_summary
        self.encryption = encryption

    def manifest_json(self) -> bytes:
        fields = self.as_dict()
        summary = fields.pop("crash_summary")
        rest = {"tool": "kdump-capture", "version": __version__, **fields}
        # What an admin needs first comes first; the rest in name order.
        doc = {"crash_summary": summary, **dict(sorted(rest.items()))}
        # The target, errors and notes quote servers and libraries: no password may pass.
        return (json.dumps(_redacted(doc), indent=2) + "\n").encode()

    def summary_lines(self) -> list[str]:
        from .summary import CrashSummary

        if self.crash_summary is None:
            return []
        if self.crash_summary.get("encrypted"):
            return [
                f"Crash summary  : encrypted (in {SUMMARY}{AGE_SUFFIX}; "
                "'kdump-capture decrypt' writes it)"
            ]
        summary = CrashSummary.from_dict(self.crash_summary)
        return summary.lines() if summary else []

    def readme_text(self) -> str:
        def line(key: str, value: object) -> str:
            return f"{key:<15}: {value}\n"

        def when(t: float | int | None) -> str:
            if t is None:
                return "unknown"
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

        title = {
            "complete": "Kernel crashdump",
            "incomplete": "Kernel crashdump (INCOMPLETE)",
        }.get(self.status, "Kernel crashdump (FAILED)")
        out = f"{title}\n{'-' * len(title)}\n\n"
        summary = self.summary_lines()
        if summary:
            out += "".join(f"{s}\n" for s in summary) + "\n"
        out += line("Status", self.status + (f": {self.error}" if self.error else ""))
        out += line("Crash time", when(self.crash_time))
        out += line("Kernel version", self.kernel_release or "unknown")
        out += line("Host", self.host)
        out += line("Dump level", self.dump_level)
        out += line("Dump format", self.dump_format)
        out += line("Dump started", when(self.started))
        out += line("Dump finished", when(self.finished))
        out += line("Duration", f"{self.finished - self.started:.1f} s")
        if self.source_size is not None:
            out += line("Source size", f"{self.source_size} bytes ({self.source})")
        if self.pages_total:
            out += line("Pages", f"{self.pages_written} of {self.pages_total} written")
        out += "\nFiles:\n"
        for name, info in sorted(self.files.items()):
            out += f"  {name:<12} {info['size']:>14} bytes  {_digest(info)}\n"
            plain = info.get("plaintext")
            if isinstance(plain, dict):
                out += f"  {'(decrypted)':<12} {plain.get('size'):>14} bytes  {_digest(plain)}\n"

        vmcore = VMCORE + (AGE_SUFFIX if self.encryption else "")
        if vmcore not in self.files:
            out += f"  (no {vmcore}: see Status)\n"
        elif self.status == "incomplete":
            out += f"  ({vmcore} holds only what was read before the source failed: see Status)\n"
        if self.unreadable_bytes:
            out += (
                f"\nUNREADABLE: {self.unreadable_bytes} bytes of the source could not be read "
                "(read errors, each retried once);\nthey are zeros in the vmcore. Source ranges:\n"
            )
            for r in self.unreadable:
                paddr = "" if r["paddr"] is None else f"  (physical {r['paddr']:#x})"
                out += f"  offset {r['offset']:#x}, {r['size']} bytes{paddr}\n"
            if sum(r["size"] for r in self.unreadable) < self.unreadable_bytes:
                out += "  (more ranges than listed)\n"
        if self.encryption:
            out += (
                "\nENCRYPTED: vmcore and dmesg.txt are encrypted in the age format to the "
                "public keys\nlisted in manifest.json ('encryption'). Decrypt with the "
                "private key:\n"
                "  kdump-capture decrypt --identity KEY DIR   (checks the checksums above; "
                "also\n"
                "                                              rebuilds a flattened vmcore)\n"
                "or with age itself:  age -d -i KEY -o vmcore vmcore.age\n"
            )
        if self.flattened and self.encryption:
            out += (
                "\nNOTE: the vmcore inside vmcore.age is in makedumpfile's flattened format:\n"
                "'kdump-capture decrypt' rebuilds the normal file; with age:\n"
                "  age -d -i KEY vmcore.age | makedumpfile -R vmcore\n"
            )
        elif self.flattened:
            out += (
                "\nNOTE: vmcore is in makedumpfile's flattened format. Before opening it with\n"
                "crash, rebuild the normal file:  kdump-capture rearrange vmcore vmcore.kdump\n"
                "(or: makedumpfile -R vmcore.kdump < vmcore)\n"
            )
        for n in self.notes:
            out += f"\nNOTE: {n}\n"
        out += f"\nChecksums are in {MANIFEST}; check them with: kdump-capture verify DIR\n"
        if self.encryption:
            out += "(verify checks the encrypted files as stored: it needs no key)\n"
        return redact(out)


def _redacted(value: object) -> object:
    """Every string in a JSON document through urls.redact."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _digest(info: dict) -> str:
    """The algorithm and hex digest of a file entry we wrote (SHA-256 when unnamed)."""
    algorithm = info.get("algorithm", "sha256")
    return f"{algorithm} {info.get(algorithm)}"
