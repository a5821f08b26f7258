"""Pure policy: dump directory names, rotation (KDUMP_KEEP_OLD_DUMPS) and the free-space budget."""

from __future__ import annotations

import re
import time

from .record import Record

# A dump directory name: [<host>-]YYYY-MM-DD-HH-MM-SS[.N]. Sorting by the time stamp sorts
# by crash time; ".N" makes names unique when two dumps fall into the same second. No ":"
# (CIFS cannot store it).
# Matched whole (fullmatch: "$" would also take a name ending in a newline) and in ASCII
# ("\d" would take any script's digits).
_NAME_RE = re.compile(
    r"(?:(?P<host>.+)-)?(?P<stamp>\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2})(?:\.(?P<seq>\d+))?",
    re.ASCII,
)

COMPLETE = "complete"
FAILED = "failed"
INCOMPLETE = "incomplete"
# Saved complete, but its files no longer match its manifest (a vmcore removed or cut short).
DAMAGED = "damaged"


def stamp_for(epoch: float) -> str:
    """The time stamp part of a dump directory name (UTC: the capture kernel has no zone)."""
    return time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(epoch))


def dump_name(stamp: str, host: str | None = None, seq: int = 0) -> str:
    name = f"{host}-{stamp}" if host else stamp
    return f"{name}.{seq}" if seq else name


class DumpDir(Record):
    """One dump directory found on a target. ``state``: complete, failed, incomplete or
    damaged."""

    __slots__ = ("stamp", "seq", "name", "host", "state")

    def __init__(
        self,
        stamp: str,
        seq: int,
        name: str,
        host: str | None,
        state: str,
    ) -> None:
        self.stamp = stamp
        self.seq = seq
        self.name = name
        self.host = host
        self.state = state

    # Ordered by stamp, then seq, name, host and state (as the fields are listed): sorting
    # dumps sorts them by crash time.
    def __lt__(self, other: DumpDir) -> bool:
        return self._values() < other._values()

    def __le__(self, other: DumpDir) -> bool:
        return self._values() <= other._values()

    def __gt__(self, other: DumpDir) -> bool:
        return self._values() > other._values()

    def __ge__(self, other: DumpDir) -> bool:
        return self._values() >= other._values()


def parse_dump_name(name: str) -> tuple[str | None, str, int] | None:
    """(host, stamp, seq) for a name this tool creates, else None."""
    m = _NAME_RE.fullmatch(name)
    if not m:
        return None
    return m.group("host"), m.group("stamp"), int(m.group("seq") or 0)


def ours(dumps: list[DumpDir], host: str | None) -> list[DumpDir]:
    """The dumps of this host (``host`` None: the unprefixed names of a local target)."""
    return sorted(d for d in dumps if d.host == host)


def select_stale(dumps: list[DumpDir]) -> list[DumpDir]:
    """Incomplete dumps (no manifest: a run was killed mid-write): removed before a new dump."""
    return [d for d in dumps if d.state == INCOMPLETE]


def select_before_write(dumps: list[DumpDir], keep: int) -> list[DumpDir]:
    """Dumps to delete before writing: all of them for KEEP_OLD_DUMPS -1 and -2."""
    if keep in (-1, -2):
        return [d for d in dumps if d.state != INCOMPLETE]
    return []


def select_expired(dumps: list[DumpDir], keep: int, new: str | None = None) -> list[DumpDir]:
    """Dumps to delete after ``new`` was committed so that at most ``keep`` older complete
    dumps remain besides it. Failed dumps (what a failed save leaves: dmesg.txt, README, a
    manifest saying why; the only record of that crash) take no complete dump's place, and
    stay while they are among the ``keep`` newest older dumps: a later success is another
    crash, and does not make theirs obsolete. Damaged dumps (files that no longer match
    their manifest) are not counted among the complete ones, and stay while they are among
    the ``keep`` newest of both. ``keep`` 0 keeps everything.
    """
    if keep == 0:
        return []
    older = sorted(d for d in dumps if d.name != new and d.state != INCOMPLETE)
    if keep < 0:
        return older
    complete = [d for d in older if d.state == COMPLETE]
    kept = complete[-keep:] if keep else []
    # A damaged dump never takes the place of a whole one, and goes only when a complete
    # one in its place would: once it is not among the ``keep`` newest.
    saved = [d for d in older if d.state in (COMPLETE, DAMAGED)]
    kept += [d for d in saved[-keep:] if d.state == DAMAGED]
    kept += [d for d in older[-keep:] if d.state == FAILED]
    kept_names = {d.name for d in kept}
    return [d for d in older if d.name not in kept_names]


def prunable_for_space(dumps: list[DumpDir], keep: int) -> list[DumpDir]:
    """Oldest-first dumps that rotation would delete anyway once a new dump succeeds.

    Only these may be deleted *before* writing, and only as far as free space requires:
    a failed new dump must not cost an older one that rotation would have kept.
    """
    if keep == 0:
        return []
    older = sorted(d for d in dumps if d.state != INCOMPLETE)
    if keep < 0:
        return older
    # After success the new dump plus `keep` older complete ones remain; anything else goes.
    return select_expired(older, keep)


def budget_shortfall(free: int | None, needed: int, margin: int) -> int:
    """Bytes missing so that writing ``needed`` still leaves ``margin`` free (0: fits).

    ``free`` None means the protocol cannot tell: no limit can be enforced.
    """
    if free is None:
        return 0
    return max(0, needed + margin - free)
