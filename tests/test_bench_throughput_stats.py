"""The throughput benchmark's statistics (bench/bench_throughput.py): medians, CPU per cycle, ratios."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench_throughput.py"
_spec = importlib.util.spec_from_file_location("bench_throughput", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_throughput"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


def _run(label: str, rate: float, cpu_pct: float, mode: str = "pinned", conc: int = 16) -> dict:
    return {
        "label": label,
        "conc": conc,
        "mode": mode,
        "rate": rate,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "p999_ms": 3.0,
        "server_cpu_pct": cpu_pct,
        "server_rss_kb": 40960,
        "cpu0_steal_pct": 1.0,
        "cpu1_steal_pct": 4.0,
        "cpu0_busy_pct": 90.0,
        "cpu1_busy_pct": 70.0,
        "loadgen_cpu_pct": 60.0,
        "err_connect": 0,
        "err_reply": 1,
        "err_other": 0,
        "timeouts": 2,
    }


@pytest.mark.parametrize(
    ("rate", "cpu_pct", "expected_us"),
    [
        (1000.0, 50.0, 500.0),  # half a core for 1,000 cycles a second: 500 us each
        (2000.0, 100.0, 500.0),
        (4000.0, 120.0, 300.0),  # two processes or threads may add up past one core
        (0.0, 50.0, math.nan),  # no cycle: no figure, not a division error
        (1000.0, -1.0, math.nan),  # the load generator could not read the server's CPU
    ],
)
def test_cpu_per_cycle(rate: float, cpu_pct: float, expected_us: float) -> None:
    got = bench.cpu_per_cycle_us(_run("registry", rate, cpu_pct))
    if math.isnan(expected_us):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected_us)


def test_summary_is_median_min_max_per_mode_row_and_concurrency() -> None:
    runs = [_run("registry", r, 50.0) for r in (900.0, 1100.0, 1000.0)]
    runs += [_run("trio", r, 50.0) for r in (2000.0, 2100.0, 1900.0)]
    runs += [_run("registry", 10.0, 50.0, mode="unpinned")]
    summary = bench.summarize(runs)
    reg = summary[("pinned", "registry", 16)]
    assert reg["runs"] == 3
    assert reg["rate"] == (1000.0, 900.0, 1100.0)
    assert reg["cpu_us"] == pytest.approx((500.0, 454.545, 555.556), rel=1e-4)
    assert reg["steal_pct"] == (4.0, 4.0, 4.0)  # the busier CPU of the two
    assert reg["others_pct"] == (50.0, 50.0, 50.0)  # 160 % busy, 50 + 60 % of it ours
    assert reg["errors"] == 9  # every kind of error, over every run
    assert summary[("unpinned", "registry", 16)]["rate"] == (10.0, 10.0, 10.0)
    assert "pinned   c=16   registry / trio: 0.50x" in bench.ratios(summary)
    row = next(line for line in bench.table(summary).splitlines() if "| trio |" in line)
    assert row.endswith("| 0.50 |")  # the registry's cycles/s over this row's


def test_the_lifted_config_is_a_valid_config() -> None:
    # The benchmark's registry refuses a bad config at start: check it here, cheaply.
    from registry import config as config_mod

    cfg = config_mod.loads(bench.LIFTED)
    assert cfg.ratelimit.per_source.per_second == 1_000_000
    assert cfg.ratelimit.errors_global.per_second == 1_000_000
