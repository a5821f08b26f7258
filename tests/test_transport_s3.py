"""The S3 transport against a real SeaweedFS (signatures checked): parts, faults, the CLI."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kdump_capture import memory
from kdump_capture.errors import AuthError, ConnectionLost, TargetSettingError, TransportError
from kdump_capture.urls import parse_target
from tests.helpers import cli
from tests.servers.http_fault import ErrorProxy
from tests.servers.proxy import DropProxy
from tests.servers.s3 import identity, make_tls, seaweed
from tests.servers.targets import SETTINGS, make_target
from transports import open_transport
from transports.s3 import _Signer

MiB = 1 << 20
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _upload(tr, name: str, data: bytes) -> object:
    with tr.create(name) as sink:
        view = memoryview(data)
        for i in range(0, len(data), MiB):
            sink.write(view[i : i + MiB])
        return sink.commit()


def _via(target, port: int):
    return target.via_port(port)


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, expected, plan",
    [
        (16 * MiB, 0, (8 * MiB, 2)),  # the default budget: two 8 MiB parts, one in flight
        (16 * MiB, 80 * 10**9, (8 * MiB, 2)),  # 80 GB still fits 10,000 parts of 8 MiB
        (10 * MiB, 0, (5 * MiB, 2)),
        (7 * MiB, 0, (7 * MiB, 1)),  # a small capture kernel: one buffer
        (4 * MiB, 0, (memory.S3_MIN_PART, 1)),  # never below S3's 5 MiB minimum
        (16 * MiB, 200 * 2**30, (21 * MiB, 1)),  # 200 GiB: parts grow to stay <= 10,000
        (4 * MiB, 2**40, (105 * MiB, 1)),
    ],
)
def test_part_plan(budget, expected, plan):
    assert memory.s3_part_plan(budget, expected) == plan
    part, _ = plan
    assert expected <= part * memory.S3_MAX_PARTS


def test_signer_signs_as_botocore_does():
    """Our signer is botocore's with its own clock: at offset 0 the headers are identical."""
    creds = Credentials("AKID", "secret/key")
    for _ in range(5):  # the two may straddle a second boundary: try again then
        a = AWSRequest("PUT", "http://127.0.0.1:9000/b/k%20x?partNumber=1&uploadId=u", data=b"x")
        b = AWSRequest("PUT", "http://127.0.0.1:9000/b/k%20x?partNumber=1&uploadId=u", data=b"x")
        S3SigV4Auth(creds, "s3", "us-east-1").add_auth(a)
        _Signer(creds, "us-east-1").add_auth(b)
        if a.headers["X-Amz-Date"] == b.headers["X-Amz-Date"]:
            break
    assert dict(a.headers) == dict(b.headers)
    signer = _Signer(creds, "us-east-1")
    signer.offset = -7200
    c = AWSRequest("GET", "http://h/b", data=b"")
    signer.add_auth(c)
    stamp = datetime.datetime.strptime(c.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    lag = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - stamp
    assert 7190 < lag.total_seconds() < 7210


# -- multipart uploads ------------------------------------------------------------------------


def test_multipart_upload_is_exact_and_leaves_no_parts(request):
    target = make_target("s3", request)
    data = os.urandom(21 * MiB + 5)  # two full 8 MiB parts and a short last one
    with target.transport() as tr:
        info = _upload(tr, "vmcore", data)
    assert info.digest == hashlib.sha256(data).hexdigest()
    assert target.read_back("vmcore") == data
    assert target.s3.uploads(target.server_dir + "/") == []


def test_one_buffer_when_memory_is_short(request):
    target = make_target("s3", request)
    data = os.urandom(12 * MiB)
    with target.transport(replay_bytes=4 * MiB) as tr:
        info = _upload(tr, "vmcore", data)
    assert info.size == len(data) and target.read_back("vmcore") == data


def test_abort_removes_the_multipart_upload(request):
    target = make_target("s3", request)
    with target.transport() as tr:
        with tr.create("vmcore") as sink:
            sink.write(os.urandom(20 * MiB))  # two parts went up
            assert target.s3.uploads(target.server_dir + "/")
            sink.abort()
    assert target.s3.uploads(target.server_dir + "/") == []
    assert target.files() == []


def test_rotation_never_strands_the_parts_of_an_unfinished_upload(request, caplog):
    """A save killed mid-vmcore leaves a multipart upload in its dump directory. Rotation
    aborted it after deleting the directory's objects: when that failed (the store busy, the
    run killed), the directory was gone from listings and its parts (up to the whole vmcore)
    stayed on the store for good, paid for, found by no later run. Now the uploads go first.
    A key that may not list uploads still deletes the objects, and says who removes parts."""
    target = make_target("s3", request)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    top = target.server_dir + "/"

    def killed_save(name: str):
        with target.transport() as tr:
            tr.makedir(name)
            sink = tr.create(f"{name}/vmcore")
            sink.write(os.urandom(20 * MiB))  # parts went up; the run dies here
        return sink

    def uploads_listing(method: str, request_target: str) -> bool:
        return method == "GET" and "uploads=" in request_target

    name = "host-2026-01-01-00-00-00"
    sink = killed_save(name)
    assert target.s3.uploads(top)
    with ErrorProxy(port, uploads_listing) as proxy:
        with _via(target, proxy.port).transport(retry_delay=0.01) as tr:
            with pytest.raises(ConnectionLost):
                tr.remove_tree(name)
    with target.transport() as tr:
        assert [e.name for e in tr.listdir("")] == [name]  # the next run finds it again
        tr.remove_tree(name)
    assert target.s3.uploads(top) == [] and target.s3.keys(top) == []
    sink.abort()

    sink = killed_save(name)
    with ErrorProxy(port, uploads_listing, 403, "AccessDenied") as proxy:
        with _via(target, proxy.port).transport() as tr:
            tr.remove_tree(name)
    assert target.s3.keys(top) == [] and target.s3.uploads(top)
    assert "AbortIncompleteMultipartUpload" in caplog.text
    sink.abort()


@pytest.mark.parametrize("scheme", ["s3+http", "s3"])
def test_a_part_that_takes_longer_than_the_timeout_to_send_is_not_a_failure(scheme, request):
    """The timeout bounds each wait, not a whole part: Python bounds one sendall (and one
    SSL write) as a whole, so on a link slower than a part per KDUMP_NET_TIMEOUT (8 MiB per
    30 s: 2.2 Mbit/s; a 1 TiB machine's 105 MiB parts: 29 Mbit/s) every part timed out,
    again on each retry, and the dump was lost. Here 12 MiB parts at 2 MB/s, timeout 3 s."""
    target = make_target("s3", request)
    if scheme == "s3":
        target = replace(
            target,
            url=target.s3.https_url(target.server_dir),
            settings=target.settings.replace(extra={"s3_ca_bundle": target.s3.ca_file}),
        )
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    data = os.urandom(13 * MiB)
    with DropProxy(port, rate=2_000_000) as proxy:
        with _via(target, proxy.port).transport(timeout=3.0, replay_bytes=24 * MiB) as tr:
            assert tr.parts == (12 * MiB, 2)
            info = _upload(tr, "vmcore", data)
    assert info.size == len(data) and target.read_back("vmcore") == data
    assert proxy.upstream < len(data) + MiB  # no part sent twice


@pytest.mark.parametrize("percent", [1, 50, 99])
def test_drop_costs_at_most_one_part(percent, request):
    """A connection dropped at 1/50/99% of the upload: only the part in flight is resent."""
    target = make_target("s3", request)
    data = os.urandom(40 * MiB)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port, drop_after=len(data) * percent // 100, drops=1) as proxy:
        with _via(target, proxy.port).transport() as tr:
            info = _upload(tr, "vmcore", data)
        assert proxy.dropped == 1
        # everything crossed once, plus at most one 8 MiB part again (and request headers)
        assert proxy.upstream - len(data) <= 8 * MiB + 64 * 1024, proxy.upstream
    assert info.digest == hashlib.sha256(data).hexdigest()
    assert target.read_back("vmcore") == data
    assert target.s3.uploads(target.server_dir + "/") == []


def test_drops_beyond_retries_raise(request, caplog):
    """Every reconnect fails: ConnectionLost, nothing published, and the log says the parts
    stay until the next dump to this target removes them (test_server_down_beyond...)."""
    target = make_target("s3", request)
    target = replace(target, settings=target.settings.replace(retries=2, retry_delay=0.01))
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port, drop_after=12 * MiB, dead_after_drop=True) as proxy:
        with _via(target, proxy.port).transport() as tr:
            with pytest.raises(ConnectionLost):
                _upload(tr, "vmcore", os.urandom(32 * MiB))
    assert target.files() == []
    assert "could not abort the upload" in caplog.text


