"""User errors get their documented exit code and one line, never "internal error" (exit 1).

Each case of issue 8, item 16, through the CLI as a user runs it.
"""

from __future__ import annotations

import os

import pytest

from kdump_capture.errors import ConfigError
from kdump_capture.load import kexec
from kdump_capture.load import system as loadsys
from kdump_capture.sample import SampleSpec, write_sample
from tests.helpers import Run, cli, save_args


def one_error_line(r: Run) -> str:
    """The single ``kdump-capture: error:`` line; nothing else but log lines, no traceback."""
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    other = [x for x in r.err.splitlines() if not x.startswith("kdump: ")]
    assert len(other) == 1 and other[0].startswith("kdump-capture: error: "), r.err
    return other[0]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("s") / "vmcore")
    write_sample(path, SampleSpec(ram_mib=2))
    return path


def test_rearrange_missing_input(tmp_path):
    r = cli("rearrange", "/nonexistent/flat", str(tmp_path / "out"))
    assert r.rc == 3
    assert "/nonexistent/flat: cannot open: No such file or directory" in one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_rearrange_directory_input(tmp_path):
    r = cli("rearrange", str(tmp_path), str(tmp_path / "out"))
    assert r.rc == 3 and "Is a directory" in one_error_line(r)


@pytest.fixture
def flat_sample(sample, tmp_path) -> str:
    """The ELF sample as a flattened stream: the header, one record holding it all, the end."""
    from kdump_capture.formats.flat import END_MARKER, RECORD, flat_header

    data = open(sample, "rb").read()
    path = tmp_path / "flat"
    path.write_bytes(flat_header() + RECORD.pack(0, len(data)) + data + END_MARKER)
    return str(path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to a fifo", "link like /dev/stdout"])
def test_rearrange_refuses_an_output_that_is_not_a_regular_file(flat_sample, tmp_path, kind):
    """The result is renamed into place: over a device (`rearrange F /dev/null` as root), a
    FIFO or /dev/stdout (a link) it would put the dump in place of the node or the link."""
    out = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    elif kind == "link to a fifo":
        os.mkfifo(tmp_path / "fifo")
        out.symlink_to(tmp_path / "fifo")
    else:
        out.symlink_to("/proc/self/fd/1")
    before = os.lstat(out)
    r = cli("rearrange", flat_sample, str(out))
    assert r.rc == 2, r.err
    assert f"{out}: " in one_error_line(r) and "rearrange" in r.err
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary file


def test_rearrange_replaces_an_existing_regular_file(sample, flat_sample, tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"an older rearranged dump")
    r = cli("rearrange", flat_sample, str(out))
    assert r.rc == 0, r.err
    assert out.read_bytes() == open(sample, "rb").read()


def test_make_sample_into_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "vmcore"
    r = cli("make-sample", str(out))
    assert r.rc == 2
    assert f"{out}: cannot create: No such file or directory" in one_error_line(r)


@pytest.mark.parametrize("mib", ["0", "-1"])
def test_make_sample_with_no_memory(tmp_path, mib):
    r = cli("make-sample", str(tmp_path / "vmcore"), "--mib", mib)
    assert r.rc == 2 and f"--mib {mib}: must be between 1 and" in one_error_line(r)
    assert not (tmp_path / "vmcore").exists()


def test_save_from_a_directory(tmp_path):
    r = cli(*save_args(str(tmp_path), str(tmp_path / "d")))
    assert r.rc == 3 and f"{tmp_path}: cannot open: Is a directory" in one_error_line(r)
    assert not (tmp_path / "d").exists()


# --- unbalanced quotes in the load-side command lines -------------------------------------------


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("KDUMP_COMMANDLINE_APPEND='console=\"ttyS0'", "KDUMP_COMMANDLINE_APPEND"),
        ('KDUMP_COMMANDLINE="root=/dev/vda dyndbg=\\"file x.c"', "KDUMP_COMMANDLINE"),
        ('KEXEC_OPTIONS="--append=\'x"', "KEXEC_OPTIONS"),
        ("KDUMP_OPTIONS='\"--reuse-cmdline'", "KDUMP_OPTIONS"),
    ],
)
@pytest.mark.parametrize("command", ["show-config", "check", "status"])
def test_unbalanced_quote_names_file_and_line(tmp_path, line, name, command):
    """At config load (show-config) and on the load side (check, status): exit 2, FILE:LINE."""
    conf = tmp_path / "kdump"
    conf.write_text(f"# a comment\n{line}\n")
    r = cli(command, "--config", str(conf))
    assert r.rc == 2
    canonical = "KEXEC_OPTIONS" if name == "KDUMP_OPTIONS" else name
    assert f"{conf}:2: {canonical}: unbalanced" in one_error_line(r)


