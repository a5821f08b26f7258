"""Files that hold secrets (the capture initramfs holds the target password and the SSH
private key): owner-only from the first byte, whatever the umask.

A file is created under a temporary name with O_EXCL and mode 0600 (the umask can only
remove bits), written, fsynced and renamed over the final name, so no reader ever finds
it readable or half-written. Directories are created 0700.
"""

from __future__ import annotations

import os
import secrets
import stat

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_dir(path: str, repair: bool = False) -> None:
    """Create ``path`` (parents as usual) with mode 0700; with ``repair``, an existing
    directory gets 0700 too. A symlink is never followed into."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent != path:
            os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile: checked below like any existing directory
        else:
            os.chmod(path, DIR_MODE)
            return
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if repair and stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


def open_new(path: str) -> int:
    """A new file descriptor for writing ``path``, created 0600; fails if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, FILE_MODE)  # exactly 0600, also under a umask that would leave less
    return fd


def write_file(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; the file is 0600 from its first byte."""
    tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
    fd = open_new(tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def repair_file(path: str) -> bool:
    """Make an existing regular file 0600; True when its mode had to change."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) == FILE_MODE:
        return False
    os.chmod(path, FILE_MODE)
    return True
