"""Files that hold secrets (the capture initramfs holds the target password and the SSH
private key): owner-only from the first byte, whatever the umask.

A file is created under a temporary name with O_EXCL and mode 0600 (the umask can only
remove bits), written, fsynced and renamed over the final name, so no reader ever finds
it readable or half-written. Directories are created 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator

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


def flock_wait(fd: int, timeout: float) -> bool:
    """Take an exclusive flock(2) on ``fd``, waiting up to ``timeout`` seconds for another
    holder; False when it is still held then. Where flock is refused for another reason
    (a filesystem without it), True: go on as if there were no lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        except OSError:
            return True


# Directories this process holds (dir_lock is reentrant: ``load`` holds the image's
# directory while the builder it calls publishes into it).
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def dir_lock(path: str, timeout: float = 600.0, what: str = "") -> Iterator[None]:
    """Hold ``path`` (a directory) against our other processes: flock(2) on the directory,
    which the kernel frees when the process ends (a SIGKILL leaves nothing to block the
    next run). Reentrant within this process. Waits up to ``timeout`` seconds for another
    holder, then raises TimeoutError naming ``what`` it waited for."""
    key = os.path.realpath(path)
    if key in _HELD:
        yield
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not flock_wait(fd, timeout):
            raise TimeoutError(
                f"{path} is held by another process of ours ({what or 'a build'}) "
                f"for more than {timeout:.0f} s"
            )
        _HELD[key] = fd
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)


def remove_leftovers(path: str) -> list[str]:
    """Delete the temporary files that ``write_file(path)`` leaves when its process is
    killed (``path.tmp.PID.RAND``: they may hold what ``path`` holds, a password or a key).
    Only regular files of ours are removed, never through a link; call it while holding
    the directory (``dir_lock``), when no writer of ours can be at work there."""
    import re

    directory, base = os.path.split(os.path.abspath(path))
    # Exactly write_file's names: an admin's "initrd.img.tmp.old" beside the image (in
    # /boot with --output) is not ours to delete.
    ours = re.compile(re.escape(base) + r"\.tmp\.[0-9]+\.[0-9a-f]{8}")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not ours.fullmatch(name):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(full)
                removed.append(full)
        except OSError:
            continue
    return removed


def repair_file(path: str) -> bool:
    """Make an existing regular file 0600; True when its mode had to change."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) == FILE_MODE:
        return False
    os.chmod(path, FILE_MODE)
    return True


def lock_new(fd: int, path: str) -> bool:
    """Take the lock that marks the new temporary file ``path`` (open as ``fd``) as in use
    (``decrypt.remove_leftovers``: a file no process locks is a killed decrypt's). False
    when a decrypt cleaning up removed it before we held the lock: then create another."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
