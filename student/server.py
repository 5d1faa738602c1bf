"""``student server``: the lab's listening server, which also answers verification.

It prints the lab's own lines (``Student server listening on port N...``,
``Connection accepted from instructor's server at IP:PORT``, then the message),
and when the message is a ``CALLBACK`` line it writes back ``ECHO nonce=...``
so the registry can mark the callback ``verified=yes``.

``CallbackServer`` is shared with ``student lab``: what it reports goes through
a ``ServerEvents`` object, so the lab can draw a timeline from the same events.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from student.netio import BindError, bind_sockets, open_tcp_listeners, read_line
from student.wire import (
    EXIT_LOCAL_ERROR,
    EXIT_OK,
    CallbackLine,
    Ended,
    build_echo,
    format_sockaddr,
    parse_callback,
    printable,
)

READ_TIMEOUT = 2.0  # seconds to wait for the registry's line after accepting
READ_LIMIT = 4096  # bytes: the registry's line is short; anything longer is cut
ECHO_TIMEOUT = 2.0  # seconds to hand the echo to the kernel


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """The options of ``student server``."""

    port: int = 15000
    bind: str | None = None  # None: every interface, IPv4 and IPv6
    count: int = 1
    timeout: float | None = None
    udp: bool = False


@dataclass(frozen=True, slots=True)
class Received:
    """What one callback brought: the message (printable, stripped) and the echo."""

    peer: str
    message: str
    ended: Ended
    callback: CallbackLine | None
    echoed: bool
    local: str = ""  # our end of the callback (student lab --explain shows it)


class ServerEvents(Protocol):
    """Receives what the server sees, as it sees it."""

    def accepted(self, peer: str, *, udp: bool) -> None: ...

    def received(self, got: Received) -> None: ...


class LabLines:
    """The lab's exact output lines, for ``student server``."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def accepted(self, peer: str, *, udp: bool) -> None:
        what = "Datagram received" if udp else "Connection accepted"
        self.out(f"{what} from instructor's server at {peer}")

    def received(self, got: Received) -> None:
        if got.message:
            self.out(got.message)
        elif got.ended is Ended.TIMEOUT:
            self.out(f"(no message within {READ_TIMEOUT:g} s)")
        else:
            self.out("(the connection closed without a message)")


def _peer(stream: trio.SocketStream) -> str:
    """The caller's address; a caller that already reset leaves no name (ENOTCONN)."""
    try:
        return format_sockaddr(stream.socket.getpeername())
    except OSError:
        return "(a caller that already disconnected)"


def _local(sock: trio.socket.SocketType) -> str:
    try:
        return format_sockaddr(sock.getsockname())
    except OSError:
        return ""


def _describe(data: bytes) -> tuple[str, CallbackLine | None]:
    text = data.decode("utf-8", "replace").strip()
    return printable(text), parse_callback(text)


