"""Helpers for test servers: free loopback ports, polling until a port answers, processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"
# Servers here start in well under a second; 20 s only bounds a broken one.
START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(
    check: Callable[[], bool],
    what: str,
    proc: subprocess.Popen | None = None,
    log: str = "",
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll ``check`` until true; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before it was ready{_tail(log)}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling interval, not a guess at the start-up time
    raise RuntimeError(f"{what} did not become ready within {timeout}s{_tail(log)}")


def banner_check(port: int, prefix: bytes) -> Callable[[], bool]:
    """A readiness check: connect and expect the server's greeting to start with ``prefix``."""

    def check() -> bool:
        with socket.create_connection((LOOPBACK, port), timeout=2) as s:
            return s.recv(64).startswith(prefix)

    return check


def port_check(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection((LOOPBACK, port), timeout=2):
            return True

    return check


def _tail(path: str) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "\n--- server log ---\n" + f.read()[-3000:]


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a set-up command; raise with its output if it fails."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr or p.stdout}")
    return p


@contextlib.contextmanager
def process(
    argv: list[str], log: str, what: str, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until ``ready``, stop it afterwards."""
    # Own session: smbd signals its whole process group when it stops, and must not hit us.
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for(ready, what, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TEST_USER = "kdumptest"


@contextlib.contextmanager
def unix_user(password: str) -> Iterator[str]:
    """A throw-away local user with a password (for password logins); removed afterwards."""
    subprocess.run(["userdel", "-f", TEST_USER], capture_output=True)
    run(["useradd", "-M", "-d", "/", "-s", "/bin/sh", TEST_USER])
    try:
        run(["chpasswd"], input=f"{TEST_USER}:{password}\n")
        yield TEST_USER
    finally:
        subprocess.run(["userdel", "-f", TEST_USER], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: str, size: str = "8m") -> Iterator[str]:
    """A small tmpfs mounted on ``path`` (for disk-full tests), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
