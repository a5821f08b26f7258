"""The accelerator under AddressSanitizer and UndefinedBehaviorSanitizer.

``_speedups`` reads the crashed kernel's memory in C: the struct-page array, every page it
compresses (our own deflate, zstd, LZO) and the offsets the Python side hands it. A read or
write out of bounds there kills the capture kernel's one chance at the dump, and the tests
that compare its output with the reference codecs would not notice one that happens to
read harmless bytes. So this builds a copy of the extension with ``-fsanitize=address,
undefined`` and runs the tests that feed it real, fuzzed and hostile input against that copy;
any report of either sanitizer fails it.

ASan reserves terabytes of address space for its shadow memory, so the one limit those tests
set with RLIMIT_AS (``test_untrusted_dump.cli_limited``) is replaced here by ASan's own cap
on a single allocation, which fails it with a MemoryError as the limit did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .helpers import ROOT

# What the nested run covers: every test that calls into _speedups with real or hostile data.
SUITES = [
    "tests/test_speedups.py",
    "tests/test_untrusted_dump.py",
    "tests/test_fuzz.py",
    "tests/test_filter.py",
    "tests/test_formats_kdump.py",
]


def _runtime(name: str) -> str | None:
    """The path of gcc's runtime library ``name``, or None (gcc echoes the bare name back)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _sanitized_env(copy: str, preload: str, logs: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=preload,
        # abort: the report and a non-zero exit even inside a child that catches signals;
        # no leak check (the interpreter keeps its objects at exit);
        # a single allocation above 1 GiB returns NULL, a MemoryError in Python;
        # reports also go to files in ``logs``, whatever a test does with its children's
        # stderr (pytest's own capture would swallow the report of a process that aborts).
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:"
        f"max_allocation_size_mb=1024:log_path={logs}/asan",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs}/ubsan",
        PYTHONPATH=copy,
        KDUMP_CAPTURE_SANITIZED="1",
    )
    env.pop("KDUMP_CAPTURE_PURE_PYTHON", None)
    return env


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """A copy of the tree whose _speedups is built with ASan and UBSan, and its environment."""
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc's libasan/libubsan are not installed")
    # The tracked files (3 MB), in a repository of their own: some of the tests copy the
    # tree they run in by ``git ls-files``.
    copy = str(tmp_path_factory.mktemp("sanitized") / "tree")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for rel in files.split("\0"):
        if rel and os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(copy, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(copy, rel))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined"
    build_env = dict(
        os.environ,
        CC=f"gcc {flags}",
        LDSHARED=f"gcc {flags} -shared",
        CFLAGS="-O1 -g -fno-omit-frame-pointer",
    )
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=copy,
        env=build_env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The sanitized build must have what the normal one has: a missing library would leave
    # its code path untested here.
    assert "not found" not in out.stdout, out.stdout
    logs = str(tmp_path_factory.mktemp("sanitizer-logs"))
    return copy, logs, _sanitized_env(copy, f"{asan} {ubsan}", logs)


def _reports(logs: str) -> str:
    text = ""
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name), errors="replace") as f:
            text += f"--- {name}\n{f.read()}"
    return text


def test_the_sanitizer_catches_an_overflow(sanitized):
    """The harness can fail: 64 bytes read past a heap block abort with ASan's report."""
    copy, logs, env = sanitized
    probe = (
        "import ctypes, kdump_capture._speedups as s\n"
        f"assert s.__file__.startswith({copy!r}), s.__file__\n"
        "buf = ctypes.create_string_buffer(1 << 16)\n"
        "ctypes.string_at(ctypes.addressof(buf), (1 << 16) + 64)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    found = _reports(logs)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in found, found[-2000:]
    for name in os.listdir(logs):  # the next test starts with none
        os.unlink(os.path.join(logs, name))


def test_accelerator_tests_pass_under_asan_and_ubsan(sanitized):
    copy, logs, env = sanitized
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-x"]
        + ["--capture=sys", *SUITES],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    found = _reports(logs)
    assert not found, found[:6000]
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
