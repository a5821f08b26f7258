"""S3 transport (``s3://`` over verified https, ``s3+http://``): a dump directory is a key prefix.

``s3://HOST[:PORT]/BUCKET[/PREFIX]``, path-style requests, signed with botocore's SigV4
signer (``botocore.auth``; bench/results/s3_clients.md says why that and not a whole SDK)
over ``http.client``. Credentials: the URL's user info, else ``KDUMP_S3_ACCESS_KEY`` and
``KDUMP_S3_SECRET_KEY`` (``settings.extra``); region ``KDUMP_S3_REGION`` (us-east-1).

Files stream up by multipart upload in parts of one fixed size
(``kdump_capture.memory.s3_part_plan``, which the estimate shares), taken from the replay
budget the engine sizes from MemAvailable and raised when the expected size needs it to
stay under S3's 10,000 parts. A part is sent from our own copy, so a dropped
connection costs that part and no more: it is sent again on a new connection. While one
part uploads on a helper thread the next one fills (when the budget holds two). Nothing
is visible until CompleteMultipartUpload publishes the object under its final key, so no
temporary names are needed; a failed or aborted file aborts its upload (no orphaned
parts), and ``remove_tree`` also aborts uploads a killed run left below the prefix.
Files smaller than a part go up with one PutObject.

Directories do not exist in S3: ``makedir`` writes an empty marker object ``NAME/`` so an
empty dump directory is still listed (and cleaned up as incomplete); listings use
ListObjectsV2 with ``/`` as delimiter. Objects cannot seek (compressed dumps go out
flattened, as over FTP) and the protocol has no free space to report.

SigV4 needs the clock within 15 minutes of the server's; a capture kernel's clock can be
off. On RequestTimeTooSkewed the request is signed again with the server's time (its Date
header) and retried once, and later requests keep that correction.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import hashlib
import http.client
import logging
import mmap
import posixpath
import re
import ssl
import threading
import time
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import quote, unquote_plus
from xml.parsers import expat
from xml.sax.saxutils import escape

from botocore.auth import SIGV4_TIMESTAMP, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kdump_capture.errors import (
    AuthError,
    ConnectionLost,
    TargetFull,
    TargetSettingError,
    TransportError,
)
from kdump_capture.memory import S3_MAX_PARTS, S3_MIN_PART, s3_part_plan
from kdump_capture.summary import clean
from kdump_capture.urls import Target

from .base import (
    MARKS_FIRST,
    Entry,
    FileInfo,
    Sink,
    TransportSettings,
    bounded,
    check_size,
    load_ca_bundle,
    not_the_servers,
)
from .retry import RetryingTransport, deadline, is_connection_lost, retry_call, shut_down

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"
# How long CompleteMultipartUpload may take to answer in full (AWS: "several minutes").
COMPLETE_PATIENCE = 15 * 60.0
MiB = 1 << 20
READ_CHUNK = 1 << 20
# A request's body goes out in slices of this size, each send bounded by the timeout: at
# 64 kbit/s, 256 KiB take 33 s, so the default KDUMP_NET_TIMEOUT of 30 s holds down to
# about 70 kbit/s.
SEND_SLICE = 256 << 10
# ListObjectsV2 and DeleteObjects handle at most 1,000 keys per request.
BATCH = 1000
# An error or listing reply larger than this is not an S3 reply (listings of 1,000 keys
# with long names stay below 1 MiB).
MAX_REPLY = 16 * MiB

# S3 error codes: the server refused our credentials or rights (exit 7, never retried).
_AUTH_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "AccountProblem",
    }
)
# Codes that a retry on a new connection may get past (throttling, a busy or restarting
# server), as AWS's own SDKs treat them.
_TRANSIENT_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"})


class _HasDtd(Exception):
    pass


def _refuse_dtd(*_args) -> None:
    raise _HasDtd


def has_dtd(body: bytes) -> bool:
    """Whether ``body`` declares a DTD. S3 never sends one, and its internal entities would
    be expanded by ElementTree: a 15 MiB reply grew a save to 5 GB (and 100% CPU for good).
    Expat stops at the declaration, before any entity is defined."""
    p = expat.ParserCreate()
    p.StartDoctypeDeclHandler = _refuse_dtd
    p.EntityDeclHandler = _refuse_dtd
    try:
        p.Parse(body, True)
    except _HasDtd:
        return True
    except (expat.ExpatError, ValueError, LookupError):
        pass  # not XML at all: the parse that follows says so
    return False


def parse_xml(body: bytes, what: str) -> ET.Element:
    """A reply's XML document; TransportError when the store sent something else."""
    if has_dtd(body):
        raise TransportError(f"{what}: the store's reply declares a DTD; not parsed")
    try:
        return ET.fromstring(body)
    except (ET.ParseError, ValueError, LookupError) as e:  # expat: bad or unknown encoding
        raise TransportError(f"{what}: the store's reply is not XML ({e})") from None


