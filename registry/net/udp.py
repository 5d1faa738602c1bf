"""UDP registration edge: text datagrams, stateless cookies, no amplification.

One socket per TCP listener address, same port (the exchange: docs/protocol.md,
"UDP"). Per datagram, in order: one the registry must never answer
(``protocol.loopguard``) is dropped and counted; too long: ``ERROR too_long``;
not a request: ``ERROR malformed``; no cookie this registry issued to this
source address and port: the challenge; else a registration in its own task,
answered with one datagram. The first three touch neither the store nor the
rate limiter: the source is unproven, and charging a forged address would hand
an attacker a weapon. Their answers have a budget of their own (``ReplyBudget``;
past it: dropped and counted), so a loop through a reflector the guard cannot
recognise dies within a few exchanges. A proven request takes a connection slot
as a TCP connection does, without waiting (``BUSY overloaded`` when none is
free), so a UDP burst never makes the door refuse TCP clients for ``total``. No
reply is larger than its request (``fit_reply``; SECURITY.md, "UDP amplification").
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import Counter
from collections.abc import Callable

import structlog
import trio

from registry.config import CallbackConfig, Config
from registry.defense.conncaps import ConnectionCaps
from registry.defense.ratelimit import ReplyBudget, source_of
from registry.errors import ProtocolError
from registry.model import Code, Endpoint, Outcome, Protocol, Request
from registry.net.connector import describe, map_os_error
from registry.net.tcp import endpoint_of
from registry.protocol.callback import callback_line
from registry.protocol.cookies import CookieJar
from registry.protocol.loopguard import DropReason, classify
from registry.protocol.reply import format_reply
from registry.protocol.text import parse_line
from registry.service import (
    CallResult,
    Connector,
    Service,
    StoreUnavailable,
    store_failure_outcome,
)

log = structlog.get_logger(component="udp")

TRUNCATED = b" ..."
# Without an echo to wait for (verify=no), wait this long for an ICMP "port
# unreachable" so that a target with nothing listening still reads as refused.
REFUSAL_GRACE = 0.25
SECRET_BYTES = 32


# ----------------------------------------------------------------- datagram shapes


def fit_reply(line: bytes, limit: int) -> bytes | None:
    """``line`` cut to at most ``limit`` bytes, or None when not even its head fits.

    The head is the first two words (``STATUS CODE``, or ``COOKIE cookie=V``);
    after it, whole words are kept while they fit with the `` ...`` that marks
    a cut. The trailing LF goes first (a datagram needs no terminator), so the
    content is kept as long as possible. Never longer than ``limit``.
    """
    body = line.rstrip(b"\r\n")
    if len(body) <= limit:
        return body + b"\n" if len(body) < limit else body
    words = body.split(b" ")
    out = b" ".join(words[:2])
    if len(out) > limit:
        return None
    for word in words[2:]:
        if len(out) + 1 + len(word) + len(TRUNCATED) > limit:
            break
        out += b" " + word
    for tail in (TRUNCATED + b"\n", TRUNCATED, b"\n", b""):
        if len(out) + len(tail) <= limit:
            return out + tail
    return out  # pragma: no cover (the empty tail always fits)


def challenge_reply(cookie: str, pad: int, limit: int) -> bytes | None:
    """The cookie challenge fitted to ``limit`` bytes, always with its ``pad=N``.

    Longest first: with the explanation, then bare ``COOKIE cookie=V pad=N``;
    when even that does not fit, ``COOKIE pad=N`` (retry padded, then you get
    a cookie); None when nothing fits.
    """
    compact = f"COOKIE cookie={cookie} pad={pad}"
    full = (
        f"{compact} send the same request again with cookie={cookie} added, "
        f"padded with spaces to {pad} bytes so that the whole reply fits"
    )
    for line in (full, compact):
        out = fit_reply(line.encode("ascii"), limit)
        if out is not None and out.startswith(compact.encode("ascii")):
            return out
    return fit_reply(f"COOKIE pad={pad}".encode("ascii"), limit)


def error_reply(error: ProtocolError, limit: int) -> bytes | None:
    """An ERROR line for a datagram that is not a request (nothing recorded: the source is unproven)."""
    return fit_reply(format_reply(Outcome(code=error.code, explanation=error.explanation)), limit)


# ----------------------------------------------------------------------- connector


class UdpConnector:
    """The UDP callback: one datagram to the target, then wait for its echo.

    The echo: CONNECTED verified; another datagram from the target: CONNECTED
    unverified; an ICMP refusal: connection_refused; silence: timeout (UDP cannot
    tell a silent server from none), but without ``wait_echo`` CONNECTED
    unverified after ``REFUSAL_GRACE``. ``config`` is read per callback (reloads).
    """

    def __init__(self, config: Callable[[], CallbackConfig]) -> None:
        self.config = config

    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult:
        cfg = self.config()
        family = socket.AF_INET6 if target.host.version == 6 else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        started = trio.current_time()
        try:
            with sock:
                # connect(): the kernel then delivers only the target's datagrams,
                # and reports its ICMP errors to us.
                await sock.connect((target.host.compressed, target.port))
                await sock.send(callback_line(reg_id, nonce, cfg.greeting))
                wait = cfg.verify_timeout if wait_echo else min(REFUSAL_GRACE, cfg.verify_timeout)
                answered, verified = await self._await_echo(sock, nonce, wait, cfg)
        except OSError as e:
            return CallResult(map_os_error(e), describe(e))
        rtt_ms = (answered - started) * 1000.0 if answered is not None else None
        if verified:
            return CallResult(Code.CONNECTED, "the echo datagram arrived", rtt_ms, True)
        if answered is not None:
            return CallResult(Code.CONNECTED, "the target answered without the nonce", rtt_ms)
        if wait_echo:
            return CallResult(
                Code.TIMEOUT, f"no datagram came back within {cfg.verify_timeout:g} s"
            )
        return CallResult(Code.CONNECTED, "datagram sent; no echo awaited (verify=no)")

    async def _await_echo(
        self, sock: trio.socket.SocketType, nonce: str, wait: float, cfg: CallbackConfig
    ) -> tuple[float | None, bool]:
        """(time of the first datagram back or None, whether one held ``nonce=NONCE``)."""
        needle = f"nonce={nonce}".encode("ascii")
        first: float | None = None
        budget = cfg.max_response_bytes
        with trio.move_on_after(wait):
            while budget > 0:
                data = await sock.recv(2048)
                if first is None:
                    first = trio.current_time()
                if needle in data:
                    return first, True
                budget -= max(len(data), 1)  # empty datagrams count too: bounded work
        return first, False


# ---------------------------------------------------------------------------- edge


def budget_settings(cfg: Config) -> tuple:  # type: ignore[type-arg]
    """``ReplyBudget``'s settings in ``cfg`` (the server applies them at start and reload)."""
    u, r = cfg.udp, cfg.ratelimit
    return (u.unproven_per_source, u.unproven_global, r.ipv6_prefix, r.max_entries)


