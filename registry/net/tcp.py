"""TCP registration edge: read one request under deadlines, reply one line, close.

The handler never raises (an exception escaping a serve_listeners handler
would take the whole server down): every path ends in one reply, or in a
closed socket when the client is gone.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import time
from collections.abc import Callable, Sequence

import structlog
import trio

from registry.errors import ProtocolError
from registry.model import Endpoint, Outcome, Protocol, Request
from registry.policy.addresses import Address
from registry.protocol.jsonl import format_json_reply
from registry.protocol.reader import RequestReader
from registry.protocol.reply import format_reply
from registry.service import Rejected, Service, StoreUnavailable, store_failure_outcome

log = structlog.get_logger(component="tcp")
_conn_ids = itertools.count(1)


def next_conn_id() -> int:
    """The ``conn_id`` every log line of one connection carries."""
    return next(_conn_ids)


class RawStream:
    """A connection (the registration's, the callback's) on a plain non-blocking socket.

    ``trio.SocketStream`` costs each connection two socket options, and
    ``trio.socket`` a scheduler round around every call: here a call the
    kernel completes at once returns without one. Socket errors become
    ``trio.BrokenResourceError``. Every call is MSG_DONTWAIT (an accepted
    socket's descriptor is blocking). No TCP_NODELAY: each side writes once
    (a line, then FIN or close), so Nagle never holds a segment back.

    Every trio wait on the socket goes through ``wait_readable`` /
    ``wait_writable`` here: ``close`` tells trio (``notify_closing``) only about
    a socket it waited on. Most connections never wait, and for them the call is
    pure cost (a dict entry made and dropped, an ``epoll_ctl`` that fails).
    """

    __slots__ = ("socket", "waited")

    def __init__(self, sock: socket.SocketType) -> None:
        self.socket = sock
        self.waited = False  # has trio ever waited on this socket?

    async def wait_readable(self) -> None:
        self.waited = True
        await trio.lowlevel.wait_readable(self.socket)

    async def wait_writable(self) -> None:
        self.waited = True
        await trio.lowlevel.wait_writable(self.socket)

    def send_now(self, data: bytes) -> int:
        """How much of ``data`` the kernel takes at once: no wait, so no deadline to
        set. An error takes nothing; the next ``send_all`` reports it."""
        try:
            return self.socket.send(data, socket.MSG_DONTWAIT)
        except OSError:
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.socket.send(view, socket.MSG_DONTWAIT) :]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            await self.wait_writable()

    async def send_eof(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                return self.socket.recv(max_bytes or 4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            await self.wait_readable()

    def close(self) -> None:
        if self.socket.fileno() != -1:
            if self.waited:  # what trio's own close() does first
                trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()


def default_encode(protocol: Protocol, outcome: Outcome) -> bytes:
    """A JSON client gets a JSON reply (its errors too); everyone else the text line."""
    return format_json_reply(outcome) if protocol is Protocol.JSON else format_reply(outcome)


@functools.lru_cache(maxsize=16384)
def _host(text: str) -> Address:
    # Cached (immutable values): parsing costs 7.6 us a miss, 1.2 us a hit, and our
    # own address and the busiest peers repeat; 16,384 entries (~3 MB) hold the
    # benchmark's 5,000 cycling sources. A dual-stack socket's ::ffff:a.b.c.d is
    # the IPv4 peer itself (``Address.peer``).
    return Address.of(text.split("%", 1)[0]).peer


def endpoint_of(addr: tuple) -> Endpoint:  # type: ignore[type-arg]
    """A socket address as accept()/getpeername() return it, as an Endpoint."""
    return Endpoint(_host(addr[0]), int(addr[1]))


async def read_request(
    stream: trio.abc.ReceiveStream, reader: RequestReader
) -> tuple[Protocol, Request]:
    """Drive ``reader`` over ``stream`` until it decides; raises its ProtocolError."""
    while (decision := reader.tick(trio.current_time())) is None:
        with trio.move_on_at(reader.next_deadline):
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if (decision := reader.feed(data, trio.current_time())) is not None:
                break
    if isinstance(decision, ProtocolError):
        # A copy: raised, the reader's own would carry this frame, which holds the reader.
        raise ProtocolError(decision.code, decision.explanation)
    return reader.protocol, decision


async def reject_unread(service: Service, rejected: Sequence[Rejected]) -> list[bytes]:
    """The replies for requests the waiting room refused, each recorded (one store
    batch) before its reply exists; if the store fails, each is the store-failure BUSY."""
    try:
        with trio.CancelScope(shield=True):  # like handle(): the records complete
            outcomes = await service.reject_many(rejected)
    except StoreUnavailable:
        outcomes = [store_failure_outcome(None)] * len(rejected)
    return [default_encode(r[2], outcome) for r, outcome in zip(rejected, outcomes, strict=True)]


class TcpHandler:
    """Serve one registration connection; construct once, call per connection."""

    def __init__(
        self, service: Service, encode: Callable[[Protocol, Outcome], bytes] | None = None
    ) -> None:
        self.service = service
        self.encode = encode or default_encode

    async def __call__(
        self,
        stream: trio.SocketStream | RawStream,
        peer: Endpoint | None = None,
        *,
        conn_id: int | None = None,
        local: Endpoint | None = None,
        **known: object,
    ) -> None:
        """Serve one accepted connection, as its task's first and last call (its log
        context is bound in the task's own). ``peer``: as accept() reported it (saves
        a getpeername); ``local``: our end, if known (saves a getsockname);
        ``known``: ``handle``'s keywords."""
        try:
            peer = peer or endpoint_of(stream.socket.getpeername())
            local = local or endpoint_of(stream.socket.getsockname())
        except OSError:  # the client is already gone
            _close(stream)
            return
        # One bind and no reset: trio gives each task a copy of the context, which
        # ends with the task (a second bind and a reset cost ~11k instructions).
        request = known.get("request")
        if request is None:  # handle() binds the protocol once it has read the request
            structlog.contextvars.bind_contextvars(
                conn_id=conn_id or next_conn_id(), peer=str(peer)
            )
        else:
            structlog.contextvars.bind_contextvars(
                conn_id=conn_id or next_conn_id(),
                peer=str(peer),
                protocol=request[0].value,  # type: ignore[index]
            )
        try:
            await self.handle(stream, peer, local, **known)  # type: ignore[arg-type]
        except Exception as e:  # last resort: never let one client take the server down
            log.exception("handler_crashed", error=repr(e))
        finally:
            _close(stream)

    async def handle(
        self,
        stream: trio.abc.HalfCloseableStream,
        peer: Endpoint,
        local: Endpoint | None = None,
        *,
        source_paid: bool = False,
        arrived: float | None = None,
        received_at: float | None = None,
        request: tuple[Protocol, Request] | None = None,
        shielded: bool = False,
    ) -> None:
        """Serve one connection whose peer is known (tests pass memory streams here).

        ``source_paid``: the door took the source's token; ``arrived`` /
        ``received_at``: when it was accepted (trio / wall clock), if before
        now; ``request``: already read (the waiting room; the caller binds its
        protocol to the log context); ``shielded``: the caller runs this in a
        shielded scope already (no second one to pay for).
        """
        cfg = self.service.config.protocol
        received_at = time.time() if received_at is None else received_at
        protocol = Protocol.TEXT
        reader = None
        try:
            if request is None:
                reader = RequestReader(cfg, trio.current_time() if arrived is None else arrived)
                request = await read_request(stream, reader)
            protocol, parsed = request
            if reader is not None:
                structlog.contextvars.bind_contextvars(protocol=protocol.value)
            # Shielded: the callback and its record complete even if the client
            # vanishes or the server starts draining (the grace period bounds it).
            with contextlib.nullcontext() if shielded else trio.CancelScope(shield=True):
                outcome = await self.service.register(
                    parsed, peer, protocol, received_at, local, source_paid=source_paid
                )
        except ProtocolError as e:
            if reader is not None:  # a request that fails to parse is answered in its protocol
                protocol = reader.protocol
            try:
                with trio.CancelScope(shield=True):
                    outcome = await self.service.reject(
                        e, peer, protocol, received_at, source_paid=source_paid
                    )
            except StoreUnavailable:
                outcome = store_failure_outcome(None)
        except StoreUnavailable:
            outcome = store_failure_outcome(None)
        await _reply(stream, self.encode(protocol, outcome), cfg.write_timeout)


def _close(stream: trio.SocketStream | RawStream) -> None:
    # aclose_forcefully() without the cancelled checkpoint other streams need
    if isinstance(stream, RawStream):
        stream.close()
    else:
        stream.socket.close()


async def _reply(stream: trio.abc.HalfCloseableStream, data: bytes, timeout: float) -> None:
    """Send ``data`` and half-close; the caller closes the stream next.

    A reply nearly always fits a RawStream's send buffer: then no deadline, and no
    half-close either, as the close that follows sends the same FIN (or, with
    bytes unread, the same RST) that a shutdown() would have.
    """
    if isinstance(stream, RawStream) and not (data := data[stream.send_now(data) :]):
        return
    try:
        with trio.move_on_after(timeout):
            await stream.send_all(data)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("client_gone_before_reply")