def _part(request_target: str) -> int | None:
    """The part number of an UploadPart request (None for other requests)."""
    m = re.search(r"[?&]partNumber=(\d+)", request_target)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
def test_store_errors_are_retried_and_the_upload_completes(status, code, request, caplog):
    """The store answers the second part's first two attempts with 500 InternalError or
    503 SlowDown, which S3 asks clients to retry: the part goes again after the retry delay,
    the object is exact, and no upload is left behind."""
    target = make_target("s3", request)
    target = replace(target, settings=target.settings.replace(retries=3, retry_delay=0.01))
    data = os.urandom(20 * MiB)  # three parts of 8 MiB at most
    tries = {"n": 0}

    def fail(method: str, request_target: str) -> bool:
        if method == "PUT" and _part(request_target) == 2:
            tries["n"] += 1
            return tries["n"] <= 2
        return False

    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with ErrorProxy(port, fail, status, code) as proxy, caplog.at_level(logging.WARNING):
        with _via(target, proxy.port).transport() as tr:
            info = _upload(tr, "vmcore", data)
    assert [_part(t) for _, t in proxy.answered] == [2, 2]
    assert tries["n"] == 3  # the third attempt reached the store
    assert info.digest == hashlib.sha256(data).hexdigest()
    assert target.read_back("vmcore") == data
    assert target.s3.uploads(target.server_dir + "/") == []
    assert f"the store failed ({code}: injected by the test proxy)" in caplog.text
    assert "retry 2 of 3" in caplog.text and "retry 3 of 3" not in caplog.text


def test_a_store_that_keeps_failing_is_a_clear_error(request):
    """Every part fails with 500 InternalError (as SeaweedFS answered with its disk full):
    after the retries, ConnectionLost naming the part and the store's error, and not
    claiming to retry any more; nothing published, the multipart upload aborted."""
    target = make_target("s3", request)
    target = replace(target, settings=target.settings.replace(retries=2, retry_delay=0.01))
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])

    def fail(method: str, request_target: str) -> bool:
        return method == "PUT" and _part(request_target) is not None

    with ErrorProxy(port, fail) as proxy:
        with _via(target, proxy.port).transport() as tr:
            with pytest.raises(ConnectionLost) as caught:
                _upload(tr, "vmcore", os.urandom(12 * MiB))
    message = str(caught.value)
    assert "uploading part 1 of" in message and "2 retries failed" in message, message
    assert "the store failed (InternalError: injected by the test proxy)" in message, message
    assert "retrying" not in message, message
    assert len(proxy.answered) == 3  # the first attempt and two retries
    assert target.files() == []
    assert target.s3.uploads(target.server_dir + "/") == []


def _page(*more: str) -> bytes:
    """A ListObjectsV2 page with nothing on it that says more follow (``more``: its token)."""
    token = "".join(f"<NextContinuationToken>{t}</NextContinuationToken>" for t in more)
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>dumps</Name>'
        f"<IsTruncated>true</IsTruncated>{token}</ListBucketResult>"
    ).encode()


@pytest.mark.parametrize(
    "page, says",
    [
        (_page("again"), "sent a continuation token it had sent before, after 2 pages"),
        (_page(), "says the listing goes on but sent no continuation token"),
    ],
    ids=["token-again", "no-token"],
)
def test_a_listing_whose_pages_never_end_is_an_error(page, says, request):
    """A store that hands out the same continuation token again: `list` sent 36,000 listing
    requests in 30 s and never ended, a save never got past rotation. One that says more
    follow but gives no token: the listing ended there, a part of it taken for the whole."""
    target = make_target("s3", request)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with target.transport() as tr:
        tr.makedir("host-2026-01-01-00-00-00")

    answered = []

    def listing(method: str, request_target: str) -> bool:  # not connect's max-keys=1
        # the first 50 pages only: the listing then ends, not the test, if nothing stops it
        picked = "list-type=2&max-keys=1000&" in request_target and len(answered) < 50
        if picked:
            answered.append(request_target)
        return picked

    with ErrorProxy(port, listing, status=200, document=page) as proxy:
        with _via(target, proxy.port).transport() as tr:
            with pytest.raises(TransportError, match=says):
                tr.listdir("")
    assert len(answered) <= 2


