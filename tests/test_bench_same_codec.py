"""The bench's same-codec rows (our lzo and zstd formats against makedumpfile -l and -z) and
how it finds a makedumpfile that writes zstd (Debian's does not)."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench import measure, run


def fake_makedumpfile(path, zstd: str) -> str:
    """A script answering -v as makedumpfile 1.7.2 does, with zstd enabled or disabled."""
    path.write_text(
        "#!/bin/sh\n"
        "printf 'makedumpfile: version 1.7.2 (released on 20 Oct 2022)\\n"
        f"lzo\\tenabled\\nsnappy\\tdisabled\\nzstd\\t{zstd}\\n\\n'\n"
    )
    os.chmod(path, 0o755)
    return str(path)


def test_a_makedumpfile_with_zstd_is_found_and_one_without_is_not(tmp_path):
    on = fake_makedumpfile(tmp_path / "on", "enabled")
    off = fake_makedumpfile(tmp_path / "off", "disabled")
    assert measure.has_zstd(on) and not measure.has_zstd(off)
    assert not measure.has_zstd(str(tmp_path / "missing"))
    assert measure.zstd_makedumpfile(on) == on
    assert measure.zstd_makedumpfile(off) is None  # asked for, but it writes no zstd


def test_debians_makedumpfile_writes_no_zstd():
    """Why the bench needs a makedumpfile of its own for -z: if this fails, Debian's
    package has zstd now and the bench can use it as it is."""
    if not subprocess.run(["sh", "-c", "command -v makedumpfile"], capture_output=True).stdout:
        pytest.skip("makedumpfile not installed")
    assert not measure.has_zstd("makedumpfile")


def cases(figures: dict[str, tuple[float, int]]) -> dict:
    return {n: {"samples": [{"wall": w, "cpu": w, "size": s}]} for n, (w, s) in figures.items()}


def med_of(c: dict):
    def med(name: str, key: str = "wall") -> float:
        return c[name]["samples"][0][key]

    return med


LZO = {
    "lzo -d 31": (0.151, 43_200_000),
    "makedumpfile -l -d 31": (0.134, 43_200_000),
    "lzo -d 1": (0.531, 92_300_000),
    "makedumpfile -l -d 1": (0.537, 92_300_000),
}


def test_zstd_rows_against_makedumpfile_z_and_its_own_zstd_against_lzo():
    c = cases(
        LZO
        | {
            "zstd -d 31": (0.330, 30_700_000),
            "makedumpfile -z -d 31": (0.290, 30_700_000),
            "zstd -d 1": (0.780, 62_000_000),
            "makedumpfile -z -d 1": (0.750, 62_000_000),
        }
    )
    same = {"lzo -d 31": True, "lzo -d 1": True, "zstd -d 31": True, "zstd -d 1": False}
    text = "\n".join(run.same_codec_lines({"identical_same_codec": same}, c, med_of(c)))
    assert "our `zstd` format against makedumpfile `-z` (zstd level 1" in text
    assert (
        "| zstd -d 31 vs `makedumpfile -z -d 31` | 1.14x (0.330 / 0.290 s) | 1.000x | identical |"
        in text
    )
    assert (
        "| zstd -d 1 vs `makedumpfile -z -d 1` | 1.04x (0.780 / 0.750 s) | 1.000x | **differs** |"
        in text
    )
    assert (
        "- Level 31: makedumpfile's own zstd takes 2.16x its lzo (`-z` / `-l`: 0.290 / 0.134 s)"
        ": the zstd goal's limit (no slower than `-l`) is one makedumpfile misses too"
    ) in text
    assert "- Level 1: makedumpfile's own zstd takes 1.40x its lzo" in text


def test_without_a_zstd_makedumpfile_only_the_lzo_rows():
    c = cases(LZO | {"zstd -d 31": (0.330, 30_700_000), "zstd -d 1": (0.780, 62_000_000)})
    same = {"lzo -d 31": True, "lzo -d 1": False}
    lines = run.same_codec_lines({"identical_same_codec": same}, c, med_of(c))
    text = "\n".join(lines)
    assert "`-z`" not in text and "Level 31" not in text
    assert [line.split(" |")[0] for line in lines if line.startswith("| lzo")] == [
        "| lzo -d 31 vs `makedumpfile -l -d 31`",
        "| lzo -d 1 vs `makedumpfile -l -d 1`",
    ]
    assert "| 0.99x (0.531 / 0.537 s) | 1.000x | **differs** |" in text


def test_the_machine_table_says_which_makedumpfile_wrote_zstd():
    assert "not looked for" in run._zstd_cell({})
    assert "none found" in run._zstd_cell({"makedumpfile_zstd": None})
    cell = run._zstd_cell({"makedumpfile_zstd": "/x/makedumpfile (makedumpfile: version 1.7.2)"})
    assert cell.startswith("/x/makedumpfile (makedumpfile: version 1.7.2): built from the source")


def test_format_cases_time_makedumpfile_z_only_when_there_is_one(tmp_path):
    names = [c.name for c in run.format_cases("/v", str(tmp_path))]
    assert not any("-z" in n for n in names)
    with_z = run.format_cases("/v", str(tmp_path), "/opt/mdz")
    z = [c for c in with_z if "-z" in c.name]
    assert [c.name for c in z] == ["makedumpfile -z -d 31", "makedumpfile -z -d 1"]
    assert z[0].argv[:4] == ["/opt/mdz", "-z", "-d", "31"] and z[0].side == "ref"
