"""`kdump-capture check` tries every target before a crash does (load.targets), against
the real test servers: a wrong host key, password or directory is found before the crash,
not at it."""

from __future__ import annotations

import os

import pytest

from kdump_capture.load import targets
from kdump_capture.urls import parse_target
from tests.servers.targets import make_target

from .helpers import cli
from .test_save_network import server_dumps, write_config

OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdFYt3/9fHPJjCoOhIrhRuBfvCtXCgw6JPfKhc1cMdn"


def _check(conf, *extra):
    return cli("check", "--config", conf, *extra)


def _target_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("target:")]


@pytest.mark.parametrize("kind", ["sftp", "ftp", "cifs"])
def test_a_working_target_is_tried_and_left_as_it_was(kind, request, tmp_path):
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target)
    before = server_dumps(target)
    r = _check(conf, "--write-test")
    [line] = _target_lines(r.out)
    assert ": ok (written, read back and deleted a test file" in line, r.out + r.err
    password = parse_target(target.url)[0].password
    if password:
        assert password not in r.out + r.err
    # the probe's directory is gone, and it never looked like a dump
    if os.path.isdir(target.server_dir):
        assert not [n for n in os.listdir(target.server_dir) if "kdump-capture-check" in n]
    assert server_dumps(target) == before
    r = _check(conf)  # read-only: connects and lists
    [line] = _target_lines(r.out)
    assert ": ok (reachable, listed" in line, r.out + r.err


def test_a_wrong_host_key_or_password_is_found_before_the_crash(request, tmp_path):
    sftp = make_target("sftp", request)
    conf = write_config(tmp_path / "kdump", sftp, KDUMP_HOST_KEY=OTHER_KEY)
    r = _check(conf)
    [line] = _target_lines(r.out)
    assert "FAILED" in line and "host key" in line.lower(), r.out
    assert "problem: no target in KDUMP_SAVEDIR works from here" in r.out
    assert r.rc == 11

    ftp = make_target("ftp", request)
    wrong = parse_target(ftp.url)[0]
    url = ftp.url.replace(f":{wrong.password}@", ":not-the-password@")
    conf2 = tmp_path / "kdump2"
    conf2.write_text(f'KDUMP_SAVEDIR="{url} file://{tmp_path}/local"\nKDUMP_NET_TIMEOUT=5\n')
    r = _check(str(conf2), "--write-test")
    ftp_line, local_line = _target_lines(r.out)
    assert "FAILED" in ftp_line and "not-the-password" not in r.out + r.err, r.out
    assert ": ok (written" in local_line
    assert "warning: 1 of the 2 targets in KDUMP_SAVEDIR failed here" in r.out


def test_a_directory_that_takes_no_writes_fails_the_write_test(tmp_path):
    """A path that is a file (or an export that takes no writes) lists fine read-only at
    best; the write test says what the save would meet."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    conf = tmp_path / "kdump"
    conf.write_text(f'KDUMP_SAVEDIR="file://{blocker}/dumps"\n')
    r = _check(str(conf), "--write-test")
    [line] = _target_lines(r.out)
    assert "FAILED" in line and str(blocker) in line, r.out
    assert r.rc == 11


def test_no_targets_skips_them(tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text('KDUMP_SAVEDIR="ftp://127.0.0.1:1/dumps"\n')
    r = _check(str(conf), "--no-targets")
    assert _target_lines(r.out) == []
    assert "no target" not in r.out


def test_the_probe_is_not_a_dump_name():
    from kdump_capture import policy

    assert policy.parse_dump_name(f"{targets.PROBE_PREFIX}123-abcd1234") is None


def test_a_local_directory_not_there_yet_is_not_made_by_check(tmp_path):
    """The save creates the target directory; a read-only check says so and creates
    nothing (it used to fail on the free space of a directory that is not there)."""
    conf = tmp_path / "kdump"
    conf.write_text(f'KDUMP_SAVEDIR="file://{tmp_path}/a/b"\n')
    r = _check(str(conf))
    [line] = _target_lines(r.out)
    assert f"ok (does not exist yet: the save creates it in {tmp_path}" in line, r.out
    assert not (tmp_path / "a").exists()


def test_status_shows_this_hosts_newest_dump_on_a_network_target(request, tmp_path):
    """`status` said "not checked (sftp target)" for every network target; it reads the
    target as `list` does now, and shows this host's newest dump."""
    from kdump_capture.sample import SampleSpec, write_sample

    target = make_target("sftp", request)
    conf = write_config(tmp_path / "kdump", target)
    r = cli("status", "--config", conf)
    assert "last dump:   none" in r.out or "last dump:   sftp://" in r.out, r.out + r.err
    src = tmp_path / "vmcore"
    write_sample(str(src), SampleSpec(ram_mib=8, crash_time=1764990000))
    r = cli("save", "--config", conf, "--vmcore", str(src), "--no-reboot")
    assert r.rc == 0, r.err
    r = cli("status", "--config", conf)
    [line] = [ln for ln in r.out.splitlines() if ln.startswith("last dump:")]
    assert "2025-12-06 03:00:00 UTC" in line and "(complete" in line, line
    assert line.startswith(f"last dump:   {target.url.split('@')[0]}"), line


def test_a_check_stopped_by_sigterm_deletes_its_probe(tmp_path):
    """`timeout 30 kdump-capture check --write-test` (or systemd) stops it with SIGTERM:
    it died at once, without a word, and left its .kdump-capture-check-* directory on the
    server for good. Now SIGTERM ends it as Ctrl-C does: exit 130, the probe deleted."""
    import signal
    import subprocess
    import sys
    import time

    from tests.servers.ftp import pyftpd
    from tests.servers.proxy import DropProxy

    from .helpers import ROOT

    root = tmp_path / "root"
    with pyftpd(str(tmp_path), str(root)) as server:
        (root / "crash").mkdir()
        proxy = DropProxy(server.port, ftp=True, rate=400)  # slow: the probe takes seconds
        try:
            url = f"ftp://{server.user}:{server.password}@127.0.0.1:{proxy.port}/crash"
            p = subprocess.Popen(
                [sys.executable, "-m", "kdump_capture", "check", "--config", "/nonexistent"]
                + ["--set", f"KDUMP_SAVEDIR={url}", "--write-test"],
                env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while not os.listdir(root / "crash") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert os.listdir(root / "crash"), "the probe never began"
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=120)
        finally:
            proxy.close()
        assert p.returncode == 130, out + err
        assert "interrupted by signal 15" in err
        assert os.listdir(root / "crash") == []
