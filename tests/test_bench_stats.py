"""The attack benchmark's statistics: what docs/benchmarks.md reports comes from these."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench_attack.py"
_spec = importlib.util.spec_from_file_location("bench_attack", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_attack"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


def _row(latencies_ms: list[float], reference_ms: list[float], scenario: str = "x") -> object:
    lat = sorted(t / 1000 for t in latencies_ms)
    ref = sorted(t / 1000 for t in reference_ms)
    return bench.Row(
        server="registry",
        scenario=scenario,
        cycles=len(lat),
        success=1.0,
        p50_ms=bench.percentile(lat, 50) * 1000,
        p99_ms=bench.percentile(lat, 99) * 1000,
        p999_ms=bench.percentile(lat, 99.9) * 1000,
        rss_peak_mb=40.0,
        rss_start_mb=40.0,
        rss_end_mb=40.0,
        server_cpu=20.0,
        foreign_cpu=0.0,
        failures={},
        attack={},
        reference_ms=bench.percentile(ref, 99) * 1000,
        latencies=lat,
        reference_latencies=ref,
    )


@pytest.mark.parametrize(
    ("q", "expected"), [(50, 50.0), (99, 99.0), (99.9, 100.0), (100, 100.0), (0.5, 1.0)]
)
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    assert bench.percentile([float(n) for n in range(1, 101)], q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(bench.percentile([], 99))


def test_the_pooled_ratio_takes_the_p99_of_all_cycles_together() -> None:
    # Two runs of 100 cycles. Run A's slowest cycle is a 50 ms burst, run B is flat.
    # Each run's own p99 is its 99th cycle (2 ms): both ratios 1.0. Pooled, the
    # 200 cycles' p99 is the 198th: still 2 ms against the references' 1 ms.
    a = _row([2.0] * 99 + [50.0], [1.0] * 100)
    b = _row([2.0] * 100, [1.0] * 100)
    assert bench.pooled_ratio([a, b]) == pytest.approx(2.0)
    # Three slow cycles in one run are over 1 % of that run but only 1.5 % of the
    # pool: the pooled p99 (the 198th of 200) falls on one of them.
    c = _row([2.0] * 97 + [40.0] * 3, [1.0] * 100)
    assert bench.pooled_ratio([c, b]) == pytest.approx(40.0)
    assert bench.pooled_ratio([c, b, b, b]) == pytest.approx(2.0)  # 3 in 400: under 1 %


def test_the_pooled_ratio_needs_both_sides() -> None:
    assert math.isnan(bench.pooled_ratio([_row([1.0], [])]))


def test_the_table_shows_a_pooled_ratio_only_over_several_runs() -> None:
    one = _row([2.0] * 100, [1.0] * 100)
    one.ratio_runs = [2.0]
    assert "pooled" not in bench.table([one])
    two = _row([2.0] * 100, [1.0] * 100)
    two.ratio_runs = [1.5, 2.0]
    two.pooled_ratio = 1.75
    line = bench.table([two]).splitlines()[-1]
    assert "(ratios 1.5 / 2.0) (pooled 1.75)" in line
