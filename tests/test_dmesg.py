"""Kernel log extraction: synthetic ring buffers, and the real sample against makedumpfile."""

from __future__ import annotations

import subprocess

import pytest

from kdump_capture import dmesg, sample
from kdump_capture.dumpfile import open_dump
from kdump_capture.errors import KdumpError, NotSupported, VmcoreError
from kdump_capture.sample import KernelImage
from kdump_capture.vmcore import open_vmcore

MESSAGES = [
    (0, b"Linux version 6.1.0-synthetic"),
    (1_500_000, b"two\nlines"),
    (12_345_678_901, b"caf\xc3\xa9 \x01\x7f tab\there"),
    (99_999_999_999_999, b"wide timestamp"),
]


def _vmcore(tmp_path, messages=MESSAGES, extra=None):
    k = KernelImage(512)
    k.build(messages)
    path = str(tmp_path / "v.elf")
    k.write(path, extra)
    return path


def test_format_matches_makedumpfile_rules(tmp_path):
    text = dmesg.extract(open_vmcore(_vmcore(tmp_path)))
    assert text == (
        "[    0.000000] Linux version 6.1.0-synthetic\n"
        "[    0.001500] two\n"
        "               lines\n"
        "[   12.345678] caf\\xffffffc3\\xffffffa9 \\x01\\x7f tab\there\n"
        "[99999.999999] wide timestamp\n"
    )


def test_wrapped_text_blocks(tmp_path):
    msgs = [(i * 1000, b"message %03d " % i + b"x" * 150) for i in range(24)]
    text = dmesg.extract(open_vmcore(_vmcore(tmp_path, msgs)))
    lines = text.splitlines()
    assert len(lines) == 24 and lines[-1].startswith("[    0.000023] message 023 ")


def test_same_text_as_makedumpfile_on_synthetic(tmp_path):
    path = _vmcore(tmp_path)
    out = tmp_path / "m.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", path, str(out)], check=True,
                   capture_output=True)  # fmt: skip
    assert dmesg.extract(open_vmcore(path)) == out.read_text("ascii")


@pytest.mark.parametrize(
    "extra,err",
    [
        ({"SYMBOL(prb)": None}, VmcoreError),
        ({"SYMBOL(prb)": None, "SYMBOL(log_buf)": "ffffffff81000000"}, NotSupported),
        ({"SYMBOL(prb)": "ffffffff81000000"}, VmcoreError),  # not mapped
        ({"OFFSET(prb_desc.state_var)": "x"}, VmcoreError),
        ({"SYMBOL(init_top_pgt)": "0"}, VmcoreError),
    ],
)
def test_bad_vmcoreinfo_gives_clear_error(tmp_path, extra, err):
    with pytest.raises(err) as e:
        dmesg.extract(open_vmcore(_vmcore(tmp_path, extra=extra)))
    assert isinstance(e.value, KdumpError) and str(e.value)


@pytest.mark.vm
def test_real_sample_matches_makedumpfile(real_sample, tmp_path):
    out = tmp_path / "m.txt"
    subprocess.run(["makedumpfile", "--dump-dmesg", str(real_sample.path), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    ours = dmesg.extract(open_vmcore(str(real_sample.path)))
    assert ours.splitlines() == out.read_text("ascii").splitlines()
    assert ours == out.read_text("ascii")
    assert real_sample.marker in ours
    with open_dump(str(real_sample.path)) as d:
        assert d.dmesg() == ours


def test_a_log_of_escapes_keeps_its_newest_records_within_bounds(tmp_path, monkeypatch):
    """Each non-printable byte is written as "\\xffffffe2", ten characters: a 128 KiB ring of
    them made a 65 MB dmesg.txt and took a save from 24 to 146 MB (held three times over),
    past what a capture kernel has. The formatted log is kept within twice the ring's text
    area (plus a slack, 0 here): the oldest records go, the newest (the crash) stay."""
    monkeypatch.setattr(dmesg, "OUTPUT_SLACK", 0)
    msgs = [(i * 1000, b"%03d " % i + b"\xe2" * 100) for i in range(24)]
    text = dmesg.extract(open_vmcore(_vmcore(tmp_path, msgs)))
    lines = text.splitlines()
    limit = 2 * (1 << sample.PRB_DATA_BITS)
    assert lines[0].startswith("[kdump-capture: the ") and "oldest records are left out" in lines[0]
    dropped = int(lines[0].split()[2])
    assert 0 < dropped < 24 and len(lines) == 1 + 24 - dropped
    assert lines[-1].startswith("[    0.000023] 023 \\xffffffe2")
    assert len(text) - len(lines[0]) - 1 <= limit
    monkeypatch.setattr(dmesg, "OUTPUT_SLACK", 1 << 20)
    assert "left out" not in dmesg.extract(open_vmcore(_vmcore(tmp_path, msgs)))
    assert not hasattr(dmesg, "MAX_OUTPUT")  # no absolute cap: a real 32 MiB ring stays whole


@pytest.mark.parametrize(
    "extra",
    [
        {"SYMBOL(prb)": "ffffffff81000000"},  # not mapped
        {"OFFSET(prb_desc.state_var)": "x"},
        {"SYMBOL(prb)": None},
    ],
)
def test_dmesg_and_summary_errors_name_the_dump(tmp_path, extra):
    # "kdump-capture: error: kernel address 0x... is not mapped (level 39)": which file?
    from tests.helpers import cli

    path = _vmcore(tmp_path, extra=extra)
    for cmd in ("dmesg", "summary"):
        r = cli(cmd, path)
        assert r.rc in (4, 9) and r.err.startswith(f"kdump-capture: error: {path}: "), r.err
