"""One host must never stop or harm another's dump on a shared target (issue 8, items 4-6).

Real servers; the hostile files are planted straight into the server's directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from kdump_capture import policy
from kdump_capture.errors import TransportError, UnsafeFile
from kdump_capture.pipeline import scan_dumps
from kdump_capture.report import DumpRecord
from kdump_capture.sample import SampleSpec, write_sample
from tests.planted import BAD_MANIFESTS, BAD_NO_SIZE, deadline, make_victim, plant_dir, snapshot
from tests.servers.targets import KINDS, make_target

from .helpers import ROOT, cli, save_args

STAMP = "2000-01-01-00-00-00"
# Kinds whose root is a directory on this machine, where other hosts' files can be planted.
DISK_KINDS = tuple(k for k in KINDS if k != "s3")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=4))
    return str(p)


def _host(kind: str, name: str = "hostA") -> str | None:
    return None if kind == "file" else name  # local targets do not prefix the host


def _complete_manifest(name: str, host: str | None) -> bytes:
    record = DumpRecord("complete", host or "", "file:///x", name, None, None, 0, "ELF")
    return record.manifest_json()


class Recording:
    """The real transport, recording the paths the engine lists and reads."""

    def __init__(self, transport):
        self.transport = transport
        self.paths: list[str] = []

    def describe(self) -> str:
        return self.transport.describe()

    def listdir(self, relpath: str = ""):
        self.paths.append(relpath)
        return self.transport.listdir(relpath)

    def read(self, relpath: str, limit: int | None = None):
        self.paths.append(relpath)
        return self.transport.read(relpath, limit)


@pytest.mark.parametrize("bad", sorted(BAD_MANIFESTS))
@pytest.mark.parametrize("kind", DISK_KINDS)
def test_bad_manifest_counts_as_failed(kind, bad, request, caplog):
    target = make_target(kind, request)
    host = _host(kind)
    name = policy.dump_name(STAMP, host)
    with target.transport() as tr:
        plant_dir(os.path.join(target.server_dir, name), bad)
        caplog.set_level(logging.WARNING)
        started = time.monotonic()
        with deadline(60):
            [dump] = scan_dumps(tr, host)
    assert time.monotonic() - started < 30
    if kind == "cifs" and bad == "zero-link":
        # Samba hides a link that leaves the share: no manifest, an incomplete dump.
        assert dump.state == policy.INCOMPLETE
        return
    assert (dump.name, dump.state) == (name, policy.FAILED)
    assert f"{name}/manifest.json" in caplog.text and "counting the dump as failed" in caplog.text


@pytest.mark.parametrize(
    "content",
    [b"[]", b'"x"', b"[" * 100_000, BAD_NO_SIZE, b" " * (2 << 20)],
    ids=["list", "string", "deep", "no-size", "2mib"],
)
def test_bad_manifest_in_s3(content, request, caplog):
    """No links or FIFOs in S3: what another host can put there is content."""
    target = make_target("s3", request)
    name = policy.dump_name(STAMP, "hostA")
    s3 = target.s3
    for key, body in ((f"{name}/", b""), (f"{name}/manifest.json", content)):
        s3.client().put_object(Bucket=s3.bucket, Key=f"{target.server_dir}/{key}", Body=body)
    caplog.set_level(logging.WARNING)
    with target.transport() as tr, deadline(60):
        [dump] = scan_dumps(tr, "hostA")
    assert (dump.name, dump.state) == (name, policy.FAILED)
    assert "counting the dump as failed" in caplog.text


@pytest.mark.parametrize("kind", ["file", "ftp", "cifs"])
def test_scan_reads_only_this_hosts_dumps(kind, request):
    target = make_target(kind, request)
    host = _host(kind)
    ours = policy.dump_name(STAMP, host)
    with target.transport() as tr:
        plant_dir(os.path.join(target.server_dir, ours), _complete_manifest(ours, host))
        others = []
        for i, bad in enumerate(sorted(BAD_MANIFESTS)):
            other = policy.dump_name(f"20{10 + i}-01-01-00-00-00", f"other{i}")
            plant_dir(os.path.join(target.server_dir, other), bad)
            others.append(other)
        rec = Recording(tr)
        with deadline(60):
            dumps = scan_dumps(rec, host)
    assert [(d.name, d.state) for d in dumps] == [(ours, policy.COMPLETE)]
    assert not [p for p in rec.paths if p.split("/")[0] in others]


def _save(target, tmp_path, sample, hostname: str, keep: int = 1):
    from .test_save_network import run_save, write_config

    conf = write_config(
        tmp_path / f"kdump-{hostname}",
        target,
        KDUMP_KEEP_OLD_DUMPS=str(keep),
        KDUMP_HOSTNAME=hostname,
    )
    return run_save(conf, sample)


def _ours(target, host: str | None) -> list[str]:
    out = []
    for n in sorted(os.listdir(target.server_dir)):
        parsed = policy.parse_dump_name(n)
        if parsed and parsed[0] == host and not os.path.islink(f"{target.server_dir}/{n}"):
            out.append(n)
    return out


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_save_with_bad_manifests_everywhere(kind, request, sample, tmp_path):
    """Every bad manifest at once, in this host's dumps and in another host's: the save
    completes, and the other host's files are untouched."""
    target = make_target(kind, request)
    host = _host(kind)
    with target.transport():
        pass  # the root, created by the server's user
    planted = set()
    for i, bad in enumerate(sorted(BAD_MANIFESTS)):
        stamp = f"20{10 + i}-01-01-00-00-00"
        planted.add(policy.dump_name(stamp, host))
        plant_dir(f"{target.server_dir}/{policy.dump_name(stamp, host)}", bad)
        plant_dir(f"{target.server_dir}/{policy.dump_name(stamp, 'hostB')}")
    theirs = {n: os.stat(f"{target.server_dir}/{n}").st_ino for n in _ours(target, "hostB")}
    r = _save(target, tmp_path, sample, "hostA")
    assert r.rc == 0, r.err
    assert "counting the dump as failed" in r.err
    [mine] = [n for n in _ours(target, host) if n not in planted]
    assert cli("verify", f"{target.server_dir}/{mine}").rc == 0
    assert {n: os.stat(f"{target.server_dir}/{n}").st_ino for n in _ours(target, "hostB")} == theirs


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_planted_links_are_never_followed(kind, request, sample, tmp_path):
    """A link named like one of our dumps, to a directory outside the target (it was
    emptied over FTP) and to another host's dump beside it: neither is touched, the link
    goes where the protocol can delete it, and every save completes (the second one
    failed with "550 Not a directory" over FTP)."""
    target = make_target(kind, request)
    host = _host(kind)
    root = target.server_dir
    with target.transport():
        pass
    victim_dir = os.path.join(os.path.dirname(root), f"victim-{os.path.basename(root)}")
    victim = make_victim(victim_dir)
    theirs = policy.dump_name("2020-01-01-00-00-00", "hostB")
    plant_dir(f"{root}/{theirs}", _complete_manifest(theirs, "hostB"))
    with open(f"{root}/{theirs}/vmcore", "wb") as f:
        f.write(b"hostB's memory")
    their_files = snapshot(f"{root}/{theirs}")
    links = {
        policy.dump_name(STAMP, host): os.path.relpath(victim_dir, root),
        policy.dump_name("2001-01-01-00-00-00", host): theirs,
    }
    for name, dest in links.items():
        os.symlink(dest, f"{root}/{name}")
    for _ in range(2):
        r = _save(target, tmp_path, sample, "hostA")
        assert r.rc == 0, r.err
    assert snapshot(victim_dir) == victim
    assert snapshot(f"{root}/{theirs}") == their_files
    mine = [n for n in _ours(target, host) if n not in links]
    assert len(mine) == 2
    for n in mine:
        assert cli("verify", f"{root}/{n}").rc == 0
    for name in links:
        if kind == "cifs":
            # Samba follows links, and deletes one only while its target is empty.
            assert os.path.islink(f"{root}/{name}") and "left alone" in r.err
        else:
            assert not os.path.lexists(f"{root}/{name}")


