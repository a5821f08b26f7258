"""Memory in a small capture kernel: what the save uses, measured, and what its buffers may
take, from MemAvailable.

At crashkernel=128M a 1 GiB machine's capture kernel has about 88 MiB, of which the
unpacked initramfs (it stays in RAM: rootfs is tmpfs), the kernel and /init leave 30-40
MiB to the save. Every buffer the save allocates in proportion to its work (the replay
ring of a network sink, compression batches in flight, compression threads) is sized here
from MemAvailable at the start, down to a floor; ``docs/ARCHITECTURE.md`` ("Memory budget")
gives the parts and their measured sizes, and ``kdump-capture estimate`` adds them up.

``MemoryLog`` measures the parts as the save goes: anonymous memory (/proc/self/
smaps_rollup) after each phase, and its peak while the dump streams (sampled from
/proc/self/statm, which is cheap).
"""

from __future__ import annotations

import functools
import logging
import os

from .record import Record

log = logging.getLogger(__name__)

MIB = 1 << 20

# Replay ring of a network sink (SFTP, SMB, FTP): an eighth of what is available, between
# 4 and 16 MiB. 16 MiB covers seconds of a fast link in flight; at crashkernel=128M about
# 31 MiB are available when the save starts, and a 16 MiB ring got the save OOM-killed.
REPLAY_MIN = 4 * MIB
REPLAY_MAX = 16 * MIB
REPLAY_SHARE = 8
# kdump-compressed batches in flight (1 MiB of pages each, plus their compressed form):
# with one CPU (nr_cpus=1 in a capture kernel) two keep reading and sending overlapped;
# more only help with a second core compressing.
BATCHES_MIN = 2
BATCHES_MAX = 4
BATCHES_SHARE = 16  # at most a sixteenth of what is available goes to batches
# Pages per batch: 256 (1 MiB: fewer Python round trips per GB), or 64 when less than
# BIG_BATCHES_FROM is available (three buffers and their compressed copies: 3 MiB less).
BATCH_PAGES = 256
SMALL_BATCH_PAGES = 64
BIG_BATCHES_FROM = 64 * MIB
# Compression threads: one per CPU, at most two (measured: a third does not pay).
WORKERS_MAX = 2
# S3's limits: every part but the last at least 5 MiB, at most 10,000 parts per upload.
S3_MIN_PART = 5 * MIB
S3_MAX_PARTS = 10_000