def parse_listing(body: bytes) -> tuple[list[tuple[str, str, int]], str | None]:
    """A ListObjectsV2 page: [("dir"|"file", key, size)] and the continuation token
    ("" on the last page, None if the page says more follow but gives no token).
    Untrusted: any other host with write access shapes it."""
    root = parse_xml(body, "listing")
    # Asked for with encoding-type=url (_list_query): keys are %-encoded, "+" a space, as
    # botocore decodes them. A store that ignores the parameter says no EncodingType.
    url = _text(root, "EncodingType") == "url"

    def key(text: str) -> str:
        return unquote_plus(text) if url else text

    out = [("dir", key(_text(c, "Prefix")), 0) for c in _children(root, "CommonPrefixes")]
    for c in _children(root, "Contents"):
        size = _text(c, "Size").strip()
        if not (size.isascii() and size.isdigit()) or len(size) > 20:
            raise TransportError(f"listing: object {_text(c, 'Key')!r} has a bad size {size!r}")
        out.append(("file", key(_text(c, "Key")), int(size)))
    if _text(root, "IsTruncated") != "true":
        return out, ""
    return out, _text(root, "NextContinuationToken") or None


def error_code(body: bytes, *more: str) -> tuple[str, ...]:
    """(Code, Message, and the fields named in ``more``) of an S3 error document, each cut
    to MAX_ERROR_TEXT printable characters (they go into messages and logs); all "" when
    it is not one."""
    names = ("Code", "Message", *more)
    if has_dtd(body):
        return ("",) * len(names)
    try:
        root = ET.fromstring(body)
    except (ET.ParseError, ValueError, LookupError):
        return ("",) * len(names)
    return tuple(clean(_text(root, n), MAX_ERROR_TEXT) for n in names)


# What a message keeps of text the store sent (a Message of megabytes went into the log).
MAX_ERROR_TEXT = 200


def _strip_ns(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in node if _strip_ns(c.tag) == name]


def _text(node: ET.Element, name: str) -> str:
    for c in node:
        if _strip_ns(c.tag) == name:
            return c.text or ""
    return ""


class S3Error(TransportError):
    """An S3 error reply we did not map to a more specific class; ``code`` is S3's."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Denied(AuthError):
    """AccessDenied: the store knows our key and signature but its policy refuses this
    request (a write-only account may not list or read)."""


class Skewed(S3Error):
    """RequestTimeTooSkewed: our clock is too far from the server's for SigV4.

    ``server_time``: the server's clock (epoch seconds) from its Date header, if it sent one.
    """

    def __init__(self, message: str, server_time: float | None) -> None:
        super().__init__(message, "RequestTimeTooSkewed", 403)
        self.server_time = server_time


def server_time(headers) -> float | None:
    """The epoch time in an HTTP Date header, or None."""
    date = headers.get("Date") if headers else None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


class _Signer(S3SigV4Auth):
    """botocore's S3 SigV4 signer, on our clock plus ``offset`` seconds.

    botocore signs with the local clock; ``add_auth`` here is its own, with the time
    taken from ``time.time() + offset`` (tests/test_transport_s3.py checks that it signs
    exactly as botocore does at the same instant).
    """

    def __init__(self, credentials: Credentials, region: str) -> None:
        super().__init__(credentials, "s3", region)
        self.offset = 0.0

    def add_auth(self, request: AWSRequest) -> None:
        now = datetime.datetime.fromtimestamp(time.time() + self.offset, datetime.UTC)
        request.context["timestamp"] = now.replace(tzinfo=None).strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


class Reply:
    """A finished S3 request: status, headers and (bounded) body."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Connection:
    """One keep-alive HTTP(S) connection to the store that sends signed requests.

    Not shared between threads: the transport has one, and each sink one of its own.
    """

    def __init__(self, t: S3Transport) -> None:
        self._t = t
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def drop(self) -> None:
        """Shut the socket down from another thread (``deadline``): a blocked read ends."""
        if self._conn is not None:
            shut_down(self._conn.sock)

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            t = self._t
            if t.https:
                self._conn = http.client.HTTPSConnection(
                    t.target.host, t.port, timeout=t.settings.timeout, context=t.tls
                )
            else:
                self._conn = http.client.HTTPConnection(
                    t.target.host, t.port, timeout=t.settings.timeout
                )
        return self._conn

    def request(
        self,
        method: str,
        key: str | None,
        query: dict[str, str] | None = None,
        body: bytes | memoryview = b"",
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
        patience: float = 0.0,
    ) -> Reply | http.client.HTTPResponse:
        """Sign and send one request; raise our error classes for anything but ``ok``.

        The reply (its headers with ``stream``) must be in within ``patience`` seconds,
        ``op_deadline`` if 0.

        ``key`` None addresses the bucket. With ``stream`` the open response is returned
        for the caller to read (GetObject). A clock skew is corrected once, here.
        """
        for attempt in (0, 1):
            try:
                return self._send(
                    method, key, query or {}, body, headers or {}, ok, stream, patience
                )
            except Skewed as e:
                if attempt:
                    raise
                self._t.learn_clock(e)
        raise AssertionError("unreachable")

    def _send(self, method, key, query, body, headers, ok, stream, patience=0.0):
        t = self._t
        path = "/" + quote(t.bucket, safe="")
        if key is not None:
            path += "/" + quote(key, safe="/~")
        qs = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
        )
        target = f"{path}?{qs}" if qs else path
        hdrs = {"Content-Length": str(len(body)), **headers}
        req = AWSRequest(method=method, url=f"{t.origin}{target}", data=body, headers=hdrs)
        if t.https:  # TLS protects the payload; hashing every part again would cost CPU
            req.context["client_config"] = _UNSIGNED_PAYLOAD
        t.signer.add_auth(req)
        conn = self._connect()
        try:
            # In slices: one sendall of a whole part had the timeout for all of it (Python
            # bounds a sendall, and an SSL write, as a whole), so on a link slower than a
            # part per KDUMP_NET_TIMEOUT every part failed, again on every retry.
            view = memoryview(body)
            payload = (view[i : i + SEND_SLICE] for i in range(0, len(view), SEND_SLICE))
            conn.request(
                method, target, body=payload if len(view) else None, headers=dict(req.headers)
            )
            # The reply, as a whole, within its deadline: each recv waits at most the
            # timeout, but a store that trickles a byte at a time resets that wait.
            with deadline(
                patience or t.op_deadline, f"{method} {target}", lambda: shut_down(conn.sock)
            ):
                resp = conn.getresponse()
                if stream and resp.status in ok:
                    return resp
                data = resp.read(MAX_REPLY + 1)
            if resp.will_close or len(data) > MAX_REPLY:
                self.close()
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise AuthError(
                f"{t.endpoint}: TLS certificate not trusted ({e.verify_message}); "
                "KDUMP_S3_CA_BUNDLE names extra CAs"
            ) from None
        except ConnectionLost:  # the deadline's
            self.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise ConnectionLost(f"connection to {t.endpoint} lost: {e or type(e).__name__}") from e
        if len(data) > MAX_REPLY:
            raise TransportError(f"{t.endpoint}: reply larger than {MAX_REPLY >> 20} MiB")
        if resp.status in ok:
            return Reply(resp.status, resp.headers, data)
        raise t.error(resp.status, resp.headers, data, key)


