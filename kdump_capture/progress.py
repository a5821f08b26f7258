"""Progress reporting: a small callback protocol, a tqdm bar and a plain-line printer."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, label: str, total: int | None) -> None: ...
    def update(self, n: int) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int | None) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class LineProgress:
    """One plain line per 10% (or per 256 MiB when the total is unknown); for logs and
    serial consoles that are not terminals."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.done = 0
        self.total: int | None = None
        self.next_mark = 0
        self.t0 = 0.0
        self.label = ""

    def start(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = time.monotonic()
        self.next_mark = 10 if total else 256 << 20

    def update(self, n: int) -> None:
        self.done += n
        if self.total:
            pct = self.done * 100 // self.total
            while pct >= self.next_mark and self.next_mark <= 100:
                self._line(f"{self.next_mark:3d}%")
                self.next_mark += 10
        elif self.done >= self.next_mark:
            self._line(f"{self.done >> 20} MiB")
            self.next_mark += 256 << 20

    def _line(self, what: str) -> None:
        dt = max(time.monotonic() - self.t0, 1e-6)
        rate = self.done / dt / 1e6
        self.stream.write(f"{self.label}: {what} ({self.done >> 20} MiB, {rate:.1f} MB/s)\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.total is None or self.next_mark <= 100:
            self._line("done")


class TqdmProgress:
    """A tqdm bar that stays readable on a serial console: ASCII, at most 2 redraws/s."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.bar = None

    def start(self, label: str, total: int | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            ascii=True,
            mininterval=0.5,
            file=self.stream,
            dynamic_ncols=False,
            ncols=79,
        )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(verbose: int, stream: TextIO | None = None) -> Progress:
    """KDUMP_VERBOSE bit 2 asks for progress: a bar on a terminal, plain lines otherwise."""
    if not verbose & 2:
        return NoProgress()
    stream = stream or sys.stdout
    if stream.isatty():
        return TqdmProgress(stream)
    return LineProgress(stream)
