"""The systemd units, checked by systemd-analyze verify in a root laid out as the README's
set-up leaves it (pip puts the kdump-capture script in /usr/local/bin on Debian); the dracut
module's install() run by bash with dracut's functions stubbed."""

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


# Stands in for `python -m kdump_capture initramfs build --output FILE ...`: a payload with a
# password in it, either a real gzip'd cpio with /init or, as a write cut short by a full
# $TMPDIR leaves it, not gzip at all.
FAKE_ENGINE = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done
if [ "$MODE" = broken ]; then printf 'KDUMP_SAVEDIR=ftp://u:SECRET@h/d' > "$out"; exit 0; fi
d=$(mktemp -d) && mkdir -p "$d/etc" && echo '#!init' > "$d/init" &&
printf 'KDUMP_SAVEDIR=ftp://u:SECRET@h/d' > "$d/etc/kdump" &&
(cd "$d" && find . | cpio -o -H newc --quiet | gzip) > "$out" && rm -rf "$d"
"""

HARNESS = """derror() { echo "derror: $*" >&2; }
dracut_module_included() { return 1; }
inst_hook() { :; }
. "$moddir/module-setup.sh"
install
"""


@pytest.mark.parametrize("mode", ["broken", "good"])
def test_dracut_module_leaves_no_payload_behind(mode, tmp_path):
    """A payload that failed to unpack stayed in $TMPDIR with the password in it."""
    moddir, tmpdir, initdir = tmp_path / "mod", tmp_path / "tmp", tmp_path / "initdir"
    shutil.copytree(SRC / "dracut", moddir)
    tmpdir.mkdir()
    engine = tmp_path / "engine"
    engine.write_text(FAKE_ENGINE)
    engine.chmod(0o755)
    (moddir / "engine.conf").write_text(f"KDUMP_CAPTURE_PYTHON={engine}\n")
    env = dict(moddir=str(moddir), initdir=str(initdir), kernel="9.9", srcmods="/none")
    env.update(TMPDIR=str(tmpdir), MODE=mode, PATH="/usr/bin:/bin")
    r = subprocess.run(["bash", "-c", HARNESS], env=env, capture_output=True, text=True)
    assert list(tmpdir.iterdir()) == []
    if mode == "broken":
        assert r.returncode == 1 and "unpacking the capture payload failed" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert (initdir / "usr/lib/kdump-capture/init").read_text() == "#!init\n"
        assert (initdir / "etc/kdump").exists() and not (initdir / "init").exists()
