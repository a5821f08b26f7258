"""`kdump-capture notify`: mail at the next boot about the dumps saved since the last mail,
against a real SMTP server on loopback (aiosmtpd: STARTTLS, AUTH) and real dumps."""

from __future__ import annotations

import os
import stat
import time

import pytest

from kdump_capture import notify
from kdump_capture.config import load_config
from kdump_capture.errors import TransportError
from kdump_capture.sample import SampleSpec, write_sample
from tests.servers.smtp import smtpd

from .helpers import cli, save_args

PASSWORD = "smtp-Secret-pw9"
LOGIN = {"KDUMP_SMTP_USER": "kdump", "KDUMP_SMTP_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """A target with two complete dumps of this host: crashed an hour and a day ago."""
    base = tmp_path_factory.mktemp("notify")
    now = int(time.time())
    for ago in (86400, 3600):
        src = base / f"vmcore-{ago}"
        write_sample(str(src), SampleSpec(ram_mib=8, crash_time=now - ago))
        r = cli(*save_args(str(src), str(base / "dumps")))
        assert r.rc == 0, r.err
    return base / "dumps"


def _config(tmp_path, dumps, server, **extra):
    lines = {
        "KDUMP_SAVEDIR": f"file://{dumps}",
        "KDUMP_SMTP_SERVER": server.address,
        "KDUMP_NOTIFICATION_TO": "admin@example.org",
        "KDUMP_NOTIFICATION_CC": "oncall@example.org",
        "KDUMP_NET_TIMEOUT": "5",
        **extra,
    }
    conf = tmp_path / "kdump"
    conf.write_text("".join(f'{k}="{v}"\n' for k, v in lines.items()))
    os.chmod(conf, 0o600)
    return str(conf)


def test_each_new_dump_is_mailed_once(tmp_path, dumps):
    with smtpd(str(tmp_path)) as server:
        conf = _config(tmp_path, dumps, server)
        state = tmp_path / "state" / "notified.json"
        r = cli("notify", "--config", conf, "--state", str(state))
        assert r.rc == 0, r.err
        assert len(server.received) == 2, r.out + r.err
        first, second = server.received  # oldest crash first
        assert first["Subject"].startswith("kdump: ") and first["Subject"].endswith(" crashed")
        assert first["To"] == "admin@example.org" and first["Cc"] == "oncall@example.org"
        assert server.envelopes[0][1] == ["admin@example.org", "oncall@example.org"]
        body = second.get_content()
        assert "status:      complete" in body
        assert "kernel:      6.1.0-sample-amd64" in body and "\npanic:" in body
        assert f"dump:        file://{dumps}/" in body
        assert r.out.count("mailed admin@example.org") == 2
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
        # the next boot: nothing new, nothing mailed
        r = cli("notify", "--config", conf, "--state", str(state))
        assert r.rc == 0 and "no new dumps" in r.out
        assert len(server.received) == 2


def test_the_first_run_mails_only_recent_dumps(tmp_path, dumps):
    """Enabling notification must not mail a target's whole history: the first run (no
    state) mails the last FIRST_RUN_DAYS days; later runs everything newer than
    WINDOW_DAYS not mailed before."""
    with smtpd(str(tmp_path)) as server:
        cfg = load_config(_config(tmp_path, dumps, server))
        state = str(tmp_path / "notified.json")
        later = time.time() + (notify.FIRST_RUN_DAYS - 0.5) * 86400
        assert notify.run(cfg, state, now=later) == 1  # the dump a day old is too old now
        assert notify.run(cfg, state, now=later) == 1  # later runs: the longer window
        assert notify.run(cfg, state, now=later) == 0
    assert len(server.received) == 2


def test_a_login_goes_only_over_tls(tmp_path, dumps):
    """With KDUMP_SMTP_USER the password is never sent in clear: a server without STARTTLS
    is refused before the login (exit 6), nothing is recorded as mailed, and the next run
    tries again. With STARTTLS (the test CA trusted through SSL_CERT_FILE) it goes."""
    state = tmp_path / "notified.json"
    with smtpd(str(tmp_path / "plain")) as plain:
        conf = _config(
            tmp_path, dumps, plain, KDUMP_SMTP_USER="kdump", KDUMP_SMTP_PASSWORD=PASSWORD
        )
        os.makedirs(tmp_path / "plain", exist_ok=True)
        r = cli("notify", "--config", conf, "--state", str(state))
        assert r.rc == 6, r.out + r.err
        assert "does not offer STARTTLS" in r.err and "not sent in clear" in r.err
        assert plain.received == []
    (tmp_path / "tls").mkdir()
    with smtpd(str(tmp_path / "tls"), tls=True, user="kdump", password=PASSWORD) as server:
        conf = _config(
            tmp_path, dumps, server, KDUMP_SMTP_USER="kdump", KDUMP_SMTP_PASSWORD=PASSWORD
        )
        env = {"SSL_CERT_FILE": server.ca_file}
        r = cli("notify", "--config", conf, "--state", str(state), env=env)
        assert r.rc == 0, r.out + r.err
        assert server.logins == ["kdump"] and len(server.received) == 2
        bad = _config(tmp_path, dumps, server, KDUMP_SMTP_USER="kdump", KDUMP_SMTP_PASSWORD="nope")
        r = cli("notify", "--config", bad, "--state", str(tmp_path / "other.json"), env=env)
        assert r.rc == 6 and "login of 'kdump'" in r.err, r.err
        # an untrusted certificate is a TLS failure, not a silent downgrade
        r = cli("notify", "--config", conf, "--state", str(tmp_path / "third.json"))
        assert r.rc == 6 and "TLS failed" in r.err, r.err
    for text in (r.out, r.err, state.read_text()):
        assert PASSWORD not in text


def test_a_refused_recipient_is_retried_at_the_next_run(tmp_path, dumps):
    state = tmp_path / "notified.json"
    with smtpd(str(tmp_path), refuse=True) as server:
        r = cli("notify", "--config", _config(tmp_path, dumps, server), "--state", str(state))
        assert r.rc == 6, r.err
        assert f"SMTP server {server.address}" in r.err and "550" in r.err
    with smtpd(str(tmp_path)) as server:
        r = cli("notify", "--config", _config(tmp_path, dumps, server), "--state", str(state))
        assert r.rc == 0 and len(server.received) == 2, r.err


def test_without_a_recipient(tmp_path):
    r = cli("notify", "--config", "/dev/null", "--state", str(tmp_path / "s"))
    assert r.rc == 2 and "KDUMP_NOTIFICATION_TO is empty" in r.err
    r = cli("notify", "--config", "/dev/null", "--if-configured", "--state", str(tmp_path / "s"))
    assert r.rc == 0 and not (tmp_path / "s").exists()


def test_a_failed_dump_says_it_was_not_saved():
    from kdump_capture.fleet import Listed

    item = Listed(
        "web01-2026-12-05-10-00-00", "web01", 1764928800, "6.1.0", "failed", "-", None, 4096, "-"
    )
    msg = notify.compose("web01", notify.Pending("sftp://u@h/d", item), "root@web01", "a@b", [])
    assert msg["Subject"] == "kdump: web01 crashed (failed)"
    assert "NOT saved completely" in msg.get_content()


@pytest.mark.parametrize(
    "value, parsed",
    [("", ("localhost", 25)), ("mail:587", ("mail", 587)), ("[::1]:2525", ("::1", 2525))],
)
def test_smtp_server_values(value, parsed):
    assert notify.smtp_server(value) == parsed


def test_a_bad_smtp_server_value_is_a_config_error():
    from kdump_capture.errors import ConfigError

    with pytest.raises(ConfigError):
        notify.smtp_server("mail:notaport")
    assert TransportError.exit_code == 6


def test_other_kdumps_dumps_are_not_mailed(tmp_path, dumps):
    """`list` shows Red Hat's, SUSE's and Debian's dumps on a target too; notify mails only
    this host's dumps of ours."""
    import shutil

    target = tmp_path / "mixed"
    shutil.copytree(dumps, target)
    stamp = time.strftime("%Y-%m-%d-%H:%M:%S", time.gmtime(time.time() - 60))
    other = target / f"10.0.0.5-{stamp}"
    other.mkdir()
    (other / "vmcore").write_bytes(b"x" * 4096)
    (other / "vmcore-dmesg.txt").write_text("Kernel panic - not syncing: test\n")
    with smtpd(str(tmp_path)) as server:
        cfg = load_config(_config(tmp_path, target, server))
        assert notify.run(cfg, str(tmp_path / "s.json")) == 2
        assert all("10.0.0.5" not in m.get_content() for m in server.received)


