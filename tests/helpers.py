"""Shared test helpers: run the CLI as a user would, make sample vmcores."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    rc: int
    out: str
    err: str


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> Run:
    """Run ``python3 -m kdump_capture ARGS`` and capture its output."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    p = subprocess.run(
        [sys.executable, "-m", "kdump_capture", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(p.returncode, p.stdout, p.stderr)


def save_args(vmcore: str, savedir: str, *sets: str) -> list[str]:
    """Arguments of a `save` with no config file, to a local directory, never rebooting."""
    args = ["save", "--config", "/nonexistent/kdump", "--vmcore", vmcore, "--no-reboot"]
    args += ["--set", f"KDUMP_SAVEDIR=file://{savedir}"]
    for s in sets:
        args += ["--set", s]
    return args
