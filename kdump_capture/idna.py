"""The ``idna`` codec for ASCII host names, in capture images that leave the real one out.

``socket.getaddrinfo`` encodes every host name given as a str with the ``idna`` codec. The
standard library's codec imports ``unicodedata`` (1.1 MB) for names that are not ASCII.
The image builder leaves both out when every configured host name is ASCII; this codec,
registered after the standard search function, then answers for ``idna`` exactly as the
standard codec's fast path does for ASCII, and refuses anything else with a clear error.
Where the standard codec exists (any normal installation) it is found first and this one
is never used.
"""

from __future__ import annotations

import codecs

ACE_PREFIX = b"xn--"


def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    if errors != "strict":
        raise UnicodeError(f"unsupported error handling {errors}")
    if not text:
        return b"", 0
    try:
        result = text.encode("ascii")
    except UnicodeEncodeError:
        raise UnicodeError(
            f"host name {text!r} is not ASCII and this capture image has no IDNA support; "
            "use an ASCII name or an address"
        ) from None
    labels = result.split(b".")
    for label in labels[:-1]:
        if not 0 < len(label) < 64:
            raise UnicodeError("label empty or too long")
    if len(labels[-1]) >= 64:
        raise UnicodeError("label too long")
    return result, len(text)


def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
    if errors != "strict":
        raise UnicodeError(f"unsupported error handling {errors}")
    data = bytes(data)
    if ACE_PREFIX in data.lower():
        raise UnicodeError("internationalized host names need the idna codec (not packed)")
    return data.decode("ascii"), len(data)


def _search(name: str) -> codecs.CodecInfo | None:
    if name != "idna":
        return None
    return codecs.CodecInfo(encode, decode, name="idna")


def register() -> None:
    """Make ``idna`` available when the standard codec is not (idempotent)."""
    codecs.unregister(_search)
    codecs.register(_search)
