"""bench/codec_floor.py (the codecs alone: LZO1X-1, the zstd sweep, zlib) and its table in
bench/RESULTS.md as bench/run.py renders it ("meets both", LZO's share, the verdict)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib

import pytest
import zstandard

from bench import codec_floor, run
from kdump_capture import speedups
from kdump_capture.formats.kdump import LzoCodec
from kdump_capture.sample import SampleSpec, write_sample

from .helpers import ROOT

PAGE = 4096


def some_pages() -> bytearray:
    """Four pages: text (compresses), noise (does not: stored raw), half zero, repeated."""
    rng = random.Random(9)
    text = b"".join(b"task %d runnable on cpu %d\n" % (i, i % 4) for i in range(400))[:PAGE]
    return bytearray(
        text + rng.randbytes(PAGE) + bytes(PAGE // 2) + rng.randbytes(PAGE // 2) + b"ab" * 2048
    )


def split(data) -> list[bytes]:
    return [bytes(data[o : o + PAGE]) for o in range(0, len(data), PAGE)]


def python_lzo_bytes(pages: list[bytes]) -> int:
    """What makedumpfile -l stores for these pages, by python-lzo (our lzo format's reference)."""
    data, _ = LzoCodec(accelerated=False).pack_py(
        b"".join(pages), range(0, len(pages) * PAGE, PAGE), False
    )
    return len(data)


@pytest.mark.skipif(not hasattr(speedups.module(), "lzo_pages"), reason="built without liblzo2")
def test_measure_stores_what_each_codec_gives_per_page():
    data = some_pages()
    pages = split(data)
    out = codec_floor.measure(data, 1, speedups.module())
    assert out["pages"] == 4 and out["input_bytes"] == 4 * PAGE
    c = out["codecs"]
    names = [n for n, _ in codec_floor.zstd_settings()]
    assert list(c) == ["LZO1X-1", *names, "zlib level 1", "zlib level 1, our deflate"]
    assert len(names) == 7
    assert c["LZO1X-1"]["bytes"] == python_lzo_bytes(pages)
    assert "(_speedups.lzo_pages)" in c["LZO1X-1"]["note"]
    for name, kw in codec_floor.zstd_settings():
        cctx = zstandard.ZstdCompressor(**kw)
        assert c[name]["bytes"] == sum(min(len(cctx.compress(p)), PAGE) for p in pages), name
    assert c["zlib level 1"]["bytes"] == sum(min(len(zlib.compress(p, 1)), PAGE) for p in pages)
    assert c["zlib level 1, our deflate"]["bytes"] == c["zlib level 1"]["bytes"]
    assert "(_speedups.zlib_pages)" in c["zlib level 1, our deflate"]["note"]
    assert all(c[n]["cpu_s"] >= 0 for n in c)
    # the noise page is stored raw by every codec
    assert all(c[n]["bytes"] >= PAGE for n in c)


def test_lzo_batches_cover_every_page():
    """More pages than one lzo_pages call takes: every batch is counted, the last one short."""
    if not hasattr(speedups.module(), "lzo_pages"):
        pytest.skip("built without liblzo2")
    rng = random.Random(4)
    n = codec_floor.BATCH + 3
    pages = [rng.randbytes(64) * (PAGE // 64) for _ in range(n)]
    out = codec_floor.measure(b"".join(pages), 1, speedups.module())
    assert out["codecs"]["LZO1X-1"]["bytes"] == python_lzo_bytes(pages)


def test_lzo_without_the_accelerator_uses_python_lzo():
    data = some_pages()
    lzo = codec_floor.measure(data, 1, None)["codecs"]["LZO1X-1"]
    assert lzo["bytes"] == python_lzo_bytes(split(data))
    assert lzo["note"] == "python-lzo, one call per page (no accelerator)"
    text = "\n".join(run.codec_floor_lines({"1": {"pages": 4, "codecs": {"LZO1X-1": lzo}}},
                                           lambda name, key="wall": 1.0))  # fmt: skip
    assert "- Measured with python-lzo, one call per page (no accelerator)." in text


def test_missing_liblzo2_is_a_row_not_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "lzo", None)  # no python-lzo, no accelerator
    out = codec_floor.measure(some_pages(), 1, None)
    assert out["codecs"]["LZO1X-1"]["error"].startswith("not measured: ")
    assert out["codecs"]["zlib level 1, our deflate"]["error"].startswith("not measured: ")
    assert out["codecs"]["zstd level 1"]["bytes"] > 0
    floors = {"31": out}
    text = "\n".join(
        run.codec_floor_lines(floors, lambda name, key="wall": {"cpu": 0.1, "wall": 0.2}[key])
    )
    assert "| LZO1X-1: not measured: " in text
    assert "Level 31: LZO1X-1 not measured: " in text
    assert "- Measured with zstd 1.5." in text and "(python-zstandard); zlib " in text


def test_main_on_a_vmcore(tmp_path):
    """The whole script as bench/run.py runs it: tap the pages of a dump, measure, clean up."""
    src = str(tmp_path / "vmcore")
    write_sample(src, SampleSpec(ram_mib=2))
    tap = str(tmp_path / "tap")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "codec_floor.py"), src, "1", tap, "--runs=1"],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["pages"] > 0
    assert all(0 < c["bytes"] <= out["input_bytes"] for c in out["codecs"].values())
    assert os.listdir(tmp_path) == ["vmcore"]  # the tap file is gone


def floors(zstd: dict[str, tuple[float, int]]) -> dict:
    codecs = {"LZO1X-1": {"cpu_s": 0.063, "bytes": 21_900_000}}
    codecs |= {n: {"cpu_s": t, "bytes": b} for n, (t, b) in zstd.items()}
    codecs["zlib level 1"] = {"cpu_s": 0.615, "bytes": 16_000_000}
    return {"31": {"pages": 14311, "input_bytes": 14311 * PAGE, "codecs": codecs}}