def s3_part_plan(budget: int, expected: int) -> tuple[int, int]:
    """(part size, buffers) of an S3 upload for a memory ``budget`` and an ``expected``
    largest file size (pure; transports.s3 uploads with it, the estimate counts it).

    Two buffers (one uploading while the next fills) when the budget holds two parts of at
    least 5 MiB, else one. The part grows, whatever the budget, when ``expected`` bytes
    would otherwise need more than 10,000 parts. Sizes are whole MiB.
    """
    buffers = 2 if budget >= 2 * S3_MIN_PART else 1
    part = max(S3_MIN_PART, budget // buffers // MIB * MIB)
    needed = -(-expected // S3_MAX_PARTS) if expected > 0 else 0
    if needed > part:
        part, buffers = -(-needed // MIB) * MIB, 1
    return part, buffers


def expected_file_size(source: int) -> int:
    """The most a dump of a ``source``-byte vmcore may take: the source plus format overhead
    (page descriptors and bitmaps below 1 %, flattened headers); 0 when unknown."""
    return source + source // 64 + (16 << 20) if source else 0


class BufferPlan(Record):
    """The sizes of the buffers that grow with the work, chosen before the save starts."""

    __slots__ = ("replay", "batches", "workers", "batch_pages")

    def __init__(
        self,
        replay: int = REPLAY_MAX,  # bytes a network sink keeps for resuming
        batches: int = BATCHES_MAX,  # kdump-compressed batches in flight
        workers: int = WORKERS_MAX,  # compression threads
        batch_pages: int = BATCH_PAGES,  # pages per kdump-compressed batch
    ) -> None:
        self.replay = replay
        self.batches = batches
        self.workers = workers
        self.batch_pages = batch_pages

    def describe(self) -> str:
        return (
            f"replay ring {self.replay // MIB} MiB, {self.batches} batches of "
            f"{self.batch_pages * 4} KiB in flight, {self.workers} compression "
            f"thread{'s' if self.workers > 1 else ''}"
        )


def plan_buffers(available: int | None, cpus: int) -> BufferPlan:
    """Buffer sizes for ``available`` bytes (MemAvailable; None: unknown, full size) and
    ``cpus`` usable CPUs (pure)."""
    workers = max(1, min(cpus, WORKERS_MAX))
    if available is None:
        return BufferPlan(REPLAY_MAX, BATCHES_MAX if cpus > 1 else BATCHES_MIN, workers)
    replay = max(REPLAY_MIN, min(REPLAY_MAX, available // REPLAY_SHARE // MIB * MIB))
    batches = max(BATCHES_MIN, min(BATCHES_MAX, available // BATCHES_SHARE // MIB))
    if cpus <= 1:
        batches = BATCHES_MIN
    pages = BATCH_PAGES if available >= BIG_BATCHES_FROM else SMALL_BATCH_PAGES
    return BufferPlan(replay, batches, workers, pages)


# The least any save takes (what the estimate counts).
FLOOR = BufferPlan(REPLAY_MIN, BATCHES_MIN, 1, SMALL_BATCH_PAGES)


# -- the budget of a whole capture, for ``kdump-capture estimate`` ------------------------
# Measured in the capture kernel (bench/capture_fitness.py, 1 GiB guest, Debian's 6.1
# cloud kernel); docs/ARCHITECTURE.md "Memory budget" explains each part.
#: crashkernel= minus MemTotal: the kernel's code and data, its struct pages, reserved
#: areas (39.3 MiB at 128M, 39.5 MiB at 160M)
KERNEL_RESERVED = 40 * MIB
#: MemTotal - MemAvailable - Shmem when /init starts: the kernel's own allocations and
#: /init itself (24.1 MiB at 128M, 24.7 MiB at 160M; /init holds about 6 MiB)
KERNEL_AND_INIT = 25 * MIB
#: rootfs is tmpfs, which the kernel sizes at boot to half of the memory it has then: the
#: reservation less the compressed image (still in memory) less this; the unpacked image must
#: fit in the half ("Initramfs unpacking failed: write error", then "No working init found").
#: crashkernel= minus twice the rootfs size, minus the compressed image: 47.7 MiB at 112M,
#: 128M and 160M (the size /init logs at start)
ROOTFS_BOOT = 48 * MIB
#: what the kernel takes while the save runs: socket buffers, dirty page cache, slab
SAVE_SLACK = 4 * MIB
#: a transport's connection state once connected (SSH or SMB session, helper threads)
SESSION = {"file": MIB // 4, "nfs": MIB // 4, "ftp": MIB // 2, "sftp": MIB, "cifs": 2 * MIB}
#: a compression thread's codec state (zlib's deflate state is 268 KiB per call)
CODEC_STATE = MIB // 2
#: an SFTP read-back (hashing a seeked file) keeps this much requested (transports.sftp)
READ_BACK = 2 * MIB
#: FTP keeps at least this much for replay (transports.ftp: no acknowledgements)
FTP_REPLAY = 12 * MIB
#: and caps its data socket's send buffer at 2 MiB, which the kernel doubles: kernel memory
#: that the save's own figures do not show (the estimate was 16M short for FTP without it)
FTP_SOCKET = 4 * MIB
#: an NFS target's pages in the client's page cache: up to dirty_ratio (20 %) of what is
#: available dirty, plus those under writeback until the server commits them (the VM
#: matrix: NFS needs 128M where the rest of the estimate said 112M)
NFS_WRITEBACK = 10 * MIB
#: a PUT of an S3 part fills its socket's send buffer, which TCP autotuning lets grow to
#: tcp_wmem's default maximum: kernel memory the save's own figures do not show (with only
#: the part buffers counted the estimate said 112M, where S3 saves were OOM-killed)
S3_SOCKET = 4 * MIB
#: the ELF writer's chunk (formats.CHUNK)
CHUNK = MIB
KDUMP_FORMATS = ("compressed", "zstd", "lzo", "snappy")
#: a reservation is a multiple of this
ROUND = 16 * MIB


def save_buffers(
    scheme: str, fmt: str, level: int, plan: BufferPlan, source: int = 0
) -> dict[str, int]:
    """What a save with ``plan`` of a ``source``-byte vmcore allocates for its work, by part,
    in bytes (pure)."""
    parts: dict[str, int] = {}
    if fmt in KDUMP_FORMATS:
        batch = plan.batch_pages * 4096
        # buffers being read or compressed, plus their compressed copies in flight
        parts["I/O buffers"] = (2 * plan.batches + 1) * batch + (64 << 10)
        parts["compression"] = plan.workers * CODEC_STATE
    elif fmt in ("elf", "raw"):
        parts["I/O buffers"] = CHUNK
    if scheme == "ftp":
        parts["replay ring"] = max(plan.replay, FTP_REPLAY)
        parts["socket send buffer (kernel)"] = FTP_SOCKET
    elif scheme in ("sftp", "cifs"):
        parts["replay ring"] = plan.replay
    if scheme == "cifs":
        # Up to half the ring is unconfirmed; smbprotocol keeps each WRITE's message until
        # its reply, and signing or encryption makes another copy (measured: the save's
        # writing phase is 5 MiB above its 4 MiB ring at 144M).
        parts["SMB requests in flight (message copies)"] = plan.replay
    if scheme == "sftp" and fmt in KDUMP_FORMATS:
        parts["read-back"] = READ_BACK
    if scheme == "nfs":
        parts["NFS page cache under writeback (kernel)"] = NFS_WRITEBACK
    if scheme == "s3":
        part, buffers = s3_part_plan(plan.replay, expected_file_size(source))
        parts["upload parts"] = part * buffers
        parts["socket send buffer (kernel)"] = S3_SOCKET
    return parts


def round_up(n: int, step: int = ROUND) -> int:
    return -(-n // step) * step


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes ({} when unreadable)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def mem_available() -> int | None:
    """MemAvailable in bytes, or None."""
    return read_meminfo().get("MemAvailable")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def rollup(path: str = "/proc/self/smaps_rollup") -> dict[str, int]:
    """This process's memory by kind in bytes: Rss, Anonymous, Shmem..., or {}."""
    return read_meminfo(path)


PAGE = os.sysconf("SC_PAGE_SIZE")


def anon_now(path: str = "/proc/self/statm") -> int:
    """Resident anonymous memory in bytes (statm: resident minus file and shmem pages)."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class MemoryLog:
    """Anonymous memory after each phase of the save, and its peak while writing."""

    def __init__(self, available: int | None = None, plan: BufferPlan | None = None) -> None:
        self.phases: list[tuple[str, int]] = []
        self.peak = 0
        # the kernel's dirty and writeback pages at their peak (page cache of a file or NFS
        # target): kernel memory the save causes beyond its own
        self.dirty_peak = 0
        self.available = available
        self.plan = plan

    def mark(self, phase: str) -> None:
        anon = rollup().get("Anonymous", 0) or anon_now()
        self.phases.append((phase, anon))
        self.peak = max(self.peak, anon)

    def sample(self) -> None:
        self.peak = max(self.peak, anon_now())
        info = read_meminfo()
        self.dirty_peak = max(self.dirty_peak, info.get("Dirty", 0) + info.get("Writeback", 0))

    def report(self) -> str:
        """One line: each phase's growth, then the peak (MiB)."""
        parts = []
        before = 0
        for name, anon in self.phases:
            parts.append(f"{name} {'+' if before else ''}{(anon - before) / MIB:.1f}")
            before = anon
        hwm = _hwm()
        text = "memory (anonymous, MiB): " + ", ".join(parts)
        if self.phases:
            text += f", writing +{max(self.peak - self.phases[-1][1], 0) / MIB:.1f}"
        text += f"; peak {self.peak / MIB:.1f}"
        if hwm:
            text += f" (peak RSS {hwm / MIB:.1f} with mapped files)"
        text += f"; kernel dirty+writeback peak {self.dirty_peak / MIB:.1f}"
        if self.available is not None:
            text += f"; MemAvailable at start {self.available / MIB:.0f}"
        if self.plan is not None:
            text += f"; {self.plan.describe()}"
        return text


def _hwm() -> int:
    return read_meminfo("/proc/self/status").get("VmHWM", 0)


# Free page reporting: a virtio balloon with VIRTIO_BALLOON_F_REPORTING hands every free
# block of page_reporting_order or more back to the host, which backs it again only when it
# is touched. A buffered write of 1 MiB to ext4 takes a page-cache folio of that size, from
# exactly those blocks; writes smaller than a reported block take folios from the lower
# free lists, which are never reported. Measured on such a VM (Firecracker, order 5), 6
# interleaved rounds on one CPU: an ELF -d 31 dump of the 2 GiB sample (147 MB written)
# took a median of 0.55 s in 1 MiB writes, 0.32 s in 256 KiB ones and 0.19 s in 64 KiB
# ones, makedumpfile -E (64 KiB writes) 0.17 s. Overwriting 1 GiB already in the page
# cache costs 0.06 s more in 64 KiB writes than in 1 MiB ones, so the pieces are small
# only where reporting is on.
BALLOON_F_REPORTING = 5  # virtio_balloon.h
MIN_REPORTING_ORDER = 4  # 64 KiB blocks: 32 KiB pieces
MAX_REPORTING_ORDER = 9  # 2 MiB blocks: whole 1 MiB batches stay below


def file_write_piece(sys_root: str = "/sys") -> int | None:
    """The largest write(2) to a local file that keeps to unreported memory, or None (any).

    None unless a virtio balloon reports free pages: the largest folio below the
    reporting order, when that is 32 KiB to 512 KiB. Below that, pieces of a few pages
    would cost more in system calls than they save (not measured); from 2 MiB blocks up
    (the kernel's default order, or -1 before a device set it) 1 MiB writes stay below.
    """
    try:
        with open(f"{sys_root}/module/page_reporting/parameters/page_reporting_order") as f:
            order = int(f.read().strip())
        drv = f"{sys_root}/bus/virtio/drivers/virtio_balloon"
        reporting = False
        for name in os.listdir(drv):
            if name.startswith("virtio"):
                with open(f"{drv}/{name}/features") as f:
                    bits = f.read().strip()
                reporting |= len(bits) > BALLOON_F_REPORTING and bits[BALLOON_F_REPORTING] == "1"
    except (OSError, ValueError):
        return None
    if not reporting or not MIN_REPORTING_ORDER <= order < MAX_REPORTING_ORDER:
        return None
    return PAGE << (order - 1)


@functools.cache
def write_piece() -> int:
    """Bytes per write(2) to a local file or dump device on this machine (file_write_piece,
    read once): small only under free page reporting."""
    piece = file_write_piece()
    if piece:
        log.debug("free page reporting is on: files are written %d KiB at a time", piece >> 10)
    return piece or 1 << 62
