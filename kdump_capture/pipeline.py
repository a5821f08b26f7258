"""The save flow: one dump of one vmcore to the first target that accepts it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

from transports import open_transport
from transports.base import Claim, Entry, Transport, TransportSettings

from . import checksum, manifest, policy
from .dmesg import extract as extract_dmesg
from .errors import (
    AuthError,
    ConnectionLost,
    FreeSpaceError,
    IncompleteDump,
    Interrupted,
    KdumpError,
    TargetFull,
    TransportError,
    UnsafeFile,
    VmcoreError,
)
from .formats import FORMAT_NAMES, FormatWriter, WriteResult, make_writer
from .memory import BufferPlan, MemoryLog, expected_file_size
from .progress import NoProgress
from .record import Record
from .report import AGE_SUFFIX, DMESG, MANIFEST, PLACEHOLDER, README, SUMMARY, VMCORE, DumpRecord
from .summary import CrashSummary, summarize
from .urls import Target
from .vmcore import Vmcore

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .progress import Progress

log = logging.getLogger(__name__)

# How often the free-space budget is re-checked while writing, at most: each check costs a
# statvfs (a round trip on network targets). Closer to the margin the checks come sooner.
BUDGET_INTERVAL = 32 << 20
# The most a writer writes between two monitor calls: a 1 MiB chunk (formats.CHUNK) or a
# batch of 256 compressed pages, plus a 64 KiB flush of page descriptors; doubled for slack.
WRITE_STEP = 2 << 20
# The peak of anonymous memory is sampled every this many chunks (a read of statm).
MEMORY_SAMPLE = 8


class SavePlan(Record):
    """What to save and how, resolved from the configuration before anything is written."""

    __slots__ = (
        "targets",
        "dump_format",
        "dump_level",
        "keep_old_dumps",
        "free_disk_size",
        "settings",
        "source_label",
        "source_level",
        "buffers",
        "hostname",
        "encrypt_to",
        "encrypt_summary",
    )

    def __init__(
        self,
        targets: list[Target],
        dump_format: str,
        dump_level: int,
        keep_old_dumps: int,
        free_disk_size: int,
        settings: TransportSettings,
        # describes the source's own format when it is copied verbatim (dump-device recovery)
        source_label: str | None = None,
        source_level: int | None = None,
        # buffer sizes from MemAvailable (memory.plan_buffers)
        buffers: BufferPlan | None = None,
        # KDUMP_HOSTNAME: this host's name in dump directory names on network targets
        hostname: str = "",
        # KDUMP_ENCRYPT_TO (kdump_capture.age.Recipient): every file derived from memory is
        # written encrypted (NAME.age); empty: no encryption
        encrypt_to: tuple = (),
        # KDUMP_ENCRYPT_SUMMARY: with encryption, keep the crash summary in plain text too
        encrypt_summary: bool = False,
    ) -> None:
        self.targets = targets
        self.dump_format = dump_format
        self.dump_level = dump_level
        self.keep_old_dumps = keep_old_dumps
        self.free_disk_size = free_disk_size
        self.settings = settings
        self.source_label = source_label
        self.source_level = source_level
        self.buffers = BufferPlan() if buffers is None else buffers
        self.hostname = hostname
        self.encrypt_to = encrypt_to
        self.encrypt_summary = encrypt_summary


class SaveResult(Record):
    __slots__ = ("target", "directory", "record")

    def __init__(
        self,
        target: str,
        directory: str,
        record: DumpRecord,
    ) -> None:
        self.target = target
        self.directory = directory
        self.record = record


# How long a deletion for room may take to show in the target's free space (btrfs commits
# every 30 s by default), and how often to look.
SETTLE_WAIT = 40
SETTLE_POLL = 0.5


class SpaceMaker(Record):
    """Deletes, oldest first, dumps that rotation would delete anyway once this dump succeeds.

    Used before writing and, when the output grows beyond what the pre-check could know,
    while writing: a failed new dump never costs a dump that rotation would have kept. And
    none is deleted for a shortfall that deleting all of them could not cover, by the sizes
    the target lists for their files: then the save fails with every older dump in place.
    """

    __slots__ = ("transport", "candidates", "deleted", "sizes", "settled")

    def __init__(
        self,
        transport: Transport,
        candidates: list[policy.DumpDir],
        deleted: list[policy.DumpDir] | None = None,
    ) -> None:
        self.transport = transport
        self.candidates = candidates
        self.deleted = [] if deleted is None else deleted
        self.sizes: dict[str, int] = {}  # listed once per candidate
        self.settled = False  # free_space counts the last deletion (``Transport.settle``)

    def _size(self, d: policy.DumpDir) -> int:
        if d.name not in self.sizes:
            try:
                entries = self.transport.listdir(d.name)
                self.sizes[d.name] = sum(e.size for e in entries if not e.is_dir)
            except ConnectionLost:
                raise
            except TransportError:
                self.sizes[d.name] = 0
        return self.sizes[d.name]

    def could_free(self) -> int:
        """Bytes that deleting every candidate left would give back (the sizes of their
        files; a directory that cannot be listed counts nothing)."""
        return sum(self._size(d) for d in self.candidates)

    def __call__(self, short: int) -> bool:
        """Delete the oldest candidate; False when there is none left, or when all of them
        together could not cover ``short`` (bytes missing)."""
        if not self.candidates:
            return False
        could = self.could_free()
        if could < short:
            log.warning(
                "not deleting older dumps: all %d that rotation allows would not make room "
                "(their files hold %d MiB, %d MiB are missing)",
                len(self.candidates),
                could >> 20,
                -(-short >> 20),
            )
            return False
        d = self.candidates.pop(0)
        log.info("deleting old dump %s to make room (%d MiB short)", d.name, -(-short >> 20))
        if _delete(self.transport, d):
            self.deleted.append(d)
            try:
                self.settled = self.transport.settle()  # btrfs: count the freed blocks now
            except TransportError as e:
                log.warning("%s", e)
                self.settled = False
        return True  # deleted or not (a warning then), look at the free space again

    def shows_freed(self, before: int) -> bool:
        """Whether the target's free space has grown past ``before`` (read before the last
        deletion), waiting up to SETTLE_WAIT: a server's btrfs counts freed blocks only once
        its transaction commits (every 30 s by default; ``settle`` commits a local one, and
        then there is nothing to wait for). Without this the next look would still be
        short and delete the next dump too."""
        deadline = time.monotonic() + (0 if self.settled else SETTLE_WAIT)
        while True:
            free = self.transport.free_space("")
            if free is None or free > before:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL)


class BudgetMonitor:
    """Feeds progress and enforces KDUMP_FREE_DISK_SIZE while the vmcore streams.

    The pre-check knows only a lower bound of a compressed dump, so this is the guard: it
    stops the dump (or first deletes what ``make_room`` may) only when the next write could
    cross the margin, never because an estimate was large. ``estimate`` is an upper bound
    of the whole output: once what is left of it fits, nothing can cross the margin.
    """

    def __init__(
        self,
        transport: Transport,
        relpath: str,
        margin: int,
        estimate: int | None,
        progress: Progress,
        free_at_start: int | None,
        make_room: Callable[[int], bool] | None = None,
        memlog: MemoryLog | None = None,
        certain: int = 0,
    ) -> None:
        self.transport = transport
        self.certain = certain  # bytes the whole output will certainly hold (lower_bound)
        self.memlog = memlog
        self.chunks = 0
        self.relpath = relpath
        self.margin = margin
        self.estimate = estimate
        self.progress = progress
        self.make_room = make_room
        self.written = 0
        self.next_check = 0
        self.enabled = free_at_start is not None and margin > 0

    def advance(self, read: int, written: int) -> None:
        self.progress.update(read)
        self.written += written
        self.chunks += 1
        if self.memlog is not None and self.chunks % MEMORY_SAMPLE == 0:
            self.memlog.sample()
        if self.enabled and self.written >= self.next_check:
            self.check()

    def check(self, final: bool = False) -> None:
        """Raise FreeSpaceError unless writing on keeps the margin; ``final``: nothing follows."""
        while True:
            free = self.transport.free_space(self.relpath)
            if free is None:
                self.next_check = self.written + BUDGET_INTERVAL
                return
            room = free - self.margin  # what may still be written
            if final:
                left: int | None = 0
            elif self.estimate is not None:
                left = max(self.estimate - self.written, 0)
            else:
                left = None
            if left is not None and left <= room:
                self.next_check = self.written + BUDGET_INTERVAL  # the rest fits for sure
                return
            if not final and room >= WRITE_STEP:
                # Half of what is safe before looking again: some targets report free space
                # late (an NFS client's unflushed pages), and checks grow denser near the end.
                self.next_check = self.written + min(BUDGET_INTERVAL, (room - WRITE_STEP) // 2)
                return
            short = (0 if final else WRITE_STEP) - room
            # What the rest of the dump will certainly take (all of an ELF copy) must fit
            # after deleting, or deleting would cost older dumps and the dump stop anyway.
            short = max(short, self.certain - self.written - room)
            if self.make_room is None or not self.make_room(short):
                raise FreeSpaceError(
                    f"{self.transport.describe()}: only {max(free, 0) >> 20} MiB free, and "
                    f"writing on would leave less than KDUMP_FREE_DISK_SIZE "
                    f"({self.margin >> 20} MiB); dump stopped"
                )


def scan_dumps(transport: Transport, host: str | None) -> list[policy.DumpDir]:
    """This host's dump directories on the target, with their state from manifest.json.

    Names are filtered before anything is read: another host's dumps (or whatever it left
    under a dump-like name) are never opened. A link named like one of our dumps is
    "incomplete", so that rotation deletes the link itself; a manifest that is not one of ours
    (not a regular file, too large, malformed) makes its dump "failed", with a warning naming
    it. A directory that cannot be listed, or whose manifest the server will not hand over,
    is left out, with a warning: rotation never deletes what it could not read.
    """
    out: list[policy.DumpDir] = []
    for entry in transport.listdir(""):
        if not (entry.is_dir or entry.is_link):
            continue
        parsed = policy.parse_dump_name(entry.name)
        if parsed is None or parsed[0] != host:
            continue
        _, stamp, seq = parsed
        state = _state(transport, entry)
        if state is not None:
            out.append(policy.DumpDir(stamp, seq, entry.name, host, state))
    return out


def _state(transport: Transport, entry: Entry) -> str | None:
    """The dump's state, or None for a directory that cannot be listed."""
    where = f"{transport.describe()}/{entry.name}"
    try:
        if entry.is_link:
            raise UnsafeFile(f"{where}: a link, not a directory")
        entries = transport.listdir(entry.name)
    except UnsafeFile as e:
        log.warning("%s; never followed, only the link is deleted", e)
        return policy.INCOMPLETE
    except ConnectionLost:
        raise
    except TransportError as e:
        # One directory we may not enter (root_squash, another account) must not cost the
        # new dump; what we cannot read we do not judge: rotation leaves it alone.
        log.warning("%s; left alone", e)
        return None
    if MANIFEST not in {e.name for e in entries}:
        return policy.INCOMPLETE
    try:
        doc = manifest.read(transport, entry.name)
    except ConnectionLost:
        raise
    except UnsafeFile as e:  # a link, a FIFO, too large: not one of ours
        log.warning("cannot read %s/%s, counting the dump as failed: %s", where, MANIFEST, e)
        return policy.FAILED
    except TransportError as e:
        # The server would not hand it over (an upload-only FTP account answers RETR with
        # 550, a root-squashed NFS client gets EACCES): it may be a good dump, and what we
        # cannot read we do not judge: rotation leaves it alone.
        log.warning("cannot read %s/%s; left alone: %s", where, MANIFEST, e)
        return None
    except (KdumpError, FileNotFoundError) as e:
        log.warning("cannot read %s/%s, counting the dump as failed: %s", where, MANIFEST, e)
        return policy.FAILED
    if not doc.complete:
        return policy.FAILED
    damage = manifest.files_differ(doc, entries)
    if damage is not None:
        # Counted as complete, a dump whose vmcore is gone would keep rotation from
        # keeping a whole older one.
        log.warning("%s: %s; not counted as a complete dump", where, damage)
        return policy.DAMAGED
    return policy.COMPLETE


