"""Build a transport for one of the test servers, rooted in a fresh directory."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace

from kdump_capture.urls import parse_target
from transports import open_transport
from transports.base import Transport, TransportSettings

KINDS = ("file", "sftp", "ftp", "vsftpd", "cifs", "s3")
SETTINGS = TransportSettings(timeout=10.0, retries=3, retry_delay=0.05)


@dataclass
class TestTarget:
    """A transport URL and where its root lives on the server side (same machine)."""

    kind: str
    url: str
    server_dir: str  # filesystem path of the transport's root directory (S3: key prefix)
    settings: TransportSettings
    s3: object | None = None  # the S3Server, for kind "s3"

    def files(self) -> list[str]:
        """Every file below the root as the server holds it (S3: keys, no directory marks)."""
        if self.s3 is not None:
            top = self.server_dir + "/"
            keys = self.s3.keys(top)
            return sorted(k[len(top) :] for k in keys if not k.endswith("/"))
        out = []
        for dirpath, _, names in os.walk(self.server_dir):
            out += [os.path.relpath(os.path.join(dirpath, n), self.server_dir) for n in names]
        return sorted(out)

    def read_back(self, relpath: str) -> bytes:
        """A file's bytes as the server holds them, read around the transport."""
        if self.s3 is not None:
            return self.s3.get(f"{self.server_dir}/{relpath}")
        with open(os.path.join(self.server_dir, relpath), "rb") as f:
            return f.read()

    def transport(self, **overrides) -> Transport:
        target, _ = parse_target(self.url)
        return open_transport(target, self.settings.replace(**overrides))

    def via_port(self, port: int) -> TestTarget:
        """The same target reached through another port on 127.0.0.1 (a proxy)."""
        host, _, rest = self.url.partition("127.0.0.1:")
        _, _, path = rest.partition("/")
        return replace(self, url=f"{host}127.0.0.1:{port}/{path}")


def make_target(kind: str, request, sub: str = "") -> TestTarget:
    """``sub``: a directory (relative to the server's root) to place the target in."""
    name = sub or f"t-{secrets.token_hex(4)}"
    if kind == "file":
        d = request.getfixturevalue("tmp_path") / name
        return TestTarget(kind, f"file://{d}", str(d), SETTINGS)
    if kind == "sftp":
        s = request.getfixturevalue("ssh_server")
        d = os.path.join(s.workdir, "data", name)
        st = SETTINGS.replace(ssh_identity=(s.client_key,), host_key=s.host_key)
        return TestTarget(kind, f"sftp://root@{s.host}:{s.port}{d}", d, st)
    if kind in ("ftp", "vsftpd"):
        s = request.getfixturevalue("ftp_server" if kind == "ftp" else "vsftpd_server")
        url_path = os.path.join(s.url_root, name)
        d = os.path.join(s.root, name)
        url = f"ftp://{s.user}:{s.password}@{s.host}:{s.port}{url_path}"
        return TestTarget(kind, url, d, SETTINGS)
    if kind == "cifs":
        s = request.getfixturevalue("smb_server")
        url = f"cifs://{s.user}:{s.password}@{s.host}:{s.port}/{s.share}/{name}"
        return TestTarget(kind, url, os.path.join(s.root, name), SETTINGS)
    if kind == "s3":
        s = request.getfixturevalue("s3_server")
        return TestTarget(kind, s.url(name), name, SETTINGS, s3=s)
    raise ValueError(kind)
