"""The crash dump source: /proc/vmcore (ELF64 core) or /dev/oldmem (raw physical memory)."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time

from .bounds import MAX_NOTES, MAX_OFFSET, MAX_VMCOREINFO, check_span, read_span
from .elf import (
    EHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    ET_CORE,
    MAX_XNUM_PHNUM,
    NT_PRSTATUS,
    PHDR,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SH_INFO_OFFSET,
    SHDR,
    VMCOREINFO_NOTE_NAME,
    Ehdr,
    Note,
    Phdr,
    iter_notes,
)
from .errors import NoDumpError, VmcoreError

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ("/proc/vmcore", "/dev/oldmem")
# Views of the source are read-only mmap windows of 2 MiB, starting and ending at 2 MiB
# file offsets. /proc/vmcore sets up the page tables of a whole window at mmap() time; a
# regular file (a saved vmcore, the bench's samples) keeps its page cache in large folios,
# and a window aligned to 2 MiB maps them with one PMD each instead of 512 PTEs: on the
# 8 GiB sample the zero-page scan and its page faults took 0.29 s instead of 0.87 s
# (makedumpfile maps 4 MiB windows, MAP_REGION, and got this all along). Mapped pages count
# in our resident memory until the window moves on: 4 MiB windows measured up to +8 MiB of
# peak RSS between a 1 GiB and an 8 GiB machine, 1 MiB ones +2 MiB.
MAP_WINDOW = 2 << 20
# A view wider than this is not mapped (the caller reads instead): pages spread thinly
# over a large stretch of the file would map much for little.
MAP_SPAN = 16 << 20
MAX_PHNUM = 65535
# x86_64's MAX_PHYSMEM_BITS with 5-level paging (and arm64's largest): no PT_LOAD of a real
# vmcore reaches past it, and the sum of a corrupt p_paddr and p_memsz may wrap past 2^64.
MAX_PHYS_ADDR = 1 << 52
PAGE = 4096
IOMEM = "/proc/iomem"

# CRASHTIME comes from the crashed kernel's clock: only a plausible value names a dump.
# Nothing this engine reads (Linux 5.10+) crashed before 2000-01-01. A crash cannot lie in
# the future either, but the capture kernel's own clock may be unset (1970) or off, so the
# limit is ten years past the later of that clock and 2025-01-01 (before this code existed).
EARLIEST_CRASH = 946684800  # 2000-01-01 00:00:00 UTC
CODE_EPOCH = 1735689600  # 2025-01-01 00:00:00 UTC
FUTURE_SLACK = 10 * 365 * 86400
EHWPOISON = 133  # Linux: memory page has hardware error (not in Python's errno module)

# Read errors that mean "this part of the source cannot be read" (/proc/vmcore returns EIO
# or EFAULT for pages the first kernel could not hand over; /dev/oldmem EFAULT or EINVAL):
# such pages are retried once, then saved as zeros and recorded. Any other error stops.
SALVAGE_ERRNOS = frozenset({errno.EIO, errno.EFAULT, errno.EINVAL, errno.ENXIO, EHWPOISON})
# Unreadable ranges kept for the manifest; beyond this only the byte count grows.
MAX_RECORDED_RANGES = 256


def check_crash_time(raw: str | None, now: float) -> tuple[int | None, str | None]:
    """``(seconds, None)`` for a plausible CRASHTIME, else ``(None, why)`` (None when absent).

    Plausible: a decimal integer from 2000-01-01 to ten years after the later of ``now``
    and 2025-01-01 (see EARLIEST_CRASH).
    """
    if raw is None:
        return None, None
    shown = repr(raw[:32]) + ("..." if len(raw) > 32 else "")
    if not (0 < len(raw) <= 20 and raw.isascii() and raw.isdigit()):
        return None, f"CRASHTIME={shown} in VMCOREINFO is not a decimal number of seconds"
    value = int(raw)
    latest = int(max(now, CODE_EPOCH)) + FUTURE_SLACK
    if not EARLIEST_CRASH <= value <= latest:
        return None, (
            f"CRASHTIME={shown} in VMCOREINFO is not a plausible time "
            f"(outside {time.strftime('%Y-%m-%d', time.gmtime(EARLIEST_CRASH))} .. "
            f"{time.strftime('%Y-%m-%d', time.gmtime(latest))})"
        )
    return value, None


def system_ram(iomem: str = IOMEM) -> list[tuple[int, int]]:
    """The ``System RAM`` ranges of ``iomem`` as sorted ``[start, end)`` pairs.

    Empty when the file cannot be read or shows only zeros (read by a user other than root).
    """
    ranges: list[tuple[int, int]] = []
    try:
        with open(iomem, encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return []
    for line in lines:
        span, sep, name = line.partition(" : ")
        if not sep or name.strip() != "System RAM":
            continue
        lo, dash, hi = span.strip().partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16) + 1
        except ValueError:
            continue
        if dash and end > start and end > 1:
            ranges.append((start, end))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def parse_vmcoreinfo(text: str) -> dict[str, str]:
    """VMCOREINFO text (``KEY=value`` lines) as a dict; malformed lines are skipped."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            info[key.strip()] = value.strip()
    return info


