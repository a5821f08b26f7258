"""Run one fuzz input under the time and memory bounds, in this process."""

from __future__ import annotations

import signal
import time
import tracemalloc
from collections.abc import Callable

from kdump_capture.errors import KdumpError

from . import MIB, SECONDS


class Finding(AssertionError):
    """An input broke a property: a foreign exception, too slow, or too much memory."""


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException, so no `except Exception` in the code swallows it."""


def _alarm(signum, frame):
    raise _Timeout()


def run_bounded(
    fn: Callable[[bytes], object], data: bytes, seconds: float = SECONDS, mib: int = MIB
) -> None:
    """Call ``fn(data)``; raise Finding unless it returns or raises KdumpError within bounds.

    Memory is what tracemalloc sees (every Python object and buffer, which is where an
    unchecked size from a header ends up); time is wall time, enforced by SIGALRM so that a
    blocking read or an endless loop is interrupted too. The alarm is generous (4x) so that a
    slow CI machine does not turn into findings; the measured time must stay within bounds.
    """
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds * 4)
    t0 = time.monotonic()
    try:
        fn(data)
    except KdumpError:
        pass
    except _Timeout:
        raise Finding(f"no answer after {seconds * 4:.0f} s on {len(data)}-byte input") from None
    except Exception as e:  # the property under test: nothing but our own errors
        raise Finding(f"{type(e).__name__}: {e} on {len(data)}-byte input") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        if started_tracing:
            tracemalloc.stop()
    took = time.monotonic() - t0
    if took > seconds:
        raise Finding(f"took {took:.2f} s (limit {seconds} s) on {len(data)}-byte input")
    if peak > mib << 20:
        raise Finding(f"peak {peak >> 20} MiB (limit {mib} MiB) on {len(data)}-byte input")
