"""Fuzzing harness: every parser of untrusted input, driven by atheris or hypothesis.

Targets live in ``t_<area>.py`` modules, each exporting ``TARGETS``: a dict from a target
name to a function taking the raw input bytes. A target may raise only our own errors
(``KdumpError``); anything else, more than ``SECONDS`` of wall time or more than ``MIB`` of
traced memory is a finding. Inputs that once failed are kept under ``corpus/<target>/`` and
replayed by ``tests/test_fuzz.py`` on every run.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# The bounds: no input may take longer than 2 s or more than 256 MiB.
SECONDS = 2.0
MIB = 256

Target = Callable[[bytes], object]


def targets() -> dict[str, Target]:
    """All registered fuzz targets, by name (modules tests/fuzz/t_*.py)."""
    found: dict[str, Target] = {}
    for info in pkgutil.iter_modules([str(HERE)]):
        if not info.name.startswith("t_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name, fn in mod.TARGETS.items():
            if name in found:
                raise RuntimeError(f"fuzz target {name} registered twice")
            found[name] = fn
    return found


def corpus_files(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
