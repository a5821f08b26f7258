"""A loopback HTTP/1.1 proxy in front of a real server that answers chosen requests itself
with an error, as an object store in trouble does (S3: 500 InternalError, 503 SlowDown).

``fail(method, target)`` is asked about every request (``target``: the path and query); a
request it picks never reaches the server: the proxy reads its body and answers with
``status`` and an S3 error document for ``code``, on the same kept-alive connection.
Everything else passes both ways unchanged. ``answered`` lists what the proxy answered.
``document``: the body to answer with instead of the error document (with ``status`` 200:
a reply a store in trouble sends that is well formed but wrong, such as a listing page);
``headers``: more header fields of that answer.

It needs what our S3 client does: one request at a time per connection, each body with a
Content-Length (no chunked uploads, no ``Expect: 100-continue``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from .common import LOOPBACK

_REASONS = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}
_MAX_HEAD = 64 << 10


class ErrorProxy:
    def __init__(
        self,
        target_port: int,
        fail: Callable[[str, str], bool],
        status: int = 500,
        code: str = "InternalError",
        document: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.target_port = target_port
        self.fail = fail
        self.status, self.code = status, code
        self.document = document
        self.headers = headers or {}
        self.answered: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._lst = socket.socket()
        self._lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lst.bind((LOOPBACK, 0))
        self._lst.listen(8)
        self.port = self._lst.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> ErrorProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # shutdown first: it wakes the thread blocked in accept(), which close() alone
        # would leave listening until accept() returned
        with self._lock:
            socks, self._socks = [self._lst, *self._socks], []
        for s in socks:
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((LOOPBACK, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            out = threading.Lock()  # the server's replies and ours share the client socket
            threading.Thread(target=self._down, args=(server, client, out), daemon=True).start()
            threading.Thread(target=self._up, args=(client, server, out), daemon=True).start()

    def _down(self, server: socket.socket, client: socket.socket, out: threading.Lock) -> None:
        try:
            while data := server.recv(256 << 10):
                with out:
                    client.sendall(data)
        except OSError:
            pass
        _close(client)

    def _up(self, client: socket.socket, server: socket.socket, out: threading.Lock) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    if len(buf) > _MAX_HEAD or not (data := client.recv(256 << 10)):
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                while len(buf) < length:
                    if not (data := client.recv(256 << 10)):
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                if self.fail(method, target):
                    with self._lock:
                        self.answered.append((method, target))
                    with out:
                        client.sendall(self._error(method))
                else:
                    server.sendall(head + b"\r\n\r\n" + body)
        except (OSError, ValueError):
            pass
        finally:
            _close(server)

    def _error(self, method: str) -> bytes:
        doc = self.document
        if doc is None:
            doc = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                f"{self.code}</Code><Message>injected by the test proxy</Message></Error>"
            ).encode()
        head = (
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
            "Content-Type: application/xml\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            + f"Content-Length: {len(doc)}\r\n\r\n"
        ).encode()
        return head if method == "HEAD" else head + doc


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