def _remove(transport: Transport, dumps: list[policy.DumpDir], why: str) -> list[policy.DumpDir]:
    """Delete ``dumps``; returns those deleted."""
    done = []
    for d in dumps:
        log.info("deleting %s dump %s (%s)", d.state, d.name, why)
        if _delete(transport, d):
            done.append(d)
    return done


def _delete(transport: Transport, d: policy.DumpDir) -> bool:
    """A failed deletion is a warning: cleaning up must never cost the new dump.

    A dump without a manifest may be one that another of our processes is writing right
    now (an admin's ``save`` beside the boot-time ``recover``), or has completed since it
    was listed: it goes only when nobody holds it and it is still without a manifest.
    """
    held = None
    try:
        if d.state == policy.INCOMPLETE:
            held = transport.claim(d.name)
            if held is None:
                log.info("%s is being written by another process on this host; left alone", d.name)
                return False
            if _state(transport, Entry(d.name, True)) != policy.INCOMPLETE:
                log.info("%s was completed since it was listed; left alone", d.name)
                return False
        transport.remove_tree(d.name)
    except TransportError as e:
        log.warning("could not delete %s (%s); going on with the new dump", d.name, e)
        return False
    finally:
        if held is not None:
            held.release()
    return True


def _make_dump_dir(
    transport: Transport, stamp: str, host: str | None, known: list[policy.DumpDir]
) -> tuple[str, Claim]:
    """A new dump directory's name, and this process's claim on it: held while the dump is
    written, so that no other save of ours takes it for one left by a killed run."""
    # After the highest sequence number already used for this time stamp: a free lower one
    # (its dump rotated away) would sort the new dump before an older one. (Not after a
    # number no save of ours reaches: any host may create names on a shared target.)
    first = 1 + max((d.seq for d in known if d.stamp == stamp and d.seq < 1000), default=-1)
    for seq in range(first, first + 1000):
        name = policy.dump_name(stamp, host, seq)
        try:
            transport.makedir(name)
        except FileExistsError:
            continue
        held = transport.claim(name)
        if held is not None:
            return name, held
        # Another save of ours, cleaning up, holds it to delete it: it looked incomplete.
    raise TransportError(f"{transport.describe()}: cannot find a free dump directory name")


