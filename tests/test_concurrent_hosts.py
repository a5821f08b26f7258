"""Eight hosts saving at once to one server (issue 8): every dump completes with correct
checksums, and each host's rotation touches only its own dumps.

Separate `python3 -m kdump_capture save` processes; KDUMP_HOSTNAME gives each its identity.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdump_capture import policy
from kdump_capture.sample import SampleSpec, write_sample
from tests.planted import plant_dir, snapshot
from tests.servers.targets import make_target

from .helpers import ROOT, cli
from .test_save_network import write_config

HOSTS = [f"host{i}" for i in range(8)]
ROUNDS = 3  # with KDUMP_KEEP_OLD_DUMPS=1 the third save of each host deletes its first


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=4))
    return str(p)


def _dumps_of(target, host: str) -> list[str]:
    names = os.listdir(target.server_dir)
    return sorted(n for n in names if (policy.parse_dump_name(n) or (None,))[0] == host)


@pytest.mark.parametrize("kind", ["sftp", "ftp", "cifs"])
def test_eight_hosts_at_once(kind, request, sample, tmp_path):
    target = make_target(kind, request)
    with target.transport():
        pass
    # Another host's dump, incomplete (no manifest): only its owner may remove it.
    stranger = policy.dump_name("2000-01-01-00-00-00", "stranger")
    plant_dir(os.path.join(target.server_dir, stranger))
    with open(os.path.join(target.server_dir, stranger, "vmcore"), "wb") as f:
        f.write(b"not yours")
    confs = {
        h: write_config(tmp_path / f"kdump-{h}", target, KDUMP_KEEP_OLD_DUMPS="1", KDUMP_HOSTNAME=h)
        for h in HOSTS
    }
    env = {**os.environ, "PYTHONPATH": ROOT}
    made: dict[str, list[str]] = {h: [] for h in HOSTS}
    for _ in range(ROUNDS):
        procs = {
            h: subprocess.Popen(
                [sys.executable, "-m", "kdump_capture", "save", "--config", confs[h]]
                + ["--vmcore", sample, "--no-reboot"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                cwd=ROOT,
            )
            for h in HOSTS
        }
        for h, p in procs.items():
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"{h}: {err}"
            [line] = [x for x in out.splitlines() if x.startswith("Dump saved: ")]
            made[h].append(line.rsplit("/", 1)[1])
        for h in HOSTS:
            assert _dumps_of(target, h) == sorted(made[h][-2:]), h
    for h in HOSTS:
        for name in made[h][-2:]:
            r = cli("verify", os.path.join(target.server_dir, name))
            assert r.rc == 0, r.err
    assert snapshot(os.path.join(target.server_dir, stranger)) == {"vmcore": b"not yours"}
