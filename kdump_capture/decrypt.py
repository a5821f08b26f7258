"""`kdump-capture decrypt`: turn an encrypted dump directory back into a plain one.

Each ``NAME.age`` the manifest lists is decrypted to ``NAME`` (streamed, one chunk in
memory), while the stored ciphertext and the plaintext are both hashed and checked against
the manifest; a flattened vmcore is then rearranged into the normal file. Outputs appear
only when complete and checked (temporary name, O_EXCL|O_NOFOLLOW, mode 0600, rename).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from transports.base import mode_kind

from . import checksum, manifest
from .errors import (
    ConfigError,
    IncompleteDump,
    KdumpError,
    ManifestError,
    NoDumpError,
    TargetFull,
    TransportError,
    VerifyError,
)
from .private import lock_new
from .report import AGE_SUFFIX, DMESG, MANIFEST, SUMMARY, VMCORE

COPY = 1 << 20

log = logging.getLogger(__name__)


@dataclass
class Decrypted:
    name: str
    size: int
    digest: str  # of the plaintext, by ``algorithm``
    algorithm: str = checksum.SHA256
    rearranged: bool = False


class _HashingReader:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, f, hasher: checksum.Hasher) -> None:
        self.f = f
        self.hash = hasher
        self.size = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def readinto(self, view: memoryview) -> int:
        n = self.f.readinto(view)
        if n:
            self.hash.update(view[:n])
            self.size += n
        return n or 0


def _open_regular(path: str, error: type[KdumpError]) -> int:
    """A descriptor of the regular file ``path``, opened through no link and without
    blocking (a FIFO would wait for a writer for good); ``error`` for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise NoDumpError(f"{path}: cannot open: {e.strerror}") from None
        if e.errno == errno.ELOOP:
            raise error(f"{path}: a symbolic link; only regular files are read") from None
        raise error(f"{path}: cannot open: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {mode_kind(mode)}; only regular files are read")
    return fd


def read_manifest(dumpdir: str) -> dict:
    """manifest.json of a local dump directory as a JSON object, bounded as every manifest
    is (``manifest.document``: 1 MiB, nesting and values limited before json builds
    anything), read only from a regular file, never through a link. ManifestError (exit 4)."""
    path = os.path.join(dumpdir, MANIFEST)
    fd = _open_regular(path, ManifestError)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(manifest.MAX_BYTES + 1)
    return manifest.document(raw, path)


# What a save encrypts: decrypt writes these names and no other (a manifest on a shared
# target may list ".bashrc.age", encrypted to a public key it read from any other manifest).
ENCRYPTED = (DMESG, SUMMARY, VMCORE)


def encrypted_files(doc: dict, label: str) -> list[tuple[str, dict, dict]]:
    """(stored name, stored entry, plaintext entry) of each encrypted file, vmcore last."""
    out = []
    for name, info in doc.get("files", {}).items():
        if not isinstance(name, str) or not name.endswith(AGE_SUFFIX):
            continue
        if name.removesuffix(AGE_SUFFIX) not in ENCRYPTED:
            raise ManifestError(
                f"{label}/{MANIFEST}: {ascii(name)[:80]} is not a file a dump encrypts "
                f"({', '.join(n + AGE_SUFFIX for n in ENCRYPTED)}); nothing was decrypted"
            )
        plain = info.get("plaintext") if isinstance(info, dict) else None
        if not isinstance(plain, dict):
            raise ManifestError(f"{label}/{MANIFEST}: {name}: no plaintext checksum recorded")
        size = plain.get("size")
        if type(size) is not int or size < 0:  # as manifest._files checks the stored size
            raise ManifestError(
                f"{label}/{MANIFEST}: {name} (plaintext): 'size' is missing or not a byte count"
            )
        out.append((name, info, plain))
    out.sort(key=lambda t: t[0] == VMCORE + AGE_SUFFIX)
    return out


def decrypt_dir(dumpdir: str, identities: list, output: str | None = None) -> Iterator[Decrypted]:
    """Decrypt every encrypted file of a dump directory into ``output`` (default: the same
    directory), yielding each once it is in place. Raises DecryptError (no identity fits:
    exit 15), VerifyError (altered, truncated or not matching the manifest: exit 8),
    NoDumpError, ConfigError; and IncompleteDump (exit 13) after decrypting a dump whose
    manifest does not say complete: its vmcore holds only what was saved, if anything."""
    doc = read_manifest(dumpdir)
    record = manifest.of_document(doc, os.path.join(dumpdir, MANIFEST))  # as verify checks
    files = encrypted_files(doc, dumpdir)
    if not files:
        raise ConfigError(f"{dumpdir}: the dump is not encrypted (no .age file in {MANIFEST})")
    out_dir = output or dumpdir
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--output {out_dir}: not a directory")
    for name, _, _ in files:
        _check_output(os.path.join(out_dir, name.removesuffix(AGE_SUFFIX)))
    remove_leftovers(out_dir)
    for name, stored, plain in files:
        yield _decrypt_one(dumpdir, name, stored, plain, identities, out_dir)
    if not record.complete:
        has_vmcore = any(name == VMCORE + AGE_SUFFIX for name, _, _ in files)
        raise IncompleteDump(
            f"{dumpdir}: the dump is {record.status.upper()} ({MANIFEST}: "
            f"{ascii(record.error or 'no reason recorded')[1:-1][:300]}): "
            + (
                f"the decrypted {VMCORE} holds only what was saved"
                if has_vmcore
                else f"there is no {VMCORE}"
            )
        )


