"""Progress on a serial console: plain lines at every 10 % and at least every 10 s, each
with the percentage, the rate and the time left."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import struct
import termios

from kdump_capture.progress import LineProgress, NoProgress, TqdmProgress, eta, make_progress

MB = 10**6


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_per_ten_percent_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(out, clock=clock)
    p.start("vmcore", 1000 * MB)
    for _ in range(100):
        clock.t += 1  # 10 MB/s: the 10 s lines fall on the 10 % marks
        p.update(10 * MB)
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11, lines
    assert lines[0] == "vmcore:  10% 100/1000 MB, 10.0 MB/s, ETA 1 min 30 s"
    assert lines[4] == "vmcore:  50% 500/1000 MB, 10.0 MB/s, ETA 50 s"
    assert lines[9].startswith("vmcore: 100% 1000/1000 MB, 10.0 MB/s, ETA 0 s")
    assert lines[10] == "vmcore: 100% 1000/1000 MB, 10.0 MB/s, done in 100 s"


def test_a_line_at_least_every_ten_seconds_on_a_slow_target():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(out, clock=clock)
    p.start("vmcore", 1000 * MB)
    for _ in range(60):  # 1 MB/s for a minute: 6 % done, no 10 % mark crossed
        clock.t += 1
        p.update(1 * MB)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    assert re.fullmatch(r"vmcore:   6% 60/1000 MB, 1\.0 MB/s, ETA 15 min 40 s", lines[-1])


def test_big_jumps_and_unknown_totals():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(out, clock=clock)
    p.start("vmcore", 100 * MB)
    clock.t += 1
    p.update(35 * MB)  # several marks at once: one line, the next mark is 40 %
    clock.t += 1
    p.update(4 * MB)
    clock.t += 1
    p.update(1 * MB)
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["35%", "40%"]
    out2 = io.StringIO()
    q = LineProgress(out2, clock=clock)
    q.start("raw", None)
    clock.t += 1
    q.update(300 << 20)
    assert out2.getvalue() == f"raw: {(300 << 20) / MB:.0f} MB, {(300 << 20) / MB:.1f} MB/s\n"


def test_eta_format():
    assert [eta(s) for s in (0.4, 59.6, 61, 3599, 3600, 7384)] == [
        "0 s",
        "1 min 00 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 03 min",
    ]


@contextlib.contextmanager
def terminal(rows: int, cols: int):
    """The writing end of a pseudo-terminal whose window is ``rows`` x ``cols``."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    stream = open(slave, "w", closefd=True)  # noqa: SIM115 - closed below
    try:
        yield stream
    finally:
        stream.close()
        os.close(master)


def test_styles(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    with terminal(24, 80) as tty:
        assert isinstance(make_progress(1, tty), NoProgress)  # bit 2 off: nothing
        assert isinstance(make_progress(3, tty), TqdmProgress)
        # the capture kernel's console is a terminal, yet it asks for lines
        assert isinstance(make_progress(3, tty, style="lines"), LineProgress)
    assert isinstance(make_progress(3, io.StringIO()), LineProgress)
    assert isinstance(make_progress(3, io.StringIO(), style="bar"), TqdmProgress)


def test_a_serial_console_gets_lines(monkeypatch):
    # /dev/ttyS0 reports a window of 0x0: tqdm, chosen because it is a terminal, drew
    # nothing at all there (recover from the runlevel-1 console, a save by hand).
    monkeypatch.setenv("TERM", "vt220")
    with terminal(0, 0) as tty:
        assert isinstance(make_progress(3, tty), LineProgress)
    for term in ("dumb", None):
        if term is None:
            monkeypatch.delenv("TERM")
        else:
            monkeypatch.setenv("TERM", term)
        with terminal(24, 80) as tty:
            assert isinstance(make_progress(3, tty), LineProgress)


def test_lines_where_tqdm_is_not_packed():
    """Capture images leave tqdm out; a save started by hand on their console gets lines."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "from kdump_capture.progress import make_progress\n"
        "print(type(make_progress(3, sys.stdin)).__name__, file=sys.stderr)\n"
    )
    with terminal(24, 80) as tty:
        r = subprocess.run(
            [sys.executable, "-c", code],
            stdin=tty,
            capture_output=True,
            text=True,
            env=dict(os.environ, TERM="xterm"),
        )
    assert r.stderr.strip() == "LineProgress", r.stderr


def test_log_lines_are_not_glued_onto_the_bar(tmp_path):
    # On a terminal that draws the bar, a log line written while it was shown went on its
    # end: "... [00:00<?, ?B/s]kdump: INFO: ...".
    import pty
    import sys

    args = [sys.executable, "-m", "kdump_capture", "save", "--sample", "--config", "/dev/null"]
    args += ["--no-reboot", "--set", f"KDUMP_SAVEDIR=file://{tmp_path}/d"]
    args += ["--set", "KDUMP_DUMPFORMAT=compressed", "--set", "KDUMP_DUMPLEVEL=31"]
    env = dict(os.environ, TERM="xterm", PYTHONPATH=os.getcwd())
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of 24 x 80 as its stdout and stderr
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execve(sys.executable, args, env)
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    assert b"vmcore:" in out and b"%|" in out  # the bar was drawn
    lines = re.split(rb"[\r\n]", bytes(out))
    glued = [line for line in lines if b"kdump: " in line and not line.startswith(b"kdump: ")]
    assert not glued, glued
