"""KDUMP_PRESCRIPT, KDUMP_POSTSCRIPT and KDUMP_TRANSFER: the administrator's own commands.

They are shell command lines from the configuration, run with ``/bin/sh -c`` as the SUSE
tool does (the config itself is never executed). The environment tells them what is
going on: KDUMP_VMCORE (the source), and after a dump KDUMP_DUMP_URL (target, password
redacted) and KDUMP_DUMP_DIR (the dump directory's name), or, after a dump written to
KDUMP_DUMPDEV, KDUMP_DUMP_DEVICE (the device; the other two are empty).
"""

from __future__ import annotations

import logging
import os
import signal

from .errors import ScriptError, TransferError

log = logging.getLogger(__name__)


def run_script(directive: str, command: str, env: dict[str, str]) -> int:
    """Run one configured command line; returns its exit status (output goes to ours)."""
    log.info("running %s", directive)
    full = dict(os.environ)
    full.update(env)
    import subprocess  # only when a script is configured

    try:
        p = subprocess.run(["/bin/sh", "-c", command], env=full, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ScriptError(f"{directive}: cannot run /bin/sh: {e.strerror}") from e
    return p.returncode


def describe_status(status: int) -> str:
    """``exit status N`` or ``killed by SIGNAME (signal N)`` for a subprocess returncode."""
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name} (signal {-status})"
    except ValueError:
        return f"killed by signal {-status}"


def check_transfer(status: int) -> None:
    """A failing KDUMP_TRANSFER is TransferError (exit 14): its status is never passed on
    as ours, where 7 would mean "authentication refused" and a signal a negative code."""
    if status != 0:
        raise TransferError(
            f"KDUMP_TRANSFER failed ({describe_status(status)}): the dump may not be saved"
        )


def check_script(directive: str, status: int, continue_on_error: bool) -> None:
    """A failed pre/post script is fatal only with KDUMP_CONTINUE_ON_ERROR=false."""
    if status == 0:
        return
    msg = f"{directive} failed ({describe_status(status)})"
    if continue_on_error:
        log.error("%s; continuing (KDUMP_CONTINUE_ON_ERROR)", msg)
        return
    raise ScriptError(msg)