class _HostileSmtp:
    """A raw SMTP 'server' on loopback (a thread): ``endless`` greets, then answers EHLO
    with continuation lines (``250-...``) without end, up to ``cap`` bytes; ``drip`` sends
    its greeting a byte every 0.2 s. Counts what it managed to send."""

    def __init__(self, mode: str, cap: int = 48 << 20) -> None:
        import socket
        import threading

        from tests.servers.common import LOOPBACK

        self.mode, self.cap, self.sent = mode, cap, 0
        self.sock = socket.create_server((LOOPBACK, 0))
        self.address = f"{LOOPBACK}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            try:
                if self.mode == "endless":
                    conn.sendall(b"220 hostile ESMTP\r\n")
                    conn.recv(1000)
                    line = b"250-" + b"x" * 1000 + b"\r\n"
                    while self.sent < self.cap:
                        conn.sendall(line)
                        self.sent += len(line)
                else:
                    for ch in b"220 a greeting sent very slowly, a byte at a time\r\n" * 4:
                        conn.sendall(bytes([ch]))
                        self.sent += 1
                        time.sleep(0.2)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["endless", "drip"])
def test_a_hostile_smtp_server_is_bounded(tmp_path, dumps, mode):
    """Each SMTP reply is bounded in size (REPLY_LIMIT) and time (the timeout): smtplib
    alone read an endless multi-line reply into memory until the OOM killer came (24 GiB
    in 9 minutes), and a server sending a byte a second held it past SIGTERM."""
    server = _HostileSmtp(mode)
    try:
        conf = _config(tmp_path, dumps, server)
        start = time.monotonic()
        r = cli("notify", "--config", conf, "--state", str(tmp_path / "s.json"), timeout=120)
        took = time.monotonic() - start
    finally:
        server.close()
    assert r.rc == 6, r.out + r.err
    if mode == "endless":
        assert "a reply longer than 64 KiB" in r.err, r.err
        assert server.sent < 8 << 20  # it stopped reading soon after 64 KiB
    else:
        assert "no whole reply within 5 s" in r.err, r.err
        assert took < 20, took  # the greeting alone would take 40 s


