"""`kdump-capture save` over every network transport, against the real test servers."""

import json
import os
import socket
import stat
import subprocess

import pytest

from kdump_capture.sample import SampleSpec, write_sample
from kdump_capture.urls import parse_target
from tests.servers.targets import make_target

from .helpers import cli

KINDS = ("sftp", "ftp", "vsftpd", "cifs")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=12))
    return str(p)


def write_config(path, target, **extra):
    """A sysconfig file: passwords travel in the file, never in argv."""
    lines = [f'KDUMP_SAVEDIR="{target.url}"', "KDUMP_NET_TIMEOUT=10"]
    if target.settings.host_key:
        lines.append(f'KDUMP_HOST_KEY="{target.settings.host_key}"')
    if target.settings.ssh_identity:
        lines.append(f'KDUMP_SSH_IDENTITY="{" ".join(target.settings.ssh_identity)}"')
    lines += [f'{k}="{v}"' for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return str(path)


def run_save(conf, sample, *sets):
    args = ["save", "--config", conf, "--vmcore", sample, "--no-reboot"]
    for s in sets:
        args += ["--set", s]
    return cli(*args)


def server_dumps(target):
    if not os.path.isdir(target.server_dir):
        return []
    return sorted(n for n in os.listdir(target.server_dir) if not n.startswith("."))


@pytest.mark.parametrize("kind", KINDS)
def test_save_rotate_and_keep_secrets(kind, request, sample, tmp_path):
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_KEEP_OLD_DUMPS="1")
    password = parse_target(target.url)[0].password
    outputs = []
    for _ in range(3):
        r = run_save(conf, sample)
        assert r.rc == 0, r.err
        outputs.append(r.out + r.err)
    names = server_dumps(target)
    host = socket.gethostname()
    assert len(names) == 2, names  # the new dump plus one older
    assert all(n.startswith(f"{host}-") for n in names)
    d = os.path.join(target.server_dir, names[-1])
    with open(os.path.join(d, "vmcore"), "rb") as f, open(sample, "rb") as g:
        assert f.read() == g.read()
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    assert m["status"] == "complete"
    assert cli("verify", d).rc == 0
    readme = open(os.path.join(d, "README.txt")).read()
    if password:
        for text in outputs + [readme, json.dumps(m)]:
            assert password not in text
    if kind == "sftp":
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for f in os.listdir(d):
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600


