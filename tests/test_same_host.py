"""Two of our own processes on one host at once: the boot-time `recover`, an admin's
`save --vmcore FILE`, a second save of the same crash. (Several hosts sharing a target:
tests/test_concurrent_hosts.py and tests/test_shared_target.py.)

The saves are real `python3 -m kdump_capture save` processes; one is held at an exact point
of its vmcore by a ReadGate (tests/faults.py) while the other runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from kdump_capture import policy
from kdump_capture.sample import SampleSpec, write_sample
from tests.servers.targets import make_target

from .faults import ReadGate
from .helpers import ROOT, cli
from .test_save_network import write_config

KINDS = ["file", "sftp", "ftp"]
WAIT = 120  # s: a save of a few MiB takes about one


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two different crashes with the same crash time (so the same second's name)."""
    d = tmp_path_factory.mktemp("src")  # ext4 here: ReadGate works on it
    a, b = str(d / "a"), str(d / "b")
    write_sample(a, SampleSpec(ram_mib=16, seed=1))
    write_sample(b, SampleSpec(ram_mib=8, seed=2))
    return a, b


def _start(conf: str, vmcore: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", "save", "--config", conf]
        + ["--vmcore", vmcore, "--no-reboot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
    )


def _saved(p: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, dump directory name or "", stderr)."""
    out, err = p.communicate(timeout=WAIT)
    names = [x.rsplit("/", 1)[1] for x in out.splitlines() if x.startswith("Dump saved: ")]
    return p.returncode, (names[0] if names else ""), err


def _both_whole(target, names: list[str]) -> None:
    dumps = sorted(n for n in os.listdir(target.server_dir) if policy.parse_dump_name(n))
    assert dumps == sorted(names)
    for name in names:
        r = cli("verify", os.path.join(target.server_dir, name))
        assert r.rc == 0, r.out + r.err


@pytest.mark.parametrize("kind", KINDS)
def test_a_dump_being_written_is_not_taken_for_one_a_killed_run_left(
    kind, request, sources, tmp_path
):
    """A save that finds another save's dump without its manifest yet took it for one a
    killed run had left and deleted it once its own was saved: the first save then failed
    ("publishing .../vmcore: No such file or directory", exit 6) and its crash was lost."""
    a_core, b_core = sources
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_HOSTNAME="same")
    second: dict = {}

    def run_the_other_save() -> None:
        second["run"] = _saved(_start(conf, b_core))

    with ReadGate(a_core) as gate:
        gate.on_read(os.path.getsize(a_core) // 2, run_the_other_save)
        first = _start(conf, a_core)
        gate.pids = {first.pid}
        rc_a, name_a, err_a = _saved(first)
    rc_b, name_b, err_b = second["run"]
    assert rc_b == 0, err_b
    assert rc_a == 0, err_a
    assert name_a and name_b and name_a != name_b
    assert "being written by another process" in err_b
    _both_whole(target, [name_a, name_b])


@pytest.mark.parametrize("kind", KINDS)
def test_a_dump_completed_after_it_was_listed_is_not_deleted(kind, request, sources, tmp_path):
    """The second save listed the first one's dump while it was being written, the first
    then completed ("Dump saved", exit 0), and the second deleted it after its own dump as
    "left incomplete by an earlier run"."""
    a_core, b_core = sources
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_HOSTNAME="same")
    b_listed = threading.Event()
    procs: dict = {}

    def start_the_other_save() -> None:
        # B lists the target (A's dump without a manifest) and is held mid-vmcore.
        procs["gate_b"].pids = {_start_b().pid}
        assert b_listed.wait(WAIT)

    def _start_b() -> subprocess.Popen:
        procs["b"] = _start(conf, b_core)
        return procs["b"]

    def hold_b_until_a_is_done() -> None:
        b_listed.set()
        procs["a"].wait(WAIT)

    with ReadGate(b_core) as gate_b, ReadGate(a_core) as gate_a:
        procs["gate_b"] = gate_b
        gate_b.on_read(os.path.getsize(b_core) // 2, hold_b_until_a_is_done)
        gate_a.on_read(os.path.getsize(a_core) // 2, start_the_other_save)
        procs["a"] = _start(conf, a_core)
        gate_a.pids = {procs["a"].pid}
        rc_a, name_a, err_a = _saved(procs["a"])
        rc_b, name_b, err_b = _saved(procs["b"])
    assert rc_a == 0, err_a
    assert rc_b == 0, err_b
    assert name_a and name_b and name_a != name_b
    _both_whole(target, [name_a, name_b])