class UdpEdge:
    """One UDP socket's registrations: ``await nursery.start(edge.serve, handlers)``.

    Every socket of a registry shares ``cookies``, ``budget`` and ``dropped`` (a
    source may reach either family), and ``admission``, the TCP accept loops'.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        service: Service,
        cookies: CookieJar,
        cfg_getter: Callable[[], Config],
        *,
        connector: Connector | None = None,
        caps: ConnectionCaps | None = None,
        admission: trio.CapacityLimiter | None = None,
        budget: ReplyBudget | None = None,
        dropped: Counter[str] | None = None,
    ) -> None:
        self.sock = sock
        self.service = service
        self.cookies = cookies
        self.cfg = cfg_getter
        self.connector = connector or UdpConnector(lambda: cfg_getter().callback)
        self.caps = caps
        self.admission = admission
        self.budget = budget or ReplyBudget(*budget_settings(cfg_getter()))
        # Datagrams dropped unanswered, by DropReason (registry_udp_dropped_total).
        self.dropped: Counter[str] = dropped if dropped is not None else Counter()
        bound = endpoint_of(sock.getsockname())
        # Behind a wildcard the concrete local address is unknown (no IP_PKTINFO):
        # the policy's own-sockets rule then relies on the port alone.
        self.local = None if bound.host.is_unspecified else bound
        self.in_flight: set[tuple[Endpoint, bytes]] = set()

    async def serve(
        self,
        handlers: trio.Nursery | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; never raises for a client. Registrations run in
        ``handlers`` (the server's, so the drain's grace period covers them) or in
        a nursery of this task. The socket stays open: in-flight ones reply on it."""
        async with trio.open_nursery() as own:
            task_status.started()
            while True:
                try:
                    data, addr = await self.sock.recvfrom(self.cfg().udp.max_datagram_bytes + 1)
                except trio.ClosedResourceError:
                    return  # the server closed the socket: nothing more will arrive
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK):
                        return
                    # e.g. a queued ICMP error on some platforms: not fatal
                    log.debug("udp_recv_error", error=e.strerror)
                    await trio.lowlevel.checkpoint()
                    continue
                try:
                    await self.datagram(data, addr, handlers or own)
                except Exception as e:  # last resort: one bad datagram must not stop the loop
                    log.exception("udp_datagram_crashed", error=repr(e))

    def _refresh_cookies(self, now: float) -> None:
        """Rotate the secret once per window (idempotent: sockets share the jar)."""
        window = self.cfg().udp.cookie_window
        if window != self.cookies.window:
            self.cookies.window = float(window)  # a reload: cookies issued so far expire
        if self.cookies.rotation_due(now):
            self.cookies.rotate(os.urandom(SECRET_BYTES), now)

    async def send(self, reply: bytes | None, request_size: int, addr: tuple) -> None:  # type: ignore[type-arg]
        """Send ``reply`` if it is no larger than its request (it always is: fit_reply)."""
        if reply is None:
            return
        if len(reply) > request_size:  # the no-amplification rule, enforced at the last step
            log.error("udp_reply_too_large", size=len(reply), request_size=request_size)
            return
        try:
            await self.sock.sendto(reply, addr)
        except OSError as e:
            log.debug("udp_send_failed", error=e.strerror)

    def drop(self, reason: DropReason) -> None:
        self.dropped[reason] += 1

    async def answer_unproven(
        self,
        reply: bytes | None,
        size: int,
        addr: tuple,  # type: ignore[type-arg]
        peer: Endpoint,
        now: float,
    ) -> None:
        """Send a reply to a datagram without a valid cookie, if the reply budget allows."""
        if reply is None:
            return
        refused = self.budget.take(peer.host, now)
        if refused is not None:
            self.drop(DropReason.SOURCE_BUDGET if refused == "source" else DropReason.GLOBAL_BUDGET)
            return
        await self.send(reply, size, addr)

    async def datagram(self, data: bytes, addr: tuple, nursery: trio.Nursery) -> None:  # type: ignore[type-arg]
        """Handle one datagram: drop it, answer statelessly, or start a registration task."""
        cfg = self.cfg()
        size = len(data)
        never = classify(data, addr[1])
        if never is not None:
            self.drop(never)
            return
        peer = endpoint_of(addr)  # ::ffff:a.b.c.d is the IPv4 peer; replies go to raw addr
        now = trio.current_time()
        if size > cfg.udp.max_datagram_bytes:
            error = ProtocolError(
                Code.TOO_LONG,
                f"datagram longer than {cfg.udp.max_datagram_bytes} bytes; send one short "
                "line HOST:PORT[ key=value ...]",
            )
            await self.answer_unproven(error_reply(error, size), size, addr, peer, now)
            return
        try:
            request = parse_line(data, allow_cookie=True)
        except ProtocolError as e:
            await self.answer_unproven(error_reply(e, size), size, addr, peer, now)
            return
        self._refresh_cookies(now)
        if not self.cookies.check(request.cookie, peer, now):
            cookie = self.cookies.issue(peer, now)
            challenge = challenge_reply(cookie, cfg.udp.max_datagram_bytes, size)
            await self.answer_unproven(challenge, size, addr, peer, now)
            return
        key = (peer, data)
        if key in self.in_flight:
            return  # a retransmission: the first copy's reply answers it
        slot = source_of(peer.host, cfg.ratelimit.ipv6_prefix)
        token = self._admit(slot)
        if token is None:
            busy = Outcome(
                code=Code.OVERLOADED,
                retry_after=5,
                explanation="too many registrations in progress; retry shortly",
            )
            await self.send(fit_reply(format_reply(busy), size), size, addr)
            return
        self.in_flight.add(key)
        nursery.start_soon(self._register, request, peer, addr, key, slot, token)

    def _admit(self, slot: object) -> object | None:
        """A connection slot for a proven request, as a TCP connection takes one
        (admission token, then the caps), without waiting; None when none is free."""
        token = object()
        if self.admission is not None:
            try:
                self.admission.acquire_on_behalf_of_nowait(token)
            except trio.WouldBlock:
                return None
        if self.caps is not None and self.caps.acquire(slot) is not None:  # type: ignore[arg-type]
            if self.admission is not None:
                self.admission.release_on_behalf_of(token)
            return None
        return token

    def _release(self, slot: object, token: object) -> None:
        if self.caps is not None:
            self.caps.release(slot)  # type: ignore[arg-type]
        if self.admission is not None:
            self.admission.release_on_behalf_of(token)

    async def _register(
        self,
        request: Request,
        peer: Endpoint,
        addr: tuple,  # type: ignore[type-arg]
        key: tuple[Endpoint, bytes],
        slot: object,
        token: object,
    ) -> None:
        received_at = time.time()
        try:
            with structlog.contextvars.bound_contextvars(peer=str(peer), protocol="udp"):
                try:
                    # Shielded as on TCP: once its callback started, a registration is
                    # recorded even if the server starts draining.
                    with trio.CancelScope(shield=True):
                        outcome = await self.service.register(
                            request,
                            peer,
                            Protocol.UDP,
                            received_at,
                            self.local,
                            connector=self.connector,
                        )
                except StoreUnavailable:
                    outcome = store_failure_outcome(None)
        finally:
            self.in_flight.discard(key)
            self._release(slot, token)
        await self.send(fit_reply(format_reply(outcome), len(key[1])), len(key[1]), addr)
