"""Rotation and free-space policy as pure functions."""

import pytest

from kdump_capture import policy
from kdump_capture.policy import COMPLETE, DAMAGED, FAILED, INCOMPLETE, DumpDir


def d(stamp_day: int, state=COMPLETE, host=None, seq=0):
    stamp = f"2026-01-{stamp_day:02d}-10-00-00"
    return DumpDir(stamp, seq, policy.dump_name(stamp, host, seq), host, state)


def names(ds):
    return [x.name[8:10] for x in ds]


def test_names_round_trip():
    assert policy.parse_dump_name("2026-01-02-03-04-05") == (None, "2026-01-02-03-04-05", 0)
    assert policy.parse_dump_name("web-01.example-2026-01-02-03-04-05.2") == (
        "web-01.example",
        "2026-01-02-03-04-05",
        2,
    )
    assert policy.parse_dump_name("lost+found") is None
    assert policy.parse_dump_name("2026-01-02-03:04") is None  # the old SUSE form has ':'
    assert ":" not in policy.stamp_for(1764000000)


@pytest.mark.parametrize(
    "keep, expired",
    [
        (0, []),
        (1, ["01", "02", "03"]),
        (2, ["01", "02"]),
        (3, ["01"]),
        (4, []),
        (10, []),
        (-1, ["01", "02", "03", "04"]),
        (-2, ["01", "02", "03", "04"]),
    ],
)
def test_select_expired(keep, expired):
    dumps = [d(1), d(2), d(3), d(4), d(5)]
    new = dumps[-1].name
    assert names(policy.select_expired(dumps, keep, new)) == expired


def test_failed_dumps_do_not_count_and_stay_while_among_the_newest():
    """A failed dump's dmesg.txt is the only record of its crash: a later success (another
    crash) deleted it whatever KDUMP_KEEP_OLD_DUMPS said. It takes no complete dump's place
    and stays while among the N newest older dumps."""
    dumps = [d(1), d(2, FAILED), d(3), d(4, FAILED), d(5)]
    # keep 1: the new one (5) plus one older complete (3), and failed 4, the newest older
    assert names(policy.select_expired(dumps, 1, dumps[-1].name)) == ["01", "02"]
    # keep 2: complete 1 and 3, failed 4 (2 is not among the 2 newest older dumps)
    assert names(policy.select_expired(dumps, 2, dumps[-1].name)) == ["02"]
    # a run of failures keeps at most N of them
    fails = [d(i, FAILED) for i in range(1, 6)] + [d(6)]
    assert names(policy.select_expired(fails, 2, fails[-1].name)) == ["01", "02", "03"]


def test_incomplete_is_stale_not_rotated():
    dumps = [d(1), d(2, INCOMPLETE), d(3)]
    assert names(policy.select_stale(dumps)) == ["02"]
    assert "02" not in names(policy.select_expired(dumps, 1, None))


def test_before_write_only_for_negative():
    dumps = [d(1), d(2)]
    assert policy.select_before_write(dumps, 5) == []
    assert names(policy.select_before_write(dumps, -1)) == ["01", "02"]
    assert names(policy.select_before_write(dumps, -2)) == ["01", "02"]


def test_prunable_for_space_never_more_than_rotation_would():
    dumps = [d(1), d(2), d(3)]
    assert names(policy.prunable_for_space(dumps, 2)) == ["01"]
    assert policy.prunable_for_space(dumps, 0) == []
    assert policy.prunable_for_space(dumps, 5) == []


def test_hosts_are_separate_on_shared_targets():
    dumps = [d(1, host="a"), d(2, host="b"), d(3, host="a")]
    assert [x.host for x in policy.ours(dumps, "a")] == ["a", "a"]
    assert policy.ours(dumps, None) == []


@pytest.mark.parametrize(
    "free, needed, margin, short",
    [(None, 10, 5, 0), (100, 10, 5, 0), (15, 10, 5, 0), (14, 10, 5, 1), (0, 10, 0, 10)],
)
def test_budget(free, needed, margin, short):
    assert policy.budget_shortfall(free, needed, margin) == short


@pytest.mark.parametrize(
    "name",
    [
        "2000-01-01-00-00-10\n",  # "$" matched before a final newline
        "host-2000-01-01-00-00-10.1\n",
        "٢٠٠٠-01-01-00-00-10",  # "\d" took any script's digits
        "2000-01-01-00-00-10.١",
    ],
)
def test_names_that_only_look_like_ours(name):
    assert policy.parse_dump_name(name) is None


def test_a_damaged_dump_never_takes_a_whole_ones_place():
    """A dump whose files no longer match its manifest (a vmcore cut short or removed)
    counted as complete: with keep 1 it was the one older dump kept, and the whole one
    before it was deleted. Now both stay; the damaged one goes when a complete one in its
    place would (no longer among the `keep` newest)."""
    dumps = [d(1), d(2), d(3, DAMAGED), d(4)]
    assert names(policy.select_expired(dumps, 1, dumps[-1].name)) == ["01"]
    assert names(policy.prunable_for_space(dumps[:-1], 1)) == ["01"]
    dumps = [d(1), d(2, DAMAGED), d(3), d(4)]
    assert names(policy.select_expired(dumps, 1, dumps[-1].name)) == ["01", "02"]
    assert names(policy.select_expired(dumps, 2, dumps[-1].name)) == []
    assert names(policy.select_expired(dumps, -1, dumps[-1].name)) == ["01", "02", "03"]
