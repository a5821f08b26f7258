"""bench.measure.settled_memory: free page reporting off while the bench runs (a fake
parameter file here, never the machine's), the old order back afterwards whatever happens,
and what the reports say about it."""

from __future__ import annotations

import pytest

from bench import measure, run, transports

BUDDYINFO = (
    "Node 0, zone      DMA  0 0 0 0 0 0 0 0 1 1 3\n"
    "Node 0, zone   Normal  3011 2019 2011 2552 1413 789 725 742 508 122 4013\n"
)


@pytest.fixture
def param(tmp_path, monkeypatch):
    """A page_reporting_order file at order 9, an 11-order buddyinfo, and a record of the
    memory that would have been written (none is)."""
    path = tmp_path / "page_reporting_order"
    path.write_text("9\n")
    buddy = tmp_path / "buddyinfo"
    buddy.write_text(BUDDYINFO)
    orig = measure.page_orders
    monkeypatch.setattr(measure, "page_orders", lambda: orig(str(buddy)))
    touched: list[int] = []

    def touch(margin: int) -> tuple[int, float]:
        touched.append(margin)
        return 1234, 0.5

    monkeypatch.setattr(measure, "touch_free_memory", touch)
    return path, touched


def test_page_orders_counts_the_columns_of_buddyinfo(tmp_path):
    f = tmp_path / "buddyinfo"
    f.write_text(BUDDYINFO)
    assert measure.page_orders(str(f)) == 11


def test_reporting_is_off_inside_and_back_after(param):
    param, touched = param
    seen = []
    with measure.settled_memory(log=seen.append, path=str(param)) as info:
        inside = param.read_text()
    assert inside == "11"  # past order 10, the largest: nothing is reported
    assert param.read_text() == "9"
    assert info == {
        "order_before": "9",
        "order_during": "11",
        "backed_mib": 1234,
        "backed_s": 0.5,
    }
    assert touched == [512]
    assert any("off" in line for line in seen)


def test_without_touch_the_free_memory_is_left_alone(param):
    param, touched = param
    with measure.settled_memory(log=lambda _: None, path=str(param), touch=False) as info:
        assert param.read_text() == "11"
    assert info["backed_mib"] == 0 and touched == []
    assert "not written first (`--quick`)" in run._settled_cell({"settled": info})
    assert param.read_text() == "9"


def test_the_order_comes_back_when_the_bench_fails(param):
    param, _ = param
    with pytest.raises(RuntimeError), measure.settled_memory(log=lambda _: None, path=str(param)):
        raise RuntimeError("a section failed")
    assert param.read_text() == "9"


def test_a_run_inside_a_settled_one_touches_nothing(param):
    param, touched = param
    param.write_text("11\n")
    with measure.settled_memory(log=lambda _: None, path=str(param)) as info:
        pass
    assert info == {"order_before": "11", "already_off": True}
    assert touched == []
    assert param.read_text() == "11\n"


def test_no_reporting_means_nothing_to_do(tmp_path, param):
    _, touched = param
    with measure.settled_memory(log=lambda _: None, path=str(tmp_path / "absent")) as info:
        pass
    assert info == {}
    assert touched == []


def test_a_parameter_it_may_not_change_is_reported_not_raised(param, monkeypatch):
    param, touched = param
    real_open = open

    def no_write(f, mode="r", *a, **k):
        if str(f) == str(param) and "w" in mode:
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(f, mode, *a, **k)

    monkeypatch.setattr("builtins.open", no_write)
    seen = []
    with measure.settled_memory(log=seen.append, path=str(param)) as info:
        pass
    assert info["error"] == "could not turn free page reporting off (Permission denied)"
    assert touched == []
    assert seen and seen[0].startswith("warning:")


def test_touch_free_memory_writes_what_is_free_but_the_margin(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 999999 kB\nMemFree: 204800 kB\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k),
    )
    mib, seconds = measure.touch_free_memory(margin_mib=100)
    assert mib == 100  # 200 MiB free, 100 kept
    assert seconds >= 0
    assert measure.touch_free_memory(margin_mib=500) == (0, 0.0)


@pytest.mark.parametrize(
    ("settled", "words"),
    [
        (None, "left as it was (`--fresh-memory`)"),
        ({}, "no free page reporting"),
        ({"order_before": "11", "already_off": True}, "already off (order 11)"),
        (
            {"order_before": "9", "error": "could not turn free page reporting off (x)"},
            "off (x): figures may carry",
        ),
        (
            {"order_before": "9", "order_during": "11", "backed_mib": 1234, "backed_s": 0.5},
            "page_reporting_order 9 -> 11, back after), after writing 1234 MiB",
        ),
    ],
)
def test_the_reports_say_what_was_done(settled, words):
    cell = run._settled_cell({"settled": settled} if settled is not None else {})
    assert words in cell
    assert ("settled_memory" in cell) == (settled is not None and "order_during" in settled)
    assert words in transports.memory_note(settled)


def _cgroup(tmp_path, lines: str, files: dict[str, str]) -> tuple[str, str]:
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    root = tmp_path / "fs"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return str(proc), str(root)


def test_cgroup_room_v2(tmp_path):
    proc, root = _cgroup(
        tmp_path, "0::/bench\n", {"bench/memory.max": "1073741824", "bench/memory.current": "1024"}
    )
    assert measure.cgroup_room(proc, root) == (1 << 30) - 1024


def test_cgroup_room_v1(tmp_path):
    proc, root = _cgroup(
        tmp_path,
        "5:devices:/\n4:memory:/ci/job\n0::/\n",
        {
            "memory/ci/job/memory.limit_in_bytes": "4096",
            "memory/ci/job/memory.usage_in_bytes": "5000",
        },
    )
    assert measure.cgroup_room(proc, root) == 0  # over its limit already: nothing to write


@pytest.mark.parametrize(
    ("lines", "files"),
    [
        ("0::/\n", {"memory.max": "max", "memory.current": "5"}),  # v2, no limit
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                          "memory/memory.usage_in_bytes": "5"}),  # v1, no limit
        ("0::/gone\n", {}),  # nothing readable
    ],
)  # fmt: skip
def test_cgroup_room_without_a_limit(tmp_path, lines, files):
    proc, root = _cgroup(tmp_path, lines, files)
    assert measure.cgroup_room(proc, root) is None


def test_touch_free_memory_keeps_within_the_cgroup(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree: 20971520 kB\n")  # 20 GiB free on the host
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k),
    )
    monkeypatch.setattr(measure, "cgroup_room", lambda: 300 << 20)
    assert measure.touch_free_memory(margin_mib=100)[0] == 200


def test_fresh_memory_leaves_reporting_alone(param):
    param, touched = param
    with measure.settled_unless(True, path=str(param)) as info:
        assert param.read_text() == "9\n"
    assert info is None and touched == []
    assert "`--fresh-memory`" in run._settled_cell({"settled": info})
    with measure.settled_unless(False, log=lambda _: None, path=str(param)) as info:
        assert param.read_text() == "11"
    assert info["order_during"] == "11"
