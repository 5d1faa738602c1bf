"""What a running registry exposes to tests and to the admin endpoint."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.admin.core.grading import Roster
from registry.admin.view import DaemonView
from registry.config import Config
from registry.defense.bans import BanList
from registry.defense.conncaps import ConnectionCaps
from registry.defense.window import Window
from registry.metrics import Probes
from registry.model import Endpoint
from registry.net.kernel.banfilter import BanFilter
from registry.service import Service
from registry.store.aio import AsyncStore


@dataclass
class Runtime:
    """What a running registry exposes to tests and to the admin endpoint."""

    config: Config
    service: Service
    caps: ConnectionCaps
    store: AsyncStore
    tally: Window = field(default_factory=Window)
    bans: BanList = field(default_factory=lambda: BanList(0, 60.0, 1))
    ban_filter: BanFilter | None = None
    tcp: list[Endpoint] = field(default_factory=list)
    udp: list[Endpoint] = field(default_factory=list)
    # UDP datagrams dropped unanswered, by loopguard.DropReason (a metric's counters)
    udp_dropped: Counter[str] = field(default_factory=Counter)
    admin: Endpoint | None = None
    roster: Roster | None = None  # [class] roster, reloaded with the config
    started_at: float = 0.0
    draining: bool = False
    shutdown: Callable[[], None] = lambda: None
    reload: Callable[[], None] = lambda: None


def daemon_view(rt: Runtime) -> DaemonView:
    """What the admin endpoint may see of a running registry (registry/admin/view.py)."""
    return DaemonView(
        store=rt.store,
        config=lambda: rt.config,
        roster=lambda: rt.roster,
        probes=Probes(
            open_connections=lambda: rt.caps.total,
            callbacks_in_flight=lambda: rt.service.slots.in_flight,
            callbacks_waiting=lambda: rt.service.slots.waiting,
            limiter_entries=lambda: rt.service.limiter.entries,
            door_refusals=lambda: rt.tally.totals,
            udp_dropped=lambda: dict(rt.udp_dropped),
            bans_active=lambda: len(rt.bans),
            bans_total=lambda: rt.bans.total,
            silent_drop=lambda: rt.ban_filter is not None and rt.ban_filter.dropping_now,
            draining=lambda: rt.draining,
            policy_mode=lambda: rt.config.policy.mode,
        ),
        subscribe=rt.service.observers.append,
        listening=lambda: rt.tcp,
        bans=rt.bans,
        ban_filter=lambda: rt.ban_filter,
    )