def test_a_bucket_at_another_endpoint_is_named_and_not_followed(request):
    """AWS answers 301 PermanentRedirect when the bucket lives in another region's endpoint:
    the error said only "must be addressed using the specified endpoint", not which, and
    was exit 6. It names the host to use (path-style: without the bucket) and the region,
    is exit 2 (the target URL is wrong), and nothing is sent anywhere else."""
    target = make_target("s3", request)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    doc = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code>'
        "<Message>The bucket you are attempting to access must be addressed using the "
        "specified endpoint. Please send all future requests to this endpoint.</Message>"
        f"<Endpoint>{target.s3.bucket}.s3.eu-central-1.amazonaws.com</Endpoint></Error>"
    ).encode()
    region = {"x-amz-bucket-region": "eu-central-1"}
    with ErrorProxy(port, lambda m, t: True, 301, document=doc, headers=region) as proxy:
        with pytest.raises(TargetSettingError) as caught:
            _via(target, proxy.port).transport().connect()
    assert caught.value.exit_code == 2
    where = "is at s3.eu-central-1.amazonaws.com (region eu-central-1), not at 127.0.0.1:"
    assert where in str(caught.value), caught.value
    assert "set KDUMP_S3_REGION" in str(caught.value)
    assert len(proxy.answered) == 1  # not retried


# -- reading back (verify) --------------------------------------------------------------------


def _read_via(target, port: int, name: str, **overrides) -> bytes:
    with _via(target, port).transport(**overrides) as tr:
        return b"".join(tr.read(name))


def test_read_resumes_with_a_range_after_drops(request, caplog):
    """The download breaks twice, 10 MiB into each connection: the read goes on from the
    byte it had (a ranged GET), and gives the object's bytes exactly, once."""
    target = make_target("s3", request)
    data = os.urandom(24 * MiB)
    with target.transport() as tr:
        _upload(tr, "vmcore", data)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port, drop_down_after=10 * MiB, drops=2) as proxy:
        with caplog.at_level(logging.WARNING):
            got = _read_via(target, proxy.port, "vmcore")
        assert proxy.dropped == 2
        # resumed, not restarted: what crossed twice is only what the resets threw away
        # in socket buffers (a restart would have sent 20 MiB again)
        assert proxy.downstream - len(data) < 8 * MiB, proxy.downstream
    assert got == data
    assert caplog.text.count("resuming with a ranged GET") == 2


def test_read_fails_when_the_object_changed_before_the_resume(request):
    """Never a splice of two objects: after the drop the object is another one (same size),
    and the ranged GET, made only for the ETag first read (If-Match), is refused."""
    target = make_target("s3", request)
    data = os.urandom(48 * MiB)
    with target.transport() as tr:
        _upload(tr, "vmcore", data)
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port) as proxy, _via(target, proxy.port).transport() as tr:
        chunks = tr.read("vmcore")
        first = next(chunks)
        key = f"{target.server_dir}/vmcore"
        target.s3.client().put_object(Bucket=target.s3.bucket, Key=key, Body=os.urandom(len(data)))
        proxy.drop_now()
        with pytest.raises(TransportError, match="the object changed while it was read"):
            for chunk in chunks:
                first += chunk
        assert data.startswith(first)


def test_read_resumes_within_the_retries_then_fails(request):
    """Every reconnect fails after the drop: ConnectionLost after the configured retries,
    not a hang and not a short read passed off as the object."""
    target = make_target("s3", request)
    target = replace(target, settings=target.settings.replace(retries=2, retry_delay=0.01))
    with target.transport() as tr:
        _upload(tr, "vmcore", os.urandom(12 * MiB))
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port, drop_down_after=4 * MiB, dead_after_drop=True) as proxy:
        t = time.monotonic()
        with pytest.raises(ConnectionLost, match="2 retries failed"):
            _read_via(target, proxy.port, "vmcore")
        assert time.monotonic() - t < 10
        assert proxy.dropped == 1