class CallbackServer:
    """Accepts ``count`` callbacks on TCP listeners (or datagrams on UDP sockets)."""

    def __init__(
        self,
        events: ServerEvents,
        *,
        count: int,
        listeners: list[trio.SocketListener] | None = None,
        udp_socks: list[trio.socket.SocketType] | None = None,
    ) -> None:
        self.events = events
        self.count = count
        self.listeners = listeners or []
        self.udp_socks = udp_socks or []
        self.accepted = 0  # connections (or datagrams) taken so far
        self.handled = 0  # of those, fully read and answered
        self.done = trio.Event()  # set once ``count`` have been handled

    @classmethod
    async def open(
        cls, events: ServerEvents, *, port: int, bind: str | None, count: int, udp: bool
    ) -> CallbackServer:
        """Bind and listen; raises ``BindError`` with a sentence for the student."""
        if udp:
            socks = await bind_sockets(port, bind, socket.SOCK_DGRAM)
            return cls(events, count=count, udp_socks=socks)
        return cls(events, count=count, listeners=await open_tcp_listeners(port, bind))

    @property
    def _socks(self) -> list[trio.socket.SocketType]:
        return [listener.socket for listener in self.listeners] + self.udp_socks

    @property
    def port(self) -> int:
        """The port actually bound (the ephemeral one when asked for port 0)."""
        return int(self._socks[0].getsockname()[1])

    @property
    def addresses(self) -> list[str]:
        """Every bound address, e.g. ``["[::]:15000", "0.0.0.0:15000"]``."""
        return [format_sockaddr(sock.getsockname()) for sock in self._socks]

    async def aclose(self) -> None:
        """Close every listening socket."""
        for listener in self.listeners:
            await listener.aclose()
        for sock in self.udp_socks:
            sock.close()

    async def run(self) -> None:
        """Serve until ``count`` callbacks have been handled; the sockets stay open."""
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as takers:
                for listener in self.listeners:
                    takers.start_soon(self._accept_loop, listener, handlers, takers.cancel_scope)
                for sock in self.udp_socks:
                    takers.start_soon(self._datagram_loop, sock, handlers, takers.cancel_scope)
        self.done.set()

    def _take_one(self, stop: trio.CancelScope) -> bool:
        """Count one arrival; stop taking more once ``count`` is reached."""
        if self.accepted >= self.count:
            return False
        self.accepted += 1
        if self.accepted >= self.count:
            stop.cancel()
        return True

    async def _accept_loop(
        self, listener: trio.SocketListener, handlers: trio.Nursery, stop: trio.CancelScope
    ) -> None:
        while True:
            stream = await listener.accept()
            if not self._take_one(stop):
                await stream.aclose()
                return
            # Reported here, before the read, as the lab's accept() would print.
            self.events.accepted(_peer(stream), udp=False)
            handlers.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        peer, local = _peer(stream), _local(stream.socket)
        async with stream:
            line = await read_line(stream, limit=READ_LIMIT, within=READ_TIMEOUT)
            message, callback = _describe(line.data)
            echoed = False
            if callback is not None:
                # Echo before printing: a slow terminal must not make verification time out.
                with trio.move_on_after(ECHO_TIMEOUT):
                    try:
                        await stream.send_all(build_echo(callback.nonce))
                        echoed = True
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the registry did not wait for the echo (verify=no)
        self.handled += 1
        self.events.received(Received(peer, message, line.ended, callback, echoed, local))

    async def _datagram_loop(
        self, sock: trio.socket.SocketType, handlers: trio.Nursery, stop: trio.CancelScope
    ) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(READ_LIMIT)
            except OSError:
                continue  # an ICMP error for an earlier echo: not a datagram for us
            if not self._take_one(stop):
                return
            self.events.accepted(format_sockaddr(addr), udp=True)
            # Answered outside the loop's scope, which is cancelled once ``count`` is reached.
            handlers.start_soon(self._handle_datagram, sock, data, addr)

    async def _handle_datagram(
        self, sock: trio.socket.SocketType, data: bytes, addr: tuple[object, ...]
    ) -> None:
        message, callback = _describe(data)
        echoed = False
        if callback is not None:
            try:
                await sock.sendto(build_echo(callback.nonce), addr)
                echoed = True
            except OSError:
                pass  # the sender is gone: nothing to prove to anyone
        self.handled += 1
        peer = format_sockaddr(addr)
        # A wildcard UDP socket's name is 0.0.0.0/::: only the port is ours to show.
        got = Received(peer, message, Ended.EOF, callback, echoed, _local(sock))
        self.events.received(got)


async def run_server(
    opts: ServerOptions,
    out: Callable[[str], None],
    err: Callable[[str], None] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run ``student server``; return the exit status (0 after ``count`` callbacks).

    ``task_status.started(port)`` reports the bound port, so tests can use port 0.
    """
    err = err or out
    try:
        server = await CallbackServer.open(
            LabLines(out), port=opts.port, bind=opts.bind, count=opts.count, udp=opts.udp
        )
    except BindError as exc:
        err(f"student server: {exc}")
        return EXIT_LOCAL_ERROR
    try:
        where = "UDP port" if opts.udp else "port"
        out(f"Student server listening on {where} {server.port}...")
        task_status.started(server.port)
        timeout = opts.timeout if opts.timeout is not None else math.inf
        with trio.move_on_after(timeout):
            await server.run()
            return EXIT_OK
        err(
            f"student server: timed out after {timeout:g} s: {server.accepted} of "
            f"{opts.count} callback(s) arrived — did `student client` register this port, "
            "and can the registry reach this machine?"
        )
        return EXIT_LOCAL_ERROR
    finally:
        await server.aclose()
