"""What happens after the dump: reboot through reboot(2), or return to the caller."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def should_reboot(immediate_reboot: bool, no_reboot: bool, dumpdev: str) -> bool:
    """Reboot only when configured, not suppressed by --no-reboot, and no dump device
    is set (the seed: with KDUMP_DUMPDEV the admin recovers the dump from the console)."""
    return immediate_reboot and not no_reboot and not dumpdev


def reboot(power_off: bool = False) -> None:
    """sync, then restart (or power off) at once. Does not return on success."""
    import ctypes  # only here: a save that does not reboot need not load it

    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    cmd = LINUX_REBOOT_CMD_POWER_OFF if power_off else LINUX_REBOOT_CMD_RESTART
    rc = libc.reboot(ctypes.c_int(cmd))
    err = ctypes.get_errno()
    log.error("reboot(2) failed (rc=%s): %s", rc, os.strerror(err))