def test_verify_goes_on_after_a_drop_mid_object(request, tmp_path):
    """`verify` of a dump whose vmcore download breaks halfway: all files match."""
    s3 = request.getfixturevalue("s3_server")
    conf = _config(tmp_path, s3, "drop", 'KDUMP_DUMPFORMAT="ELF"', 'KDUMP_DUMPLEVEL="0"')
    r = _save(conf, mib=16)
    assert r.rc == 0, r.err
    url = _saved_url(r.out)
    name = url.rsplit("/", 1)[1]
    size = len(s3.get(f"drop/{name}/vmcore"))
    with DropProxy(s3.port, drop_down_after=size // 2) as proxy:
        via = url.replace(f":{s3.port}/", f":{proxy.port}/", 1)
        v = cli("verify", "--config", conf, via)
        assert proxy.dropped == 1
    assert v.rc == 0, v.err
    assert "OK  vmcore" in v.out and "all files match" in v.out
    assert "resuming with a ranged GET" in v.err


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of this test's own, to stop and restart."""
    with seaweed(str(tmp_path / "weed")) as s:
        yield s


def _restart_later(server, after: float) -> threading.Thread:
    def run() -> None:
        time.sleep(after)  # the outage the test is about, not a wait for readiness
        server.start()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_server_restart_within_the_retry_window(own_s3):
    target, _ = parse_target(own_s3.url("restart"))
    # retries wait 4, 8, 16, 16, 16 s: 60 s, more than a restart takes (5-20 s here)
    settings = SETTINGS.replace(retries=5, retry_delay=4.0)
    data = os.urandom(32 * MiB)
    with open_transport(target, settings) as tr:
        with tr.create("vmcore") as sink:
            sink.write(data[: 12 * MiB])  # one part is up, the next is filling
            own_s3.stop()
            restarter = _restart_later(own_s3, 1.0)
            view = memoryview(data)
            for i in range(12 * MiB, len(data), MiB):
                sink.write(view[i : i + MiB])
            info = sink.commit()
    restarter.join()
    assert info.digest == hashlib.sha256(data).hexdigest()
    assert own_s3.get("restart/vmcore") == data
    assert own_s3.uploads("restart/") == []


def test_server_down_beyond_the_retry_window(own_s3, tmp_path):
    """The upload fails with ConnectionLost; its parts stay until the next save removes them."""
    target, _ = parse_target(own_s3.url("gone"))
    settings = SETTINGS.replace(retries=2, retry_delay=0.2)
    with open_transport(target, settings) as tr:
        tr.makedir("h-2026-01-01-00-00-00")
        with pytest.raises(ConnectionLost):
            with tr.create("h-2026-01-01-00-00-00/vmcore") as sink:
                sink.write(os.urandom(10 * MiB))
                own_s3.stop()
                sink.write(os.urandom(10 * MiB))
                sink.commit()
    own_s3.start()
    assert own_s3.keys("gone/") == ["gone/h-2026-01-01-00-00-00/"]
    assert own_s3.uploads("gone/") == ["gone/h-2026-01-01-00-00-00/vmcore"]
    with open_transport(target, settings) as tr:
        tr.remove_tree("h-2026-01-01-00-00-00")  # what rotation does with incomplete dumps
    assert own_s3.keys("gone/") == [] and own_s3.uploads("gone/") == []


# -- refusals ---------------------------------------------------------------------------------


def test_wrong_secret_is_auth_error_fast_and_not_retried(request, caplog):
    target = make_target("s3", request)
    s3 = target.s3
    bad = replace(s3, secret_key="wrong-S3-secret-123")
    target = replace(target, url=bad.url(target.server_dir))
    settings = target.settings.replace(retries=3, retry_delay=2.0)
    caplog.set_level(logging.DEBUG)
    with DropProxy(s3.port) as proxy:
        start = time.monotonic()
        with pytest.raises(AuthError, match="SignatureDoesNotMatch"):
            open_transport(parse_target(_via(target, proxy.port).url)[0], settings).connect()
        assert time.monotonic() - start < settings.retry_delay
        assert proxy.connections == 1
    assert "wrong-S3-secret-123" not in caplog.text


def test_missing_bucket_is_a_clear_error_not_retried(request):
    s3 = request.getfixturevalue("s3_server")
    target, _ = parse_target(s3.url(bucket="no-such-bucket"))
    settings = SETTINGS.replace(retries=3, retry_delay=2.0)
    start = time.monotonic()
    with pytest.raises(TransportError, match="bucket 'no-such-bucket' does not exist") as e:
        open_transport(target, settings).connect()
    assert time.monotonic() - start < 2.0
    assert e.value.exit_code == 6


def test_https_needs_the_ca(request, tmp_path):
    s3 = request.getfixturevalue("s3_server")
    target, _ = parse_target(s3.https_url("tls"))
    with pytest.raises(AuthError, match="certificate not trusted"):
        open_transport(target, SETTINGS).connect()
    trusted = SETTINGS.replace(extra={"s3_ca_bundle": s3.ca_file})
    with open_transport(target, trusted) as tr:
        _upload(tr, "f", b"over TLS")
    assert s3.get("tls/f") == b"over TLS"


# -- the CLI: save, verify, rotation, redaction -------------------------------------------------


def _config(tmp_path: Path, s3, prefix: str, *extra: str, url: str | None = None) -> str:
    """A config with the keys in directives (not in the URL), as an admin would write it."""
    conf = tmp_path / f"kdump-{prefix.replace('/', '_')}.conf"
    lines = [
        f'KDUMP_SAVEDIR="{url or s3.url(prefix, creds=False)}"',
        f'KDUMP_S3_ACCESS_KEY="{s3.access_key}"',
        f'KDUMP_S3_SECRET_KEY="{s3.secret_key}"',
        'KDUMP_NET_TIMEOUT="10"',
        *extra,
    ]
    conf.write_text("\n".join(lines) + "\n")
    return str(conf)


def _save(conf: str, *sets: str, env: dict | None = None, mib: int = 16):
    args = ["save", "--config", conf, "--sample", "--sample-mib", str(mib), "--no-reboot"]
    for s in sets:
        args += ["--set", s]
    return cli(*args, env=env)


def _saved_url(out: str) -> str:
    line = [x for x in out.splitlines() if x.startswith("Dump saved: ")][0]
    return line.removeprefix("Dump saved: ")


def test_save_compressed_flattened_then_verify_in_place(request, tmp_path):
    s3 = request.getfixturevalue("s3_server")
    conf = _config(tmp_path, s3, "cli", 'KDUMP_DUMPFORMAT="compressed"', 'KDUMP_DUMPLEVEL="31"')
    r = _save(conf, "KDUMP_VERBOSE=8")
    assert r.rc == 0, r.err
    assert "no free space to report" in r.err and r.err.count("no free space to report") == 1
    url = _saved_url(r.out)
    name = url.rsplit("/", 1)[1]
    keys = s3.keys(f"cli/{name}/")
    assert keys == [f"cli/{name}/{n}" for n in ("", "README.txt", "dmesg.txt")] + [
        f"cli/{name}/manifest.json",
        f"cli/{name}/vmcore",
    ]
    manifest = json.loads(s3.get(f"cli/{name}/manifest.json"))
    assert manifest["status"] == "complete" and manifest["flattened"] is True
    v = cli("verify", "--config", conf, url)
    assert v.rc == 0, v.err
    assert "all files match" in v.out and "OK  vmcore" in v.out
    # the flattened stream rearranges into a file makedumpfile reads
    flat, out = tmp_path / "flat", tmp_path / "dump"
    flat.write_bytes(s3.get(f"cli/{name}/vmcore"))
    assert cli("rearrange", str(flat), str(out)).rc == 0
    d = subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(out), str(tmp_path / "dmesg")],
        capture_output=True,
        text=True,
    )
    assert d.returncode == 0, d.stdout + d.stderr
    # a changed object fails verification
    s3.client().put_object(Bucket=s3.bucket, Key=f"cli/{name}/dmesg.txt", Body=b"tampered")
    v = cli("verify", "--config", conf, url)
    assert v.rc == 8 and "dmesg.txt: size 8" in v.err
    for secret_free in (r.out, r.err, v.out, v.err, json.dumps(manifest)):
        assert s3.secret_key not in secret_free


def test_list_and_verify_take_the_keys_from_the_configs_url(request, tmp_path):
    """KDUMP_SAVEDIR="s3://KEY:SECRET@host/bucket" saves, but `list` and `verify` of that
    target by its URL without the keys said "no S3 credentials" (exit 7): the secret had to
    go on the command line, where every user sees it (argv). They take the config's, as for
    the other schemes."""
    s3 = request.getfixturevalue("s3_server")
    conf = tmp_path / "kdump-urlkeys.conf"
    conf.write_text(f'KDUMP_SAVEDIR="{s3.url("urlkeys")}"\nKDUMP_NET_TIMEOUT="10"\n')
    r = _save(str(conf), mib=8)
    assert r.rc == 0, r.err
    bare = s3.url("urlkeys", creds=False)
    listed = cli("list", "--config", str(conf), bare)
    assert listed.rc == 0 and "complete" in listed.out, listed.err
    checked = cli("verify", "--config", str(conf), f"{bare}/{_saved_url(r.out).rsplit('/', 1)[1]}")
    assert checked.rc == 0, checked.err
    assert s3.secret_key not in r.err + listed.err + checked.err + checked.out


