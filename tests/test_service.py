"""Service: policy -> limits -> callback -> record, under the virtual clock.

No sockets: the connector records dials, so addresses outside loopback appear
here only as values.
"""

from __future__ import annotations

import ipaddress
import os

import msgspec
import pytest
import structlog
import trio

from registry import config as config_mod
from registry import service as service_mod
from registry.defense.ratelimit import Allowed, Busy
from registry.errors import ProtocolError
from registry.model import Code, Diagnosis, Endpoint, Protocol, Request, Status
from registry.net.interfaces import is_local_address
from registry.service import CallResult, RandomPool, Service, StoreUnavailable
from tests.fakes import ListRecorder, ScriptedConnector

LOCAL = Endpoint(ipaddress.ip_address("127.0.0.1"), 40000)
LAN = Endpoint(ipaddress.ip_address("192.0.2.10"), 40000)  # documentation range: never dialled here


def make(
    cfg_text: str = "", **connector: object
) -> tuple[Service, ScriptedConnector, ListRecorder]:
    cfg = config_mod.loads(cfg_text)
    conn = ScriptedConnector(**connector)  # type: ignore[arg-type]
    rec = ListRecorder()
    counter = iter(range(1, 10_000))
    service = Service(
        cfg,
        is_local=is_local_address,
        connector=conn,
        recorder=rec,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )
    return service, conn, rec


def req(host: str, port: int = 15000, **kw: object) -> Request:
    return Request(ipaddress.ip_address(host), port, **kw)  # type: ignore[arg-type]


async def test_ok_registration_dials_the_canonical_address_and_records_once() -> None:
    service, conn, rec = make()
    outcome = await service.register(req("127.0.0.1", student="alice"), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.status is Status.OK and outcome.code is Code.CONNECTED
    assert outcome.verified is True and outcome.diagnosis is Diagnosis.DIRECT
    assert [str(d.target) for d in conn.dials] == ["127.0.0.1:15000"]
    assert conn.dials[0].reg_id == outcome.id and conn.dials[0].wait_echo is True
    assert [(r.id, r.status, r.student) for r in rec.records] == [(outcome.id, "OK", "alice")]


async def test_source_mismatch_is_denied_without_dialling() -> None:
    service, conn, rec = make()
    outcome = await service.register(req("192.0.2.99"), LAN, Protocol.TEXT, 1.0)
    assert outcome.code is Code.SOURCE_MISMATCH and outcome.status is Status.DENIED
    assert outcome.diagnosis is not None
    assert conn.dials == [] and [r.code for r in rec.records] == ["source_mismatch"]


async def test_port_outside_range_is_denied() -> None:
    service, conn, _ = make('[policy]\nports = ["10000-20000"]')
    outcome = await service.register(req("127.0.0.1", 9999), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.code is Code.PORT_NOT_ALLOWED and conn.dials == []


@pytest.mark.parametrize(
    ("verify", "required_by_policy", "echoed", "code", "wait_echo"),
    [
        (None, False, True, Code.CONNECTED, True),
        (None, False, False, Code.CONNECTED, True),
        (True, False, False, Code.NOT_VERIFIED, True),
        (True, False, True, Code.CONNECTED, True),
        (None, True, False, Code.NOT_VERIFIED, True),
        (False, True, False, Code.CONNECTED, False),
    ],
)
async def test_verification_modes(
    verify: bool | None, required_by_policy: bool, echoed: bool, code: Code, wait_echo: bool
) -> None:
    text = "[callback]\nrequire_verification = true" if required_by_policy else ""
    service, conn, _ = make(text, result=CallResult(Code.CONNECTED, "ok", 2.0, echoed))
    outcome = await service.register(req("127.0.0.1", verify=verify), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.code is code
    assert conn.dials[0].wait_echo is wait_echo


@pytest.mark.parametrize(
    "code", [Code.CONNECTION_REFUSED, Code.TIMEOUT, Code.UNREACHABLE, Code.RESET]
)
async def test_failed_callbacks_are_explained(code: Code) -> None:
    service, _, rec = make(result=CallResult(code, "detail-x"))
    outcome = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.status is Status.FAILED and outcome.code is code
    assert "127.0.0.1:15000" in outcome.explanation and "detail-x" in outcome.explanation
    assert rec.records[0].code == code.value


async def test_rate_limit_answers_busy_with_honest_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, conn, rec = make('[ratelimit]\nper_source = "2/minute"')
    codes = [
        (await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0.0)).code for _ in range(3)
    ]
    assert codes == [Code.CONNECTED, Code.CONNECTED, Code.RATE_LIMITED]
    busy = rec.records[-1]
    assert busy.status == "BUSY" and len(conn.dials) == 2
    last = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0.0)
    assert last.retry_after == 30
    await trio.sleep(30)
    assert (
        await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0.0)
    ).code is Code.CONNECTED


