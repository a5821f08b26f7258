"""Where vmkit keeps downloaded kernels and generated samples, and the lock that guards them."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "KDUMP_CAPTURE_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return (and create) the cache root: *override*, ``$KDUMP_CAPTURE_CACHE`` or
    ``~/.cache/kdump-capture``."""
    if override is not None:
        root = Path(override)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path.home() / ".cache" / "kdump-capture"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path* (created if missing) for the ``with`` body.

    Parallel test processes (pytest-xdist, a bench run next to a test run) block here
    instead of downloading or generating the same artefact twice.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for lock %s", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