def test_verify_rejects_urls_without_a_dump(request, tmp_path):
    s3 = request.getfixturevalue("s3_server")
    conf = _config(tmp_path, s3, "none")
    r = cli("verify", "--config", conf, s3.url("none", creds=False))
    assert r.rc == 2 and "must end with a dump directory" in r.err
    r = cli("verify", "--config", conf, s3.url("none/h-2026-01-01-00-00-00", creds=False))
    assert r.rc == 8 and "no such dump" in r.err


def test_show_config_and_logs_never_show_the_secret(request, tmp_path):
    s3 = request.getfixturevalue("s3_server")
    conf = _config(tmp_path, s3, "redact")
    r = cli("show-config", "--config", conf)
    assert r.rc == 0
    assert 'KDUMP_S3_SECRET_KEY="***"' in r.out and s3.secret_key not in r.out
    assert f'KDUMP_S3_ACCESS_KEY="{s3.access_key}"' in r.out
    # the secret in the URL is redacted as any password
    conf2 = _config(tmp_path, s3, "redact2", url=s3.url("redact2"))
    r = cli("show-config", "--config", conf2)
    quoted = s3.url("redact2").split(":", 2)[2].split("@")[0]  # the %-encoded secret
    assert quoted not in r.out and ":***@" in r.out
    r = _save(conf2, "KDUMP_VERBOSE=8")
    assert r.rc == 0, r.err
    for text in (r.out, r.err):
        assert s3.secret_key not in text and quoted not in text
    for key in s3.keys("redact2/"):
        assert s3.secret_key.encode() not in s3.get(key) and quoted.encode() not in s3.get(key)


def test_wrong_key_exits_7_missing_bucket_exits_6(request, tmp_path):
    s3 = request.getfixturevalue("s3_server")
    bad = replace(s3, secret_key="not-the-S3-secret")
    r = _save(_config(tmp_path, bad, "badkey"))
    assert r.rc == 7, r.err
    assert "refused our credentials" in r.err and "not-the-S3-secret" not in r.err
    r = _save(_config(tmp_path, s3, "x", url=s3.url(bucket="missing-bucket", creds=False)))
    assert r.rc == 6 and "bucket 'missing-bucket' does not exist" in r.err


def test_clock_skew_is_corrected_from_the_server_date(request, tmp_path):
    """The whole save runs two hours behind (libfaketime): one retry with the server's time."""
    if not os.path.exists(FAKETIME):
        pytest.fail(f"{FAKETIME} missing: apt-get install faketime (setup.sh does)")
    s3 = request.getfixturevalue("s3_server")
    env = {"LD_PRELOAD": FAKETIME, "FAKETIME": "-2h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    r = _save(_config(tmp_path, s3, "skew"), env=env)
    assert r.rc == 0, r.err
    assert r.err.count("RequestTimeTooSkewed") == 1, r.err
    assert "off the store's" in r.err
    skew = [x for x in r.err.splitlines() if "RequestTimeTooSkewed" in x][0]
    assert re.search(r"our clock is -7[12]\d\d s off", skew), skew  # about -7200 s


def test_rotation_leaves_other_hosts_alone(request, tmp_path):
    """Another host's dumps (and a stray object) below the prefix are never touched."""
    s3 = request.getfixturevalue("s3_server")
    c = s3.client()
    planted = {
        "rot/other-2020-01-01-00-00-00/": b"",
        "rot/other-2020-01-01-00-00-00/manifest.json": b'{"status": "complete"}',
        "rot/other-2020-01-01-00-00-00/vmcore": b"another host's dump",
        "rot/other-2021-01-01-00-00-00/README.txt": b"incomplete, of another host",
        "rot/unrelated.txt": b"not a dump",
    }
    for key, body in planted.items():
        c.put_object(Bucket=s3.bucket, Key=key, Body=body)
    conf = _config(tmp_path, s3, "rot", 'KDUMP_KEEP_OLD_DUMPS="1"')
    names = []
    for _ in range(3):
        r = _save(conf, mib=8)
        assert r.rc == 0, r.err
        names.append(_saved_url(r.out).rsplit("/", 1)[1])
    mine = sorted(
        {k.split("/")[1] for k in s3.keys("rot/") if k.count("/") > 1}
        - {
            "other-2020-01-01-00-00-00",
            "other-2021-01-01-00-00-00",
        }
    )
    assert mine == sorted(names[1:])  # the newest and one older one
    for key, body in planted.items():
        assert s3.get(key) == body


def test_keys_with_characters_xml_cannot_hold_are_listed_and_deleted_as_they_are(request):
    """S3 keys may hold control characters, which XML 1.0 cannot: AWS documents that XML
    parsers cannot read its listing of them (ours refuses "&#x1;": one such key below a
    shared prefix would fail every host's rotation), SeaweedFS
    lists U+FFFD in their place: rotation "deleted" a dump whose object with such a name then
    stayed, and so did the dump, deleted again by every save. Listings now ask for
    encoding-type=url; a key DeleteObjects cannot carry is deleted on its own."""
    target = make_target("s3", request)
    c, top = target.s3.client(), target.server_dir + "/"
    odd = ["vmcore\x0b", "dm esg+\r.txt", "a%41", "\u00e9"]
    with target.transport() as tr:
        tr.makedir("host-2026-01-01-00-00-00")
        for name in odd:
            c.put_object(
                Bucket=target.s3.bucket, Key=f"{top}host-2026-01-01-00-00-00/{name}", Body=b"x"
            )
        c.put_object(Bucket=target.s3.bucket, Key=f"{top}other\x01host/vmcore", Body=b"x")
        listed = tr.listdir("host-2026-01-01-00-00-00")
        assert sorted(e.name for e in listed) == sorted(odd)
        tr.remove_tree("host-2026-01-01-00-00-00")
        assert [e.name for e in tr.listdir("")] == ["other\x01host"]
    assert target.s3.keys(top) == [f"{top}other\x01host/vmcore"]


DROP_KEY, DROP_SECRET = "kdumpDropKey0001", "kdump-drop-Secret/0001"


@pytest.fixture(scope="module")
def drop_box(tmp_path_factory):
    """A SeaweedFS with a second key that may only upload below ``drop/``: no listing, no
    GetObject, no HEAD (the "drop box" fleets give hosts, so that a compromised host cannot
    read the others' dumps)."""
    writer = identity("drop", DROP_KEY, DROP_SECRET, "Write:dumps/drop/*")
    with seaweed(str(tmp_path_factory.mktemp("dropbox")), (writer,)) as s:
        yield s


def test_a_write_only_key_saves_and_judges_nothing(drop_box, tmp_path):
    """It exited 7 at once ("refused our credentials") before writing anything. Now each
    save succeeds with a note, rotates nothing it could not see, and never overwrites an
    earlier dump of the same crash (a conditional write instead of a listing)."""
    s3 = drop_box
    planted = {
        "drop/wo/other-2020-01-01-00-00-00/": b"",
        "drop/wo/other-2020-01-01-00-00-00/manifest.json": b'{"status": "complete"}',
        "drop/wo/unrelated.txt": b"not a dump",
    }
    for key, body in planted.items():
        s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body)
    dropper = replace(s3, access_key=DROP_KEY, secret_key=DROP_SECRET)
    conf = _config(tmp_path, dropper, "drop/wo", 'KDUMP_KEEP_OLD_DUMPS="1"')
    names = []
    for _ in range(3):
        r = _save(conf, mib=8)
        assert r.rc == 0, r.err
        assert "refuses to list to our key" in r.err and "refuses HEAD" in r.err
        assert DROP_SECRET not in r.err + r.out
        names.append(_saved_url(r.out).rsplit("/", 1)[1])
    # the same crash three times: three dumps, none rotated, none overwritten
    assert len(set(names)) == 3 and names[1] == names[0] + ".1"
    (tmp_path / "admin").mkdir()
    admin = _config(tmp_path / "admin", s3, "drop/wo")
    for name in names:
        v = cli("verify", "--config", admin, s3.url(f"drop/wo/{name}", creds=False))
        assert v.rc == 0, v.err
        readme = s3.get(f"drop/wo/{name}/README.txt").decode()
        assert "NOTE: the store refuses to list to our key" in readme
        assert json.loads(s3.get(f"drop/wo/{name}/manifest.json"))["status"] == "complete"
    for key, body in planted.items():
        assert s3.get(key) == body
    # list and verify need the listing: refused, clearly
    r = cli("list", "--config", conf, dropper.url("drop/wo", creds=False))
    assert r.rc == 7 and "AccessDenied" in r.err, r.err


