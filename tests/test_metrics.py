"""Metrics.observe, the request-path side of /metrics (the scrape itself: test_admin.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from registry.metrics import RTT_BUCKETS, Metrics, _Histogram
from tests.support import stored


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_each_outcome_under_its_own_labels() -> None:
    """observe() keeps each labelled child: repeats add up, other labels stay apart."""
    metrics = Metrics(process=False)
    for n, (status, code, protocol) in enumerate(
        [("OK", "connected", "text")] * 3
        + [("OK", "connected", "json"), ("BUSY", "overloaded", "text")]
    ):
        metrics.observe(stored(n, status=status, code=code, protocol=protocol))
    got = samples(metrics.render()[0].decode())
    key = "registry_registrations_total"
    assert got[(key, (("code", "connected"), ("protocol", "text"), ("status", "OK")))] == 3
    assert got[(key, (("code", "connected"), ("protocol", "json"), ("status", "OK")))] == 1
    assert got[(key, (("code", "overloaded"), ("protocol", "text"), ("status", "BUSY")))] == 1


def test_metrics_histograms_bucket_as_prometheus_client_does() -> None:
    """Our request-path histogram and prometheus_client's agree, bounds included."""
    theirs = Histogram("h", "doc", buckets=RTT_BUCKETS, registry=CollectorRegistry())
    ours = _Histogram("h", "doc", RTT_BUCKETS)
    for amount in (0.0, 0.0005, 0.0006, 0.001, 5.0, 5.01, 1e9, *RTT_BUCKETS):
        theirs.observe(amount)
        ours.observe(amount)

    def values(metric: object) -> list[tuple[str, dict[str, str], float]]:
        found = metric.samples  # type: ignore[attr-defined]
        return [(s.name, s.labels, s.value) for s in found if not s.name.endswith("_created")]

    assert values(next(iter(ours.collect()))) == values(next(iter(theirs.collect())))