def test_fallback_to_the_next_target(request, sample, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket closes
    local = tmp_path / "local"
    conf = tmp_path / "kdump"
    conf.write_text(
        f'KDUMP_SAVEDIR="ftp://127.0.0.1:{closed}/dumps file://{local}"\nKDUMP_NET_TIMEOUT=5\n'
    )
    r = run_save(str(conf), sample)
    assert r.rc == 0, r.err
    assert "trying the next target" in r.err
    assert len(os.listdir(local)) == 1


def test_wrong_host_key_is_refused(request, sample, tmp_path):
    target = make_target("sftp", request)
    conf = write_config(tmp_path / "kdump", target)
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdFYt3/9fHPJjCoOhIrhRuBfvCtXCgw6JPfKhc1cMdn"
    r = run_save(conf, sample, f"KDUMP_HOST_KEY={other}")
    assert r.rc == 7, r.err
    assert "host key" in r.err.lower()
    assert server_dumps(target) == []


def test_a_host_key_of_another_type_is_refused(request, sample, tmp_path):
    """The key recorded for the server is RSA, the server now has only ed25519 (it was
    reinstalled): no key type in common. That was 'connection lost (Incompatible ssh
    peer (no acceptable host key))', exit 6, retried; it is an unknown host key."""
    target = make_target("sftp", request)
    key = tmp_path / "other_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(key)], check=True)
    recorded = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    conf = write_config(tmp_path / "kdump", target)
    r = run_save(conf, sample, f"KDUMP_HOST_KEY={recorded}")
    assert r.rc == 7, r.err
    assert "host key unknown" in r.err and "ssh-rsa" in r.err and "lost" not in r.err
    assert server_dumps(target) == []


@pytest.mark.parametrize("revoked", [False, True], ids=["ca-lines", "revoked"])
def test_known_hosts_with_markers(revoked, request, sample, tmp_path):
    """A known_hosts with an SSH CA (@cert-authority) line before the server's own line:
    'internal error: InvalidHostKey' (exit 1), no dump; paramiko's loader took the marker
    for a host name. Marker lines are now read as ssh reads them: the CA line is skipped,
    and a key marked @revoked is refused (exit 7)."""
    target = make_target("sftp", request)
    s = request.getfixturevalue("ssh_server")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    ca = tmp_path / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    ca_key = " ".join(ca.with_suffix(".pub").read_text().split()[:2])
    lines = [f"@cert-authority *.example.com {ca_key}"]
    if revoked:
        lines.append(f"@revoked * {s.host_key}")
    with open(s.known_hosts) as f:
        lines.append(f.read().strip())
    (home / ".ssh" / "known_hosts").write_text("\n".join(lines) + "\n")
    conf = tmp_path / "kdump"
    conf.write_text(
        f'KDUMP_SAVEDIR="{target.url}"\nKDUMP_NET_TIMEOUT=10\nKDUMP_SSH_IDENTITY="{s.client_key}"\n'
    )
    args = ["save", "--config", str(conf), "--vmcore", sample, "--no-reboot"]
    r = cli(*args, env={"HOME": str(home)})
    if revoked:
        assert r.rc == 7, r.err
        assert "@revoked" in r.err and server_dumps(target) == []
    else:
        assert r.rc == 0, r.err
        assert len(server_dumps(target)) == 1


@pytest.mark.parametrize("margin", ["1", "64"])
def test_cifs_free_space_check_while_a_write_is_in_flight(margin, request, tmp_path):
    """The free-space monitor stats the share while a 4 MiB WRITE still awaits its reply.
    That WRITE must leave SMB credits for it: a 4 MiB vmcore used to fail with "Request
    requires 1 credits but only 0 credits are available" (exit 6)."""
    small = tmp_path / "vmcore"
    write_sample(str(small), SampleSpec(ram_mib=4))
    target = make_target("cifs", request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_FREE_DISK_SIZE=margin)
    r = run_save(conf, str(small))
    assert r.rc == 0, r.err
    [name] = server_dumps(target)
    with open(os.path.join(target.server_dir, name, "vmcore"), "rb") as f:
        assert f.read() == small.read_bytes()


@pytest.mark.parametrize("whole_share", [False, True], ids=["directory", "share-root"])
def test_a_cifs_share_the_server_does_not_have_is_a_target_error(
    whole_share, request, sample, tmp_path
):
    """A URL naming a missing share ended in "internal error: FileNotFoundError" (exit 1);
    one naming only the share (no directory in it) in "statfs SHARE: no such file or
    directory", which did not say that the share was missing."""

    target = make_target("cifs", request)
    share = parse_target(target.url)[0].share
    missing = target.url.replace(f"/{share}/", "/nosuch-share/", 1)
    if whole_share:
        missing = missing.rsplit("/", 1)[0]
    assert missing != target.url
    conf = tmp_path / "kdump"
    conf.write_text(f'KDUMP_SAVEDIR="{missing}"\nKDUMP_NET_TIMEOUT=10\n')
    os.chmod(conf, 0o600)
    r = run_save(str(conf), sample)
    assert r.rc == 6, r.err
    assert "not found (a share or a directory above it is missing)" in r.err
    assert "internal error" not in r.err


def test_debug_output_over_cifs_does_not_grow_with_the_dump(request, sample, tmp_path):
    """KDUMP_VERBOSE bit 8 printed smbprotocol's line per message received: about 100 KB
    per GB dumped, 9 s per GB on a 115200-baud serial console."""
    target = make_target("cifs", request)
    conf = write_config(tmp_path / "kdump", target)
    r = run_save(conf, sample, "KDUMP_VERBOSE=15")
    assert r.rc == 0, r.err
    assert "DEBUG" in r.err  # debug output is on
    assert "Socket recv" not in r.err


def test_cifs_connections_are_not_logged_outside_debug_output(request, sample, tmp_path):
    """Without KDUMP_VERBOSE bit 8, smbprotocol says nothing: its transport logger, set to
    INFO for debug output, printed 'Connecting to DirectTcp socket' and 'Disconnecting ...'
    for every connection of a save, a retry, `list` and `verify`."""
    target = make_target("cifs", request)
    conf = write_config(tmp_path / "kdump", target)
    r = run_save(conf, sample)
    assert r.rc == 0, r.err
    assert "DirectTcp" not in r.err
    r = cli("list", "--config", str(conf), target.url)
    assert r.rc == 0 and "DirectTcp" not in r.err, r.err


@pytest.mark.parametrize("kind", ("file", "sftp", "ftp", "cifs", "s3"))
def test_a_dump_cut_short_never_takes_a_whole_ones_place(kind, request, tmp_path):
    """KEEP_OLD_DUMPS=1, two older dumps, the newer one's vmcore cut to 4 KiB (the target
    lost data, or someone trimmed it): its manifest still says complete, so rotation kept
    it as the one older dump and deleted the whole one, and `list` said `complete`. Now a
    dump whose files differ from its manifest (by the sizes the target lists) is `damaged`:
    never counted among the complete ones, kept while among the newest as one would be."""
    target = make_target(kind, request)
    conf = write_config(tmp_path / "kdump", target, KDUMP_KEEP_OLD_DUMPS="1")
    samples = []
    for i, t in enumerate((1764000000, 1764050000, 1764100000)):
        samples.append(str(tmp_path / f"vmcore{i}"))
        write_sample(samples[-1], SampleSpec(ram_mib=4, crash_time=t))
    for s in samples[:2]:
        assert run_save(conf, s).rc == 0
    with target.transport() as tr:
        whole, cut = sorted(e.name for e in tr.listdir("") if e.is_dir)
        tr.remove_file(f"{cut}/vmcore")
        with tr.create(f"{cut}/vmcore") as sink:
            sink.write(b"\0" * 4096)
            sink.commit()
    before = {f: target.read_back(f) for f in target.files() if f.startswith(whole + "/")}
    r = cli("list", "--config", conf, target.url, "--json")
    assert r.rc == 0, r.err
    listed = {d["directory"]: d for d in json.loads(r.out)}
    assert listed[whole]["status"] == "complete"
    assert listed[cut]["status"] == "damaged"
    assert "vmcore holds 4096 bytes, the manifest says" in listed[cut]["note"]
    r = run_save(conf, samples[2])
    assert r.rc == 0, r.err
    assert f"{cut}: vmcore holds 4096 bytes" in r.err and "not counted as a complete" in r.err
    with target.transport() as tr:
        names = sorted(e.name for e in tr.listdir("") if e.is_dir)
    assert len(names) == 3 and names[:2] == [whole, cut]  # the new one, and both kept
    assert {f: target.read_back(f) for f in target.files() if f.startswith(whole + "/")} == before