def test_failed_cleanup_never_stops_the_new_dump(request, sample, tmp_path):
    """A dump of ours that cannot be deleted (a read-only directory on the server)."""
    target = make_target("sftp", request)
    with target.transport():
        pass
    stuck = policy.dump_name(STAMP, "hostA")
    plant_dir(f"{target.server_dir}/{stuck}")  # no manifest: incomplete, to be removed
    with open(f"{target.server_dir}/{stuck}/vmcore", "wb") as f:
        f.write(b"x")
    # An immutable file makes the delete fail even for root, whom sshd runs us as.
    rc = os.system(f"chattr +i {target.server_dir}/{stuck}/vmcore 2>/dev/null")
    if rc != 0:
        pytest.fail("chattr +i is needed to make a deletion fail for root")
    try:
        r = _save(target, tmp_path, sample, "hostA")
    finally:
        os.system(f"chattr -i {target.server_dir}/{stuck}/vmcore")
    assert r.rc == 0, r.err
    assert f"could not delete {stuck}" in r.err
    assert len(_ours(target, "hostA")) == 2


SAMPLE_STAMP = policy.stamp_for(SampleSpec().crash_time)  # the name the sample's save takes


@pytest.mark.parametrize("kind", DISK_KINDS)
def test_a_name_with_a_newline_hides_no_link(kind, request, sample, tmp_path):
    """A file whose name holds a newline splits its line of an FTP LIST in two; that once
    made the whole listing "not Unix-style", and links were then told from MLSD alone, which
    pyftpdlib answers by following them: rotation deleted another host's dump through a
    link, and a FIFO manifest blocked the server. The name may also forge a listing line
    claiming that the link is a directory. Neither link nor FIFO is followed on any target."""
    target = make_target(kind, request)
    host = _host(kind)
    root = target.server_dir
    with target.transport():
        pass
    theirs = policy.dump_name("2020-01-01-00-00-00", "hostB")
    plant_dir(f"{root}/{theirs}", _complete_manifest(theirs, "hostB"))
    with open(f"{root}/{theirs}/vmcore", "wb") as f:
        f.write(b"hostB's memory")
    their_files = snapshot(f"{root}/{theirs}")
    link = policy.dump_name("2001-01-01-00-00-00", host)
    os.symlink(theirs, f"{root}/{link}")
    forged = f"drwxr-xr-x 2 0 0 4096 Jan 01 2001 {link}"
    for junk in ("junk\nname", f"x\n{forged}"):
        try:
            with open(f"{root}/{junk}", "wb"):
                pass
        except OSError:
            pytest.skip(f"{kind}: the server's file system refuses newlines in names")
    fifo_dump = plant_dir(f"{root}/{policy.dump_name('2002-01-01-00-00-00', host)}")
    os.mkfifo(f"{fifo_dump}/manifest.json", 0o644)
    with deadline(240):
        r = _save(target, tmp_path, sample, "hostA", keep=-1)
    assert r.rc == 0, r.err
    assert snapshot(f"{root}/{theirs}") == their_files
    assert policy.dump_name(SAMPLE_STAMP, host) in _ours(target, host)


