"""Every fuzz target: replay its kept corpus (seeds and past crashers), then random inputs.

The properties (tests/fuzz/bounded.py): only our own errors come out, no input takes more than
2 s or 256 MiB. Long coverage-guided runs are `python3 -m tests.fuzz.run TARGET --runs N`.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import corpus_files, targets
from tests.fuzz.bounded import run_bounded

TARGETS = targets()
KEPT = [(name, p) for name in sorted(TARGETS) for p in corpus_files(name)]


@pytest.mark.parametrize(("name", "path"), KEPT, ids=[f"{n}/{p.name}" for n, p in KEPT])
def test_kept_input(name, path):
    run_bounded(TARGETS[name], path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_inputs(name):
    fn = TARGETS[name]

    @settings(
        max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.binary(max_size=4096))
    def check(data: bytes) -> None:
        run_bounded(fn, data)

    check()
