"""The dracut path: a capture image built by Debian's dracut with our module, in a real crash.

Red Hat-family admins build capture images with dracut. These cases build one with the
system's dracut (a private copy of its module tree, with our module installed by
`kdump-capture initramfs dracut-module`), load it with our loader in a TCG guest, crash, and
check the dump exactly as for our own image: verify, dmesg marker, makedumpfile, reboot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import capture_cycle, vmkit
from tests.helpers import ROOT
from tests.test_e2e_vm import _explain, check_dump

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# Modules a capture image does not need: our payload brings its own kernel modules (only
# those the target needs), and a capture kernel mounts no root filesystem. Without this
# list dracut --no-hostonly packs every storage driver: 92 MiB unpacked instead of ~50.
OMIT = (
    "kernel-modules kernel-modules-extra crypt dm resume nvdimm lunmask rootfs-block "
    "usrmount virtiofs qemu modsign terminfo btrfs"
)
NO_SYSTEMD = "systemd systemd-initrd dracut-systemd systemd-udevd"
# The smallest reservation that works for these images, measured in this harness (1 GiB
# guest, FTP, compressed -d 31): 192M. With systemd the image unpacks to 53.5 MB and at 160M
# the capture kernel does not reach our service; without systemd (49.6 MB) the save starts
# with 48 MB available and is OOM-killed at 49 MiB RSS. Our own image works at 160M.
DRACUT_CRASHKERNEL = 192


def build_dracut_image(
    kernel: vmkit.Kernel, config_text: str, work: Path, omit: str = OMIT
) -> Path:
    """dracut --add kdump-capture, with our module installed into a copy of dracut's tree."""
    dracut = shutil.which("dracut")
    assert dracut, "dracut is not installed (setup.sh installs Debian's dracut-core)"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "kdump.conf"
    conf.write_text(config_text)
    base = work / "dracut"
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    env = dict(os.environ, PYTHONPATH=ROOT, KDUMP_CONFIG=str(conf), dracutbasedir=str(base))
    dest = base / "modules.d" / "99kdump-capture"
    subprocess.run(
        [sys.executable, "-m", "kdump_capture", "initramfs", "dracut-module", "--dest", str(dest)],
        env=env,
        check=True,
        capture_output=True,
    )
    image = work / "dracut.img"
    r = subprocess.run(
        [
            dracut,
            "--no-hostonly",
            "--force",
            "--add",
            "kdump-capture",
            "--omit",
            omit,
            "--kver",
            kernel.version,
            "--kmoddir",
            str(kernel.modules_root),
            str(image),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (work / "dracut.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert image.stat().st_mode & 0o077 == 0, "the image holds secrets: it must be 0600"
    return image


FTP_CONFIG = (
    'KDUMP_SAVEDIR="ftp://{user}:{password}@10.0.2.2:{port}/dumps"\n'
    'KDUMP_DUMPFORMAT="compressed"\n'
    'KDUMP_DUMPLEVEL="31"\n'
    'KDUMP_IMMEDIATE_REBOOT="yes"\n'
    'KDUMP_KEEP_OLD_DUMPS="0"\n'
)
# The crashed system's root= on the capture kernel's command line, as on a real machine, for
# a device the capture kernel cannot find: dracut waits 5 s for it (rd.timeout), then starts
# its emergency service in the middle of the dump, which with rd.shell=0 (no shell, as on
# locked-down machines) halts the machine.
MISSING_ROOT = 'KDUMP_COMMANDLINE_APPEND="root=LABEL=crashed-root rd.timeout=5 rd.shell=0"\n'


@pytest.mark.parametrize(
    ("flow", "extra", "omit"),
    [
        ("systemd", MISSING_ROOT, OMIT),
        ("systemd-no-root", "", OMIT),
        ("no-systemd", "", f"{OMIT} {NO_SYSTEMD}"),
    ],
)
def test_dracut_image_saves_and_reboots(
    flow: str, extra: str, omit: str, cloud_kernel: vmkit.Kernel, tmp_path: Path
):
    from tests.servers import ftp

    root = tmp_path / "ftproot"
    (tmp_path / "ftpd").mkdir()
    with ftp.pyftpd(str(tmp_path / "ftpd"), str(root)) as s:
        config = FTP_CONFIG.format(user=s.user, password=s.password, port=s.port) + extra
        image = build_dracut_image(cloud_kernel, config, tmp_path / "dracut", omit)
        res = capture_cycle.run_cycle(
            cloud_kernel,
            config,
            tmp_path / "cycle",
            crashkernel_mib=DRACUT_CRASHKERNEL,
            net=True,
            loaded=image,
        )
    assert res.save_rc == 0, _explain(res)
    assert res.finish == "rebooting" and res.returncode == 0, _explain(res)
    assert "emergency" not in res.console.lower(), _explain(res)
    found = [d for d in (root / "dumps").iterdir() if d.is_dir()]
    assert len(found) == 1, list((root / "dumps").iterdir())
    # FTP cannot seek: the vmcore is flattened; rebuild it as the dump's README says.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdump_capture",
            "rearrange",
            str(found[0] / "vmcore"),
            str(found[0] / "vmcore.kdump"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    check_dump(found[0], res.marker, "vmcore.kdump")
