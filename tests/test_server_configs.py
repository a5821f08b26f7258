"""`kdump-capture save` against server configurations admins run (an upload-only FTP
account, an SMB share without ACLs, an SFTP server that refuses chmod), each a real server
of its own on loopback."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile

import pytest

from kdump_capture.sample import SampleSpec, write_sample
from tests.helpers import cli
from tests.servers.ftp import vsftpd
from tests.servers.samba import smbd
from tests.servers.sshd import sshd

from .test_save_network import run_save


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "vmcore"
    write_sample(str(p), SampleSpec(ram_mib=4))
    return str(p)


@pytest.fixture
def world_dir():
    """A directory the test's local user can write (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="kdump-srvconf-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ftp_config(path, s, sub: str, **extra) -> str:
    url = f"ftp://{s.user}:{s.password}@{s.host}:{s.port}{s.url_root}/{sub}"
    lines = [f'KDUMP_SAVEDIR="{url}"', "KDUMP_NET_TIMEOUT=10"]
    lines += [f'{k}="{v}"' for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return str(path)


def _cifs_config(path, s, sub: str) -> str:
    url = f"cifs://{s.user}:{s.password}@{s.host}:{s.port}/{s.share}/{sub}"
    path.write_text(f'KDUMP_SAVEDIR="{url}"\nKDUMP_NET_TIMEOUT=10\n')
    os.chmod(path, 0o600)
    return str(path)


def test_an_upload_only_ftp_account_keeps_the_earlier_dumps(test_user, world_dir, sample, tmp_path):
    """vsftpd's download_enable=NO (a drop box: RETR answers 550) let rotation read no
    manifest: every earlier complete dump counted as failed and was deleted by the next
    save. What cannot be read is not judged: it stays."""
    conf_lines = "download_enable=NO\n"
    with vsftpd(str(tmp_path), world_dir, *test_user, extra=conf_lines) as s:
        conf = _ftp_config(tmp_path / "kdump", s, "dumps", KDUMP_KEEP_OLD_DUMPS="5")
        first = run_save(conf, sample)
        assert first.rc == 0, first.err
        [earlier] = os.listdir(f"{world_dir}/dumps")
        second = run_save(conf, sample)
    assert second.rc == 0, second.err
    names = sorted(os.listdir(f"{world_dir}/dumps"))
    assert earlier in names and len(names) == 2, (names, second.err)
    assert "left alone" in second.err and "deleting" not in second.err


def test_an_ftp_server_that_allows_one_connection_says_a_save_needs_two(
    test_user, world_dir, sample, tmp_path
):
    """vsftpd's max_per_ip=1: the upload's second connection is refused with 421, and
    the save ended in "connection lost (421 There are too many connections ...)"."""
    with vsftpd(str(tmp_path), world_dir, *test_user, extra="max_per_ip=1\n") as s:
        r = run_save(_ftp_config(tmp_path / "kdump", s, "dumps"), sample)
    assert r.rc == 6, r.err
    assert "the server must allow two from this host" in r.err


def test_an_smb_share_without_acls_is_noted_once(sample, tmp_path):
    """Samba with "nt acl support = no" answers success to an owner-only ACL and applies
    nothing: the vmcore stayed 0744, readable by every user of the server, with no warning
    and no note in the README. Now the ACL is read back: one warning, one note."""
    root = tmp_path / "share"
    with smbd(str(tmp_path), str(root), masks=False, extra="nt acl support = no\n") as s:
        r = run_save(_cifs_config(tmp_path / "kdump", s, "dumps"), sample)
    assert r.rc == 0, r.err
    [name] = os.listdir(root / "dumps")
    assert stat.S_IMODE(os.stat(root / "dumps" / name / "vmcore").st_mode) & 0o044  # the server's
    assert r.err.count("would not make") == 1, r.err
    readme = (root / "dumps" / name / "README.txt").read_text()
    assert readme.count("would not make") == 1 and "did not apply it" in readme


def test_an_smb_share_that_vetoes_dot_files_is_a_clear_target_error(sample, tmp_path):
    """Samba's "veto files = /.*/" refuses our temporary names (.kdump-tmp.*) as names
    that do not exist: 'internal error: FileNotFoundError', exit 1. Now exit 6 saying why."""
    root = tmp_path / "share"
    with smbd(str(tmp_path), str(root), extra="veto files = /.*/\n") as s:
        r = run_save(_cifs_config(tmp_path / "kdump", s, "dumps"), sample)
    assert r.rc == 6, r.err
    assert "veto files" in r.err and "internal error" not in r.err


def test_an_smb_share_that_denies_writing_says_so_plainly(sample, tmp_path):
    """A share the user may read but not write ("read only = yes", a "write list" without
    the user) answered STATUS_ACCESS_DENIED, shown as "SMBOSError: [Error 0] [NtStatus
    0xc0000022] Unknown NtStatus error returned 'STATUS_ACCESS_DENIED'". Now exit 6 saying
    access was denied and where the permission is set."""
    root = tmp_path / "share"
    (root / "dumps").mkdir(parents=True)
    with smbd(str(tmp_path), str(root), extra="read only = yes\n") as s:
        r = run_save(_cifs_config(tmp_path / "kdump", s, "dumps"), sample)
    assert r.rc == 6, r.err
    assert "access denied (STATUS_ACCESS_DENIED)" in r.err and "Unknown NtStatus" not in r.err
    assert "'write list' or 'read only'" in r.err


@pytest.mark.parametrize("umask", ["077", "022"])
def test_an_sftp_server_that_refuses_chmod(umask, sample, tmp_path):
    """OpenSSH's ``internal-sftp -P setstat,fsetstat`` refuses chmod: every save failed,
    'creating DIR: Permission denied' (exit 6), even with -u 077, where the server's umask
    gives the modes we want. Now the dump is saved; only modes that are not ours are warned
    about (once) and noted in the README, as with FTP servers without SITE CHMOD."""
    subsystem = f"internal-sftp -u {umask} -P setstat,fsetstat"
    with sshd(str(tmp_path / "sshd"), subsystem=subsystem) as s:
        root = tmp_path / "data"
        conf = tmp_path / "kdump"
        conf.write_text(
            f'KDUMP_SAVEDIR="sftp://root@{s.host}:{s.port}{root}"\nKDUMP_NET_TIMEOUT=10\n'
            f'KDUMP_HOST_KEY="{s.host_key}"\nKDUMP_SSH_IDENTITY="{s.client_key}"\n'
        )
        r = run_save(str(conf), sample)
    assert r.rc == 0, r.err
    [name] = os.listdir(root)
    modes = {n: stat.S_IMODE(os.stat(root / name / n).st_mode) for n in os.listdir(root / name)}
    readme = (root / name / "README.txt").read_text()
    if umask == "077":
        assert stat.S_IMODE(os.stat(root / name).st_mode) == 0o700
        assert set(modes.values()) == {0o600}, modes
        assert "refused to set modes" not in r.err + readme
    else:
        assert set(modes.values()) == {0o644}, modes  # the server's
        assert r.err.count("refused to set modes") == 1, r.err
        assert "refused to set modes" in readme and "(0644)" in readme


def _sftp_config(path, s, root, user: str = "root") -> str:
    path.write_text(
        f'KDUMP_SAVEDIR="sftp://{user}@{s.host}:{s.port}{root}"\nKDUMP_NET_TIMEOUT=10\n'
        f'KDUMP_HOST_KEY="{s.host_key}"\nKDUMP_SSH_IDENTITY="{s.client_key}"\n'
    )
    os.chmod(path, 0o600)
    return str(path)


def _owner_only(root) -> None:
    """Every dump directory below ``root`` 0700, every file in it 0600."""
    for name in os.listdir(root):
        assert stat.S_IMODE(os.stat(root / name).st_mode) == 0o700, name
        for f in os.listdir(root / name):
            assert stat.S_IMODE(os.stat(root / name / f).st_mode) == 0o600, (name, f)


def test_an_sftp_server_that_denies_statvfs_saves_without_checking_free_space(sample, tmp_path):
    """OpenSSH's sftp-server locked down (``-P statvfs``, or an allow-list ``-p`` without
    it) answers statvfs@openssh.com with "Permission denied": every save failed, exit 6
    "statvfs DIR: Permission denied", nothing written. A server without the extension was
    already taken as one that cannot report free space; this one is too."""
    with sshd(str(tmp_path / "sshd"), subsystem="internal-sftp -u 077 -P statvfs") as s:
        root = tmp_path / "data"
        r = run_save(_sftp_config(tmp_path / "kdump", s, root), sample)
    assert r.rc == 0, r.err
    assert "cannot report free space" in r.err, r.err
    _owner_only(root)


def test_an_sftp_server_without_posix_rename_saves_and_rotates(sample, tmp_path):
    """OpenSSH's sftp-server denying posix-rename@openssh.com (``-P posix-rename``, an
    allow-list without it; servers other than OpenSSH's may lack it) answered every publish
    with "Permission denied": exit 6, no dump. Now SFTP v3's RENAME publishes (README.txt's
    placeholder removed first): the dumps are whole, verify, and rotation works."""
    with sshd(str(tmp_path / "sshd"), subsystem="internal-sftp -u 077 -P posix-rename") as s:
        root = tmp_path / "data"
        conf = _sftp_config(tmp_path / "kdump", s, root)
        runs = [run_save(conf, sample, "KDUMP_KEEP_OLD_DUMPS=1") for _ in range(3)]
    for r in runs:
        assert r.rc == 0, r.err
    assert runs[0].err.count("refuses posix-rename") == 1, runs[0].err
    names = sorted(os.listdir(root))
    assert len(names) == 2, names  # the oldest of three rotated away
    _owner_only(root)
    for name in names:
        assert "INCOMPLETE" not in (root / name / "README.txt").read_text()
        v = cli("verify", str(root / name))
        assert v.rc == 0, v.out + v.err


@pytest.mark.parametrize("command", ["echo This account is currently not available.", "/bin/false"])
def test_an_ssh_account_whose_shell_will_not_run_sftp_says_so(command, sample, tmp_path):
    """sshd runs an external sftp-server (Debian's default Subsystem) through the account's
    shell: a shell that prints a message (nologin, start-up files) or refuses (``/bin/false``,
    a restricted shell) ended the save in "connection lost (Garbage packet received)" or
    "(EOF during negotiation)", neither naming the account or what to change. (A forced
    command goes through the shell the same way; it stands in for a login shell here.)"""
    with sshd(str(tmp_path / "sshd"), extra=f"ForceCommand {command}\n") as s:
        r = run_save(_sftp_config(tmp_path / "kdump", s, tmp_path / "data"), sample)
        with open(os.path.join(s.workdir, "sshd.log")) as f:
            logins = f.read().count("Accepted publickey")
    assert r.rc == 6, r.err
    assert "the server did not start SFTP for root" in r.err, r.err
    assert "ForceCommand internal-sftp" in r.err and "connection lost" not in r.err
    if command.startswith("echo"):
        assert "currently not available" in r.err
    else:
        assert "exit status 1" in r.err
    assert logins == 1  # the same on every attempt: not retried


def _anonymous_incoming(tmp_path):
    """vsftpd's anonymous root and its ``incoming`` directory: the ftp user's, mode 0733
    (anyone may drop files, nobody may list them)."""
    anon = tmp_path / "anon"
    incoming = anon / "incoming"
    incoming.mkdir(parents=True)
    os.chmod(anon, 0o755)
    ftp = pwd.getpwnam("ftp")
    os.chown(incoming, ftp.pw_uid, ftp.pw_gid)
    os.chmod(incoming, 0o733)
    extra = (
        f"anonymous_enable=YES\nanon_root={anon}\nno_anon_password=YES\nanon_umask=077\n"
        "anon_upload_enable=YES\nanon_mkdir_write_enable=YES\n"
    )
    return anon, incoming, extra


@pytest.mark.parametrize("more", ["", "anon_other_write_enable=YES\nchown_uploads=YES\n"])
def test_an_ftp_account_that_may_not_append_says_what_to_change(more, sample, tmp_path):
    """vsftpd's anonymous uploads as installed (no anon_other_write_enable), or with
    chown_uploads (the file is handed to another user once stored): STOR is taken, APPE
    is not, and the save ended in "creating .kdump-tmp.README.txt...: 550 Permission
    denied." (or 553), as if the file could not be created."""
    anon, incoming, extra = _anonymous_incoming(tmp_path)
    extra += more + ("chown_username=nobody\n" if more else "")
    with vsftpd(str(tmp_path), str(anon), "anonymous", "", extra=extra) as s:
        conf = tmp_path / "kdump"
        conf.write_text(f'KDUMP_SAVEDIR="ftp://{s.host}:{s.port}/incoming"\nKDUMP_NET_TIMEOUT=10\n')
        r = run_save(str(conf), sample)
    assert r.rc == 6, r.err
    assert "took the file but refuses to append to it" in r.err, r.err
    assert "anon_other_write_enable=YES" in r.err and "internal error" not in r.err


def test_an_ftp_drop_box_that_will_not_list_says_so(sample, tmp_path):
    """vsftpd's anonymous ``incoming`` directory of mode 0733 (write, no listing: each host
    drops its dumps, none sees another's) answers LIST with "226 Transfer done (but failed
    to open directory)": `list` said "no dumps" (exit 0) over two complete dumps, and every
    save skipped rotation without a word, so the directory filled up unseen. Now `list`
    exits 6 saying the server will not list, and a save warns once and notes it in the
    dump's README (as S3 with a write-only key)."""
    anon, incoming, extra = _anonymous_incoming(tmp_path)
    extra += "anon_other_write_enable=YES\n"
    with vsftpd(str(tmp_path), str(anon), "anonymous", "", extra=extra) as s:
        url = f"ftp://{s.host}:{s.port}/incoming"
        conf = tmp_path / "kdump"
        conf.write_text(f'KDUMP_SAVEDIR="{url}"\nKDUMP_NET_TIMEOUT=10\nKDUMP_KEEP_OLD_DUMPS=1\n')
        runs = [run_save(str(conf), sample) for _ in range(2)]
        listing = cli("list", "--config", str(conf), url)
        [first] = sorted(os.listdir(incoming))[:1]
        check = cli("verify", "--config", str(conf), f"{url}/{first}")
    for r in runs:
        assert r.rc == 0, r.err
        assert r.err.count("will not list /incoming") == 1, r.err
    names = sorted(os.listdir(incoming))
    assert len(names) == 2, names
    _owner_only(incoming)
    assert "will not list" in (incoming / names[1] / "README.txt").read_text()
    assert listing.rc == 6, listing.out + listing.err
    assert "will not list it" in listing.err and "no dumps" not in listing.out
    assert check.rc == 6 and "will not list it" in check.err, check.out + check.err
