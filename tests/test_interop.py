"""The commands after a crash on what other tools made: makedumpfile files, other layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli

pytestmark = pytest.mark.vm  # the real sample (generated once in a guest, then cached)


def makedumpfile(*args: str, stdout=None) -> None:
    subprocess.run(["makedumpfile", *args], check=True, stdout=stdout, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def mdf(real_sample, tmp_path_factory) -> dict[str, Path]:
    """makedumpfile's own files of the 512 MiB sample, and its --dump-dmesg of it."""
    tmp = tmp_path_factory.mktemp("mdf")
    src = real_sample.path
    out = {"tmp": tmp}
    makedumpfile("-E", "-d", "31", src, str(tmp / "elf31"))
    with open(tmp / "elf31.flat", "wb") as f:
        makedumpfile("-F", "-E", "-d", "31", src, stdout=f)
    makedumpfile("--dump-dmesg", src, str(tmp / "dmesg.txt"))
    for name in ("elf31", "elf31.flat", "dmesg.txt"):
        out[name] = tmp / name
    return out


def test_rearrange_of_makedumpfile_flattened_elf(mdf):
    # makedumpfile -F -E writes zeroed program headers first (at 0x40), then the ELF header,
    # and the real program headers last: "record for 0x40 before the dump's header is
    # complete" (exit 4), where makedumpfile -R rebuilds the file.
    out = mdf["tmp"] / "rearranged-elf"
    r = cli("rearrange", str(mdf["elf31.flat"]), str(out))
    assert r.rc == 0, r.err
    assert out.read_bytes() == mdf["elf31"].read_bytes()


def test_rearrange_reads_the_stream_from_a_pipe(mdf):
    # makedumpfile -R reads standard input (`ssh host cat vmcore.flat | ...`); ours failed on
    # a pipe with "OUT: cannot write the rearranged dump: Illegal seek" (exit 6): it asked
    # the input for its position.
    out = mdf["tmp"] / "from-a-pipe"
    env = dict(os.environ, PYTHONPATH=ROOT)
    with subprocess.Popen(["cat", str(mdf["elf31.flat"])], stdout=subprocess.PIPE) as cat:
        p = subprocess.run(
            [sys.executable, "-m", "kdump_capture", "rearrange", "/dev/stdin", str(out)],
            stdin=cat.stdout,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        cat.stdout.close()
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == mdf["elf31"].read_bytes()
