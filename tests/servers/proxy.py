"""A loopback TCP proxy that drops connections on command (fault injection for tests).

``drop_after``: close a connection abruptly (RST) once this many client-to-server bytes
passed through it, ``drops`` times in all. ``dead_after_drop``: once a connection was
dropped, close every new one at once, so reconnects fail. With ``ftp=True`` the proxy
rewrites PASV replies so data connections pass through it too; only data connections
are then dropped. ``stall()``: from now on the server seems to hang: nothing more the
client sends reaches it, on any connection (control ones included), old or new.
``rate``: client-to-server bytes pass at most this many per second (a slow link).
``drop_down_after``: the same for server-to-client bytes (a download breaks): the bytes
up to that count reach the client, then both sides are reset.
``swallow_after``: one (data) connection delivers that many bytes, then none: the rest
vanishes in the network, and only the server's SIZE tells.
``lose_message_at``: the one whole message (a NetBIOS session frame: a zero byte and a
24-bit length, as SMB2 over TCP sends them) holding that upstream byte of a connection
never reaches the server, and what follows it does: the server applies a later WRITE
but not that one, as a server that completes several WRITEs out of order may before the
connection goes, so the file's size no longer says how much of it the server holds.

The fault matrix drives it from outside instead: ``drop_now`` resets every open
connection; ``stop`` does that and stops listening (a server that went away: connects
are refused), ``start`` listens on the same port again (the server is back).
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time

from .common import LOOPBACK

_PASV = re.compile(rb"^227 .*?\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)")
_CHUNK = 256 << 10


def _rst(sock: socket.socket) -> None:
    """Abort a connection like a broken network would: RST, no FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Wake the pump thread blocked in recv() on this socket; a bare close() would not,
        # and the kernel would keep the connection open until that recv() returned.
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class DropProxy:
    def __init__(
        self,
        target_port: int,
        drop_after: int | None = None,
        drops: int = 1,
        dead_after_drop: bool = False,
        ftp: bool = False,
        stall_after: int | None = None,
        swallow_after: int | None = None,
        half_open: bool = False,
        lose_message_at: int | None = None,
        drop_down_after: int | None = None,
        rate: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.drop_after = drop_after
        self.drop_down_after = drop_down_after
        self.rate = rate
        self.drops_left = drops
        self.dead_after_drop = dead_after_drop
        self.ftp = ftp
        self.stall_after = stall_after  # stop reading upstream after this many bytes
        # one connection passes this many bytes, then everything it gets is lost on the way
        # (a queue in the network that the drop takes with it); later connections pass
        self.swallow_after = swallow_after
        self._swallowing: dict | None = None
        # a drop resets only the client's side: the server never learns of it and keeps
        # the old session (and its open files) until the proxy closes
        self.half_open = half_open
        self._orphans: list[socket.socket] = []
        self.lose_message_at = lose_message_at
        self.lost_messages = 0
        self.stalled = threading.Event()
        self._stall_all = False
        self._closed = threading.Event()
        self.dropped = 0
        self.connections = 0  # accepted client connections (control ones only, for FTP)
        self.downstream = 0  # bytes passed from servers to clients
        self.upstream = 0  # client-to-server bytes passed on, all connections together
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._socks: list[socket.socket] = []
        self.port = self._listen(target_port, data=not ftp)

    def _listen(self, target_port: int, data: bool, once: bool = False, port: int = 0) -> int:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((LOOPBACK, port))
        lst.listen(8)
        with self._lock:
            self._listeners.append(lst)
        threading.Thread(
            target=self._accept, args=(lst, target_port, data, once), daemon=True
        ).start()
        return lst.getsockname()[1]

    def _accept(self, lst: socket.socket, target_port: int, data: bool, once: bool) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            with self._lock:
                dead = self.dead_after_drop and self.dropped > 0
                self.connections += 0 if once else 1
            if dead:
                _rst(client)
                continue
            try:
                server = socket.create_connection((LOOPBACK, target_port))
            except OSError:
                _rst(client)
                continue
            if self.rate:  # the link's pace, not the proxy's buffer, is what the client sees
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            with self._lock:
                self._socks += [client, server]
            state = {"bytes": 0}
            threading.Thread(
                target=self._pump, args=(client, server, data, state, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, data, state, False), daemon=True
            ).start()
            if once:
                lst.close()
                return

    def _pump(self, src, dst, data: bool, state: dict, upstream: bool) -> None:
        buf = b""
        # a slow link reads in pieces of a tenth of a second, so the pace stays even
        size = max(1, min(_CHUNK, self.rate // 10)) if upstream and self.rate else _CHUNK
        try:
            while chunk := src.recv(size):
                if upstream and self.rate:
                    time.sleep(len(chunk) / self.rate)
                if upstream and self._stall_all:
                    self._closed.wait()
                    return
                if upstream and data and self.stall_after is not None:
                    state["bytes"] += len(chunk)
                    if self.stalled.is_set() or state["bytes"] >= self.stall_after:
                        # a hung server: connections stay open, nothing more is read, and
                        # every later connection hangs at once
                        self.stalled.set()
                        self._closed.wait()
                        return
                if upstream and data and self.swallow_after is not None:
                    state["seen"] = state.get("seen", 0) + len(chunk)
                    with self._lock:
                        if state["seen"] > self.swallow_after and self._swallowing in (
                            None,
                            state,
                        ):
                            self._swallowing = state
                    if self._swallowing is state:
                        keep = max(0, self.swallow_after - (state["seen"] - len(chunk)))
                        if not keep:
                            continue
                        chunk = chunk[:keep]
                if upstream and data and self.lose_message_at is not None:
                    chunk = self._lose_message(state, chunk)
                if upstream and data and self.drop_after is not None:
                    state["bytes"] += len(chunk)
                    with self._lock:
                        drop = state["bytes"] >= self.drop_after and self.drops_left > 0
                        if drop:
                            self.drops_left -= 1
                            self.dropped += 1
                    if drop:
                        _rst(src)
                        if self.half_open:
                            state["orphaned"] = True
                            with self._lock:
                                self._orphans.append(dst)
                        else:
                            _rst(dst)
                        return
                if not upstream and data and self.drop_down_after is not None:
                    state["down"] = state.get("down", 0) + len(chunk)
                    with self._lock:
                        drop = state["down"] >= self.drop_down_after and self.drops_left > 0
                        if drop:
                            self.drops_left -= 1
                            self.dropped += 1
                    if drop:
                        keep = self.drop_down_after - (state["down"] - len(chunk))
                        with self._lock:
                            self.downstream += keep
                        dst.sendall(chunk[:keep])
                        _rst(src)
                        _rst(dst)
                        return
                if not upstream:
                    with self._lock:
                        self.downstream += len(chunk)
                if upstream:
                    with self._lock:
                        self.upstream += len(chunk)
                if not upstream and self.ftp and not data:
                    buf += chunk
                    *lines, buf = buf.split(b"\r\n")
                    chunk = b"".join(self._rewrite(line) + b"\r\n" for line in lines)
                dst.sendall(chunk)
            if buf:
                dst.sendall(buf)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            client = src if upstream else dst
            for s in (client,) if state.get("orphaned") else (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _lose_message(self, state: dict, chunk: bytes) -> bytes:
        """``chunk`` without the bytes of the message that holds upstream byte
        ``lose_message_at`` (once, over all connections)."""
        out = bytearray()
        i = 0
        while i < len(chunk):
            if not state.get("left"):  # at a frame header, or inside one
                head = state.get("head", b"") + chunk[i : i + 4 - len(state.get("head", b""))]
                i += len(head) - len(state.get("head", b""))
                state["head"] = head
                if len(head) < 4:
                    break
                start = state.get("pos", 0)
                state["left"] = int.from_bytes(head[1:4], "big")
                state["pos"] = start + 4 + state["left"]
                with self._lock:
                    at = self.lose_message_at
                    state["losing"] = (
                        not self.lost_messages and at is not None and start <= at < state["pos"]
                    )
                    if state["losing"]:
                        self.lost_messages += 1
                if not state["losing"]:
                    out += head
                state["head"] = b""
                continue
            take = min(state["left"], len(chunk) - i)
            if not state["losing"]:
                out += chunk[i : i + take]
            state["left"] -= take
            i += take
        return bytes(out)

    def _rewrite(self, line: bytes) -> bytes:
        m = _PASV.match(line)
        if not m:
            return line
        port = int(m.group(5)) * 256 + int(m.group(6))
        mine = self._listen(port, data=True, once=True)
        return b"227 Entering Passive Mode (127,0,0,1,%d,%d)." % (mine >> 8, mine & 255)

    def drop_now(self) -> None:
        """Reset every open connection (control and data) like a broken network would."""
        with self._lock:
            socks, self._socks = self._socks, []
            self.dropped += 1
        for s in socks:
            _rst(s)

    def stop(self) -> None:
        """The server goes away: open connections are reset and new ones refused."""
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for lst in listeners:
            try:
                # wakes the thread blocked in accept(); close() alone would leave the
                # socket listening until that accept() returned
                lst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lst.close()
        self.drop_now()

    def start(self) -> None:
        """The server is back, on the same port."""
        self._listen(self.target_port, data=not self.ftp, port=self.port)

    def stall(self) -> None:
        """Stop passing anything to the server; connections stay open (a hung server)."""
        self._stall_all = True
        self.stalled.set()

    def close(self) -> None:
        self._closed.set()
        for s in self._listeners + self._socks + self._orphans:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> DropProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
