"""Prometheus metrics for the admin endpoint's ``/metrics``, in their own
``CollectorRegistry`` (never the process-global one: tests run several registries
in one process, and nothing a library registers globally leaks in).

Event metrics are fed by ``Metrics.observe`` (a ``Service.observers`` callback,
once per recorded registration); state metrics are read from ``Probes`` at
scrape time, so they can never go stale. Names carry the ``registry_`` prefix;
times are in seconds.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from registry.store import Record

# A loopback callback takes well under a millisecond; one across a campus
# network tens of ms; connect_timeout defaults to 3 s.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A registration lasts as long as its callback (connect + verify timeouts).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def package_version() -> str:
    """The installed callback-lab version ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version("callback-lab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Probes:
    """Zero-argument readers of live state, called at every scrape."""

    open_connections: Callable[[], int] = lambda: 0
    callbacks_in_flight: Callable[[], int] = lambda: 0
    callbacks_waiting: Callable[[], int] = lambda: 0
    limiter_entries: Callable[[], int] = lambda: 0
    door_refusals: Callable[[], dict[str, int]] = dict
    udp_dropped: Callable[[], dict[str, int]] = dict
    bans_active: Callable[[], int] = lambda: 0
    bans_total: Callable[[], int] = lambda: 0
    silent_drop: Callable[[], bool] = lambda: False
    event_clients: Callable[[], int] = lambda: 0
    draining: Callable[[], bool] = lambda: False
    policy_mode: Callable[[], str] = lambda: ""


class _StateCollector(Collector):
    """Gauges and the info metric, computed from the probes at scrape time."""

    def __init__(self, probes: Probes, version: str) -> None:
        self.probes = probes
        self.version = version

    def collect(self) -> Iterator[Metric]:
        p = self.probes
        gauges = (
            ("open_connections", "Registration connections open now", p.open_connections),
            ("callbacks_in_flight", "Callbacks dialling or waiting for the nonce echo now", p.callbacks_in_flight),
            ("callbacks_waiting", "Admitted callbacks queued for a dialling slot", p.callbacks_waiting),
            ("ratelimit_entries", "Keys held across the rate limiter's tables", p.limiter_entries),
            ("banned_sources", "Sources banned now (SYNs dropped)", p.bans_active),
            ("silent_drop", "1 while the kernel drops silent handshakes (the profile's silent_drop_after)", p.silent_drop),
            ("event_clients", "Admin /api/events streams open now", p.event_clients),
            ("draining", "1 while the registry drains for shutdown", p.draining),
        )  # fmt: skip
        for name, doc, probe in gauges:
            yield GaugeMetricFamily(f"registry_{name}", doc, value=float(probe()))
        for name, doc, probe in (
            ("door_refusals", "Connections refused on arrival, before any request was read (not registrations)", p.door_refusals),
            ("udp_dropped", "UDP datagrams dropped unanswered: replies, callbacks or echoes (a loop), privileged source ports, or past the unproven-reply budget", p.udp_dropped),
        ):  # fmt: skip
            family = CounterMetricFamily(f"registry_{name}", doc, labels=("reason",))
            for reason, count in sorted(probe().items()):
                family.add_metric((reason,), float(count))
            yield family
        yield CounterMetricFamily(
            "registry_bans",
            "Sources banned for being refused the profile's ban_after times within 10 s",
            value=float(p.bans_total()),
        )
        yield InfoMetricFamily(
            "registry",
            "Version and policy mode of this registry",
            value={"version": self.version, "policy_mode": p.policy_mode()},
        )


class Metrics:
    """The registry's metrics in their own CollectorRegistry.

    ``metrics.observe`` is a ``Service.observers`` callback; ``render()`` is the
    ``/metrics`` body (Prometheus text format 0.0.4).
    """

    def __init__(
        self, probes: Probes | None = None, *, version: str | None = None, process: bool = True
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registrations = Counter(
            "registry_registrations",
            "Recorded registrations by outcome",
            ("status", "code", "protocol"),
            registry=self.registry,
        )
        self.callback_rtt = Histogram(
            "registry_callback_rtt_seconds",
            "Time to connect back to the student's server (successful TCP connects)",
            buckets=RTT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "registry_registration_duration_seconds",
            "Time from request parsed to outcome recorded",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # labels() takes a lock and checks its arguments each call: each child is
        # looked up once, kept by (status, code, protocol), a few dozen at most
        # (-8,000 instructions per registration).
        self._counts: dict[tuple[str, str, str], Counter] = {}
        self.registry.register(_StateCollector(probes or Probes(), version or package_version()))
        if process:
            # process_* (fds, memory, cpu): cheap, and the fd count is what EMFILE watches.
            ProcessCollector(registry=self.registry)

    def observe(self, record: Record) -> None:
        """Count one recorded registration (a Service observer: quick, never raises)."""
        key = (record.status, record.code, record.protocol)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.registrations.labels(*key)
        count.inc()
        if record.rtt_ms is not None:
            self.callback_rtt.observe(record.rtt_ms / 1000.0)
        if record.duration_ms is not None:
            self.duration.observe(record.duration_ms / 1000.0)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for a scrape: Prometheus text, or OpenMetrics when the
        scraper's ``Accept`` header asks for it (prometheus_client's negotiation)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


__all__ = ["Metrics", "Probes", "package_version"]
