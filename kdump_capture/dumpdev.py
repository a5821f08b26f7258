"""KDUMP_DUMPDEV: write the dump raw to a device, and recover it from there later.

When the root filesystem may be damaged, the capture kernel writes the dump straight onto
a dedicated partition (no filesystem involved) and does not reboot; the administrator
checks the system from the console and then runs ``kdump-capture recover``, which copies
the dump into KDUMP_SAVEDIR like any other dump.

Device layout: one 4 KiB header block, then the dump data (the configured format)::

    off  size  field
      0     8  magic "KDCAPDEV"
      8     4  version (1)
     12     4  state: 1 writing, 2 complete, 3 recovered, 4 incomplete,
                 5 incomplete and recovered
     16     8  data offset (4096)
     24     8  data size in bytes
     32     8  crash time (seconds since the epoch, 0 if unknown)
     40     8  time the dump was written
     48    32  SHA-256 of the data
     80    65  kernel release (NUL-padded)
    145    31  format key (e.g. "elf"), NUL-padded
    176     4  dump level
The header says "writing" until the data is complete and flushed, so an interrupted dump
is never taken for a complete one. A source that ended early leaves "incomplete": the size
and SHA-256 of what was written, which ``recover`` saves as an incomplete dump. (States 4
and 5 came later; older readers refuse them as unknown, never misread them.) A header
read back is untrusted (the device may hold anything): every field is checked
(``DeviceHeader.unpack``) before it is used.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import struct
import time
from dataclasses import dataclass, replace

from transports.base import FileInfo, Sink, WriteBehind, mode_kind

from . import checksum
from .errors import ConfigError, DumpDeviceError, IncompleteDump, NoDumpError, VmcoreError
from .formats import CHUNK, FORMAT_NAMES, make_writer
from .memory import BufferPlan, write_piece
from .progress import NoProgress
from .vmcore import Vmcore, open_vmcore

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .progress import Progress

log = logging.getLogger(__name__)

MAGIC = b"KDCAPDEV"
VERSION = 1
HEADER = struct.Struct("<8sIIQQqq32s65s31sI")
assert HEADER.size == 180
DATA_OFFSET = 4096
WRITING, COMPLETE, RECOVERED, INCOMPLETE, RECOVERED_INCOMPLETE = 1, 2, 3, 4, 5
# Formats a device dump can be in ("none" writes no data, so it never goes to a device).
DEVICE_FORMATS = tuple(k for k in FORMAT_NAMES if k != "none")
# Times in the header: seconds since the epoch up to the end of year 9999, the range every
# date function here (and a dump directory name) can represent.
MAX_TIME = 253402300799
STATE_NAMES = {
    WRITING: "incomplete (writing was interrupted)",
    COMPLETE: "complete",
    RECOVERED: "already recovered",
    INCOMPLETE: "incomplete (the source ended early; what was read is on the device)",
    RECOVERED_INCOMPLETE: "incomplete, already recovered",
}
# The state after ``recover``: an incomplete dump stays one when it is copied again.
RECOVERED_STATE = {COMPLETE: RECOVERED, INCOMPLETE: RECOVERED_INCOMPLETE}
INCOMPLETE_STATES = (INCOMPLETE, RECOVERED_INCOMPLETE)
# A swap area that is not in use is the traditional dump device (the kdump tutorial's
# "non-used swap partition"; LKCD dumped to swap): written, with a warning. One in use is
# refused by check_device (/proc/swaps).
SWAP_AREA = "a swap area"
# What a dump would destroy, by the signatures blkid looks for: (offset, bytes, what). Swap
# ends its first page, whose size was the creating system's; LVM2 labels any of sectors 0-3.
SIGNATURES = (
    (1080, b"\x53\xef", "an ext2/ext3/ext4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (0, b"\xfc\x4e\x2b\xa9", "an md RAID member (superblock 1.1)"),
    (4096, b"\xfc\x4e\x2b\xa9", "an md RAID member (superblock 1.2)"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (82, b"FAT32   ", "a FAT32 (vfat) filesystem"),
    (54, b"FAT16   ", "a FAT16 (vfat) filesystem"),
    (54, b"FAT12   ", "a FAT12 (vfat) filesystem"),
    (32769, b"CD001", "an ISO 9660 filesystem"),
    (512, b"EFI PART", "a GPT partition table"),
    *(
        (page - 10, magic, SWAP_AREA)
        for page in (4096, 16384, 65536)
        for magic in (b"SWAPSPACE2", b"SWAP-SPACE")
    ),
    *((sector * 512, b"LABELONE", "an LVM2 physical volume") for sector in range(4)),
)
# Bytes read to look for them: the btrfs superblock is at 64 KiB.
SIGNATURE_SPAN = 128 << 10


@dataclass(frozen=True)
class DeviceHeader:
    state: int
    data_size: int
    crash_time: int
    written_at: int
    sha256: bytes
    release: str
    format: str
    level: int
    data_offset: int = DATA_OFFSET

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.state,
            self.data_offset,
            self.data_size,
            self.crash_time,
            self.written_at,
            self.sha256,
            _ascii(self.release)[:64],
            _ascii(self.format)[:30],
            self.level,
        ).ljust(DATA_OFFSET, b"\0")

    def summary(self) -> str:
        """The dump's crash time, kernel and size, for messages."""
        crash = "unknown"
        if self.crash_time:
            crash = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.crash_time))
        return f"crashed {crash}, kernel {self.release or 'unknown'}, {self.data_size} bytes"

    @classmethod
    def unpack(cls, raw: bytes, where: str, device_size: int) -> DeviceHeader | None:
        """The header in ``raw`` (the device's first block), or None if it holds no dump of ours.

        Every field is checked against its layout and the ``device_size`` in bytes; a bad
        field raises DumpDeviceError naming its offset, name and value.
        """
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            return None
        (_, version, state, off, size, crash, written, digest, release, fmt, level) = (
            HEADER.unpack_from(raw)
        )

        def bad(offset: int, name: str, value: object, why: str) -> DumpDeviceError:
            return DumpDeviceError(
                f"{where}: offset {offset:#x}: dump header field {name} = {value!r}: {why}"
            )

        if version != VERSION:
            raise bad(0x8, "version", version, f"not supported (expected {VERSION})")
        if state not in STATE_NAMES:
            raise bad(
                0xC,
                "state",
                state,
                "not 1 (writing), 2 (complete), 3 (recovered), 4 (incomplete) or 5 (incomplete, "
                "recovered)",
            )
        if off != DATA_OFFSET:
            raise bad(0x10, "data offset", off, f"the data always starts at {DATA_OFFSET}")
        room = max(device_size - DATA_OFFSET, 0)
        if size > room:
            raise bad(0x18, "data size", size, f"larger than the device's {room} data bytes")
        if size == 0 and state != WRITING:
            raise bad(0x18, "data size", size, "a written dump holds at least one byte")
        for offset, name, value in ((0x20, "crash time", crash), (0x28, "written at", written)):
            if not 0 <= value <= MAX_TIME:
                raise bad(offset, name, value, f"not a time between 0 and {MAX_TIME}")
        text_release = _text_field(release, 0x50, "kernel release", bad)
        text_fmt = _text_field(fmt, 0x91, "format", bad)
        if text_fmt not in DEVICE_FORMATS:
            raise bad(0x91, "format", text_fmt, f"not one of {', '.join(DEVICE_FORMATS)}")
        if not 0 <= level <= 31:
            raise bad(0xB0, "dump level", level, "dump levels are 0-31")
        return cls(state, size, crash, written, digest, text_release, text_fmt, level, off)


