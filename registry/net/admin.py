"""Admin HTTP endpoint (SPEC "Admin HTTP"): dashboard, JSON API, live events, metrics, probes.

A deliberately small HTTP/1.1 server: h11 does the parsing (sans-io), trio
the sockets. One request per connection (every response says
``Connection: close``): the only long-lived client is the event stream,
which is one request anyway, and it keeps the state machine trivial.

Bounds, so a hostile or broken client costs a fixed amount:

- connections: at most ``max_connections`` at once, the slot taken *before*
  ``accept()`` (beyond it, clients wait in the kernel backlog);
- the request head: ``max_head_bytes`` (h11 ``max_incomplete_event_size``,
  431 beyond) read within ``read_timeout`` (else the socket is closed);
- every write: ``write_timeout``; a client that does not read is dropped;
- event streams: at most ``max_event_clients``; each has a bounded queue of
  ``event_queue`` encoded events, and a client whose queue is full is dropped
  (``EventHub.publish`` never waits and never grows memory).

Garbage HTTP gets 400 (431 for an oversized head), unknown paths 404, other
methods than GET/HEAD 405. A bug in one request is logged and that one
connection closed: nothing here may raise into the server's nursery.

Authentication: when ``server.admin_token`` is set, every path but
``/healthz`` needs ``Authorization: Bearer <token>`` (or the dashboard cookie,
below), compared with ``hmac.compare_digest``; otherwise 401 with
``WWW-Authenticate``. A browser opens ``/?token=<token>`` once: the reply is a
303 to the same URL without the token, setting the HttpOnly SameSite=Strict
cookie ``registry_admin`` whose value is an HMAC of the token (the cookie
never holds the token itself). The token is re-read from the live config on
every request, so SIGHUP changes it (and invalidates old cookies).

Without a token, requests whose ``Host`` is a DNS name other than
``localhost`` are refused (403): that defeats DNS rebinding, where a web page
on the instructor's machine points its own hostname at 127.0.0.1 to read
students' data. Use an IP address, ``localhost``, or set a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

import h11
import structlog
import trio

from registry import dashboard
from registry.metrics import Metrics, Probes, package_version
from registry.net.accept import accept_loop, spawn_stream

# The JSON shapes of `registry results --format json`, reused so the API and the CLI agree.
from registry.results import parse_since, record_json, summary_json
from registry.store import Record, StoreError

if TYPE_CHECKING:
    from registry.server import Runtime

log = structlog.get_logger(component="admin")

COOKIE = "registry_admin"
# accept() errors meaning "out of some resource": back off, do not spin.
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_API_CSP = "default-src 'none'; frame-ancestors 'none'"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Resource bounds of the admin server (defaults suit one instructor and a scraper)."""

    read_timeout: float = 10.0
    write_timeout: float = 10.0
    heartbeat: float = 15.0
    max_connections: int = 64
    max_event_clients: int = 32
    event_queue: int = 256
    max_head_bytes: int = 16 * 1024
    default_limit: int = 100
    max_limit: int = 1000


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


class BadRequest(Exception):
    """A query parameter the handler cannot use; becomes a 400 naming it."""


# --- the live event hub ----------------------------------------------------------


def encode_event(record: Record) -> bytes:
    """One Server-Sent Event for a record: ``data: {json}`` (json.dumps never emits a newline)."""
    return b"data: " + json.dumps(record_json(record), separators=(",", ":")).encode() + b"\n\n"


class EventHub:
    """Fan-out of recorded registrations to the open ``/api/events`` streams.

    ``publish`` is a ``Service.observers`` callback: it runs on the request
    path, so it never waits: each client has a bounded queue, and a client
    whose queue is full is dropped (its stream ends) instead of slowing the
    registry or growing memory.
    """

    def __init__(self, max_clients: int = 32, queue_size: int = 256) -> None:
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.dropped = 0  # clients dropped for not keeping up
        self._clients: set[trio.MemorySendChannel[bytes]] = set()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, record: Record) -> None:
        """Queue one record for every client; drop the clients that are full."""
        if not self._clients:
            return
        data = encode_event(record)
        for send in list(self._clients):
            try:
                send.send_nowait(data)
            except trio.WouldBlock:
                self._clients.discard(send)
                send.close()  # the stream sends what is queued, then ends
                self.dropped += 1
                log.warning("admin_event_client_dropped", reason="queue full")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._clients.discard(send)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[bytes] | None]:
        """A receive channel of encoded events, or None when ``max_clients`` are connected."""
        if len(self._clients) >= self.max_clients:
            yield None
            return
        send, receive = trio.open_memory_channel[bytes](self.queue_size)
        self._clients.add(send)
        try:
            yield receive
        finally:
            self._clients.discard(send)
            send.close()
            receive.close()


# --- small pure helpers ------------------------------------------------------------


