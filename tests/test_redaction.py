"""Passwords of targets never reach errors, show-config, logs, README.txt or manifest.json.

The passwords here are made of Greek letters (plus the characters that break naive
parsing: ``@ : / % ? #`` and quotes) and nothing else in the outputs is Greek, so finding
any Greek letter, or its percent-encoding, in an output is a leak, even of a fragment.
"""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kdump_capture import cli
from kdump_capture.config import load_config
from kdump_capture.errors import ConfigError, UrlError
from kdump_capture.sample import SampleSpec, write_sample
from kdump_capture.urls import SCHEMES, parse_savedir, redact
from tests.helpers import cli as run_cli
from tests.servers.common import free_port

GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
SPECIAL = "@:/%?#;!'\"\\$`&=+~,.-_[]"
# quote() of a Greek letter starts with one of these (UTF-8 lead bytes 0xCE, 0xCF).
GREEK_ENCODED = ("%CE", "%CF", "%ce", "%cf")

passwords = st.text(alphabet=GREEK + SPECIAL, min_size=1, max_size=16).filter(
    lambda p: any(c in GREEK for c in p)
)
users = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", max_size=8)
hosts = st.sampled_from(["host", "10.0.0.7", "[::1]", "nas.example.org", "h-1"])
paths = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-", max_size=12)
schemes = st.sampled_from([*SCHEMES, "FTP", "Sftp", "gopher", "x+y"])
junk = st.text(alphabet="abcxyz0123456789@:/%?#[]<>'\"()=.,;", max_size=6)

FORMS = (
    "{s}://{u}:{p}@{h}/{path}",
    "{s}://{u}:{qp}@{h}/{path}",
    "{s}://{u}:{p}@{h}:2121/{path}",
    "{s}:/{u}:{p}@{h}/{path}",
    "{s}:///{u}:{p}@{h}/{path}",
    "{s}:{u}:{p}@{h}/{path}",
    "{u}:{p}@{h}:/{path}",
    "{u}:{qp}@{h}:{path}",
)
# No "@host": text alone cannot tell this password from a port, but the parser's error must
# hide it. (With "/", "?", "#" or "@" in it, such a password is a path or a host: there is
# no telling, so the generator leaves those out of this form.)
TRUNCATED = "{s}://{u}:{p}"
TRUNCATED_PASSWORDS = passwords.filter(lambda p: not any(c in p for c in "/?#@[]"))


@st.composite
def savedirs(draw, forms: tuple[str, ...] = (*FORMS, TRUNCATED)) -> str:
    """One to three targets with passwords in any form, other targets and junk between."""
    words = []
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.sampled_from(forms))
        p = draw(TRUNCATED_PASSWORDS if form == TRUNCATED else passwords)
        if form.startswith("{s}:///"):
            # nfs:///server:/path is the seed's NFS form: "u:/..." is a server and a path.
            assume(not p.startswith("/"))
        if form.startswith("{u}:"):
            # scp-style "ftp://pw@host:/x" is a URL with user "pw": no telling them apart.
            assume(not p.startswith("//"))
        word = form.format(
            s=draw(schemes),
            u=draw(users),
            p=p,
            qp=quote(p, safe=""),
            h=draw(hosts),
            path=draw(paths),
        )
        if form != TRUNCATED and draw(st.booleans()):
            word = draw(junk) + word + draw(junk)
        words.append(word)
        if draw(st.booleans()):
            words.append(draw(st.sampled_from(["file:///var/crash", "/var/crash", "sftp://u@h/d"])))
    return draw(st.sampled_from([" ", "  ", "\t"])).join(words)


def assert_no_password(text: str) -> None:
    leaked = [c for c in GREEK if c in text] + [e for e in GREEK_ENCODED if e in text]
    assert not leaked, f"password characters {leaked} in: {text!r}"


@given(savedirs())
def test_redact_removes_every_password(value: str) -> None:
    assert_no_password(redact(value))
    assert redact(redact(value)) == redact(value)


