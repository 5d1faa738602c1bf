"""Admin HTTP endpoint (SPEC "Admin HTTP"): h11 on trio; routes in ``api.py``, who may
in ``core/access.py``, who is closed when crowded in ``core/slots.py``.

One request per connection (``Connection: close``; the only long-lived client,
the event stream, is one request anyway). A hostile or broken client costs a
bounded amount (``AdminSettings``). Garbage HTTP gets 400 (431 for an oversized
head), unknown paths 404, methods other than GET/HEAD 405; a bug in one request
is logged and costs that connection, never the registry.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import h11
import structlog
import trio

from registry.admin import pages
from registry.admin.api import HTML, TEXT, BadRequest, HttpRequest, Response, Views
from registry.admin.core import access
from registry.admin.core.slots import AdminSlots
from registry.admin.events import EventHub
from registry.admin.view import DaemonView
from registry.metrics import Metrics, package_version
from registry.net.accept import accept_loop
from registry.store import StoreError

log = structlog.get_logger(component="admin")

_API_CSP = "default-src 'none'; frame-ancestors 'none'"
_STREAM = Response(200, b"", "text/event-stream")  # /api/events, allowed


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Resource bounds of the admin server (defaults suit one instructor and a scraper)."""

    first_byte_timeout: float = 2.0  # else closed; once it speaks, read_timeout for the head
    read_timeout: float = 10.0
    write_timeout: float = 10.0  # every write: a client that does not read is dropped
    heartbeat: float = 15.0  # a comment on an idle event stream
    # The slot is taken before accept(); past either cap the oldest connection without a
    # whole request head is closed, so idle ones never keep /healthz out.
    max_connections: int = 64
    max_per_source: int = 16
    # Each stream has a queue of this many events; a client whose queue is full is
    # dropped, so EventHub.publish never waits and never grows memory.
    max_event_clients: int = 32
    event_queue: int = 256
    max_head_bytes: int = 16 * 1024  # 431 beyond
    default_limit: int = 100
    max_limit: int = 1000


async def open_listeners(host: str, port: int, backlog: int = 128) -> list[trio.SocketListener]:
    """The admin endpoint's listening socket(s); OSError names the address and the way out."""
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(
            e.errno,
            f"cannot listen on {where} for the admin endpoint: {e.strerror} "
            "(set --admin HOST:PORT or --admin off, or server.admin)",
        ) from e