def _put(transport: Transport, relpath: str, data: bytes, encrypt_to: tuple = ()) -> dict:
    with _create(transport, relpath, encrypt_to) as sink:
        sink.write(data)
        return _info(sink.commit(), sink)


def _create(transport: Transport, relpath: str, encrypt_to: tuple):
    """A sink for ``relpath``, or for ``relpath``.age sealing what is written to it."""
    if not encrypt_to:
        return transport.create(relpath)
    return SealedSink(transport.create(relpath + AGE_SUFFIX), encrypt_to)


def _info(info, sink) -> dict:
    """The manifest entry of a committed file: what is stored, and the plaintext's checksum
    when it is encrypted (so a decrypted copy can be checked)."""
    out: dict = {"size": info.size, **checksum.entry(info.algorithm, info.digest)}
    if isinstance(sink, SealedSink):
        out["plaintext"] = sink.plaintext
    return out


class SealedSink:
    """Plaintext in, the age format out to ``inner`` (a Sink): never seekable.

    ``commit`` seals the last chunk, commits ``inner`` and returns its FileInfo (the stored
    ciphertext's size and checksum: ``verify`` needs no key); ``plaintext`` then holds the
    name, size and checksum (``inner``'s algorithm) of what was written to us. Memory:
    about 1.1 MiB (age.Encryptor).
    """

    seekable = False

    def __init__(self, inner, recipients: tuple) -> None:
        from .age import Encryptor  # imports cryptography: only when encryption is on

        self.inner = inner
        self.enc = Encryptor(recipients, inner.write, checksum.new(inner.algorithm))
        self.plaintext: dict = {}

    @property
    def committed(self) -> bool:
        return self.inner.committed

    def tell(self) -> int:
        return self.enc.plain_size

    def write(self, data) -> None:
        self.enc.write(data)

    def commit(self):
        self.enc.finish()
        info = self.inner.commit()
        name = info.name.removesuffix(AGE_SUFFIX)
        self.plaintext = {
            "name": name.rpartition("/")[2],
            "size": self.enc.plain_size,
            **checksum.entry(self.inner.algorithm, self.enc.plain_hash.hexdigest()),
        }
        return info

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> SealedSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.inner.committed:
            self.inner.abort()


