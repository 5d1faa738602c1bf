"""Opening the daemon's sockets: registration listeners (TCP, UDP) and the admin
listener, from the config or inherited from a supervisor (``server.workers``)."""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Awaitable, Callable

import structlog
import trio

from registry import config as config_mod
from registry.config import Config
from registry.model import Endpoint
from registry.net.accept import defer_accept
from registry.net.kernel.banfilter import detach_inherited
from registry.net.kernel.reuseport import Inherited
from registry.net.udp import open_udp_sockets
from registry.policy.addresses import Address

log = structlog.get_logger(component="server")


def parse_hostport(text: str) -> tuple[str, int]:
    """``"0.0.0.0:9000"`` / ``"[::]:9000"`` -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT like 0.0.0.0:9000 or [::]:9000, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)  # listeners take literal addresses only
    return host, int(port)


async def open_listeners(
    cfg: Config, inherited: Inherited | None, deferral: dict[trio.SocketListener, int | None]
) -> list[trio.SocketListener]:
    """The registration listeners (inherited from a supervisor, or opened); each
    listener's kernel deferral goes into ``deferral``."""
    listeners: list[trio.SocketListener] = []
    if inherited is not None:
        for sock in inherited.tcp:
            detach_inherited(sock)  # a dead predecessor's bans leave with it
            lst = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            deferral[lst] = defer_accept(lst.socket, cfg.server.defer_accept)
            listeners.append(lst)
        return listeners
    defaults = cfg.server.listen == config_mod.DEFAULT.server.listen
    for spec in cfg.server.listen:
        host, port = parse_hostport(spec)
        try:
            opened = await trio.open_tcp_listeners(port, host=host, backlog=cfg.server.backlog)
            listeners += opened
            for lst in opened:
                deferral[lst] = defer_accept(lst.socket, cfg.server.defer_accept)
            refused = any(deferral[lst] is None for lst in opened)
            if refused and cfg.server.defer_accept > 0:
                log.warning(  # silent connections are then held by the registry itself
                    "defer_accept_unavailable", address=spec, asked=cfg.server.defer_accept
                )
        except OSError as e:
            # The embedded defaults include [::]; a host without IPv6 still serves IPv4.
            if defaults and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and host == "::":
                log.warning("listen_skipped", address=spec, error=e.strerror)
                continue
            for lst in listeners:
                await lst.aclose()
            raise OSError(e.errno, f"cannot listen on {spec}: {e.strerror}") from e
    return listeners


def deferral_for_log(
    deferral: dict[trio.SocketListener, int | None], listeners: list[trio.SocketListener]
) -> object:
    """The seconds the kernel defers for: one figure, or one per listener when they differ."""
    found = {str(sockname(lst)): deferral.get(lst) for lst in listeners}
    values = set(found.values())
    return values.pop() if len(values) == 1 else found


async def open_admin(
    cfg: Config,
    listeners: list[trio.SocketListener],
    opener: Callable[[str, int], Awaitable[list[trio.SocketListener]]],
) -> list[trio.SocketListener]:
    """The admin endpoint's listener(s) (none when server.admin is "off"), opened by the
    admin package's ``opener`` (handed in: net/ does not import the admin side)."""
    if cfg.server.admin == "off":
        return []
    host, port = parse_hostport(cfg.server.admin)
    try:
        return await opener(host, port)
    except OSError:
        for lst in listeners:
            await trio.aclose_forcefully(lst)
        raise


async def open_udp(
    cfg: Config,
    inherited: Inherited | None,
    listeners: list[trio.SocketListener],
    others: list[trio.SocketListener],
) -> list[trio.socket.SocketType]:
    """UDP sockets on each registration listener's address and actual port (server.udp)."""
    if not cfg.server.udp:
        return []
    if inherited is not None:
        return [trio.socket.from_stdlib_socket(s) for s in inherited.udp]
    try:
        # Kernel-chosen ports (tests): the same UDP port may be someone else's.
        ephemeral = all(parse_hostport(spec)[1] == 0 for spec in cfg.server.listen)
        return await open_udp_sockets((sockname(lst) for lst in listeners), skip_in_use=ephemeral)
    except OSError:
        for lst in [*listeners, *others]:
            await trio.aclose_forcefully(lst)
        raise


def sockname(listener: trio.SocketListener) -> Endpoint:
    host, port = listener.socket.getsockname()[:2]
    return Endpoint(Address.of(host), port)
