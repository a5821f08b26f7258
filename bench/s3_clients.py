"""Which S3 client for the capture kernel: image size added, RSS and throughput, measured.

Each candidate runs in a child interpreter that first imports what an FTP capture imports
(our engine and the transport base: the baseline), then uploads one file (default 1 GiB,
random, in the page cache) by multipart upload to SeaweedFS on loopback (the test fixture),
with the same part size and at most two parts in flight. The child reports wall time, its
RSS after the baseline imports and its peak RSS (VmHWM), every module it loaded and every
file it opened. The parent prices what the candidate adds to a capture initramfs exactly as
``initramfs/runtime.py`` packs it: ``.pyc`` bytes of new Python modules, stripped extension
modules, shared libraries they link that the baseline does not, and data files read at run
time (botocore's JSON models). Candidates:

- boto3 ``upload_fileobj`` (botocore client + s3transfer), 2 threads;
- botocore's SigV4 signer (``botocore.auth.S3SigV4Auth``) with ``http.client``, parts in turn;
- minio ``put_object`` (2 parallel uploads); obstore ``put`` (Rust object_store, 2 parts);
- aws-sdk-signers: needs Python >= 3.12 (this product runs the host's 3.11), not installable;
- ours: ``transports.s3`` as the engine drives it (1 MiB writes).

minio and obstore are installed into a throw-away venv (``--venv``, default under
~/.cache/kdump-capture) so the host's site-packages stay as they are.

    python3 bench/s3_clients.py [--size-mb 1024] [--part-mb 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from initramfs import runtime  # noqa: E402
from tests.servers.s3 import REGION, seaweed  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "s3_clients.md")
VENV = os.path.expanduser("~/.cache/kdump-capture/bench-s3-venv")
MiB = 1 << 20

HARNESS = r"""
import json, os, sys, time
sys.path.insert(0, ROOT)
opened = set()
def _audit(event, args):
    if event == "open" and isinstance(args[0], str):
        opened.add(args[0])
sys.addaudithook(_audit)
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
import_rss = None
def _mark():  # after a client's imports: what importing it costs, before any buffer
    global import_rss
    import_rss = _status("VmRSS")
import kdump_capture.pipeline, kdump_capture.cli, transports.base  # the baseline
BASELINE_ONLY = BASE
base_rss = _status("VmRSS")
src, key, part, endpoint, ak, sk, bucket, region = sys.argv[1:9]
part = int(part)
t0 = time.monotonic()
if not BASELINE_ONLY:
    CLIENT
elapsed = time.monotonic() - t0
mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
json.dump({"seconds": elapsed, "base_rss": base_rss, "peak_rss": _status("VmHWM"),
           "import_rss": import_rss or base_rss,
           "modules": mods, "opened": sorted(opened)}, sys.stdout)
"""

CLIENTS: dict[str, str] = {
    "boto3 upload_fileobj": r"""
import ssl, boto3
from botocore.config import Config
from boto3.s3.transfer import TransferConfig
_mark()
c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                 region_name=region, config=Config(s3={"addressing_style": "path"}))
with open(src, "rb") as f:
    c.upload_fileobj(f, bucket, key, Config=TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=2))
""",
    "botocore signer + http.client": r"""
import ssl, http.client, hashlib, re
from urllib.parse import quote
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
_mark()
signer = S3SigV4Auth(Credentials(ak, sk), "s3", region)
host = endpoint.split("//", 1)[1]
conn = http.client.HTTPConnection(host, timeout=60)
def call(method, path, body=b"", query=""):
    url = f"{endpoint}{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method=method, url=url, data=body)
    signer.add_auth(req)
    target = path + (f"?{query}" if query else "")
    conn.request(method, target, body=body, headers=dict(req.headers))
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, (r.status, data[:300])
    return r, data
