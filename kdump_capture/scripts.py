"""KDUMP_PRESCRIPT, KDUMP_POSTSCRIPT and KDUMP_TRANSFER: the administrator's own commands.

They are shell command lines from the configuration, run with ``/bin/sh -c`` as the SUSE
tool does (the config itself is never executed). The environment tells them what is
going on: KDUMP_TRANSFER gets KDUMP_VMCORE (the source); KDUMP_POSTSCRIPT gets
KDUMP_DUMP_URL (target, password redacted) and KDUMP_DUMP_DIR (the dump directory's
name), or, after a dump written to KDUMP_DUMPDEV, KDUMP_DUMP_DEVICE (the device; the
other two are empty), and KDUMP_DUMP_STATUS: "saved", or "failed" when it runs after a
failed save (KDUMP_CONTINUE_ON_ERROR, as SUSE does; the three others are empty then).
"""

from __future__ import annotations

import logging
import os
import signal

from .errors import ScriptError, TransferError

log = logging.getLogger(__name__)


def run_script(directive: str, command: str, env: dict[str, str]) -> int | None:
    """Run one configured command line; returns its exit status (output goes to ours), or
    None when /bin/sh could not be started (said on the log). A failure like any other:
    check_script and check_transfer decide what it costs."""
    log.info("running %s", directive)
    full = dict(os.environ)
    full.update(env)
    import subprocess  # only when a script is configured

    try:
        p = subprocess.Popen(["/bin/sh", "-c", command], env=full, stdin=subprocess.DEVNULL)
    except OSError as e:
        log.error("%s: cannot run /bin/sh: %s", directive, e.strerror)
        return None
    try:
        return p.wait()
    except BaseException:
        # The save is being stopped (the watchdog's SIGUSR1, SIGTERM, Ctrl-C) while the
        # command runs: the command and what it started go too, instead of running on,
        # orphaned, while the capture kernel finishes or reboots.
        log.error("%s: stopping it (and what it started)", directive)
        kill_tree(p.pid)
        p.wait()
        raise


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from each one's parent in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    after_comm = f.read().rpartition(b")")[2].split()
            except OSError:
                continue  # ended meanwhile
            if len(after_comm) > 1 and after_comm[1].isdigit():  # state, then ppid
                children.setdefault(int(after_comm[1]), []).append(int(name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it. Each is stopped first, so that none
    forks meanwhile, or leaves children that SIGKILL would orphan out of reach.

    Not a process group of its own for the command: a command outside the terminal's
    foreground group is stopped (SIGTTOU) by anything that sets the terminal up (``stty``
    on the console), and would hang there.
    """
    seen: set[int] = set()
    for _ in range(4):
        new = [p for p in [pid, *_descendants(pid)] if p not in seen]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        seen.update(new)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def describe_status(status: int | None) -> str:
    """``exit status N`` or ``killed by SIGNAME (signal N)`` for a subprocess returncode;
    None: it could not be started."""
    if status is None:
        return "could not be started"
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name} (signal {-status})"
    except ValueError:
        return f"killed by signal {-status}"


def check_transfer(status: int | None) -> None:
    """A failing KDUMP_TRANSFER is TransferError (exit 14): its status is never passed on
    as ours, where 7 would mean "authentication refused" and a signal a negative code."""
    if status != 0:
        raise TransferError(
            f"KDUMP_TRANSFER failed ({describe_status(status)}): the dump may not be saved"
        )


def check_script(directive: str, status: int | None, continue_on_error: bool) -> None:
    """A failed pre/post script is fatal only with KDUMP_CONTINUE_ON_ERROR=false."""
    if status == 0:
        return
    msg = f"{directive} failed ({describe_status(status)})"
    if continue_on_error:
        log.error("%s; continuing (KDUMP_CONTINUE_ON_ERROR)", msg)
        return
    raise ScriptError(msg)