@pytest.mark.parametrize("kind", DISK_KINDS)
@pytest.mark.parametrize("what", ["file", "fifo"])
def test_a_dump_name_taken_by_something_else_takes_the_next(kind, what, request, sample, tmp_path):
    """The name a save picks is taken by a file or a FIFO (FTP asked SIZE in ASCII mode,
    which the server refuses, and took a refused MKD for a failure of the target)."""
    target = make_target(kind, request)
    host = _host(kind)
    with target.transport():
        pass
    taken = f"{target.server_dir}/{policy.dump_name(SAMPLE_STAMP, host)}"
    if what == "fifo":
        os.mkfifo(taken, 0o644)
    else:
        open(taken, "wb").close()
    with deadline(240):
        r = _save(target, tmp_path, sample, "hostA")
    assert r.rc == 0, r.err
    assert os.path.exists(f"{target.server_dir}/{policy.dump_name(SAMPLE_STAMP, host, 1)}")


def test_a_tree_deeper_than_a_dump_is_left_in_place(sample, tmp_path):
    """1,200 levels under a name like ours: shutil.rmtree recursed once per level and the
    save ended in RecursionError (exit 1) with no dump."""
    root = tmp_path / "dumps"
    deep = root / STAMP
    os.makedirs(deep)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # by descriptor: the path would grow past PATH_MAX
        os.mkdir("a", dir_fd=fd)
        sub = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    try:
        r = cli(*save_args(sample, str(root)))
        assert r.rc == 0, r.err
        assert "nested more than 8 levels deep" in r.err
        assert os.path.isdir(deep / "a")
        [mine] = [n for n in os.listdir(root) if n != STAMP]
        assert cli("verify", str(root / mine)).rc == 0
    finally:
        subprocess.run(["rm", "-rf", str(deep)], check=True)  # pytest's rmtree recurses too


def _as_root_without_dac(*args: str) -> list[str]:
    """Run as root without the capabilities that let root read any directory: what a save
    meets on NFS with root_squash, or as one user of a fleet sharing a target."""
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *args]


