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
    assert [(o, bytes(v)) for o, v in buf.since(2)] == [(2, b"cd"), (4, b"efgh")]
    assert buf.since(8) == []
    buf.add(8, b"ijkl")  # 12 bytes > 10: the oldest record goes
    assert buf.dropped and buf.start == 4 and buf.end == 12
    assert [(o, bytes(v)) for o, v in buf.since(5)] == [(5, b"fgh"), (8, b"ijkl")]
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