def save_to_target(
    vm: Vmcore,
    plan: SavePlan,
    target: Target,
    progress: Progress | None = None,
    now: float | None = None,
    memlog: MemoryLog | None = None,
) -> SaveResult:
    """Save one dump to ``target``: check, rotate, budget, write, commit, prune."""
    progress = progress or NoProgress()
    memlog = memlog or MemoryLog()
    started = time.time() if now is None else now
    # The largest file this save may write: S3 sizes its upload parts by it (by the
    # writer's own bound below, once it has one).
    expected = expected_file_size(vm.size)
    transport = open_transport(target, plan.settings.replace(expected_size=expected))
    # Everything that can fail without touching the target comes first, because rotation
    # below may delete older dumps: the crash time and so the dump's name, the writer (a
    # format this build cannot write), the least it will write and the kernel log (bounded).
    crash_time, stamp, time_note = _dump_time(vm, started)
    writer: FormatWriter | None = None
    enc = plan.encrypt_to
    if plan.dump_format != "none":
        # An age stream cannot seek: encrypted kdump-compressed dumps are written flattened
        # (as over FTP), and `kdump-capture decrypt` rearranges them.
        seekable = transport.can_seek and not enc
        writer = make_writer(vm, plan.dump_format, plan.dump_level, seekable, plan.buffers)
    lower_bound = writer.lower_bound() if writer else 0
    if writer is not None:
        estimate = writer.estimate()  # the filter's walk, which lower_bound has just done
        if estimate is not None:
            transport.expect(expected_file_size(estimate))
    memlog.mark("bitmaps")
    dmesg, dmesg_error = extract_log(vm)
    memlog.mark("dmesg")
    if writer is None and dmesg_error is not None:
        raise dmesg_error  # format "none" saves only dmesg.txt: there is nothing to save
    summary = summarize_log(dmesg)
    with transport, contextlib.ExitStack() as claims:
        memlog.mark("transport session")
        host = None
        if target.scheme != "file":
            from .identity import host_identity  # sockets and routes: network targets only

            host = host_identity(target, plan.hostname)
        existing = policy.ours(scan_dumps(transport, host), host)
        # Dumps an earlier run left without a manifest go once this one is saved (or first,
        # when room is needed for it): until then, one may hold the only copy of a crash.
        # KEEP_OLD_DUMPS=0 keeps all: them too.
        left = policy.select_stale(existing)
        stale = left if plan.keep_old_dumps else []
        existing = [d for d in existing if d.state != policy.INCOMPLETE]
        before = policy.select_before_write(existing, plan.keep_old_dumps)
        gone = _remove(transport, before, f"KDUMP_KEEP_OLD_DUMPS={plan.keep_old_dumps}")
        existing = [d for d in existing if d not in gone]

        # The pre-check may refuse only a dump that cannot fit: it asks for what the writer
        # will certainly write; the BudgetMonitor guards the rest while it streams.
        room = SpaceMaker(
            transport, stale + policy.prunable_for_space(existing, plan.keep_old_dumps)
        )
        no_room: FreeSpaceError | None = None
        try:
            free = _ensure_room(transport, room, plan, lower_bound)
        except FreeSpaceError as e:
            # The vmcore cannot fit, but the kernel log says why the machine crashed: it is
            # kept with a failed record (as SUSE's kdump keeps dmesg and README.txt) when it
            # fits inside the margin too.
            if dmesg is None or not _log_fits(transport, plan, len(dmesg)):
                raise FreeSpaceError(f"{e}; nothing was written") from None
            no_room, free = FreeSpaceError(f"{e}; the vmcore was not written"), None

        name, held = _make_dump_dir(transport, stamp, host, [*left, *existing])
        claims.callback(held.release)
        log.info("saving dump to %s/%s", transport.describe(), name)
        record = DumpRecord(
            status="failed",
            host=host or os.uname().nodename,  # socket.gethostname(), without socket
            target=transport.describe(),
            directory=name,
            crash_time=crash_time,
            kernel_release=vm.release,
            dump_level=plan.dump_level,
            dump_format=FORMAT_NAMES.get(plan.dump_format, plan.dump_format),
            source=vm.path,
            source_size=vm.size,
            started=started,
        )
        if time_note:
            record.notes.append(time_note)
        if dmesg_error is not None:
            record.notes.append(f"dmesg.txt not saved: {dmesg_error}")
        if enc:
            record.encryption = {
                "format": "age-encryption.org/v1",
                "recipients": [r.text for r in enc],
            }
        if enc and not plan.encrypt_summary:
            # From the crashed kernel's memory: only inside the encrypted files.
            record.crash_summary = {"encrypted": True}
        else:
            record.crash_summary = summary.as_dict()
        try:
            _put(transport, f"{name}/{README}", PLACEHOLDER.encode())
            if dmesg is not None:
                record.files[DMESG + (AGE_SUFFIX if enc else "")] = _put(
                    transport, f"{name}/{DMESG}", dmesg, enc
                )
            if enc:
                text = summary.text().encode()
                record.files[SUMMARY + AGE_SUFFIX] = _put(transport, f"{name}/{SUMMARY}", text, enc)
            if no_room is not None:
                raise no_room
            result = _save_vmcore(
                vm, plan, transport, name, writer, record, progress, free, room, memlog
            )
        except FreeSpaceError as e:
            _keep_log_or_remove(transport, name, record, e)
            raise
        except KdumpError as e:
            record.error = str(e)
            record.finished = time.time()
            _try(lambda: _publish_record(transport, name, record))
            raise
        record.finished = time.time()
        if result is not None and result.incomplete:
            # Saved, but not all of it: never presented as complete, and never a reason
            # for rotation to delete an older complete dump.
            record.status = "incomplete"
            record.error = result.incomplete
            _publish_record(transport, name, record)
            err = IncompleteDump(
                f"{transport.describe()}/{name}: the dump is INCOMPLETE: {result.incomplete}"
            )
            err.where = f"{transport.describe()}/{name}"
            raise err
        record.status = "complete"
        _publish_record(transport, name, record)
        log.info("dump complete: %s/%s", transport.describe(), name)

        try:
            # The target's dumps are known since the scan above: no second listing.
            _, _, seq = policy.parse_dump_name(name)
            new = policy.DumpDir(stamp, seq, name, host, policy.COMPLETE)
            existing = [d for d in existing if d not in room.deleted]
            stale = [d for d in stale if d not in room.deleted]
            _remove(transport, stale, "left incomplete by an earlier run")
            expired = policy.select_expired([*existing, new], plan.keep_old_dumps, new=name)
            _remove(transport, expired, f"KDUMP_KEEP_OLD_DUMPS={plan.keep_old_dumps}")
        except TransportError as e:
            log.warning("rotation after the dump failed: %s", e)
        except Interrupted as e:
            # The dump is saved and complete: a signal now stops only the clean-up.
            log.warning("rotation after the dump stopped: %s; the dump is complete", e)
    return SaveResult(target=transport.describe(), directory=name, record=record)


