"""The retry helper, its connection-lost predicate and the replay buffer, without I/O."""

from __future__ import annotations

import errno
import ftplib

import pytest

from kdump_capture.errors import AuthError, ConnectionLost, TargetFull, TransportError
from transports.base import TransportSettings
from transports.retry import (
    CannotResume,
    ReplayBuffer,
    is_connection_lost,
    retry_call,
    retry_delays,
)


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (EOFError(), True),
        (TimeoutError("timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (BrokenPipeError(errno.EPIPE, "pipe"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (OSError(errno.EHOSTUNREACH, "no route"), True),
        (OSError(errno.ENETUNREACH, "net unreachable"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (OSError(errno.ENOSPC, "full"), False),
        (OSError(errno.EACCES, "denied"), False),
        (OSError("no errno"), False),
        (ftplib.error_temp("421 Service not available, closing control connection"), True),
        (ftplib.error_temp("426 Connection closed; transfer aborted"), True),
        (ftplib.error_temp("425 Can't open data connection"), True),
        (ftplib.error_temp("450 File unavailable"), False),
        (ftplib.error_perm("530 Login incorrect"), False),
        (ftplib.error_perm("552 Exceeded storage allocation"), False),
        (ConnectionLost("x"), True),
        (CannotResume("x"), False),
        (AuthError("x"), False),
        (TargetFull("x"), False),
        (TransportError("x"), False),
        (ValueError("x"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_connection_lost(exc, lost):
    assert is_connection_lost(exc) is lost


def _settings(retries=3, delay=1.0) -> TransportSettings:
    return TransportSettings(retries=retries, retry_delay=delay)


def test_retry_delays_bounded():
    assert retry_delays(_settings(5, 1.0)) == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert retry_delays(_settings(0, 1.0)) == []


def test_retry_call_recovers_after_reconnect():
    calls, reconnects, slept = [], [], []

    def op():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    r = retry_call(op, lambda: reconnects.append(1), _settings(), "op", sleep=slept.append)
    assert r == "ok" and len(calls) == 3 and len(reconnects) == 2 and slept == [1.0, 2.0]


def test_retry_call_gives_up_with_connection_lost():
    slept = []

    def op():
        raise EOFError()

    with pytest.raises(ConnectionLost, match="2 retries failed"):
        retry_call(op, lambda: None, _settings(2), "op", sleep=slept.append)
    assert len(slept) == 2


@pytest.mark.parametrize("exc", [AuthError("denied"), TargetFull("full"), ValueError("bug")])
def test_retry_call_never_retries_other_errors(exc):
    calls = []

    def op():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        retry_call(op, lambda: None, _settings(), "op", sleep=lambda d: None)
    assert calls == [1]


def test_retry_call_auth_error_on_reconnect_propagates():
    def reconnect():
        raise AuthError("host key changed")

    with pytest.raises(AuthError):
        retry_call(
            lambda: None, reconnect, _settings(), "op", first_error=EOFError(), sleep=lambda d: 0
        )


def test_retry_call_first_error_reconnects_first():
    order = []
    retry_call(
        lambda: order.append("op"),
        lambda: order.append("reconnect"),
        _settings(),
        "op",
        first_error=EOFError(),
        sleep=lambda d: None,
    )
    assert order == ["reconnect", "op"]


def test_replay_buffer_since():
    buf = ReplayBuffer(limit=10)
    buf.add(0, b"abcd")
    buf.add(4, memoryview(b"efgh"))
    assert [(o, bytes(v)) for o, v in buf.since(2)] == [(2, b"cdefgh")]
    assert buf.since(8) == []
    buf.add(8, b"ijkl")  # 12 bytes > 10: the oldest record goes; "kl" wraps around
    assert buf.dropped and buf.start == 4 and buf.end == 12
    # Ranges adjacent in the stream and in the ring come back merged.
    assert [(o, bytes(v)) for o, v in buf.since(5)] == [(5, b"fghij"), (10, b"kl")]
    with pytest.raises(CannotResume):
        buf.since(3)  # older than anything held
    with pytest.raises(CannotResume):
        buf.since(13)  # the server claims more than we sent
    buf.clear()
    assert not buf.dropped and buf.all() == []


def test_replay_buffer_copies():
    data = bytearray(b"1234")
    buf = ReplayBuffer()
    buf.add(0, memoryview(data))
    data[:] = b"xxxx"  # the engine reuses its buffers
    assert buf.all() == [(0, b"1234")]


def test_replay_buffer_ring_stays_bounded():
    buf = ReplayBuffer(limit=8)
    for i in range(10):
        buf.add(i * 3, bytes([i]) * 3)
        assert buf.held <= 8
    assert buf.end == 30 and buf.start == 24
    assert b"".join(bytes(v) for _, v in buf.since(25)) == b"\x08\x08\x09\x09\x09"
    buf.add(30, b"x" * 20)  # larger than the ring: only the tail is kept
    assert buf.held == 8 and buf.start == 42 and buf.end == 50
    assert [bytes(v) for _, v in buf.since(42)] == [b"x" * 8]
