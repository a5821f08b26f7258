"""The save's heartbeat to /init (kdump_capture/heartbeat.py) and its SIGUSR1 ending."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kdump_capture.config import load_config
from kdump_capture.heartbeat import ENV, Heartbeat, watchdog_timeout
from kdump_capture.progress import NoProgress
from kdump_capture.sample import SampleSpec, write_sample

from .helpers import ROOT, save_args


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def _lines(r: int) -> list[bytes]:
    try:
        return os.read(r, 1 << 16).split()
    except BlockingIOError:
        return []


def test_beats_are_lines_of_bytes_done_at_most_once_a_second():
    r, w = _pipe()
    clock = Clock()
    progress = Heartbeat(w, clock).around(NoProgress())
    progress.start("vmcore", 100)  # the start always beats
    progress.update(1 << 20)
    clock.now += 0.5
    progress.update(1 << 20)  # too soon: nothing
    clock.now += 0.6
    progress.update(1 << 20)
    progress.finish()  # the end always beats
    assert _lines(r) == [b"0", b"3145728", b"3145728"]


def test_a_full_pipe_never_blocks_the_save():
    r, w = _pipe()
    clock = Clock()
    beat = Heartbeat(w, clock)
    t0 = time.monotonic()
    for i in range(20000):  # far more than a pipe holds (64 KiB)
        beat.beat(i, force=True)
    assert time.monotonic() - t0 < 5
    assert _lines(r)


def test_a_closed_pipe_ends_the_beats_quietly():
    r, w = os.pipe()
    os.close(r)
    beat = Heartbeat(w)
    beat.beat(1, force=True)  # EPIPE: /init is gone
    assert beat.fd is None
    beat.beat(2, force=True)


@pytest.mark.parametrize("value", ["", "x", "-1", "99999"])
def test_no_pipe_no_beats(value):
    beat = Heartbeat.from_env({ENV: value} if value else {})
    assert beat.fd is None
    progress = NoProgress()
    assert beat.around(progress) is progress


def test_a_descriptor_that_is_not_a_pipe_is_ignored(tmp_path):
    with open(tmp_path / "f", "w") as f:
        assert Heartbeat.from_env({ENV: str(f.fileno())}).fd is None


def test_watchdog_timeout_directive():
    assert watchdog_timeout(0, 30) == 300  # automatic, with the default KDUMP_NET_TIMEOUT
    assert watchdog_timeout(0, 0) == 100  # at least 5 s per network wait
    assert watchdog_timeout(45, 30) == 45
    cfg = load_config(None, ["KDUMP_SAVE_TIMEOUT=120"])
    assert cfg.save_timeout == 120
    assert load_config(None).save_timeout == 0


def test_watchdog_signal_mid_dump_is_recorded_on_the_target(tmp_path):
    """SIGUSR1 (what /init's watchdog sends) while the vmcore streams: the save exits 130
    and the dump's README and manifest say it failed, and why."""
    src = tmp_path / "big"
    write_sample(str(src), SampleSpec(ram_mib=3072, sparse=True))
    savedir = tmp_path / "dumps"
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=ROOT, **{ENV: str(w)})
    p = subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", *save_args(str(src), str(savedir))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(w,),
    )
    os.close(w)
    # the heartbeat says when bytes flow: then the watchdog "fires"
    with os.fdopen(r, "rb") as beats:
        while (line := beats.readline()) and int(line) < 64 << 20:
            pass
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "stopped by the capture kernel's watchdog" in err
    [name] = os.listdir(savedir)
    with open(savedir / name / "manifest.json") as f:
        doc = json.load(f)
    assert doc["status"] == "failed" and "watchdog" in doc["error"]
    assert "watchdog" in (savedir / name / "README.txt").read_text()
    assert "vmcore" not in os.listdir(savedir / name)
