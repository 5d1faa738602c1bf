"""The registration service: policy -> limits -> callback -> record -> outcome.

Side effects arrive injected (``Connector``, ``Recorder``, ``Resolver``, the
clocks): unit tests run it under ``autojump_clock`` with a recording
connector. Every ``Outcome`` is recorded before it is returned: the edge
replies only with what the store already holds (SPEC promise 6).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

import structlog
import trio

from registry import config as config_mod
from registry import log as log_mod
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


@dataclass(slots=True)  # not frozen: one per callback (see model.Endpoint)
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
    async def record_many(self, records: Sequence[Record]) -> None: ...


class Resolver(TypingProtocol):
    async def resolve(self, name: str, port: int) -> list[IPAddress]: ...


class StoreUnavailable(Exception):
    """The outcome could not be recorded; the edge must not claim success."""


class RandomPool:
    """``os.urandom(n)`` served from a buffer read ``size`` bytes at a time: a
    registration takes 14 random bytes (id and nonce), and a getrandom syscall
    each was two syscalls per registration; now one per ~290. Every byte is
    handed out once; a forked child starts empty (``os.register_at_fork``)."""

    def __init__(self, size: int = 4096) -> None:
        self._size, self._buf, self._at = size, b"", 0

    def __call__(self, n: int) -> bytes:
        at, end = self._at, self._at + n
        if end > len(self._buf):
            self._buf, at, end = os.urandom(max(n, self._size)), 0, n
        self._at = end
        return self._buf[at:end]

    def clear(self) -> None:
        self._buf, self._at = b"", 0


_RANDOM = RandomPool()
os.register_at_fork(after_in_child=_RANDOM.clear)

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


_Who = dict[str, str | None]  # what every outcome of one registration carries (_who)


def _who(
    reg_id: str, observed: str, advertised: str | None = None, student: str | None = None
) -> _Who:
    """A request that could not be parsed advertised nothing and named nobody."""
    return {"id": reg_id, "advertised": advertised, "observed": observed, "student": student}


# One rejected request: error, peer, protocol, arrival (wall clock), conn_id for its log line.
Rejected = tuple[ProtocolError, Endpoint, Protocol, float, int]


class Service:
    """Turns one parsed request (or one protocol error) into one recorded Outcome.

    ``is_local`` (always injected: asking the host is the edge's work,
    net/interfaces.py) says whether an address is this host's, which behind a
    wildcard listener reaches our ports (self_target). ``observers`` get every
    recorded Record (metrics, the dashboard's feed): they run on the request
    path, so they must be quick and must not raise.
    """

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
        random_bytes: Callable[[int], bytes] = _RANDOM,
    ) -> None:
        self.connector = connector
        self.recorder = recorder
        self.resolver = resolver
        self.own = own
        self.is_local = is_local
        self.clock = clock
        self.random_bytes = random_bytes
        self.limiter = RateLimiter(config.ratelimit)
        self.slots = CallbackSlots(
            config.limits.max_callbacks_in_flight, config.limits.max_callback_queue
        )
        self.dialing = trio.CapacityLimiter(config.limits.max_callbacks_in_flight)
        self.config = config
        self.secret = config_mod.auth_secret(config)
        self.outcomes: dict[Status, int] = dict.fromkeys(Status, 0)
        self._logged_errors = 0  # see _recorded
        self._unlogged: dict[str, int] = {}
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

        ``local``: the registry's address on this connection, ours for
        self_target whatever ``is_local`` knows. ``connector`` overrides the
        default (UDP registrations are called back over UDP). ``source_paid``:
        the source's token was taken at the door (registry/defense/door.py).
        """
        started = self.clock()
        observed = str(peer)
        # Every outcome carries these: built with them once, not copied (a
        # dataclasses.replace of the 13 fields: -42,000 instructions per registration).
        who = _who(self.new_id(), observed, request.advertised, request.student)
        own = self.own if local is None else self.own | {local}
        outcome = await self._decide_and_call(
            request, peer, who, own, connector or self.connector, source_paid
        )
        duration_ms = (self.clock() - started) * 1000.0
        await self._commit(
            [(outcome, _record(outcome, observed, protocol, received_at, duration_ms), None)]
        )
        return outcome

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
        paid at the door costs a second one, if there is one left
        (``RateLimiter.penalize``), and may be fined (``_error_outcome``).
        """
        started = self.clock()
        who = _who(self.new_id(), str(peer))
        if source_paid:
            outcome = self._error_outcome(error, peer, started, who)
        elif isinstance(busy := self.limiter.admit(peer.host, started), Busy):
            outcome = _busy(busy, who)
        else:
            self.limiter.note_error(started)  # recorded as an error: it counts toward pressure
            outcome = Outcome(code=error.code, explanation=error.explanation, **who)
        duration_ms = (self.clock() - started) * 1000.0
        record = _record(outcome, who["observed"], protocol, received_at, duration_ms)
        await self._commit([(outcome, record, None)])
        return outcome

    async def reject_many(self, rejected: Sequence[Rejected]) -> list[Outcome]:
        """``reject`` (source paid) for many connections at once; raises StoreUnavailable.

        For the waiting room (registry/net/waiting.py): a wave of junk or
        stalls falls due together, and one store batch keeps the wave short.
        Each still gets its own id, row and log line, recorded before any reply.
        """
        started = self.clock()
        done = []
        for error, peer, protocol, received_at, conn_id in rejected:
            who = _who(self.new_id(), str(peer))
            outcome = self._error_outcome(error, peer, started, who)
            done.append(
                (outcome, _record(outcome, who["observed"], protocol, received_at, 0.0), conn_id)
            )
        await self._commit(done)
        return [outcome for outcome, _, _ in done]

    async def _decide_and_call(
        self,
        request: Request,
        peer: Endpoint,
        who: _Who,
        own: frozenset[Endpoint],
        connector: Connector,
        source_paid: bool,
    ) -> Outcome:
        denied = auth.authorize(request, self.config.auth, self.secret)
        decision = (
            denied if denied is not None else await self._decide(request, peer, own, source_paid)
        )
        if isinstance(decision, Busy):
            return _busy(decision, who)
        # The global bucket bounds callbacks; a refused request makes none, so it
        # pays only its source's token and cannot starve honest students.
        busy = self._charge(
            peer.host, decision.target if isinstance(decision, Allow) else None, source_paid
        )
        if isinstance(busy, Busy):
            return _busy(busy, who)
        if isinstance(decision, Deny):
            return Outcome(
                code=decision.code,
                explanation=decision.explanation,
                diagnosis=decision.diagnosis,
                target=request.advertised,
                **who,
            )
        for note in decision.report_only:
            log.warning("policy_report_only", note=note, target=str(decision.target))
        return await self._callback(request, decision, who, connector)

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
        # A limited source must not make us send DNS queries: look (without taking)
        # first. A source that paid at the door was admitted there, under this limit.
        if not source_paid and isinstance(busy := self.limiter.peek(peer.host, self.clock()), Busy):
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
        self, request: Request, allow: Allow, who: _Who, connector: Connector
    ) -> Outcome:
        target = allow.target
        shown = str(target)
        if not self.slots.admit():
            return Outcome(
                code=Code.OVERLOADED,
                retry_after=5,
                explanation="too many callbacks are queued right now; try again in a few seconds",
                target=shown,
                diagnosis=allow.diagnosis,
                **who,
            )
        required = request.verify is True or (
            request.verify is None and self.config.callback.require_verification
        )
        nonce = make_nonce(self.random_bytes(8))
        try:
            try:  # no scheduler round when a dialling slot is free
                self.dialing.acquire_nowait()
            except trio.WouldBlock:
                await self.dialing.acquire()
            try:
                result = await connector.call(
                    target, who["id"], nonce, wait_echo=request.verify is not False
                )
            finally:
                self.dialing.release()
        finally:
            self.slots.done()

        def outcome(code: Code, explanation: str, **more: object) -> Outcome:
            return Outcome(
                code=code,
                explanation=explanation,
                target=shown,
                diagnosis=allow.diagnosis,
                corrected=allow.corrected,
                rtt_ms=result.rtt_ms,
                **who,
                **more,  # type: ignore[arg-type]
            )

        if result.code is Code.OVERLOADED:  # we ran out of sockets, not the student's fault
            return outcome(
                Code.OVERLOADED,
                "the registry is out of sockets for callbacks right now "
                f"({result.detail}); try again in a few seconds",
                retry_after=10,
            )
        if result.code is not Code.CONNECTED:
            text = _FAILED_EXPLANATION.get(result.code, "{target}: callback failed")
            if allow.corrected:  # nat-observed: we dialled the router: a port forward fixes it
                text = (
                    f"you advertised {request.advertised}; the registry called the address it "
                    "saw, {target}, which is probably your NAT router: forward port {port} on "
                    "the router to your server. Detail: " + text
                )
            text = text.format(target=shown, port=target.port)
            return outcome(result.code, f"{text} ({result.detail})")
        if required and not result.verified:
            text = _FAILED_EXPLANATION[Code.NOT_VERIFIED].format(target=shown)
            return outcome(Code.NOT_VERIFIED, text, verified=False)
        how = "and your server echoed the nonce" if result.verified else "(no nonce echo)"
        if allow.corrected:
            how += f" (you advertised {request.advertised}; the registry called the address it saw)"
        return outcome(
            Code.CONNECTED,
            f"the registry connected to {shown} {how}",
            verified=result.verified,
        )

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

    def _error_outcome(
        self, error: ProtocolError, peer: Endpoint, now: float, who: _Who
    ) -> Outcome:
        """The ERROR reply to a bad request whose source paid at the door: it pays a
        second token (``RateLimiter.penalize``). A source fined under pressure is told
        its wait here, so its first refusal at the door is one it was told about
        (``ban_after_ignored`` counts those)."""
        self.limiter.penalize(peer.host, now)
        explanation, retry_after = error.explanation, None
        if self.limiter.fining and isinstance(busy := self.limiter.owed(peer.host, now), Busy):
            retry_after = busy.retry_after
            explanation = (
                f"{error.explanation} (the registry is flooded with bad requests: "
                f"your address may connect again in {retry_after} s)"
            )
        return Outcome(code=error.code, explanation=explanation, retry_after=retry_after, **who)

    def take_unlogged(self) -> dict[str, int]:
        """Protocol errors recorded but not logged one by one since the last call (by
        code), and a fresh log window."""
        unlogged, self._unlogged, self._logged_errors = self._unlogged, {}, 0
        return unlogged

    def _recorded(self, outcome: Outcome, record: Record) -> None:
        """After the commit: counters, observers and the one canonical log line.

        Under pressure (``RateLimiter.under_pressure``: junk from thousands of
        addresses) a protocol error's line is the one cost left to cut (~50 of
        its ~150 us), and thousands of lines a second would bury the log: past
        ``LOGGED_ERRORS`` a window they are summed (``take_unlogged``); the row
        and its id stay.
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
        # The enums themselves: msgspec writes a StrEnum's value, and each .value is a
        # Python-level property (~5k of the line's ~97k instructions).
        log_mod.registration_log.current().info(
            "registration",
            id=outcome.id,
            status=outcome.status,
            code=outcome.code,
            student=outcome.student,
            advertised=outcome.advertised,
            target=outcome.target,
            diagnosis=outcome.diagnosis,
            rtt_ms=outcome.rtt_ms,
            verified=outcome.verified,
            corrected=outcome.corrected or None,
            duration_ms=round(record.duration_ms or 0.0, 2),
        )


def _record(
    outcome: Outcome, peer: str, protocol: Protocol, received_at: float, duration_ms: float
) -> Record:
    return Record.from_outcome(
        outcome, protocol=protocol, peer=peer, received_at=received_at, duration_ms=duration_ms
    )


def _busy(busy: Busy, who: _Who | None = None) -> Outcome:
    return Outcome(
        code=Code.RATE_LIMITED,
        retry_after=busy.retry_after,
        explanation=f"too many registrations ({busy.scope} limit); "
        f"wait {busy.retry_after} s before trying again",
        **(who or {}),
    )


def store_failure_outcome(reg_id: str | None) -> Outcome:
    """What a client hears when its outcome could not be recorded."""
    return Outcome(
        code=Code.OVERLOADED,
        id=reg_id,
        retry_after=10,
        explanation="the registry could not record this registration; try again shortly",
    )
