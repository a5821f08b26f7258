"""Install our dracut module ("kdump-capture") where dracut finds it.

dracut searches only /usr/sbin:/usr/bin:/sbin:/bin for programs, while pip puts the
`kdump-capture` script in /usr/local/bin (or a virtualenv). The module therefore does not look
for the script: ``engine.conf`` records the interpreter that has our packages (the one running
this) and the module runs ``PYTHON -m kdump_capture``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from importlib import resources

from kdump_capture.errors import ConfigError

DEFAULT_DEST = "/usr/lib/dracut/modules.d/99kdump-capture"
# The module's files and their modes (dracut runs module-setup.sh and the hook as scripts).
FILES = {
    "module-setup.sh": 0o755,
    "kdump-capture-hook.sh": 0o755,
    "kdump-capture-save.service": 0o644,
    "capture-kernel.conf": 0o644,
}


def install(dest: str = DEFAULT_DEST, python: str | None = None) -> list[str]:
    """Copy the module into ``dest`` and record the engine's interpreter; return the paths.

    The module is code, not a secret (0755/0644); the secrets go into the image, which the
    builder creates 0600.
    """
    python = os.path.realpath(python or sys.executable)
    if not os.access(python, os.X_OK):
        raise ConfigError(f"{python}: not an executable interpreter")
    parent = os.path.dirname(os.path.normpath(dest))
    if not os.path.isdir(parent):
        raise ConfigError(
            f"{parent}: no such directory (is dracut installed? Debian: apt install dracut-core)"
        )
    os.makedirs(dest, mode=0o755, exist_ok=True)
    src = resources.files("initramfs").joinpath("dracut")
    written = [
        _put(os.path.join(dest, name), src.joinpath(name).read_bytes(), mode)
        for name, mode in FILES.items()
    ]
    conf = (
        "# written by `kdump-capture initramfs dracut-module`: the interpreter with our packages\n"
        f"KDUMP_CAPTURE_PYTHON={shlex.quote(python)}\n"
    )
    written.append(_put(os.path.join(dest, "engine.conf"), conf.encode(), 0o644))
    return written


def _put(path: str, data: bytes, mode: int) -> str:
    """Write ``path`` atomically (a temporary name, then rename); never through a link."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
