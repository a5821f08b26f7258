"""Every directory a save creates, parents of the target root included, is 0700 on every
target, and every file 0600, whatever the umask (issue 8, item 3).

The servers here run under umask 000 (an FTP server then makes 0777 directories, Samba
without masks makes 0755 ones), and so does the save itself. A server that refuses to
set modes (FTP without SITE CHMOD) gets one warning per dump and a note in its README.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from kdump_capture.sample import SampleSpec, write_sample
from tests.helpers import cli
from tests.servers.ftp import pyftpd
from tests.servers.samba import smbd
from tests.servers.sshd import sshd

# POSIX ACL xattr (linux/posix_acl_xattr.h): version, then (tag, perm, id) entries.
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 16, 32


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """SFTP, FTP (with and without SITE CHMOD) and SMB (Samba's default masks), all
    started under umask 000: their own defaults would leave everything open."""
    work = tmp_path_factory.mktemp("umask0")
    for d in ("sshd", "f1", "f2", "smb"):
        (work / d).mkdir()
    with contextlib.ExitStack() as stack:
        with umask(0):  # inherited by the server processes only
            started = {
                "sftp": stack.enter_context(sshd(str(work / "sshd"))),
                "ftp": stack.enter_context(pyftpd(str(work / "f1"), str(work / "ftp"))),
                "ftp-nochmod": stack.enter_context(
                    pyftpd(str(work / "f2"), str(work / "ftp2"), chmod=False)
                ),
                "cifs": stack.enter_context(
                    smbd(str(work / "smb"), str(work / "share"), masks=False)
                ),
            }
        yield started


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sample") / "vmcore")
    write_sample(path, SampleSpec(ram_mib=2))
    return path


def _target(kind: str, servers, top: str) -> tuple[str, str, list[str]]:
    """(URL, server-side directory of ``top``, extra --set settings) for a fresh ``top``."""
    if kind == "file":
        return f"file://{top}/a/b/c", top, []
    s = servers[kind]
    if kind == "sftp":
        d = os.path.join(s.workdir, top)
        return (
            f"sftp://root@{s.host}:{s.port}{d}/a/b/c",
            d,
            [f"KDUMP_HOST_KEY={s.host_key}", f"KDUMP_SSH_IDENTITY={s.client_key}"],
        )
    if kind.startswith("ftp"):
        url = f"ftp://{s.user}:{quote(s.password)}@{s.host}:{s.port}/{top}/a/b/c"
        return url, os.path.join(s.root, top), []
    url = f"cifs://{s.user}:{quote(s.password)}@{s.host}:{s.port}/{s.share}/{top}/a/b/c"
    return url, os.path.join(s.root, top), []


def _save(sample: str, url: str, sets: list[str]):
    args = ["save", "--config", "/nonexistent", "--vmcore", sample, "--no-reboot"]
    for item in (f"KDUMP_SAVEDIR={url}", "KDUMP_FREE_DISK_SIZE=0", *sets):
        args += ["--set", item]
    with umask(0):  # the save inherits it
        return cli(*args)


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    try:
        raw = os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return None
    return [struct.unpack_from("<HHI", raw, i) for i in range(4, len(raw), 8)]


def assert_owner_only(path: str, owner_perm: int) -> None:
    """Mode 0700/0600; or, where the server keeps an ACL (Samba maps our owner-only DACL to
    one, and the mode's group bits then show the ACL mask), no one but the owner has a right."""
    st = os.stat(path)
    acl = _acl(path)
    if acl is None:
        assert stat.S_IMODE(st.st_mode) == owner_perm * 0o100, f"{path}: {st.st_mode:o}"
        return
    mask = next((p for tag, p, _ in acl if tag == ACL_MASK), 7)
    for tag, perm, ident in acl:
        if tag == ACL_USER_OBJ or (tag == ACL_USER and ident == st.st_uid):
            assert perm & owner_perm == owner_perm, f"{path}: owner lacks rights in {acl}"
        elif tag in (ACL_USER, ACL_GROUP_OBJ, ACL_GROUP):
            assert perm & mask == 0, f"{path}: {acl} lets others in"
        elif tag == ACL_OTHER:
            assert perm == 0, f"{path}: {acl} lets others in"
    assert st.st_mode & 0o007 == 0


@pytest.mark.parametrize("kind", ["file", "sftp", "ftp", "cifs"])
def test_everything_a_save_creates_is_owner_only(kind, servers, sample, tmp_path):
    top = f"modes-{kind}"
    if kind == "file":
        top = str(tmp_path / "world")
        os.mkdir(top)
        os.chmod(top, 0o777)  # the parents we add must not inherit this
    url, server_top, sets = _target(kind, servers, top)
    r = _save(sample, url, sets)
    assert r.rc == 0, r.err
    assert "SITE CHMOD" not in r.err and "owner-only" not in r.err
    created = [os.path.join(server_top, p) for p in ("a", "a/b", "a/b/c")]
    (dump,) = os.listdir(created[-1])
    created.append(os.path.join(created[-1], dump))
    for d in created:
        assert_owner_only(d, 0o7)
    files = os.listdir(created[-1])
    assert {"vmcore", "README.txt", "manifest.json"} <= set(files)
    for f in files:
        assert_owner_only(os.path.join(created[-1], f), 0o6)


def test_ftp_server_refusing_site_chmod_warns_once_and_says_so_in_the_readme(servers, sample):
    url, server_top, _ = _target("ftp-nochmod", servers, "refused")
    r = _save(sample, url, [])
    assert r.rc == 0, r.err
    warnings = [x for x in r.err.splitlines() if "refused SITE CHMOD" in x]
    assert len(warnings) == 1, r.err  # one per dump, though 4 directories and 4 files
    assert "WARNING" in warnings[0] and "readable by other users" in warnings[0]
    top = os.path.join(server_top, "a", "b", "c")
    (dump,) = os.listdir(top)
    readme = open(os.path.join(top, dump, "README.txt")).read()
    assert "NOTE: the FTP server refused SITE CHMOD" in readme
    assert "readable by other users" in readme
    with open(os.path.join(top, dump, "manifest.json")) as f:
        assert any("refused SITE CHMOD" in n for n in json.load(f)["notes"])
    # what the note warns about: the server's umask (000 here) decided the modes
    assert stat.S_IMODE(os.stat(os.path.join(top, dump)).st_mode) == 0o777