def test_unbalanced_quote_from_set(tmp_path):
    r = cli("check", "--config", "/nonexistent", "--set", "KEXEC_OPTIONS='x")
    assert r.rc == 2 and "--set KEXEC_OPTIONS: unbalanced quote" in one_error_line(r)


def test_load_time_check_of_an_unvalidated_mapping():
    """readiness() (check, load) refuses a bad value even when it did not go through
    load_config: a ConfigError naming the directive, never a ValueError traceback."""
    cfg = {
        "KDUMP_KERNELVER": "",
        "KDUMP_CPUS": "1",
        "KDUMP_COMMANDLINE": "",
        "KDUMP_COMMANDLINE_APPEND": 'a="b',
        "KEXEC_OPTIONS": "",
    }
    with pytest.raises(ConfigError, match="KDUMP_COMMANDLINE_APPEND: unbalanced double quote"):
        loadsys.readiness(cfg, loadsys.System())
    with pytest.raises(ConfigError, match="KEXEC_OPTIONS: unbalanced quote"):
        loadsys.readiness({**cfg, "KDUMP_COMMANDLINE_APPEND": "", "KEXEC_OPTIONS": "'x"}, None)


def test_kernel_words_follow_the_kernel():
    """Double quotes group and stay; single quotes mean nothing to the kernel; an unbalanced
    quote in /proc/cmdline (which the kernel accepted) runs to the end, as in the kernel."""
    assert kexec.kernel_words('a dyndbg="x y" it\'s') == ["a", 'dyndbg="x y"', "it's"]
    assert kexec.kernel_words('a b="c d', strict=False) == ["a", 'b="c d']
    with pytest.raises(ValueError, match="character 5"):
        kexec.kernel_words('a b="c d')
    out = kexec.capture_cmdline('quiet x="unterminated tail', "", "", 1)
    assert out.startswith("quiet ") and 'x="unterminated tail' in out


# --- KDUMP_TRANSFER ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("exit 7", "KDUMP_TRANSFER failed (exit status 7)"),
        ("exit 1", "KDUMP_TRANSFER failed (exit status 1)"),
        ("kill -KILL $$", "KDUMP_TRANSFER failed (killed by SIGKILL (signal 9))"),
        ("kill -TERM $$", "KDUMP_TRANSFER failed (killed by SIGTERM (signal 15))"),
    ],
)
def test_failing_transfer_has_its_own_exit_code(sample, tmp_path, command, message):
    r = cli(*save_args(sample, str(tmp_path / "d"), f"KDUMP_TRANSFER={command}"))
    assert r.rc == 14
    assert message in one_error_line(r)


def test_transfer_success_exits_0(sample, tmp_path):
    dest = tmp_path / "copy"
    r = cli(*save_args(sample, str(tmp_path / "d"), f'KDUMP_TRANSFER=cp "$KDUMP_VMCORE" {dest}'))
    assert r.rc == 0, r.err
    assert os.path.getsize(dest) == os.path.getsize(sample)


def test_transfer_with_a_missing_vmcore_is_no_dump(tmp_path):
    """A --vmcore that does not exist: the command ran all the same, with the missing path
    in $KDUMP_VMCORE, and its failure was blamed on it (exit 14). Now exit 3, as without
    KDUMP_TRANSFER, and the command is not run."""
    ran = tmp_path / "ran"
    missing = str(tmp_path / "nonexistent")
    r = cli(*save_args(missing, str(tmp_path / "d"), f"KDUMP_TRANSFER=touch {ran}; exit 1"))
    assert r.rc == 3, r.err
    assert f"{missing}: no such file" in one_error_line(r)
    assert not ran.exists()