def _ascii(text: str) -> bytes:
    """``text`` as the header stores it: what ``_text_field`` accepts, others as ``_``.

    The kernel release comes from the crashed kernel's memory and may hold anything.
    """
    return bytes(b if 0x20 < b < 0x7F else 0x5F for b in text.encode("utf-8", "replace"))


def _text_field(raw: bytes, offset: int, name: str, bad) -> str:
    """A NUL-padded text field: printable ASCII without blanks, then only NULs."""
    value = raw.rstrip(b"\0")
    if len(value) == len(raw):
        raise bad(offset, name, raw, "not NUL-terminated")
    if any(not 0x20 < b < 0x7F for b in value):
        raise bad(offset, name, value, "not printable ASCII")
    return value.decode("ascii")


def _device_size(fd: int, where: str) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        raise DumpDeviceError(f"{where}: cannot tell its size: {e.strerror}") from e


def _pread(fd: int, size: int, offset: int, where: str) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as e:
        raise DumpDeviceError(f"{where}: read error at offset {offset:#x}: {e.strerror}") from e


def open_device(path: str, where: str, write: bool = False, exclusive: bool = False) -> int:
    """A descriptor of ``path``, a block device or a regular file (an image of one).

    Anything else is refused before it is opened, and again after (it may have been
    replaced in between): opening a FIFO or a terminal would wait forever, and O_NONBLOCK
    keeps the open itself from waiting. ``exclusive`` (always when writing) opens a block
    device with O_EXCL: the kernel refuses it (EBUSY) while a filesystem on it is mounted,
    in whatever mount namespace, or another program holds it exclusively.
    """

    def check(st: os.stat_result) -> None:
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise DumpDeviceError(
                f"{where}: {mode_kind(st.st_mode)}, not a block device or a device image"
            )

    try:
        st = os.stat(path)
    except OSError as e:
        raise DumpDeviceError(f"{where}: {e.strerror}") from None
    check(st)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    if (write or exclusive) and stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DumpDeviceError(
                f"{where}: the device is in use: the kernel refuses to open it exclusively "
                "(mounted, perhaps in another mount namespace, or held by another program); "
                "refusing to overwrite it"
            ) from None
        how = "writing" if write else "reading"
        raise DumpDeviceError(f"{where}: cannot open for {how}: {e.strerror}") from None
    try:
        check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def foreign_contents(start: bytes) -> str:
    """What ``start`` (a device's first bytes) holds that a dump would destroy, or "".

    A device holding our own header, or none of the signatures, may be written.
    """
    if start[:8] == MAGIC:
        return ""
    for offset, magic, what in SIGNATURES:
        if start[offset : offset + len(magic)] == magic:
            shown = magic.decode() if magic.isascii() and magic.isalnum() else magic.hex(" ")
            return f"{what} ({shown} at offset {offset})"
    if start[510:512] == b"\x55\xaa" and any(start[446 + 16 * i + 4] for i in range(4)):
        return "an MBR partition table (0x55AA at offset 510, partition entries at 446)"
    return ""


