"""`kdump-capture save`, `list` and `verify` against server configurations admins run
(an upload-only FTP account, ...), each a real server of its own on loopback."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from kdump_capture.sample import SampleSpec, write_sample
from tests.servers.ftp import vsftpd

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
