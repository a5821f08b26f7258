"""The runtime collector's computations: imports found in source, codecs used by name."""

from __future__ import annotations

from initramfs import runtime


def test_codec_modules_found_from_literals(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import codecs\n"
        "a = 'x'.encode('utf-16-le')\n"
        "b = b'x'.decode(encoding='latin1')\n"
        "def f(data, encoding='UTF-32'):\n    return data\n"
        "c = codecs.lookup('koi8_r')\n"
        "d = 'x'.encode(name)  # not a literal: unknown\n"
        "e = 'x'.encode('no-such-codec')\n"
        "print('utf_7')  # not an encoding argument\n"
    )
    assert runtime.codec_modules([str(src)]) == {
        "encodings.utf_16_le",
        "encodings.latin_1",
        "encodings.utf_32",
        "encodings.koi8_r",
    }


def test_entry_modules_only_the_targets_transport():
    mods = set(runtime.entry_modules(["file"]))
    assert {"transports.file", "transports.base", "kdump_capture.cli", "ctypes"} <= mods
    assert not {m for m in mods if m.startswith(("transports.sftp", "paramiko"))}
    assert "kdump_capture.__main__" not in mods  # importing it would run the CLI
    sftp = set(runtime.entry_modules(["sftp"]))
    assert "transports.sftp" in sftp and "paramiko" in sftp
    assert "transports.ftp" not in sftp
