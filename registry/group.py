"""``server.workers = N``: a supervisor and N registry processes on shared ports.

The supervisor (the ``registry serve`` the operator started) opens every
registration socket as a reuseport group (net/listeners.py: a source always
reaches the same socket) and the database (migrations run once), then starts N
workers: the same executable, told by ``REGISTRY_WORKER`` which inherited
descriptors are theirs. Each is a whole ``Registry`` on its share, admin off,
enforcing 1/N of every limit counted over all sources (``split_limits``). The
supervisor serves the one admin endpoint: rows from the database
(``Store.after``), gauges and bans from the snapshot each worker sends every
second on its sd_notify socket (``X_PROBES=``). Signals, sd_notify and restarts:
docs/architecture.md, "Workers".
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import trio

from registry.config import Config, keep_bound
from registry.metrics import Probes
from registry.model import Endpoint, Rate
from registry.net.interfaces import send_to
from registry.net.kernel.reuseport import Inherited, attach_steering
from registry.net.listeners import open_sockets, parse_hostport
from registry.net.sdnotify import Notifier
from registry.net.tcp import endpoint_of
from registry.store import Record

log = structlog.get_logger(component="group")

WORKER_ENV = "REGISTRY_WORKER"  # "INDEX/N PARENT_PID TCP_FDS UDP_FDS ADMIN"
PROBE_INTERVAL_S = 1.0
POLL_INTERVAL_S = 0.2  # how often the supervisor reads new rows for metrics and events
QUICK_S = 60.0  # a worker dead sooner after its start waits before its restart...
MAX_DELAY_S = 60.0  # ...1, 2, 4... s, up to this (a config file broken since the start)
READY_TIMEOUT_S = 30.0
# Bans per worker snapshot (its counts are whole). Built every second in the worker's
# loop: 1,000 of 2,500 bans cost ~7 ms a second, a step in every student's p99 under
# a ban wave (docs/benchmarks.md); 100 cost ~0.3 ms.
BANS_SENT = 100


def resolved_workers(cfg: Config) -> int:
    """``server.workers``, 0 meaning one per core this process may run on (at most 64,
    the key's own maximum: each worker holds 1/N of the global limits)."""
    if cfg.server.workers:
        return cfg.server.workers
    try:
        return min(len(os.sched_getaffinity(0)), 64)
    except AttributeError:  # not Linux
        return min(os.cpu_count() or 1, 64)


def _share(value: int, n: int) -> int:
    return max(1, math.ceil(value / n)) if value > 0 else value  # 0 stays "off"


def _rate(rate: Rate, n: int) -> Rate:
    return Rate(_share(rate.count, n), rate.period)


def split_limits(cfg: Config, n: int) -> Config:
    """A worker's config: every limit counted over all sources divided by ``n``
    (rounded up), per-source limits whole (a source reaches one worker), admin off."""
    rl, lim, udp = cfg.ratelimit, cfg.limits, cfg.udp
    return msgspec.structs.replace(
        cfg,
        server=msgspec.structs.replace(cfg.server, admin="off"),
        ratelimit=msgspec.structs.replace(
            rl,
            global_=_rate(rl.global_, n),
            errors_global=_rate(rl.errors_global, n),
            max_entries=_share(rl.max_entries, n),
        ),
        limits=msgspec.structs.replace(
            lim,
            max_connections=max(_share(lim.max_connections, n), lim.max_connections_per_source),
            max_callbacks_in_flight=_share(lim.max_callbacks_in_flight, n),
            max_callback_queue=_share(lim.max_callback_queue, n),
            max_refusals_held=_share(lim.max_refusals_held, n),
            silent_drop_after=_share(lim.silent_drop_after, n),
        ),
        udp=msgspec.structs.replace(udp, unproven_global=_rate(udp.unproven_global, n)),
    )


def restart_delay(previous: float, lived: float) -> float:
    """The wait before restarting a worker that died ``lived`` s after a start that
    itself waited ``previous`` s: none after a long life, else 1, 2, 4... s."""
    return 0.0 if lived >= QUICK_S else min(max(2 * previous, 1.0), MAX_DELAY_S)


# --- the worker's side -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSeat:
    index: int
    count: int
    sockets: Inherited
    admin: Endpoint | None  # the supervisor's: never a callback target either


def worker_seat(environ: dict[str, str] | None = None) -> WorkerSeat | None:
    """This process's place in a group (None: not a worker). Starts the orphan watch."""
    env = os.environ if environ is None else environ
    spec = env.get(WORKER_ENV)
    if not spec:
        return None
    where, parent, tcp, udp, admin = (spec.split(" ") + ["", "", "", ""])[:5]
    index, count = (int(x) for x in where.split("/"))

    def adopt(fds: str) -> list[socket.socket]:
        return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]

    if environ is None:
        _watch_parent(int(parent))
        structlog.contextvars.bind_contextvars(worker=index)
    at = endpoint_of(parse_hostport(admin)) if admin else None
    return WorkerSeat(index, count, Inherited(adopt(tcp), adopt(udp)), at)


