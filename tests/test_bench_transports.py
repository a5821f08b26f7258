"""bench/transports.py's timing: what it measures of one upload."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from bench import transports as bt


def test_the_wait_for_the_server_is_not_timed():
    """ServerCpu waits after an upload until the connection's server process has exited,
    to count its CPU. That wait is the server's, not the client's: ``timed`` stops the clock
    before it (it once added up to a 20 ms poll to every CIFS run, ours and smbclient's)."""

    def upload(name: str) -> None:
        # A "connection process" of this process that outlives the upload by 1 s, reaped
        # by a thread as smbd reaps its children.
        child = subprocess.Popen(["sleep", "1"])
        threading.Thread(target=child.wait, daemon=True).start()

    counted = bt.ServerCpu(os.getpid(), upload)
    cleaned: list[str] = []
    start = time.monotonic()
    elapsed, _ = bt.timed(counted, "x", cleaned.append)
    total = time.monotonic() - start
    assert elapsed < 0.6, elapsed  # the fork and exec of sleep, on a loaded machine too
    assert total >= 0.95, "settle() returned before the server's process exited"
    assert cleaned == ["x"]
    assert len(counted.spent) == 1 and counted.spent[0] >= 0


def test_a_profile_shows_every_thread_that_did_the_work():
    """The upload's work is split across threads (smbprotocol's receive thread, S3's part
    uploader): a missed goal's profile shows each busy thread, and only counts idle ones."""
    from bench.measure import profile_threads

    def busy(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            sum(range(100))

    def upload() -> None:
        worker = threading.Thread(target=busy, args=(0.2,), name="msg_worker-127.0.0.1:4455")
        idle = threading.Thread(target=time.sleep, args=(0.001,), name="timer")
        # idle first and alone: beside two busy threads its wait for the GIL, which the
        # profile counts (wall time), took past 10% of the first one's time in 4 of 8 runs
        idle.start()
        idle.join()
        worker.start()
        busy(0.1)
        worker.join()

    text = profile_threads(upload)
    assert text.startswith("thread MainThread:\n")
    assert "\nthread msg_worker-127.0.0.1:\n" in text  # the port left out: it differs per run
    assert "test_bench_transports.py" in text and "(busy)" in text
    assert "(1 more threads, each under 10% of the first one's time)" in text
    assert "thread timer" not in text


def test_the_report_carries_a_missed_goals_profile():
    from bench.run import transport_report

    t = {
        "command": "python3 bench/transports.py",
        "load": [0.1, 0.2],
        "rows": [
            {
                "label": "cifs (smbd)",
                "ref_label": "smbclient put",
                "ours_s": 1.0,
                "ref_s": 0.5,
                "size": 10**9,
                "goal": True,
            },
        ],  # fmt: skip
        "profiles": {"cifs (smbd) upload, ours": "thread MainThread:\n  1 0.3 sendmsg"},
    }
    goals: list = []
    text = "\n".join(transport_report(t, goals))
    assert goals == [("transports", "cifs (smbd): >= 0.9x smbclient put", "0.50x", False)]
    assert "cProfile of `cifs (smbd) upload, ours` (goal missed" in text
    assert "  1 0.3 sendmsg" in text
    # results from before profiles were kept still render
    del t["profiles"]
    assert "cProfile" not in "\n".join(transport_report(t, []))


def test_every_run_is_listed_under_the_table():
    """The servers' speed varies between runs (smbd's CPU for the same upload: 0.38-0.56 s): the
    report lists each client's runs once, in order, beside the medians."""
    from bench.run import transport_report

    row = {"ref_label": "smbclient put", "size": 10**9, "ours_s": 0.7, "ref_s": 0.5}
    t = {
        "command": "python3 bench/transports.py",
        "load": [0.1, 0.2],
        "rows": [
            {**row, "label": "cifs (smbd)", "ours_runs": [0.71, 0.7], "ref_runs": [0.5, 0.62]},
            {
                **row,
                "label": "cifs (smbd), SHA256",
                "ours_runs": [1.2, 1.1],
                "ref_runs": [0.5, 0.62],
                "goal": False,
            },
        ],  # fmt: skip
    }
    text = "\n".join(transport_report(t, []))
    assert (
        "Wall time of every run, in the order they ran (s): ours, cifs (smbd): 0.71, 0.70; "
        "smbclient put: 0.50, 0.62; ours, cifs (smbd), SHA256: 1.20, 1.10." in text
    )
    for r in t["rows"]:  # results from before the runs were kept
        del r["ours_runs"], r["ref_runs"]
    assert "every run" not in "\n".join(transport_report(t, []))
