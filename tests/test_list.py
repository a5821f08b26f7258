"""`kdump-capture list` (issue 11): every dump on a target, all hosts, newest first, on
every transport, with hostile manifests left by other hosts; it changes nothing."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.servers.targets import make_target
from tests.test_save_network import run_save, write_config
from tests.test_summary import _marker_sample

from .helpers import cli

KINDS = ("file", "sftp", "ftp", "cifs", "s3")


def _manifest(**over) -> bytes:
    doc = {
        "crash_summary": {
            "kind": "BUG",
            "headline": "BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "panic": "Kernel panic - not syncing: Fatal exception",
            "cpu": 3,
            "pid": 42,
        },
        "status": "complete",
        "crash_time": 1767225600,  # 2026-01-01 00:00:00
        "kernel_release": "6.1.0-57-cloud-amd64",
        "dump_format": "kdump-compressed (lzo)",
        "dump_level": 31,
        "files": {},
    }
    doc.update(over)
    return json.dumps(doc).encode()


def _plant(tr, name: str, files: dict[str, bytes]) -> None:
    tr.makedir(name)
    for fname, data in files.items():
        with tr.create(f"{name}/{fname}") as sink:
            sink.write(data)
            sink.commit()


def _snapshot(target) -> dict[str, bytes]:
    return {f: target.read_back(f) for f in target.files()}


@pytest.mark.parametrize("kind", KINDS)
def test_list_all_hosts_newest_first(kind, request, tmp_path):
    target = make_target(kind, request)
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "listing test")
    conf = write_config(
        tmp_path / "kdump", target, KDUMP_DUMPFORMAT="compressed", KDUMP_DUMPLEVEL="31"
    )
    r = run_save(conf, str(sample))
    assert r.rc == 0, r.err
    with target.transport() as tr:
        _plant(
            tr, "web01-2026-01-01-00-00-00", {"vmcore": b"x" * 1000, "manifest.json": _manifest()}
        )
        _plant(tr, "db02-2026-01-02-00-00-00", {"dmesg.txt": b"log"})  # no manifest
        _plant(tr, "db02-2025-06-01-00-00-00", {"manifest.json": b"[" * 100_000})  # hostile
        _plant(tr, "web03-2025-07-01-00-00-00", {"manifest.json": b"{}" + b" " * (2 << 20)})
        _plant(
            tr,
            "web04-2025-08-01-00-00-00",
            {
                "manifest.json": _manifest(
                    status="failed\x1b[2J",
                    crash_time=1751328000,
                    kernel_release="\x1b]0;pwned\x07" + "k" * 500,
                    crash_summary={"encrypted": True},
                    dump_level="31",
                )
            },
        )
        _plant(tr, "not-a-dump", {"manifest.json": _manifest()})
    before = _snapshot(target)
    r = cli("list", "--config", conf, target.url)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 6, r.out
    host = socket.gethostname() if kind == "file" else None
    # newest first: the sample crashed 2025-11-24 (CRASHTIME), the planted ones around it
    order = [ln.split()[0] for ln in lines]
    assert order == ["db02", "web01", host or order[2], "web04", "web03", "db02"], r.out
    assert "2026-01-01 00:00:00" in lines[1] and "complete" in lines[1]
    assert "BUG: kernel NULL pointer dereference" in lines[1] and "kdump-lzo" in lines[1]
    assert "incomplete" in lines[0]
    assert "Kernel panic - not syncing: listing test" in lines[2]
    assert "kdump-zlib" in lines[2] and "-d 31" in lines[2]
    if kind in ("ftp", "s3"):
        assert "+flat" in lines[2]
    assert "failed" in lines[3] and "(encrypted)" in lines[3] and "\x1b" not in r.out
    assert "manifest unreadable" in lines[4] and "manifest unreadable" in lines[5]
    assert all(len(ln) < 400 for ln in lines)
    r = cli("list", "--config", conf, target.url, "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert [d["status"] for d in doc] == [
        "incomplete",
        "complete",
        "complete",
        "failed",
        "failed",
        "failed",
    ]
    assert doc[1]["level"] == 31 and doc[3]["level"] is None
    assert _snapshot(target) == before  # nothing changed on the target


def test_list_never_follows_links_or_opens_fifos(tmp_path):
    root = tmp_path / "t"
    (root / "h1-2026-01-01-00-00-00").mkdir(parents=True)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"status": "complete", "kernel_release": "LEAKED"}))
    os.symlink(secret, root / "h1-2026-01-01-00-00-00" / "manifest.json")
    (root / "h2-2026-01-02-00-00-00").mkdir()
    os.mkfifo(root / "h2-2026-01-02-00-00-00" / "manifest.json")
    os.symlink(tmp_path, root / "h3-2026-01-03-00-00-00")  # a linked "dump directory"
    r = cli("list", "--config", "/dev/null", f"file://{root}", timeout=60)
    assert r.rc == 0, r.err
    assert "LEAKED" not in r.out and "h3" not in r.out
    lines = r.out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["h2", "h1"]
    assert all("only regular files are read" in ln for ln in lines), lines


def test_list_missing_target_changes_nothing(tmp_path):
    r = cli("list", "--config", "/dev/null", f"file://{tmp_path}/none")
    assert r.rc == 3 and "no such directory" in r.err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("kind", ["sftp", "ftp", "cifs"])
def test_list_of_a_missing_network_directory_says_so(kind, request, tmp_path):
    """A mistyped path listed "no dumps", exit 0, as an empty directory does: the admin
    read that nothing had crashed. Now exit 3, "no such directory", as for a local target;
    an empty directory still lists "no dumps", and nothing is created."""
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target)
    with target.transport() as tr:  # connecting creates the target's own directory
        tr.makedir("empty")
    r = cli("list", "--config", conf, f"{target.url}/empty")
    assert r.rc == 0 and r.out.strip().endswith("/empty: no dumps"), r.err
    for missing in ("missing", "missing/deeper"):
        r = cli("list", "--config", conf, f"{target.url}/{missing}")
        assert r.rc == 3, (r.out, r.err)
        assert r.err.strip().endswith(f"/{missing}: no such directory"), r.err
    assert sorted(os.listdir(target.server_dir)) == ["empty"]


@pytest.mark.parametrize("kind", ["ftp", "cifs"])
def test_list_and_verify_take_the_password_from_the_config(kind, request, tmp_path):
    """Both said "credentials from --config" but used only the URL given: a password had to
    go on the command line, where every user can read it (/proc/PID/cmdline)."""
    from kdump_capture.urls import parse_target

    target = make_target(kind, request)
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "credentials test")
    conf = write_config(tmp_path / "kdump", target)
    assert run_save(conf, str(sample)).rc == 0
    full = parse_target(target.url)[0]
    assert full.password
    bare = full.replace(password=None)._unredacted_text()
    assert full.password not in bare
    r = cli("list", "--config", conf, bare, "--json")
    assert r.rc == 0, r.err
    [dump] = json.loads(r.out)
    assert dump["status"] == "complete"
    r = cli("verify", "--config", conf, f"{bare}/{dump['directory']}")
    assert r.rc == 0, r.err
    assert "all files match" in r.out
    assert cli("list", "--config", "/dev/null", bare).rc == 7  # the config is what held it


def test_list_shows_other_kdumps_dumps_and_rotation_never_takes_them(tmp_path):
    # An admin migrating to us runs `list` on the /var/crash other kdumps wrote: it said
    # "no dumps" (exit 0, read as "nothing crashed") beside five of them, one incomplete.
    root = tmp_path / "crash"
    other = {
        # Red Hat kdump-utils: a whole dump, and one whose collector did not finish
        "127.0.0.1-2024-01-17-10:30:00": {"vmcore-incomplete": b"K", "vmcore-dmesg.txt": b"L"},
        "127.0.0.1-2024-01-18-10:30:00": {"vmcore": b"KD", "vmcore-dmesg.txt": b"L"},
        # SUSE kdump 1.x (no marks), and 2.x with its placeholder README still there
        "2024-01-15-10:30": {"vmcore": b"KD", "dmesg.txt": b"L", "README.txt": b"Kernel"},
        "2024-01-16-10-30": {
            "vmcore": b"K",
            "README.txt": b"If you see this text the crash dump is likely incomplete.\n",
        },
        # Debian kdump-tools: a whole dump, and one cut off in its pipe
        "202401191030": {"dump.202401191030": b"KD", "dmesg.202401191030": b"L"},
        "202401201030": {"dump-incomplete": b"K", "dmesg.202401201030": b"L"},
    }
    for name, files in other.items():
        (root / name).mkdir(parents=True)
        for fname, data in files.items():
            (root / name / fname).write_bytes(data)
    (root / "2024-02-02-02-02").mkdir()  # a date-named directory of something else
    (root / "2024-02-02-02-02" / "notes").write_text("x")
    r = cli("list", "--config", "/dev/null", f"file://{root}", "--json")
    assert r.rc == 0, r.err
    got = {d["directory"]: (d["status"], d["note"].split(",")[0]) for d in json.loads(r.out)}
    assert got == {
        "127.0.0.1-2024-01-17-10:30:00": ("incomplete", "made by Red Hat kdump"),
        "127.0.0.1-2024-01-18-10:30:00": ("unchecked", "made by Red Hat kdump"),
        "2024-01-15-10:30": ("unchecked", "made by SUSE kdump"),
        "2024-01-16-10-30": ("incomplete", "made by SUSE kdump"),
        "202401191030": ("unchecked", "made by Debian kdump-tools"),
        "202401201030": ("incomplete", "made by Debian kdump-tools"),
    }
    r = cli("list", "--config", "/dev/null", f"file://{root}")
    assert "no dumps" not in r.out and "complete " not in r.out.replace("incomplete ", "")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    sample = tmp_path / "sample.elf"
    assert cli("make-sample", str(sample), "--mib", "16").rc == 0
    for keep in ("-1", "1"):
        s = cli(
            "save", "--config", "/dev/null", "--vmcore", str(sample), "--no-reboot",
            "--set", f"KDUMP_SAVEDIR=file://{root}", "--set", f"KDUMP_KEEP_OLD_DUMPS={keep}",
        )  # fmt: skip
        assert s.rc == 0, s.err
    assert {p: p.read_bytes() for p in before} == before


def test_verify_of_another_kdumps_dump_does_not_call_it_incomplete(tmp_path):
    # A whole Red Hat dump was "no manifest: the dump is incomplete" (exit 8).
    d = tmp_path / "127.0.0.1-2024-01-18-10:30:00"
    d.mkdir()
    (d / "vmcore").write_bytes(b"KDUMP   ")
    (d / "vmcore-dmesg.txt").write_text("log\n")
    r = cli("verify", str(d))
    assert r.rc == 8 and "not a dump this tool saved" in r.err, r.err
    assert "the dump is incomplete" not in r.err
    ours = tmp_path / "2026-01-01-00-00-00"  # ours, its save stopped before the manifest
    ours.mkdir()
    (ours / "dmesg.txt").write_text("log\n")
    r = cli("verify", str(ours))
    assert r.rc == 8 and "no manifest: the dump is incomplete" in r.err, r.err


@pytest.mark.parametrize("kind", KINDS)
def test_other_kdumps_dumps_on_every_target(kind, request, tmp_path):
    # Their network names: SUSE 2.x <host>-YYYY-MM-DD-HH-MM, Debian <ip>-YYYYMMDDHHMM.
    target = make_target(kind, request)
    placeholder = b"This file will be overwritten when the dump is finished.\n"
    placeholder += b"If you see this text the crash dump is likely incomplete.\n"
    with target.transport() as tr:
        _plant(tr, "web05-2024-01-16-10-30", {"vmcore": b"K", "README.txt": placeholder})
        _plant(tr, "web05-2024-01-15-10-30", {"vmcore": b"KD", "README.txt": b"Kernel"})
        _plant(tr, "10.0.0.7-202401191030", {"dump.202401191030": b"KD"})
    sample = tmp_path / "vmcore"
    _marker_sample(sample, "other kdumps")
    conf = write_config(tmp_path / "kdump", target, KDUMP_KEEP_OLD_DUMPS="-1")
    before = _snapshot(target)
    for _ in range(2):  # the second save deletes all older dumps: only ours
        r = run_save(conf, str(sample))
        assert r.rc == 0, r.err
    after = _snapshot(target)
    assert {f: after.get(f) for f in before} == before
    r = cli("list", "--config", conf, target.url, "--json")
    assert r.rc == 0, r.err
    got = {d["directory"]: (d["host"], d["status"]) for d in json.loads(r.out)}
    assert got.pop("web05-2024-01-16-10-30") == ("web05", "incomplete")
    assert got.pop("web05-2024-01-15-10-30") == ("web05", "unchecked")
    assert got.pop("10.0.0.7-202401191030") == ("10.0.0.7", "unchecked")
    assert [s for _, s in got.values()] == ["complete"]  # ours, the newest save


@pytest.mark.parametrize("kind", ["ftp", "vsftpd", "cifs"])
def test_list_lists_the_root_once(kind, request, monkeypatch):
    """Every FTP and CIFS read or listing below the root listed the whole root first (no
    step may be a link; CIFS tells a link by its file id among its siblings'): on a target
    shared by a fleet `list` was quadratic (1,000 dumps: FTP 67 s, CIFS 246 s; 2 root
    listings per dump). A read-only session lists the root once; what it shows is the
    same as a writing session's, a link included."""
    from kdump_capture import fleet

    target = make_target(kind, request)
    names = [f"h{i}-2026-01-01-00-00-{i:02d}" for i in range(20)]
    with target.transport() as tr:
        for name in names:
            _plant(tr, name, {"manifest.json": _manifest(host=name[:3]), "vmcore": b"v"})
        before = [i.line() for i in fleet.list_dumps(tr)]
    # a link made on the server (Samba follows it and shows the directory it points to)
    os.symlink(names[0], os.path.join(target.server_dir, "h99-2026-01-02-00-00-00"))
    with target.transport() as tr:
        writing = [i.line() for i in fleet.list_dumps(tr)]
    with target.transport(read_only=True) as tr:
        cls = type(tr)
        method = "_query" if kind == "cifs" else "_list"
        original = getattr(cls, method)
        root = tr.root if kind == "cifs" else tr._p("")
        roots: list[str] = []

        def counted(self, path):
            if path == root:
                roots.append(path)
            return original(self, path)

        monkeypatch.setattr(cls, method, counted)
        items = fleet.list_dumps(tr)
    assert len(roots) == 1
    shown = [i.line() for i in items]
    assert shown == writing
    assert not any(i.directory.startswith("h99-") for i in items)  # a link, not a dump
    if kind == "cifs":
        # names[0] and the link to it share a file id: neither is told from the other,
        # both are left out (as before this change)
        assert len(shown) == len(before) - 1
    else:
        assert shown == before