def whole_lines() -> None:
    """stderr written one whole line per write(): lines of the group's processes
    sharing it never interleave (print() writes a line and its newline apart)."""
    raw = open(2, "wb", buffering=1 << 16, closefd=False)  # noqa: SIM115 (lives as stderr)
    sys.stderr = io.TextIOWrapper(
        raw, encoding="utf-8", errors="backslashreplace", line_buffering=True
    )


def _watch_parent(parent: int) -> None:
    """Drain (SIGTERM to ourselves) if the supervisor is gone: no orphaned workers."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_GAUGES = ("open_connections", "callbacks_in_flight", "callbacks_waiting", "limiter_entries")


async def report_probes(
    notifier: Notifier, probes: Probes, bans: Callable[[int], dict[str, Any]]
) -> None:
    """A worker's gauges and bans to its supervisor, every PROBE_INTERVAL_S."""
    while True:
        snapshot: dict[str, Any] = {name: getattr(probes, name)() for name in _GAUGES}
        snapshot["door_refusals"] = probes.door_refusals()
        snapshot["udp_dropped"] = probes.udp_dropped()
        snapshot["bans"] = report = bans(BANS_SENT)
        report["bans"] = report["bans"][:BANS_SENT]
        notifier.notify("X_PROBES=" + json.dumps(snapshot, separators=(",", ":")))
        await trio.sleep(PROBE_INTERVAL_S)


# --- the supervisor's side -------------------------------------------------------------


def merged_bans(reports: Sequence[tuple[float, dict[str, Any]]], after: int) -> dict[str, Any]:
    """One ``/api/bans`` body (BanFilter.report) from ``(age in s, report)`` per worker;
    ``after``: the group's silent-drop threshold."""
    out: dict[str, Any] = {"banned": 0, "kernel_filtered": 0, "kernel_filter": None, "total": 0}
    out |= {"skipped_list_full": 0, "ban_after": 0, "bans": []}
    silent = {"active": False, "seconds_left": 0.0, "after": after}
    for age, r in reports:
        for key in ("banned", "kernel_filtered", "total", "skipped_list_full"):
            out[key] += r[key]
        out["kernel_filter"] = out["kernel_filter"] or r["kernel_filter"]
        out["ban_after"] = r["ban_after"]
        silent["active"] = silent["active"] or r["silent_drop"]["active"]
        left = round(max(0.0, r["silent_drop"]["seconds_left"] - age), 1)
        silent["seconds_left"] = max(silent["seconds_left"], left)
        out["bans"] += [
            b | {"banned_for_s": round(b["banned_for_s"] + age, 1), "seconds_left": rest}
            for b in r["bans"]
            if (rest := round(b["seconds_left"] - age, 1)) > 0
        ]
    out["bans"].sort(key=lambda b: -b["banned_for_s"])  # oldest first
    return out | {"silent_drop": silent}


def summed_probes(
    snapshots: dict[int, dict[str, Any]], draining: Callable[[], bool], mode: Callable[[], str]
) -> Probes:
    """Probes over the latest snapshot of every worker."""

    def total(name: str, part: str = "") -> Callable[[], int]:
        return lambda: sum(int(s[part][name] if part else s[name]) for s in _of(snapshots))

    def merged(name: str) -> Callable[[], dict[str, int]]:
        def read() -> dict[str, int]:
            out: Counter[str] = Counter()
            for s in _of(snapshots):
                out.update(s[name])
            return dict(out)

        return read

    return Probes(
        **{name: total(name) for name in _GAUGES},
        bans_active=total("banned", "bans"),
        bans_total=total("total", "bans"),
        silent_drop=lambda: any(s["bans"]["silent_drop"]["active"] for s in _of(snapshots)),
        door_refusals=merged("door_refusals"),
        udp_dropped=merged("udp_dropped"),
        draining=draining,
        policy_mode=mode,
    )


