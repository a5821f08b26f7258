"""Progress reporting: a small callback protocol, a tqdm bar and a plain-line printer."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from .errors import KdumpError

# typing.TYPE_CHECKING without importing typing, which costs the capture's start-up ~3 ms
TYPE_CHECKING = False
if TYPE_CHECKING:
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
    """Plain lines for logs and serial consoles, where a redrawn bar is unreadable: one at
    every 10 % and at least every ``interval`` seconds while data flows, each with the
    percentage, the amount, the rate and the time left (or the amount and rate when the
    total is unknown, with a line per 256 MiB)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stdout
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.total: int | None = None
        self.next_mark = 0
        self.t0 = self.last = 0.0
        self.label = ""
        self.lines = 0

    def start(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total or None, 0
        self.t0 = self.last = self.clock()
        self.next_mark = 10 if self.total else 256 << 20

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        due = now - self.last >= self.interval
        if self.total:
            pct = self.done * 100 // self.total
            if pct >= self.next_mark:
                due = True
                while self.next_mark <= pct:
                    self.next_mark += 10
        elif self.done >= self.next_mark:
            due = True
            self.next_mark = (self.done // (256 << 20) + 1) * (256 << 20)
        if due:
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        self.last = now
        self.lines += 1
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: "
        if self.total:
            text += f"{min(self.done * 100 // self.total, 100):3d}% "
        text += f"{self.done / 1e6:.0f}"
        text += f"/{self.total / 1e6:.0f} MB" if self.total else " MB"
        text += f", {rate / 1e6:.1f} MB/s"
        if final:
            text += f", done in {elapsed:.0f} s"
        elif self.total and rate > 0:
            text += f", ETA {eta(max(self.total - self.done, 0) / rate)}"
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._line(self.clock(), final=True)


def eta(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``: short, for a console line."""
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class TqdmProgress:
    """A tqdm bar that stays readable on a serial console: ASCII, at most 2 redraws/s."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.bar = None
        self._logs = None

    def start(self, label: str, total: int | None) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines while the bar is shown go through tqdm, which takes the bar away and
        # draws it again below them: written beside it, they were glued onto its end.
        self._logs = logging_redirect_tqdm()
        self._logs.__enter__()

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
        if self._logs is not None:
            self._logs.__exit__(None, None, None)
            self._logs = None


class TolerantOutput:
    """Standard output of a save or a recover: progress, the "Dump saved" line. A write that
    fails (a console gone, a closed pipe, a full file) must not fail the dump it reports on:
    it is dropped, said once on standard error, and nothing more is written."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def _failed(self, e: Exception) -> None:
        if not self.broken:
            self.broken = True
            try:
                sys.stderr.write(f"kdump-capture: warning: output stopped: {e}\n")
            except (OSError, ValueError):
                pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except (OSError, ValueError, KdumpError) as e:
                self._failed(e)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError, KdumpError) as e:
                self._failed(e)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


PROGRESS_STYLES = ("auto", "lines", "bar")


def _draws_a_bar(stream: TextIO) -> bool:
    """A terminal that can show a redrawn bar: a serial console (``/dev/ttyS0``, the console
    of `recover` in runlevel 1) reports a window of 0x0, on which tqdm draws nothing at all,
    and ``TERM=dumb`` (or none) cannot move the cursor back."""
    if not stream.isatty() or os.environ.get("TERM", "dumb") == "dumb":
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


def make_progress(verbose: int, stream: TextIO | None = None, style: str = "auto") -> Progress:
    """KDUMP_VERBOSE bit 2 asks for progress: ``bar`` (tqdm), ``lines``, or ``auto``: a bar
    on a terminal, lines otherwise. The capture kernel asks for lines: its console is a
    terminal, but what matters is the serial log, where a redrawn bar shows nothing."""
    if not verbose & 2:
        return NoProgress()
    stream = stream or sys.stdout
    if not isinstance(stream, TolerantOutput):
        stream = TolerantOutput(stream)
    if style == "bar" or (style == "auto" and _draws_a_bar(stream)):
        try:
            import tqdm  # noqa: F401  capture images leave it out: lines there
        except ImportError:
            return LineProgress(stream)
        return TqdmProgress(stream)
    return LineProgress(stream)
