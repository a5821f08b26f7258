"""KDUMP_CHECKSUM: the manifest's algorithm per file, verify of each, old and hostile manifests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from initramfs import builder, runtime
from kdump_capture import checksum, manifest
from kdump_capture.errors import ManifestError
from kdump_capture.sample import SampleSpec, write_sample
from tests.servers.targets import make_target
from tests.test_encrypt import keys  # noqa: F401 (a fixture)
from tests.test_save_network import run_save, write_config

from .helpers import cli, save_args

XXH3 = ("KDUMP_CHECKSUM=xxh3",)
SHA256 = ("KDUMP_CHECKSUM=sha256",)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=8))
    return p


def _save(sample: Path, savedir: Path, *sets: str) -> Path:
    r = cli(*save_args(str(sample), str(savedir), *sets))
    assert r.rc == 0, r.err
    [name] = [n for n in os.listdir(savedir) if not n.startswith(".")]
    return savedir / name


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _rewrite(d: Path, change) -> None:
    doc = _manifest(d)
    change(doc)
    (d / "manifest.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def xxh3_dump(sample, tmp_path_factory):
    return _save(sample, tmp_path_factory.mktemp("x") / "dumps", *XXH3)


@pytest.fixture
def xd(xxh3_dump, tmp_path):
    """A fresh copy of the XXH3 dump for a test to damage."""
    out = tmp_path / xxh3_dump.name
    shutil.copytree(xxh3_dump, out)
    return out


def test_xxh3_save_records_it_and_verify_passes(xd, sample):
    files = _manifest(xd)["files"]
    assert set(files) == {"vmcore", "README.txt"}
    for name, info in files.items():
        assert info["algorithm"] == "xxh3-128" and "sha256" not in info, info
        # The reference tool agrees: an administrator can check a file with xxh128sum.
        ref = subprocess.run(["xxh128sum", str(xd / name)], capture_output=True, text=True)
        assert ref.returncode == 0, ref.stderr
        assert info["xxh3-128"] == ref.stdout.split()[0]
    assert (xd / "vmcore").read_bytes() == sample.read_bytes()
    assert f"xxh3-128 {files['vmcore']['xxh3-128']}" in (xd / "README.txt").read_text()
    r = cli("verify", str(xd), timeout=60)
    assert r.rc == 0, r.err
    assert "OK  vmcore" in r.out and "xxh3-128" in r.out


def test_xxh3_flipped_byte_fails_verify(xd):
    with open(xd / "vmcore", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x01]))
    r = cli("verify", str(xd), timeout=60)
    assert r.rc == 8, (r.rc, r.err)
    assert "vmcore" in r.err and "xxh3-128" in r.err and "README.txt" not in r.err


def test_default_is_xxh3(sample, tmp_path):
    d = _save(sample, tmp_path / "dumps")
    files = _manifest(d)["files"]
    assert {n: i["algorithm"] for n, i in files.items()} == {
        "vmcore": "xxh3-128",
        "README.txt": "xxh3-128",
    }
    h = checksum.new(checksum.XXH3)
    h.update(sample.read_bytes())
    assert files["vmcore"]["xxh3-128"] == h.hexdigest()


def test_sha256_is_named_and_sha256sum_agrees(sample, tmp_path):
    d = _save(sample, tmp_path / "dumps", *SHA256)
    info = _manifest(d)["files"]["vmcore"]
    # "sha256" keeps its key: readers written before KDUMP_CHECKSUM still find it
    assert info["algorithm"] == "sha256"
    assert info["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    ref = subprocess.run(["sha256sum", str(d / "vmcore")], capture_output=True, text=True)
    assert ref.stdout.split()[0] == info["sha256"]
    assert f"sha256 {info['sha256']}" in (d / "README.txt").read_text()
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 0 and "sha256" in r.out, r.err


def test_old_sha256_only_manifest_still_verifies(sample, tmp_path):
    """A manifest as written before KDUMP_CHECKSUM: {size, sha256}, no algorithm."""
    d = _save(sample, tmp_path / "dumps", *SHA256)
    _rewrite(d, lambda doc: [info.pop("algorithm") for info in doc["files"].values()])
    assert all(set(i) == {"size", "sha256"} for i in _manifest(d)["files"].values())
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 0, r.err
    assert "OK  vmcore" in r.out and "sha256" in r.out
    # and a change to such a dump is still caught
    with open(d / "vmcore", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert cli("verify", str(d), timeout=60).rc == 8


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"algorithm": "blake3", "blake3": "00" * 32}, "unknown checksum algorithm 'blake3'"),
        ({"algorithm": "SHA256", "SHA256": "00" * 32}, "unknown checksum algorithm 'SHA256'"),
        ({"algorithm": "x\x1b[2J" * 30}, "unknown checksum algorithm 'x\\x1b[2Jx"),
        ({"algorithm": ["sha256"]}, "'algorithm' is not a string"),
        ({"algorithm": "xxh3-128", "xxh3-128": "ab" * 32}, "not 32 lowercase hex digits"),
        ({"algorithm": "xxh3-128", "sha256": "ab" * 32}, "'xxh3-128' is missing"),
        ({"algorithm": "sha256", "sha256": "AB" * 32}, "not 64 lowercase hex digits"),
    ],
    ids=["blake3", "case", "escapes", "list", "length", "missing", "upper"],
)
def test_bad_algorithm_in_manifest_exit_4(xd, entry, reason):
    def change(doc):
        info = doc["files"]["vmcore"]
        for k in ("algorithm", "xxh3-128", "sha256"):
            info.pop(k, None)
        info.update(entry)

    _rewrite(xd, change)
    r = cli("verify", str(xd), timeout=60)
    assert r.rc == 4, (r.rc, r.err)
    assert reason in r.err and "manifest.json: vmcore" in r.err, r.err
    assert "\x1b" not in r.err and "Traceback" not in r.err
    if "unknown" in reason:
        assert "known: sha256, xxh3-128" in r.err


def test_manifest_parse_algorithms():
    """The reader alone: what rotation and list see too."""
    doc = {
        "status": "complete",
        "files": {
            "a": {"size": 1, "sha256": "0" * 64},
            "b": {"size": 2, "algorithm": "sha256", "sha256": "1" * 64},
            "c": {"size": 3, "algorithm": "xxh3-128", "xxh3-128": "2" * 32},
        },
    }
    m = manifest.parse(json.dumps(doc).encode(), "m")
    assert [(r.algorithm, r.digest) for r in m.files.values()] == [
        ("sha256", "0" * 64),
        ("sha256", "1" * 64),
        ("xxh3-128", "2" * 32),
    ]
    doc["files"]["c"]["algorithm"] = "md5"
    with pytest.raises(ManifestError, match="m: c: unknown checksum algorithm 'md5'"):
        manifest.parse(json.dumps(doc).encode(), "m")


def test_xxh3_matches_the_reference_vectors():
    """XXH3-128 of "" and "abc", as xxhsum -H2 prints them (canonical, big-endian)."""
    for data, want in (
        (b"", "99aa06d3014798d86001c324468d497f"),
        (b"abc", "06b05ab6733a618578af5f94892f3950"),
    ):
        h = checksum.new(checksum.XXH3)
        h.update(data)
        assert h.hexdigest() == want


# -- configuration and a missing module ---------------------------------------------------


def test_config_values(tmp_path):
    r = cli("show-config", "--config", "/nonexistent/kdump")
    assert r.rc == 0 and 'KDUMP_CHECKSUM="xxh3"' in r.out, r.err
    r = cli("show-config", "--config", "/nonexistent/kdump", "--set", "KDUMP_CHECKSUM=SHA256")
    assert r.rc == 0 and 'KDUMP_CHECKSUM="SHA256"' in r.out, r.err
    conf = tmp_path / "kdump"
    conf.write_text('KDUMP_SAVEDIR="file:///tmp"\nKDUMP_CHECKSUM="md5"\n')
    r = cli("show-config", "--config", str(conf))
    assert r.rc == 2, (r.rc, r.err)
    assert f"{conf}:2: KDUMP_CHECKSUM" in r.err and "allowed: xxh3, sha256" in r.err


@pytest.fixture
def no_xxhash(tmp_path):
    """An environment whose `import xxhash` fails, as on a host without the package: a
    package of that name that raises, first on the path (the test's, not production's)."""
    shadow = tmp_path / "shadow" / "xxhash"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named xxhash')\n")
    return {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_xxh3_without_the_module_fails_before_writing(sample, tmp_path, no_xxhash, xxh3_dump):
    savedir = tmp_path / "dumps"
    r = cli(*save_args(str(sample), str(savedir), *XXH3), env=no_xxhash)
    assert r.rc == 9, (r.rc, r.err)
    assert "--set KDUMP_CHECKSUM" in r.err and "pip install xxhash" in r.err
    assert "python3-xxhash" in r.err and "Traceback" not in r.err
    assert not savedir.exists() or not os.listdir(savedir)
    # the default is XXH3 too, and fails alike before writing
    r = cli(*save_args(str(sample), str(savedir)), env=no_xxhash)
    assert r.rc == 9 and "pip install xxhash" in r.err, (r.rc, r.err)
    assert not savedir.exists() or not os.listdir(savedir)
    # SHA-256 needs nothing beyond the standard library
    assert cli(*save_args(str(sample), str(savedir), *SHA256), env=no_xxhash).rc == 0
    # verify of an XXH3 dump says what is missing, with exit 9, before reading any file
    r = cli("verify", str(xxh3_dump), env=no_xxhash, timeout=60)
    assert r.rc == 9 and "xxhash" in r.err and "OK " not in r.out, (r.rc, r.err)
    # check (the load side) refuses it too, before looking at the system
    check = ("check", "--config", "/nonexistent/kdump", "--set", "KDUMP_CHECKSUM=xxh3")
    r = cli(*check, env=no_xxhash)
    assert r.rc == 9 and "pip install xxhash" in r.err, (r.rc, r.err)


# -- network targets (verify URL) and encryption ------------------------------------------


def test_xxh3_over_sftp_and_verify_url(request, sample, tmp_path):
    target = make_target("sftp", request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_CHECKSUM="xxh3")
    r = run_save(conf, str(sample))
    assert r.rc == 0, r.err
    [name] = [n for n in os.listdir(target.server_dir) if not n.startswith(".")]
    d = Path(target.server_dir) / name
    assert _manifest(d)["files"]["vmcore"]["algorithm"] == "xxh3-128"
    r = cli("verify", "--config", conf, f"{target.url}/{name}", timeout=120)
    assert r.rc == 0, r.err
    assert "xxh3-128" in r.out
    with open(d / "vmcore", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01")
    r = cli("verify", "--config", conf, f"{target.url}/{name}", timeout=120)
    assert r.rc == 8 and "xxh3-128" in r.err, (r.rc, r.err)


def test_xxh3_with_encryption(sample, tmp_path, keys):  # noqa: F811
    d = _save(sample, tmp_path / "dumps", *XXH3, f"KDUMP_ENCRYPT_TO={keys['age_pub']}")
    vm = _manifest(d)["files"]["vmcore.age"]
    assert vm["algorithm"] == "xxh3-128" and vm["plaintext"]["algorithm"] == "xxh3-128"
    assert cli("verify", str(d), timeout=60).rc == 0
    out = tmp_path / "plain"
    out.mkdir()
    r = cli("decrypt", "-i", keys["age_key"], "--output", str(out), str(d), timeout=60)
    assert r.rc == 0, r.err
    assert "plaintext xxh3-128" in r.out
    assert (out / "vmcore").read_bytes() == sample.read_bytes()
    # a plaintext checksum that does not match is caught by the same algorithm
    _rewrite(d, lambda doc: doc["files"]["vmcore.age"]["plaintext"].update({"xxh3-128": "0" * 32}))
    out2 = tmp_path / "plain2"
    out2.mkdir()
    r = cli("decrypt", "-i", keys["age_key"], "--output", str(out2), str(d), timeout=60)
    assert r.rc == 8 and "xxh3-128" in r.err, (r.rc, r.err)
    assert not (out2 / "vmcore").exists()


# -- the capture image --------------------------------------------------------------------


def test_xxhash_only_when_xxh3_is_on(tmp_path):
    """xxh3sum is the only importer of xxhash: an image with KDUMP_CHECKSUM=sha256 must not
    carry it, and a default one must."""
    assert builder.image_features({"KDUMP_CHECKSUM": "sha256"}) == ()
    assert builder.image_features({}) == ("xxh3",)
    assert builder.image_features({"KDUMP_CHECKSUM": ""}) == ("xxh3",)
    assert builder.image_features({"KDUMP_CHECKSUM": "XXH3"}) == ("xxh3",)
    assert builder.image_features({"KDUMP_CHECKSUM": "xxh3", "KDUMP_ENCRYPT_TO": "age1x"}) == (
        "encrypt",
        "xxh3",
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = runtime.collect(["file"], str(tmp_path / "a"))
    assert not [d for d in plain.files if "/xxhash/" in d]
    assert "kdump_capture.xxh3sum" not in runtime.entry_modules(["file"])
    on = runtime.collect(["file"], str(tmp_path / "b"), features=("xxh3",))
    assert [d for d in on.files if "/xxhash/" in d and "_xxhash" in d]
    assert not [d for d in on.files if "/cryptography/" in d]
