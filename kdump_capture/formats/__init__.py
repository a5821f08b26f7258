"""Format writers: the only code that knows a dump file's layout.

A writer reads the source vmcore in fixed-size chunks into preallocated buffers and writes
the output to a transport ``Sink``. It reports each chunk to a ``Monitor`` (progress and the
free-space budget), which may raise to stop the dump.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import NotSupported
from ..memory import BufferPlan
from ..vmcore import Vmcore

# typing.TYPE_CHECKING without importing typing, which costs the capture's start-up ~3 ms
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Monitor(Protocol):
        """Observes the stream. ``advance`` may raise (FreeSpaceError, Interrupted)."""

        def advance(self, read: int, written: int) -> None: ...


# 1 MiB: large enough to amortise syscalls and Python overhead per chunk, small enough
# for a capture kernel with ~60 MB available (see ENVIRONMENT.md measurements).
CHUNK = 1 << 20


class NullMonitor:
    def advance(self, read: int, written: int) -> None:
        pass


class WriteResult:
    """What a writer produced, for README.txt and the manifest."""

    __slots__ = (
        "format",
        "dump_level",
        "pages_total",
        "pages_written",
        "flattened",
        "notes",
        "incomplete",
    )

    def __init__(
        self,
        format: str,  # human description, e.g. "ELF" or "kdump-compressed (zlib)"
        dump_level: int,  # the level actually applied
        pages_total: int = 0,
        pages_written: int = 0,
        flattened: bool = False,
        notes: list[str] | None = None,  # fallbacks and caveats, one line each
        # why the dump is incomplete (the source ended early or failed), None when it is
        # not; what was read before is in the file
        incomplete: str | None = None,
    ) -> None:
        self.format = format
        self.dump_level = dump_level
        self.pages_total = pages_total
        self.pages_written = pages_written
        self.flattened = flattened
        self.notes = [] if notes is None else notes
        self.incomplete = incomplete


class FormatWriter(ABC):
    """Writes one dump file. ``needs_seek`` writers get only seekable sinks."""

    needs_seek = False
    produces_file = True  # False only for format "none": no vmcore file is created

    def __init__(self, vm: Vmcore, level: int) -> None:
        self.vm = vm
        self.level = level

    @abstractmethod
    def input_size(self) -> int | None:
        """Bytes the writer will read from the source in total (for progress), if known."""

    @abstractmethod
    def estimate(self) -> int | None:
        """An upper bound of the output size in bytes, if one is known before writing."""

    def lower_bound(self) -> int:
        """Bytes the output will certainly hold: what a free-space check may demand up front.

        0 unless a writer knows better. A compressed dump's page data is known only as it
        streams, so its bound is the metadata; never more than what is really written.
        """
        return 0

    @abstractmethod
    def write(self, sink, monitor: Monitor) -> WriteResult: ...


FORMAT_NAMES = {
    "elf": "ELF",
    "raw": "raw copy of the source",
    "compressed": "kdump-compressed (zlib)",
    "zstd": "kdump-compressed (zstd)",
    "lzo": "kdump-compressed (lzo)",
    "snappy": "kdump-compressed (snappy)",
    "none": "none (dmesg only)",
}


KDUMP_CODECS = ("compressed", "zstd", "lzo", "snappy")


def make_writer(
    vm: Vmcore, fmt: str, level: int, seekable: bool, buffers: BufferPlan | None = None
) -> FormatWriter:
    """The writer for KDUMP_DUMPFORMAT ``fmt`` at KDUMP_DUMPLEVEL ``level``.

    ``fmt`` is canonical lowercase: elf, compressed, zstd, lzo, snappy, none, raw. A
    kdump-compressed writer for a non-seekable sink writes the flattened format (its
    WriteResult says ``flattened=True``). Raises NotSupported for combinations this build
    cannot write. ``buffers`` bounds the kdump-compressed writer's threads and batches.
    """
    from .elf import ElfWriter, NoneWriter, RawWriter

    if not 0 <= level <= 31:
        raise NotSupported(f"KDUMP_DUMPLEVEL={level}: dump levels are 0-31")
    if fmt == "none":
        return NoneWriter(vm, level)
    if fmt == "raw" or vm.kind == "raw":
        if level != 0:
            raise NotSupported(
                f"dump level {level} needs an ELF vmcore; {vm.path} is raw memory (use level 0)"
            )
        return RawWriter(vm, 0)
    if fmt == "elf":
        return ElfWriter(vm, level)
    if fmt in KDUMP_CODECS:
        from .kdump import KdumpWriter, get_codec

        return KdumpWriter(vm, level, get_codec(fmt), flattened=not seekable, buffers=buffers)
    raise NotSupported(f"KDUMP_DUMPFORMAT={fmt}: unknown format")