@pytest.mark.parametrize("kind", ["huge", "fifo"])
def test_a_state_file_not_ours_starts_afresh(tmp_path, dumps, kind):
    """A state file larger than STATE_LIMIT, or a FIFO in its place, is taken as a corrupt
    one is (a warning, the first run's window): it was an internal error (exit 1) at every
    boot, and no mail ever went."""
    state = tmp_path / "notified.json"
    if kind == "huge":
        state.write_bytes(b" " * (notify.STATE_LIMIT + 1))
    else:
        os.mkfifo(state)
    with smtpd(str(tmp_path)) as server:
        r = cli("notify", "--config", _config(tmp_path, dumps, server), "--state", str(state))
        assert r.rc == 0, r.err
        assert "starting afresh" in r.err and len(server.received) == 2
    assert stat.S_ISREG(state.lstat().st_mode) and notify.read_state(str(state))


def test_two_runs_at_once_mail_each_dump_once(tmp_path, dumps):
    """The boot-time unit and an admin's run at once: both read the state before either
    wrote it, and each dump was mailed twice. One run at a time now (a lock beside the
    state): the second waits and finds nothing new."""
    import subprocess
    import sys

    from .helpers import ROOT

    state = tmp_path / "notified.json"
    with smtpd(str(tmp_path), delay=1.0) as server:
        conf = _config(tmp_path, dumps, server)
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "kdump_capture", "notify", "--config", conf]
        runs = [
            subprocess.Popen([*cmd, "--state", str(state)], env=env, stdout=subprocess.PIPE)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=120)[0].decode() for p in runs]
        assert [p.returncode for p in runs] == [0, 0], outs
    assert len(server.received) == 2, outs
    assert sum(o.count("mailed admin@example.org") for o in outs) == 2, outs
    assert len(notify.read_state(str(state))) == 2


