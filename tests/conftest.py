"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

# `import tests.vmkit` needs the repository root on sys.path; `python3 -m pytest` adds the
# working directory, a bare `pytest` does not.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests import vmkit  # noqa: E402
from tests.servers.fixtures import (  # noqa: E402, F401 - pytest finds fixtures by name
    ftp_server,
    s3_server,
    smb_server,
    ssh_server,
    test_user,
    vsftpd_server,
)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo what an in-process CLI run did to logging (cli._setup_logging): its handler writes
    to that test's captured stderr, closed once the test ends, and with --debug paramiko
    stays at DEBUG; a transport thread of a later test then logged into the closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("paramiko", "smbprotocol", "spnego", "botocore")
    noisy = {n: logging.getLogger(n).level for n in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.fixture(scope="session")
def cloud_kernel() -> vmkit.Kernel:
    """Debian's cloud kernel, unpacked with modules.dep (downloaded once, cached)."""
    return vmkit.get_kernel()


@pytest.fixture(scope="session")
def real_sample() -> vmkit.Sample:
    """A real vmcore of a 512 MiB TCG guest (generated once, about 15 s, then cached)."""
    return vmkit.get_sample(512)


@pytest.fixture(scope="session")
def real_sample_2g() -> vmkit.Sample:
    """A real vmcore of a 2048 MiB TCG guest (generated once, then cached)."""
    return vmkit.get_sample(2048)


@pytest.fixture(scope="session")
def debug_vmlinux(cloud_kernel: vmkit.Kernel) -> Path:
    """The debug vmlinux matching the cloud kernel, for `crash` (about 280 MB download)."""
    return vmkit.get_debug_vmlinux(cloud_kernel)
