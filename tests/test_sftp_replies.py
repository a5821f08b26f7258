"""read_pipelined against an SFTP server that answers READs wrongly.

OpenSSH never sends more than a READ asked for, so the hostile peer here is paramiko's own
SFTP server on loopback, with a file handle that returns what we tell it to: a reply longer
than its request would shift every later byte of a read-back (the checksum of a seeked dump
is taken from it), so it must be an error, not data.
"""

from __future__ import annotations

import os
import socket
import threading

import paramiko
import pytest

from kdump_capture.errors import TransportError
from transports.sftp import read_pipelined

SIZE = 3 * 1024 * 1024 + 777
REQUEST = 64 * 1024


class _Server(paramiko.ServerInterface):
    def check_auth_password(self, username, password):
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username):
        return "password"

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED


class _Handle(paramiko.SFTPHandle):
    def __init__(self, data: bytes, extra_at: int | None) -> None:
        super().__init__()
        self.data = data
        self.extra_at = extra_at

    def read(self, offset, length):
        chunk = self.data[offset : offset + length]
        if self.extra_at is not None and offset <= self.extra_at < offset + length:
            chunk += b"!" * 100  # more than was asked for
        return chunk


def _sftp_interface(data: bytes, extra_at: int | None):
    class Files(paramiko.SFTPServerInterface):
        def open(self, path, flags, attr):
            return _Handle(data, extra_at)

    return Files


@pytest.fixture
def serve():
    """serve(data, extra_at) -> an SFTPClient of a server holding ``data`` at any path."""
    started = []

    def start(data: bytes, extra_at: int | None):
        listener = socket.create_server(("127.0.0.1", 0))
        client_sock = socket.create_connection(listener.getsockname())
        server_sock, _ = listener.accept()
        listener.close()
        server = paramiko.Transport(server_sock)
        server.add_server_key(paramiko.ECDSAKey.generate())
        server.set_subsystem_handler("sftp", paramiko.SFTPServer, _sftp_interface(data, extra_at))
        ready = threading.Thread(target=server.start_server, kwargs={"server": _Server()})
        ready.start()
        client = paramiko.Transport(client_sock)
        # the server's key is made here, now: nothing to verify it against
        client.connect(username="test", password="unused")
        ready.join()
        started.extend([client, server])
        return paramiko.SFTPClient.from_transport(client)

    yield start
    for t in started:
        t.close()


def _read(sftp: paramiko.SFTPClient) -> bytes:
    with sftp.open("vmcore", "rb") as f:
        return b"".join(read_pipelined(sftp, f.handle, SIZE, REQUEST))


def test_an_honest_server_reads_back_exactly(serve):
    data = os.urandom(SIZE)
    assert _read(serve(data, None)) == data


@pytest.mark.parametrize("where", [0, 2 * 1024 * 1024 + 5])
def test_a_reply_longer_than_its_request_is_an_error(serve, where):
    data = os.urandom(SIZE)
    with pytest.raises(TransportError) as e:
        _read(serve(data, where))
    offset = where - where % REQUEST
    assert f"SFTP READ at offset {offset} returned {REQUEST + 100} bytes" in str(e.value)
