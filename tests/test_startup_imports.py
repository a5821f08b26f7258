"""The capture path's start-up imports: what a save loads before it writes is downtime.

A capture kernel runs ``python3 -S -m kdump_capture save`` once, on one CPU. These tests run
bench/writer.py (the format writer alone, as the benchmark times it against makedumpfile)
and whole saves to a file:// target on one CPU, list ``sys.modules`` afterwards, and fail
when one of the modules kept off that path comes back (each cost milliseconds there; see
kdump_capture/record.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

from kdump_capture.sample import write_demo
from tests.helpers import ROOT

# Modules the save to a file:// target and the format writers do without, each with what
# brought it before: none may come back through a new top-level import.
KEPT_OFF = {
    "dataclasses": "value classes (kdump_capture.record.Record instead); pulls inspect",
    "inspect": "dataclasses",
    "ast": "dataclasses, through inspect",
    "typing": "Protocols and NoReturn (type checkers only)",
    "secrets": "temporary names (os.urandom instead); pulls hmac, random, base64",
    "hmac": "secrets, identity",
    "random": "secrets",
    "concurrent.futures": "thread pools: only with a second CPU",
    "socket": "gethostname and host identity (network targets only)",
    "ctypes": "reboot(2) (only when rebooting)",
    "subprocess": "KDUMP_PRESCRIPT/POSTSCRIPT and the kexec binary (only when used)",
    "difflib": "suggestions for a misspelled directive",
    "kdump_capture.identity": "network targets only",
    "urllib.parse": "percent-decoding of target URLs (only those with a %-escape)",
    "ipaddress": "urllib.parse",
    "kdump_capture.sample": "save --sample only",
}

# Runs a module (as ``-m`` does) or a script, then lists sys.modules: every module the
# process imported, also those importlib.import_module loaded (which ``-X importtime`` omits).
RUN_AND_LIST = """
import runpy, sys
out, how, what = sys.argv[1:4]
sys.argv = [what, *sys.argv[4:]]
try:
    if how == "module":
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:  # not runpy.run_path: it imports pkgutil, which imports typing
        with open(what) as f:
            exec(compile(f.read(), what, "exec"), {"__name__": "__main__", "__file__": what})
except SystemExit as e:
    if e.code:
        raise
with open(out, "w") as f:
    f.write("\\n".join(sorted(sys.modules)))
"""


def _one_cpu() -> None:
    """A capture kernel usually has one CPU (nr_cpus=1): the child runs on one."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _imported(tmp_path, how: str, what: str, *args: str) -> set[str]:
    """Every module ``python3 -S`` had imported after running ``what`` (it must succeed),
    with ours and the installed packages on the path, as bench/measure.py runs us."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, sysconfig.get_paths()["purelib"]])
    out = tmp_path / "modules.txt"
    p = subprocess.run(
        [sys.executable, "-S", "-c", RUN_AND_LIST, str(out), how, what, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
        preexec_fn=_one_cpu,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return set(out.read_text().split())


def _unwanted(names: set[str]) -> dict[str, str]:
    return {m: why for m, why in KEPT_OFF.items() if m in names}


@pytest.fixture(scope="module")
def demo_vmcore(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("startup") / "demo.vmcore")
    write_demo(path, 16)
    return path


@pytest.mark.parametrize("fmt", ["elf", "compressed"])
def test_format_writer_leaves_out_the_slow_modules(tmp_path, demo_vmcore, fmt):
    """bench/writer.py: the writer alone, as the benchmark times it against makedumpfile."""
    out = tmp_path / "out"
    script = os.path.join(ROOT, "bench", "writer.py")
    names = _imported(tmp_path, "path", script, demo_vmcore, fmt, "31", str(out))
    assert "kdump_capture.formats.filter" in names and out.stat().st_size > 0
    assert _unwanted(names) == {}


@pytest.mark.parametrize("fmt", ["ELF", "compressed"])
def test_save_to_a_file_target_leaves_out_the_slow_modules(tmp_path, demo_vmcore, fmt):
    dest = tmp_path / "dumps"
    dest.mkdir()
    sets = {
        "KDUMP_SAVEDIR": f"file://{dest}",
        "KDUMP_DUMPFORMAT": fmt,
        "KDUMP_DUMPLEVEL": "31",
        "KDUMP_FREE_DISK_SIZE": "0",
        "KDUMP_KEEP_OLD_DUMPS": "0",
    }
    args = ["save", "--config", "/dev/null", "--vmcore", demo_vmcore]
    args.append("--no-reboot")
    for name, value in sets.items():
        args += ["--set", f"{name}={value}"]
    names = _imported(tmp_path, "module", "kdump_capture", *args)
    assert "kdump_capture.pipeline" in names and "transports.file" in names
    assert _unwanted(names) == {}
    (saved,) = dest.iterdir()
    assert (saved / "vmcore").stat().st_size > 0 and (saved / "manifest.json").exists()


def test_modules_imported_where_used_are_still_packed():
    """The capture image packs what a save can import, lazy imports included (the builder
    reads the sources): a module moved off the start-up path must stay in the image."""
    from initramfs import runtime

    packed = set(runtime.entry_modules(["file"]))
    lazy = (
        "concurrent.futures",  # transports.base and the kdump writer, with a second CPU
        "ctypes",  # finish.reboot
        "subprocess",  # scripts.run_script
        "difflib",  # config: a misspelled directive
        "urllib.parse",  # urls: a %-escape in a target URL
        "kdump_capture.identity",  # pipeline: a network target
        "socket",  # identity
        "kdump_capture.sample",  # save --sample
    )
    assert [m for m in lazy if m not in packed] == []


def test_sftp_transport_does_without_invoke(tmp_path):
    """paramiko.config imports invoke when it is installed (for ssh_config "Match exec",
    which we never read): 60 ms of start-up per SFTP save on a host with fabric's invoke.
    An invoke on the path that announces its import stands for one installed here."""
    (tmp_path / "invoke.py").write_text("import sys\nsys.stderr.write('INVOKE IMPORTED\\n')\n")
    code = "import transports.sftp, sys; print(sys.modules.get('invoke'))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "INVOKE IMPORTED" not in p.stderr and p.stdout.strip() == "None"


def test_sftp_transport_does_without_ftplib_and_ssl():
    """transports.retry classifies ftplib's errors without importing ftplib: an SFTP save
    loads neither it nor ssl (7-10 ms of start-up), and an FTP error is still told apart."""
    code = (
        "import sys, transports.sftp, transports.retry as r\n"
        "print(sorted(m for m in ('ftplib', 'ssl') if m in sys.modules))\n"
        "import ftplib\n"
        "print(r.is_connection_lost(ftplib.error_temp('421 closing')),"
        " r.is_connection_lost(ftplib.error_temp('450 busy')))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["[]", "True False"]
