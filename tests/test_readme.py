"""The README's quick-start demo command works as written (no root needed, no config)."""

import os
import re
import subprocess

from .helpers import ROOT


def test_readme_demo_command(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"^    (kdump-capture save --sample .*)$", readme, re.M)
    assert m, "the README lost its demo command"
    env = dict(os.environ, PYTHONPATH=ROOT)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "kdump-capture"  # the console script as pip would install it
    shim.write_text(f'#!/bin/sh\nexec "{os.sys.executable}" -m kdump_capture "$@"\n')
    shim.chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    p = subprocess.run(
        ["bash", "-c", m.group(1)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    [name] = os.listdir(tmp_path / "dumps")
    d = tmp_path / "dumps" / name
    assert sorted(os.listdir(d)) == ["README.txt", "dmesg.txt", "manifest.json", "vmcore"]
    assert "Kernel panic" in (d / "dmesg.txt").read_text()
