"""SMB2 WRITE requests framed, signed and sent without copying the payload.

smbprotocol packs every request into one bytes object and then copies it again for the
signature, the NetBIOS frame and each partial ``send``: about eight copies of a 4 MiB
WRITE, which on loopback cost more than the rest of the upload. Here the 116 bytes in
front of the payload are packed with ``struct``, the signature is computed over header
and payload without joining them, and one ``sendmsg`` hands both to the kernel.

Everything else stays smbprotocol's: message ids and credits come from its sequence
window under its lock, the reply is matched by its receive thread to the ``Request``
registered here, and encrypted sessions or trees use its own (encrypting) send path.
Written against smbprotocol 1.x (``Connection.sequence_window``, ``outstanding_requests``,
``transport._sock``); ``tests/test_transports_*`` exercise it against a real Samba.
"""

from __future__ import annotations

import hashlib
import hmac
import select
import socket
import struct

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from smbprotocol import MAX_PAYLOAD_SIZE, Dialects
from smbprotocol.connection import Connection, Request, SigningAlgorithms
from smbprotocol.exceptions import SMBException
from smbprotocol.header import Commands, Smb2Flags, SMB2HeaderRequest
from smbprotocol.open import Open, SMB2WriteRequest

# MS-SMB2 2.1: Direct TCP transport, a zero byte then the 24-bit message length.
NBSS = struct.Struct(">I")
# MS-SMB2 2.2.1.2: SMB2 sync header; the signature is the last 16 bytes.
SMB2_HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
# MS-SMB2 2.2.21: WRITE request up to its Buffer field.
WRITE_REQUEST = struct.Struct("<HHIQ16sIIHHI")
assert NBSS.size == 4 and SMB2_HEADER.size == 64 and WRITE_REQUEST.size == 48
SIGNATURE_AT = NBSS.size + 48  # where the signature sits in our frame
PREFIX = NBSS.size + SMB2_HEADER.size + WRITE_REQUEST.size


def signature(conn: Connection, key: bytes, message_id: int, parts: list) -> bytes:
    """MS-SMB2 3.1.4.1 over a request split in ``parts`` (signature field zeroed)."""
    if conn.dialect >= Dialects.SMB_3_1_1 and conn.signing_algorithm_id is not None:
        algo = conn.signing_algorithm_id
    elif conn.dialect >= Dialects.SMB_3_0_0:
        algo = SigningAlgorithms.AES_CMAC
    else:
        algo = SigningAlgorithms.HMAC_SHA256
    if algo == SigningAlgorithms.AES_GMAC:
        # Nonce: message id, then 4 bytes of flags (0: a request, not a cancel).
        nonce = message_id.to_bytes(8, "little") + bytes(4)
        gmac = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        for p in parts:
            gmac.authenticate_additional_data(p)
        gmac.finalize()
        return gmac.tag
    if algo == SigningAlgorithms.AES_CMAC:
        mac = cmac.CMAC(algorithms.AES(key))
        for p in parts:
            mac.update(p)
        return mac.finalize()
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()[:16]


def post_write(
    fd: Open, offset: int, data: memoryview, credit_request: int, timeout: float
) -> Request:
    """Send one WRITE of ``data`` at ``offset``; the reply comes through ``receive``.

    A send that makes no progress for ``timeout`` seconds raises ``socket.timeout``.

    ``data`` is only read while this runs (the kernel has it when ``sendmsg`` returns).
    """
    conn = fd.connection
    tree = fd.tree_connect
    session = tree.session
    if session.encrypt_data or tree.encrypt_data:
        msg, _ = fd.write(bytes(data), offset=offset, send=False)
        return conn.send(
            msg,
            sid=session.session_id,
            tid=tree.tree_connect_id,
            credit_request=credit_request,
        )
    n = len(data)
    charge = (max(n, 1) - 1) // MAX_PAYLOAD_SIZE + 1 if conn.supports_multi_credit else 0
    with conn.sequence_lock:
        window = conn.sequence_window
        if charge > window["high"] - window["low"]:
            raise SMBException(
                f"WRITE needs {charge} credits but only "
                f"{window['high'] - window['low']} are available"
            )
        message_id = window["low"]
        window["low"] += charge or 1
    sign = bool(session.signing_required and session.signing_key)
    flags = Smb2Flags.SMB2_FLAGS_SIGNED if sign else 0
    if tree.is_dfs_share:
        flags |= Smb2Flags.SMB2_FLAGS_DFS_OPERATIONS
    frame = bytearray(PREFIX)
    NBSS.pack_into(frame, 0, PREFIX - NBSS.size + n)
    SMB2_HEADER.pack_into(
        frame, NBSS.size, b"\xfeSMB", 64, charge, 0, Commands.SMB2_WRITE,
        credit_request or charge, flags, 0, message_id, 0, tree.tree_connect_id,
        session.session_id, bytes(16),
    )  # fmt: skip
    # Structure size 49 (the 48 fixed bytes plus a 1-byte Buffer), data right after it.
    WRITE_REQUEST.pack_into(
        frame, NBSS.size + SMB2_HEADER.size, 49, PREFIX - NBSS.size, n, offset, fd.file_id,
        0, 0, 0, 0, 0,
    )  # fmt: skip
    if sign:
        parts = [memoryview(frame)[NBSS.size :], data]
        frame[SIGNATURE_AT : SIGNATURE_AT + 16] = signature(
            conn, session.signing_key, message_id, parts
        )
    # What smbprotocol's receive thread and ``receive`` look up; no payload kept.
    header = SMB2HeaderRequest()
    header["credit_charge"] = charge
    header["command"] = Commands.SMB2_WRITE
    header["credit_request"] = credit_request or charge
    header["message_id"] = message_id
    header["tree_id"] = tree.tree_connect_id
    header["session_id"] = session.session_id
    request = Request(header, SMB2WriteRequest, conn, session_id=session.session_id)
    conn.outstanding_requests[message_id] = request
    conn._check_worker_running()
    with conn.transport._sock_lock:
        _sendall(conn.transport._sock, frame, data, timeout)
    return request


def _sendall(sock: socket.socket, head: bytearray, data: memoryview, timeout: float) -> None:
    """sendmsg both parts without blocking forever: smbprotocol's socket has no timeout, so
    wait for writability with ``select`` and give up after ``timeout`` without progress."""
    bufs = [memoryview(head), data]
    while bufs:
        try:
            n = sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        while n and bufs:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0
        if bufs:
            _, writable, _ = select.select([], [sock], [], timeout)
            if not writable:
                raise TimeoutError(f"SMB send made no progress for {timeout:.0f} s")
