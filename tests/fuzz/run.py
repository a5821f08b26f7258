"""Coverage-guided fuzzing of one target: ``python3 -m tests.fuzz.run TARGET --runs N``.

Uses atheris (libFuzzer) when it is installed, with libFuzzer's own limits for time per input
and RSS; otherwise hypothesis with as many examples. New crashers are written to
``tests/fuzz/corpus/TARGET/`` so that ``tests/test_fuzz.py`` replays them from then on. The
last line printed is ``TARGET: N inputs, M findings`` for docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from . import CORPUS, MIB, SECONDS, corpus_files, targets


def _atheris(name: str, fn, runs: int, max_len: int) -> int:
    import atheris

    from kdump_capture.errors import KdumpError

    def one(data: bytes) -> None:
        try:
            fn(data)
        except KdumpError:
            pass

    seeds = CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"fuzz-{name}-")  # grown corpus: not committed
    argv = [
        sys.argv[0],
        work,
        str(seeds),
        f"-runs={runs}",
        f"-max_len={max_len}",
        f"-timeout={int(SECONDS)}",
        f"-rss_limit_mb={MIB + 256}",  # the interpreter itself, plus the bound
        f"-artifact_prefix={seeds}/crash-",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()  # exits the process; libFuzzer prints stat::number_of_executed_units
    return 0


def _hypothesis(name: str, fn, runs: int, max_len: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .bounded import Finding, run_bounded

    findings: list[str] = []

    @settings(
        max_examples=runs,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=max_len))
    def check(data: bytes) -> None:
        try:
            run_bounded(fn, data)
        except Finding as e:
            path = CORPUS / name / f"crash-{abs(hash(data)):x}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            findings.append(f"{path}: {e}")

    for seed in corpus_files(name):
        run_bounded(fn, seed.read_bytes())
    check()
    print("\n".join(findings))
    print(f"{name}: {runs} inputs, {len(findings)} findings")
    return 1 if findings else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.fuzz.run")
    ap.add_argument("target")
    ap.add_argument("--runs", type=int, default=100000)
    ap.add_argument("--max-len", type=int, default=1 << 16)
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    a = ap.parse_args()
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        import atheris

        # Instrument our packages for coverage: they must be imported inside this block.
        with atheris.instrument_imports(include=["kdump_capture", "transports"]):
            fn = targets()[a.target]
        return _atheris(a.target, fn, a.runs, a.max_len)
    return _hypothesis(a.target, targets()[a.target], a.runs, a.max_len)


if __name__ == "__main__":
    sys.exit(main())