async def test_protocol_errors_are_recorded_as_error_outcomes() -> None:
    service, conn, rec = make()
    outcome = await service.reject(ProtocolError(Code.MALFORMED, "bad"), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.status is Status.ERROR and outcome.id
    assert [(r.code, r.peer) for r in rec.records] == [("malformed", "127.0.0.1:40000")]
    assert conn.dials == []


async def test_store_failure_is_never_reported_as_success() -> None:
    service, _, rec = make()
    rec.fail = True
    with pytest.raises(StoreUnavailable):
        await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 1.0)


async def test_callbacks_in_flight_are_capped(autojump_clock: trio.testing.MockClock) -> None:
    cfg = '[limits]\nmax_callbacks_in_flight = 2\nmax_callback_queue = 1\n[ratelimit]\nper_source = "100/second"\nper_target = "100/second"\nper_target_port = "100/second"'
    service, conn, _ = make(cfg, delay=10.0)
    results: list[tuple[float, Code]] = []

    async def one(port: int) -> None:
        outcome = await service.register(req("127.0.0.1", port), LOCAL, Protocol.TEXT, 0.0)
        results.append((trio.current_time(), outcome.code))

    async with trio.open_nursery() as nursery:
        for port in range(15000, 15004):
            nursery.start_soon(one, port)
    # Two dial at once, one waits its turn (10 s later), the fourth is turned away at once.
    assert sorted(results) == [
        (0.0, Code.OVERLOADED),
        (10.0, Code.CONNECTED),
        (10.0, Code.CONNECTED),
        (20.0, Code.CONNECTED),
    ]


async def test_token_auth_denies_without_a_valid_token() -> None:
    from registry.policy import auth

    text = '[auth]\nmode = "token"\nsecret = "s3cret"'
    service, conn, _ = make(text)
    good = auth.derive_token(b"s3cret", "alice")
    denied = await service.register(
        req("127.0.0.1", student="alice", token="nope"), LOCAL, Protocol.TEXT, 0
    )
    missing = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0)
    ok = await service.register(
        req("127.0.0.1", student="alice", token=good), LOCAL, Protocol.TEXT, 0
    )
    assert [denied.code, missing.code, ok.code] == [
        Code.UNAUTHORIZED,
        Code.UNAUTHORIZED,
        Code.CONNECTED,
    ]
    assert len(conn.dials) == 1


async def test_reconfigure_applies_new_limits(autojump_clock: trio.testing.MockClock) -> None:
    service, _, _ = make('[ratelimit]\nper_source = "1/hour"')
    assert (
        await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0)
    ).code is Code.CONNECTED
    assert (
        await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0)
    ).code is Code.RATE_LIMITED
    new = config_mod.loads('[ratelimit]\nper_source = "100/second"')
    service.reconfigure(new)
    await trio.sleep(1)
    assert (
        await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0)
    ).code is Code.CONNECTED
    assert service.config is new and msgspec.structs.asdict(service.config.ratelimit)


async def test_registry_out_of_sockets_is_busy_not_a_student_failure() -> None:
    service, _, rec = make(result=CallResult(Code.OVERLOADED, "EMFILE: Too many open files"))
    outcome = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 1.0)
    assert outcome.status is Status.BUSY and outcome.retry_after == 10
    assert "out of sockets" in outcome.explanation and rec.records[0].status == "BUSY"


async def test_bad_requests_do_not_drain_the_global_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, _, _ = make('[ratelimit]\nglobal = "2/hour"\nper_source = "100/second"')
    for _ in range(5):
        await service.reject(ProtocolError(Code.MALFORMED, "bad"), LOCAL, Protocol.TEXT, 0.0)
    ok = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0.0)
    assert ok.code is Code.CONNECTED