def mdf(name: str, key: str = "wall", ours: float = 0.250) -> float:
    """Medians of makedumpfile -l's runs (the table compares with its CPU time) and of our
    zstd run (CPU ``ours``), which the split of the gap uses."""
    return {
        ("makedumpfile -l -d 31", "cpu"): 0.119,
        ("makedumpfile -l -d 31", "wall"): 0.3,
        ("zstd -d 31", "cpu"): ours,
    }[name, key]


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    rows = [[x.strip() for x in ln.strip("|").split("|")] for ln in lines if ln.startswith("| 31")]
    return {r[2]: r for r in rows}


def test_rendering_when_no_zstd_setting_meets_both():
    lines = run.codec_floor_lines(
        floors({"zstd level 1": (0.180, 15_900_000), "zstd level -3": (0.113, 21_200_000)}), mdf
    )
    assert (
        "| level | pages | codec | CPU s | makedumpfile -l whole run: CPU s (wall s) |" in lines[3]
    )
    rows = table_rows(lines)
    assert rows["zstd level 1"][3:] == ["0.180", "0.119 (0.300)", "15.9", "0.994x", "no"]
    assert rows["zstd level -3"][-2:] == ["1.325x", "no"]
    assert rows["LZO1X-1"][-1] == "no" and rows["zlib level 1"][-2:] == ["1.000x", "no"]
    text = "\n".join(lines)
    assert (
        "- Level 31: LZO1X-1 alone takes 0.063 s, 53% of makedumpfile -l's whole run (0.119 s CPU)"
        in text
    )
    assert (
        "- Level 31: no zstd setting meets both (2 measured): the fastest no larger than zlib "
        "(zstd level 1) takes 0.180 s, 1.51x makedumpfile -l's whole run; the smallest no "
        "slower than that run (zstd level -3) stores 1.32x zlib's bytes" in text
    )


def test_rendering_when_a_zstd_setting_meets_both():
    lines = run.codec_floor_lines(
        floors({"zstd level 1": (0.180, 15_900_000), "zstd fast": (0.100, 15_990_000)}), mdf
    )
    assert table_rows(lines)["zstd fast"][-1] == "yes"
    assert table_rows(lines)["zstd level 1"][-1] == "no"
    assert "- Level 31: zstd fast meets both: the codec does not bound" in "\n".join(lines)


def test_rendering_when_nothing_is_small_or_fast_enough():
    text = "\n".join(run.codec_floor_lines(floors({"zstd slow and big": (0.5, 17_000_000)}), mdf))
    assert "none stores as little as zlib; none is as fast as that run" in text
    assert "(the fastest, zstd slow and big, takes 4.20x)" in text


@pytest.mark.parametrize(
    "ours, startup, verdict",
    [
        # around ours 0.250 - 0.180 = 0.070, around makedumpfile's 0.119 - 0.063 = 0.056
        (0.250, None, "the code around our codec costs 0.014 s more than makedumpfile's, "
                      "which is ours to find; the rest of the gap is the codec's."),
        (0.250, 0.010, "the code around our codec costs 0.014 s more than makedumpfile's: "
                       "0.010 s of it is our start-up alone (interpreter, imports and "
                       "accelerator) and 0.004 s is ours to find; the rest of the gap is the "
                       "codec's."),
        (0.250, 0.050, "the code around our codec costs 0.014 s more than makedumpfile's, no "
                       "more than our start-up alone (interpreter, imports and accelerator: "
                       "0.050 s); the rest of the gap is the codec's."),
        (0.230, 0.050, "the code around our codec costs less than makedumpfile's, so the gap "
                       "is the codec's."),
        (0.110, None, "the whole runs by -0.009 s."),
    ],
)  # fmt: skip
def test_the_zstd_gap_is_split_between_the_codec_and_the_code_around_it(ours, startup, verdict):
    lines = run.codec_floor_lines(
        floors({"zstd level 1": (0.180, 15_900_000)}),
        lambda name, key="wall": mdf(name, key, ours),
        startup,
    )
    (line,) = [ln for ln in lines if ", around the codec" in ln]
    assert line.startswith(
        f"- Level 31, around the codec (a run's CPU time less its codec's alone): our zstd run "
        f"{ours - 0.180:.3f} s ({ours:.3f} less zstd level 1's 0.180), makedumpfile -l 0.056 s "
        "(0.119 less LZO1X-1's 0.063); the codecs alone differ by 0.117 s and the whole runs "
        f"by {ours - 0.119:.3f} s"
    )
    assert line.endswith(verdict)


def test_startup_is_measured_as_the_cases_are():
    """Our writer's start-up alone, as bench/run.py measures it before splitting the gap:
    a real run of the interpreter, pinned, which loads the accelerator."""
    cpu = run.startup_cpu(3, 1)
    assert cpu is not None and 0 < cpu < 5


def test_a_partial_transport_run_keeps_only_the_last_full_table():
    """bench/transports.py --only writes its rows above the last full run's table; a
    second partial run must not file the first one as the full run."""
    from bench import transports as bt

    full = "# Transport throughput on loopback\n\n| full table |\n"
    first = bt.with_last_full_run("# T\n\n| sftp only |\n", full)
    assert first == "# T\n\n| sftp only |\n" + bt.PREVIOUS + "\n| full table |\n"
    second = bt.with_last_full_run("# T\n\n| ftp only |\n", first)
    assert second == "# T\n\n| ftp only |\n" + bt.PREVIOUS + "\n| full table |\n"
    assert bt.with_last_full_run("# T\n\n| all |\n", "") == "# T\n\n| all |\n"