def _refuse_foreign(start: bytes, path: str) -> None:
    found = foreign_contents(start)
    if found.startswith(SWAP_AREA):
        log.warning(
            "KDUMP_DUMPDEV %s holds %s, not in use: the dump overwrites it; after recovering "
            "the dump, run mkswap %s to use it as swap again (and do not let the system turn "
            "it on before the dump is recovered)",
            path,
            found,
            path,
        )
        return
    if found:
        raise DumpDeviceError(
            f"KDUMP_DUMPDEV {path}: holds {found}; refusing to overwrite it. If it really is "
            f"meant as the dump device, erase its signatures first: wipefs -a {path}"
        )


def inspect_device(path: str) -> None:
    """What ``write_dump`` would refuse, found before a crash (``kdump-capture check``)."""
    check_device(path)
    where = f"KDUMP_DUMPDEV {path}"
    fd = open_device(path, where, exclusive=True)
    try:
        _refuse_foreign(_pread(fd, SIGNATURE_SPAN, 0, where), path)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SystemView:
    """Where ``check_device`` looks: the real /sys and /proc, or a fake tree in tests."""

    sys_block: str = "/sys/class/block"
    sys_btrfs: str = "/sys/fs/btrfs"
    mountinfo: str = "/proc/self/mountinfo"
    swaps: str = "/proc/swaps"