def vmcoreinfo_text(desc: bytes | memoryview, path: str) -> str:
    """A VMCOREINFO note's text, at most MAX_VMCOREINFO bytes of it (the kernel's is one
    page; a larger note is the crashed kernel's memory at its worst, and is cut)."""
    if len(desc) > MAX_VMCOREINFO:
        log.warning(
            "%s: the VMCOREINFO note holds %d bytes; only the first %d are read",
            path,
            len(desc),
            MAX_VMCOREINFO,
        )
    return bytes(desc[:MAX_VMCOREINFO]).decode("ascii", "replace")


class Vmcore:
    """An open crash dump source; close when done.

    ``readinto``/``pread`` read strictly (any error is a VmcoreError); writers copy the dump
    with ``read_data``, which saves what can be read: a page that fails twice is zero-filled
    and recorded in ``unreadable``.
    """

    def __init__(
        self,
        path: str,
        kind: str,  # "elf" or "raw"
        fd: int,
        size: int | None,  # bytes to copy (the expected size of the source)
        ehdr: Ehdr | None = None,
        phdrs: list[Phdr] | None = None,
        notes_offset: int = 0,
        notes_blob: bytes | memoryview = b"",
        notes: list[Note] | None = None,
        vmcoreinfo: dict[str, str] | None = None,
        vmcoreinfo_note: Note | None = None,
        base: int = 0,  # where the vmcore starts inside ``path`` (a dump device's data area)
        ram: list[tuple[int, int]] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.fd = fd
        self.size = size
        self.ehdr = ehdr
        self.phdrs = [] if phdrs is None else phdrs
        self.notes_offset = notes_offset
        self.notes_blob = notes_blob
        self.notes = [] if notes is None else notes
        self.vmcoreinfo = {} if vmcoreinfo is None else vmcoreinfo
        self.vmcoreinfo_note = vmcoreinfo_note
        self.base = base
        self._map_view: memoryview | None = None
        self._map_start = 0
        self._map_end = 0
        self._mappable: bool | None = None
        # readable ranges of a raw memory source (System RAM); None: all of it
        self.ram = ram
        # source ranges ``[start, end)`` that could not be read and were saved as zeros
        self.unreadable: list[tuple[int, int]] = []
        self.unreadable_bytes = 0

    def __repr__(self) -> str:
        return f"Vmcore(path={self.path!r}, kind={self.kind!r}, fd={self.fd}, size={self.size})"

    # -- derived facts -----------------------------------------------------------------
    @property
    def loads(self) -> list[Phdr]:
        return [p for p in self.phdrs if p.type == PT_LOAD]

    @property
    def nr_cpus(self) -> int:
        return sum(1 for n in self.notes if n.type == NT_PRSTATUS and n.name == b"CORE")

    @property
    def page_size(self) -> int:
        try:
            return int(self.vmcoreinfo.get("PAGESIZE", "4096"))
        except ValueError:
            return 4096

    @property
    def crash_time(self) -> int | None:
        """CRASHTIME from VMCOREINFO when it is plausible (``check_crash_time``), else None."""
        return check_crash_time(self.vmcoreinfo.get("CRASHTIME"), time.time())[0]

    @property
    def crash_time_problem(self) -> str | None:
        """Why CRASHTIME was not used, when VMCOREINFO has one; else None."""
        return check_crash_time(self.vmcoreinfo.get("CRASHTIME"), time.time())[1]

    @property
    def release(self) -> str | None:
        return self.vmcoreinfo.get("OSRELEASE") or None

    @property
    def header_size(self) -> int:
        """Bytes before the first PT_LOAD data: ELF header, phdrs, padding, notes."""
        starts = [p.offset for p in self.loads if p.filesz]
        return min(starts) if starts else (self.size or 0)

    # -- reading -----------------------------------------------------------------------
    def _pread_into(self, view: memoryview, offset: int) -> int:
        """One positioned read at ``offset`` of the source: the only place that reads it."""
        return os.preadv(self.fd, [view], self.base + offset)

    def _fill(self, view: memoryview, offset: int) -> int:
        """Read until ``view`` is full or the source ends; OSError passes through."""
        done = 0
        while done < len(view):
            n = self._pread_into(view[done:], offset + done)
            if n == 0:
                break
            done += n
        return done

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns bytes read (short only at the end)."""
        view = memoryview(buf).cast("B")
        try:
            return self._fill(view, offset)
        except OSError as e:
            raise VmcoreError(f"{self.path}: read error at offset {offset:#x}: {e.strerror}") from e

    def read_data(self, buf: bytearray | memoryview, offset: int) -> int:
        """Like ``readinto``, for copying the dump: what cannot be read is saved as zeros.

        A read error (SALVAGE_ERRNOS) is retried once page by page; pages that fail again are
        zero-filled and recorded in ``unreadable``. Bytes of a raw source outside its System
        RAM are zeros without being read. Returns bytes filled, short only where the source
        ends; other errors raise VmcoreError.
        """
        view = memoryview(buf).cast("B")
        if self.ram is None:
            return self._salvage(view, offset)
        end = offset + len(view)
        if self.size is not None:
            end = min(end, self.size)
        pos = offset
        for r_start, r_end in self.ram:
            if r_end <= pos:
                continue
            if r_start >= end:
                break
            if r_start > pos:
                view[pos - offset : r_start - offset] = bytes(r_start - pos)
                pos = r_start
            stop = min(end, r_end)
            n = self._salvage(view[pos - offset : stop - offset], pos)
            pos += n
            if pos < stop:
                return pos - offset  # the source ended early
        if pos < end:
            view[pos - offset : end - offset] = bytes(end - pos)
            pos = end
        return pos - offset

    def _salvage(self, view: memoryview, offset: int) -> int:
        try:
            return self._fill(view, offset)
        except OSError as e:
            if e.errno not in SALVAGE_ERRNOS:
                raise VmcoreError(
                    f"{self.path}: read error at offset {offset:#x}: {e.strerror}"
                ) from e
            log.debug("%s: %s reading %#x+%#x; retrying by page", self.path, e, offset, len(view))
        done = 0
        while done < len(view):
            pos = offset + done
            piece = view[done : done + PAGE - pos % PAGE]
            try:
                n = self._fill(piece, pos)
            except OSError as e:
                if e.errno not in SALVAGE_ERRNOS:
                    raise VmcoreError(
                        f"{self.path}: read error at offset {pos:#x}: {e.strerror}"
                    ) from e
                piece[:] = bytes(len(piece))
                self._record_unreadable(pos, len(piece), e)
                n = len(piece)
            done += n
            if n < len(piece):
                break  # the source ended
        return done

    def _record_unreadable(self, offset: int, size: int, err: OSError) -> None:
        end = offset + size
        if any(a <= offset and end <= b for a, b in self.unreadable):
            return  # read again by a later pass (a filter scan, then the copy)
        if self.unreadable_bytes == 0:
            log.warning(
                "%s: offset %#x: %s; unreadable pages are saved as zeros and listed in the "
                "manifest",
                self.path,
                offset,
                err.strerror,
            )
        self.unreadable_bytes += size
        if self.unreadable and self.unreadable[-1][1] == offset:
            self.unreadable[-1] = (self.unreadable[-1][0], end)
        elif len(self.unreadable) < MAX_RECORDED_RANGES:
            self.unreadable.append((offset, end))

    def reset_unreadable(self) -> None:
        """Forget recorded unreadable ranges (before copying the source again)."""
        self.unreadable = []
        self.unreadable_bytes = 0

    def paddr_of(self, offset: int) -> int | None:
        """The physical address held at source ``offset`` (raw memory: the offset itself)."""
        if self.kind == "raw":
            return offset
        for p in self.loads:
            if p.offset <= offset < p.offset + p.filesz:
                return p.paddr + (offset - p.offset)
        return None

    def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short at the end of the source)."""
        if self.size is not None:
            size = max(0, min(size, self.size - offset))
        buf = bytearray(size)
        n = self.readinto(buf, offset)
        return bytes(buf[:n])

    def view(self, offset: int, length: int) -> memoryview | None:
        """Bytes ``offset..offset+length`` without copying them, or None: read them instead.

        read(2) copies every byte (and /proc/vmcore maps the old kernel's memory page by
        page to do it); a read-only mapping lets compressors, the zero-page check, the
        checksum and write(2) take the pages where they are, as makedumpfile does. Only
        regular files (/proc/vmcore is one) are mapped; /dev/oldmem and block devices are
        read. A view stays valid while it is referenced, also after the window moved on.
        An I/O error under a mapping is SIGBUS, not an exception: sources on failing disks
        should be read (``KDUMP_CAPTURE_NO_MMAP=1``).
        """
        if length <= 0 or length > MAP_SPAN or self.kind != "elf":
            return None
        if type(self)._pread_into is not Vmcore._pread_into:
            return None  # a source with a read primitive of its own is read through it
        pos = self.base + offset
        if not (self._map_start <= pos and pos + length <= self._map_end):
            if self._mappable is None:
                self._mappable = _mappable(self.fd)
            if not self._mappable:
                return None
            start = pos - pos % MAP_WINDOW
            try:
                size = os.fstat(self.fd).st_size  # never map past the end: that is SIGBUS
            except OSError:
                size = 0
            # whole 2 MiB blocks: a batch crossing the window's end maps its block and
            # the next, and the batches after it stay inside
            want = max(pos + length, start + MAP_WINDOW)
            end = min(want + (-want % MAP_WINDOW), size)
            if pos + length > end:
                return None
            try:
                mm = mmap.mmap(self.fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
            except (OSError, ValueError) as e:
                log.debug("%s: mmap failed (%s); reading instead", self.path, e)
                self._mappable = False
                self._map_view = None
                return None
            # The old window is unmapped when its last view is gone.
            self._map_view = memoryview(mm)
            self._map_start, self._map_end = start, end
        assert self._map_view is not None
        return self._map_view[pos - self._map_start : pos - self._map_start + length]

    def close(self) -> None:
        self._map_view = None
        self._map_start = self._map_end = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vmcore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _xnum_phnum(path: str, fd: int, base: int, ehdr: Ehdr) -> int:
    """The program header count of an extended-numbered file: section 0's sh_info."""
    if ehdr.shentsize < SHDR.size:
        raise VmcoreError(
            f"{path}: offset 0x3a: e_phnum is PN_XNUM but e_shentsize {ehdr.shentsize} is "
            f"less than {SHDR.size}"
        )
    if base + ehdr.shoff + SHDR.size > MAX_OFFSET:
        raise VmcoreError(f"{path}: offset 0x28: e_shoff {ehdr.shoff:#x} is out of range")
    raw = os.pread(fd, SHDR.size, base + ehdr.shoff)
    if len(raw) < SHDR.size:
        raise VmcoreError(
            f"{path}: offset {ehdr.shoff + len(raw):#x}: file ends inside section 0 "
            "(e_phnum is PN_XNUM: the program header count is its sh_info)"
        )
    phnum = SHDR.unpack(raw)[7]
    if not 0 < phnum <= MAX_XNUM_PHNUM:
        raise VmcoreError(
            f"{path}: offset {ehdr.shoff + SH_INFO_OFFSET:#x}: section 0 gives {phnum} "
            f"program headers (extended numbering); at most {MAX_XNUM_PHNUM} are read"
        )
    return phnum


def _mapped_notes(path: str, fd: int, pos: int, size: int) -> memoryview | None:
    """The note segment at ``pos`` mapped read-only, or None: read it instead.

    /proc/vmcore keeps the crashed kernel's notes in the capture kernel's own memory
    (vmalloc) and maps those very pages, so a mapping costs no memory and a read holds the
    notes twice. A device dump (NT_VMCOREDD: an adapter's firmware state) can make them tens
    of MiB (MAX_NOTES) in a capture kernel with tens of MiB free. The same rules as ``view``:
    regular files only, not with KDUMP_CAPTURE_NO_MMAP, never past the end of the file.
    """
    if size <= 0 or not _mappable(fd):
        return None
    start = pos - pos % mmap.ALLOCATIONGRANULARITY
    try:
        if pos + size > os.fstat(fd).st_size:
            return None  # read_span names where the file ends
        mm = mmap.mmap(fd, pos + size - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
    except (OSError, ValueError) as e:
        log.debug("%s: mmap of the notes failed (%s); reading them", path, e)
        return None
    return memoryview(mm)[pos - start : pos - start + size]


def _mappable(fd: int) -> bool:
    if os.environ.get("KDUMP_CAPTURE_NO_MMAP", "") not in ("", "0"):
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def find_source(explicit: str | None) -> str:
    """The vmcore path: the given one, else /proc/vmcore, else /dev/oldmem."""
    if explicit:
        if not os.path.exists(explicit):
            raise NoDumpError(f"{explicit}: no such file")
        return explicit
    for candidate in DEFAULT_SOURCES:
        if os.path.exists(candidate):
            return candidate
    raise NoDumpError(
        "no crash dump present: neither /proc/vmcore nor /dev/oldmem exists "
        "(this kernel did not boot from a crash)"
    )


def open_vmcore(
    path: str,
    base: int = 0,
    limit: int | None = None,
    iomem: str = IOMEM,
    map_notes: bool = False,
) -> Vmcore:
    """Open and validate a crash dump source; errors name the file and offset.

    ``base`` and ``limit`` select a region of ``path`` (the data area of a dump device).
    A source that is not ELF is raw physical memory (/dev/oldmem); how much of it there is
    comes from the System RAM ranges of ``iomem``. ``map_notes``: the source being saved
    (/proc/vmcore) has its notes mapped, not read (``_mapped_notes``); a dump read back
    from a target is read, where another host could truncate it under a mapping (SIGBUS).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NoDumpError(f"{path}: cannot open: {e.strerror}") from e
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # open(2) lets O_RDONLY through; read fails
            raise NoDumpError(f"{path}: cannot open: {os.strerror(errno.EISDIR)}")
        return _parse(path, fd, base, limit, iomem, map_notes)
    except BaseException:
        os.close(fd)
        raise


def _parse(
    path: str,
    fd: int,
    base: int = 0,
    limit: int | None = None,
    iomem: str = IOMEM,
    map_notes: bool = False,
) -> Vmcore:
    st = os.fstat(fd)
    head = os.pread(fd, EHDR.size, base)
    if head[:4] != ELFMAG:
        if stat.S_ISCHR(st.st_mode) or path.endswith("oldmem"):
            return _raw(path, fd, st, iomem)
        if not head:
            raise VmcoreError(f"{path}: empty file (zero-size vmcore)")
        raise VmcoreError(f"{path}: offset 0x0: not an ELF core file (bad magic {head[:4]!r})")
    if len(head) < EHDR.size:
        raise VmcoreError(f"{path}: offset {len(head):#x}: file ends inside the ELF header")
    ehdr = Ehdr.unpack_from(head)
    if ehdr.ident[4] != ELFCLASS64:
        raise VmcoreError(f"{path}: offset 0x4: not ELF64 (class {ehdr.ident[4]})")
    if ehdr.ident[5] != ELFDATA2LSB:
        raise VmcoreError(f"{path}: offset 0x5: not little-endian (data {ehdr.ident[5]})")
    if ehdr.type != ET_CORE:
        raise VmcoreError(f"{path}: offset 0x10: ELF type {ehdr.type} is not ET_CORE (4)")
    if ehdr.phentsize != PHDR.size:
        raise VmcoreError(f"{path}: offset 0x36: e_phentsize {ehdr.phentsize} is not 56")
    phnum = ehdr.phnum
    if phnum == PN_XNUM and ehdr.shoff:
        phnum = _xnum_phnum(path, fd, base, ehdr)
    if not 0 < ehdr.phnum <= MAX_PHNUM:  # an extended count was checked by _xnum_phnum
        raise VmcoreError(f"{path}: offset 0x38: e_phnum {ehdr.phnum} is out of range")

    file_size = st.st_size if stat.S_ISREG(st.st_mode) else None
    if stat.S_ISBLK(st.st_mode):
        file_size = _blockdev_size(fd)
    if file_size is not None:
        file_size -= base
    if limit is not None:
        file_size = limit if file_size is None else min(file_size, limit)
    table = PHDR.size * phnum
    if base + ehdr.phoff + table > MAX_OFFSET:
        raise VmcoreError(f"{path}: offset 0x20: e_phoff {ehdr.phoff:#x} is out of range")
    ph_bytes = os.pread(fd, table, base + ehdr.phoff)
    if len(ph_bytes) < table:
        raise VmcoreError(
            f"{path}: offset {ehdr.phoff + len(ph_bytes):#x}: file ends inside the program "
            f"headers ({phnum} expected at {ehdr.phoff:#x})"
        )
    phdrs = [Phdr.unpack_from(ph_bytes, i * PHDR.size) for i in range(phnum)]
    end = ehdr.phoff + len(ph_bytes)
    for i, p in enumerate(phdrs):
        if p.type not in (PT_LOAD, PT_NOTE):
            continue
        seg_end = p.offset + p.filesz
        where = ehdr.phoff + i * PHDR.size
        if p.type == PT_LOAD and p.filesz > p.memsz:
            raise VmcoreError(
                f"{path}: offset {where:#x}: PT_LOAD #{i} has p_filesz {p.filesz:#x} "
                f"> p_memsz {p.memsz:#x}"
            )
        if p.type == PT_LOAD and p.paddr + p.memsz > MAX_PHYS_ADDR:
            raise VmcoreError(
                f"{path}: offset {where:#x}: PT_LOAD #{i} claims physical memory "
                f"{p.paddr:#x}-{p.paddr + p.memsz:#x}, beyond the 52-bit physical address "
                "space of any machine this tool reads"
            )
        if base + seg_end > MAX_OFFSET:
            raise VmcoreError(
                f"{path}: offset {where:#x}: program header #{i} points to "
                f"{p.offset:#x}-{seg_end:#x}, beyond any file"
            )
        if file_size is not None and seg_end > file_size:
            raise VmcoreError(
                f"{path}: offset {where:#x}: program header #{i} "
                f"({'PT_LOAD' if p.type == PT_LOAD else 'PT_NOTE'}) points to "
                f"{p.offset:#x}-{seg_end:#x}, past the end of the file ({file_size:#x}); "
                "the vmcore is truncated"
            )
        end = max(end, seg_end)

    vm = Vmcore(
        path=path,
        kind="elf",
        fd=fd,
        size=file_size if file_size else end,
        ehdr=ehdr,
        phdrs=phdrs,
        base=base,
    )
    if file_size is not None and file_size > end:
        vm.size = file_size  # keep trailing bytes: level 0 must stay byte-identical
    notes = [(i, p) for i, p in enumerate(phdrs) if p.type == PT_NOTE]
    if notes:
        # /proc/vmcore merges all notes into one PT_NOTE; tolerate several (raw elfcorehdr),
        # but all of them together must stay a plausible size before any is read.
        total = sum(p.filesz for _, p in notes)
        check_span(
            path,
            f"the note segments ({len(notes)} PT_NOTE)",
            0,
            total,
            None,
            MAX_NOTES,
            where=ehdr.phoff + notes[0][0] * PHDR.size,
        )

        def pread(size: int, offset: int) -> bytes:
            return os.pread(fd, size, base + offset)

        index, first = notes[0]
        blob: bytes | memoryview | None = None
        if map_notes and len(notes) == 1:
            where = ehdr.phoff + index * PHDR.size
            check_span(
                path, f"PT_NOTE #{index}", first.offset, first.filesz, file_size, where=where
            )
            blob = _mapped_notes(path, fd, base + first.offset, first.filesz)
        if blob is None:
            blob = b"".join(
                read_span(
                    pread,
                    path,
                    f"PT_NOTE #{i}",
                    p.offset,
                    p.filesz,
                    file_size,
                    where=ehdr.phoff + i * PHDR.size,
                )
                for i, p in notes
            )
        vm.notes_offset = first.offset
        vm.notes_blob = blob
        try:
            vm.notes = iter_notes(blob)
        except ValueError as e:
            raise VmcoreError(f"{path}: PT_NOTE at {first.offset:#x}: {e}") from None
        for n in vm.notes:
            if n.name == VMCOREINFO_NOTE_NAME:
                vm.vmcoreinfo_note = n
                vm.vmcoreinfo = parse_vmcoreinfo(vmcoreinfo_text(n.desc, path))
    if not any(p.type == PT_LOAD for p in phdrs):
        if not any(ph_bytes):
            # makedumpfile -E writes its program headers last: a run stopped before the end
            # (killed; Red Hat's vmcore-incomplete) leaves them all zero
            raise VmcoreError(
                f"{path}: offset {ehdr.phoff:#x}: the {phnum} program headers are all zero, "
                "not written yet: an ELF dump whose writer stopped before the end (makedumpfile "
                "-E writes them last); the dump is incomplete"
            )
        # /proc/vmcore has a PT_LOAD for each System RAM range: without one the ELF header
        # was corrupt, and a "complete" dump of it would hold no memory (makedumpfile
        # refuses it too)
        raise VmcoreError(
            f"{path}: offset 0x38: none of the {phnum} program headers is a PT_LOAD: "
            "the vmcore holds no memory"
        )
    if not vm.vmcoreinfo:
        log.warning("%s: no VMCOREINFO note; crash time and kernel release unknown", path)
    return vm


def _raw(path: str, fd: int, st: os.stat_result, iomem: str) -> Vmcore:
    """Raw physical memory: its expected size is known, or it is not copied at all.

    A regular file or a block device has its own size. A character device (/dev/oldmem)
    has no size: the copy covers physical addresses up to the end of the System RAM that
    ``iomem`` lists, and only those ranges are read (the holes between them are zeros).
    """
    ram = None
    if stat.S_ISREG(st.st_mode):
        size = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        size = _blockdev_size(fd)
    else:
        ram = system_ram(iomem)
        if not ram:
            raise VmcoreError(
                f"{path}: raw memory, but {iomem} lists no System RAM (unreadable, or not "
                "read as root): cannot tell how much memory there is to save"
            )
        size = ram[-1][1]
    if size == 0:
        raise VmcoreError(f"{path}: empty file (zero-size vmcore)")
    log.info(
        "%s is not ELF: treating it as raw physical memory (/dev/oldmem), %d bytes", path, size
    )
    return Vmcore(path=path, kind="raw", fd=fd, size=size, ram=ram)


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
