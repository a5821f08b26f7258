"""The manifest reader (kdump_capture.manifest) and `verify` on hostile dump directories."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from kdump_capture import manifest
from kdump_capture.errors import ManifestError
from kdump_capture.report import DumpRecord
from kdump_capture.sample import SampleSpec, write_sample

from .helpers import cli, save_args

SHA = "0" * 64
_VM = b'{"status": "complete", "files": {"vmcore": '


def _good(**files) -> dict:
    record = DumpRecord("complete", "h", "file:///x", "d", None, None, 0, "ELF")
    record.files = files or {"vmcore": {"size": 3, "sha256": SHA}}
    return json.loads(record.manifest_json())


def test_reads_what_we_write():
    m = manifest.parse(json.dumps(_good()).encode(), "m")
    assert m.complete and m.files == {"vmcore": manifest.FileRecord(3, SHA)}
    failed = {**_good(), "status": "failed", "error": "target failed"}
    m = manifest.parse(json.dumps(failed).encode(), "m")
    assert not m.complete and m.error == "target failed"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (b"[" * 100_000, f"more than {manifest.MAX_ITEMS} values"),
        (b"[" * 9 + b"]" * 9, "nested deeper than 8"),
        (b'{"a":' * 50 + b"1" + b"}" * 50, "nested deeper"),
        (b"[0" + b",0" * manifest.MAX_ITEMS + b"]", f"more than {manifest.MAX_ITEMS} values"),
        (b'{"status": "\xff"}', "not valid JSON"),  # not UTF-8
        (b"", "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # int() of 5000 digits is refused
        (b"{}", "'status' is not a string"),
        (b'{"status": "complete!"}', "unknown status"),
        (b'{"status": "complete", "files": []}', "'files' is not an object"),
        (_VM + b'{"sha256": "%s"}}}' % SHA.encode(), "size"),
        (
            b'{"status": "complete", "files": {"vmcore": {"size": true, "sha256": "%s"}}}'
            % SHA.encode(),
            "size",
        ),
        (
            b'{"status": "complete", "files": {"vmcore": {"size": -1, "sha256": "%s"}}}'
            % SHA.encode(),
            "size",
        ),
        (b'{"status": "complete", "files": {"vmcore": {"size": 1, "sha256": "x"}}}', "sha256"),
        (b'{"status": "complete", "files": {"vmcore": 3}}', "not an object"),
        (b'{"status": "complete", "error": 7}', "'error' is not a string"),
        (b" " * (manifest.MAX_BYTES + 1), "larger than"),
    ],
    ids=lambda v: v[:20].decode("latin-1") if isinstance(v, bytes) else None,
)
def test_bad_manifest(data, reason):
    with pytest.raises(ManifestError) as e:
        manifest.parse(data, "dir/manifest.json")
    assert "dir/manifest.json" in str(e.value) and reason in str(e.value)
    assert e.value.exit_code == 4


def test_brackets_inside_strings_do_not_count():
    doc = _good()
    doc["notes"] = ["[" * 1000 + '\\"{' * 100 + "\\"]
    m = manifest.parse(json.dumps(doc).encode(), "m")
    assert m.complete


@pytest.mark.parametrize(
    "name",
    [
        "/etc/hostname",
        "../../etc/os-release",
        "/dev/zero",
        "..",
        ".",
        "a/b",
        "a\\b",
        "",
        "a\0b",
        "x" * 256,
        "tab\there",
    ],
)
def test_names_must_be_plain(name):
    doc = _good(**{name: {"size": 1, "sha256": SHA}})
    with pytest.raises(ManifestError, match="not a plain name"):
        manifest.parse(json.dumps(doc).encode(), "m")


def test_deep_nesting_is_refused_fast():
    started = time.monotonic()
    worst = (
        b"[" * (1 << 20),
        b"[]" * (1 << 19),  # a million brackets, never deep: the scan goes through all
        b'["' + b'\\\\[\\"' * (1 << 17) + b'"]',  # escapes and brackets inside a string
    )
    for data in worst:
        with pytest.raises(ManifestError):
            manifest.parse(data, "m")
    assert time.monotonic() - started < 2


# -- verify DUMPDIR (issue 8, item 12) ---------------------------------------------------


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """One real dump, saved once; each test works on a copy of its files."""
    work = tmp_path_factory.mktemp("dump")
    sample = work / "vmcore.src"
    write_sample(str(sample), SampleSpec(ram_mib=2))
    r = cli(*save_args(str(sample), str(work / "dumps")))
    assert r.rc == 0, r.err
    [name] = os.listdir(work / "dumps")
    return work / "dumps" / name


@pytest.fixture
def d(dump, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    for name in os.listdir(dump):
        (out / name).write_bytes((dump / name).read_bytes())
    return out


def _rewrite(d, edit) -> None:
    doc = json.loads((d / "manifest.json").read_bytes())
    edit(doc)
    (d / "manifest.json").write_text(json.dumps(doc))


def _entry(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_good_dump(d):
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 0, r.err
    assert "OK  vmcore" in r.out


@pytest.mark.parametrize("files", ["none", "dmesg only"])
def test_verify_wants_the_vmcore_a_complete_manifest_vouches_for(d, files):
    # A manifest saying complete with no vmcore listed (an empty files object, or one left
    # by another host on a shared target) verified as "all files match".
    def drop(doc):
        if files == "none":
            doc["files"] = {}
        else:
            doc["files"] = {k: v for k, v in doc["files"].items() if k == "dmesg.txt"}

    _rewrite(d, drop)
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 8, (r.rc, r.err)
    assert "vmcore: not listed in manifest.json, which says the dump is complete" in r.err
    # a save in format none lists no vmcore, and verifies
    _rewrite(d, lambda doc: doc.__setitem__("dump_format", "none (dmesg only)"))
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 0, r.err


def test_verify_names_the_files_it_does_not_check(d):
    # Files beside the listed ones (decrypt's plaintext, a save's temporary file) were
    # passed over without a word, as if "all files match" covered them.
    (d / "vmcore.copy").write_bytes(b"x")
    (d / "evil\x1b[2J").write_bytes(b"x")
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 0, r.err
    assert "NOT LISTED  vmcore.copy (not in manifest.json: not checked)" in r.out
    assert "NOT LISTED  evil\\x1b[2J" in r.out and "\x1b" not in r.out


@pytest.mark.parametrize("name", ["/etc/hostname", "../etc/os-release", "/dev/zero"])
def test_verify_reads_only_names_inside(d, name):
    """Recorded with the right size and checksum: reading them would make verify pass."""
    if name.startswith(".."):
        name = os.path.relpath("/etc/os-release", d)  # ../../../../etc/os-release
    if name == "/dev/zero":
        entry = {"size": 1 << 40, "sha256": SHA}
    else:
        entry = _entry(name if os.path.isabs(name) else os.path.join(d, name))
    _rewrite(d, lambda doc: doc["files"].__setitem__(name, entry))
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 4, (r.rc, r.err)
    assert "not a plain name" in r.err and "manifest.json" in r.err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[]", "not a JSON object"),
        (b'"x"', "not a JSON object"),
        (b"[" * 100_000, f"more than {manifest.MAX_ITEMS} values"),
    ],
    ids=["list", "string", "deep"],
)
def test_verify_bad_manifest_exit_4(d, content, reason):
    (d / "manifest.json").write_bytes(content)
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 4 and reason in r.err, (r.rc, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err


def test_verify_missing_size_exit_4(d):
    _rewrite(d, lambda doc: doc["files"]["vmcore"].pop("size"))
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 4 and "vmcore: 'size' is missing" in r.err, r.err


@pytest.mark.parametrize("kind", ["fifo", "link", "big"])
def test_verify_manifest_must_be_a_small_regular_file(d, kind):
    m = d / "manifest.json"
    real = d / "real.json"
    m.rename(real)
    if kind == "fifo":
        os.mkfifo(m)
    elif kind == "link":
        os.symlink("real.json", m)
    else:
        with open(m, "wb") as f:
            f.truncate(3 << 30)
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 4, (r.rc, r.err)
    assert {"fifo": "FIFO", "link": "symbolic link", "big": "more than"}[kind] in r.err


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_verify_files_must_be_regular(d, dump, kind):
    """vmcore replaced by a link to an identical copy: following it would pass."""
    (d / "vmcore").unlink()
    if kind == "link":
        os.symlink(dump / "vmcore", d / "vmcore")
    else:
        os.mkfifo(d / "vmcore")
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 8, (r.rc, r.err)
    assert {"link": "symbolic link", "fifo": "FIFO"}[kind] in r.err


def test_verify_never_reads_past_the_recorded_size(d):
    with open(d / "vmcore", "r+b") as f:
        f.truncate(3 << 30)  # a 3 GB sparse file: hashing it would take seconds
    started = time.monotonic()
    r = cli("verify", str(d), timeout=60)
    assert r.rc == 8 and "more than" in r.err, r.err
    assert time.monotonic() - started < 10


def test_our_biggest_manifest_is_read():
    """The most a save records (every unreadable range it keeps, long notes, an incomplete
    status) stays well inside the reader's bounds: our own dump never counts as failed."""
    from kdump_capture.vmcore import MAX_RECORDED_RANGES

    record = DumpRecord("incomplete", "h", "file:///x", "d", None, None, 31, "ELF")
    record.files = {n: {"size": 1 << 40, "sha256": SHA} for n in ("vmcore", "dmesg.txt")}
    record.unreadable = [
        {"offset": i << 30, "size": 4096, "paddr": i << 30} for i in range(MAX_RECORDED_RANGES)
    ]
    record.notes = [f'note {i}: [brackets], {{braces}}, "quotes" \\' * 20 for i in range(50)]
    m = manifest.parse(record.manifest_json(), "m")
    assert m.status == "incomplete" and not m.complete and len(m.files) == 2