def test_a_directory_we_cannot_list_is_left_alone(sample, tmp_path):
    """A directory named like ours that we may not enter made the target fail: no dump.
    Now it is left alone (rotation never deletes what it could not read), and `list`
    shows it on a line of its own instead of failing."""
    root = tmp_path / "dumps"
    theirs = root / STAMP
    os.makedirs(theirs)
    (theirs / "manifest.json").write_bytes(_complete_manifest(STAMP, None))
    os.chown(theirs, 65534, 65534)
    os.chmod(theirs, 0o700)
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, "-m", "kdump_capture"]
    for keep in ("1", "-1"):
        argv = [*base, *save_args(sample, str(root), f"KDUMP_KEEP_OLD_DUMPS={keep}")]
        p = subprocess.run(
            _as_root_without_dac(*argv), capture_output=True, text=True, env=env, timeout=300
        )
        assert p.returncode == 0, p.stderr
        assert "Permission denied; left alone" in p.stderr
        assert (theirs / "manifest.json").exists()
    os.chmod(root, 0o555)  # list only reads: a target it may not write is fine
    try:
        p = subprocess.run(
            _as_root_without_dac(*base, "list", "--json", "--config", "/dev/null", f"file://{root}"),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        os.chmod(root, 0o700)
    assert p.returncode == 0, p.stderr
    listed = {d["directory"]: d for d in json.loads(p.stdout)}
    assert listed.pop(STAMP) | {"status": "failed", "note": "cannot list: Permission denied"}
    assert [d["status"] for d in listed.values()] == ["complete"]  # our second save's


def _file_transport(root):
    from kdump_capture.urls import parse_target
    from transports import open_transport
    from transports.base import TransportSettings

    target, _ = parse_target(f"file://{root}")
    return open_transport(target, TransportSettings(checksum="sha256"))


def test_a_dump_directory_swapped_for_a_link_receives_nothing(tmp_path):
    """Another host may rename entries of a shared directory: our new dump directory,
    exchanged for a link to a directory elsewhere after we made it, received README.txt
    and the vmcore (all of memory) through the link. Files are now created, written,
    read back and published through the directory we opened, never by name."""
    root, victim_dir = tmp_path / "dumps", tmp_path / "victim"
    victim = make_victim(str(victim_dir))
    with _file_transport(root) as tr:
        tr.makedir(STAMP)
        sink = tr.create(f"{STAMP}/vmcore")
        os.rename(root / STAMP, root / "moved")
        os.symlink(victim_dir, root / STAMP)
        sink.write(b"memory" * 1000)
        sink.seek(0)  # a seeked file is read back for its checksum
        sink.write(b"MEMORY")
        info = sink.commit()
        with pytest.raises(UnsafeFile, match="a symbolic link, not a directory"):
            tr.create(f"{STAMP}/README.txt")
    assert snapshot(str(victim_dir)) == victim
    data = (root / "moved" / "vmcore").read_bytes()
    assert data == b"MEMORY" + b"memory" * 999
    assert info.digest == hashlib.sha256(data).hexdigest()


def test_a_new_directory_swapped_for_a_link_is_not_chmod_through_it(tmp_path, monkeypatch):
    """Between mkdir and chmod by name, a link in place of the new directory made chmod
    change the mode of whatever it pointed to."""
    root, victim_dir = tmp_path / "dumps", tmp_path / "victim"
    os.makedirs(victim_dir, mode=0o755)
    os.chmod(victim_dir, 0o755)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if path == STAMP:
            os.rename(path, "moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.symlink(victim_dir, path, dir_fd=dir_fd)

    with _file_transport(root) as tr:
        monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
        with pytest.raises(UnsafeFile, match="replaced by a link"):
            tr.makedir(STAMP)
    assert os.stat(victim_dir).st_mode & 0o777 == 0o755


def test_a_publish_that_fails_leaves_no_temporary_file(tmp_path):
    """The sink closed its directory before abort() could remove the temporary file: a
    rename failing (ENOSPC, EIO, an NFS timeout) left a vmcore-sized file behind."""
    root = tmp_path / "dumps"
    with _file_transport(root) as tr:
        tr.makedir(STAMP)
        os.makedirs(root / STAMP / "vmcore" / "x")  # the final name: a non-empty directory
        with pytest.raises(TransportError, match="publishing"):
            with tr.create(f"{STAMP}/vmcore") as sink:
                sink.write(b"memory" * 1000)
                sink.commit()
    assert sorted(os.listdir(root / STAMP)) == ["vmcore"]
