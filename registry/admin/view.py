"""The narrow view of a running registry that the admin endpoint is given.

The server builds one ``DaemonView`` (``registry.server.daemon_view``) from
its runtime; the admin side reads live state only through these callables,
so it never needs the server's classes and the import runs one way:
server -> admin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from registry.admin.core.grading import Roster
from registry.config import Config
from registry.metrics import Probes
from registry.model import Endpoint
from registry.store import Record
from registry.store.aio import AsyncStore


@dataclass(frozen=True, slots=True)
class DaemonView:
    store: AsyncStore  # read only: query, summary, count_by_status
    config: Callable[[], Config]  # the config in force (a SIGHUP replaces it)
    roster: Callable[[], Roster | None]  # the class roster in force, if any
    probes: Probes  # live gauges for /metrics (event_clients is the admin's own), draining
    subscribe: Callable[[Callable[[Record], None]], None]  # called per recorded registration
    listening: Callable[[], Sequence[Endpoint]]  # registration endpoints (may be wildcards)
    bans: Callable[..., dict[str, Any]]  # the /api/bans body (BanFilter.report), limit=N