def _dump_time(vm: Vmcore, started: float) -> tuple[int | None, str, str | None]:
    """The crash time (None if unknown or implausible), the dump's time stamp, and a note.

    CRASHTIME comes from the crashed kernel (``Vmcore.crash_time`` range-checks it); when it
    cannot be used, the dump is named after this kernel's clock and the README says so.
    """
    crash_time = vm.crash_time
    problem = vm.crash_time_problem
    note = None
    if problem:
        note = f"{problem}; the dump is named after the capture kernel's clock instead"
        log.warning("%s", note)
    return crash_time, policy.stamp_for(crash_time if crash_time is not None else started), note


def summarize_log(dmesg: bytes | None) -> CrashSummary:
    """The crash summary of the log; like the log itself, a failure here (a bug: summarize
    takes any input) costs only the summary, never the dump."""
    try:
        return summarize(dmesg)
    except Exception as e:  # the same boundary as extract_log
        log.warning("no crash summary: internal error (%s: %s); please report it", type(e), e)
        return CrashSummary(source="none")


def extract_log(vm: Vmcore) -> tuple[bytes | None, KdumpError | None]:
    """dmesg.txt's content, or why there is none. Never raises (except on a signal).

    The kernel log is read from the crashed kernel's memory, the least trusted input there
    is: whatever goes wrong there, even a bug in this code, must cost only dmesg.txt, never
    the vmcore. This is that boundary; the reason ends up in the README and manifest.
    """
    try:
        return extract_dmesg(vm).encode(), None
    except Interrupted:
        raise
    except KdumpError as e:
        log.warning("no dmesg.txt: %s", e)
        return None, e
    except Exception as e:  # the boundary described above: record, never propagate
        log.debug("kernel log extraction failed", exc_info=True)
        err = VmcoreError(
            f"internal error while reading the kernel log ({type(e).__name__}: {e}); "
            "please report it"
        )
        log.warning("no dmesg.txt: %s", err)
        return None, err


