"""bench.memory's table: mapped and read peaks per size, the goal judged on the mapped one."""

from __future__ import annotations

from bench import memory


def _row(gib, fmt, level, target, rss, read=None):
    row = {"gib": gib, "format": fmt, "level": level, "target": target, "rss": rss}
    if read is not None:
        row["rss_read"] = read
    return row


def test_both_figures_and_the_goal_on_the_mapped_one():
    data = {
        "sizes": [1, 16],
        "runs": 3,
        "rows": [
            _row(1, "ELF", 31, "file", 30.0, 25.0),
            _row(16, "ELF", 31, "file", 35.5, 26.0),  # mapped +5.5: missed, read +1.0
            _row(1, "zstd", 1, "file", 30.0, 25.0),
            _row(16, "zstd", 1, "file", 33.0, 25.5),
        ],
    }
    goals: list = []
    text = "\n".join(memory.report_lines(data, goals))
    assert "Median of 3 interleaved runs" in text
    assert "| ELF | 31 | file | 30.0 | 25.0 | 35.5 | 26.0 | +5.5 | +1.0 |" in text
    assert "| zstd | 1 | file | 30.0 | 25.0 | 33.0 | 25.5 | +3.0 | +0.5 |" in text
    assert [(g[2], g[3]) for g in goals] == [
        ("+5.5 MiB (source read: +1.0 MiB)", False),
        ("+3.0 MiB (source read: +0.5 MiB)", True),
    ]


def test_results_from_before_the_read_runs_show_a_dash():
    data = {
        "sizes": [1, 16],
        "rows": [_row(1, "ELF", 1, "file", 22.8), _row(16, "ELF", 1, "file", 23.9)],
    }
    goals: list = []
    text = "\n".join(memory.report_lines(data, goals))
    assert "One run per case" in text
    assert "| ELF | 1 | file | 22.8 | - | 23.9 | - | +1.1 | - |" in text
    assert goals[0][2:] == ("+1.1 MiB (source read: not measured)", True)
