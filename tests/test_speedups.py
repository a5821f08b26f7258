"""The compiled accelerator against its pure-Python references: same bitmaps, same bytes."""

from __future__ import annotations

import array
import os
import random
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdump_capture import speedups
from kdump_capture.formats import NullMonitor
from kdump_capture.formats import filter as F
from kdump_capture.formats.elf import ElfWriter
from kdump_capture.formats.kdump import KdumpWriter, ZlibCodec, ZstdCodec, page_descs_py
from kdump_capture.formats.pages import zero_mask_py
from kdump_capture.sample import RAM_START, KernelImage
from kdump_capture.vmcore import open_vmcore

from .bigcore import get_bigcore
from .helpers import ROOT
from .test_filter import STATES

PAGE = 4096
FIRST = RAM_START // PAGE
C = speedups.module()


@pytest.fixture(autouse=True)
def _built(request):
    if C is None and "build" not in request.node.name:
        pytest.fail("kdump_capture._speedups is not built: python3 setup.py build_ext --inplace")


def _pages(rng: random.Random, n: int) -> bytes:
    out = []
    for i in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(bytes(PAGE))
        elif kind == 1:
            out.append((b"text %6d " % i * 400)[:PAGE])
        elif kind == 2:
            out.append(rng.randbytes(PAGE))
        else:  # almost zero: one byte set somewhere
            pg = bytearray(PAGE)
            pg[rng.randrange(PAGE)] = 1
            out.append(bytes(pg))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(5))
def test_zero_pages_and_zlib_pages_match_python(seed):
    rng = random.Random(seed)
    n = 300
    src = b"xx" + _pages(rng, n)  # pages at unaligned offsets too
    offsets = array.array("Q", sorted(rng.sample(range(2, 2 + (n - 1) * PAGE + 1), 64)))
    assert C.zero_pages(src, offsets) == zero_mask_py(src, offsets)
    for dedup in (True, False):
        out = bytearray(len(offsets) * PAGE)
        ln, words = C.zlib_pages(src, offsets, dedup, 1, out)
        data, ref_words = ZlibCodec(accelerated=False).pack_py(src, offsets, dedup)
        assert bytes(out[:ln]) == data and words == ref_words
        assert C.page_descs(words, 12345, 4096) == page_descs_py(words, 12345, 4096)


def test_accelerator_rejects_inconsistent_arguments():
    with pytest.raises(ValueError):
        C.zero_pages(bytes(PAGE), array.array("Q", [1]))  # page runs past the buffer
    with pytest.raises(ValueError):
        C.zlib_pages(bytes(2 * PAGE), array.array("Q", [0, PAGE]), True, 1, bytearray(PAGE))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.integers(0, 2047), STATES, max_size=40), st.sampled_from([1, 16, 31]))
def test_struct_page_walk_matches_python(tmp_path, pages, level):
    k = KernelImage(2048)
    k.pages = {FIRST + i: s for i, s in pages.items()}
    k.build([(0, b"x")])
    path = str(tmp_path / "w.elf")
    k.write(path, {"NUMBER(PG_hwpoison)": "23"})
    with open_vmcore(path) as vm:
        for w in (512, 1 << 21):
            py = F.build_bitmaps(vm, level, window_pfns=w, accelerated=False)
            assert F.build_bitmaps(vm, level, window_pfns=w, accelerated=True) == py


class MemSink:
    seekable = True

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def write(self, data) -> None:
        end = self.pos + len(data)
        if end > len(self.buf):
            self.buf += bytes(end - len(self.buf))
        self.buf[self.pos : end] = data
        self.pos = end

    def seek(self, offset: int) -> None:
        self.pos = offset

    def tell(self) -> int:
        return self.pos


def _dump(vm, fmt: str, level: int, accelerated: bool) -> bytes:
    if fmt == "elf":
        w = ElfWriter(vm, level, accelerated=accelerated)
    else:
        codec = ZlibCodec(accelerated=accelerated) if fmt == "compressed" else None
        codec = codec or ZstdCodec(accelerated=accelerated)
        w = KdumpWriter(vm, level, codec, accelerated=accelerated)
    sink = MemSink()
    w.write(sink, NullMonitor())
    return bytes(sink.buf)


@pytest.fixture(scope="module")
def big256m(tmp_path_factory):
    return get_bigcore(str(tmp_path_factory.mktemp("big")), 256)


@pytest.mark.parametrize("fmt", ["compressed", "zstd", "elf"])
@pytest.mark.parametrize("level", [1, 31])
def test_writers_give_the_same_bytes_either_way(big256m, fmt, level):
    with open_vmcore(big256m) as vm:
        assert _dump(vm, fmt, level, True) == _dump(vm, fmt, level, False)


def test_check_says_which_path_is_active():
    code = "from kdump_capture import speedups; print(speedups.describe())"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("compiled accelerator")
    env["KDUMP_CAPTURE_PURE_PYTHON"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("pure Python (turned off by KDUMP_CAPTURE_PURE_PYTHON)")


def _tree(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    for rel in files.split():
        if rel.split("/")[0] in ("kdump_capture", "transports", "initramfs") or rel in (
            "setup.py",
            "pyproject.toml",
            "README.md",
        ):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    return src


@pytest.mark.parametrize("cc", ["false", None])
def test_build_without_a_compiler_falls_back(tmp_path, cc):
    # What `pip install` runs: setup.py's build. Without a working compiler the optional
    # extension fails, the build still succeeds and the package uses its Python path.
    src = _tree(tmp_path)
    env = dict(os.environ)
    if cc:
        env["CC"] = cc
    p = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-lib", "lib"],
                       cwd=src, env=env, capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    built = list((src / "lib" / "kdump_capture").glob("_speedups*.so"))
    assert bool(built) == (cc is None)
    code = "from kdump_capture import speedups; print(speedups.describe())"
    env = {k: v for k, v in os.environ.items() if k != "KDUMP_CAPTURE_PURE_PYTHON"}
    env["PYTHONPATH"] = str(src / "lib")
    # -S: no site-packages, so an editable install's finder cannot answer for the build
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True).stdout  # fmt: skip
    expect = "compiled accelerator" if cc is None else "pure Python (not built"
    assert out.startswith(expect), out
