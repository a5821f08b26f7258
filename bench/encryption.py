"""Encrypted dumps (KDUMP_ENCRYPT_TO): pyrage versus the age format on `cryptography`.

    python3 bench/encryption.py [--vmcore FILE] [--runs 3] [--mib 256] [--scratch DIR]

(The fixed cost of encryption, importing cryptography and wrapping the file key, is about
0.2 s on one CPU: on the 376 MB sample it shows as a larger ratio than on a real-sized dump,
so the default is the 2 GiB sample.)

Three measurements, all on one CPU (``taskset -c 0``, as a capture kernel has ``nr_cpus=1``):
1. What each candidate adds to a capture initramfs (computed by initramfs/runtime.py, the
   code that decides what is packed: stripped ELF files and .pyc, zstd -19 as the builder
   compresses), for a file target (no cryptography otherwise) and an SFTP target (paramiko
   brings cryptography already).
2. Raw encryption throughput of ``--mib`` MiB through each: our streaming Encryptor
   (age.py: ChaCha20-Poly1305 ``encrypt_into``, OpenSSL) and ``pyrage.encrypt_io``.
3. The whole `kdump-capture save` of a real vmcore with and without encryption, per format
   and level, alternating runs; medians and the ratio (the limit is 1.2x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.measure import save_args  # noqa: E402

ONE_CPU = ["taskset", "-c", "0"]
CASES = [("ELF", 0), ("ELF", 31), ("compressed", 31), ("zstd", 1), ("lzo", 31)]


def _zstd19(data: bytes) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(data))


def payload_bytes(files: dict[str, bytes | str]) -> tuple[int, int]:
    """(unpacked, zstd -19) bytes of a set of archive files."""
    blob = b"".join(v if isinstance(v, bytes) else open(v, "rb").read() for v in files.values())
    return len(blob), _zstd19(blob)


def image_added(tmp: str) -> list[tuple[str, str, int, int]]:
    """(target, candidate, unpacked, compressed) bytes added to the runtime payload."""
    from initramfs import runtime

    rows = []
    for scheme in ("file", "sftp"):
        base = runtime.collect([scheme], tmp).files
        ours = runtime.collect([scheme], tmp, features=("encrypt",)).files
        added = {k: v for k, v in ours.items() if k not in base}
        rows.append((scheme, "age.py on cryptography", *payload_bytes(added)))
        # pyrage: what importing it loads beyond the same base (probe of the real import).
        report = runtime.probe(["pyrage"])
        files: dict[str, bytes | str] = {}
        for name, path in report["modules"].items():
            if not path or not name.startswith("pyrage"):
                continue
            dest = f"pyrage/{os.path.basename(path)}"
            if path.endswith(".py"):
                files[dest] = runtime.pyc_bytes(path, dest + "c")
            else:
                files[dest] = runtime.strip_into(path, tmp)
        rows.append((scheme, "pyrage 1.2.3", *payload_bytes(files)))
    return rows


RAW = r"""
import io, os, sys, time
sys.path.insert(0, ROOT)
mib = MIB
data = os.urandom(1 << 20) * mib
which = WHICH
if which == "cryptography":
    from kdump_capture import age
    key = age.bech32_encode("age", age._x25519_base(os.urandom(32)))
    rec = age.parse_recipients(key)
    sink = []
    t = time.perf_counter()
    enc = age.Encryptor(rec, lambda v: None)
    view = memoryview(data)
    for i in range(0, len(data), 1 << 20):
        enc.write(view[i : i + (1 << 20)])
    enc.finish()
else:
    import pyrage
    rec = [pyrage.x25519.Identity.generate().to_public()]
    src, dst = io.BytesIO(data), io.BytesIO()
    t = time.perf_counter()
    pyrage.encrypt_io(src, dst, rec)
print(time.perf_counter() - t)
"""


PIECES = r"""
import hashlib, os, time, zlib
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
n = MIB << 20
view = memoryview(bytearray(os.urandom(1 << 20)) * MIB)
aead, out = ChaCha20Poly1305(os.urandom(32)), bytearray((64 << 10) + 16)
def seal():
    for i in range(0, n, 64 << 10):
        aead.encrypt_into(i.to_bytes(12, "big"), view[i : i + (64 << 10)], None, out)
