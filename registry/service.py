"""The registration service: policy -> limits -> callback -> record -> outcome.

Everything with side effects arrives injected (``Connector``, ``Recorder``,
``Resolver`` and the clocks), so the same code runs under ``autojump_clock``
with a recording connector in unit tests and with real sockets in the daemon.
Every path returns an ``Outcome`` that has been recorded before it is
returned: the edge replies only with what the store already holds (SPEC
promise 6).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

import structlog
import trio

from registry import config as config_mod
from registry.config import Config
from registry.defense.conncaps import CallbackSlots
from registry.defense.ratelimit import ALLOWED, Allowed, Busy, RateLimiter
from registry.errors import ProtocolError
from registry.model import Code, Diagnosis, Endpoint, IPAddress, Outcome, Protocol, Request, Status
from registry.policy import auth
from registry.policy.decide import Allow, Deny, IsLocal, NeedsResolution, decide, decide_resolved
from registry.protocol.callback import make_nonce
from registry.store import Record

log = structlog.get_logger(component="service")


@dataclass(frozen=True, slots=True)
class CallResult:
    """What the connector saw: ``code`` is CONNECTED or one FAILED code."""

    code: Code
    detail: str
    rtt_ms: float | None = None
    verified: bool = False


class Connector(TypingProtocol):
    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult: ...


class Recorder(TypingProtocol):
    async def record(self, record: Record) -> None: ...

    async def record_many(self, records: Sequence[Record]) -> None: ...


class Resolver(TypingProtocol):
    async def resolve(self, name: str, port: int) -> list[IPAddress]: ...


class StoreUnavailable(Exception):
    """The outcome could not be recorded; the edge must not claim success."""


LOGGED_ERRORS = 10  # protocol errors logged one by one per log window, under pressure

_FAILED_EXPLANATION = {
    Code.CONNECTION_REFUSED: "the callback reached {target} but nothing was listening on port {port} "
    "(connection refused): start your server first, on the same port you advertised",
    Code.TIMEOUT: "the callback to {target} got no answer in time: a firewall may be dropping "
    "incoming connections, or the address is not this machine's",
    Code.UNREACHABLE: "the registry has no route to {target}: the address is not reachable "
    "from the registry's network",
    Code.RESET: "{target} accepted and then reset the callback connection",
    Code.NOT_VERIFIED: "{target} accepted the callback but did not echo the nonce, and "
    "verification was required: your server must write back a line containing nonce=...",
}


class Service:
    """Turns one parsed request (or one protocol error) into one recorded Outcome."""

    def __init__(
        self,
        config: Config,
        *,
        connector: Connector,
        recorder: Recorder,
        resolver: Resolver | None = None,
        own: frozenset[Endpoint] = frozenset(),
        is_local: IsLocal,
        clock: Callable[[], float] = trio.current_time,
        wallclock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.connector = connector
        self.recorder = recorder
        self.resolver = resolver
        self.own = own
        # Is an address this host's? Behind a wildcard listener every host address
        # reaches our ports (self_target). Always injected: asking the host is the
        # edge's work (net/interfaces.py), and there is no safe guess without it.
        self.is_local = is_local
        self.clock = clock
        self.wallclock = wallclock
        self.random_bytes = random_bytes
        self.limiter = RateLimiter(config.ratelimit)
        self.slots = CallbackSlots(
            config.limits.max_callbacks_in_flight, config.limits.max_callback_queue
        )
        self.dialing = trio.CapacityLimiter(config.limits.max_callbacks_in_flight)
        self.config = config
        self.secret = config_mod.auth_secret(config)
        self.outcomes: dict[Status, int] = dict.fromkeys(Status, 0)
        # Under pressure, protocol errors past the first LOGGED_ERRORS of a log window
        # are recorded (row, id, observers) but counted here instead of logged one by
        # one: take_unlogged() sums them up for the server's periodic line.
        self._logged_errors = 0
        self._unlogged: dict[str, int] = {}
        # Called with every recorded Record (metrics, the dashboard's live feed).
        # Observers must be quick and must not raise: they run on the request path.
        self.observers: list[Callable[[Record], None]] = []

    def reconfigure(self, config: Config) -> None:
        """Swap in a new config (SIGHUP): one attribute assignment per part, no await between."""
        self.limiter.reconfigure(config.ratelimit)
        self.slots.reconfigure(
            config.limits.max_callbacks_in_flight, config.limits.max_callback_queue
        )
        self.dialing.total_tokens = config.limits.max_callbacks_in_flight
        self.secret = config_mod.auth_secret(config)
        self.config = config

    def new_id(self) -> str:
        return self.random_bytes(6).hex()

    async def register(
        self,
        request: Request,
        peer: Endpoint,
        protocol: Protocol,
        received_at: float,
        local: Endpoint | None = None,
        connector: Connector | None = None,
        *,
        source_paid: bool = False,
    ) -> Outcome:
        """Run one registration to its recorded outcome. Never raises but StoreUnavailable.

        ``local`` is the registry's own address on this connection, counted as
        ours for self_target even where no ``is_local`` predicate knows it (the
        injected one covers every other address of this host). ``connector``
        overrides the default dialler (UDP registrations are called back over UDP).
        ``source_paid``: the connection already took its source's rate-limit
        token at the door (registry/defense/door.py), so only the target and global
        buckets are checked here.
        """
        started = self.clock()
        reg_id = self.new_id()
        own = self.own if local is None else self.own | {local}
        outcome = await self._decide_and_call(
            request, peer, reg_id, own, connector or self.connector, source_paid
        )
        outcome = outcome.with_(
            id=reg_id,
            advertised=request.advertised,
            observed=str(peer),
            student=request.student,
        )
        return await self._finish(outcome, peer, protocol, received_at, started)

    async def reject(
        self,
        error: ProtocolError,
        peer: Endpoint,
        protocol: Protocol,
        received_at: float,
        *,
        source_paid: bool = False,
    ) -> Outcome:
        """Record and return the ERROR outcome of a request that could not be parsed.

        A bad request costs its source a token like any other; one whose source
        already paid at the door (``source_paid``) costs it a second one, if
        there is one left (``RateLimiter.penalize``).
        """
        started = self.clock()
        if source_paid:  # it paid at the door; junk pays a second token (penalize)
            self.limiter.penalize(peer.host, started)
            busy = None
        else:
            busy = self.limiter.admit(peer.host, started)
            if not isinstance(busy, Busy):  # recorded as an error: it counts toward pressure
                self.limiter.note_error(started)
        if isinstance(busy, Busy):
            outcome = _busy(busy)
        elif source_paid:  # penalized: perhaps fined
            outcome = self._error_outcome(error, peer, started)
        else:
            outcome = Outcome(code=error.code, explanation=error.explanation)
        outcome = outcome.with_(id=self.new_id(), observed=str(peer))
        return await self._finish(outcome, peer, protocol, received_at, started)

    async def _decide_and_call(
        self,
        request: Request,
        peer: Endpoint,
        reg_id: str,
        own: frozenset[Endpoint],
        connector: Connector,
        source_paid: bool,
    ) -> Outcome:
        denied = auth.authorize(request, self.config.auth, self.secret)
        decision = (
            denied if denied is not None else await self._decide(request, peer, own, source_paid)
        )
        if isinstance(decision, Busy):
            return _busy(decision)
        target = decision.target if isinstance(decision, Allow) else None
        # The global bucket bounds callbacks; a refused request makes none, so it
        # pays only its source's token and cannot starve honest students.
        busy = self._charge(peer.host, target, source_paid)
        if isinstance(busy, Busy):
            return _busy(busy)
        if isinstance(decision, Deny):
            return Outcome(
                code=decision.code,
                explanation=decision.explanation,
                diagnosis=decision.diagnosis,
                target=request.advertised,
            )
        for note in decision.report_only:
            log.warning("policy_report_only", note=note, target=str(decision.target))
        return await self._callback(request, decision, reg_id, connector)

    def _charge(self, source: IPAddress, target: Endpoint | None, paid: bool) -> Allowed | Busy:
        """A decided request's tokens: a callback's (``target``), else the source's alone,
        which a source that ``paid`` at the door has paid already."""
        now, limiter = self.clock(), self.limiter
        if target is None:
            return ALLOWED if paid else limiter.admit(source, now)
        return limiter.paid_callback(target, now) if paid else limiter.callback(source, target, now)

    async def _decide(
        self, request: Request, peer: Endpoint, own: frozenset[Endpoint], source_paid: bool
    ) -> Allow | Deny | Busy:
        policy = self.config.policy
        decision = decide(request, peer, policy, own, self.is_local)
        if not isinstance(decision, NeedsResolution):
            return decision
        # A source that is already limited must not make us send DNS queries:
        # look (without taking) before resolving; the real check follows. (A
        # source that paid at the door was admitted there, under this same limit.)
        if not source_paid:
            busy = self.limiter.peek(peer.host, self.clock())
            if isinstance(busy, Busy):
                return busy
        if self.resolver is None:
            return Deny(
                Code.HOSTNAME_NOT_ALLOWED,
                "this registry does not resolve hostnames",
                Diagnosis.HOSTNAME,
            )
        try:
            with trio.fail_after(policy.resolve_timeout):
                addresses = await self.resolver.resolve(decision.name, decision.port)
        except (OSError, trio.TooSlowError) as e:
            return Deny(
                Code.HOSTNAME_NOT_ALLOWED,
                f"could not resolve {decision.name!r} ({type(e).__name__}); advertise an IP address",
                Diagnosis.HOSTNAME,
            )
        return decide_resolved(request, addresses, peer, policy, own, self.is_local)

    async def _callback(
        self, request: Request, allow: Allow, reg_id: str, connector: Connector
    ) -> Outcome:
        target = allow.target
        if not self.slots.admit():
            return Outcome(
                code=Code.OVERLOADED,
                retry_after=5,
                explanation="too many callbacks are queued right now; try again in a few seconds",
                target=str(target),
                diagnosis=allow.diagnosis,
            )
        required = request.verify is True or (
            request.verify is None and self.config.callback.require_verification
        )
        nonce = make_nonce(self.random_bytes(8))
        try:
            async with self.dialing:
                result = await connector.call(
                    target, reg_id, nonce, wait_echo=request.verify is not False
                )
        finally:
            self.slots.done()
        common = {
            "target": str(target),
            "diagnosis": allow.diagnosis,
            "corrected": allow.corrected,
            "rtt_ms": result.rtt_ms,
        }
        if result.code is Code.OVERLOADED:  # we ran out of sockets, not the student's fault
            return Outcome(
                code=Code.OVERLOADED,
                retry_after=10,
                explanation="the registry is out of sockets for callbacks right now "
                f"({result.detail}); try again in a few seconds",
                **common,  # type: ignore[arg-type]
            )
        if result.code is not Code.CONNECTED:
            text = _FAILED_EXPLANATION.get(result.code, "{target}: callback failed")
            if allow.corrected:
                # nat-observed: we dialled the router, so the likely fix is a port forward.
                text = (
                    f"you advertised {request.advertised}; the registry called the address it "
                    "saw, {target}, which is probably your NAT router: forward port {port} on "
                    "the router to your server. Detail: " + text
                )
            return Outcome(
                code=result.code,
                explanation=text.format(target=target, port=target.port) + f" ({result.detail})",
                **common,  # type: ignore[arg-type]
            )
        if required and not result.verified:
            return Outcome(
                code=Code.NOT_VERIFIED,
                verified=False,
                explanation=_FAILED_EXPLANATION[Code.NOT_VERIFIED].format(target=target),
                **common,  # type: ignore[arg-type]
            )
        corrected = (
            f" (you advertised {request.advertised}; the registry called the address it saw)"
            if allow.corrected
            else ""
        )
        how = "and your server echoed the nonce" if result.verified else "(no nonce echo)"
        return Outcome(
            code=Code.CONNECTED,
            verified=result.verified,
            explanation=f"the registry connected to {target} {how}{corrected}",
            **common,  # type: ignore[arg-type]
        )

    async def _finish(
        self,
        outcome: Outcome,
        peer: Endpoint,
        protocol: Protocol,
        received_at: float,
        started: float,
    ) -> Outcome:
        duration_ms = (self.clock() - started) * 1000.0
        record = _record(outcome, peer, protocol, received_at, duration_ms)
        await self._commit([(outcome, record, None)])
        return outcome

    async def reject_many(
        self, rejected: Sequence[tuple[ProtocolError, Endpoint, Protocol, float, int]]
    ) -> list[Outcome]:
        """``reject`` for many connections at once (each: error, peer, protocol,
        arrival wall time, conn_id for the log line); raises StoreUnavailable.

        For the waiting room (registry/net/waiting.py), which reads requests
        without a task per connection: junk and stalls arrive together (a wave
        of stalled connections reaches its read deadline at once), and one
        store batch keeps that wave short. Each still gets its own id, row and
        ``registration`` log line, recorded before any reply is sent. Each
        source paid its token at the door; a protocol error costs it a second
        one (``RateLimiter.penalize``).
        """
        started = self.clock()
        done = []
        for error, peer, protocol, received_at, conn_id in rejected:
            self.limiter.penalize(peer.host, started)
            outcome = self._error_outcome(error, peer, started).with_(
                id=self.new_id(), observed=str(peer)
            )
            record = _record(outcome, peer, protocol, received_at, 0.0)
            done.append((outcome, record, conn_id))
        await self._commit(done)
        return [outcome for outcome, _, _ in done]

    async def _commit(self, done: list[tuple[Outcome, Record, int | None]]) -> None:
        """Record every outcome (one store batch), then count, observe and log each.

        ``int``: the connection's conn_id, bound (with peer and protocol) for its
        log line; None: the caller's log context already names the connection.
        """
        try:
            await self.recorder.record_many([record for _, record, _ in done])
        except Exception as e:  # the edge turns this into BUSY: never claim an unrecorded result
            log.error("record_failed", ids=[o.id for o, _, _ in done], error=repr(e))
            raise StoreUnavailable(str(e)) from e
        for n, (outcome, record, conn_id) in enumerate(done, 1):
            if conn_id is None:
                self._recorded(outcome, record)
                continue
            tokens = structlog.contextvars.bind_contextvars(
                conn_id=conn_id, peer=record.peer, protocol=record.protocol
            )
            self._recorded(outcome, record)
            structlog.contextvars.reset_contextvars(**tokens)
            if n % 4 == 0:  # a log line each (~60 us): let other tasks run between a few
                await trio.lowlevel.checkpoint()

    def _error_outcome(self, error: ProtocolError, peer: Endpoint, now: float) -> Outcome:
        """The ERROR reply to a bad request, after its price was taken. A source fined
        under pressure (``RateLimiter.penalize``) is told its wait here, with
        ``retry_after``, so its first refusal at the door is already one it was told
        about (``ban_after_ignored`` counts those)."""
        outcome = Outcome(code=error.code, explanation=error.explanation)
        if not self.limiter.fining:
            return outcome
        busy = self.limiter.owed(peer.host, now)
        if not isinstance(busy, Busy):
            return outcome
        return outcome.with_(
            retry_after=busy.retry_after,
            explanation=f"{error.explanation} (the registry is flooded with bad requests: "
            f"your address may connect again in {busy.retry_after} s)",
        )

    def take_unlogged(self) -> dict[str, int]:
        """Protocol errors recorded but not logged one by one since the last call (by
        code), and a fresh log window."""
        unlogged, self._unlogged, self._logged_errors = self._unlogged, {}, 0
        return unlogged

    def _recorded(self, outcome: Outcome, record: Record) -> None:
        """After the commit: counters, observers and the one canonical log line.

        Under pressure (``RateLimiter.under_pressure``: junk from thousands of
        addresses) a protocol error's line is the one cost left to cut: ~50 us
        of the ~150 us a recorded error costs, and thousands of lines a second
        that bury the rest of the log. Past ``LOGGED_ERRORS`` in a window they
        are summed instead (``take_unlogged``); the row and its id stay.
        """
        self.outcomes[outcome.status] += 1
        for observer in self.observers:
            try:
                observer(record)
            except Exception as e:  # an observer bug must not fail a registration
                log.error("observer_failed", observer=repr(observer), error=repr(e))
        if outcome.status is Status.ERROR and self.limiter.under_pressure:
            if self._logged_errors >= LOGGED_ERRORS:
                self._unlogged[outcome.code.value] = self._unlogged.get(outcome.code.value, 0) + 1
                return
            self._logged_errors += 1
        log.info(
            "registration",
            id=outcome.id,
            status=outcome.status.value,
            code=outcome.code.value,
            student=outcome.student,
            advertised=outcome.advertised,
            target=outcome.target,
            diagnosis=outcome.diagnosis.value if outcome.diagnosis else None,
            rtt_ms=outcome.rtt_ms,
            verified=outcome.verified,
            corrected=outcome.corrected or None,
            duration_ms=round(record.duration_ms or 0.0, 2),
        )


def _record(
    outcome: Outcome, peer: Endpoint, protocol: Protocol, received_at: float, duration_ms: float
) -> Record:
    return Record.from_outcome(
        outcome, protocol=protocol, peer=str(peer), received_at=received_at, duration_ms=duration_ms
    )


def _busy(busy: Busy) -> Outcome:
    return Outcome(
        code=Code.RATE_LIMITED,
        retry_after=busy.retry_after,
        explanation=f"too many registrations ({busy.scope} limit); "
        f"wait {busy.retry_after} s before trying again",
    )


def store_failure_outcome(reg_id: str | None) -> Outcome:
    """What a client hears when its outcome could not be recorded."""
    return Outcome(
        code=Code.OVERLOADED,
        id=reg_id,
        retry_after=10,
        explanation="the registry could not record this registration; try again shortly",
    )
