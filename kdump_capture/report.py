"""The files that describe a dump: README.txt for people, manifest.json for programs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from . import __version__
from .urls import redact

MANIFEST = "manifest.json"
README = "README.txt"
VMCORE = "vmcore"
DMESG = "dmesg.txt"

PLACEHOLDER = (
    "Kernel crashdump (INCOMPLETE)\n"
    "-----------------------------\n\n"
    "This file is replaced when the dump is finished.\n"
    "If you see this text, saving the dump was interrupted: the dump is incomplete.\n"
)


@dataclass
class DumpRecord:
    """Everything README.txt and manifest.json say about one dump."""

    status: str  # "complete", "incomplete" (saved, but only part of the source) or "failed"
    host: str
    target: str  # redacted URL
    directory: str
    crash_time: int | None
    kernel_release: str | None
    dump_level: int
    dump_format: str
    flattened: bool = False
    source: str = ""
    source_size: int | None = None
    started: float = 0.0
    finished: float = 0.0
    pages_total: int = 0
    pages_written: int = 0
    files: dict[str, dict] = field(default_factory=dict)  # name -> {size, sha256}
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    #: source ranges that could not be read and are zeros in the vmcore:
    #: {"offset", "size", "paddr" (None if not in a PT_LOAD)}
    unreadable: list[dict] = field(default_factory=list)
    unreadable_bytes: int = 0

    def manifest_json(self) -> bytes:
        doc = {"tool": "kdump-capture", "version": __version__, **asdict(self)}
        # The target, errors and notes quote servers and libraries: no password may pass.
        return (json.dumps(_redacted(doc), indent=2, sort_keys=True) + "\n").encode()

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
            out += f"  {name:<12} {info['size']:>14} bytes  sha256 {info['sha256']}\n"
        if VMCORE not in self.files:
            out += f"  (no {VMCORE}: see Status)\n"
        elif self.status == "incomplete":
            out += f"  ({VMCORE} holds only what was read before the source failed: see Status)\n"
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
        if self.flattened:
            out += (
                "\nNOTE: vmcore is in makedumpfile's flattened format. Before opening it with\n"
                "crash, rebuild the normal file:  kdump-capture rearrange vmcore vmcore.kdump\n"
                "(or: makedumpfile -R vmcore.kdump < vmcore)\n"
            )
        for n in self.notes:
            out += f"\nNOTE: {n}\n"
        out += f"\nChecksums are in {MANIFEST}; check them with: kdump-capture verify DIR\n"
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