path = f"/{bucket}/{quote(key)}"
_, doc = call("POST", path, query="uploads=")
upload = re.search(rb"<UploadId>([^<]+)", doc).group(1).decode()
buf = bytearray(part)
etags = []
with open(src, "rb", buffering=0) as f:
    n = 1
    while True:
        got = 0
        while got < part and (k := f.readinto(memoryview(buf)[got:])):
            got += k
        if not got:
            break
        r, _ = call("PUT", path, bytes(buf[:got]), f"partNumber={n}&uploadId={quote(upload)}")
        etags.append(r.getheader("ETag"))
        n += 1
body = "<CompleteMultipartUpload>" + "".join(
    f"<Part><PartNumber>{i}</PartNumber><ETag>{e}</ETag></Part>" for i, e in enumerate(etags, 1)
) + "</CompleteMultipartUpload>"
call("POST", path, body.encode(), f"uploadId={quote(upload)}")
""",
    "minio put_object": r"""
import ssl
from minio import Minio
_mark()
c = Minio(endpoint.split("//", 1)[1], access_key=ak, secret_key=sk, secure=False, region=region)
with open(src, "rb") as f:
    c.put_object(bucket, key, f, length=-1, part_size=part, num_parallel_uploads=2)
""",
    "obstore put": r"""
import obstore
from obstore.store import S3Store
_mark()
store = S3Store(bucket, endpoint=endpoint, access_key_id=ak, secret_access_key=sk,
                region=region, virtual_hosted_style_request=False,
                client_options={"allow_http": True})
with open(src, "rb") as f:
    obstore.put(store, key, f, chunk_size=part, max_concurrency=2)
""",
    "ours (transports.s3)": r"""
from kdump_capture.urls import parse_target
from transports import open_transport
from transports.base import TransportSettings
import transports.s3
_mark()
t, _ = parse_target(endpoint.replace("http://", "s3+http://") + f"/{bucket}")
t = t.replace(user=ak, password=sk)
settings = TransportSettings(timeout=60.0, replay_bytes=2 * part)
buf = bytearray(1 << 20)
view = memoryview(buf)
with open_transport(t, settings) as tr, open(src, "rb", buffering=0) as f:
    with tr.create(key) as sink:
        while n := f.readinto(buf):
            sink.write(view[:n])
        sink.commit()
