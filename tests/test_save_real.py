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


@pytest.mark.slow
def test_crash_opens_level1_elf(real_sample, debug_vmlinux, tmp_path):
    savedir = tmp_path / "dumps"
    r = cli(
        *save_args(
            str(real_sample.path), str(savedir), "KDUMP_DUMPLEVEL=1", "KDUMP_FREE_DISK_SIZE=0"
        )
    )
    assert r.rc == 0, r.err
    [name] = os.listdir(savedir)
    cmds = tmp_path / "cmds"
    cmds.write_text("sys\nlog\nbt\nquit\n")
    p = subprocess.run(
        ["crash", "-s", str(debug_vmlinux), str(savedir / name / "vmcore"), "-i", str(cmds)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    out = p.stdout + p.stderr
    assert real_sample.marker in out, out[-3000:]
    assert "sysrq" in out.lower(), out[-3000:]
    assert "PANIC" in out, out[-3000:]


def test_compressed_over_ftp_is_flattened_and_rearranges(real_sample, request, tmp_path):
    from tests.servers.targets import make_target

    target = make_target("ftp", request)
    conf = tmp_path / "kdump"
    conf.write_text(
        f'KDUMP_SAVEDIR="{target.url}"\nKDUMP_DUMPFORMAT=compressed\nKDUMP_DUMPLEVEL=31\n'
    )
    r = cli("save", "--config", str(conf), "--vmcore", str(real_sample.path), "--no-reboot")
    assert r.rc == 0, r.err
    [name] = os.listdir(target.server_dir)
    d = os.path.join(target.server_dir, name)
    readme = open(os.path.join(d, "README.txt")).read()
    assert "flattened" in readme and "kdump-capture rearrange" in readme
    assert real_sample.marker in open(os.path.join(d, "dmesg.txt")).read()
    # our dmesg reads the flattened file directly and agrees with dmesg.txt
    r = cli("dmesg", os.path.join(d, "vmcore"))
    assert r.rc == 0, r.err
    assert r.out == open(os.path.join(d, "dmesg.txt")).read()
    out = tmp_path / "vmcore.kdump"
    r = cli("rearrange", os.path.join(d, "vmcore"), str(out))
    assert r.rc == 0, r.err
    with open(out, "rb") as f:
        assert f.read(8) == b"KDUMP   "
    assert real_sample.marker in _dmesg(out, tmp_path)
    # makedumpfile -R gives the same file
    ref = tmp_path / "ref.kdump"
    with open(os.path.join(d, "vmcore"), "rb") as stream:
        subprocess.run(
            ["makedumpfile", "-R", str(ref)], stdin=stream, check=True, capture_output=True
        )
    assert open(ref, "rb").read() == open(out, "rb").read()
