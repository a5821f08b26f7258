"""Fuzz targets: the crash summary of a kernel log, and the age decryptor (issue 11).

Both read what a crashed kernel or a shared target hands us: any bytes. The summary must
never raise, print only printable ASCII within its bounds and survive a manifest round
trip; the decryptor may only refuse with a KdumpError.
"""

from __future__ import annotations

import io
import os

from kdump_capture.age import (
    Decryptor,
    Recipient,
    _identity_from_x25519,
    _x25519_base,
    encrypt_bytes,
)
from kdump_capture.summary import FRAMES, MAX_FIELD, CrashSummary, summarize


def _summary(data: bytes) -> None:
    for s in (summarize(data), summarize(data.decode("utf-8", "surrogateescape"))):
        text = s.text()
        assert all(" " <= c <= "~" or c == "\n" for c in text), "unprintable output"
        assert len(s.trace) <= FRAMES
        for v in (s.headline, s.panic, s.rip, s.taint, s.release, s.comm):
            assert v is None or len(v) <= MAX_FIELD
        assert CrashSummary.from_dict(s.as_dict()) == s, "manifest round trip changed it"


# A fixed identity: the fuzzer explores the header and payload parsers, not key generation.
_SECRET = bytes(range(1, 33))


def _age(data: bytes) -> None:
    f = io.BufferedReader(io.BytesIO(data))
    dec = Decryptor(f, [_identity_from_x25519(_SECRET)], "fuzz.age")
    for _ in dec.chunks():
        pass


def seed_age() -> bytes:
    """A valid file for _SECRET (used to make the seed corpus)."""
    return encrypt_bytes(os.urandom(100), [Recipient("X25519", "", _x25519_base(_SECRET))])


TARGETS = {"summary": _summary, "age_decrypt": _age}