for name, fn in (("SHA-256 (hashlib)", lambda: hashlib.sha256(view).digest()),
                 ("ChaCha20-Poly1305, 64 KiB chunks", seal),
                 ("CRC-32 (zlib), for comparison", lambda: zlib.crc32(view))):
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    print(f"{name}\t{min(times)}")
"""


def pieces(mib: int, runs: int) -> list[tuple[str, float]]:
    """Best-of-``runs`` seconds for ``mib`` MiB of each piece of the encrypted path."""
    code = PIECES.replace("MIB", str(mib)).replace("RUNS", str(runs))
    out = subprocess.run(
        [*ONE_CPU, sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return [(ln.split("\t")[0], float(ln.split("\t")[1])) for ln in out.splitlines()]


def raw_speed(which: str, mib: int) -> float:
    code = RAW.replace("ROOT", repr(ROOT)).replace("MIB", str(mib)).replace("WHICH", repr(which))
    out = subprocess.run(
        [*ONE_CPU, sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def save_cmd(src: str, dumps: str, fmt: str, level: int, recipient: str) -> list[str]:
    # SHA-256, as when bench/results/encryption*.md were taken (the default then), so that
    # a rerun measures the same work; with XXH3-128 the second checksum costs a tenth.
    extra = ["--set", f"KDUMP_ENCRYPT_TO={recipient}", "--set", "KDUMP_CHECKSUM=sha256"]
    return [*ONE_CPU, sys.executable, *save_args(src, f"file://{dumps}", fmt, level, extra=extra)]


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmcore", help="default: the 2 GiB real sample (tests/vmkit)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256, help="MiB for the raw throughput test")
    ap.add_argument("--scratch", default=None, help="filesystem to write dumps to")
    ap.add_argument(
        "--cases", default=",".join(f"{f}:{lv}" for f, lv in CASES), help="FORMAT:LEVEL,..."
    )
    ap.add_argument("--whole-only", action="store_true", help="only the whole-save table")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/encryption.md"))
    a = ap.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")]
    from kdump_capture import age

    src = a.vmcore
    if not src:
        from tests.vmkit import get_sample

        src = str(get_sample(2048).path)
    recipient = age.bech32_encode("age", age._x25519_base(os.urandom(32)))
    cmd = " ".join(sys.argv[1:])
    lines = [
        "# Encrypted dumps: pyrage vs the age format on `cryptography`",
        "",
        f"Command: `python3 bench/encryption.py {cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one CPU (`taskset -c 0`) "
        f"of {os.cpu_count()}; load average {os.getloadavg()[0]:.1f} (a shared machine)  ",
        "",
    ]
    if not a.whole_only:
        lines += candidates(a)
    lines += whole_saves(a, src, recipient, cases)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


def candidates(a: argparse.Namespace) -> list[str]:
    """Tables 1 and 2 (and the pieces): image size and raw speed of each candidate."""
    lines = [
        "## Added to the capture initramfs (runtime payload, stripped, zstd -19)",
        "",
        "| target | candidate | unpacked | compressed |",
        "|---|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, cand, unpacked, packed in image_added(tmp):
            lines.append(
                f"| {scheme} | {cand} | {unpacked / 2**20:.2f} MiB | {packed / 2**20:.2f} MiB |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"## Raw encryption, {a.mib} MiB, one CPU (best of {a.runs})",
        "",
        "| implementation | seconds | MB/s |",
        "|---|---:|---:|",
    ]
    for which, label in (
        (
            "cryptography",
            "age.py Encryptor (cryptography's ChaCha20-Poly1305 encrypt_into; also SHA-256 "
            "of the plaintext)",
        ),
        ("pyrage", "pyrage.encrypt_io (rage; BytesIO in and out)"),
    ):
        best = min(raw_speed(which, a.mib) for _ in range(a.runs))
        lines.append(f"| {label} | {best:.2f} | {a.mib * 2**20 / best / 1e6:.0f} |")
        print(lines[-1], flush=True)

    lines += [
        "",
        f"## The pieces, {a.mib} MiB in memory, one CPU (best of {a.runs})",
        "",
        "An encrypted save does what a plain one does plus one ChaCha20-Poly1305 pass and one "
        "more SHA-256 pass (the manifest records the stored ciphertext's and the plaintext's).",
        "",
        "| piece | MB/s | s per GB |",
        "|---|---:|---:|",
    ]
    for name, secs in pieces(a.mib, a.runs):
        rate = a.mib * 2**20 / secs
        lines.append(f"| {name} | {rate / 1e6:.0f} | {1e9 / rate:.2f} |")
        print(lines[-1], flush=True)
    return lines


def whole_saves(a: argparse.Namespace, src: str, recipient: str, cases) -> list[str]:
    """Table 3: the whole save with and without encryption, alternating runs."""
    size = os.path.getsize(src)
    where = os.path.abspath(a.scratch or tempfile.gettempdir())
    lines = [
        "",
        f"## Whole save, one CPU: `{src}` ({size} bytes), page cache warm, medians of {a.runs}",
        "",
        f"Dumps written below `{where}`.",
        "",
        "Both sides hash what they store (SHA-256, `KDUMP_CHECKSUM=sha256`); the encrypted side "
        "also hashes the plaintext (the manifest records both) and seals every 64 KiB with "
        "ChaCha20-Poly1305.",
        "",
        "| format | level | plain s | encrypted s | ratio | runs plain / encrypted |",
        "|---|---:|---:|---:|---:|---|",
    ]
    scratch = tempfile.mkdtemp(prefix="bench-enc-", dir=a.scratch)
    dumps = os.path.join(scratch, "dumps")
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)
    try:
        for fmt, level in cases:
            plain: list[float] = []
            enc: list[float] = []
            for _ in range(a.runs):
                for rec, out in (("", plain), (recipient, enc)):
                    shutil.rmtree(dumps, ignore_errors=True)
                    out.append(timed(save_cmd(src, dumps, fmt, level, rec)))
            p, e = statistics.median(plain), statistics.median(enc)
            runs = f"{', '.join(f'{t:.2f}' for t in plain)} / {', '.join(f'{t:.2f}' for t in enc)}"
            lines.append(f"| {fmt} | {level} | {p:.2f} | {e:.2f} | {e / p:.2f}x | {runs} |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return lines


if __name__ == "__main__":
    sys.exit(main())