@given(savedirs())
def test_parse_errors_and_targets_never_show_the_password(value: str) -> None:
    try:
        targets, warnings = parse_savedir(value)
    except UrlError as e:
        assert_no_password(str(e))
        return
    for t in targets:
        assert_no_password(f"{t} {t!r} {t.redacted()}")
    assert_no_password(" ".join(warnings))


def _dquote(v: str) -> str:
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in v) + '"'


@given(value=savedirs(), directive=st.sampled_from(["KDUMP_SAVEDIR", "KDUMP_DUMPLEVEL"]))
# Found by a full run: repr() wrote the tab as "\t", one word with the second URL in it.
@example(value="file://:α\tfile://:α", directive="KDUMP_DUMPLEVEL")
def test_config_errors_and_show_config_never_show_the_password(value, directive) -> None:
    """From --set and from the config file, in the right directive and in a wrong one."""
    for attempt in ("set", "file"):
        try:
            if attempt == "set":
                cfg = load_config(None, [f"{directive}={value}"])
            else:
                import tempfile

                with tempfile.NamedTemporaryFile("w", suffix=".kdump") as f:
                    f.write(f"{directive}={_dquote(value)}\n")
                    f.flush()
                    cfg = load_config(f.name)
        except ConfigError as e:
            assert_no_password(str(e))
            continue
        assert_no_password("\n".join(cfg.redacted_lines()))
        assert_no_password("\n".join(cfg.warnings))


@pytest.fixture(scope="module")
def vmcore(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("vmcore") / "vmcore")
    write_sample(path, SampleSpec(ram_mib=2))
    return path


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    value=savedirs(),
    scheme=st.sampled_from(["ftp", "sftp", "cifs"]),
    password=passwords,
)
def test_save_logs_never_show_the_password(vmcore, capsys, value, scheme, password) -> None:
    """A save that fails (bad URL, or nobody listening) with debug output on: stdout and
    stderr hold no password, whichever target text it was given.

    Only values that do not parse are saved to as they are: a valid one could name a local
    directory or a host off this machine. Valid targets are on 127.0.0.1, where nobody
    listens (the connection is refused at once)."""
    try:
        parse_savedir(value)
        assume(False)
    except UrlError:
        pass
    assume(not value.startswith("-"))
    closed = [free_port(), free_port()]
    reachable = [
        f"{scheme}://kdump:{quote(password, safe='')}@127.0.0.1:{port}/share/d" for port in closed
    ]
    root = logging.getLogger()
    for savedir in (value, reachable[0], " ".join(reachable)):
        handlers, level = list(root.handlers), root.level
        try:
            rc = cli.main(
                [
                    "save",
                    *("--config", "/nonexistent/kdump", "--vmcore", vmcore, "--no-reboot"),
                    *("--set", f"KDUMP_SAVEDIR={savedir}"),
                    *("--set", "KDUMP_VERBOSE=11", "--set", "KDUMP_HOST_KEY=*"),
                ]
            )
        finally:  # cli.main set up logging to capsys's stderr, which goes away after this
            root.handlers[:] = handlers
            root.setLevel(level)
        out = capsys.readouterr()
        assert rc in (2, 6, 7), out.err
        assert_no_password(out.out + out.err)


# --- the concrete cases of issue 8, through the CLI ---------------------------------------------


@pytest.mark.parametrize(
    "savedir",
    [
        "ftp:/user:secret@host/x",
        "user:secret@host:/x",
        "ftp:user:secret@host/x",
        "ftp://user:secret/x",
        "sftp://user:sec%72et@host:99999/x",
        "file:///var/crash gopher://user:secret@host/x",
    ],
)
def test_cli_url_errors_hide_the_password(savedir, tmp_path):
    r = run_cli(
        *("save", "--config", "/nonexistent", "--no-reboot", "--vmcore", "/nonexistent"),
        *("--set", f"KDUMP_SAVEDIR={savedir}"),
    )
    assert r.rc == 2, r.err
    assert "secret" not in r.out + r.err and "sec%72et" not in r.out + r.err
    assert "***" in r.err
    (line,) = [x for x in r.err.splitlines() if x.startswith("kdump-capture: error:")]
    assert "Traceback" not in r.err