class AdminServer:
    """The admin endpoint of one running registry.

    Construct it with the daemon's view (``registry.server.daemon_view``): it
    subscribes its metrics and event hub to recorded registrations. Then run
    ``serve(listeners)`` in a nursery; cancelling that nursery closes every
    admin connection.
    """

    def __init__(
        self,
        view: DaemonView,
        settings: AdminSettings | None = None,
        *,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.view = view
        self.settings = s = settings or AdminSettings()
        self.wallclock = wallclock
        self.version = package_version()
        self.hub = EventHub(s.max_event_clients, s.event_queue)
        probes = dataclasses.replace(view.probes, event_clients=lambda: self.hub.clients)
        self.metrics = Metrics(probes, version=self.version)
        view.subscribe(self.metrics.observe)
        view.subscribe(self.hub.publish)
        self.admission = trio.CapacityLimiter(s.max_connections)
        self.slots = AdminSlots(s.max_connections, s.max_per_source)
        self._scopes: dict[object, trio.CancelScope] = {}
        self.views = Views(
            view, self.metrics, self.version, s.default_limit, s.max_limit, wallclock
        )

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve until cancelled; the listeners are closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                accepted = partial(self._accepted, nursery)
                for listener in listeners:
                    loop = partial(accept_loop, listener, self.admission, accepted, name="admin")
                    nursery.start_soon(loop)
                task_status.started()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def _accepted(self, nursery: trio.Nursery, conn: object, addr: object, token: object) -> None:
        """Count the connection against its source; close the idle ones it displaces."""
        scope = self._scopes[token] = trio.CancelScope()
        source = str(addr[0])  # type: ignore[index]
        for old in self.slots.arrive(token, source):  # may be this one: closed at once
            self._scopes[old].cancel()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))  # type: ignore[arg-type]
        nursery.start_soon(self._connection, stream, token, scope)

    async def _connection(
        self, stream: trio.SocketStream, token: object, scope: trio.CancelScope
    ) -> None:
        try:
            with scope:
                await self._handle(stream, token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or stopped reading: nothing to tell it
        except Exception as e:  # a bug must cost one connection, never the registry
            log.error("admin_request_failed", error=repr(e))
        finally:
            self._scopes.pop(token, None)
            self.slots.leave(token)
            self.admission.release_on_behalf_of(token)
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream, token: object) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_head_bytes)
        try:
            event = await self._next_request(stream, conn)
        except h11.RemoteProtocolError as e:
            self.slots.busy(token)
            status = e.error_status_hint if 400 <= e.error_status_hint <= 505 else 400
            await self._send(stream, conn, Response(status, b"bad request\n"))
            await self._linger(stream)
            return
        if event is None:
            return  # timed out or closed before a whole request head arrived
        self.slots.busy(token)
        try:
            req = HttpRequest.parse(event)
        except BadRequest as e:
            await self._send(stream, conn, Response(400, f"{e}\n".encode()))
            return
        response = await self._route(req)
        if response is _STREAM and req.method == "GET":
            await self._events(stream, conn)
            return
        log.debug("admin_request", method=req.method, path=req.path, status=response.status)
        await self._send(stream, conn, response, head_only=req.method == "HEAD")
        await self._linger(stream)

    async def _next_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        received = 0
        s = self.settings
        deadline = trio.current_time() + s.read_timeout
        with trio.move_on_after(s.first_byte_timeout) as first:
            while True:
                event = conn.next_event()
                # h11 bounds only an *incomplete* head; this bounds all we read for one.
                if received > s.max_head_bytes:
                    raise h11.RemoteProtocolError("request head too large", 431)
                if isinstance(event, h11.Request):
                    if event.http_version not in (b"1.0", b"1.1"):
                        raise h11.RemoteProtocolError("unsupported HTTP version", 505)
                    return event
                if event is not h11.NEED_DATA:
                    return None  # ConnectionClosed before a request
                data = await stream.receive_some(8192)
                if data:
                    first.deadline = deadline  # it spoke: the whole head's deadline now
                received += len(data)
                conn.receive_data(data)
        return None

    async def _route(self, req: HttpRequest) -> Response:
        handler = self.views.routes.get(req.path)
        if handler is None and req.path != "/api/events":
            return Response(404, b"not found\n")
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        refusal = self._check(req)
        if refusal is not None:
            return refusal
        if handler is None:  # /api/events: GET streams, HEAD gets a stream's headers
            return _STREAM
        try:
            return await handler(req)
        except BadRequest as e:
            return Response(400, f"{e}\n".encode())
        except (StoreError, sqlite3.Error) as e:
            log.error("admin_store_error", path=req.path, error=repr(e))
            return Response(503, b"the results store is unavailable\n")

    # --- access control (decided in access.py) --------------------------------------

    def _check(self, req: HttpRequest) -> Response | None:
        """None when the request may proceed, else the refusal (401, 403 or the login 303)."""
        token = self.view.config().server.admin_token
        decision = access.check(req.path, req.query, req.headers, token, self.wallclock())
        if decision is access.Verdict.ALLOW:
            return None
        if isinstance(decision, access.Login):
            headers = (("Location", decision.location), ("Set-Cookie", decision.set_cookie))
            return Response(303, b"logged in\n", headers=headers)
        if decision is access.Verdict.FORBIDDEN:
            return Response(
                403,
                b"refused: the Host header is a DNS name and no admin_token is set "
                b"(DNS rebinding guard); use an IP address or localhost, or set "
                b"server.admin_token\n",
            )
        headers = (("WWW-Authenticate", 'Bearer realm="registry-admin"'),)
        if req.path == "/":
            page = pages.render_message(
                "401: token required",
                "This registry's admin endpoint needs its token (server.admin_token): "
                "open /?token=YOUR_TOKEN once, or send Authorization: Bearer YOUR_TOKEN.",
            )
            return Response(401, page.encode(), HTML, headers)
        return Response(401, b"unauthorized: send Authorization: Bearer <token>\n", TEXT, headers)

    # --- the event stream --------------------------------------------------------

    async def _events(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        """Forward events (and a heartbeat comment when idle) until the hub drops this
        client or it leaves (its slot is free at once, not at the next heartbeat)."""
        with self.hub.subscribe() as receive:
            if receive is None:
                busy = Response(
                    503, b"too many event streams open\n", headers=(("Retry-After", "10"),)
                )
                await self._send(stream, conn, busy)
                return
            head = Response(200, content_type="text/event-stream")
            await self._write(stream, conn.send(self._head(head, streaming=True)))
            # retry: how long EventSource waits before reconnecting.
            await self._write(stream, conn.send(h11.Data(data=b"retry: 3000\n: connected\n\n")))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, stream, nursery.cancel_scope)
                while True:
                    data = b": heartbeat\n\n"
                    with trio.move_on_after(self.settings.heartbeat):
                        try:
                            data = await receive.receive()
                        except trio.EndOfChannel:
                            break
                    await self._write(stream, conn.send(h11.Data(data=data)))
                nursery.cancel_scope.cancel()
            await self._write(stream, conn.send(h11.EndOfMessage()))

    # --- writing -------------------------------------------------------------------------

    def _head(self, response: Response, *, streaming: bool = False) -> h11.Response:
        headers = [("Content-Type", response.content_type)]
        if not streaming:
            headers.append(("Content-Length", str(len(response.body))))
        csp = pages.CSP if response.content_type == HTML else _API_CSP
        headers += [
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Content-Security-Policy", csp),
            *response.headers,
        ]
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=response.status, headers=headers, reason=reason)

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        response: Response,
        *,
        head_only: bool = False,
    ) -> None:
        data = conn.send(self._head(response)) or b""
        if response.body and not head_only:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._write(stream, data)

    async def _write(self, stream: trio.SocketStream, data: bytes | None) -> None:
        if data:
            with trio.fail_after(self.settings.write_timeout):
                await stream.send_all(data)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close, then read briefly: closing with unread request bytes would make the
        kernel send RST, and the client could lose the response we just wrote."""
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        with trio.move_on_after(1.0):
            await _drain(stream)


async def _drain(stream: trio.SocketStream, then: trio.CancelScope | None = None) -> None:
    """Read and discard until the client closes (or sends 64 KiB), then cancel ``then``."""
    received = 0
    try:
        while received < 64 * 1024:
            chunk = await stream.receive_some(8192)
            if not chunk:
                break
            received += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    if then is not None:
        then.cancel()


__all__ = ["AdminServer", "AdminSettings", "open_listeners"]
