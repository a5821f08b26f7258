"""The newc writer, checked against GNU cpio (listing and extraction)."""

from __future__ import annotations

import io
import os
import stat
import subprocess

from initramfs import cpio


def _archive() -> cpio.Archive:
    arc = cpio.Archive(mtime=1_700_000_000)
    arc.add_file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    arc.add_file("etc/empty", b"")
    arc.add_file("etc/odd", b"x" * 5)  # exercises data padding
    arc.add_symlink("bin", "usr/bin")
    arc.add_chardev("dev/console", 5, 1)
    arc.add_dir("tmp", 0o1777)
    return arc


def test_header_is_110_bytes_and_name_padded():
    head = cpio.regular("abc", b"").header(1)
    assert head.startswith(b"070701")
    assert len(head) % 4 == 0
    assert head[cpio.HEADER_SIZE : cpio.HEADER_SIZE + 4] == b"abc\0"


def test_parents_come_first_and_listing_matches_gnu_cpio(tmp_path):
    arc = _archive()
    names = [m.name for m in arc.members()]
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")
    buf = io.BytesIO()
    size = arc.write(buf)
    assert size == len(buf.getvalue()) and size % 4 == 0
    out = subprocess.run(
        ["cpio", "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    )
    assert out.stdout.decode().split() == names


def test_gnu_cpio_extracts_what_we_wrote(tmp_path):
    buf = io.BytesIO()
    _archive().write(buf)
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=buf.getvalue(),
        cwd=tmp_path,
        check=True,
    )
    tool = tmp_path / "usr/bin/tool"
    assert tool.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert tool.stat().st_mtime == 1_700_000_000
    assert (tmp_path / "etc/odd").read_bytes() == b"xxxxx"
    assert os.readlink(tmp_path / "bin") == "usr/bin"
    st = (tmp_path / "dev/console").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 5 and os.minor(st.st_rdev) == 1
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777


def test_output_is_reproducible():
    a, b = io.BytesIO(), io.BytesIO()
    _archive().write(a)
    _archive().write(b)
    assert a.getvalue() == b.getvalue()
