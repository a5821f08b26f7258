"""The crash dump source: /proc/vmcore (ELF64 core) or /dev/oldmem (raw physical memory)."""

from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass, field

from .elf import (
    EHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    ET_CORE,
    NT_PRSTATUS,
    PHDR,
    PT_LOAD,
    PT_NOTE,
    VMCOREINFO_NOTE_NAME,
    Ehdr,
    Note,
    Phdr,
    iter_notes,
)
from .errors import NoDumpError, VmcoreError

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ("/proc/vmcore", "/dev/oldmem")
# Views of the source are read-only mmap windows of 4 MiB (makedumpfile's MAP_REGION):
# /proc/vmcore sets up the page tables of a whole window at mmap() time, and the mapped
# pages count in our resident memory until the window moves on.
MAP_WINDOW = 4 << 20
# A view wider than this is not mapped (the caller reads instead): pages spread thinly
# over a large stretch of the file would map much for little.
MAP_SPAN = 16 << 20
# A note segment larger than this is not a vmcore (real ones are a few KiB per CPU).
MAX_NOTES = 64 << 20
MAX_PHNUM = 65535


def parse_vmcoreinfo(text: str) -> dict[str, str]:
    """VMCOREINFO text (``KEY=value`` lines) as a dict; malformed lines are skipped."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            info[key.strip()] = value.strip()
    return info


@dataclass
class Vmcore:
    """An open crash dump source. Read with ``readinto``/``pread``; close when done."""

    path: str
    kind: str  # "elf" or "raw"
    fd: int
    size: int | None  # bytes to copy; None for a raw device read until EOF
    ehdr: Ehdr | None = None
    phdrs: list[Phdr] = field(default_factory=list)
    notes_offset: int = 0
    notes_blob: bytes = b""
    notes: list[Note] = field(default_factory=list)
    vmcoreinfo: dict[str, str] = field(default_factory=dict)
    vmcoreinfo_note: Note | None = None
    base: int = 0  # where the vmcore starts inside ``path`` (a dump device's data area)
    _map_view: memoryview | None = field(default=None, repr=False)
    _map_start: int = field(default=0, repr=False)
    _map_end: int = field(default=0, repr=False)
    _mappable: bool | None = field(default=None, repr=False)

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
        try:
            return int(self.vmcoreinfo["CRASHTIME"])
        except (KeyError, ValueError):
            return None

    @property
    def release(self) -> str | None:
        return self.vmcoreinfo.get("OSRELEASE") or None

    @property
    def header_size(self) -> int:
        """Bytes before the first PT_LOAD data: ELF header, phdrs, padding, notes."""
        starts = [p.offset for p in self.loads if p.filesz]
        return min(starts) if starts else (self.size or 0)

    # -- reading -----------------------------------------------------------------------
    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns bytes read (short only at the end)."""
        view = memoryview(buf)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], self.base + offset + done)
            except OSError as e:
                if self.kind == "raw" and done == 0 and e.errno in (14, 22, 5):
                    return 0  # /dev/oldmem ends with EFAULT/EINVAL past the last page
                raise VmcoreError(
                    f"{self.path}: read error at offset {offset + done:#x}: {e.strerror}"
                ) from e
            if n == 0:
                break
            done += n
        return done

    def pread(self, size: int, offset: int) -> bytes:
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
        pos = self.base + offset
        if not (self._map_start <= pos and pos + length <= self._map_end):
            if self._mappable is None:
                self._mappable = _mappable(self.fd)
            if not self._mappable:
                return None
            start = pos - pos % mmap.ALLOCATIONGRANULARITY
            try:
                size = os.fstat(self.fd).st_size  # never map past the end: that is SIGBUS
            except OSError:
                size = 0
            end = min(max(pos + length, start + MAP_WINDOW), size)
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


def open_vmcore(path: str, base: int = 0, limit: int | None = None) -> Vmcore:
    """Open and validate a crash dump source; errors name the file and offset.

    ``base`` and ``limit`` select a region of ``path`` (the data area of a dump device).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NoDumpError(f"{path}: cannot open: {e.strerror}") from e
    try:
        return _parse(path, fd, base, limit)
    except BaseException:
        os.close(fd)
        raise


def _parse(path: str, fd: int, base: int = 0, limit: int | None = None) -> Vmcore:
    st = os.fstat(fd)
    head = os.pread(fd, EHDR.size, base)
    if head[:4] != ELFMAG:
        if stat.S_ISCHR(st.st_mode) or path.endswith("oldmem"):
            log.info("%s is not ELF: treating it as raw physical memory (/dev/oldmem)", path)
            return Vmcore(path=path, kind="raw", fd=fd, size=None)
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
    if not 0 < ehdr.phnum <= MAX_PHNUM:
        raise VmcoreError(f"{path}: offset 0x38: e_phnum {ehdr.phnum} is out of range")

    file_size = st.st_size if stat.S_ISREG(st.st_mode) else None
    if stat.S_ISBLK(st.st_mode):
        file_size = _blockdev_size(fd)
    if file_size is not None:
        file_size -= base
    if limit is not None:
        file_size = limit if file_size is None else min(file_size, limit)
    ph_bytes = os.pread(fd, PHDR.size * ehdr.phnum, base + ehdr.phoff)
    if len(ph_bytes) < PHDR.size * ehdr.phnum:
        raise VmcoreError(
            f"{path}: offset {ehdr.phoff + len(ph_bytes):#x}: file ends inside the program "
            f"headers ({ehdr.phnum} expected at {ehdr.phoff:#x})"
        )
    phdrs = [Phdr.unpack_from(ph_bytes, i * PHDR.size) for i in range(ehdr.phnum)]
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
    notes = [p for p in phdrs if p.type == PT_NOTE]
    if notes:
        # /proc/vmcore merges all notes into one PT_NOTE; tolerate several (raw elfcorehdr).
        first = notes[0]
        if first.filesz > MAX_NOTES:
            raise VmcoreError(f"{path}: PT_NOTE size {first.filesz:#x} is implausibly large")
        blob = b"".join(os.pread(fd, p.filesz, base + p.offset) for p in notes)
        vm.notes_offset = first.offset
        vm.notes_blob = blob
        try:
            vm.notes = iter_notes(blob)
        except ValueError as e:
            raise VmcoreError(f"{path}: PT_NOTE at {first.offset:#x}: {e}") from None
        for n in vm.notes:
            if n.name == VMCOREINFO_NOTE_NAME:
                vm.vmcoreinfo_note = n
                vm.vmcoreinfo = parse_vmcoreinfo(n.desc.decode("ascii", "replace"))
    if not vm.vmcoreinfo:
        log.warning("%s: no VMCOREINFO note; crash time and kernel release unknown", path)
    return vm


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
