"""The optional compiled accelerator (``_speedups``) for the per-page loops, and its fallback.

``_speedups`` is a C extension built when the package is installed, if a compiler is there
(setup.py marks it optional: without one, installing still works). It walks struct pages,
finds zero pages, compresses pages (zlib; zstd and lzo when built against libzstd and
liblzo2) and packs page descriptors. Each function has a pure-Python reference next to its
caller; tests check that both give the same bitmaps and bytes. Set
KDUMP_CAPTURE_PURE_PYTHON=1 to use the Python path although the accelerator is built.
"""

from __future__ import annotations

import os
from types import ModuleType

_loaded = False
_module: ModuleType | None = None
_error = ""


def module() -> ModuleType | None:
    """The compiled module, or None when it is not built (or turned off)."""
    global _loaded, _module, _error
    if not _loaded:
        _loaded = True
        if os.environ.get("KDUMP_CAPTURE_PURE_PYTHON", "") not in ("", "0"):
            _error = "turned off by KDUMP_CAPTURE_PURE_PYTHON"
        else:
            try:
                from . import _speedups  # type: ignore[attr-defined]

                _module = _speedups
            except ImportError as e:
                _module = _beside_the_zip()
                if _module is None:
                    _error = f"not built ({e})"
    return _module


def _beside_the_zip() -> ModuleType | None:
    """A capture image keeps this package's .pyc files in python3XY.zip (deflated: less
    RAM) and the extension on disk in site-packages/kdump_capture/, where the package's
    ``__path__`` (inside the zip) does not look. Load it from there by its file name."""
    if __spec__ is None or ".zip" not in (__file__ or ""):
        return None
    import importlib.machinery
    import importlib.util
    import sys

    for d in sys.path:
        pkg = os.path.join(d, "kdump_capture")
        try:
            names = sorted(os.listdir(pkg))
        except OSError:
            continue
        for n in names:
            if n.startswith("_speedups.") and n.endswith(".so"):
                name = "kdump_capture._speedups"
                loader = importlib.machinery.ExtensionFileLoader(name, os.path.join(pkg, n))
                spec = importlib.util.spec_from_file_location(name, loader.path, loader=loader)
                if spec is None:
                    return None
                try:
                    mod = importlib.util.module_from_spec(spec)
                    loader.exec_module(mod)
                except ImportError:
                    return None
                sys.modules[name] = mod
                return mod
    return None


def zstd_path(mod: ModuleType) -> str:
    """Which library compresses zstd pages: the accelerator links libzstd only when its
    headers were there at build time (setup.py); else python-zstandard, batch by batch."""
    version = getattr(mod, "ZSTD_VERSION", None)
    if version is None or not hasattr(mod, "zstd_pages"):
        return "python-zstandard (accelerator built without libzstd: install libzstd-dev)"
    major, minor, patch = version // 10000, version // 100 % 100, version % 100
    return f"compiled, libzstd {major}.{minor}.{patch}"


def lzo_path(mod: ModuleType) -> str:
    """Which library compresses lzo pages: liblzo2 in the accelerator when its headers were
    there at build time, else python-lzo page by page (several times slower)."""
    version = getattr(mod, "LZO_VERSION", None)  # defined with lzo_pages (HAVE_LZO)
    if version is None:
        return "python-lzo (accelerator built without liblzo2: install liblzo2-dev)"
    return f"compiled, liblzo2 {version}"


def zlib_path(mod: ModuleType) -> str:
    """Which deflate writes zlib pages: our own level-1 deflate when, at import, it gave the
    bytes of the linked zlib on built-in test pages; else zlib's (a patched or hardware
    zlib, whose output makedumpfile on this system has too)."""
    version = getattr(mod, "ZLIB_VERSION", "?")
    if getattr(mod, "ZLIB_DEFLATE", "") == "own":
        return f"own level-1 deflate, the same bytes as zlib {version}"
    return f"zlib {version} (our deflate differs from it here)"


def describe() -> str:
    """One line for ``check`` and the dump's README: which path is active."""
    mod = module()
    if mod is not None:
        name = os.path.basename(mod.__file__ or "_speedups")
        return (
            f"compiled accelerator ({name}); zlib pages: {zlib_path(mod)}; "
            f"lzo pages: {lzo_path(mod)}; "
            f"zstd pages: {zstd_path(mod)}"
        )
    return f"pure Python ({_error}); saves are slower but complete"