def test_a_write_only_upload_that_cannot_be_aborted_says_who_removes_its_parts(drop_box, caplog):
    """The warning promised that the next dump removes the parts; a key that may not list
    never finds them again."""
    dropper = replace(drop_box, access_key=DROP_KEY, secret_key=DROP_SECRET)
    settings = SETTINGS.replace(retries=1, retry_delay=0.1)
    caplog.set_level(logging.WARNING)
    with DropProxy(drop_box.port, drop_after=12 * MiB, dead_after_drop=True) as proxy:
        url = dropper.url("drop/gone").replace(f":{drop_box.port}/", f":{proxy.port}/", 1)
        with open_transport(parse_target(url)[0], settings) as tr:
            assert not tr.listable
            with pytest.raises(ConnectionLost):
                with tr.create("vmcore") as sink:
                    for _ in range(4):
                        sink.write(os.urandom(8 * MiB))
                    sink.commit()
    assert "could not abort the upload" in caplog.text
    assert "a lifecycle rule (AbortIncompleteMultipartUpload) removes them" in caplog.text
    assert "the next dump to this target removes" not in caplog.text
    assert drop_box.uploads("drop/gone/") == ["drop/gone/vmcore"]


def _deny(s3, action: str, resource: str, condition: dict | None = None) -> None:
    """A bucket policy that refuses ``action`` on ``resource`` to everyone."""
    rule = {"Effect": "Deny", "Principal": "*", "Action": [action], "Resource": [resource]}
    if condition:
        rule["Condition"] = condition
    policy = {"Version": "2012-10-17", "Statement": [rule]}
    s3.client().put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps(policy))


def test_a_key_that_may_not_delete_still_replaces_the_readme(drop_box, tmp_path):
    """AWS's drop box grants s3:PutObject alone. DeleteObject refused, README.txt's
    placeholder ("INCOMPLETE") stayed beside the complete dump, and verify failed (exit 8):
    the PUT that replaces it was never sent."""
    s3 = drop_box
    _deny(s3, "s3:DeleteObject", f"arn:aws:s3:::{s3.bucket}/drop/nodel/*")
    dropper = replace(s3, access_key=DROP_KEY, secret_key=DROP_SECRET)
    r = _save(_config(tmp_path, dropper, "drop/nodel"), mib=8)
    assert r.rc == 0, r.err
    assert "README.txt is not" not in r.err, r.err
    name = _saved_url(r.out).rsplit("/", 1)[1]
    readme = s3.get(f"drop/nodel/{name}/README.txt").decode()
    assert "INCOMPLETE" not in readme and "Checksums are in manifest.json" in readme
    (tmp_path / "admin").mkdir()
    admin = _config(tmp_path / "admin", s3, "drop/nodel")
    v = cli("verify", "--config", admin, s3.url(f"drop/nodel/{name}", creds=False))
    assert v.rc == 0, v.err


def test_rotation_in_a_versioned_bucket_says_the_data_stays(request, tmp_path):
    """With versioning on, rotation's deletions leave every object of the dump (all of the
    crashed machine's memory) as a noncurrent version; the log said only 'deleting'."""
    s3 = request.getfixturevalue("s3_server")
    c = s3.client()
    c.create_bucket(Bucket="versioned")
    c.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    conf = _config(
        tmp_path, s3, "x", 'KDUMP_KEEP_OLD_DUMPS="1"', url=s3.url("v", "versioned", False)
    )
    runs = [_save(conf, mib=8) for _ in range(3)]
    assert [r.rc for r in runs] == [0, 0, 0], runs[-1].err
    gone = _saved_url(runs[0].out).rsplit("/", 1)[1]
    assert f"deleting complete dump {gone}" in runs[2].err
    assert runs[2].err.count("keeps object versions") == 1, runs[2].err
    assert "keeps object versions" not in runs[0].err + runs[1].err  # nothing deleted
    # what the warning says: the deleted dump's vmcore is still there
    versions = c.list_object_versions(Bucket="versioned", Prefix=f"v/{gone}/")
    assert [v["Key"] for v in versions["Versions"] if not v["IsLatest"]].count(f"v/{gone}/vmcore")


