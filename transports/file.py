"""Local-directory transport (file:// targets, and the mount point of NFS targets)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator

from kdump_capture.errors import TargetFull, TransportError, UnsafeFile
from kdump_capture.memory import write_piece

from .base import (
    DIR_MODE,
    FILE_MODE,
    MARKS_FIRST,
    Claim,
    Entry,
    FileInfo,
    Sink,
    Transport,
    TransportSettings,
    WriteBehind,
    bounded,
    check_size,
    is_temp_name,
    mode_kind,
    require_regular,
    temp_name,
)

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# A directory below the root, opened without following a link at any step.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a FIFO is swapped in after the check, opening it returns at once.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _io_error(what: str, e: OSError) -> TransportError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetFull(f"{what}: target is full ({e.strerror})")
    return TransportError(f"{what}: {e.strerror or e}")


def _parts(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UnsafeFile(f"{relpath!r}: '.' and '..' are not allowed in a target path")
    return parts


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


# Our dumps hold files only: a tree deeper than this under a dump-like name is someone
# else's, and is left in place (shutil.rmtree recursed once per level: RecursionError).
MAX_TREE_DEPTH = 8


def _remove_dir_at(parent: int, name: str, path: str, depth: int) -> None:
    """Remove directory ``name`` in ``parent`` and what it holds, by descriptors only: a link
    inside is removed itself, never followed."""
    if depth >= MAX_TREE_DEPTH:
        raise TransportError(f"{path}: nested more than {MAX_TREE_DEPTH} levels deep, not a dump")
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        for mark in MARKS_FIRST:  # then the rest, in any order (see MARKS_FIRST)
            try:
                os.unlink(mark, dir_fd=fd)
            except (FileNotFoundError, IsADirectoryError):
                pass
        with os.scandir(fd) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):
                    _remove_dir_at(fd, de.name, f"{path}/{de.name}", depth + 1)
                else:
                    os.unlink(de.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


class FileSink(Sink):
    """A file written with os.write under a temporary name, published with os.replace.

    Every step goes through ``dir_fd``, the dump directory opened without following a link:
    a directory swapped for a link after it was opened (another host of a shared target can
    rename entries there) never receives a byte. The sink owns ``dir_fd`` and closes it.
    """

    seekable = True

    def __init__(self, dir_fd: int, directory: str, name: str, algorithm: str) -> None:
        super().__init__(name, algorithm)
        self._dfd = dir_fd
        self._tmpname = temp_name(name)
        self._final = os.path.join(directory, name)
        self._tmp = os.path.join(directory, self._tmpname)
        self._fd = -1
        try:
            self._fd = os.open(
                self._tmpname,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                FILE_MODE,
                dir_fd=dir_fd,
            )
            os.fchmod(self._fd, FILE_MODE)  # umask must not widen or narrow it
        except OSError as e:
            self._close_all()
            raise _io_error(f"cannot create {self._tmp}", e) from e
        self._behind = WriteBehind(self._fd)

    def _close_all(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dfd = -1

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        done, piece = 0, write_piece()
        # os.write releases the GIL: the SHA-256 runs on the other core meanwhile.
        with self._accounting(view):
            try:
                while done < len(view):
                    done += os.write(self._fd, view[done : done + piece])
            except OSError as e:
                raise _io_error(f"writing {self._tmp}", e) from e
        self._behind.wrote_to(self._pos)

    def seek(self, offset: int) -> None:
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._pos = offset

    def _read_back(self) -> Iterator[bytes]:
        # From our own descriptor: no name is looked up again, so nothing swapped in is read.
        pos = 0
        while chunk := os.pread(self._fd, READ_CHUNK, pos):
            pos += len(chunk)
            yield chunk

    def _ident(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_ino, st.st_dev

    def commit(self) -> FileInfo:
        try:
            os.fsync(self._fd)
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise _io_error(f"flushing {self._tmp}", e) from e
        if size != self.size:
            raise TransportError(f"{self._tmp}: wrote {self.size} bytes but the file has {size}")
        digest = self._digest()
        self._behind.drop_all()  # on disk now: none of it needs the cache
        ident = self._ident()
        os.close(self._fd)
        self._fd = -1
        try:
            st = os.stat(self._tmpname, dir_fd=self._dfd, follow_symlinks=False)
            if (st.st_ino, st.st_dev) != ident:
                self._close_all()  # the name is someone else's file now: abort leaves it
                raise UnsafeFile(f"{self._tmp}: replaced while it was being written")
            os.replace(self._tmpname, self.name, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
            os.fsync(self._dfd)
        except OSError as e:
            # the directory stays open: abort() removes the temporary file through it
            raise _io_error(f"publishing {self._final}", e) from e
        self._close_all()
        self.committed = True
        return FileInfo(self.name, size, digest, self.algorithm)

    def abort(self) -> None:
        self._stop_hashing()
        dfd = self._dfd
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if dfd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._tmpname, dir_fd=dfd)
        self._close_all()


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
        if self.settings.read_only:
            return  # nothing to create; what cannot be read fails where it is read
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
        *dirs, name = _parts(relpath) or [""]
        try:
            with self._dir_fd(dirs) as dfd:
                os.mkdir(name, DIR_MODE, dir_fd=dfd)
                # By descriptor, not by name: a link swapped in for the new directory
                # meanwhile fails to open here and is never chmod-ed through.
                fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    os.fchmod(fd, DIR_MODE)
                finally:
                    os.close(fd)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile(f"{path}: replaced by a link after it was created") from None
            raise _io_error(f"cannot create {path}", e) from e

    def claim(self, relpath: str) -> Claim | None:
        """flock(2) on the directory itself: held while the descriptor is open, freed by
        the kernel when the process ends. None too when the directory is gone (deleted by
        the process that held it before us)."""
        *dirs, name = _parts(relpath) or [""]
        try:
            with self._dir_fd(dirs) as dfd:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                return Claim(lambda: None)  # a link: nobody writes a dump into it
            raise _io_error(f"cannot open {self._p(relpath)}", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:  # removed while we waited for it
                os.close(fd)
                return None
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            # A filesystem without flock on directories (NFSv4 turns it into a write lock,
            # which a directory opened to read cannot take: EBADF): claim nothing, as
            # before claims existed, rather than fail the dump.
            log.debug("cannot lock %s: %s", self._p(relpath), e.strerror)
            return Claim(lambda: os.close(fd))
        return Claim(lambda: os.close(fd))

    def create(self, relpath: str) -> Sink:
        *dirs, name = _parts(relpath) or [""]
        directory = os.path.dirname(self._p(relpath))
        try:
            with self._dir_fd(dirs) as dfd:
                keep = os.dup(dfd)  # the sink's own, closed when it commits or aborts
        except OSError as e:
            raise _io_error(f"cannot open {directory}", e) from e
        return FileSink(keep, directory, name, self.settings.checksum)

    @contextlib.contextmanager
    def _dir_fd(self, parts: list[str]) -> Iterator[int]:
        """A descriptor of the directory root/parts..., no step of it through a link.

        The root itself is the administrator's choice and may be a link.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    where = self._p("/".join(parts[: i + 1]))
                    raise UnsafeFile(f"{where}: {mode_kind(mode)}, not a directory") from None
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    def listdir(self, relpath: str = "") -> list[Entry]:
        path = self._p(relpath)
        try:
            with self._dir_fd(_parts(relpath)) as fd, os.scandir(fd) as it:
                out = []
                for de in it:
                    if is_temp_name(de.name):
                        continue
                    st = de.stat(follow_symlinks=False)
                    is_dir = stat.S_ISDIR(st.st_mode)
                    link = stat.S_ISLNK(st.st_mode)
                    out.append(Entry(de.name, is_dir, 0 if is_dir else st.st_size, link))
                return sorted(out, key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _io_error(f"cannot list {path}", e) from e

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        path = self._p(relpath)
        try:
            fd = self._open_regular(relpath, limit)
        except OSError as e:
            raise _io_error(f"cannot read {path}", e) from e
        try:
            # At most limit + 1 bytes: enough to tell that the file grew past the limit.
            left = float("inf") if limit is None else limit + 1
            chunks = iter(lambda: os.read(fd, int(min(READ_CHUNK, left))), b"")
            for chunk in bounded(chunks, limit, path):
                left -= len(chunk)
                yield chunk
        except OSError as e:
            raise _io_error(f"cannot read {path}", e) from e
        finally:
            os.close(fd)

    def _open_regular(self, relpath: str, limit: int | None) -> int:
        """A descriptor of a regular file, opened through no link and without blocking."""
        *dirs, name = _parts(relpath) or [""]
        path = self._p(relpath)
        with self._dir_fd(dirs) as dfd:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            require_regular(st.st_mode, path)
            check_size(st.st_size, limit, path)
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise UnsafeFile(f"{path}: replaced while it was being opened")
        return fd

    def remove_tree(self, relpath: str) -> None:
        path = self._p(relpath)
        parts = _parts(relpath)
        if not parts:
            raise TransportError("refusing to remove the target root")
        *dirs, name = parts
        try:
            with self._dir_fd(dirs) as dfd:
                mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    _remove_dir_at(dfd, name, path, 0)
                else:
                    os.unlink(name, dir_fd=dfd)  # a link goes, not what it points to
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _io_error(f"cannot remove {path}", e) from e

    def remove_file(self, relpath: str) -> None:
        *dirs, name = _parts(relpath) or [""]
        try:
            with self._dir_fd(dirs) as dfd:
                os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _io_error(f"cannot remove {self._p(relpath)}", e) from e

    def settle(self) -> bool:
        """syncfs(2) on the target's filesystem: btrfs counts deleted files as free only
        once its transaction commits, and this commits it."""
        import ctypes  # only here: deleting for room is rare

        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise _io_error(f"cannot open {self.root}", e) from e
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise _io_error(f"cannot sync {self.root}", OSError(err, os.strerror(err)))
        finally:
            os.close(fd)
        return True

    def free_space(self, relpath: str = "") -> int | None:
        try:
            st = os.statvfs(self._p(relpath))
        except OSError as e:
            raise _io_error(f"cannot stat filesystem of {self._p(relpath)}", e) from e
        return st.f_bavail * st.f_frsize