def _save_vmcore(
    vm, plan, transport, name, writer, record, progress, free, room, memlog=None
) -> WriteResult | None:
    if writer is None:
        return None
    enc = plan.encrypt_to
    estimate = writer.estimate()
    if enc and estimate is not None:
        # age adds a 16-byte tag per 64 KiB chunk and a header of a few KiB. (The monitor
        # counts plaintext bytes: 1/4096 less than what lands, far inside WRITE_STEP.)
        estimate += estimate // 4096 + (64 << 10)
    monitor = BudgetMonitor(
        transport,
        name,
        plan.free_disk_size,
        estimate,
        progress,
        free,
        room,
        memlog,
        certain=writer.lower_bound(),
    )
    filename = VMCORE + (AGE_SUFFIX if enc else "")
    progress.start(filename, writer.input_size())
    vm.reset_unreadable()
    try:
        with _create(transport, f"{name}/{VMCORE}", enc) as sink:
            result = writer.write(sink, monitor)
            if monitor.enabled:
                monitor.check(final=True)
            info = sink.commit()
    except TargetFull as e:
        raise FreeSpaceError(str(e)) from e
    finally:
        progress.finish()
    record.files[filename] = _info(info, sink)
    record.dump_format = plan.source_label or result.format
    record.dump_level = result.dump_level if plan.source_level is None else plan.source_level
    record.flattened = result.flattened
    record.pages_total = result.pages_total
    record.pages_written = result.pages_written
    record.notes.extend(result.notes)
    if vm.unreadable_bytes:
        record.unreadable_bytes = vm.unreadable_bytes
        record.unreadable = [
            {"offset": a, "size": b - a, "paddr": vm.paddr_of(a)} for a, b in vm.unreadable
        ]
        record.notes.append(
            f"{vm.unreadable_bytes} bytes of {vm.path} could not be read (read errors, each "
            "retried once); they are saved as zeros. The ranges are listed above and in "
            f"{MANIFEST} ('unreadable')."
        )
    return result