def test_cli_show_config_hides_passwords(tmp_path):
    conf = tmp_path / "kdump"
    conf.write_text(
        "KDUMP_SAVEDIR='ftp://u:pw1@h/x sftp://u:p%40w2@h/y'\n"
        "KDUMP_TRANSFER='curl -T $KDUMP_VMCORE ftp://me:pw3@backup/'\n"
    )
    r = run_cli("show-config", "--config", str(conf))
    assert r.rc == 0, r.err
    for secret in ("pw1", "p%40w2", "pw3"):
        assert secret not in r.out + r.err
    assert 'KDUMP_SAVEDIR="ftp://u:***@h/x sftp://u:***@h/y"' in r.out
    assert "ftp://me:***@backup/" in r.out


def test_ftp_save_keeps_the_password_out_of_logs_readme_and_manifest(request, vmcore):
    """A real save over FTP with a password (debug on): console, README.txt, manifest."""
    s = request.getfixturevalue("ftp_server")
    url = f"ftp://{s.user}:{quote(s.password)}@{s.host}:{s.port}/redact"
    r = run_cli(
        *("save", "--config", "/nonexistent", "--no-reboot", "--vmcore", vmcore),
        *("--set", f"KDUMP_SAVEDIR={url}", "--set", "KDUMP_VERBOSE=11"),
    )
    assert r.rc == 0, r.err
    assert s.password not in r.out + r.err
    assert f"ftp://{s.user}:***@" in r.out
    top = os.path.join(s.root, "redact")
    (dump,) = os.listdir(top)
    for name in ("README.txt", "manifest.json"):
        with open(os.path.join(top, dump, name)) as f:
            text = f.read()
        assert s.password not in text, name
    with open(os.path.join(top, dump, "manifest.json")) as f:
        assert json.load(f)["target"].startswith(f"ftp://{s.user}:***@")


def test_a_second_target_after_the_last_at_is_redacted_too():
    # Found by hypothesis: two targets joined by a tab, shown through repr() in a config
    # error, read as one word whose last "@" came before the second target's password.
    assert "α" not in redact(repr("file://:α@host/\tfile://:α"))


def test_a_log_line_cannot_forge_another():
    """Names from a shared target or the crashed kernel end up in log messages: a newline
    in one printed a line of its own (a fake "Dump saved"), an escape sequence drove the
    console. Each control character is shown as \\xNN; a traceback keeps its lines."""
    fmt = cli.RedactingFormatter("kdump: %(levelname)s: %(message)s")
    rec = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, "deleting %s", ("x\nDump saved: \x1b[2Jy\x85",), None
    )
    assert fmt.format(rec) == "kdump: WARNING: deleting x\\x0aDump saved: \\x1b[2Jy\\x85"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "\nTraceback (most recent call last):\n" in fmt.format(rec)


@pytest.mark.parametrize(
    "word", ["a" * 65536 + "://", "ftp://" + "h" * 65536 + ":pw", "b" * 65536 + "://u:pw@h"]
)
def test_redaction_is_linear_and_hides_what_it_cannot_read(word):
    """Redaction searched a long run of letters for a scheme from every position: a 64 KiB
    word took 3 s, and an S3 error Message of 8 MiB about 15 hours (the save stalled in
    re.sub, deaf to SIGTERM). A word longer than any URL that may hold a target is not shown."""
    import time

    start = time.process_time()
    out = redact(f"error: {word} (end)")
    assert time.process_time() - start < 0.5
    assert out == f"error: [{len(word)} characters not shown] (end)"
    assert redact("x" * 65536) == "x" * 65536  # nothing to hide: left as it is


@pytest.mark.parametrize(
    "word", ["1.ftp://user:hunter2/x", "-sftp://root:hunter2", "2ftp://u:hunter2/"]
)
def test_a_scheme_after_a_digit_or_a_dash_is_still_redacted(word):
    """The lookbehind that made redaction linear first let these through."""
    assert "hunter2" not in redact(word) and "***" in redact(word)
