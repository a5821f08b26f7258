"""kdump_capture.idna: the ``idna`` codec for ASCII host names in images without the real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdump_capture import idna

ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize(
    "name", ["10.0.2.2", "dump-host.example.com", "a" * 63, "x.", "localhost", ""]
)
def test_ascii_names_encode_as_the_standard_codec_does(name):
    import encodings.idna

    assert idna.encode(name) == encodings.idna.Codec().encode(name)
    data = name.encode()
    assert idna.decode(data) == encodings.idna.Codec().decode(data)


@pytest.mark.parametrize("name", ["a" * 64, "a..b", ".a"])
def test_bad_labels_fail_like_the_standard_codec(name):
    import encodings.idna

    with pytest.raises(UnicodeError):
        encodings.idna.Codec().encode(name)
    with pytest.raises(UnicodeError):
        idna.encode(name)


def test_non_ascii_names_are_refused_clearly():
    with pytest.raises(UnicodeError, match="no IDNA support"):
        idna.encode("bücher.example")
    with pytest.raises(UnicodeError):
        idna.decode(b"xn--bcher-kva.example")


def test_stands_in_only_where_the_standard_codec_is_missing():
    """In a process without encodings.idna (as in a capture image), resolving a host name
    fails without the stand-in and works with it; with the real codec, the real one wins."""
    code = (
        "import sys; sys.modules['encodings.idna'] = None\n"
        "import socket\n"
        "try:\n    socket.getaddrinfo('127.0.0.1', 9)\nexcept LookupError as e:\n    print(e)\n"
        "from kdump_capture import idna; idna.register(); idna.register()\n"
        "print(socket.getaddrinfo('127.0.0.1', 9)[0][4])\n"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code],
        capture_output=True,
        text=True,
    )
    assert r.stdout.splitlines() == ["unknown encoding: idna", "('127.0.0.1', 9)"], r.stderr
    idna.register()
    import codecs

    assert codecs.lookup("idna").encode is not idna.encode  # the standard one is found first