def test_dump_directories_the_key_may_not_list_are_left_alone(drop_box, tmp_path):
    """ListBucket granted on the prefix only (an s3:prefix condition), not inside it. The
    save failed, 'refused our credentials' (exit 7): its new directory's check listed it.
    A directory that cannot be listed is neither judged nor deleted, and the new one is
    made by a conditional write."""
    s3 = drop_box
    inside = {"StringLike": {"s3:prefix": "deep/*/"}}
    _deny(s3, "s3:ListBucket", f"arn:aws:s3:::{s3.bucket}", inside)
    conf = _config(tmp_path, s3, "deep", 'KDUMP_KEEP_OLD_DUMPS="1"')
    runs = [_save(conf, mib=8) for _ in range(3)]
    assert [r.rc for r in runs] == [0, 0, 0], runs[-1].err
    names = [_saved_url(r.out).rsplit("/", 1)[1] for r in runs]
    assert len(set(names)) == 3
    assert "deleting" not in runs[2].err, runs[2].err
    assert f"(listing deep/{names[0]}/); left alone" in runs[2].err
    for name in names:
        assert json.loads(s3.get(f"deep/{name}/manifest.json"))["status"] == "complete"


def test_eight_hosts_dump_to_one_bucket_at_once(request, tmp_path):
    """Eight capture kernels (own UTS namespaces: own host names) save and rotate at once."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed")
    s3 = request.getfixturevalue("s3_server")
    conf = _config(tmp_path, s3, "fleet", 'KDUMP_KEEP_OLD_DUMPS="-1"', 'KDUMP_DUMPLEVEL="31"')
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    script = (
        'hostname "$1"; for i in 1 2; do "$2" -m kdump_capture save --config "$3" --sample '
        "--sample-mib 8 --no-reboot || exit $?; done"
    )
    procs = [
        subprocess.Popen(
            ["unshare", "--uts", "sh", "-c", script, "sh", f"node{i}", sys.executable, conf],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    dumps = sorted({k.split("/")[1] for k in s3.keys("fleet/")})
    # KEEP_OLD_DUMPS=-1: each host deleted its own first dump, and only that
    assert [d.rsplit("-", 6)[0] for d in dumps] == [f"node{i}" for i in range(8)]
    for name in dumps:
        v = cli("verify", "--config", conf, s3.url(f"fleet/{name}", creds=False))
        assert v.rc == 0, v.err
    assert s3.uploads("fleet/") == []


def test_verify_sftp_dump_in_place(request, tmp_path):
    """verify URL works for SFTP too: host key and identity from the config."""
    target = make_target("sftp", request)
    s = request.getfixturevalue("ssh_server")
    conf = tmp_path / "sftp.conf"
    conf.write_text(
        f'KDUMP_SAVEDIR="{target.url}"\nKDUMP_HOST_KEY="{s.host_key}"\n'
        f'KDUMP_SSH_IDENTITY="{s.client_key}"\n'
    )
    r = _save(str(conf), mib=8)
    assert r.rc == 0, r.err
    url = _saved_url(r.out)
    v = cli("verify", "--config", str(conf), url)
    assert v.rc == 0 and "all files match" in v.out, v.err
    name = url.rsplit("/", 1)[1]
    with open(os.path.join(target.server_dir, name, "dmesg.txt"), "ab") as f:
        f.write(b"x")
    v = cli("verify", "--config", str(conf), url)
    assert v.rc == 8 and "dmesg.txt" in v.err


def test_scan_reads_only_this_hosts_manifests(tmp_path):
    """On a shared target, rotation looks into this host's dumps only (one listing)."""
    from kdump_capture.pipeline import scan_dumps
    from transports.file import FileTransport

    class Counting(FileTransport):  # test-only: records what is read
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.reads: list[str] = []

        def read(self, relpath, limit=None):
            self.reads.append(relpath)
            return super().read(relpath, limit)

    for name in ("me-2026-01-01-00-00-00", "other-2026-01-01-00-00-00", "x-2026-01-02-00-00-00"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"status": "complete"}')
    t = Counting(parse_target(f"file://{tmp_path}")[0], SETTINGS)
    with t:
        dumps = scan_dumps(t, "me")
    assert [d.name for d in dumps] == ["me-2026-01-01-00-00-00"]
    assert t.reads == ["me-2026-01-01-00-00-00/manifest.json"]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return [int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:")][0]


def test_small_files_do_not_cost_a_part_of_memory(request):
    """README, dmesg and manifest are small: their sinks must not fill 2 x 8 MiB buffers."""
    target = make_target("s3", request)
    with target.transport() as tr:
        before = _rss()
        sinks = [tr.create(f"f{i}") for i in range(4)]
        for sink in sinks:
            sink.write(b"x" * 4096)
        grown = _rss() - before
        for sink in sinks:
            sink.commit()
    assert grown < 4 * MiB, f"{grown / MiB:.1f} MiB for four 4 KiB files"
    assert target.files() == ["f0", "f1", "f2", "f3"]


def test_part_buffers_are_the_saves_own_anonymous_memory(request):
    """The memory log and the OOM killer count a save's anonymous memory: the part buffers
    must be part of it (a shared anonymous map would be RssShmem instead, unseen)."""
    target = make_target("s3", request)
    with target.transport() as tr:
        sink = tr.create("big")
        before = memory.rollup().get("Anonymous", 0)
        sink.write(b"\xa5" * (4 * MiB))  # part of the first part: held, not sent yet
        grown = memory.rollup().get("Anonymous", 0) - before
        sink.commit()
    assert grown >= 4 * MiB, f"{grown / MiB:.1f} MiB of anonymous memory for 4 MiB held"
    assert target.files() == ["big"]


def test_a_stalled_store_fails_within_the_timeout(request):
    """A store that stops reading mid-upload must not hang the dump."""
    target = make_target("s3", request)
    target = replace(
        target, settings=target.settings.replace(timeout=3.0, retries=1, retry_delay=0.01)
    )
    port = int(target.url.split("127.0.0.1:")[1].split("/")[0])
    with DropProxy(port, stall_after=4 * MiB) as proxy:
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            with _via(target, proxy.port).transport() as tr:
                _upload(tr, "vmcore", os.urandom(64 * MiB))
        elapsed = time.monotonic() - t0
        assert proxy.stalled.is_set()
    assert elapsed < 60, f"took {elapsed:.0f} s with a 3 s timeout"
    assert target.files() == []


def test_initramfs_packs_ca_files_for_https(tmp_path):
    import ssl

    from initramfs.builder import s3_files
    from kdump_capture.errors import ConfigError
    from kdump_capture.urls import parse_savedir

    ca, _, _ = make_tls(str(tmp_path))
    https, _ = parse_savedir("s3://store/dumps")
    plain, _ = parse_savedir("s3+http://store/dumps")
    files = s3_files({"KDUMP_S3_CA_BUNDLE": ca}, https)
    system = ssl.get_default_verify_paths().openssl_cafile.lstrip("/")
    assert files == {system: os.path.realpath("/" + system), ca.lstrip("/"): ca}
    assert s3_files({"KDUMP_S3_CA_BUNDLE": ca}, plain) == {}
    with pytest.raises(ConfigError, match="KDUMP_S3_CA_BUNDLE"):
        s3_files({"KDUMP_S3_CA_BUNDLE": "relative.pem"}, https)


def test_an_unusable_ca_bundle_is_a_config_error_at_load_and_at_save(request, tmp_path):
    """KDUMP_S3_CA_BUNDLE naming a missing file was exit 2 at load but exit 6 from a save;
    a file of no certificates passed load and failed every save at the crash. Now both are
    exit 2 wherever they are found, and a save still falls back to the next target."""
    from initramfs.builder import s3_files
    from kdump_capture.errors import ConfigError
    from kdump_capture.urls import parse_savedir

    s3 = request.getfixturevalue("s3_server")
    https, _ = parse_savedir(s3.https_url("badca", creds=False))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    for bundle, why in [(tmp_path / "missing.pem", "no such file"), (garbage, "no PEM")]:
        setting = f'KDUMP_S3_CA_BUNDLE="{bundle}"'
        with pytest.raises(ConfigError, match=f"KDUMP_S3_CA_BUNDLE={bundle}: {why}"):
            s3_files({"KDUMP_S3_CA_BUNDLE": str(bundle)}, https)
        r = _save(_config(tmp_path, s3, "badca", setting, url=s3.https_url("badca", creds=False)))
        assert r.rc == 2, r.err
        assert f"KDUMP_S3_CA_BUNDLE={bundle}: {why}" in r.err
        local = tmp_path / f"local-{bundle.name}"
        both = f"{s3.https_url('badca', creds=False)} file://{local}"
        r = _save(_config(tmp_path, s3, "badca", setting, url=both))
        assert r.rc == 0, r.err
        assert "trying the next target" in r.err and _saved_url(r.out).startswith("file://")
    assert s3.keys("badca/") == []


BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "' + b"x" * 1000 + b'">'
    + b"".join(b'<!ENTITY %c "%s">' % (98 + i, b"&%c;" % (97 + i) * 10) for i in range(5))
    + b"]><Error><Code>InternalError</Code><Message>&f;</Message></Error>"
)  # fmt: skip


