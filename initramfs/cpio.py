"""Write newc (SVR4 "070701") cpio archives, the format the kernel unpacks as an initramfs.

The kernel's unpacker (init/initramfs.c) accepts only newc, ignores the checksum field and
needs every parent directory before its children. Entries are written in the order given;
``Archive`` sorts them so the output is reproducible for identical input.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# 6-byte magic followed by 13 fields of 8 hex digits: 110 bytes (sizeof(struct cpio_newc_header)).
HEADER_SIZE = 110


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(frozen=True)
class Member:
    """One archive member. ``name`` has no leading slash (``usr/bin/python3``)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    def header(self, ino: int) -> bytes:
        name = self.name.encode() + b"\0"
        fields = (
            ino,
            self.mode,
            self.uid,
            self.gid,
            2 if stat.S_ISDIR(self.mode) else 1,
            self.mtime,
            len(self.data),
            0,
            0,
            self.rdevmajor,
            self.rdevminor,
            len(name),
            0,
        )
        head = MAGIC + b"".join(b"%08X" % f for f in fields)
        assert len(head) == HEADER_SIZE
        return head + name + b"\0" * _pad4(HEADER_SIZE + len(name))


def directory(name: str, mode: int = 0o755, mtime: int = 0) -> Member:
    return Member(name, stat.S_IFDIR | mode, mtime=mtime)


def regular(name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> Member:
    return Member(name, stat.S_IFREG | mode, data, mtime=mtime)


def symlink(name: str, target: str, mtime: int = 0) -> Member:
    return Member(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime)


def chardev(name: str, major: int, minor: int, mode: int = 0o600) -> Member:
    return Member(name, stat.S_IFCHR | mode, rdevmajor=major, rdevminor=minor)


def encode(members: Iterable[Member]) -> Iterator[bytes]:
    """The archive as a sequence of byte strings (headers, data, padding, trailer)."""
    ino = 1
    for m in members:
        yield m.header(ino)
        ino += 1
        if m.data:
            yield m.data
            yield b"\0" * _pad4(len(m.data))
    yield Member(TRAILER, 0).header(0)


def write(members: Iterable[Member], out: BinaryIO) -> int:
    """Write the archive to ``out``; returns the number of bytes written (unpacked size)."""
    total = 0
    for chunk in encode(members):
        out.write(chunk)
        total += len(chunk)
    return total


class Archive:
    """A set of members keyed by path; parent directories are added implicitly."""

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self._members: dict[str, Member] = {}

    def __contains__(self, name: str) -> bool:
        return name.strip("/") in self._members

    def __len__(self) -> int:
        return len(self._members)

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._members:
                self._members[d] = directory(d, mtime=self.mtime)

    def add(self, member: Member) -> None:
        name = member.name.strip("/")
        if not name:
            return
        self._parents(name)
        existing = self._members.get(name)
        if existing is not None and stat.S_ISDIR(existing.mode) and stat.S_ISDIR(member.mode):
            return
        self._members[name] = Member(
            name,
            member.mode,
            member.data,
            member.uid,
            member.gid,
            member.mtime or self.mtime,
            member.rdevmajor,
            member.rdevminor,
        )

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self.add(directory(name, mode))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(regular(name, data, mode))

    def add_symlink(self, name: str, target: str) -> None:
        self.add(symlink(name, target))

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(chardev(name, major, minor, mode))

    def get(self, name: str) -> Member | None:
        return self._members.get(name.strip("/"))

    def members(self) -> list[Member]:
        """Members sorted by path, so every directory precedes its contents."""
        return [self._members[k] for k in sorted(self._members)]

    def file_bytes(self) -> int:
        return sum(len(m.data) for m in self._members.values())

    def page_bytes(self, page: int = 4096) -> int:
        """What the files take once unpacked into tmpfs, which holds each in whole pages."""
        files = (m for m in self._members.values() if stat.S_ISREG(m.mode))
        return sum(-(-len(m.data) // page) * page for m in files)

    def write(self, out: BinaryIO) -> int:
        return write(self.members(), out)
