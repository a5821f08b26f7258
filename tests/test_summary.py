"""The crash summary (issue 11): parsed from the crashed kernel's log, bounded, robust."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdump_capture.sample import DEMO_LOG, KernelImage
from kdump_capture.summary import FRAMES, MAX_FIELD, CrashSummary, summarize

from .helpers import cli, save_args

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus", "summary")

OOPS = open(os.path.join(CORPUS, "oops-null.txt")).read()

BUG_AT = """\
[ 5000.100000] ------------[ cut here ]------------
[ 5000.100001] kernel BUG at mm/slub.c:4321!
[ 5000.100002] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[ 5000.100003] CPU: 1 UID: 0 PID: 77 Comm: my prog Not tainted 6.12.0-rc1 #3
[ 5000.100004] RIP: 0010:kfree+0x1f0/0x2a0
[ 5000.100005] Call Trace:
[ 5000.100006]  <TASK>
[ 5000.100007]  ? die+0x36/0x90
[ 5000.100008]  a+0x1/0x2
[ 5000.100009]  b+0x1/0x2
[ 5000.100010]  </TASK>
"""

GPF_PANIC = (
    """\
[   10.000000] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP
[   10.000001] CPU: 0 PID: 1 Comm: init Tainted: P        W  O       5.15.0 #1
[   10.000002] RIP: 0010:do_thing+0x10/0x20
[   10.000003] Call Trace:
"""
    + "".join(f"[   10.0000{i:02d}]  frame{i}+0x1/0x2\n" for i in range(20))
    + """\