def _publish_record(transport: Transport, name: str, record: DumpRecord) -> None:
    """manifest.json, the completeness mark, then README.txt in place of the placeholder.

    In this order a save stopped in between (killed, the target full) leaves a README that
    says the dump is incomplete, never one that says complete beside no manifest. The
    manifest lists README.txt as it is about to be written (its size and checksum, by the
    transport's algorithm); the README written is checked against that. Once the manifest
    is there it is the record: a README that cannot be written then is a warning (``verify``
    says it is missing), never the save's error.
    """
    record.notes.extend(n for n in transport.notes if n not in record.notes)
    readme = record.readme_text().encode()
    algorithm = transport.settings.checksum
    h = checksum.new(algorithm)
    h.update(readme)
    record.files[README] = {"size": len(readme), **checksum.entry(algorithm, h.hexdigest())}
    _put(transport, f"{name}/{MANIFEST}", record.manifest_json())
    try:
        transport.remove_file(f"{name}/{README}")
        if _put(transport, f"{name}/{README}", readme) != record.files[README]:
            raise TransportError(f"{transport.describe()}/{name}/{README}: stored other bytes")
    except Interrupted:
        raise
    except KdumpError as e:
        log.warning(
            "%s/%s: %s is written (status %s), but %s is not: %s",
            transport.describe(),
            name,
            MANIFEST,
            record.status,
            README,
            e,
        )


