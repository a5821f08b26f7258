"""The save flow: one dump of one vmcore to the first target that accepts it."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from transports import open_transport
from transports.base import Entry, Transport, TransportSettings

from . import manifest, policy
from .dmesg import extract as extract_dmesg
from .errors import (
    AuthError,
    ConnectionLost,
    FreeSpaceError,
    KdumpError,
    NotSupported,
    TargetFull,
    TransportError,
    UnsafeFile,
    VmcoreError,
)
from .formats import FORMAT_NAMES, FormatWriter, make_writer
from .identity import host_identity
from .progress import NoProgress, Progress
from .report import DMESG, MANIFEST, PLACEHOLDER, README, VMCORE, DumpRecord
from .urls import Target
from .vmcore import Vmcore

log = logging.getLogger(__name__)

# How often the free-space budget is re-checked while writing. Between checks at most this
# much is written, so the check demands this much headroom above the margin.
BUDGET_INTERVAL = 32 << 20
# README, manifest and dmesg are small; reserve this much for them in the budget.
SIDE_FILES = 4 << 20


@dataclass(frozen=True)
class SavePlan:
    """What to save and how, resolved from the configuration before anything is written."""

    targets: list[Target]
    dump_format: str
    dump_level: int
    keep_old_dumps: int
    free_disk_size: int
    settings: TransportSettings
    #: describes the source's own format when it is copied verbatim (dump-device recovery)
    source_label: str | None = None
    source_level: int | None = None
    #: KDUMP_HOSTNAME: this host's name in dump directory names on network targets
    hostname: str = ""


@dataclass
class SaveResult:
    target: str
    directory: str
    record: DumpRecord


class BudgetMonitor:
    """Feeds progress and enforces KDUMP_FREE_DISK_SIZE while the vmcore streams."""

    def __init__(
        self,
        transport: Transport,
        relpath: str,
        margin: int,
        estimate: int | None,
        progress: Progress,
        free_at_start: int | None,
    ) -> None:
        self.transport = transport
        self.relpath = relpath
        self.margin = margin
        self.estimate = estimate
        self.progress = progress
        self.written = 0
        self.next_check = 0
        self.enabled = free_at_start is not None and margin > 0

    def advance(self, read: int, written: int) -> None:
        self.progress.update(read)
        self.written += written
        if self.enabled and self.written >= self.next_check:
            self.next_check = self.written + BUDGET_INTERVAL
            self.check()

    def check(self) -> None:
        free = self.transport.free_space(self.relpath)
        ahead = BUDGET_INTERVAL
        if self.estimate is not None:
            ahead = min(ahead, max(self.estimate - self.written, 0))
        if policy.budget_shortfall(free, ahead, self.margin):
            raise FreeSpaceError(
                f"{self.transport.describe()}: only {free >> 20} MiB free, and writing on would "
                f"leave less than KDUMP_FREE_DISK_SIZE ({self.margin >> 20} MiB); dump stopped"
            )


def scan_dumps(transport: Transport, host: str | None) -> list[policy.DumpDir]:
    """This host's dump directories on the target, with their state from manifest.json.

    Names are filtered before anything is read: another host's dumps (or whatever it left
    under a dump-like name) are never opened. A link named like one of our dumps is
    "incomplete", so that rotation deletes the link itself; a manifest that cannot be read
    makes its dump "failed", with a warning naming it.
    """
    out: list[policy.DumpDir] = []
    for entry in transport.listdir(""):
        if not (entry.is_dir or entry.is_link):
            continue
        parsed = policy.parse_dump_name(entry.name)
        if parsed is None or parsed[0] != host:
            continue
        _, stamp, seq = parsed
        out.append(policy.DumpDir(stamp, seq, entry.name, host, _state(transport, entry)))
    return out


def _state(transport: Transport, entry: Entry) -> str:
    where = f"{transport.describe()}/{entry.name}"
    try:
        if entry.is_link:
            raise UnsafeFile(f"{where}: a link, not a directory")
        names = {e.name for e in transport.listdir(entry.name)}
    except UnsafeFile as e:
        log.warning("%s; never followed, only the link is deleted", e)
        return policy.INCOMPLETE
    if MANIFEST not in names:
        return policy.INCOMPLETE
    try:
        doc = manifest.read(transport, entry.name)
    except ConnectionLost:
        raise
    except (KdumpError, FileNotFoundError) as e:
        log.warning("cannot read %s/%s, counting the dump as failed: %s", where, MANIFEST, e)
        return policy.FAILED
    return policy.COMPLETE if doc.complete else policy.FAILED


def _remove(transport: Transport, dumps: list[policy.DumpDir], why: str) -> list[policy.DumpDir]:
    """Delete ``dumps``; returns those deleted. A failed deletion is a warning: cleaning up
    must never cost the new dump."""
    done = []
    for d in dumps:
        log.info("deleting %s dump %s (%s)", d.state, d.name, why)
        try:
            transport.remove_tree(d.name)
        except TransportError as e:
            log.warning("could not delete %s (%s); going on with the new dump", d.name, e)
            continue
        done.append(d)
    return done


def _make_dump_dir(transport: Transport, stamp: str, host: str | None) -> str:
    for seq in range(1000):
        name = policy.dump_name(stamp, host, seq)
        try:
            transport.makedir(name)
            return name
        except FileExistsError:
            continue
    raise TransportError(f"{transport.describe()}: cannot find a free dump directory name")


def _put(transport: Transport, relpath: str, data: bytes) -> dict:
    with transport.create(relpath) as sink:
        sink.write(data)
        info = sink.commit()
    return {"size": info.size, "sha256": info.sha256}


def save_to_target(
    vm: Vmcore,
    plan: SavePlan,
    target: Target,
    progress: Progress | None = None,
    now: float | None = None,
) -> SaveResult:
    """Save one dump to ``target``: rotate, budget, write, commit, prune."""
    progress = progress or NoProgress()
    started = time.time() if now is None else now
    transport = open_transport(target, plan.settings)
    # Choose the writer before touching the target: a format this build cannot write must
    # fail before rotation deletes anything.
    writer: FormatWriter | None = None
    if plan.dump_format != "none":
        writer = make_writer(vm, plan.dump_format, plan.dump_level, transport.can_seek)
    with transport:
        host = None if target.scheme == "file" else host_identity(target, plan.hostname)
        existing = policy.ours(scan_dumps(transport, host), host)
        _remove(transport, policy.select_stale(existing), "left incomplete by an earlier run")
        existing = [d for d in existing if d.state != policy.INCOMPLETE]
        before = policy.select_before_write(existing, plan.keep_old_dumps)
        gone = _remove(transport, before, f"KDUMP_KEEP_OLD_DUMPS={plan.keep_old_dumps}")
        existing = [d for d in existing if d not in gone]

        estimate = (writer.estimate() if writer else 0) or 0
        free, pruned = _ensure_room(transport, existing, plan, estimate + SIDE_FILES)
        existing = [d for d in existing if d not in pruned]

        stamp = policy.stamp_for(vm.crash_time if vm.crash_time else started)
        name = _make_dump_dir(transport, stamp, host)
        log.info("saving dump to %s/%s", transport.describe(), name)
        record = DumpRecord(
            status="failed",
            host=host or socket.gethostname(),
            target=transport.describe(),
            directory=name,
            crash_time=vm.crash_time,
            kernel_release=vm.release,
            dump_level=plan.dump_level,
            dump_format=FORMAT_NAMES.get(plan.dump_format, plan.dump_format),
            source=vm.path,
            source_size=vm.size,
            started=started,
        )
        try:
            _put(transport, f"{name}/{README}", PLACEHOLDER.encode())
            _save_files(vm, plan, transport, name, writer, record, progress, free)
        except FreeSpaceError:
            log.error("not enough space: removing the partial dump %s", name)
            _try(lambda: transport.remove_tree(name))
            raise
        except KdumpError as e:
            record.error = str(e)
            record.finished = time.time()
            _try(lambda: _publish_record(transport, name, record))
            raise
        record.status = "complete"
        record.finished = time.time()
        _publish_record(transport, name, record)
        log.info("dump complete: %s/%s", transport.describe(), name)

        try:
            # The target's dumps are known since the scan above: no second listing.
            _, _, seq = policy.parse_dump_name(name)
            new = policy.DumpDir(stamp, seq, name, host, policy.COMPLETE)
            expired = policy.select_expired([*existing, new], plan.keep_old_dumps, new=name)
            _remove(transport, expired, f"KDUMP_KEEP_OLD_DUMPS={plan.keep_old_dumps}")
        except TransportError as e:
            log.warning("rotation after the dump failed: %s", e)
    return SaveResult(target=transport.describe(), directory=name, record=record)


def _save_files(vm, plan, transport, name, writer, record, progress, free) -> None:
    try:
        text = extract_dmesg(vm)
        record.files[DMESG] = _put(transport, f"{name}/{DMESG}", text.encode())
    except (VmcoreError, NotSupported) as e:
        log.warning("no dmesg.txt: %s", e)
        record.notes.append(f"dmesg.txt not saved: {e}")
        if writer is None:
            raise
    if writer is None:
        return
    monitor = BudgetMonitor(transport, name, plan.free_disk_size, writer.estimate(), progress, free)
    progress.start(f"{VMCORE}", writer.input_size())
    try:
        with transport.create(f"{name}/{VMCORE}") as sink:
            result = writer.write(sink, monitor)
            if monitor.enabled:
                monitor.check()
            info = sink.commit()
    except TargetFull as e:
        raise FreeSpaceError(str(e)) from e
    finally:
        progress.finish()
    record.files[VMCORE] = {"size": info.size, "sha256": info.sha256}
    record.dump_format = plan.source_label or result.format
    record.dump_level = result.dump_level if plan.source_level is None else plan.source_level
    record.flattened = result.flattened
    record.pages_total = result.pages_total
    record.pages_written = result.pages_written
    record.notes.extend(result.notes)


def _publish_record(transport: Transport, name: str, record: DumpRecord) -> None:
    """README.txt (replacing the placeholder), then manifest.json: the completeness mark."""
    readme = record.readme_text().encode()
    transport.remove_file(f"{name}/{README}")
    record.files[README] = _put(transport, f"{name}/{README}", readme)
    _put(transport, f"{name}/{MANIFEST}", record.manifest_json())


def _ensure_room(
    transport, existing, plan: SavePlan, needed: int
) -> tuple[int | None, list[policy.DumpDir]]:
    """Check the budget before writing; prune what rotation would drop anyway if needed.

    Returns the free space and the dumps deleted to make it.
    """
    pruned: list[policy.DumpDir] = []
    free = transport.free_space("")
    short = policy.budget_shortfall(free, needed, plan.free_disk_size)
    if not short:
        return free, pruned
    for d in policy.prunable_for_space(existing, plan.keep_old_dumps):
        why = f"to make room, {short >> 20} MiB short"
        pruned += _remove(transport, [d], why)
        free = transport.free_space("")
        short = policy.budget_shortfall(free, needed, plan.free_disk_size)
        if not short:
            return free, pruned
    raise FreeSpaceError(
        f"{transport.describe()}: {free >> 20} MiB free, but the dump needs about "
        f"{needed >> 20} MiB and KDUMP_FREE_DISK_SIZE keeps {plan.free_disk_size >> 20} MiB free; "
        "nothing was written"
    )


def _try(fn) -> None:
    try:
        fn()
    except Exception as e:  # best effort while already failing
        log.warning("while cleaning up: %s", e)


def save(vm: Vmcore, plan: SavePlan, progress: Progress | None = None) -> SaveResult:
    """Try each target in order; the first that takes the whole dump wins."""
    last: KdumpError | None = None
    for i, target in enumerate(plan.targets):
        try:
            return save_to_target(vm, plan, target, progress)
        except (TransportError, FreeSpaceError) as e:
            last = e
            more = i + 1 < len(plan.targets)
            kind = "refused" if isinstance(e, AuthError) else "failed"
            log.error(
                "target %s %s: %s%s",
                target.redacted(),
                kind,
                e,
                "; trying the next target" if more else "",
            )
    assert last is not None
    raise last
