"""The student tools' socket edge: binding listeners and reading one capped line.

Everything that turns an ``OSError`` into a sentence a student can act on
lives here, so the server, client and lab print the same words for the same
problem.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket

import trio

from student.wire import Line, LineAssembler, format_endpoint, unbracket

LISTEN_BACKLOG = 128
EPHEMERAL_RETRIES = 5  # port 0 on two families: the v4 bind may lose a race for the v6 port


class BindError(Exception):
    """The server could not listen; the message says what to do about it."""


def port_in_use_message(port: int) -> str:
    """The one sentence every command prints when the port is taken."""
    return f"port {port} is already in use — is another student server running? pick another --port"


def _bind_message(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return port_in_use_message(port)
    if exc.errno == errno.EACCES:
        return (
            f"permission denied listening on port {port}: ports below 1024 need administrator "
            "rights — pick one between 10000 and 20000"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine (see `student addresses`)"
    return f"cannot listen on {format_endpoint(host, port)}: {exc.strerror or exc}"


async def _bind_one(
    host: str, port: int, kind: socket.SocketKind, *, v6only: bool | None
) -> trio.socket.SocketType:
    """One bound socket; ``OSError`` escapes so the caller can decide what it means."""
    family = (
        socket.AF_INET6
        if ipaddress.ip_address(host.partition("%")[0]).version == 6
        else socket.AF_INET
    )
    sock = trio.socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # As the lab does: a restarted server must not wait out TIME_WAIT. Not for UDP,
            # where SO_REUSEADDR would let two servers share a port and hide the mistake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        await sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _bind_wildcards(port: int, kind: socket.SocketKind) -> list[trio.socket.SocketType]:
    """``[::]`` (v6 only) and ``0.0.0.0`` on one port; IPv4 alone when IPv6 is missing."""
    socks: list[trio.socket.SocketType] = []
    try:
        try:
            v6 = await _bind_one("::", port, kind, v6only=True)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
        else:
            socks.append(v6)
            port = v6.getsockname()[1]
        socks.append(await _bind_one("0.0.0.0", port, kind, v6only=None))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def bind_sockets(
    port: int, bind: str | None, kind: socket.SocketKind
) -> list[trio.socket.SocketType]:
    """Bound (not yet listening) sockets for ``bind``, or for all interfaces when ``None``.

    Raises ``BindError`` with a sentence for the student.
    """
    host = unbracket(bind) if bind is not None else "::"
    for attempt in range(EPHEMERAL_RETRIES):
        try:
            if bind is not None:
                return [await _bind_one(host, port, kind, v6only=None)]
            return await _bind_wildcards(port, kind)
        except OSError as exc:
            retry = port == 0 and exc.errno == errno.EADDRINUSE
            if not retry or attempt == EPHEMERAL_RETRIES - 1:
                raise BindError(_bind_message(exc, host, port)) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def open_tcp_listeners(port: int, bind: str | None) -> list[trio.SocketListener]:
    """Listening TCP sockets (see ``bind_sockets``), wrapped for trio."""
    socks = await bind_sockets(port, bind, socket.SOCK_STREAM)
    for sock in socks:
        sock.listen(LISTEN_BACKLOG)
    return [trio.SocketListener(sock) for sock in socks]


async def read_line(
    stream: trio.abc.ReceiveStream, *, limit: int, within: float = math.inf
) -> Line:
    """One line: up to LF, the peer's EOF, ``limit`` bytes, or ``within`` seconds.

    A reset counts as EOF: whatever arrived before it is still the message.
    """
    assembler = LineAssembler(limit)
    with trio.move_on_after(within):
        while (line := assembler.next_line()) is None:
            try:
                data = await stream.receive_some(limit)
            except trio.BrokenResourceError:
                data = b""
            assembler.receive_data(data)
        return line
    return assembler.give_up()


def os_error_text(exc: OSError) -> str:
    """A short human reason for a socket error (``connection refused``)."""
    # trio.open_tcp_stream says "all attempts ... failed"; the reason is in its cause.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause is not exc:
        return os_error_text(cause)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the name ({exc.strerror or exc})"
    text = os.strerror(exc.errno) if exc.errno else exc.strerror
    if text:
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__