async def test_denied_requests_do_not_drain_the_global_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, conn, _ = make('[ratelimit]\nglobal = "1/hour"\nper_source = "100/second"')
    for _ in range(5):
        denied = await service.register(req("192.0.2.99"), LAN, Protocol.TEXT, 0.0)
        assert denied.code is Code.SOURCE_MISMATCH
    ok = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 0.0)
    assert ok.code is Code.CONNECTED and len(conn.dials) == 1
    again = await service.register(req("127.0.0.1", 15001), LOCAL, Protocol.TEXT, 0.0)
    assert again.code is Code.RATE_LIMITED  # the global bucket still bounds callbacks


# --- source_paid (the TCP door took the source's token) and expiries -------------


async def test_source_paid_requests_skip_the_source_bucket() -> None:
    service, conn, rec = make('[ratelimit]\nper_source = "1/hour"\n')
    for port in (15000, 15001, 15002):  # the door admitted each: no second source charge
        outcome = await service.register(
            req("127.0.0.1", port), LOCAL, Protocol.TEXT, 1.0, source_paid=True
        )
        assert outcome.code is Code.CONNECTED, outcome
    # without source_paid the same source is limited at once by its own bucket
    first = await service.register(req("127.0.0.1", 15003), LOCAL, Protocol.TEXT, 1.0)
    second = await service.register(req("127.0.0.1", 15004), LOCAL, Protocol.TEXT, 1.0)
    assert first.code is Code.CONNECTED and second.code is Code.RATE_LIMITED


async def test_a_paid_protocol_error_costs_a_second_token() -> None:
    service, _, rec = make('[ratelimit]\nper_source = "3/hour"\n')
    error = ProtocolError(Code.MALFORMED, "bad")
    limiter, now = service.limiter, service.clock()
    assert isinstance(limiter.admit(LOCAL.host, now), Allowed)  # (1)
    outcome = await service.reject(error, LOCAL, Protocol.TEXT, 1.0, source_paid=True)  # (2)
    assert outcome.code is Code.MALFORMED  # never BUSY: it paid at the door
    assert isinstance(limiter.admit(LOCAL.host, now), Allowed)  # (3)
    assert isinstance(limiter.admit(LOCAL.host, now), Busy)
    assert [r.code for r in rec.records] == ["malformed"]


async def test_reject_many_records_each_connection_before_returning() -> None:
    service, conn, rec = make('[ratelimit]\nper_source = "2/hour"\n')
    peers = [Endpoint(ipaddress.ip_address("127.0.0.9"), 40000 + n) for n in range(3)]
    seen: list[str] = []
    service.observers.append(lambda r: seen.append(r.id))
    # each log line is made inside its own connection's context
    contexts: list[dict] = []
    service.observers.append(lambda r: contexts.append(structlog.contextvars.get_contextvars()))
    errors = [
        ProtocolError(Code.READ_TIMEOUT, "no request arrived"),
        ProtocolError(Code.MALFORMED, "bad"),
        ProtocolError(Code.BAD_JSON, "not json"),
    ]
    protocols = [Protocol.TEXT, Protocol.TEXT, Protocol.JSON]
    outcomes = await service.reject_many(
        [
            (e, p, pr, 1_700_000_000.0 + n, 70 + n)
            for n, (e, p, pr) in enumerate(zip(errors, peers, protocols, strict=True))
        ]
    )
    assert [o.code for o in outcomes] == [Code.READ_TIMEOUT, Code.MALFORMED, Code.BAD_JSON]
    assert len({o.id for o in outcomes}) == 3  # one id, row and log line each
    assert [(r.id, r.code, r.peer, r.protocol, r.received_at) for r in rec.records] == [
        (o.id, o.code.value, str(p), pr.value, 1_700_000_000.0 + n)
        for n, (o, p, pr) in enumerate(zip(outcomes, peers, protocols, strict=True))
    ]
    assert seen == [o.id for o in outcomes]
    assert contexts == [
        {"conn_id": 70 + n, "peer": str(p), "protocol": pr.value}
        for n, (p, pr) in enumerate(zip(peers, protocols, strict=True))
    ]
    assert structlog.contextvars.get_contextvars() == {}  # and reset after each
    assert service.outcomes[Status.ERROR] == 3 and conn.dials == []
    # each one cost its source a second token (two were left of "2/hour")
    assert not service.limiter.penalize(peers[0].host, service.clock())


