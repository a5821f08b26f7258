"""What another host can leave on a shared target, planted straight into a server's directory."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BAD_NO_SIZE = json.dumps({"status": "complete", "files": {"vmcore": {"sha256": "0" * 64}}}).encode()

# Issue 8, item 4: each of these in a dump's manifest.json once stopped every host's save.
BAD_MANIFESTS: dict[str, Callable[[str], None]] = {
    "list": lambda p: _write(p, b"[]"),  # AttributeError
    "string": lambda p: _write(p, b'"x"'),  # AttributeError
    "deep": lambda p: _write(p, b"[" * 100_000),  # RecursionError
    "no-size": lambda p: _write(p, BAD_NO_SIZE),
    "fifo": lambda p: os.mkfifo(p, 0o644),  # the save hung
    "zero-link": lambda p: os.symlink("/dev/zero", p),  # MemoryError
    "sparse-3g": lambda p: _sparse(p, 3 << 30),  # MemoryError
}


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)


def _sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, 0o644)


def plant_dir(path: str, manifest: str | bytes | None = None) -> str:
    """A directory readable by every server user, with a bad (name) or given manifest."""
    os.mkdir(path)
    os.chmod(path, 0o755)
    target = os.path.join(path, "manifest.json")
    if isinstance(manifest, str):
        BAD_MANIFESTS[manifest](target)
    elif manifest is not None:
        _write(target, manifest)
    return path


def make_victim(path: str) -> dict[str, bytes]:
    """A directory any server user could empty if it followed a link into it."""
    os.mkdir(path)
    os.mkdir(os.path.join(path, "sub"))
    files = {"precious": b"must survive\n", "sub/deeper": b"also\n", "manifest.json": b"{}"}
    for name, data in files.items():
        _write(os.path.join(path, name), data)
        os.chmod(os.path.join(path, name), 0o666)
    for d in (path, os.path.join(path, "sub")):
        os.chmod(d, 0o777)
    return snapshot(path)


def snapshot(path: str) -> dict[str, bytes]:
    """Every file below ``path`` with its content (links not followed)."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocked open() or recv()."""

    def fire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