def _of(snapshots: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return list(snapshots.values())  # a copy: a worker's new snapshot may replace one


@dataclass
class _Worker:
    index: int
    process: trio.Process | None = None
    started: float = 0.0
    ready: trio.Event = field(default_factory=trio.Event)
    ever_ready: bool = False
    restarts: int = 0
    delay: float = 0.0  # before its latest start


class GroupFailed(Exception):
    """A worker exited before it was ever ready: the group stops with its status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"a worker exited with status {status} before it was ready")
        self.status = status


class Supervisor:
    """``await Supervisor(cfg, n, argv, ...).run()``: the group until SIGTERM/SIGINT."""

    def __init__(
        self,
        cfg: Config,
        n: int,
        argv: Sequence[str],
        *,
        config_path: str | None = None,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        self.n = n
        self.argv = list(argv)
        self.config_path = config_path
        self.loader = loader
        self.notifier = Notifier()
        self.workers = [_Worker(i) for i in range(n)]
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.observers: list[Callable[[Record], None]] = []
        self.stopping = False
        self.groups: list[list[socket.socket]] = []  # tcp and udp, held for the whole run
        self.failed: GroupFailed | None = None
        self.admin: Endpoint | None = None
        self.spawn = trio.lowlevel.open_process  # a test's fake processes

    async def run(self) -> None:
        from registry.admin.core.grading import load_roster
        from registry.admin.http import AdminServer
        from registry.admin.http import open_listeners as open_admin_listeners
        from registry.admin.view import DaemonView
        from registry.store.aio import AsyncStore

        self.roster = load_roster(self.cfg)
        tcp, udp = open_sockets(self.cfg, self.n)
        self.groups = tcp + udp
        listening = [endpoint_of(g[0].getsockname()) for g in tcp]
        workdir = tempfile.mkdtemp(prefix="registry-group-")
        admin_listeners: list[trio.SocketListener] = []
        try:
            if self.cfg.server.admin != "off":
                admin_listeners = await open_admin_listeners(*parse_hostport(self.cfg.server.admin))
                self.admin = endpoint_of(admin_listeners[0].socket.getsockname())
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async with (
                    # migrated here, once; read and purged here; written by the workers
                    AsyncStore(
                        self.cfg.server.db,
                        retention=self.cfg.store.retention,
                        writer_lock=self.cfg.server.db + "-writer",
                    ) as store,
                    trio.open_nursery() as nursery,
                ):
                    for w in self.workers:
                        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                        await sock.bind(os.path.join(workdir, str(w.index)))
                        nursery.start_soon(self._notices, w, sock)
                    # from now on: the rows of this run
                    nursery.start_soon(self._poll, store, await store.last_seq())
                    for w in self.workers:
                        nursery.start_soon(self._keep, w, tcp, udp, workdir, nursery.cancel_scope)
                    with trio.move_on_after(READY_TIMEOUT_S) as waited:
                        for w in self.workers:
                            await w.ready.wait()
                    if waited.cancelled_caught:
                        log.error("workers_not_ready", seconds=READY_TIMEOUT_S)
                        self._fail(1, nursery.cancel_scope)
                        return
                    if admin_listeners:
                        view = DaemonView(
                            store=store,
                            config=lambda: self.cfg,
                            roster=lambda: self.roster,
                            probes=summed_probes(
                                self.snapshots, lambda: self.stopping, lambda: self.cfg.policy.mode
                            ),
                            subscribe=self.observers.append,
                            listening=lambda: listening,
                            bans=self._bans,
                        )
                        await nursery.start(AdminServer(view).serve, admin_listeners)
                    if self.notifier.watchdog_interval:
                        nursery.start_soon(self.notifier.run_watchdog)
                    log.info(
                        "listening",
                        tcp=[str(e) for e in listening],
                        udp=[str(endpoint_of(g[0].getsockname())) for g in udp],
                        send_to=send_to(listening),
                        admin=str(self.admin or "off"),
                        db=self.cfg.server.db,
                        policy=self.cfg.policy.mode,
                        workers=self.n,
                    )
                    self.notifier.ready(
                        f"listening on {', '.join(map(str, listening))}, {self.n} workers"
                    )
                    await self._signals(sigs, nursery.cancel_scope)
        finally:
            for sock in [s for g in self.groups for s in g]:
                sock.close()
            shutil.rmtree(workdir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.server.db + "-writer")  # the workers' writer_lock
        if self.failed is not None:
            raise self.failed
        log.info("stopped", workers=self.n)

    def _bans(self) -> dict[str, Any]:
        now = trio.current_time()
        reports = [(now - s["at"], s["bans"]) for s in _of(self.snapshots)]
        return merged_bans(reports, self.cfg.limits.silent_drop_after)

    def _fail(self, status: int, scope: trio.CancelScope) -> None:
        self.failed = GroupFailed(status)
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        scope.cancel()

    async def _signals(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self._reload()
                continue
            log.info("signal", signal=signal.Signals(signum).name)
            self.stopping = True
            self.notifier.stopping()
            self._signal_all(signal.SIGTERM)
            with trio.move_on_after(self.cfg.server.grace_period + 10.0):
                for w in self.workers:
                    if w.process is not None:
                        await w.process.wait()
            self._signal_all(signal.SIGKILL)  # a worker still there past its grace period
            scope.cancel()
            return

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                w.process.send_signal(sig)

    async def _reload(self) -> None:
        from registry.admin.core.grading import load_roster
        from registry.errors import ConfigError

        self.notifier.reloading()
        if self.config_path and self.loader is not None:
            try:
                new = self.loader()
                self.roster = load_roster(new)
                prefix = new.ratelimit.ipv6_prefix
                if prefix != self.cfg.ratelimit.ipv6_prefix:  # the workers key sources anew
                    for group in self.groups:
                        attach_steering(group[0], self.n, prefix)
                self.cfg = keep_bound(self.cfg, new)[0]  # each worker warns of a change
            except ConfigError as e:  # each worker logs reload_failed too, and keeps its config
                log.error("reload_failed", path=self.config_path, problems=e.problems)
        # Only workers that are up: one still starting has no SIGHUP handler yet (the
        # signal would kill it) and reads the new config file when it starts anyway.
        live = [w for w in self.workers if w.ready.is_set() and w.process is not None]
        for w in live:
            w.ready = trio.Event()
            if w.process is not None and w.process.returncode is None:
                w.process.send_signal(signal.SIGHUP)
        with trio.move_on_after(READY_TIMEOUT_S):
            for w in live:
                await w.ready.wait()
        log.info("group_reloaded", workers=self.n)
        self.notifier.ready("config reloaded")

    async def _keep(
        self,
        w: _Worker,
        tcp: list[list[socket.socket]],
        udp: list[list[socket.socket]],
        workdir: str,
        scope: trio.CancelScope,
    ) -> None:
        """Run worker ``w``; restart it whenever it dies, until the group stops."""
        mine_tcp = [g[w.index].fileno() for g in tcp]
        mine_udp = [g[w.index].fileno() for g in udp]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        env[WORKER_ENV] = (
            f"{w.index}/{self.n} {os.getpid()} "
            f"{','.join(map(str, mine_tcp))} {','.join(map(str, mine_udp))} {self.admin or ''}"
        )
        env["NOTIFY_SOCKET"] = os.path.join(workdir, str(w.index))
        cmd = [sys.executable, "-m", "registry.cli", *self.argv]
        while not self.stopping:
            w.started = trio.current_time()
            w.process = await self.spawn(
                cmd, env=env, pass_fds=(*mine_tcp, *mine_udp), stdin=subprocess.DEVNULL
            )
            log.info("worker_started", worker=w.index, pid=w.process.pid, restarts=w.restarts)
            status = await w.process.wait()
            w.ready = trio.Event()  # ready again only when its successor says READY=1
            self.snapshots.pop(w.index, None)
            if self.stopping:
                return
            if not w.ever_ready:
                log.error("worker_failed", worker=w.index, status=status)
                self._fail(status if status > 0 else 1, scope)
                return
            w.restarts += 1
            w.delay = restart_delay(w.delay, trio.current_time() - w.started)
            log.error(
                "worker_exited", worker=w.index, status=status, restarts=w.restarts, delay=w.delay
            )
            await trio.sleep(w.delay)

    async def _notices(self, w: _Worker, sock: trio.socket.SocketType) -> None:
        """sd_notify datagrams from worker ``w``: READY, and its snapshots."""
        while True:
            data = await sock.recv(1 << 18)
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    w.ever_ready = True
                    w.ready.set()
                elif line.startswith("X_PROBES="):
                    with contextlib.suppress(ValueError):
                        snapshot = json.loads(line.removeprefix("X_PROBES="))
                        self.snapshots[w.index] = snapshot | {"at": trio.current_time()}

    async def _poll(self, store: Any, seq: int) -> None:
        """Every worker's committed rows, in order, to the admin's observers."""
        while True:
            seq, records = await store.after(seq)
            for record in records:
                for observe in self.observers:
                    observe(record)
            if len(records) < 1000:
                await trio.sleep(POLL_INTERVAL_S)
