"""The daemon: listeners, nurseries, signals, graceful drain and reload.

Two nurseries, as in hypercorn's trio runner: the *accept* nursery holds the
accept loops (and other front doors) and is cancelled first on SIGTERM; the
*handler* nursery holds in-flight registrations and gets a grace deadline to
finish them before it is cancelled.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
import trio

from registry import config as config_mod
from registry import log as log_mod
from registry.admin.core.grading import Roster, load_roster
from registry.admin.http import AdminServer
from registry.admin.http import open_listeners as open_admin_listeners
from registry.admin.view import DaemonView
from registry.config import Config
from registry.defense.bans import Ban, BanList
from registry.defense.conncaps import ConnectionCaps
from registry.defense.door import SILENT, TOTAL, Admitted, Door, Refused, told_of_ban
from registry.defense.ratelimit import ReplyBudget
from registry.defense.window import WINDOW_S, SilentGuard, Window
from registry.errors import ConfigError, ProtocolError
from registry.group import WorkerSeat, report_probes
from registry.metrics import Probes
from registry.model import Code, Endpoint, Protocol, Request
from registry.net.accept import accept_loop, held_silent
from registry.net.connector import TcpConnector
from registry.net.doorway import Doorway, send_and_close
from registry.net.interfaces import is_local_address, send_to
from registry.net.kernel.banfilter import BanFilter, detach_inherited
from registry.net.kernel.reuseport import Inherited
from registry.net.listeners import (
    as_listeners,
    deferral_for_log,
    open_sockets,
    own_end,
    parse_hostport,
    sockname,
)
from registry.net.resolver import TrioResolver
from registry.net.sdnotify import Notifier
from registry.net.tcp import RawStream, TcpHandler, endpoint_of, reject_unread
from registry.net.udp import UdpEdge, budget_settings
from registry.net.waiting import Waiting, WaitingRoom
from registry.protocol.cookies import CookieJar
from registry.service import Connector, Service
from registry.store.aio import AsyncStore

log = structlog.get_logger(component="server")

# source_banned lines per log interval; the bans past them are summed up in one bans_made
# line at the interval's end (one line per ban, 4,000 bans would cost ~0.3 s of the loop)
LOGGED_BANS = 10


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
        bans=lambda limit=None: (rt.ban_filter or BanFilter([], rt.bans)).report(
            trio.current_time(), limit
        ),
    )


class Registry:
    """One registry daemon. ``await Registry(cfg).run()`` until SIGTERM/SIGINT or shutdown()."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: str | None = None,
        connector: Connector | None = None,
        handle_signals: bool = True,
        loader: Callable[[], Config] | None = None,
        seat: WorkerSeat | None = None,
    ) -> None:
        self.cfg = cfg
        self.seat = seat  # a worker of a group: sockets and admin are its supervisor's
        self.config_path = config_path
        # How SIGHUP re-reads the config: the CLI passes one that re-applies its
        # command-line overrides (--listen, --db...), which the file alone lacks.
        self.loader = loader or (lambda: config_mod.load(config_path or ""))
        self.connector = connector or TcpConnector(cfg.callback)
        self.handle_signals = handle_signals
        self.notifier = Notifier()
        self.roster = load_roster(cfg)  # ConfigError: a bad roster stops the start
        self.admission = trio.CapacityLimiter(cfg.limits.max_connections)
        self.caps = ConnectionCaps(
            cfg.limits.max_connections, cfg.limits.max_connections_per_source
        )
        self.tally = Window()  # the attack window: refusals, repeats, silent connections
        self.bans = BanList(**_ban_settings(cfg))
        self._bans_in_interval = 0  # bans made since the last door_refusals line
        self.silent = SilentGuard(
            cfg.limits.silent_drop_after, cfg.limits.silent_drop_duration, self.tally
        )
        # its sockets are set when they exist
        self.ban_filter = BanFilter([], self.bans, silent=self.silent)
        self.room: WaitingRoom | None = None
        self.service: Service | None = None  # set by run()
        # Per listener (set when they are opened): the kernel may grant
        # TCP_DEFER_ACCEPT on one family's listener and refuse it on the other's.
        self.deferral: dict[trio.SocketListener, int | None] = {}
        self.doorway = Doorway(
            cfg.limits.refusal_delay, cfg.limits.max_refusal_delay, cfg.limits.max_refusals_held
        )
        self.budget = ReplyBudget(*budget_settings(cfg))  # UDP's unproven answers

    async def run(
        self, *, task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.cfg
        if self.seat is None:
            tcp, udp = open_sockets(cfg, 1)
            mine = Inherited([g[0] for g in tcp], [g[0] for g in udp])
        else:
            mine = self.seat.sockets
        try:
            admin = parse_hostport(cfg.server.admin) if cfg.server.admin != "off" else None
            admin_listeners = await open_admin_listeners(*admin) if admin else []
        except (OSError, ValueError):
            for sock in [*mine.tcp, *mine.udp]:
                sock.close()
            raise
        listeners = as_listeners(cfg, mine.tcp, self.deferral)
        udp_socks = [trio.socket.from_stdlib_socket(s) for s in mine.udp]
        own = frozenset(sockname(lst) for lst in listeners)
        admin_own = frozenset(sockname(lst) for lst in admin_listeners)
        admin_own |= {self.seat.admin} if self.seat and self.seat.admin else set()
        async with (
            AsyncStore(
                cfg.server.db,
                # in a group the supervisor purges, once for all workers
                retention=cfg.store.retention if self.seat is None else 0,
                writer_lock=cfg.server.db + "-writer" if self.seat is not None else "",
            ) as store,
            # From before READY=1 until the drain has ended: a signal sent the moment we
            # report ready is queued, not fatal; a second one during the drain is ignored.
            _signal_receiver(self.handle_signals) as signals,
        ):
            # Always wired: the policy refuses names while allow_hostnames is off, so a
            # SIGHUP that turns names on (or off) takes effect without a restart.
            service = Service(
                cfg,
                connector=self.connector,
                recorder=store,
                resolver=TrioResolver(),
                # The admin and UDP ports are ours too: never a callback target, on any
                # address of this host (a bind probe: current, fail-closed).
                own=own | admin_own | {endpoint_of(s.getsockname()) for s in udp_socks},
                is_local=is_local_address,
            )
            self._handler = TcpHandler(service)
            self.service = service
            runtime = Runtime(
                cfg, service, self.caps, store, self.tally, self.bans, tcp=sorted(own, key=str)
            )
            runtime.roster = self.roster
            runtime.started_at = trio.current_time()
            runtime.udp = [endpoint_of(s.getsockname()) for s in udp_socks]
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as front:
                    runtime.shutdown = front.cancel_scope.cancel
                    runtime.reload = lambda: self._reload(runtime)
                    self.door = Door(self.caps, service.limiter, cfg.limits.max_refusal_delay)
                    if WaitingRoom.supported():
                        self.room = WaitingRoom(lambda: self.cfg.protocol)
                        handlers.start_soon(
                            self.room.serve,
                            handlers,
                            self._serve,
                            partial(self._reject, service),
                            self._drop,
                        )
                    accept = partial(accept_loop, name="tcp", bare=True)
                    for listener in listeners:
                        door = partial(
                            self._at_door, handlers, self.deferral.get(listener), own_end(listener)
                        )
                        front.start_soon(accept, listener, self.admission, door)
                    front.start_soon(self._report_refusals)
                    front.start_soon(self.doorway.run)
                    self.ban_filter.bind([listener.socket for listener in listeners])
                    runtime.ban_filter = self.ban_filter
                    front.start_soon(self.ban_filter.run)
                    # One cookie jar for every UDP socket: a client may reach either family.
                    cookies = CookieJar(
                        os.urandom(32), cfg.udp.cookie_window, now=trio.current_time()
                    )
                    for sock in udp_socks:  # self.cfg per datagram: a SIGHUP applies to UDP too
                        edge = UdpEdge(
                            sock,
                            service,
                            cookies,
                            lambda: self.cfg,
                            caps=self.caps,
                            admission=self.admission,
                            budget=self.budget,
                            dropped=runtime.udp_dropped,
                        )
                        front.start_soon(edge.serve, handlers)
                    if admin_listeners:
                        # In `front`: the admin endpoint closes when the drain starts
                        # (its event streams would otherwise hold the drain open).
                        runtime.admin = min(admin_own, key=str)
                        await front.start(AdminServer(daemon_view(runtime)).serve, admin_listeners)
                    if signals is not None:
                        front.start_soon(self._signals, runtime, signals)
                    if self.seat is not None:  # a worker: its state to the supervisor
                        view = daemon_view(runtime)
                        front.start_soon(report_probes, self.notifier, view.probes, view.bans)
                    if self.notifier.watchdog_interval:
                        front.start_soon(self.notifier.run_watchdog)
                    log.info(
                        "listening" if self.seat is None else "worker_ready",
                        tcp=[str(e) for e in runtime.tcp],
                        udp=[str(e) for e in runtime.udp],
                        send_to=send_to(runtime.tcp),
                        admin=str(runtime.admin) if runtime.admin else "off",
                        db=cfg.server.db,
                        policy=cfg.policy.mode,
                        # what the kernel does (None: no TCP_DEFER_ACCEPT on this system)
                        defer_accept_s=deferral_for_log(self.deferral, listeners),
                        ban_filter=self.ban_filter.kind,  # ebpf, or classic (~2,000 bans)
                    )
                    self.notifier.ready(f"listening on {', '.join(map(str, runtime.tcp))}")
                    task_status.started(runtime)
                runtime.draining = True
                if self.room is not None:
                    self.room.close()  # it drains like the handlers, under the grace period
                self._log_refusals()  # the last window, before "draining" and "stopped"
                self.notifier.stopping()
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                grace = self.cfg.server.grace_period  # self.cfg: a SIGHUP may have changed it
                log.info("draining", grace_s=grace, in_flight=self.caps.total)
                handlers.cancel_scope.deadline = trio.current_time() + grace
            if handlers.cancel_scope.cancelled_caught:
                log.warning("grace_period_expired", grace_s=grace)
            for sock in udp_socks:  # only now: in-flight UDP registrations reply on them
                sock.close()
        log.info("stopped", outcomes={k.value: v for k, v in service.outcomes.items()})

    def _at_door(
        self,
        handlers: trio.Nursery,
        deferral: int | None,
        local: Endpoint | None,
        conn: socket.SocketType,
        addr: object,
        token: object,
    ) -> None:
        """Every accepted registration connection, synchronously: refuse it here or start its task."""
        try:
            peer = endpoint_of(addr)  # type: ignore[arg-type]
        except (ValueError, TypeError, IndexError):  # no usable peer address: nothing to serve
            conn.close()
            self.admission.release_on_behalf_of(token)
            return
        detach_inherited(conn)  # the listener's filter is for handshakes only
        now = trio.current_time()
        held = deferral if deferral and held_silent(conn) else 0
        if held and held >= self.cfg.protocol.read_deadline:
            decision: Admitted | Refused = self.door.silent(peer.host, held)
            self._note_silent(now, 1)
        else:
            decision = self.door.arrive(peer.host, now)
        if isinstance(decision, Refused):
            self.admission.release_on_behalf_of(token)
            repeat = self.tally.add(decision.key, decision.reason)
            # A source refused again waits longer; a silent one has waited out the kernel
            # already, and its next connection waits there again: answered at once.
            delay = 0.0 if decision.reason == SILENT else self.doorway.delay_for(repeat)
            outcome = decision.outcome
            if decision.reason != TOTAL:  # a full registry is nobody's fault
                ban = self._consider_ban(decision, repeat, now)
                if ban is not None and self.ban_filter.drops_new_bans:
                    outcome = told_of_ban(outcome, ban.until - now)
            self.doorway.refuse(conn, outcome, now, delay)
            return
        # The kernel's wait counts in the read deadline: it is the time since connect.
        waiting = Waiting(conn, peer, decision.key, token, now - held, local=local)
        if self.room is not None:
            self.room.add(waiting)  # its task starts once its request is complete
        else:
            handlers.start_soon(self._serve, waiting, None)

    def _note_silent(self, now: float, n: int) -> None:
        """``n`` connections sent nothing before their read deadline (registry/defense/window.py)."""
        if self.silent.note(now, n):
            self.ban_filter.poke()  # the filter starts dropping bare ACKs

    def _consider_ban(self, decision: Refused, repeat: int, now: float) -> Ban | None:
        ban = self.bans.consider(decision.key, repeat, now, decision.owed)
        if ban is None:
            return None
        self.ban_filter.poke()
        self._bans_in_interval += 1
        if self._bans_in_interval > LOGGED_BANS:
            return ban  # counted: _log_refusals sums them up
        log.warning(
            "source_banned",
            source=str(ban.network),
            reason=decision.reason,
            refusals=repeat,
            seconds=round(ban.until - ban.since, 1),
            banned=len(self.bans),
            kernel_filter=self.ban_filter.available,  # False: listed, not dropped
        )
        return ban

    async def _serve(self, w: Waiting, request: tuple[Protocol, Request] | None) -> None:
        try:
            await self._handler(
                RawStream(w.conn),
                w.peer,
                source_paid=True,
                arrived=w.arrived,
                received_at=w.received_at,
                request=request,
                conn_id=w.conn_id,
                local=w.local,
                shielded=request is not None,  # read by the room: in its shielded nursery
            )
        finally:
            self._leave(w)

    async def _reject(self, service: Service, batch: list[tuple[Waiting, ProtocolError]]) -> None:
        """Requests the waiting room refused: recorded together, then answered."""
        silent = sum(1 for w, e in batch if e.code is Code.READ_TIMEOUT and not w.reader.started)
        self._note_silent(trio.current_time(), silent)
        replies = await reject_unread(
            service,
            [(error, w.peer, w.reader.protocol, w.received_at, w.conn_id) for w, error in batch],
        )
        for (w, _), reply in zip(batch, replies, strict=True):
            send_and_close(w.conn, reply)
            self._leave(w)

    def _drop(self, w: Waiting) -> None:
        w.conn.close()
        self._leave(w)

    def _leave(self, w: Waiting) -> None:
        self.door.leave(w.key)
        self.admission.release_on_behalf_of(w.token)

    async def _report_refusals(self) -> None:
        """One log line per interval for everything the door refused (never one per connection)."""
        while True:
            await trio.sleep(WINDOW_S)
            self._log_refusals()

    def _log_refusals(self) -> None:
        summary = self.tally.flush()
        if summary is not None:
            log.warning("door_refusals", **summary)
        errors = self.service.take_unlogged() if self.service is not None else {}
        if errors:
            log.warning(
                "errors_not_logged",  # recorded (rows, ids), but under pressure not one line each
                total=sum(errors.values()),
                by_code=errors,
            )
        unlogged = self._bans_in_interval - LOGGED_BANS
        if unlogged > 0:
            log.warning(
                "bans_made",
                unlogged=unlogged,  # bans past the first LOGGED_BANS source_banned lines
                total=self._bans_in_interval,
                banned=len(self.bans),
                kernel_filtered=self.ban_filter.filtered,
            )
        self._bans_in_interval = 0

    async def _signals(self, runtime: Runtime, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                runtime.reload()
            else:
                log.info("signal", signal=signal.Signals(signum).name)
                runtime.shutdown()
                return

    def _reload(self, runtime: Runtime) -> None:
        if not self.config_path:
            log.warning("reload_skipped", reason="no --config file was given")
            return
        self.notifier.reloading()
        try:
            new = self.loader()
            config_mod.auth_secret(new)  # an unreadable secret_file is a bad config too
            roster = load_roster(new)  # and so is a bad roster
        except ConfigError as e:
            log.error("reload_failed", path=self.config_path, problems=e.problems)
            self.notifier.ready("reload failed; old config kept")
            return
        # Keep what is really in force, so runtime.config never claims otherwise.
        new, moved = config_mod.keep_bound(self.cfg, new)
        if moved:
            log.warning("reload_needs_restart", keys=[f"server.{k}" for k in moved])
        if new.log != self.cfg.log:
            log_mod.configure(new.log.format, new.log.level)
        if isinstance(self.connector, TcpConnector):
            self.connector.config = new.callback  # timeouts and greeting apply to new callbacks
        self.cfg = new
        runtime.config = new
        self.roster = runtime.roster = roster
        runtime.service.reconfigure(new)
        self.admission.total_tokens = new.limits.max_connections
        self.caps.reconfigure(new.limits.max_connections, new.limits.max_connections_per_source)
        self.door.longest_hold = new.limits.max_refusal_delay
        self.doorway.reconfigure(
            new.limits.refusal_delay, new.limits.max_refusal_delay, new.limits.max_refusals_held
        )
        self.silent.reconfigure(
            new.limits.silent_drop_after, new.limits.silent_drop_duration, trio.current_time()
        )
        self.ban_filter.report_lifted(self.bans.reconfigure(**_ban_settings(new)), reason="reload")
        self.ban_filter.poke()  # the silent drop, or bans, may have changed
        self.budget.configure(*budget_settings(new))
        log.info("reloaded", path=self.config_path)
        self.notifier.ready("config reloaded")


@asynccontextmanager
async def _signal_receiver(wanted: bool) -> AsyncIterator[AsyncIterator[int] | None]:
    if not wanted:
        yield None
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        yield signals


def _ban_settings(cfg: Config) -> dict[str, Any]:
    lim = cfg.limits
    return {
        "after": lim.ban_after,
        "duration": lim.ban_duration,
        "max_entries": lim.max_bans,
        "exempt": [cidr.network for cidr in lim.ban_exempt_networks],
        "ignored_after": lim.ban_after_ignored,
        "spread": lim.ban_spread,
    }
