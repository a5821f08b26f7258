"""Shared pytest fixtures."""

from tests.servers.fixtures import (  # noqa: F401 - pytest finds fixtures by name
    ftp_server,
    smb_server,
    ssh_server,
    test_user,
    vsftpd_server,
)
