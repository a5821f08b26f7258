"""KDUMP_DUMPDEV: write the dump raw to a device, and recover it from there later.

When the root filesystem may be damaged, the capture kernel writes the dump straight onto
a dedicated partition (no filesystem involved) and does not reboot; the administrator
checks the system from the console and then runs ``kdump-capture recover``, which copies
the dump into KDUMP_SAVEDIR like any other dump.

Device layout: one 4 KiB header block, then the dump data (the configured format)::

    off  size  field
      0     8  magic "KDCAPDEV"
      8     4  version (1)
     12     4  state: 1 writing, 2 complete, 3 recovered
     16     8  data offset (4096)
     24     8  data size in bytes
     32     8  crash time (seconds since the epoch, 0 if unknown)
     40     8  time the dump was written
     48    32  SHA-256 of the data
     80    65  kernel release (NUL-padded)
    145    31  format key (e.g. "elf"), NUL-padded
    176     4  dump level
The header says "writing" until the data is complete and flushed, so an interrupted dump
is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass

from transports.base import FileInfo, Sink

from .errors import DumpDeviceError, VmcoreError
from .formats import CHUNK, FORMAT_NAMES, make_writer
from .memory import BufferPlan
from .progress import NoProgress, Progress
from .vmcore import Vmcore, open_vmcore

log = logging.getLogger(__name__)

MAGIC = b"KDCAPDEV"
VERSION = 1
HEADER = struct.Struct("<8sIIQQqq32s65s31sI")
assert HEADER.size == 180
DATA_OFFSET = 4096
WRITING, COMPLETE, RECOVERED = 1, 2, 3
STATE_NAMES = {
    WRITING: "incomplete (writing was interrupted)",
    COMPLETE: "complete",
    RECOVERED: "already recovered",
}


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
            self.release.encode()[:64],
            self.format.encode()[:30],
            self.level,
        ).ljust(DATA_OFFSET, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> DeviceHeader | None:
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            return None
        (_, version, state, off, size, crash, written, digest, release, fmt, level) = (
            HEADER.unpack_from(raw)
        )
        if version != VERSION:
            raise DumpDeviceError(
                f"{where}: offset 0x8: dump header version {version} "
                f"is not supported (expected {VERSION})"
            )
        if state not in STATE_NAMES:
            raise DumpDeviceError(f"{where}: offset 0xc: bad dump state {state}")
        return cls(
            state,
            size,
            crash,
            written,
            digest,
            release.rstrip(b"\0").decode(),
            fmt.rstrip(b"\0").decode(),
            level,
            off,
        )


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def check_device(path: str) -> None:
    """Refuse devices that are mounted or active swap: writing would destroy live data."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: {e.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: not a block device")
    if stat.S_ISBLK(st.st_mode):
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and fields[2] == dev:
                        raise DumpDeviceError(
                            f"KDUMP_DUMPDEV {path}: mounted on {fields[4]}; refusing to overwrite"
                        )
        except OSError:
            pass
    try:
        with open("/proc/swaps") as f:
            next(f, None)
            for line in f:
                name = line.split()[0]
                try:
                    if os.path.samefile(name, path) or (
                        stat.S_ISBLK(st.st_mode) and os.stat(name).st_rdev == st.st_rdev
                    ):
                        raise DumpDeviceError(
                            f"KDUMP_DUMPDEV {path}: an active swap area; refusing to overwrite"
                        )
                except OSError:
                    continue
    except OSError:
        pass


class DeviceSink(Sink):
    """Writes the data area of a dump device (at DATA_OFFSET)."""

    seekable = True

    def __init__(self, fd: int, path: str, capacity: int) -> None:
        super().__init__(os.path.basename(path))
        self.fd, self.path, self.capacity = fd, path, capacity

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.capacity:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {self.path}: the dump does not fit on the device "
                f"({self.capacity} bytes for data)"
            )
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], DATA_OFFSET + self._pos + done)
        except OSError as e:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {self.path}: write error at offset "
                f"{DATA_OFFSET + self._pos + done:#x}: {e.strerror}"
            ) from e
        self._account(view)

    def seek(self, offset: int) -> None:
        self._pos = offset

    def _read_back(self):
        left, off = self.size, DATA_OFFSET
        while left:
            chunk = os.pread(self.fd, min(CHUNK, left), off)
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
        return FileInfo(self.name, self.size, self._sha256())

    def abort(self) -> None:
        pass


def write_dump(
    vm: Vmcore,
    path: str,
    fmt: str,
    level: int,
    progress: Progress | None = None,
    buffers: BufferPlan | None = None,
) -> DeviceHeader:
    """Write ``vm`` onto the dump device ``path``; returns the committed header."""
    progress = progress or NoProgress()
    check_device(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: cannot open: {e.strerror}") from e
    try:
        capacity = _device_size(fd) - DATA_OFFSET
        writer = make_writer(vm, fmt, level, seekable=True, buffers=buffers)
        estimate = writer.estimate()
        if estimate is not None and estimate > capacity and level == 0:
            raise DumpDeviceError(
                f"KDUMP_DUMPDEV {path}: {capacity + DATA_OFFSET} bytes is too small for this "
                f"dump ({estimate} bytes at level 0); use a larger device or a dump level"
            )
        header = DeviceHeader(
            WRITING,
            0,
            vm.crash_time or 0,
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
        header = DeviceHeader(
            COMPLETE,
            info.size,
            vm.crash_time or 0,
            header.written_at,
            bytes.fromhex(info.sha256),
            vm.release or "",
            fmt,
            result.dump_level,
        )
        _write_header(fd, path, header)
        log.info("dump written to %s: %d bytes, %s", path, info.size, result.format)
        return header
    finally:
        os.close(fd)


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
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: cannot write the header: {e.strerror}") from e


def read_header(path: str) -> DeviceHeader | None:
    """The dump header on ``path``, or None if the device holds no dump of ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(DATA_OFFSET)
    except OSError as e:
        raise DumpDeviceError(f"KDUMP_DUMPDEV {path}: cannot read: {e.strerror}") from e
    return DeviceHeader.unpack(raw, path)


def check_data(path: str, header: DeviceHeader) -> None:
    """Re-read the data area and compare it with the SHA-256 recorded in the header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        left = header.data_size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise DumpDeviceError(f"{path}: the device ends inside the dump data")
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != header.sha256:
        raise DumpDeviceError(f"{path}: the dump data does not match its recorded SHA-256")


def open_device_dump(path: str, header: DeviceHeader) -> Vmcore:
    """The device's data area as a dump source: parsed when ELF, else copied verbatim."""
    if header.format in ("elf", "raw"):
        try:
            return open_vmcore(path, base=header.data_offset, limit=header.data_size)
        except VmcoreError as e:
            raise DumpDeviceError(f"{path}: the dump on the device is damaged: {e}") from e
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return Vmcore(path=path, kind="raw", fd=fd, size=header.data_size, base=header.data_offset)


def mark_recovered(path: str, header: DeviceHeader) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        done = DeviceHeader(
            RECOVERED,
            header.data_size,
            header.crash_time,
            header.written_at,
            header.sha256,
            header.release,
            header.format,
            header.level,
            header.data_offset,
        )
        _write_header(fd, path, done)
    finally:
        os.close(fd)


def describe(header: DeviceHeader) -> str:
    return FORMAT_NAMES.get(header.format, header.format)
