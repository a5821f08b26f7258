"""The fault matrix (issue 8): every fault against every target, one set of invariants.

Rows and the checker live in tests/matrix.py. The selected cases run at once, a few at a
time, when the first of them needs its result (most of a row's time is the engine's own
retry delays, which overlap well); each test then checks its own outcome. NFS is covered
by the VM matrix (tests/test_e2e_vm.py, marker ``slow``): the host kernel has no NFS client.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from . import matrix

# Rows run concurrently: the long ones mostly wait (retry delays), the rest share 2 CPUs.
WORKERS = 4
# Longest first, so the waits overlap the short rows.
_SLOW_FIRST = ("server-gone", "server-returns", "drop-", "sigkill")


def _params():
    out = []
    for row_id, kind in matrix.cases():
        reason = matrix.ROWS[row_id].pending_for(kind)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(row_id, kind, marks=marks, id=f"{row_id}-{kind}"))
    return out


def _selected(session) -> list[tuple[str, str]]:
    cases = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if item.module.__name__ == __name__ and spec and "row" in spec.params:
            cases.append((spec.params["row"], spec.params["kind"]))
    return cases


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Run every selected case; {(row, kind): Outcome or the exception its run raised}."""
    cases = _selected(request.session)
    kinds = {k for _, k in cases}
    servers = matrix.Servers(
        ssh=request.getfixturevalue("ssh_server") if "sftp" in kinds else None,
        ftp=request.getfixturevalue("ftp_server") if "ftp" in kinds else None,
        smb=request.getfixturevalue("smb_server") if "cifs" in kinds else None,
    )
    scratch = str(tmp_path_factory.mktemp("matrix"))
    os.makedirs(os.path.join(scratch, "sftp"))
    sources = matrix.make_sources(os.path.join(scratch, "src"))
    with ThreadPoolExecutor(WORKERS) as pool:
        templates = dict(
            zip(
                sorted(kinds),
                pool.map(
                    lambda k: matrix.make_template(k, servers, scratch, sources["older"]),
                    sorted(kinds),
                ),
                strict=True,
            )
        )
        order = sorted(cases, key=lambda c: not c[0].startswith(_SLOW_FIRST))
        futures = {
            c: pool.submit(matrix.run_row, c[0], c[1], servers, scratch, sources, templates)
            for c in order
        }
        results = {}
        for c, f in futures.items():
            try:
                results[c] = f.result()
            except Exception as e:  # reported by that case's test
                results[c] = e
    return results


@pytest.mark.parametrize(("row", "kind"), _params())
def test_fault_matrix(row, kind, outcomes, record_property):
    outcome = outcomes[(row, kind)]
    if isinstance(outcome, Exception):
        raise outcome
    record_property("summary", matrix.summary(outcome))
    problems = matrix.check(outcome)
    assert not problems, f"{row} on {kind}: " + "; ".join(problems)