def test_a_reply_that_declares_a_dtd_is_not_parsed():
    """ElementTree expands a reply's internal entities: a 15 MiB reply took a save to 5 GB
    and 100% CPU for good. S3 never sends a DTD; such a reply is refused unexpanded."""
    from transports import s3

    assert s3.has_dtd(BOMB) and not s3.has_dtd(b"<Error><Code>X</Code></Error>")
    assert s3.error_code(BOMB) == ("", "")
    with pytest.raises(TransportError, match="declares a DTD; not parsed"):
        s3.parse_listing(BOMB.replace(b"Error>", b"ListBucketResult>"))
    assert not s3.has_dtd(b"not xml at all")


def test_the_stores_error_text_is_cut_short():
    """A Message of megabytes went whole into the error and the log (whose redaction then
    took hours over the one long word)."""
    from transports import s3

    body = b"<Error><Code>InternalError</Code><Message>" + b"m" * (8 << 20) + b"</Message></Error>"
    code, message = s3.error_code(body)
    assert code == "InternalError" and message == "m" * (s3.MAX_ERROR_TEXT - 3) + "..."
    assert len(message) == s3.MAX_ERROR_TEXT
    code, message = s3.error_code(b"<Error><Code>A\tB</Code><Message>x\ny</Message></Error>")
    assert (code, message) == ("A?B", "x?y")


@pytest.mark.parametrize("kind", ["ftp", "sftp", "cifs", "s3"])
def test_a_signal_inside_a_transport_call_keeps_its_exit_code(kind):
    """/init's watchdog (SIGUSR1) interrupting a network call ended as a target error,
    exit 6, instead of 130."""
    from kdump_capture.errors import Interrupted
    from kdump_capture.urls import parse_target
    from transports import cifs, ftp, open_transport
    from transports.base import TransportSettings

    e = Interrupted("stopped by the capture kernel's watchdog")
    if kind == "ftp":
        assert ftp.convert(e, "listing") is e
    elif kind == "cifs":
        assert cifs.convert(e, "listing") is e
    else:
        url = {"sftp": "sftp://u@127.0.0.1/x", "s3": "s3+http://k:s@127.0.0.1/bkt/p"}[kind]
        t = open_transport(parse_target(url)[0], TransportSettings())
        assert t.convert(e, "listing") is e


@pytest.mark.parametrize("level,warned", [(31, False), (0, True)])
def test_upload_parts_follow_what_the_dump_can_take(
    request, tmp_path_factory, monkeypatch, caplog, level, warned
):
    # Parts were sized by the source, not by what the dump can take: a 1 TiB machine at
    # level 31 took parts of 107 MiB (and 149 MB of RSS) for an object of 1.7 GB. Here S3
    # takes 100 parts: the 1 GiB bigcore's source needs parts of 11 MiB, more than the
    # 8 MiB budget gives; its dumpable pages at level 31 fit parts of the budget.
    from kdump_capture.pipeline import SavePlan, save_to_target
    from kdump_capture.urls import parse_savedir
    from kdump_capture.vmcore import open_vmcore
    from transports.base import TransportSettings

    from .bigcore import get_bigcore

    s3 = request.getfixturevalue("s3_server")
    src = get_bigcore(str(tmp_path_factory.getbasetemp() / "bigcores"), 1024)
    monkeypatch.setattr(memory, "S3_MAX_PARTS", 100)
    targets, _ = parse_savedir(s3.url(f"parts{level}"))
    plan = SavePlan(targets, "compressed", level, 0, 0, TransportSettings(replay_bytes=8 * MiB))
    with caplog.at_level(logging.WARNING), open_vmcore(src) as vm:
        res = save_to_target(vm, plan, targets[0])
    assert res.record.status == "complete"
    assert any("needs upload parts" in r.getMessage() for r in caplog.records) is warned