async def test_under_pressure_errors_past_the_first_ten_are_recorded_not_logged() -> None:
    # errors_global 5/hour: from the 6th protocol error on the registry is under
    # pressure. Every error still gets its row, id and observers; while under
    # pressure, past the first LOGGED_ERRORS (10) lines of a window, their log
    # lines are summed (take_unlogged) instead. Registrations are always logged.
    # (No fines: they would refuse the registration; pressure is measured all the same.)
    service, _, rec = make(
        '[ratelimit]\nper_source = "1000/second"\nper_target = "1000/second"\n'
        'per_target_port = "1000/second"\nglobal = "1000/second"\n'
        '[tuning]\nerrors_global = "5/hour"\nerror_fine = 0\n'
    )
    seen: list[str] = []
    service.observers.append(lambda r: seen.append(r.id))
    codes = [Code.MALFORMED] * 20 + [Code.BAD_JSON] * 5 + [Code.READ_TIMEOUT] * 5
    batch = [
        (ProtocolError(code, "junk"), LOCAL, Protocol.TEXT, 1.0, n) for n, code in enumerate(codes)
    ]
    with structlog.testing.capture_logs() as logs:
        outcomes = await service.reject_many(batch)
        ok = await service.register(req("127.0.0.1"), LOCAL, Protocol.TEXT, 1.0)
        unlogged = service.take_unlogged()
        again = service.take_unlogged()
    assert len(rec.records) == 31 and seen == [r.id for r in rec.records]  # all recorded
    assert ok.status is Status.OK
    lines = [e for e in logs if e["event"] == "registration"]
    logged = [e["id"] for e in lines]
    # the batch put the registry under pressure (as of its lines): ten lines, then OK's
    assert logged == [o.id for o in outcomes[:10]] + [ok.id]
    assert unlogged == {"malformed": 10, "bad_json": 5, "read_timeout": 5} and again == {}
    more = await service.reject_many(batch[:11])  # a new window: ten lines again
    assert service.take_unlogged() == {"malformed": 1} and len(more) == 11


async def test_errors_without_the_door_count_toward_pressure_too() -> None:
    # UDP, or a system without the waiting room: the source did not pay at the door,
    # so reject() charges its token itself; the error still counts toward
    # errors_global, so "under pressure" (which sums the log lines) stays true.
    service, _, rec = make(
        '[ratelimit]\nper_source = "1000/second"\n[tuning]\nerrors_global = "2/hour"\n'
    )
    for n in range(3):
        outcome = await service.reject(
            ProtocolError(Code.MALFORMED, "junk"), LOCAL, Protocol.TEXT, 1.0
        )
        assert outcome.code is Code.MALFORMED
        assert service.limiter.under_pressure is (n == 2), n
    assert len(rec.records) == 3


async def test_a_fined_error_tells_its_wait_and_an_unfined_one_does_not() -> None:
    # errors_global 1/hour, per_source 10/minute, fines of 30: the second error is
    # under pressure and fined; its reply says how long (retry_after, explanation).
    # Without the door (source_paid False) the source is not fined: nothing to tell.
    service, _, rec = make(
        '[ratelimit]\nper_source = "10/minute"\n[tuning]\nerrors_global = "1/hour"\nerror_fine = 30\n'
    )
    junk = [(ProtocolError(Code.MALFORMED, "junk"), LOCAL, Protocol.TEXT, 1.0, n) for n in range(2)]
    first, fined = await service.reject_many(junk)
    assert first.retry_after is None and first.explanation == "junk"
    assert fined.retry_after == 66 and fined.code is Code.MALFORMED
    assert fined.explanation == (
        "junk (the registry is flooded with bad requests: your address may connect again in 66 s)"
    )
    paid = await service.reject(
        ProtocolError(Code.MALFORMED, "junk"), LAN, Protocol.TEXT, 1.0, source_paid=True
    )
    assert paid.retry_after == 66
    unpaid = await service.reject(ProtocolError(Code.MALFORMED, "junk"), LOCAL, Protocol.UDP, 1.0)
    assert unpaid.status is Status.BUSY  # LOCAL is in debt: refused, as before
    other = Endpoint(ipaddress.ip_address("127.0.0.2"), 40000)
    unfined = await service.reject(ProtocolError(Code.MALFORMED, "junk"), other, Protocol.UDP, 1.0)
    assert unfined.retry_after is None and unfined.explanation == "junk"
    assert len(rec.records) == 5  # each recorded