def test_transfer_gets_the_sample(tmp_path):
    """save --sample (how a KDUMP_TRANSFER command is tried out): the sample was never made
    and the command never ran, "no crash dump present" (exit 3) on any host not crashed."""
    dest = tmp_path / "copy"
    args = save_args("unused", str(tmp_path / "d"), f'KDUMP_TRANSFER=cp "$KDUMP_VMCORE" {dest}')
    i = args.index("--vmcore")
    del args[i : i + 2]
    r = cli(*args, "--sample")
    assert r.rc == 0, r.err
    assert dest.read_bytes()[:4] == b"\x7fELF"
    assert "KDUMP_TRANSFER finished" in r.out


def test_set_value_that_is_not_utf8(tmp_path):
    """argv bytes that are not UTF-8 reach us as surrogate escapes: a config error, not a
    UnicodeEncodeError when the target is shown (found by the url_redact fuzz target)."""
    r = cli(
        "show-config",
        "--config",
        "/nonexistent",
        "--set",
        os.fsdecode(b"KDUMP_SAVEDIR=ftp://\xf7@h/x"),
    )
    assert r.rc == 2 and "--set KDUMP_SAVEDIR: the value is not valid UTF-8" in one_error_line(r)


# --- standard output that cannot be written ------------------------------------------------------


def _run_to(stdout, *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(
        [sys.executable, "-m", "kdump_capture", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    err = p.stderr.read().decode()
    return p.wait(timeout=60), err


@pytest.mark.parametrize("command", ["dmesg", "summary", "verify", "list", "show-config"])
@pytest.mark.parametrize("output", ["full", "closed pipe"])
def test_output_that_cannot_be_written_is_an_error_not_a_bug(tmp_path, command, output):
    """What a command prints going to a full filesystem (/dev/full) is exit 5, to a pipe
    nobody reads exit 6, each with one line naming standard output: it was "internal error:
    OSError" (exit 1), and verify's lines cut short must not read as a success either."""
    r = cli("save", "--sample", "--sample-mib", "8", "--config", "/dev/null", "--no-reboot",
            "--set", f"KDUMP_SAVEDIR=file://{tmp_path / 'd'}")  # fmt: skip
    assert r.rc == 0, r.err
    (dump,) = (tmp_path / "d").iterdir()
    args = {
        "dmesg": ["dmesg", str(dump / "vmcore")],
        "summary": ["summary", str(dump / "vmcore")],
        "verify": ["verify", str(dump)],
        "list": ["list", "--config", "/dev/null", f"file://{tmp_path / 'd'}"],
        "show-config": ["show-config", "--config", "/dev/null"],
    }[command]
    if output == "full":
        with open("/dev/full", "w") as full:
            rc, err = _run_to(full, *args)
        assert rc == 5, err
        reason = "No space left on device"
    else:
        read, write = os.pipe()
        os.close(read)  # nobody reads: `kdump-capture list ... | head -0`, before it writes
        try:
            rc, err = _run_to(write, *args)
        finally:
            os.close(write)
        assert rc == 6, err
        reason = "Broken pipe"
    assert err.strip().splitlines()[-1].endswith(f"error: writing standard output: {reason}")
    assert "Traceback" not in err and "internal error" not in err and "Exception" not in err


@pytest.mark.parametrize("output", ["full", "closed pipe"])
def test_a_save_whose_output_cannot_be_written_still_saves(tmp_path, output):
    """`save` prints its progress and "Dump saved" to standard output, which may fail (a
    console gone, `| head`, a full file). That failed the save (exit 1 before, 5 or 6 with
    the output guard): what a save prints reports on the dump, it never decides its outcome.
    One warning on standard error, exit 0, the dump complete."""
    args = ["save", "--sample", "--sample-mib", "8", "--config", "/dev/null", "--no-reboot",
            "--progress", "lines", "--set", f"KDUMP_SAVEDIR=file://{tmp_path / 'd'}"]  # fmt: skip
    if output == "full":
        with open("/dev/full", "w") as full:
            rc, err = _run_to(full, *args)
    else:
        read, write = os.pipe()
        os.close(read)
        try:
            rc, err = _run_to(write, *args)
        finally:
            os.close(write)
    assert rc == 0, err
    assert err.count("warning: output stopped") == 1, err
    assert "Traceback" not in err
    (dump,) = (tmp_path / "d").iterdir()
    assert cli("verify", str(dump)).rc == 0