def test_several_addresses_all_get_the_mail(tmp_path, dumps):
    """KDUMP_NOTIFICATION_TO with blank-separated addresses (SUSE's mailx takes them so)
    mailed only the first, while the output named them all; commas in _CC; a line end
    that would start a header of its own is a config error (it was an internal error)."""
    state = str(tmp_path / "s.json")
    with smtpd(str(tmp_path)) as server:
        conf = _config(
            tmp_path,
            dumps,
            server,
            KDUMP_NOTIFICATION_TO="admin@example.org oncall@example.org",
            KDUMP_NOTIFICATION_CC="a@example.org, b@example.org",
        )
        r = cli("notify", "--config", conf, "--state", state)
        assert r.rc == 0, r.err
        assert len(server.received) == 2
        everyone = ["admin@example.org", "oncall@example.org", "a@example.org", "b@example.org"]
        assert server.envelopes[0][1] == everyone
        assert server.received[0]["To"] == "admin@example.org, oncall@example.org"
        bad = _config(
            tmp_path, dumps, server, KDUMP_NOTIFICATION_TO="admin@example.org\nBcc: x@example.org"
        )
        r = cli("notify", "--config", bad, "--state", str(tmp_path / "t.json"))
        assert r.rc == 2 and "KDUMP_NOTIFICATION_TO: 'Bcc:' is not a mail address" in r.err
        assert len(server.received) == 2


@pytest.mark.parametrize("kind", ["file", "sftp", "ftp", "cifs", "s3"])
def test_status_and_notify_read_only_this_hosts_dumps(kind, request, tmp_path, monkeypatch):
    """On a target shared by a fleet, `status` and `notify` (at every boot) need this
    host's dumps only: they read every host's manifest, a request or more per dump (5,000
    other hosts' dumps over SFTP on loopback: 5,003 listings, 5,002 reads, 19 s; minutes
    over a WAN). Only the root and this host's own directories are listed and read now;
    `list` still shows every host's."""
    from kdump_capture import fleet
    from kdump_capture.load.commands import last_dump
    from tests.servers.targets import make_target
    from tests.test_list import _manifest, _plant
    from tests.test_save_network import write_config

    target = make_target(kind, request)
    now = int(time.time())
    # a file target's names carry no host (the save's own): other hosts' have a prefix
    me = None if kind == "file" else "me"
    mine = [f"{me + '-' if me else ''}2026-01-0{i}-00-00-00" for i in (1, 2)]
    others = [f"h{i}-2026-02-01-00-00-{i:02d}" for i in range(12)]
    with target.transport() as tr:
        for i, name in enumerate(mine):
            _plant(tr, name, {"manifest.json": _manifest(crash_time=now - 7200 + i * 3600)})
        for name in others:  # newer crashes than ours
            _plant(tr, name, {"manifest.json": _manifest(crash_time=now - 60)})
        _plant(tr, "h1-2026-02-02-00-00-00", {"manifest.json": b"[" * 100000})
        # another kdump's dump: `list` shows it, it is never ours
        stamp = time.strftime("%Y%m%d%H%M")
        _plant(tr, f"10.0.0.5-{stamp}", {f"dump.{stamp}": b"x"})
        everyone = fleet.list_dumps(tr)
        cls = type(tr)
    assert len(everyone) == len(mine) + len(others) + 2
    conf = write_config(
        tmp_path / "kdump", target, KDUMP_HOSTNAME="me", KDUMP_NOTIFICATION_TO="a@example.org"
    )
    cfg = load_config(conf)
    touched: list[tuple[str, str]] = []
    listdir, read = cls.listdir, cls.read

    def counted_listdir(self, relpath="", *a, **k):
        touched.append(("listdir", relpath))
        return listdir(self, relpath, *a, **k)

    def counted_read(self, relpath, *a, **k):
        touched.append(("read", relpath))
        return read(self, relpath, *a, **k)

    monkeypatch.setattr(cls, "listdir", counted_listdir)
    monkeypatch.setattr(cls, "read", counted_read)
    host, found = notify.find(cfg)
    assert sorted(p.item.directory for p in found) == mine
    assert {p for _, p in touched} == {"", *mine, *(f"{d}/manifest.json" for d in mine)}
    touched.clear()
    shown = last_dump(cfg)
    assert f"/{mine[1]} (complete, " in shown, shown
    assert {p.partition("/")[0] for _, p in touched} == {"", *mine}