def host_allowed(host: str | None) -> bool:
    """DNS-rebinding guard: an IP literal or ``localhost`` (with or without a port)."""
    if not host:
        return True  # HTTP/1.0 without Host: not a browser following a DNS name
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cookie_value(token: str) -> str:
    """The dashboard cookie for ``token``: an HMAC, so the cookie never carries the token."""
    return hmac.new(token.encode(), b"registry-admin-cookie", hashlib.sha256).hexdigest()


def _cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            jar.setdefault(name, value)
    return jar


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The parts of an h11 request the routes use, decoded."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, req: h11.Request) -> HttpRequest:
        """Raises BadRequest for an unparseable target or query."""
        target = req.target.decode("ascii", "replace")
        split = urlsplit(target)
        try:
            pairs = parse_qs(split.query, keep_blank_values=True, max_num_fields=32)
        except ValueError as e:
            raise BadRequest(f"bad query string: {e}") from None
        headers: dict[str, str] = {}
        for name, value in req.headers:
            # Repeated headers: the first wins (Host, Authorization: there should be one).
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return cls(
            method=req.method.decode("ascii", "replace"),
            path=split.path or "/",
            query={k: v[0] for k, v in pairs.items()},
            headers=headers,
        )


@dataclass(frozen=True, slots=True)
class Filters:
    limit: int
    student: str | None
    since: float | None
    since_text: str | None


def parse_filters(query: dict[str, str], now: float, default_limit: int, max_limit: int) -> Filters:
    """``limit``, ``student`` and ``since`` query parameters; empty means absent."""
    text = query.get("limit", "").strip()
    limit = default_limit
    if text:
        if not text.isdigit() or not 1 <= int(text) <= max_limit:
            raise BadRequest(f"limit: expected a whole number from 1 to {max_limit}, got {text!r}")
        limit = int(text)
    student = query.get("student") or None
    if student is not None and len(student) > 200:
        raise BadRequest("student: longer than 200 characters")
    since_text = query.get("since", "").strip() or None
    since = None
    if since_text is not None:
        try:
            since = parse_since(since_text, now)
        except ValueError as e:
            raise BadRequest(f"since: {e}") from None
    return Filters(limit, student, since, since_text)


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n", _JSON)


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


# --- the server ----------------------------------------------------------------------

Route = Callable[[HttpRequest], Awaitable[Response]]