def _ensure_room(transport, room: SpaceMaker, plan: SavePlan, needed: int) -> int | None:
    """Check the budget before writing; let ``room`` delete what rotation drops anyway, and
    only when deleting it can make the room (``SpaceMaker``).

    ``needed``: bytes the dump will certainly take. Returns the free space.
    """
    while True:
        free = transport.free_space("")
        short = policy.budget_shortfall(free, needed, plan.free_disk_size)
        deleted = len(room.deleted)
        if not short or not room(short):
            break
        if free is not None and len(room.deleted) > deleted and not room.shows_freed(free):
            # Snapshots or a recycle bin keep what is deleted: deleting more would cost
            # more older dumps for nothing.
            log.warning(
                "%s: deleting %s gave back no space (snapshots, a recycle bin?); no more "
                "older dumps are deleted",
                transport.describe(),
                room.deleted[-1].name,
            )
            room.candidates = []
    if not short:
        return free
    raise FreeSpaceError(
        f"{transport.describe()}: {free >> 20} MiB free, but the dump needs at least "
        f"{-(-needed >> 20)} MiB and KDUMP_FREE_DISK_SIZE keeps {plan.free_disk_size >> 20} MiB "
        "free"
    )


# What a failed record adds to the kernel log: the placeholder, manifest and final README.
RECORD_ROOM = 64 << 10


def _log_fits(transport: Transport, plan: SavePlan, size: int) -> bool:
    """Whether the kernel log and a failed record still leave KDUMP_FREE_DISK_SIZE free."""
    free = transport.free_space("")
    return not policy.budget_shortfall(free, size + RECORD_ROOM, plan.free_disk_size)


def _keep_log_or_remove(
    transport: Transport, name: str, record: DumpRecord, err: FreeSpaceError
) -> None:
    """After the vmcore did not fit: keep the dump's kernel log with a failed record, or
    (no log, or no room left even for the record) remove the dump's directory."""
    if any(f.startswith(DMESG) for f in record.files):
        record.error = str(err)
        record.finished = time.time()
        try:
            _publish_record(transport, name, record)
            log.error(
                "not enough space for the vmcore: %s/%s keeps %s",
                transport.describe(),
                name,
                ", ".join(sorted(record.files)),
            )
            return
        except Interrupted:
            raise
        except KdumpError as e:
            log.warning("cannot record the failed dump %s: %s", name, e)
    log.error("not enough space: removing the partial dump %s", name)
    _try(lambda: transport.remove_tree(name))


def _try(fn) -> None:
    try:
        fn()
    except Exception as e:  # best effort while already failing
        log.warning("while cleaning up: %s", e)


def save(
    vm: Vmcore, plan: SavePlan, progress: Progress | None = None, memlog: MemoryLog | None = None
) -> SaveResult:
    """Try each target in order; the first that takes the whole dump wins."""
    last: KdumpError | None = None
    for i, target in enumerate(plan.targets):
        try:
            return save_to_target(vm, plan, target, progress, memlog=memlog)
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