[   10.100000] Kernel panic - not syncing: Fatal exception in interrupt
"""
)


def test_real_sample_log(real_sample, tmp_path):
    out = tmp_path / "dmesg.txt"
    r = cli("dmesg", str(real_sample.path))
    assert r.rc == 0, r.err
    out.write_text(r.out)
    s = summarize(r.out)
    assert s.kind == "panic"
    assert s.panic == s.headline == "Kernel panic - not syncing: sysrq triggered crash"
    assert (s.cpu, s.pid, s.comm) == (0, 1, "init")
    assert s.taint == "Not tainted"
    assert s.release == real_sample.kernel_version
    assert s.rip == "0033:0x47b7a0"
    assert s.trace[:3] == [
        "dump_stack_lvl+0x44/0x5c",
        "panic+0x118/0x2f4",
        "sysrq_handle_crash+0x16/0x20",
    ]
    assert not any(f.startswith("?") for f in s.trace) and len(s.trace) == FRAMES
    assert 0 < s.uptime < 600
    # the command prints the same for the ELF file and for the dmesg.txt
    for source in (str(real_sample.path), str(out)):
        r = cli("summary", source)
        assert r.rc == 0, r.err
        assert r.out.startswith(
            "Crash          : Kernel panic - not syncing: sysrq triggered crash\n"
        )
        assert "Crashing task  : CPU 0, PID 1, command init" in r.out


def test_oops_then_panic():
    s = summarize(OOPS)
    assert s.kind == "BUG"
    assert s.headline == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    assert s.panic == "Kernel panic - not syncing: Fatal exception"
    assert (s.cpu, s.pid, s.comm) == (3, 4242, "kworker/3:1")
    assert s.taint == "G OE"
    assert s.rip == "0010:my_work_fn+0x2a/0x80 [mydrv]"
    assert s.trace == [
        "process_one_work+0x1c4/0x380",
        "worker_thread+0x4d/0x380",
        "kthread+0xd7/0x100",
        "ret_from_fork+0x1f/0x30",
    ]
    assert s.uptime == pytest.approx(112.345678)
    text = s.text()
    assert text.splitlines()[0].startswith("Crash          : BUG: kernel NULL pointer")
    assert "Panic          : Kernel panic - not syncing: Fatal exception" in text


def test_bug_at_newer_cpu_line_without_panic():
    s = summarize(BUG_AT)
    assert s.kind == "BUG" and s.panic is None
    assert s.headline == "kernel BUG at mm/slub.c:4321!"
    assert (s.cpu, s.pid, s.comm, s.taint, s.release) == (
        1,
        77,
        "my prog",
        "Not tainted",
        "6.12.0-rc1",
    )
    assert s.trace == ["a+0x1/0x2", "b+0x1/0x2"]


def test_gpf_panic_trace_is_bounded():
    s = summarize(GPF_PANIC)
    assert s.kind == "oops" and s.headline.startswith("general protection fault")
    assert s.panic == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert s.taint == "P W O"
    assert s.trace == [f"frame{i}+0x1/0x2" for i in range(FRAMES)]


def test_no_panic_says_so():
    s = summarize("[    1.000000] Linux version 6.1\n[    2.0] all is well\n")
    assert s.kind == "none"
    assert s.text() == "Crash summary  : no panic, oops or BUG found in the crashed kernel's log\n"
    assert summarize(None).text().startswith("Crash summary  : unknown")


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 100_000,
        b"Kernel panic - not syncing: " + b"\xff\x1b[31m" * 10_000,
        b"CPU: 0 PID: 1 Comm: " + b"x" * 50_000,
        b"BUG: x\n" + b"Call Trace:\n" + b" f+0x1/0x2\n" * 100_000,
        b"[" * 100_000,
        b"Kernel panic - not syncing: \n" * 3 + b"RIP: " + b"\n" * 10,
    ],
    ids=["empty", "zeros", "escapes", "long-comm", "endless-trace", "brackets", "empty-fields"],
)
def test_garbage_is_bounded_and_printable(garbage):
    s = summarize(garbage)
    text = s.text()
    assert all(" " <= c <= "~" or c == "\n" for c in text)
    assert len(s.trace) <= FRAMES
    for v in (s.headline, s.panic, s.rip, s.comm, s.taint, s.release):
        assert v is None or len(v) <= MAX_FIELD
    assert CrashSummary.from_dict(json.loads(json.dumps(s.as_dict()))) == s


def test_from_dict_takes_only_well_typed_fields():
    s = CrashSummary.from_dict(
        {
            "kind": "panic",
            "cpu": "0",
            "pid": True,
            "uptime": -1,
            "trace": ["a", 3, "\x1b"],
            "panic": 5,
        }
    )
    assert s.kind == "panic" and s.cpu is None and s.pid is None and s.uptime is None
    assert s.trace == ["a", "?"] and s.panic is None
    assert CrashSummary.from_dict([]) is None


def _marker_sample(path, marker: str, log: list | None = None) -> None:
    """The demo vmcore with ``marker`` in its log (in the panic message) and in a page."""
    k = KernelImage(8 * 256)
    k.build(
        log or [*DEMO_LOG[:-1], (61_503_240_000, f"Kernel panic - not syncing: {marker}".encode())]
    )
    k.put(k.alloc(1), f"secret in memory: {marker}".encode())
    k.write(str(path), cpus=2)


@pytest.mark.parametrize("fmt", ["ELF", "compressed", "compressed-flat"])
def test_summary_command_on_dump_files_and_dirs(fmt, tmp_path):
    src = tmp_path / "vmcore"
    _marker_sample(src, "M-1234")
    dumps = tmp_path / "dumps"
    level = "31" if fmt != "ELF" else "0"
    r = cli(
        *save_args(
            str(src),
            str(dumps),
            f"KDUMP_DUMPFORMAT={fmt.split('-')[0]}",
            f"KDUMP_DUMPLEVEL={level}",
        )
    )
    assert r.rc == 0, r.err
    [d] = list(dumps.iterdir())
    vmcore = d / "vmcore"
    if fmt == "compressed-flat":
        flat = tmp_path / "flat"
        from kdump_capture.formats.flat import FlatOutput

        class _F:
            def __init__(self, f):
                self.f = f

            def write(self, b):
                self.f.write(b)

        data = vmcore.read_bytes()
        with open(flat, "wb") as f:
            out = FlatOutput(_F(f))
            for off in range(0, len(data), 4096 * 3):
                out.put(off, data[off : off + 4096 * 3])
            out.finish()
        vmcore = flat
    want = "Crash          : Kernel panic - not syncing: M-1234\n"
    r = cli("summary", str(vmcore))
    assert r.rc == 0, r.err
    assert r.out.startswith(want)
    readme = (d / "README.txt").read_text()
    manifest = json.loads((d / "manifest.json").read_text())
    assert readme.split("\n\n")[1].startswith(want)  # right under the title
    assert next(iter(manifest)) == "crash_summary"
    assert manifest["crash_summary"]["panic"] == "Kernel panic - not syncing: M-1234"
    r = cli("summary", "--json", str(d))
    assert r.rc == 0 and json.loads(r.out)["panic"] == manifest["crash_summary"]["panic"]
    # a directory with neither dmesg.txt nor vmcore: the manifest's summary
    (d / "dmesg.txt").unlink()
    (d / "vmcore").unlink()
    r = cli("summary", str(d))
    assert r.rc == 0 and r.out.startswith(want)


def test_summary_command_errors(tmp_path):
    r = cli("summary", str(tmp_path / "missing"))
    assert r.rc == 3 and "cannot open" in r.err
    (tmp_path / "x.age").write_bytes(b"age-encryption.org/v1\n-> X25519 abc\n")
    r = cli("summary", str(tmp_path / "x.age"))
    assert r.rc == 4 and "decrypt it first" in r.err


def test_summary_of_a_directory_reads_only_its_regular_files(tmp_path):
    """`summary DIR` with a FIFO as DIR/dmesg.txt waited for a writer for good."""
    from tests.test_age import _unblock_later

    for name in ("dmesg.txt", "vmcore"):
        d = tmp_path / name
        d.mkdir()
        os.mkfifo(d / name)
        _unblock_later(d / name)  # without the fix: an empty log instead of a hang
        r = cli("summary", str(d), timeout=20)
        assert r.rc == 4 and f"{name}: a FIFO; only regular files are read" in r.err, r.err
    (tmp_path / "elsewhere").write_text("Kernel panic - not syncing: X\n")
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link" / "dmesg.txt")
    r = cli("summary", str(tmp_path / "link"))
    assert r.rc == 4 and "a symbolic link" in r.err, r.err


def _cli_stdin(data: bytes, *args: str):
    """The CLI with ``data`` on its standard input (a pipe)."""
    import subprocess
    import sys

    from .helpers import ROOT

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [sys.executable, "-m", "kdump_capture", *args],
        input=data,
        capture_output=True,
        env=env,
        timeout=120,
    )
    return p.returncode, p.stdout.decode(), p.stderr.decode()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "empty: neither a dump nor a kernel log"),
        (bytes(4096) + b"\x01\x02garbage", "binary data: neither an ELF, kdump-compressed"),
    ],
    ids=["empty", "binary"],
)
def test_summary_of_a_file_that_is_neither_a_dump_nor_a_log(tmp_path, content, says):
    """A vmcore copied as nothing (0 bytes) or a damaged one (no dump header) read as a
    kernel log: "no panic, oops or BUG found in the crashed kernel's log", exit 0."""
    path = tmp_path / "vmcore"
    path.write_bytes(content)
    r = cli("summary", str(path))
    assert r.rc == 4, (r.out, r.err)
    assert f"{path}: {says}" in r.err and not r.out


def test_summary_and_dmesg_read_from_a_pipe(tmp_path):
    """`... | kdump-capture summary /dev/stdin` (a link, to a pipe) was refused, "Too many
    levels of symbolic links", though meant to work; a dump piped to `dmesg` or `summary`
    was "internal error: OSError: Illegal seek" (exit 1). A log from a pipe is summarized;
    a dump from a pipe is exit 4 with what to do."""
    src = tmp_path / "vmcore"
    _marker_sample(src, "P-77")
    want = "Crash          : Kernel panic - not syncing: P-77\n"
    r = cli("dmesg", str(src))
    assert r.rc == 0, r.err
    rc, out, err = _cli_stdin(r.out.encode(), "summary", "/dev/stdin")
    assert rc == 0 and out.startswith(want), err
    for command in ("summary", "dmesg"):
        rc, out, err = _cli_stdin(src.read_bytes(), command, "/dev/stdin")
        assert rc == 4, err
        assert "/dev/stdin: " in err and "save it to a file first" in err and not out
        assert "internal error" not in err
    (tmp_path / "link").symlink_to(src)  # a link named on the command line is followed
    r = cli("summary", str(tmp_path / "link"))
    assert r.rc == 0 and r.out.startswith(want), r.err


def test_summary_of_an_endless_source_ends():
    """Reading a pipe to its end (for a log's last lines) never ended on /dev/zero or an
    endless binary stream (`cat /dev/zero | kdump-capture summary /dev/stdin`): a hang. A
    character device is refused; a stream that starts with binary data is refused from its
    first bytes."""
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "summary", "/dev/zero"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 4 and "character device" in r.stderr, r.stderr
    r = subprocess.run(
        f"cat /dev/zero | {sys.executable} -m kdump_capture summary /dev/stdin",
        shell=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 4 and "binary data" in r.stderr, r.stderr


def test_summary_of_other_kdumps_directories_and_unfinished_ones(tmp_path):
    # Red Hat's and Debian's dump directories had "no dmesg.txt, vmcore or summary" (exit 3)
    # beside their logs; a directory whose dump did not finish (their -incomplete files,
    # SUSE's or our placeholder README, ours without a manifest) was summarised with exit 0.
    log = b"[    5.9] Kernel panic - not syncing: X-42\n"
    suse_placeholder = b"If you see this text the crash dump is likely incomplete.\n"
    dirs = {
        "127.0.0.1-2024-01-18-10:30:00": ({"vmcore-dmesg.txt": log, "vmcore": b"K"}, 0),
        "127.0.0.1-2024-01-17-10:30:00": (
            {"vmcore-dmesg.txt": log, "vmcore-incomplete": b"K"},
            "vmcore-incomplete is there",
        ),
        "202401191030": ({"dmesg.202401191030": log, "dump.202401191030": b"K"}, 0),
        "202401201030": ({"dmesg.202401201030": log, "dump-incomplete": b"K"}, "dump-incomplete"),
        "2024-01-16-10-30": (
            {
                "dmesg": log,
                "README.txt": suse_placeholder,
            },
            "placeholder",
        ),
        "2024-01-15-10:30": ({"dmesg.txt": log, "vmcore": b"K", "README.txt": b"Kernel"}, 0),
        "2026-01-01-00-00-00": ({"dmesg.txt": log, "vmcore": b"K"}, "no manifest.json"),
    }
    for name, (files, want) in dirs.items():
        d = tmp_path / name
        d.mkdir()
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        r = cli("summary", str(d))
        assert r.out.startswith("Crash          : Kernel panic - not syncing: X-42\n"), name
        if want == 0:
            assert (r.rc, r.err) == (0, ""), name
        else:
            assert r.rc == 13 and "the dump is incomplete" in r.err and want in r.err, r.err


@pytest.mark.parametrize("packer", ["gzip", "xz", "bzip2"])
def test_a_dump_compressed_as_a_whole_says_so(tmp_path, packer):
    # Debian's kdump-tools with KDUMP_COMPRESSION saves dump.STAMP.gz (.xz, .bz2): it was
    # "not an ELF, kdump-compressed or flattened dump" / "binary data", nothing more.
    import bz2
    import gzip
    import lzma

    pack = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress}[packer]
    path = tmp_path / "dump.202401191030.packed"
    path.write_bytes(pack(b"makedumpfile\0\0\0\0" + bytes(5000)))
    for cmd in ("dmesg", "summary"):
        r = cli(cmd, str(path))
        assert r.rc == 4 and str(path) in r.err, r.err
        assert f"{packer}-compressed as a whole: decompress it first" in r.err, r.err


def test_an_unfinished_dump_of_ours_named_as_the_current_directory(tmp_path):
    d = tmp_path / "2026-01-01-00-00-00"
    d.mkdir()
    (d / "dmesg.txt").write_text("Kernel panic - not syncing: Y\n")
    r = subprocess.run(
        [sys.executable, "-m", "kdump_capture", "summary", "."],
        cwd=d,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))),
    )
    assert r.returncode == 13 and "no manifest.json" in r.stderr, r.stderr


def test_a_dump_directory_a_killed_save_left_says_so(tmp_path):
    """A save killed before it wrote dmesg.txt leaves the placeholder README and a temporary
    file: `summary DIR` said "no dmesg.txt, vmcore or summary in manifest.json", naming a
    manifest that is not there. Now it names what is missing and why (exit 3)."""
    from kdump_capture.report import PLACEHOLDER

    d = tmp_path / "vm-2026-12-05-10-00-00"
    d.mkdir()
    (d / "README.txt").write_text(PLACEHOLDER)
    (d / ".kdump-tmp.vmcore.abc").write_bytes(b"x")
    r = cli("summary", str(d))
    assert r.rc == 3, r.err
    assert "no dmesg.txt, vmcore or manifest.json" in r.err and "did not finish" in r.err