async def test_reject_many_store_failure_raises() -> None:
    service, _, rec = make()
    rec.fail = True
    with pytest.raises(StoreUnavailable):
        await service.reject_many(
            [(ProtocolError(Code.READ_TIMEOUT, "x"), LOCAL, Protocol.TEXT, 1.0, 1)]
        )
    assert service.outcomes[Status.ERROR] == 0


@pytest.mark.parametrize(
    ("line", "peer", "mode", "code"),
    [
        ("127.0.0.1:15000", "127.0.0.1", "strict", Code.CONNECTED),
        ('{"host": "127.0.0.1", "port": 15000}', "127.0.0.1", "strict", Code.CONNECTED),
        ('{"host": "::ffff:7f00:1", "port": 15000}', "127.0.0.1", "strict", Code.CONNECTED),
        ("[::ffff:127.0.0.1]:15000", "::ffff:127.0.0.1", "strict", Code.CONNECTED),
        ("192.0.2.10:15000", "127.0.0.1", "strict", Code.SOURCE_MISMATCH),
        ("[2002:c000:20a::]:15000", "127.0.0.1", "nat-observed", Code.CONNECTED),
        ("[fe80::1]:15000", "2001:db8::5", "strict", Code.ADDRESS_NOT_ALLOWED),
    ],
)
async def test_one_registration_normalises_each_address_once(
    monkeypatch: pytest.MonkeyPatch, line: str, peer: str, mode: str, code: Code
) -> None:
    """From the wire to the recorded outcome, each address is analysed once: the
    advertised host where the parser builds it, the peer where the edge does."""
    from registry.net import tcp
    from registry.policy.addresses import Address, dotted_quad
    from registry.protocol.jsonl import parse_json
    from registry.protocol.text import parse_line

    service, _, _ = make(f'[policy]\nmode = "{mode}"')
    service.own = frozenset({tcp.endpoint_of(("127.0.0.1", 9000))})
    analyse = Address._analyse
    analysed: list[str] = []

    def counted(self: Address) -> object:
        analysed.append(str(self))
        return analyse(self)

    monkeypatch.setattr(Address, "_analyse", counted)
    tcp._host.cache_clear()  # the edge's parse cache would hide a second parse
    dotted_quad.cache_clear()  # and so would the parser's, from an earlier test
    request = parse_json(line) if line.startswith("{") else parse_line(line.encode() + b"\n")
    seen = tcp.endpoint_of((peer, 40000))
    local = tcp.endpoint_of(("127.0.0.1", 9000))
    outcome = await service.register(request, seen, Protocol.TEXT, 1.0, local)
    assert outcome.code is code, outcome.explanation
    assert len(analysed) == 2, analysed  # the advertised host and the peer, once each


def test_random_pool_hands_out_each_random_byte_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids and nonces come from a pooled os.urandom: consecutive, never repeated slices."""
    reads: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        reads.append(real(n))
        return reads[-1]

    monkeypatch.setattr(os, "urandom", urandom)
    pool = RandomPool(size=16)
    out = [pool(6), pool(6), pool(6), pool(20), pool(1)]
    assert [len(r) for r in reads] == [16, 16, 20, 16]  # a refill drops a too-short tail
    assert out[0] + out[1] == reads[0][:12] and out[2] == reads[1][:6]
    assert out[3] == reads[2] and out[4] == reads[3][:1]


def test_random_pool_of_a_forked_child_starts_empty() -> None:
    """A child must not hand out the ids its parent will (the pool is filled before fork)."""
    parent_first = service_mod._RANDOM(6)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, service_mod._RANDOM(6))
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 6)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 6 and child != service_mod._RANDOM(6) and parent_first
