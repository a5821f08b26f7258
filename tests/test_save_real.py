"""Saving a real vmcore (a crashed Debian cloud-kernel guest): the real tools read our output."""

import os
import subprocess

import pytest

from kdump_capture.vmcore import open_vmcore

from .helpers import cli, save_args

pytestmark = pytest.mark.vm


def _dmesg(path, tmp_path):
    out = tmp_path / "dmesg.out"
    r = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(path), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_text(errors="replace")


@pytest.mark.parametrize("level", [0, 1])
def test_real_vmcore_readable_by_makedumpfile(real_sample, tmp_path, level):
    savedir = tmp_path / "dumps"
    r = cli(
        *save_args(
            str(real_sample.path),
            str(savedir),
            f"KDUMP_DUMPLEVEL={level}",
            "KDUMP_FREE_DISK_SIZE=0",
        )
    )
    assert r.rc == 0, r.err
    [name] = os.listdir(savedir)
    vmcore = savedir / name / "vmcore"
    assert real_sample.marker in _dmesg(vmcore, tmp_path)
    readme = (savedir / name / "README.txt").read_text()
    assert real_sample.kernel_version in readme
    if level == 0:
        assert os.path.getsize(vmcore) == real_sample.size
        with open(vmcore, "rb") as a, open(real_sample.path, "rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                assert x == y
                if not x:
                    break
    else:
        # the guest had 16 MiB of zeroed memory plus free pages: level 1 must be smaller
        assert os.path.getsize(vmcore) < real_sample.size
        with open_vmcore(str(vmcore)) as out, open_vmcore(str(real_sample.path)) as src:
            assert out.notes_blob == src.notes_blob
            assert out.vmcoreinfo == src.vmcoreinfo
    assert cli("verify", str(savedir / name)).rc == 0
