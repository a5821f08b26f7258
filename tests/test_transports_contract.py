"""The transport contract, run against every transport and a real server for each."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from kdump_capture.errors import TransportError
from tests.servers.targets import KINDS, make_target
from transports.base import DIR_MODE, FILE_MODE, TMP_PREFIX, is_temp_name

MiB = 1 << 20


@pytest.fixture(params=KINDS)
def target(request):
    return make_target(request.param, request)


@pytest.fixture
def tr(target):
    with target.transport() as t:
        yield t


def _files(target) -> list[str]:
    return target.files()


def _upload(tr, relpath: str, data: bytes, piece: int = MiB):
    with tr.create(relpath) as sink:
        view = memoryview(data)
        for i in range(0, len(data), piece):
            sink.write(view[i : i + piece])
        return sink.commit()


def test_connect_creates_root_0700(target, tr):
    assert tr.listdir() == []
    if target.kind == "s3":  # no directories in S3: the prefix appears with the first file
        return
    assert stat.S_IMODE(os.stat(target.server_dir).st_mode) == DIR_MODE


def test_commit_makes_file_visible(target, tr):
    tr.makedir("d")
    data = os.urandom(3 * MiB + 17)
    with tr.create("d/vmcore") as sink:
        sink.write(data[:MiB])
        sink.write(memoryview(data)[MiB:])
        assert tr.listdir("d") == []  # the temporary name is hidden
        if target.kind == "s3":  # nothing under the final key before the upload completes
            assert _files(target) == []
        else:
            assert [n for n in _files(target) if is_temp_name(os.path.basename(n))]
        info = sink.commit()
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    [entry] = tr.listdir("d")
    assert (entry.name, entry.is_dir, entry.size) == ("vmcore", False, len(data))
    assert _files(target) == ["d/vmcore"]
    assert b"".join(tr.read("d/vmcore")) == data


def test_abort_leaves_nothing(target, tr):
    with tr.create("dmesg.txt") as sink:
        sink.write(b"x" * 100_000)
        sink.abort()
    with tr.create("other") as sink:
        sink.write(b"y" * 1000)  # leaving the block uncommitted aborts too
    assert _files(target) == []
    assert tr.listdir() == []


def test_makedir_listdir_and_exists(tr):
    tr.makedir("a")
    tr.makedir("a/b")
    with pytest.raises(FileExistsError):
        tr.makedir("a")
    _upload(tr, "a/f", b"hello")
    assert [(e.name, e.is_dir) for e in tr.listdir("a")] == [("b", True), ("f", False)]
    assert tr.listdir("missing") == []


def test_remove_tree(target, tr):
    tr.makedir("old")
    tr.makedir("old/sub")
    _upload(tr, "old/sub/f", b"1" * 5000)
    _upload(tr, "old/g", b"2")
    # A temporary file a crashed earlier run left behind: rotation must remove it too.
    if target.kind == "s3":  # there: an unfinished multipart upload with a part
        c, key = target.s3.client(), f"{target.server_dir}/old/vmcore"
        up = c.create_multipart_upload(Bucket=target.s3.bucket, Key=key)["UploadId"]
        c.upload_part(Bucket=target.s3.bucket, Key=key, UploadId=up, PartNumber=1, Body=b"x")
        assert target.s3.uploads(f"{target.server_dir}/") == [key]
    else:
        with open(os.path.join(target.server_dir, "old", TMP_PREFIX + "stale.1234"), "wb") as f:
            f.write(b"never committed")
    tr.remove_tree("old")
    tr.remove_tree("old")  # already gone: fine
    assert tr.listdir() == []
    if target.kind == "s3":
        assert target.s3.keys(f"{target.server_dir}/") == []
        assert target.s3.uploads(f"{target.server_dir}/") == []
    else:
        assert not os.path.exists(os.path.join(target.server_dir, "old"))


def test_free_space(target, tr):
    free = tr.free_space()
    if target.kind in ("ftp", "vsftpd", "s3"):
        assert free is None
    else:
        assert isinstance(free, int) and free > 0


def test_modes_on_server(target, tr):
    tr.makedir("d")
    _upload(tr, "d/f", b"secret memory")
    if target.kind == "s3":  # no modes: the object must not be readable without our keys
        import urllib.error
        import urllib.request

        s3 = target.s3
        url = f"http://{s3.host}:{s3.port}/{s3.bucket}/{target.server_dir}/d/f"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 403
        return
    assert stat.S_IMODE(os.stat(os.path.join(target.server_dir, "d")).st_mode) == DIR_MODE
    assert stat.S_IMODE(os.stat(os.path.join(target.server_dir, "d/f")).st_mode) == FILE_MODE


def test_seek_rewrites_header(target, tr):
    if target.kind in ("ftp", "vsftpd", "s3"):
        with tr.create("stream") as sink:
            assert not sink.seekable  # FTP and S3 stream; the engine never seeks then
            with pytest.raises(TransportError):
                sink.seek(0)
        return
    body = os.urandom(2 * MiB)
    with tr.create("dump") as sink:
        sink.write(b"\0" * 4096)
        sink.write(body)
        sink.seek(0)
        sink.write(b"H" * 4096)
        info = sink.commit()
    expect = b"H" * 4096 + body
    assert info.size == len(expect)
    assert info.sha256 == hashlib.sha256(expect).hexdigest()
    assert b"".join(tr.read("dump")) == expect


def test_stream_64mib_sha256(target, tr):
    data = os.urandom(64 * MiB)
    info = _upload(tr, "big", data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(target.read_back("big")).hexdigest() == info.sha256
