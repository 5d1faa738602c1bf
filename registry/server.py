"""The daemon: listeners, nurseries, signals, graceful drain and reload.

Two nurseries, as in hypercorn's trio runner: the *accept* nursery holds the
accept loops (and other front doors) and is cancelled first on SIGTERM; the
*handler* nursery holds in-flight registrations and gets a grace deadline to
finish them before it is cancelled.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from registry import config as config_mod
from registry.config import Config
from registry.conncaps import ConnectionCaps
from registry.errors import ConfigError
from registry.model import Code, Endpoint, Outcome
from registry.net.connector import TcpConnector
from registry.net.tcp import TcpHandler, peer_endpoint
from registry.protocol.reply import format_reply
from registry.ratelimit import source_key
from registry.sdnotify import Notifier
from registry.service import Connector, Service
from registry.store import AsyncStore

log = structlog.get_logger(component="server")

# accept() errors that mean "out of some resource": back off instead of spinning.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def parse_hostport(text: str) -> tuple[str, int]:
    """``"0.0.0.0:9000"`` / ``"[::]:9000"`` -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT like 0.0.0.0:9000 or [::]:9000, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)  # listeners take literal addresses only
    return host, int(port)


@dataclass
class Runtime:
    """What a running registry exposes to tests and to the admin endpoint."""

    config: Config
    service: Service
    caps: ConnectionCaps
    store: AsyncStore
    tcp: list[Endpoint] = field(default_factory=list)
    admin: Endpoint | None = None
    started_at: float = 0.0
    draining: bool = False
    shutdown: Callable[[], None] = lambda: None
    reload: Callable[[], None] = lambda: None


class Registry:
    """One registry daemon. ``await Registry(cfg).run()`` until SIGTERM/SIGINT or shutdown()."""

    def __init__(
        self,
        cfg: Config,
        *,
        config_path: str | None = None,
        connector: Connector | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.connector = connector or TcpConnector(cfg.callback)
        self.handle_signals = handle_signals
        self.notifier = Notifier()
        self.admission = trio.CapacityLimiter(cfg.limits.max_connections)
        self.caps = ConnectionCaps(
            cfg.limits.max_connections, cfg.limits.max_connections_per_source
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.cfg
        listeners = await self._open_listeners()
        own = frozenset(_sockname(lst) for lst in listeners)
        async with AsyncStore(cfg.server.db, retention=cfg.store.retention) as store:
            service = Service(cfg, connector=self.connector, recorder=store, own=own)
            handler = TcpHandler(service)
            runtime = Runtime(cfg, service, self.caps, store, tcp=sorted(own, key=str))
            runtime.started_at = trio.current_time()
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as front:
                    runtime.shutdown = front.cancel_scope.cancel
                    runtime.reload = lambda: self._reload(runtime)
                    for listener in listeners:
                        front.start_soon(self._accept_loop, listener, handler, handlers)
                    if self.handle_signals:
                        front.start_soon(self._signals, runtime)
                    if self.notifier.watchdog_interval:
                        front.start_soon(self._watchdog, self.notifier.watchdog_interval)
                    log.info(
                        "listening",
                        tcp=[str(e) for e in runtime.tcp],
                        db=cfg.server.db,
                        policy=cfg.policy.mode,
                    )
                    self.notifier.ready(f"listening on {', '.join(map(str, runtime.tcp))}")
                    task_status.started(runtime)
                runtime.draining = True
                self.notifier.stopping()
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                log.info("draining", grace_s=cfg.server.grace_period, in_flight=self.caps.total)
                handlers.cancel_scope.deadline = trio.current_time() + cfg.server.grace_period
            if handlers.cancel_scope.cancelled_caught:
                log.warning("grace_period_expired", grace_s=cfg.server.grace_period)
        log.info("stopped", outcomes={k.value: v for k, v in service.outcomes.items()})

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _open_listeners(self) -> list[trio.SocketListener]:
        listeners: list[trio.SocketListener] = []
        defaults = self.cfg.server.listen == config_mod.DEFAULT.server.listen
        for spec in self.cfg.server.listen:
            host, port = parse_hostport(spec)
            try:
                listeners += await trio.open_tcp_listeners(
                    port, host=host, backlog=self.cfg.server.backlog
                )
            except OSError as e:
                # The embedded defaults include [::]; a host without IPv6 still serves IPv4.
                if (
                    defaults
                    and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
                    and host == "::"
                ):
                    log.warning("listen_skipped", address=spec, error=e.strerror)
                    continue
                for lst in listeners:
                    await lst.aclose()
                raise OSError(e.errno, f"cannot listen on {spec}: {e.strerror}") from e
        return listeners

    async def _accept_loop(
        self, listener: trio.SocketListener, handler: TcpHandler, handlers: trio.Nursery
    ) -> None:
        while True:
            # Take the connection slot BEFORE accept(): beyond the cap, clients
            # wait in the kernel backlog and cost us no file descriptor.
            token = object()
            await self.admission.acquire_on_behalf_of(token)
            try:
                stream = await listener.accept()
            except OSError as e:
                self.admission.release_on_behalf_of(token)
                if e.errno in _CAPACITY_ERRNOS:
                    log.error("accept_capacity", error=e.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                self.admission.release_on_behalf_of(token)
                raise
            handlers.start_soon(self._guarded, stream, handler, token)

    async def _guarded(self, stream: trio.SocketStream, handler: TcpHandler, token: object) -> None:
        try:
            try:
                key = source_key(peer_endpoint(stream).host, self.cfg.ratelimit.ipv6_prefix)
            except OSError:
                await trio.aclose_forcefully(stream)
                return
            if self.caps.acquire(key) is not None:
                await _refuse(stream, self.cfg.protocol.write_timeout)
                return
            try:
                await handler(stream)
            finally:
                self.caps.release(key)
        finally:
            self.admission.release_on_behalf_of(token)

    async def _signals(self, runtime: Runtime) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
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
            new = config_mod.load(self.config_path)
            config_mod.auth_secret(new)  # an unreadable secret_file is a bad config too
        except ConfigError as e:
            log.error("reload_failed", path=self.config_path, problems=e.problems)
            self.notifier.ready("reload failed; old config kept")
            return
        unchanged = ("listen", "db", "admin")
        moved = [k for k in unchanged if getattr(new.server, k) != getattr(self.cfg.server, k)]
        if moved:
            log.warning("reload_needs_restart", keys=[f"server.{k}" for k in moved])
        self.cfg = new
        runtime.config = new
        runtime.service.reconfigure(new)
        self.admission.total_tokens = new.limits.max_connections
        self.caps.reconfigure(new.limits.max_connections, new.limits.max_connections_per_source)
        log.info("reloaded", path=self.config_path)
        self.notifier.ready("config reloaded")


async def _refuse(stream: trio.SocketStream, timeout: float) -> None:
    outcome = Outcome(
        code=Code.OVERLOADED,
        retry_after=5,
        explanation="too many open connections from your address; close some and retry",
    )
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(format_reply(outcome))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


def _sockname(listener: trio.SocketListener) -> Endpoint:
    host, port = listener.socket.getsockname()[:2]
    return Endpoint(ipaddress.ip_address(host), port)