def check_device(path: str, view: SystemView | None = None) -> None:
    """Refuse a device whose contents are in use: writing the dump would destroy live data.

    Only a block device is accepted. It is refused when it or any of its partitions is
    mounted, is active swap, has holders (device-mapper/LVM, md RAID: sysfs ``holders``),
    or belongs to a mounted btrfs filesystem (which mountinfo names by one member only).
    Raises DumpDeviceError naming the device and the reason.
    """
    view = view or SystemView()
    try:
        st = os.stat(path)
    except OSError as e:
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a device"
        raise DumpDeviceError(
            f"KDUMP_DUMPDEV {path}: not a block device ({kind}); refusing to write a dump there"
        )
    for name, rdev in _device_and_partitions(view, st.st_rdev):
        why = _in_use(view, name, rdev)
        if why:
            shown = f"its partition {name}" if rdev != st.st_rdev else name
            raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: {shown} {why}; refusing to overwrite")


def _read_sys(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _parse_dev(text: str) -> int | None:
    major, sep, minor = text.partition(":")
    if not (sep and major.isdigit() and minor.isdigit()):
        return None
    return os.makedev(int(major), int(minor))


def _device_and_partitions(view: SystemView, rdev: int) -> list[tuple[str, int]]:
    """(sysfs name, device number) of the device and of each of its partitions."""
    try:
        names = sorted(os.listdir(view.sys_block))
    except OSError:
        names = []
    own = next(
        (n for n in names if _parse_dev(_read_sys(f"{view.sys_block}/{n}/dev")) == rdev), None
    )
    if own is None:  # no sysfs entry: judge the device number alone
        return [(f"{os.major(rdev)}:{os.minor(rdev)}", rdev)]
    found = [(own, rdev)]
    base = f"{view.sys_block}/{own}"
    try:
        subdirs = sorted(os.listdir(base))
    except OSError:
        subdirs = []
    for sub in subdirs:  # a whole disk lists its partitions as subdirectories
        if os.path.exists(f"{base}/{sub}/partition"):
            part = _parse_dev(_read_sys(f"{base}/{sub}/dev"))
            if part is not None:
                found.append((sub, part))
    return found


def _in_use(view: SystemView, name: str, rdev: int) -> str:
    """Why device ``name`` (number ``rdev``) is in use, or "" if it is not."""
    try:
        holders = sorted(os.listdir(f"{view.sys_block}/{name}/holders"))
    except OSError:
        holders = []
    if holders:
        shown = []
        for h in holders:
            dm_name = _read_sys(f"{view.sys_block}/{h}/dm/name")
            shown.append(f"{h} ({dm_name})" if dm_name else h)
        return f"is in use by {', '.join(shown)} (device-mapper/LVM or md RAID)"
    dev = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open(view.mountinfo) as f:
            for line in f:
                fields = line.split()
                source = line.partition(" - ")[2].split()[1:2]
                if len(fields) > 4 and (fields[2] == dev or _same_device(source, rdev)):
                    return f"is mounted on {_unescape(fields[4])}"
    except OSError:
        pass
    try:
        with open(view.swaps) as f:
            next(f, None)
            for line in f:
                if _same_device(line.split()[:1], rdev):
                    return "is an active swap area"
    except OSError:
        pass
    try:
        filesystems = sorted(os.listdir(view.sys_btrfs))
    except OSError:
        filesystems = []
    for fs in filesystems:
        if os.path.lexists(f"{view.sys_btrfs}/{fs}/devices/{name}"):
            return f"belongs to the mounted btrfs filesystem {fs}"
    return ""


def _same_device(names: list[str], rdev: int) -> bool:
    """Whether a path from mountinfo or /proc/swaps is the block device ``rdev``."""
    if not names or not names[0].startswith("/"):
        return False
    try:
        st = os.stat(_unescape(names[0]))
    except (OSError, ValueError):
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def _unescape(text: str) -> str:
    """Undo the octal escapes (\\040 for a blank) of /proc/self/mountinfo and /proc/swaps."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


class DeviceSink(Sink):
    """Writes the data area of a dump device (at DATA_OFFSET)."""

    seekable = True

    def __init__(self, fd: int, path: str, capacity: int) -> None:
        # The header holds a SHA-256 (32 bytes) whatever KDUMP_CHECKSUM says: recover checks
        # it once, and the copy it writes to KDUMP_SAVEDIR gets the configured checksum.
        super().__init__(os.path.basename(path), checksum.SHA256)
        self.fd, self.path, self.capacity = fd, path, capacity
        self._behind = WriteBehind(fd, DATA_OFFSET)  # a block device has a page cache too

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.capacity:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {self.path}: the dump does not fit on the device "
                f"({self.capacity} bytes for data)"
            )
        done, piece = 0, write_piece()
        try:
            while done < len(view):
                part = view[done : done + piece]
                done += os.pwrite(self.fd, part, DATA_OFFSET + self._pos + done)
        except OSError as e:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {self.path}: write error at offset "
                f"{DATA_OFFSET + self._pos + done:#x}: {e.strerror}"
            ) from e
        self._account(view)
        self._behind.wrote_to(DATA_OFFSET + self._pos)

    def seek(self, offset: int) -> None:
        self._pos = offset

    def _read_back(self):
        left, off = self.size, DATA_OFFSET
        while left:
            chunk = _pread(self.fd, min(CHUNK, left), off, f"KDUMP_DUMPDEV {self.path}")
            if not chunk:
                raise DumpDeviceError(f"KDUMP_DUMPDEV {self.path}: short read at {off:#x}")
            yield chunk
            left -= len(chunk)
            off += len(chunk)

    def commit(self) -> FileInfo:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DumpDeviceError(f"KDUMP_DUMPDEV {self.path}: flush failed: {e.strerror}") from e
        self.committed = True
        info = FileInfo(self.name, self.size, self._digest())
        self._behind.drop_all()
        return info

    def abort(self) -> None:
        pass


def write_dump(
    vm: Vmcore,
    path: str,
    fmt: str,
    level: int,
    progress: Progress | None = None,
    buffers: BufferPlan | None = None,
    overwrite: bool = False,
) -> DeviceHeader:
    """Write ``vm`` onto the dump device ``path``; returns the committed header.

    A complete dump on the device that was not recovered yet is kept unless ``overwrite``
    (KDUMP_DUMPDEV_OVERWRITE): nobody has seen that crash yet, and a failed save of this
    one must not cost it.
    """
    progress = progress or NoProgress()
    if fmt not in DEVICE_FORMATS:
        raise ConfigError(
            f"KDUMP_DUMPFORMAT={fmt} writes no vmcore, and a dump device holds only the vmcore; "
            "choose a dump format"
        )
    check_device(path)
    where = f"KDUMP_DUMPDEV {path}"
    fd = open_device(path, where, write=True)
    try:
        device_size = _device_size(fd, where)
        capacity = device_size - DATA_OFFSET
        start = _pread(fd, SIGNATURE_SPAN, 0, where)
        _refuse_foreign(start, path)
        if not overwrite:
            _keep_unrecovered(start, path, device_size)
        writer = make_writer(vm, fmt, level, seekable=True, buffers=buffers)
        # The crashed kernel's VMCOREINFO says when it crashed; the header keeps only what
        # recover will accept (an implausible time becomes "unknown").
        crash_time = vm.crash_time if 0 < (vm.crash_time or 0) <= MAX_TIME else 0
        # Refuse up front only what cannot fit (compressed pages are known only as they
        # stream); DeviceSink stops a dump that outgrows the device.
        needed = writer.lower_bound()
        if needed > capacity:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {path}: {capacity + DATA_OFFSET} bytes is too small for this "
                f"dump (at least {needed + DATA_OFFSET} bytes at level {level}); use a larger "
                "device or a dump level"
            )
        header = DeviceHeader(
            WRITING,
            0,
            crash_time,
            int(time.time()),
            bytes(32),
            vm.release or "",
            fmt,
            level,
        )
        _write_header(fd, path, header)
        sink = DeviceSink(fd, path, capacity)
        monitor = _ProgressOnly(progress)
        progress.start(f"vmcore -> {path}", writer.input_size())
        try:
            result = writer.write(sink, monitor)
            info = sink.commit()
        finally:
            progress.finish()
        header = replace(
            header,
            state=INCOMPLETE if result.incomplete else COMPLETE,
            data_size=info.size,
            sha256=bytes.fromhex(info.digest),
            level=result.dump_level,
        )
        if result.incomplete:
            # What was read is on the device with its size and SHA-256: recover saves it as
            # an incomplete dump, as a file target keeps it. Nothing read: still WRITING.
            if info.size:
                _write_header(fd, path, header)
            raise IncompleteDump(
                f"KDUMP_DUMPDEV {path}: the dump is INCOMPLETE: {result.incomplete}"
                + ("; `kdump-capture recover` saves what was read" if info.size else "")
            )
        _write_header(fd, path, header)
        log.info("dump written to %s: %d bytes, %s", path, info.size, result.format)
        return header
    finally:
        os.close(fd)


def _keep_unrecovered(start: bytes, path: str, device_size: int) -> None:
    """Refuse to write over a complete dump that ``recover`` has not copied yet."""
    try:
        old = DeviceHeader.unpack(start, path, device_size)
    except DumpDeviceError:
        return  # a damaged header: recover would refuse that dump anyway
    if old is None or old.state != COMPLETE:
        return
    raise DumpDeviceError(
        f"KDUMP_DUMPDEV {path} holds a complete dump that was not recovered yet "
        f"({old.summary()}); refusing to overwrite it. Copy it to KDUMP_SAVEDIR with "
        "`kdump-capture recover`, or set KDUMP_DUMPDEV_OVERWRITE=yes to let a new crash "
        "replace an unrecovered dump"
    )


class _ProgressOnly:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def advance(self, read: int, written: int) -> None:
        self.progress.update(read)


def _write_header(fd: int, path: str, header: DeviceHeader) -> None:
    try:
        os.pwrite(fd, header.pack(), 0)
        os.fsync(fd)
    except OSError as e:
        raise DumpDeviceError(
            f"KDUMP_DUMPDEV {path}: cannot write the header at offset 0x0: {e.strerror}"
        ) from e


def hold_device(path: str) -> int:
    """A descriptor of ``path`` holding an exclusive flock(2) on it while ``recover`` copies
    the dump: two at once (the boot-time unit and an admin) each copied it. The kernel
    drops the lock when the process ends. Close the descriptor to let go."""
    from .private import flock_wait

    fd = open_device(path, path)
    if flock_wait(fd, 0):
        return fd
    os.close(fd)
    raise DumpDeviceError(
        f"{path}: another 'kdump-capture recover' is copying this device's dump right "
        "now; nothing was done (run it again when that one has ended)"
    )


def read_header(path: str) -> DeviceHeader | None:
    """The dump header on ``path``, or None if the device holds no dump of ours."""
    fd = open_device(path, path)
    try:
        raw = _pread(fd, DATA_OFFSET, 0, path)
        size = _device_size(fd, path)
    finally:
        os.close(fd)
    return DeviceHeader.unpack(raw, path, size)


class CheckedDump(Vmcore):
    """A device dump whose copy is checked against the header's SHA-256 as it is read.

    The writer copies every byte through ``read_data``, in order and once (no mmap views):
    the check covers exactly the bytes that are saved, so data that reads back differently
    a second time (a failing disk, a device written meanwhile) cannot pass one read's check
    and be saved from another. The last read of a mismatch raises DumpDeviceError, before
    anything can call the dump complete.
    """

    def __init__(self, vm: Vmcore, header: DeviceHeader) -> None:
        # An incomplete dump is copied as a source one byte longer than its data: the copy
        # ends there, as its source did when it was written (read_data says why), and is
        # saved incomplete.
        short = header.state in INCOMPLETE_STATES
        super().__init__(
            vm.path,
            vm.kind,
            vm.fd,
            header.data_size + short,
            vm.ehdr,
            vm.phdrs,
            vm.notes_offset,
            vm.notes_blob,
            vm.notes,
            vm.vmcoreinfo,
            vm.vmcoreinfo_note,
            vm.base,
            vm.ram,
        )
        vm.fd = -1  # the descriptor is this object's now
        self.data_size = header.data_size
        self.short = short
        self.sha256 = header.sha256
        self.verified = False
        self._hash = hashlib.sha256()
        self._hashed = 0

    def view(self, offset: int, length: int) -> memoryview | None:
        return None  # every byte through read_data, where it is hashed

    def read_data(self, buf: bytearray | memoryview, offset: int) -> int:
        if self.short and offset >= self.data_size and self.verified:
            raise VmcoreError(
                f"{self.path}: the dump on the device is incomplete: its source ended after "
                f"{self.data_size} bytes when the capture kernel wrote it"
            )
        view = memoryview(buf).cast("B")
        view = view[: max(0, min(len(view), self.data_size - offset))]
        n = super().read_data(view, offset) if len(view) else 0
        if offset == 0:  # a copy starts (again, for the next target)
            self._hash, self._hashed, self.verified = hashlib.sha256(), 0, False
        if offset != self._hashed:
            raise DumpDeviceError(
                f"{self.path}: the dump data was read out of order (at {offset:#x} after "
                f"{self._hashed:#x}): its SHA-256 cannot be checked"
            )
        self._hash.update(view[:n])
        self._hashed += n
        if self._hashed == self.data_size:
            if self._hash.digest() != self.sha256:
                lost = f" ({self.unreadable_bytes} bytes could not be read)"
                raise DumpDeviceError(
                    f"{self.path}: the dump data (offsets {self.base:#x}-"
                    f"{self.base + self.data_size:#x}) does not match its recorded SHA-256"
                    f"{lost if self.unreadable_bytes else ''}; it is not saved as a dump"
                )
            self.verified = True
        return n


def open_device_dump(path: str, header: DeviceHeader) -> CheckedDump:
    """The device's data area as a dump source: parsed when ELF, else copied verbatim.

    "elf" and "raw" data is an ELF core unless the source was raw memory (/dev/oldmem),
    so the data's own first bytes decide. An incomplete dump is copied verbatim: its ELF
    program headers point past its end.
    """
    fd = open_device(path, path)
    try:
        elf = (
            header.format in ("elf", "raw")
            and header.state not in INCOMPLETE_STATES
            and _pread(fd, 4, header.data_offset, path) == b"\x7fELF"
        )
        if elf:
            try:
                vm = open_vmcore(path, base=header.data_offset, limit=header.data_size)
            except (VmcoreError, NoDumpError) as e:
                raise DumpDeviceError(f"{path}: the dump on the device is damaged: {e}") from e
        else:
            vm = Vmcore(
                path=path, kind="raw", fd=fd, size=header.data_size, base=header.data_offset
            )
            fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    return CheckedDump(vm, header)


def mark_recovered(path: str, header: DeviceHeader) -> None:
    """Record in the header that ``recover`` copied the dump (it skips it from then on)."""
    fd = open_device(path, path, write=True)
    try:
        state = RECOVERED_STATE.get(header.state, header.state)
        _write_header(fd, path, replace(header, state=state))
    finally:
        os.close(fd)


def describe(header: DeviceHeader) -> str:
    return FORMAT_NAMES.get(header.format, header.format)