# Characters XML 1.0 has no place for, not even as a reference.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_CR = {"\r": "&#13;"}

# botocore signs the payload over https too unless the client config says otherwise.
_UNSIGNED_PAYLOAD = types.SimpleNamespace(s3={"payload_signing_enabled": False})


class S3Sink(Sink):
    """One object being uploaded: parts from our own buffers, published on commit."""

    def __init__(self, t: S3Transport, key: str, name: str) -> None:
        super().__init__(name, t.settings.checksum)
        self._t = t
        self._key = key
        self._part, nbuf = t.parts
        # Anonymous maps, not bytearrays: bytearray(n) writes n zeros at once, while a map's
        # pages cost memory only once data lands in them (a 2 KiB README costs one page).
        # Private: a shared anonymous map is shared memory (RssShmem), which the save's
        # memory log, counting its anonymous memory, did not see (transports.retry).
        self._bufs = [mmap.mmap(-1, self._part, flags=mmap.MAP_PRIVATE) for _ in range(nbuf)]
        self._cur = 0  # the buffer being filled
        self._fill = 0  # bytes in it
        self._conn = Connection(t)
        self._upload_id: str | None = None
        self._etags: list[str] = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="s3-part") if nbuf > 1 else None
        self._pending: Future | None = None
        self._failed: BaseException | None = None

    def _call(self, op: Callable[[], T], what: str) -> T:
        """``op`` on this sink's connection, reconnecting and retrying if it breaks."""

        def guarded() -> T:
            try:
                return op()
            except Exception as e:
                raise self._t.convert(e, what) from e

        return retry_call(guarded, self._conn.close, self._t.settings, what)

    def write(self, data: bytes | memoryview) -> None:
        if self._failed is not None:
            raise self._failed
        view = memoryview(data).cast("B")
        with self._accounting(view):
            done = 0
            while done < len(view):
                n = min(len(view) - done, self._part - self._fill)
                buf = self._bufs[self._cur]
                buf[self._fill : self._fill + n] = view[done : done + n]
                self._fill += n
                done += n
                if self._fill == self._part:
                    self._send_part()

    def _send_part(self) -> None:
        """Upload the full (or last) buffer as the next part; switch to the other buffer."""
        if self._upload_id is None:
            self._upload_id = self._call(self._create, f"starting upload of {self._key}")
        number = len(self._etags) + 1
        if number > S3_MAX_PARTS:
            raise TransportError(
                f"{self._key}: more than {S3_MAX_PARTS} parts of {self._part >> 20} MiB; "
                "the dump is larger than the size it was planned for"
            )
        self._etags.append("")
        piece = memoryview(self._bufs[self._cur])[: self._fill]
        if self._worker is None:
            self._upload(number, piece)
        else:
            self._wait()
            self._pending = self._worker.submit(self._upload, number, piece)
            self._cur = 1 - self._cur
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except BaseException as e:
                self._failed = e
                raise

    def _create(self) -> str:
        reply = self._conn.request("POST", self._key, {"uploads": ""})
        upload_id = _text(parse_xml(reply.body, f"starting upload of {self._key}"), "UploadId")
        if not upload_id:
            raise TransportError(f"{self._key}: the server started an upload without an id")
        return upload_id

    def _upload(self, number: int, piece: memoryview) -> None:
        query = {"partNumber": str(number), "uploadId": self._upload_id}

        def put() -> str:
            reply = self._conn.request("PUT", self._key, query, piece)
            etag = reply.headers.get("ETag", "")
            if not etag:
                raise TransportError(f"{self._key}: part {number} stored without an ETag")
            return etag

        self._etags[number - 1] = self._call(put, f"uploading part {number} of {self._key}")

    def commit(self) -> FileInfo:
        if self._failed is not None:
            raise self._failed
        if self._upload_id is None:  # smaller than a part: one PutObject
            body = memoryview(self._bufs[self._cur])[: self._fill]
            self._call(
                lambda: self._conn.request("PUT", self._key, body=body), f"writing {self._key}"
            )
        else:
            if self._fill:
                self._send_part()
            self._wait()
            self._call(self._complete, f"completing upload of {self._key}")
        size = self._call(self._size, f"checking {self._key}")
        if size is None:
            # A write-only account: the object's size cannot be read back, only the store's
            # answers be taken (each part's Content-Length, signed over http, and TLS).
            self._t.note_once(
                "the store refuses HEAD to our key (a write-only account): each file's size "
                "was taken from the store's acknowledgement of the upload, not read back"
            )
            size = self.size
        if size != self.size:
            raise TransportError(f"{self._key}: wrote {self.size} bytes but the store has {size}")
        self.committed = True
        self._release()
        return FileInfo(self.name, size, self._digest(), self.algorithm)

    def _complete(self) -> None:
        parts = "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{escape(e)}</ETag></Part>"
            for i, e in enumerate(self._etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        try:
            # AWS may take minutes to assemble a large object, sending blanks meanwhile.
            reply = self._conn.request(
                "POST", self._key, {"uploadId": self._upload_id}, body, patience=COMPLETE_PATIENCE
            )
        except S3Error as e:
            # A retry after a lost reply: the first request may have completed it.
            if e.code == "NoSuchUpload" and self._size() == self.size:
                return
            raise
        # S3 may answer 200 and report an error in the body (it sent the status early).
        if _strip_ns(parse_xml(reply.body, f"completing {self._key}").tag) == "Error":
            code, _ = error_code(reply.body)
            status = 500 if code in _TRANSIENT_CODES else 400
            raise self._t.error(status, {}, reply.body, self._key)

    def _size(self) -> int | None:
        """The stored object's size; -1 if missing; None if the store refuses to say (403:
        after our uploads were taken, the key is good, and the policy is write-only)."""
        reply = self._conn.request("HEAD", self._key, ok=(200, 403, 404))
        if reply.status == 404:
            return -1
        if reply.status == 403:
            return None
        return int(reply.headers.get("Content-Length", "-1"))

    def _release(self) -> None:
        self._stop_hashing()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._bufs = []  # unmapped when the last view of them is gone
        self._conn.close()

    def abort(self) -> None:
        try:
            self._wait()
        except BaseException as e:
            log.debug("%s: part upload failed while aborting: %s", self._key, e)
        if self._upload_id is not None and not self.committed:
            upload_id = self._upload_id

            def drop() -> None:
                self._conn.request("DELETE", self._key, {"uploadId": upload_id}, ok=(200, 204, 404))

            try:
                self._call(drop, f"aborting upload of {self._key}")
                self._upload_id = None
            except Exception as e:
                later = (
                    "the next dump to this target removes its parts"
                    if self._t.listable
                    # a key that may not list cannot find them again (ListMultipartUploads)
                    else "its parts stay until a lifecycle rule (AbortIncompleteMultipartUpload) "
                    "removes them"
                )
                log.warning("%s: could not abort the upload (%s); %s", self._key, e, later)
        self._release()


class S3Transport(RetryingTransport):
    """Dumps below a key prefix in a bucket of an S3-compatible store."""

    scheme = "s3"
    bounded_ops = False  # each request is bounded instead (Connection._send)

    def __init__(self, target: Target, settings: TransportSettings) -> None:
        super().__init__(target, settings)
        self.https = target.spelled == "s3"
        self.port = target.port or (443 if self.https else 80)
        bucket, _, prefix = target.path.strip("/").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        host = f"[{target.host}]" if ":" in target.host else target.host
        default = (self.https and self.port == 443) or (not self.https and self.port == 80)
        netloc = host if default else f"{host}:{self.port}"
        self.origin = f"{'https' if self.https else 'http'}://{netloc}"
        self.endpoint = f"{target.host}:{self.port}"
        extra = settings.extra
        access = target.user if target.user is not None else extra.get("s3_access_key", "")
        secret = target.password if target.password is not None else extra.get("s3_secret_key", "")
        if not access or not secret:
            raise AuthError(
                f"{self.describe()}: no S3 credentials: set KDUMP_S3_ACCESS_KEY and "
                "KDUMP_S3_SECRET_KEY (or put them into the URL)"
            )
        self.region = extra.get("s3_region") or DEFAULT_REGION
        self.parts = s3_part_plan(settings.replay_bytes, settings.expected_size)
        self.signer = _Signer(Credentials(access, secret), self.region)
        self.tls: ssl.SSLContext | None = None
        self.ca_bundle = extra.get("s3_ca_bundle", "")
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._told_free = False
        # False once the store refused a listing (AccessDenied): a write-only account.
        self.listable = True
        self._asked_versioning = False
        self._told_uploads = False  # that the store will not list unfinished uploads

    def expect(self, size: int) -> None:
        # Parts sized by what the dump can take (its dumpable pages), not by the source: a
        # filtered dump of a 1 TiB machine took parts of 107 MiB for an object of 1.7 GB.
        super().expect(size)
        settings = self.settings
        self.parts = s3_part_plan(settings.replay_bytes, settings.expected_size)

    def connect(self) -> None:
        part, nbuf = self.parts
        if part * nbuf > max(self.settings.replay_bytes, S3_MIN_PART):
            log.warning(
                "%s: a file of up to %d MiB needs upload parts of %d MiB (S3 takes at most "
                "%d parts), more than the %d MiB the memory budget gives",
                self.describe(),
                self.settings.expected_size >> 20,
                part >> 20,
                S3_MAX_PARTS,
                self.settings.replay_bytes >> 20,
            )
        super().connect()

    # -- connection and errors -----------------------------------------------------------
    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise ConnectionLost(f"{self.describe()}: not connected")
        return self._conn

    def _open(self) -> None:
        if self.https and self.tls is None:
            tls = ssl.create_default_context()
            if self.ca_bundle:
                load_ca_bundle(tls, self.ca_bundle)  # exit 2, as the builder says at load
            self.tls = tls
        if self._conn is not None:
            self._conn.close()
        self._conn = Connection(self)

    def _ensure_root(self) -> None:
        # One listing proves that the bucket exists and that the store takes our signature
        # (a write-only account's AccessDenied proves the signature; a PUT the bucket).
        try:
            self.conn.request("GET", None, self._list_query(self._dir_key(""), "", 1))
        except Denied as e:
            self._unlisted(e)

    def _unlisted(self, e: Denied) -> None:
        """The store will not list to our key (a write-only "drop box" account, so that
        one host cannot read the others' dumps): what we cannot see we never judge."""
        log.debug("%s", e)
        self.listable = False
        self.note_once(
            "the store refuses to list to our key (AccessDenied: a write-only account): "
            "the dumps already there were not looked at, so none were rotated "
            "(KDUMP_KEEP_OLD_DUMPS did not apply) and no leftovers of failed saves removed"
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def convert(self, e: BaseException, what: str) -> Exception:
        if not_the_servers(e):
            return e
        if isinstance(e, (TransportError, FileExistsError)):
            if isinstance(e, S3Error) and not isinstance(e, AuthError):
                return type(e)(f"{what}: {e}", e.code, e.status)
            return e
        if is_connection_lost(e) or isinstance(e, http.client.HTTPException):
            return ConnectionLost(f"{what}: connection lost ({e or type(e).__name__})")
        if isinstance(e, ssl.SSLCertVerificationError):
            return AuthError(
                f"{what}: {self.endpoint}: certificate not trusted ({e.verify_message})"
            )
        if isinstance(e, (ET.ParseError, ValueError)):
            return TransportError(f"{what}: malformed reply from {self.endpoint}: {e}")
        return TransportError(f"{what}: {e or type(e).__name__}")

    def error(self, status: int, headers, body: bytes, key: str | None) -> Exception:
        """Our error for an S3 error reply (the module boundary for server refusals)."""
        code, message, endpoint = error_code(body, "Endpoint")
        where = f"{self.describe()}" + (f" {key}" if key else "")
        text = f"{code or status}: {message}" if message else (code or f"HTTP {status}")
        if code == "PermanentRedirect" or status == 301:
            # The bucket lives elsewhere (AWS: another region's endpoint). Not followed: a
            # request goes to the configured host only. Name where, or the admin must guess.
            region = clean((headers or {}).get("x-amz-bucket-region", ""), MAX_ERROR_TEXT)
            # AWS names the virtual-hosted name (BUCKET.s3.REGION.amazonaws.com); path-style
            # requests go to the host without the bucket
            endpoint = endpoint.removeprefix(f"{self.bucket}.")
            there = f"{endpoint or 'another endpoint'}" + (f" (region {region})" if region else "")
            return TargetSettingError(
                f"{where}: the store says bucket {self.bucket!r} is at {there}, not at "
                f"{self.endpoint}: name that host in the target URL"
                + (" and set KDUMP_S3_REGION" if region else "")
                + f" ({text})"
            )
        if code == "RequestTimeTooSkewed":
            return Skewed(f"{where}: {text}", server_time(headers))
        if code == "AccessDenied":
            return Denied(f"{where}: the store refused this request to our key ({text})")
        if code in _AUTH_CODES or (status in (401, 403) and not code):
            return AuthError(f"{where}: the store refused our credentials ({text})")
        if code == "NoSuchBucket":
            return S3Error(
                f"{self.describe()}: bucket {self.bucket!r} does not exist on {self.endpoint} "
                "(create it first; kdump-capture never creates buckets)",
                code,
                status,
            )
        if code in ("EntityTooLarge", "QuotaExceeded") or status == 507:
            return TargetFull(f"{where}: the store is full ({text})")
        if status >= 500 or code in _TRANSIENT_CODES:
            # worth retrying (retry_call says when, and when it gives up)
            return ConnectionLost(f"{where}: the store failed ({text})")
        return S3Error(f"{where}: {text}", code, status)

    def learn_clock(self, e: Skewed) -> None:
        """Sign with the server's time from now on (its Date header says what it is)."""
        server = e.server_time
        if server is None:
            raise e
        with self._lock:
            offset = server - time.time()
            log.warning(
                "%s: our clock is %+.0f s off the store's (RequestTimeTooSkewed); "
                "signing with the store's time (Date header) and retrying once",
                self.describe(),
                -offset,
            )
            self.signer.offset = offset

    # -- keys ----------------------------------------------------------------------------
    def _key(self, relpath: str) -> str:
        rel = relpath.strip("/")
        return f"{self.prefix}/{rel}" if self.prefix and rel else (self.prefix or rel)

    def _dir_key(self, relpath: str) -> str:
        """The key prefix of a directory, ending in ``/`` ("" for the bucket's root)."""
        key = self._key(relpath)
        return f"{key}/" if key else ""

    @staticmethod
    def _list_query(prefix: str, delimiter: str, max_keys: int = BATCH, token: str = "") -> dict:
        # encoding-type=url: S3 keys may hold control characters, which XML 1.0 cannot;
        # AWS documents that its listing of them does not parse (ours refuses "&#x1;"), so
        # one such object below a shared prefix would fail every host's save there, and
        # SeaweedFS lists U+FFFD in their place (a name that deletes nothing).
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys), "encoding-type": "url"}
        if delimiter:
            q["delimiter"] = delimiter
        if token:
            q["continuation-token"] = token
        return q

    def _list(self, prefix: str, delimiter: str) -> Iterator[tuple[str, str, int]]:
        """("dir"|"file", key, size) below ``prefix``, page by page (ListObjectsV2).

        A page's continuation token must be new: a store that hands one out again would
        list forever (a `list` sent 36,000 requests in 30 s, a save never got past
        rotation), each request in time. botocore's paginators refuse a repeated token too.
        """
        token = ""
        seen: set[bytes] = set()  # digests: a store may send long tokens
        while True:
            q = self._list_query(prefix, delimiter, BATCH, token)
            what = f"listing {prefix}"
            reply = self.call(lambda q=q: self.conn.request("GET", None, q), what)
            entries, token = parse_listing(reply.body)
            yield from entries
            if token is None:
                raise TransportError(
                    f"{self.describe()}: {what}: the store says the listing goes on but "
                    "sent no continuation token (does it speak ListObjectsV2?)"
                )
            if not token:
                return
            digest = hashlib.sha256(token.encode()).digest()
            if digest in seen:
                raise TransportError(
                    f"{self.describe()}: {what}: the store sent a continuation token it had "
                    f"sent before, after {len(seen) + 1} pages (a listing that never ends)"
                )
            seen.add(digest)

    # -- the contract --------------------------------------------------------------------
    def makedir(self, relpath: str) -> None:
        key = self._dir_key(relpath)
        what = f"creating {key}"
        conditional = not self.listable
        if self.listable:
            try:
                found = self.call(
                    lambda: self.conn.request("GET", None, self._list_query(key, "", 1)), what
                )
            except Denied as e:
                log.debug("%s; a conditional write instead", e)
                conditional = True
            else:
                if _children(parse_xml(found.body, what), "Contents"):
                    raise FileExistsError(f"{key} exists")
        # Without a listing the store itself must refuse to replace an existing mark (a
        # conditional write: AWS, MinIO, Ceph and SeaweedFS answer 412), or a second save
        # of the same crash would overwrite the first one's files.
        headers = {"If-None-Match": "*"} if conditional else {}
        try:
            self.call(lambda: self.conn.request("PUT", key, headers=headers), what)
        except S3Error as e:
            if e.status == 412:
                raise FileExistsError(f"{key} exists") from None
            raise

    def create(self, relpath: str) -> Sink:
        key = self._key(relpath)
        return S3Sink(self, key, posixpath.basename(key))

    def listdir(self, relpath: str = "") -> list[Entry]:
        prefix = self._dir_key(relpath)
        out = []
        try:
            for kind, key, size in self._list(prefix, "/"):
                name = key[len(prefix) :].rstrip("/") if key.startswith(prefix) else ""
                if not name or "/" in name:  # the directory's own marker, or not below it
                    continue
                out.append(Entry(name, kind == "dir", size))
        except Denied as e:
            # list and verify need the listing; a dump directory that may not be listed is
            # left alone by the save (pipeline._state); only the root means a write-only key
            if self.settings.read_only or prefix != self._dir_key(""):
                raise Denied(f"{e} (listing {prefix})") from None
            self._unlisted(e)  # a save: nothing it may judge (as FTP's upload-only 550)
            return []
        return sorted(out, key=lambda e: e.name)

    def read(self, relpath: str, limit: int | None = None) -> Iterator[bytes]:
        """Objects are plain (no links, no FIFOs): only the limit needs checking, against
        Content-Length first and then while streaming.

        A connection lost mid-object (a reset, a timeout, or a body shorter than its
        Content-Length) is picked up where it broke: a ranged GET of the rest on a new
        connection, only of the same object (If-Match its ETag), with the usual bounded
        retries; a reply that is not that rest fails, never splices.
        """
        key = self._key(relpath)
        conn = Connection(self)
        within = self.read_deadline(limit)
        # A store trickling a manifest: the whole read is bounded. The timer breaks a read
        # blocked inside one chunk; once it has fired, _get resumes no more.
        guard = (
            deadline(within, f"reading {key}", conn.drop)
            if within is not None
            else contextlib.nullcontext(threading.Event())
        )
        try:
            with guard as late:
                yield from bounded(self._get(conn, key, limit, late), limit, key)
        finally:
            conn.close()

    def _get(
        self, conn: Connection, key: str, limit: int | None, late: threading.Event
    ) -> Iterator[bytes]:
        what = f"reading {key}"
        resp = self.call(lambda: conn.request("GET", key, stream=True), what)
        length = resp.getheader("Content-Length") or ""
        total = int(length) if length.isascii() and length.isdigit() else None
        if total is not None:
            check_size(total, limit, key)
        etag = resp.getheader("ETag")
        got = 0
        stalls = 0  # drops in a row with nothing read since the last one
        while True:
            try:
                chunk = resp.read(READ_CHUNK)
                lost = None if chunk or total is None or got >= total else "closed early"
            except (OSError, http.client.HTTPException) as e:
                chunk, lost = b"", str(e) or type(e).__name__
            if late.is_set():
                raise ConnectionLost(f"{what}: past its deadline")
            if chunk:
                got += len(chunk)
                stalls = 0
                yield chunk
                continue
            if lost is None:
                return
            err = ConnectionLost(f"{what}: connection lost at byte {got} of {total} ({lost})")
            conn.close()
            if total is None or not etag:
                raise err  # no way to ask for exactly the rest of this object
            stalls += 1
            if stalls > self.settings.retries:
                raise ConnectionLost(f"{err}; {stalls - 1} resumes read nothing")
            log.warning("%s; resuming with a ranged GET", err)
            resp = retry_call(
                lambda at=got: self._rest(conn, key, at, total, etag),
                conn.close,
                self.settings,
                f"resuming {what} at byte {got}",
                first_error=err,
            )

    def _rest(
        self, conn: Connection, key: str, start: int, total: int, etag: str
    ) -> http.client.HTTPResponse:
        """The open response to a GET of bytes ``start``.. of ``key`` as it was (``etag``)."""
        what = f"reading {key}"
        headers = {"Range": f"bytes={start}-", "If-Match": etag}
        try:
            resp = conn.request("GET", key, headers=headers, ok=(200, 206), stream=True)
        except S3Error as e:
            if e.status == 412:
                raise TransportError(f"{what}: the object changed while it was read") from None
            raise
        expect = f"bytes {start}-{total - 1}/{total}"
        got = resp.getheader("Content-Range") or ""
        if resp.status != 206 or got.strip() != expect:
            conn.close()
            raise TransportError(
                f"{what}: asked for the rest from byte {start}, the store answered "
                f"{resp.status} {got or 'without Content-Range'}; cannot resume"
            )
        return resp

    def remove_file(self, relpath: str) -> None:
        """The engine removes a file only to write it again (README.txt), and a PUT replaces
        an object whole: a key that may not delete (a write-only account's policy) leaves
        it to that PUT, rather than the placeholder saying "INCOMPLETE" beside a good dump."""
        key = self._key(relpath)
        try:
            self.call(
                lambda: self.conn.request("DELETE", key, ok=(200, 204, 404)), f"removing {key}"
            )
        except Denied as e:
            log.info("%s; writing it again replaces it", e)

    def remove_tree(self, relpath: str) -> None:
        if not relpath.strip("/"):
            raise TransportError("refusing to remove the target root")
        prefix = self._dir_key(relpath)
        self._tell_versions()
        # Unfinished uploads first: while the directory still has objects it is listed, and
        # a later run finds it again. Aborted last, an abort that failed (the store gone,
        # a run killed) left parts no run would ever see again, paid for as stored data.
        self._abort_uploads(prefix)
        # Files first, then directory marks deepest first: stores that keep real folders
        # (SeaweedFS) leave an empty folder listed when its mark goes before its contents.
        keys = sorted(
            (key for _, key, _ in self._list(prefix, "")),
            key=lambda k: (k.endswith("/"), -k.count("/")),
        )
        # The marks first, each on its own: a batch is deleted in no promised order.
        for mark in (prefix + m for m in MARKS_FIRST):
            if mark in keys:
                keys.remove(mark)
                self._delete_objects([mark])
        for i in range(0, len(keys), BATCH):
            self._delete_objects(keys[i : i + BATCH])

    def _tell_versions(self) -> None:
        """Warn (once) when the bucket keeps versions: a deletion then only hides a dump,
        all of its memory stays readable (GetObjectVersion) until a lifecycle rule expires
        it. Deleting versions is the bucket owner's choice, not rotation's."""
        if self._asked_versioning:
            return
        self._asked_versioning = True
        what = f"asking whether bucket {self.bucket!r} keeps versions"
        try:
            reply = self.call(lambda: self.conn.request("GET", None, {"versioning": ""}), what)
            status = _text(parse_xml(reply.body, what), "Status")
        except ConnectionLost:
            raise
        except TransportError as e:  # not allowed to ask (GetBucketVersioning): say nothing
            log.debug("%s", e)
            return
        if status in ("Enabled", "Suspended"):
            log.warning(
                "%s: bucket %r keeps object versions (versioning %s): a deleted dump only "
                "gets delete markers, its objects stay (noncurrent versions) until a "
                "lifecycle rule expires them",
                self.describe(),
                self.bucket,
                clean(status, MAX_ERROR_TEXT),
            )

    def _delete_objects(self, keys: list[str]) -> None:
        # A key XML 1.0 cannot carry goes in a DeleteObject of its own, as AWS advises;
        # a carriage return as a reference (a parser reads a bare one as a line feed).
        for k in [k for k in keys if _NOT_XML.search(k)]:
            self.call(
                lambda k=k: self.conn.request("DELETE", k, ok=(200, 204, 404)), f"deleting {k!r}"
            )
        keys = [k for k in keys if not _NOT_XML.search(k)]
        if not keys:
            return
        objects = "".join(f"<Object><Key>{escape(k, _CR)}</Key></Object>" for k in keys)
        body = f"<Delete><Quiet>true</Quiet>{objects}</Delete>".encode()
        # DeleteObjects requires an integrity header; MD5 is the one every store takes.
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        what = f"deleting {len(keys)} objects below {keys[0]}"
        reply = self.call(
            lambda: self.conn.request("POST", None, {"delete": ""}, body, {"Content-MD5": md5}),
            what,
        )
        errors = _children(parse_xml(reply.body, what), "Error")
        if errors:
            first = errors[0]
            raise TransportError(
                f"{what}: {len(errors)} not deleted, e.g. {_text(first, 'Key')}: "
                f"{_text(first, 'Code')} {_text(first, 'Message')}"
            )

    def _abort_uploads(self, prefix: str) -> None:
        """Abort multipart uploads below ``prefix`` (a run killed mid-upload leaves them)."""
        q = {"uploads": "", "prefix": prefix}
        try:
            reply = self.call(
                lambda: self.conn.request("GET", None, q), f"listing uploads {prefix}"
            )
        except Denied as e:  # a key without ListBucketMultipartUploads: delete what it can
            if not self._told_uploads:
                self._told_uploads = True
                log.warning(
                    "%s; parts of uploads an interrupted save left are not removed, a "
                    "lifecycle rule (AbortIncompleteMultipartUpload) must remove them",
                    e,
                )
            return
        for u in _children(parse_xml(reply.body, f"listing uploads {prefix}"), "Upload"):
            key, upload_id = _text(u, "Key"), _text(u, "UploadId")
            if not key.startswith(prefix) or not upload_id:
                continue
            log.info("aborting the unfinished upload of %s", key)
            self.call(
                lambda k=key, i=upload_id: self.conn.request(
                    "DELETE", k, {"uploadId": i}, ok=(200, 204, 404)
                ),
                f"aborting upload of {key}",
            )

    def free_space(self, relpath: str = "") -> int | None:
        if not self._told_free:
            log.info(
                "%s: an object store has no free space to report; KDUMP_FREE_DISK_SIZE "
                "does not apply",
                self.describe(),
            )
            self._told_free = True
        return None
