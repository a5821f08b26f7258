"""The systemd units, checked by systemd-analyze verify in a root laid out as the README's
set-up leaves it (pip puts the kdump-capture script in /usr/local/bin on Debian)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "initramfs"
UNITS = [*sorted((SRC / "systemd").glob("*.service")), SRC / "dracut/kdump-capture-save.service"]
SCRIPT = "usr/local/bin/kdump-capture"  # Debian's pip: sysconfig scheme posix_local
INIT = "usr/lib/kdump-capture/init"  # where the dracut module puts our /init


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_where_the_engine_is_installed(unit, tmp_path):
    """kdump-capture.service named /usr/bin/kdump-capture, which pip never writes on
    Debian: the unit failed with 203/EXEC at boot and kdump was never loaded."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in (SCRIPT, INIT):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    dest = root / "etc/systemd/system" / unit.name
    dest.parent.mkdir(parents=True)
    shutil.copy(unit, dest)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", f"/{dest.relative_to(root)}"],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
