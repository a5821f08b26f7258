"""The runtime collector's computations: imports found in source, codecs used by name."""

from __future__ import annotations

import os
import sys

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


def test_sftp_runtime_leaves_out_hashlib_and_system_libcrypto(tmp_path):
    """cryptography brings its own OpenSSL; the system libcrypto would add 4.7 MB."""
    sftp = runtime.collect(["sftp"], str(tmp_path))
    names = [os.path.basename(p) for p in sftp.files]
    assert not [n for n in names if n.startswith("_hashlib")]
    assert not [n for n in names if n.startswith("libcrypto.so")]
    # hashlib's builtin SHA-256 is packed instead (or compiled into the interpreter)
    assert [n for n in names if n.startswith("_sha256")] or "_sha256" in sys.builtin_module_names
    # a local target keeps OpenSSL's fast SHA-256 for the manifest
    local = runtime.collect(["file"], str(tmp_path))
    assert [p for p in local.files if os.path.basename(p).startswith("_hashlib")]


def test_pure_modules_move_into_the_zip(tmp_path):
    """stdlib and pure packages go deflated into python3XY.zip; a package with an extension
    module stays on disk whole (its __path__ must find the .so); so do os.pyc (the landmark)
    and lib-dynload."""
    import io
    import zipfile

    site, std = runtime.DEST_SITE, runtime.DEST_STDLIB
    p = runtime.Payload()
    pyc = b"\x00" * 64
    for dest in (
        f"{std}/os.pyc",
        f"{std}/json/__init__.pyc",
        f"{std}/argparse.pyc",
        f"{site}/paramiko/__init__.pyc",
        f"{site}/kdump_capture/cli.pyc",
        f"{site}/nacl/__init__.pyc",
        f"{site}/nacl/_sodium.abi3.so",
        f"{site}/_cffi_backend.cpython-311-x86_64-linux-gnu.so",
        f"{runtime.DEST_DYNLOAD}/zlib.cpython-311-x86_64-linux-gnu.so",
    ):
        p.add(dest, pyc)
    assert runtime.zip_pure_modules(p) == 4
    with zipfile.ZipFile(io.BytesIO(p.files[runtime.PYZIP])) as z:
        assert sorted(z.namelist()) == [
            "argparse.pyc",
            "json/__init__.pyc",
            "kdump_capture/cli.pyc",
            "paramiko/__init__.pyc",
        ]
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    assert f"{std}/os.pyc" in p.files and f"{site}/nacl/__init__.pyc" in p.files
    assert f"{site}/paramiko/__init__.pyc" not in p.files


def test_the_compiled_accelerator_is_packed_with_its_zlib(tmp_path):
    """kdump_capture.speedups imports _speedups: the probe loads it, ldd finds libz, and
    libzstd and liblzo2 when the accelerator was built against them (zstd_pages, lzo_pages)."""
    from kdump_capture import speedups

    payload = runtime.collect(["file"], str(tmp_path))
    names = [os.path.basename(p) for p in payload.files]
    assert [n for n in names if n.startswith("_speedups.") and n.endswith(".so")]
    assert "libz.so.1" in names
    assert ("libzstd.so.1" in names) == hasattr(speedups.module(), "zstd_pages")
    assert ("liblzo2.so.2" in names) == hasattr(speedups.module(), "lzo_pages")


def test_cryptography_only_when_encryption_is_on(tmp_path):
    """age (and decrypt, which imports it) pull cryptography, 11 MiB unpacked: a file image
    without KDUMP_ENCRYPT_TO must not carry it ("from .age import X" names age.X too)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = runtime.collect(["file"], str(tmp_path / "a"))
    assert not [d for d in plain.files if "/cryptography/" in d or "/age.pyc" in d]
    enc = runtime.collect(["file"], str(tmp_path / "b"), features=("encrypt",))
    assert [d for d in enc.files if "/cryptography/" in d]


def test_the_save_imports_measured_include_the_configured_features(tmp_path):
    """`estimate` adds what the builder measured the save's imports to take: with
    KDUMP_ENCRYPT_TO the save imports `cryptography` too (about 3 MiB more here), and the
    figure left it out: a file target with encryption was estimated at 112M, where the
    capture kernel did not boot (bench/capture_fitness.py, file:compressed+encrypt)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    payload = runtime.collect(["file"], str(tmp_path / "a"), features=("encrypt",))
    plain = runtime.measure_save_imports(payload, ["file"], "compressed", str(tmp_path / "a"))
    enc = runtime.measure_save_imports(
        payload, ["file"], "compressed", str(tmp_path / "b"), features=("encrypt",)
    )
    assert enc[1] - plain[1] > 1 << 20, (plain, enc)
