"""Session-wide pytest fixtures starting the real servers (imported by tests/conftest.py).

A server that cannot start makes the tests that need it fail with the reason; nothing
is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from .common import unix_user
from .ftp import FtpServer, pyftpd, vsftpd
from .s3 import S3Server, seaweed
from .samba import SmbServer, smbd
from .sshd import SshServer, sshd

TEST_PASSWORD = "kdump-Test-pw1"


def _world_dir(prefix: str) -> str:
    """A directory a non-root test user can reach (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o777)
    return d


@pytest.fixture(scope="session")
def test_user() -> Iterator[tuple[str, str]]:
    """A local user with a password (SSH password login, vsftpd)."""
    with unix_user(TEST_PASSWORD) as name:
        yield name, TEST_PASSWORD


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory) -> Iterator[SshServer]:
    with sshd(str(tmp_path_factory.mktemp("sshd"))) as s:
        yield s


@pytest.fixture(scope="session")
def ftp_server(tmp_path_factory) -> Iterator[FtpServer]:
    work = tmp_path_factory.mktemp("pyftpd")
    with pyftpd(str(work), str(work / "root")) as s:
        yield s


@pytest.fixture(scope="session")
def vsftpd_server(tmp_path_factory, test_user) -> Iterator[FtpServer]:
    root = _world_dir("kdump-vsftpd-")
    try:
        with vsftpd(str(tmp_path_factory.mktemp("vsftpd")), root, *test_user) as s:
            yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smb_server(tmp_path_factory) -> Iterator[SmbServer]:
    work = tmp_path_factory.mktemp("smbd")
    with smbd(str(work), str(work / "share")) as s:
        yield s


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """SeaweedFS with its S3 gateway (http and https) and the bucket ``dumps``."""
    with seaweed(str(tmp_path_factory.mktemp("seaweed"))) as s:
        yield s