class AdminServer:
    """The admin endpoint of one running registry.

    Construct it with the Runtime: it appends its metrics and event-hub
    observers to ``runtime.service.observers``. Then run ``serve(listeners)``
    in a nursery; cancelling that nursery closes every admin connection.
    """

    def __init__(
        self,
        runtime: Runtime,
        settings: AdminSettings | None = None,
        *,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.settings = settings or AdminSettings()
        self.wallclock = wallclock
        self.version = package_version()
        self.hub = EventHub(self.settings.max_event_clients, self.settings.event_queue)
        self.metrics = Metrics(self._probes(), version=self.version)
        runtime.service.observers += [self.metrics.observe, self.hub.publish]
        self.admission = trio.CapacityLimiter(self.settings.max_connections)
        self.routes: dict[str, Route] = {
            "/": self._dashboard,
            "/api/registrations": self._registrations,
            "/api/summary": self._summary,
            "/api/bans": self._bans,
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    def _probes(self) -> Probes:
        rt = self.runtime
        return Probes(
            open_connections=lambda: rt.caps.total,
            callbacks_in_flight=lambda: rt.service.slots.in_flight,
            callbacks_waiting=lambda: rt.service.slots.waiting,
            limiter_entries=lambda: rt.service.limiter.entries,
            door_refusals=lambda: rt.tally.totals,
            bans_active=lambda: len(rt.bans),
            bans_total=lambda: rt.bans.total,
            silent_drop=lambda: rt.ban_filter is not None and rt.ban_filter.dropping_now,
            event_clients=lambda: self.hub.clients,
            draining=lambda: rt.draining,
            policy_mode=lambda: rt.config.policy.mode,
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
                for listener in listeners:
                    nursery.start_soon(
                        partial(
                            accept_loop,
                            listener,
                            self.admission,
                            spawn_stream(nursery, self._connection),
                            name="admin",
                        )
                    )
                task_status.started()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _connection(self, stream: trio.SocketStream, token: object) -> None:
        try:
            await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or stopped reading: nothing to tell it
        except Exception as e:  # a bug must cost one connection, never the registry
            log.error("admin_request_failed", error=repr(e))
        finally:
            self.admission.release_on_behalf_of(token)
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_head_bytes)
        try:
            event = await self._next_request(stream, conn)
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if 400 <= e.error_status_hint <= 505 else 400
            await self._send(stream, conn, Response(status, b"bad request\n"), head_only=False)
            await self._linger(stream)
            return
        if event is None:
            return  # timed out or closed before a whole request head arrived
        try:
            req = HttpRequest.parse(event)
        except BadRequest as e:
            await self._send(stream, conn, Response(400, f"{e}\n".encode()), head_only=False)
            return
        head_only = req.method == "HEAD"
        if req.path == "/api/events" and req.method == "GET":
            refusal = self._check(req)
            if refusal is None:
                await self._events(stream, conn)
                return
            response = refusal
        else:
            response = await self._route(req)
        log.debug("admin_request", method=req.method, path=req.path, status=response.status)
        await self._send(stream, conn, response, head_only=head_only)
        await self._linger(stream)

    async def _next_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        received = 0
        with trio.move_on_after(self.settings.read_timeout):
            while True:
                event = conn.next_event()
                # h11 bounds only an *incomplete* head; this bounds all we read for one.
                if received > self.settings.max_head_bytes:
                    raise h11.RemoteProtocolError("request head too large", 431)
                if isinstance(event, h11.Request):
                    if event.http_version not in (b"1.0", b"1.1"):
                        raise h11.RemoteProtocolError("unsupported HTTP version", 505)
                    return event
                if event is not h11.NEED_DATA:
                    return None  # ConnectionClosed before a request
                data = await stream.receive_some(8192)
                received += len(data)
                conn.receive_data(data)
        return None

    async def _route(self, req: HttpRequest) -> Response:
        handler = self.routes.get(req.path)
        if handler is None and req.path != "/api/events":
            return Response(404, b"not found\n")
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        refusal = self._check(req)
        if refusal is not None:
            return refusal
        if handler is None:  # HEAD /api/events: the headers of a stream, no stream
            return Response(200, b"", "text/event-stream")
        try:
            return await handler(req)
        except BadRequest as e:
            return Response(400, f"{e}\n".encode())
        except (StoreError, sqlite3.Error) as e:
            log.error("admin_store_error", path=req.path, error=repr(e))
            return Response(503, b"the results store is unavailable\n")

    # --- access control -----------------------------------------------------------

    def _check(self, req: HttpRequest) -> Response | None:
        """None when the request may proceed, else the refusal (401, 403 or the login 303)."""
        if req.path == "/healthz":
            return None
        token = self.runtime.config.server.admin_token
        if not token:
            if host_allowed(req.headers.get("host")):
                return None
            return Response(
                403,
                b"refused: the Host header is a DNS name and no admin_token is set "
                b"(DNS rebinding guard); use an IP address or localhost, or set "
                b"server.admin_token\n",
            )
        auth = req.headers.get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() == "bearer" and _same(presented.strip(), token):
            return None
        cookie = _cookies(req.headers.get("cookie", "")).get(COOKIE, "")
        if cookie and _same(cookie, cookie_value(token)):
            return None
        if req.path == "/" and "token" in req.query and _same(req.query["token"], token):
            return self._login(req, token)
        return self._unauthorized(req)

    def _login(self, req: HttpRequest, token: str) -> Response:
        rest = {k: v for k, v in req.query.items() if k != "token"}
        location = "/" + ("?" + urlencode(rest) if rest else "")
        cookie = f"{COOKIE}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict"
        return Response(
            303, b"logged in\n", headers=(("Location", location), ("Set-Cookie", cookie))
        )

    def _unauthorized(self, req: HttpRequest) -> Response:
        headers = (("WWW-Authenticate", 'Bearer realm="registry-admin"'),)
        if req.path == "/":
            page = dashboard.render_message(
                "401: token required",
                "This registry's admin endpoint needs its token (server.admin_token): "
                "open /?token=YOUR_TOKEN once, or send Authorization: Bearer YOUR_TOKEN.",
            )
            return Response(401, page.encode(), _HTML, headers)
        return Response(401, b"unauthorized: send Authorization: Bearer <token>\n", _TEXT, headers)

    # --- routes -------------------------------------------------------------------------

    def _filters(self, req: HttpRequest) -> Filters:
        s = self.settings
        return parse_filters(req.query, self.wallclock(), s.default_limit, s.max_limit)

    async def _dashboard(self, req: HttpRequest) -> Response:
        f = self._filters(req)
        store = self.runtime.store
        records = await store.query(since=f.since, student=f.student, limit=f.limit)
        summaries = await store.summary(since=f.since, student=f.student)
        # Counts need every matching row; fine for a class's worth of registrations.
        counts = dashboard.complete_counts(
            await store.count_by_status(since=f.since, student=f.student)
        )
        page = dashboard.Page(
            records=records,
            summaries=summaries,
            counts=counts,
            generated_at=self.wallclock(),
            version=self.version,
            policy_mode=self.runtime.config.policy.mode,
            listening=[str(e) for e in self.runtime.tcp],
            limit=f.limit,
            student=f.student,
            since=f.since_text,
            draining=self.runtime.draining,
        )
        return Response(200, dashboard.render_dashboard(page).encode(), _HTML)

    async def _registrations(self, req: HttpRequest) -> Response:
        f = self._filters(req)
        records = await self.runtime.store.query(since=f.since, student=f.student, limit=f.limit)
        return _json_response([record_json(r) for r in records])

    async def _summary(self, req: HttpRequest) -> Response:
        f = self._filters(req)
        store = self.runtime.store
        summaries = await store.summary(since=f.since, student=f.student)
        counts = dashboard.complete_counts(
            await store.count_by_status(since=f.since, student=f.student)
        )
        return _json_response({"counts": counts, "students": [summary_json(s) for s in summaries]})

    async def _bans(self, req: HttpRequest) -> Response:
        """Sources banned now (registry/bans.py), oldest first, with the time left."""
        bans, now = self.runtime.bans, trio.current_time()
        ban_filter = self.runtime.ban_filter
        return _json_response(
            {
                "banned": len(bans),
                "kernel_filtered": ban_filter.filtered if ban_filter is not None else 0,
                # "ebpf" (a kernel map, up to max_bans) or "classic" (~2,000 bans)
                "kernel_filter": ban_filter.kind if ban_filter is not None else None,
                "total": bans.total,
                "skipped_list_full": bans.skipped,
                "ban_after": bans.after,
                # the kernel drops bare handshake ACKs: only a client's bytes connect
                "silent_drop": {
                    "active": ban_filter is not None and ban_filter.dropping_now,
                    "seconds_left": round(max(0.0, ban_filter.silent.until - now), 1)
                    if ban_filter is not None
                    else 0.0,
                    "after": ban_filter.silent.after if ban_filter is not None else 0,
                },
                "bans": [
                    {
                        "source": str(ban.key),
                        "refusals": ban.refusals,
                        "banned_for_s": round(now - ban.since, 1),
                        "seconds_left": round(max(0.0, ban.until - now), 1),
                    }
                    for ban in bans.active()
                ],
            }
        )

    async def _metrics(self, req: HttpRequest) -> Response:
        body, content_type = self.metrics.render(req.headers.get("accept", ""))
        return Response(200, body, content_type)

    async def _healthz(self, req: HttpRequest) -> Response:
        return Response(200, b"ok\n")

    async def _readyz(self, req: HttpRequest) -> Response:
        if self.runtime.draining:
            return Response(503, b"draining\n")
        return Response(200, b"ready\n")

    # --- the event stream --------------------------------------------------------

    async def _events(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        with self.hub.subscribe() as receive:
            if receive is None:
                busy = Response(
                    503, b"too many event streams open\n", headers=(("Retry-After", "10"),)
                )
                await self._send(stream, conn, busy, head_only=False)
                return
            head = Response(200, content_type="text/event-stream")
            await self._write(stream, conn.send(self._head(head, streaming=True)))
            # retry: how long EventSource waits before reconnecting.
            await self._write(stream, conn.send(h11.Data(data=b"retry: 3000\n: connected\n\n")))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_client_leaves, stream, nursery.cancel_scope)
                await self._pump(stream, conn, receive)
                nursery.cancel_scope.cancel()
            await self._write(stream, conn.send(h11.EndOfMessage()))

    async def _pump(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        receive: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        """Forward events (and a heartbeat comment when idle) until the hub drops us."""
        while True:
            data = b": heartbeat\n\n"
            with trio.move_on_after(self.settings.heartbeat):
                try:
                    data = await receive.receive()
                except trio.EndOfChannel:
                    return
            await self._write(stream, conn.send(h11.Data(data=data)))

    async def _until_client_leaves(
        self, stream: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """End the stream as soon as the client closes (frees its slot without waiting
        for the next heartbeat); a client that sends more than 64 KiB is dropped too."""
        received = 0
        try:
            while received < 64 * 1024:
                chunk = await stream.receive_some(8192)
                if not chunk:
                    break
                received += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    # --- writing -------------------------------------------------------------------------

    def _head(self, response: Response, *, streaming: bool = False) -> h11.Response:
        headers = [("Content-Type", response.content_type)]
        if not streaming:
            headers.append(("Content-Length", str(len(response.body))))
        csp = dashboard.CSP if response.content_type == _HTML else _API_CSP
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
        head_only: bool,
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
            with trio.move_on_after(1.0):
                received = 0
                while received < 64 * 1024:
                    chunk = await stream.receive_some(8192)
                    if not chunk:
                        break
                    received += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


__all__ = [
    "AdminServer",
    "open_listeners",
    "AdminSettings",
    "EventHub",
    "HttpRequest",
    "cookie_value",
    "encode_event",
    "host_allowed",
    "parse_filters",
]
