"""Opening the daemon's registration sockets, one way for one process and for a group:
per ``server.listen`` address a reuseport group of N TCP listeners
(net/kernel/reuseport.py; N = 1 without ``server.workers``) and, with
``server.udp``, N UDP sockets on its actual port."""

from __future__ import annotations

import errno
import ipaddress
import socket

import structlog
import trio

from registry import config as config_mod
from registry.config import Config
from registry.model import Endpoint
from registry.net.accept import defer_accept
from registry.net.kernel.banfilter import detach_inherited
from registry.net.kernel.reuseport import open_group
from registry.net.tcp import endpoint_of

log = structlog.get_logger(component="server")

Groups = list[list[socket.socket]]  # per address, its n sockets


def parse_hostport(text: str) -> tuple[str, int]:
    """``"0.0.0.0:9000"`` / ``"[::]:9000"`` -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT like 0.0.0.0:9000 or [::]:9000, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)  # listeners take literal addresses only
    return host, int(port)


def open_sockets(cfg: Config, n: int) -> tuple[Groups, Groups]:
    """(TCP groups, UDP groups). OSError names the address; nothing stays open then."""
    tcp: Groups = []
    udp: Groups = []
    defaults = cfg.server.listen == config_mod.DEFAULT.server.listen
    prefix, asked = cfg.ratelimit.ipv6_prefix, cfg.server.defer_accept
    try:
        for spec in cfg.server.listen:
            host, port = parse_hostport(spec)
            try:
                group = open_group(
                    host,
                    port,
                    n,
                    kind=socket.SOCK_STREAM,
                    backlog=cfg.server.backlog,
                    v6_prefix=prefix,
                )
            except OSError as e:
                # The embedded defaults include [::]; a host without IPv6 still serves IPv4.
                if (
                    defaults
                    and host == "::"
                    and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
                ):
                    log.warning("listen_skipped", address=spec, error=e.strerror)
                    continue
                raise OSError(e.errno, f"cannot listen on {spec}: {e.strerror}") from e
            tcp.append(group)
            if any(defer_accept(s, asked) is None for s in group) and asked > 0:
                # silent connections are then held by the registry itself
                log.warning("defer_accept_unavailable", address=spec, asked=asked)
            if not cfg.server.udp:
                continue
            where = endpoint_of(group[0].getsockname())
            try:
                udp.append(
                    open_group(host, where.port, n, kind=socket.SOCK_DGRAM, v6_prefix=prefix)
                )
            except OSError as e:
                # Kernel-chosen TCP ports (tests): the same UDP port may be someone else's.
                if port == 0 and e.errno == errno.EADDRINUSE:
                    log.warning("udp_skipped", address=str(where), error=e.strerror)
                    continue
                raise OSError(e.errno, f"cannot listen on udp {where}: {e.strerror}") from e
    except OSError:
        for sock in [s for g in tcp + udp for s in g]:
            sock.close()
        raise
    return tcp, udp


def as_listeners(
    cfg: Config, socks: list[socket.socket], deferral: dict[trio.SocketListener, int | None]
) -> list[trio.SocketListener]:
    """Trio listeners on this process's sockets; each one's kernel deferral into ``deferral``
    (set again: the kernel's own figure, which a worker did not see set)."""
    listeners = []
    for sock in socks:
        detach_inherited(sock)  # a dead predecessor's bans leave with it
        lst = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        deferral[lst] = defer_accept(lst.socket, cfg.server.defer_accept)
        listeners.append(lst)
    return listeners


def deferral_for_log(
    deferral: dict[trio.SocketListener, int | None], listeners: list[trio.SocketListener]
) -> object:
    """The seconds the kernel defers for: one figure, or one per listener when they differ."""
    found = {str(sockname(lst)): deferral.get(lst) for lst in listeners}
    values = set(found.values())
    return values.pop() if len(values) == 1 else found


def sockname(listener: trio.SocketListener) -> Endpoint:
    return endpoint_of(listener.socket.getsockname())


def own_end(listener: trio.SocketListener) -> Endpoint | None:
    """Every connection's own end, when the listener is bound to one address (not
    0.0.0.0 or ::): the handler needs no getsockname per connection."""
    where = sockname(listener)
    return None if where.host.is_unspecified else where