""",
}
VENV_ONLY = {"minio put_object", "obstore put"}


def ensure_venv(path: str) -> str:
    """A venv (seeing the host's packages) with minio and obstore; its python."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path], check=True)
    probe = subprocess.run([python, "-c", "import minio, obstore"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "minio", "obstore"], check=True)
    return python


def run_child(python: str, label: str | None, args: list[str]) -> dict:
    code = HARNESS.replace("ROOT", repr(ROOT)).replace("BASE", repr(label is None))
    body = CLIENTS[label] if label else "pass"
    code = code.replace("    CLIENT", "\n".join("    " + line for line in body.splitlines()))
    p = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{label}: {p.stderr[-3000:]}")
    return json.loads(p.stdout)


def priced(report: dict, baseline: dict, tmp: str) -> tuple[int, int, int]:
    """Bytes a capture initramfs gains for this client: (python modules, native code, data)."""
    base_files = {os.path.realpath(f) for f in baseline["modules"].values() if f}
    base_files |= {os.path.realpath(f) for f in baseline["opened"]}
    new_py, new_so = [], []
    for f in sorted({os.path.realpath(f) for f in report["modules"].values() if f}):
        if f in base_files or not os.path.exists(f):
            continue
        (new_py if f.endswith(".py") else new_so if f.endswith(".so") else []).append(f)
    py = sum(len(runtime.pyc_bytes(f, "x.pyc")) for f in new_py)
    so = sum(os.path.getsize(runtime.strip_into(f, tmp)) for f in new_so)
    base_elves = [sys.executable] + [f for f in base_files if f.endswith(".so")]
    base_libs = set(runtime.shared_libs(base_elves).values())
    for lib in set(runtime.shared_libs(new_so).values()) - base_libs:
        so += os.path.getsize(runtime.strip_into(os.path.realpath(lib), tmp))
    data = 0
    for f in report["opened"]:
        real = os.path.realpath(f)
        if (
            real not in base_files
            and "-packages" in real
            and not real.endswith((".py", ".pyc", ".so"))
            and os.path.isfile(real)
        ):
            data += os.path.getsize(real)
            base_files.add(real)
    return py, so, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--part-mb", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--venv", default=VENV)
    ap.add_argument("--only", default="", help="comma-separated label prefixes to run")
    args = ap.parse_args()
    venv_python = ensure_venv(args.venv)
    size = args.size_mb * MiB
    part = args.part_mb * MiB
    work = tempfile.mkdtemp(prefix="kdump-bench-s3-")
    rows = []
    load_before = os.getloadavg()[0]
    try:
        src = os.path.join(work, "src")
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(MiB))
        with seaweed(os.path.join(work, "weed")) as s3:
            common = [str(part), f"http://{s3.host}:{s3.port}", s3.access_key, s3.secret_key]
            common += [s3.bucket, REGION]
            baseline = run_child(sys.executable, None, [src, "base", *common])
            only = [o for o in args.only.split(",") if o]
            for label in [c for c in CLIENTS if not only or c.startswith(tuple(only))]:
                python = venv_python if label in VENV_ONLY else sys.executable
                times, peaks, imports = [], [], []
                for i in range(args.runs):
                    key = f"bench/{i}-{label.split()[0]}"
                    r = run_child(python, label, [src, key, *common])
                    got = s3.client().head_object(Bucket=s3.bucket, Key=key)["ContentLength"]
                    assert got == size, f"{label}: uploaded {got} bytes of {size}"
                    s3.client().delete_object(Bucket=s3.bucket, Key=key)
                    times.append(r["seconds"])
                    peaks.append(r["peak_rss"] - r["base_rss"])
                    imports.append(r["import_rss"] - r["base_rss"])
                py, so, data = priced(r, baseline, work)
                row = (label, statistics.median(times), max(peaks), r["peak_rss"], py, so, data)
                row += (max(imports),)
                rows.append(row)
                print(
                    f"{label:32} {size / row[1] / 1e6:7.1f} MB/s  RSS +{row[2] / MiB:5.1f} MiB "
                    f"(import +{row[7] / MiB:4.1f}) "
                    f"(peak {row[3] / MiB:5.1f})  image +{(py + so + data) / MiB:5.1f} MiB "
                    f"(py {py / MiB:.1f}, native {so / MiB:.1f}, data {data / MiB:.1f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(rows, args, baseline, (load_before, os.getloadavg()[0]))


def _write(rows, args, baseline, load) -> None:
    lines = [
        "# S3 client candidates for the capture kernel",
        "",
        f"`python3 bench/s3_clients.py --size-mb {args.size_mb} --part-mb {args.part_mb} "
        f"--runs {args.runs}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, SeaweedFS "
        f"on loopback, {args.part_mb} MiB parts, at most 2 parts in flight; 1-minute load "
        f"{load[0]:.1f} before, {load[1]:.1f} after). RSS: peak (VmHWM) minus the RSS after "
        f"importing the save path ({baseline['base_rss'] / MiB:.1f} MiB); worst of the runs. "
        "Image: what `initramfs/runtime.py` would add to a capture image over the FTP one "
        "(.pyc, stripped native code and the libraries it links, data files read).",
        "",
        "| client | MB/s (median) | RSS added | of it, imports | peak RSS | image added | .pyc "
        "| native | data |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    size = args.size_mb * MiB
    for label, secs, added, peak, py, so, data, imported in rows:
        lines.append(
            f"| {label} | {size / secs / 1e6:.0f} | {added / MiB:.1f} MiB "
            f"| {imported / MiB:.1f} MiB | {peak / MiB:.1f} MiB "
            f"| {(py + so + data) / MiB:.1f} MiB | {py / MiB:.1f} | {so / MiB:.1f} "
            f"| {data / MiB:.1f} |"
        )
    lines += [
        "| aws-sdk-signers + http.client | - | - | - | - | - | - | - | - |",
        "",
        "aws-sdk-signers (0.4.0) declares Requires-Python >= 3.12 for every release; the "
        "capture runs the host's Python 3.11, so pip finds no version to install.",
    ]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
