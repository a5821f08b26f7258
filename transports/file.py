"""Local-directory transport (file:// targets, and the mount point of NFS targets)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator

from kdump_capture.errors import TargetFull, TransportError

from .base import (
    DIR_MODE,
    FILE_MODE,
    Entry,
    FileInfo,
    Sink,
    Transport,
    TransportSettings,
    is_temp_name,
    temp_name,
)

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def _io_error(what: str, e: OSError) -> TransportError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetFull(f"{what}: target is full ({e.strerror})")
    return TransportError(f"{what}: {e.strerror or e}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_private(path: str) -> None:
    """Create ``path`` and its missing parents, each 0700 whatever the umask.

    os.makedirs gives only the last directory its mode; the parents get 0777 minus the
    umask, which is 0777 under umask 000. Directories that exist are left as they are
    (they are not ours: /var, a mount point).
    """
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path and not os.path.isdir(parent):
        makedirs_private(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return  # ours or not, it was there: not ours to change
    os.chmod(path, DIR_MODE)  # the umask may have taken bits away (0o200 would give 0500)


class FileSink(Sink):
    """A file written with os.write under a temporary name, published with os.replace."""

    seekable = True

    def __init__(self, directory: str, name: str) -> None:
        super().__init__(name)
        self._dir = directory
        self._final = os.path.join(directory, name)
        self._tmp = os.path.join(directory, temp_name(name))
        try:
            self._fd = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
            )
            os.fchmod(self._fd, FILE_MODE)  # umask must not widen or narrow it
        except OSError as e:
            raise _io_error(f"cannot create {self._tmp}", e) from e

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        # os.write releases the GIL: the SHA-256 runs on the other core meanwhile.
        with self._accounting(view):
            try:
                while done < len(view):
                    done += os.write(self._fd, view[done:])
            except OSError as e:
                raise _io_error(f"writing {self._tmp}", e) from e

    def seek(self, offset: int) -> None:
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._pos = offset

    def _read_back(self) -> Iterator[bytes]:
        with open(self._tmp, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk

    def commit(self) -> FileInfo:
        try:
            os.fsync(self._fd)
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise _io_error(f"flushing {self._tmp}", e) from e
        if size != self.size:
            raise TransportError(f"{self._tmp}: wrote {self.size} bytes but the file has {size}")
        digest = self._sha256()
        os.close(self._fd)
        self._fd = -1
        try:
            os.replace(self._tmp, self._final)
            fsync_dir(self._dir)
        except OSError as e:
            raise _io_error(f"publishing {self._final}", e) from e
        self.committed = True
        return FileInfo(self.name, size, digest)

    def abort(self) -> None:
        self._stop_hashing()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


class FileTransport(Transport):
    """Dumps into a local directory (created 0700 if missing)."""

    scheme = "file"
    can_seek = True

    def __init__(self, target, settings: TransportSettings, root: str | None = None) -> None:
        super().__init__(target, settings)
        self.root = root if root is not None else target.path

    def _p(self, relpath: str) -> str:
        return os.path.join(self.root, relpath.strip("/")) if relpath else self.root

    def connect(self) -> None:
        try:
            makedirs_private(self.root)
        except OSError as e:
            raise _io_error(f"cannot create target directory {self.root}", e) from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise TransportError(f"target directory {self.root} is not writable")

    def close(self) -> None:
        pass

    def makedir(self, relpath: str) -> None:
        path = self._p(relpath)
        try:
            os.mkdir(path, DIR_MODE)
            os.chmod(path, DIR_MODE)
        except FileExistsError:
            raise
        except OSError as e:
            raise _io_error(f"cannot create {path}", e) from e

    def create(self, relpath: str) -> Sink:
        path = self._p(relpath)
        return FileSink(os.path.dirname(path), os.path.basename(path))

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)
        try:
            with os.scandir(path) as it:
                out = []
                for de in it:
                    if is_temp_name(de.name):
                        continue
                    is_dir = de.is_dir(follow_symlinks=False)
                    size = 0 if is_dir else de.stat(follow_symlinks=False).st_size
                    out.append(Entry(de.name, is_dir, size))
                return sorted(out, key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _io_error(f"cannot list {path}", e) from e

    def read(self, relpath: str) -> Iterator[bytes]:
        path = self._p(relpath)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(READ_CHUNK):
                    yield chunk
        except OSError as e:
            raise _io_error(f"cannot read {path}", e) from e

    def remove_tree(self, relpath: str) -> None:
        path = self._p(relpath)
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _io_error(f"cannot remove {path}", e) from e

    def remove_file(self, relpath: str) -> None:
        try:
            os.unlink(self._p(relpath))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _io_error(f"cannot remove {self._p(relpath)}", e) from e

    def free_space(self, relpath: str = "") -> int | None:
        try:
            st = os.statvfs(self._p(relpath))
        except OSError as e:
            raise _io_error(f"cannot stat filesystem of {self._p(relpath)}", e) from e
        return st.f_bavail * st.f_frsize