def _check_output(path: str) -> None:
    """ConfigError (exit 2) before anything is decrypted when ``path`` is taken by what a
    decrypted file must not replace (a directory, a FIFO, a device): found only after the
    whole vmcore was decrypted, it was exit 6, or exit 2 with rearrange's advice."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there: creating the file says what is wrong, if anything
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # a link is replaced, not followed
        raise ConfigError(
            f"{path}: {mode_kind(mode)}: decrypt writes a regular file under this name; "
            "move it away or give --output DIR; nothing was decrypted"
        )


def _decrypt_one(dumpdir, name, stored, plain, identities, out_dir) -> Decrypted:
    from .age import Decryptor

    src = os.path.join(dumpdir, name)
    target = name.removesuffix(AGE_SUFFIX)
    where = f"{dumpdir}/{MANIFEST}: {name}"
    stored_algo, stored_digest = checksum.recorded(stored, where)
    plain_algo, plain_digest = checksum.recorded(plain, f"{where} (plaintext)")
    stored_hash, h = checksum.new(stored_algo), checksum.new(plain_algo)
    fd = _open_regular(src, VerifyError)
    tmp, out_fd = _create_temp(out_dir, target)
    # The lock on the temporary file lives until it is renamed or removed (a dup shares it):
    # the next decrypt then knows it is no leftover of a killed one (remove_leftovers).
    hold = -1
    try:
        hold = os.dup(out_fd)
        with os.fdopen(fd, "rb", buffering=COPY) as f, os.fdopen(out_fd, "wb") as out:
            out_fd = -1
            reader = _HashingReader(f, stored_hash)
            dec = Decryptor(reader, identities, src)
            size = 0
            head = b""
            for chunk in dec.chunks():
                if len(head) < 16:
                    head += bytes(chunk[: 16 - len(head)])
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
            # The whole stored file must have been read (nothing after the last chunk).
            if reader.read(1):
                raise VerifyError(f"{src}: data after the last chunk of the age stream")
            out.flush()
            os.fsync(out.fileno())
        if reader.size != stored.get("size") or reader.hash.hexdigest() != stored_digest:
            raise VerifyError(
                f"{src}: does not match {MANIFEST} (stored size {reader.size}, {stored_algo} "
                f"{reader.hash.hexdigest()}; recorded {stored.get('size')} {stored_digest})"
            )
        if size != plain.get("size") or h.hexdigest() != plain_digest:
            raise VerifyError(
                f"{src}: the decrypted file does not match the plaintext checksum in "
                f"{MANIFEST} (size {size}, {plain_algo} {h.hexdigest()}; recorded "
                f"{plain.get('size')} {plain_digest})"
            )
        dest = os.path.join(out_dir, target)
        from .formats.flat import fsync_dir, is_flattened, rearrange

        if target == VMCORE and is_flattened(head):
            rearranged_size = rearrange(tmp, dest)
            _unlink(tmp)
            return Decrypted(target, rearranged_size, h.hexdigest(), plain_algo, rearranged=True)
        os.replace(tmp, dest)
        fsync_dir(dest)  # the new name survives a power cut, as rearrange's does
        return Decrypted(target, size, h.hexdigest(), plain_algo)
    except BaseException as e:
        if out_fd >= 0:
            os.close(out_fd)
        _unlink(tmp)
        if isinstance(e, OSError):
            # Almost always the output (full, or its name taken by a directory): name both.
            what = f"{src}: decrypting to {os.path.join(out_dir, target)}: {e.strerror or e}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TargetFull(what) from e
            raise TransportError(what) from e
        raise
    finally:
        if hold >= 0:
            os.close(hold)


# The temporary names of decrypt's outputs (and of the rearranged vmcore, flat.rearrange):
# a decrypt killed by SIGKILL leaves its partial plaintext under one of them.
_NAMES = "|".join(re.escape(n) for n in ENCRYPTED)
LEFTOVER = re.compile(rf"\.(?:{_NAMES})\.(?:decrypt|rearrange)-[0-9a-f]{{12}}")


def remove_leftovers(folder: str) -> list[str]:
    """Remove the partial plaintexts an interrupted decrypt (killed: SIGKILL, a power cut)
    left in ``folder``; returns their names.

    Only our temporary names, only regular files of this user, never through a link, and
    only files no process holds: every decrypt (and rearrange) holds an exclusive flock on
    its temporary file from its creation until it is renamed or removed, and the kernel
    drops the lock of a killed process. A concurrent decrypt's file is locked and stays.
    """
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    removed = []
    try:
        for name in os.listdir(dfd):
            if not LEFTOVER.fullmatch(name):
                continue
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
                )
            except OSError:
                continue  # a link (ELOOP), gone, or not ours to read: left alone
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # in use: another decrypt is writing it
                now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
                log.warning(
                    "%s: removed %s (%d bytes), the partial plaintext of a decrypt that was killed",
                    folder,
                    name,
                    st.st_size,
                )
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return removed


def _create_temp(folder: str, name: str) -> tuple[str, int]:
    """A new 0600 file for ``name``'s plaintext, created O_EXCL|O_NOFOLLOW and locked (see
    ``remove_leftovers``): the lock lives as long as the returned descriptor (and its dups)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(8):
        tmp = os.path.join(folder, f".{name}.decrypt-{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise ConfigError(f"{folder}: cannot create {name}: {e.strerror or e}") from None
        if lock_new(fd, tmp):
            return tmp, fd
        os.close(fd)  # removed before we held it, by a decrypt cleaning up: another name
    raise ConfigError(f"{folder}: cannot create {name}: its temporary files keep vanishing")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
