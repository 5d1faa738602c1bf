"""The front door (registry/defense/door.py and its edge): refusals on arrival, before any byte.

Pure tables for ``Door`` and ``Window`` (time passed in); real loopback
sockets for ``Doorway`` (the edge that answers refusals); an in-process ``Registry`` for the whole path
(a refused connection gets its line, holds nothing afterwards, and leaves no
row, only counters).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from registry import config as config_mod
from registry.defense.conncaps import ConnectionCaps
from registry.defense.door import (
    PER_SOURCE,
    RATE_LIMITED,
    SILENT,
    TOTAL,
    Admitted,
    Door,
    Refused,
    told_of_ban,
)
from registry.defense.ratelimit import RateLimiter, source_network, source_of
from registry.defense.window import Window
from registry.model import Code, Outcome, Status
from registry.net.doorway import REAP_CHUNK, Doorway
from registry.server import Registry, Runtime
from tests.support import exchange_from

OPEN = {"per_target": "1000/second", "per_target_port": "1000/second", "global": "1000/second"}


def door(per_source: str, max_total: int = 100, max_per_source: int = 100) -> Door:
    cfg = config_mod.from_dict({"ratelimit": {**OPEN, "per_source": per_source}})
    return Door(ConnectionCaps(max_total, max_per_source), RateLimiter(cfg.ratelimit), 5.0)


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


# --- Door: (source, now, leave_after) -> expected ---------------------------------

# Each step: (source, now, expected) where expected is "in" or (reason, retry_after).
# Admitted connections stay open unless the script says ("leave", source).
SCRIPTS: dict[str, tuple[str, int, int, list[tuple[Any, ...]]]] = {
    "the source pays one token per connection": (
        "3/minute", 100, 100,
        [("10.0.0.1", 0.0, "in"), ("10.0.0.1", 0.0, "in"), ("10.0.0.1", 0.0, "in"),
         ("10.0.0.1", 0.0, (RATE_LIMITED, 20)),  # a token every 20 s
         ("10.0.0.1", 19.0, (RATE_LIMITED, 1)),
         ("10.0.0.1", 20.0, "in"),
         ("10.0.0.2", 20.0, "in")],  # another source has its own bucket
    ),
    "refused by the rate costs nothing more": (
        "1/minute", 100, 100,
        [("10.0.0.1", 0.0, "in")]
        + [("10.0.0.1", float(t), (RATE_LIMITED, 60 - t)) for t in range(0, 60, 7)]
        + [("10.0.0.1", 60.0, "in")],  # refusals did not push the next token back
    ),
    "per-source cap first, and it takes no token": (
        "2/minute", 100, 1,
        [("10.0.0.1", 0.0, "in"),
         ("10.0.0.1", 0.0, (PER_SOURCE, 5)),
         ("10.0.0.1", 0.0, (PER_SOURCE, 5)),
         ("leave", "10.0.0.1"),
         ("10.0.0.1", 0.0, "in")],  # the second token was still there
    ),
    "a rate refusal gives its cap slot back": (
        "1/hour", 100, 1,
        [("10.0.0.1", 0.0, "in"), ("leave", "10.0.0.1"),
         ("10.0.0.1", 1.0, (RATE_LIMITED, 3599)),
         ("10.0.0.1", 2.0, (RATE_LIMITED, 3598))],  # not (PER_SOURCE): the slot came back
    ),
    "the total cap": (
        "100/second", 2, 100,
        [("10.0.0.1", 0.0, "in"), ("10.0.0.2", 0.0, "in"), ("10.0.0.3", 0.0, (TOTAL, 5)),
         ("leave", "10.0.0.1"), ("10.0.0.3", 0.0, "in")],
    ),
    "one IPv6 /64 is one source": (
        "2/minute", 100, 100,
        [("2001:db8:1:2::1", 0.0, "in"), ("2001:db8:1:2:ffff::9", 0.0, "in"),
         ("2001:db8:1:2::77", 0.0, (RATE_LIMITED, 30)),
         ("2001:db8:1:3::1", 0.0, "in")],  # the next /64 is someone else
    ),
    "an IPv4-mapped peer is the IPv4 source": (
        "1/minute", 100, 100,
        [("::ffff:10.0.0.1", 0.0, "in"), ("10.0.0.1", 0.0, (RATE_LIMITED, 60))],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_door_scripts(name: str) -> None:
    per_source, max_total, max_per_source, steps = SCRIPTS[name]
    d = door(per_source, max_total, max_per_source)
    held: dict[str, list[Admitted]] = {}
    for step in steps:
        if step[0] == "leave":
            d.leave(held[step[1]].pop().key)
            continue
        src, now, expected = step
        got = d.arrive(ip(src), now)
        if expected == "in":
            assert isinstance(got, Admitted), (step, got)
            held.setdefault(src, []).append(got)
        else:
            reason, retry_after = expected
            assert isinstance(got, Refused), (step, got)
            assert (got.reason, got.outcome.retry_after) == (reason, retry_after), step
            code = Code.RATE_LIMITED if reason == RATE_LIMITED else Code.OVERLOADED
            assert got.outcome.code is code and got.outcome.explanation
    total = sum(len(v) for v in held.values())
    assert d.caps.total == total  # refusals hold nothing


def test_door_uses_the_limiters_source_identity() -> None:
    d = door("1/minute")
    admitted = d.arrive(ip("2001:db8::1"), 0.0)
    assert isinstance(admitted, Admitted)
    assert admitted.key == source_of(ip("2001:db8::1"), 64)
    assert str(source_network(admitted.key)) == "2001:db8::/64"
    d.leave(admitted.key)
    assert d.caps.total == 0 and d.caps.sources == 0


@pytest.mark.parametrize(
    ("per_source", "hold", "longest"),
    [
        ("30/minute", 5.0, 5),  # the default: a token every 2 s, the hold is longer
        ("5/minute", 5.0, 12),  # the internet profile: an empty bucket tells 12 s
        ("7/minute", 5.0, 9),  # 8.6 s, told as 9
        ("5/minute", 30.0, 30),
    ],
)
def test_in_debt_only_past_a_token_and_the_longest_hold(
    per_source: str, hold: float, longest: int
) -> None:
    # A student merely rate limited is told at most one token's time (rounded up),
    # and one held at the door waits at most the longest hold: neither is in debt,
    # and coming back early must never ban them.
    limiter = door(per_source).limiter
    assert not limiter.in_debt(longest, hold) and limiter.in_debt(longest + 1, hold)


def test_a_refusal_owes_its_wait_only_when_in_debt() -> None:
    cfg = config_mod.from_dict(
        {
            "ratelimit": {**OPEN, "per_source": "10/minute"},
            "tuning": {"errors_global": "1/hour", "error_fine": 30},
        }
    )
    d = Door(ConnectionCaps(100, 100), RateLimiter(cfg.ratelimit), 5.0)
    src = ip("10.0.0.1")
    assert all(isinstance(d.arrive(src, 0.0), Admitted) for _ in range(10))
    plain = d.arrive(src, 0.0)  # an empty bucket: a token's time, 6 s
    assert isinstance(plain, Refused) and (plain.outcome.retry_after, plain.owed) == (6, 0)
    d.limiter.penalize(ip("10.0.0.2"), 0.0)  # the pressure budget's one error
    d.limiter.penalize(src, 0.0)  # under pressure: fined into debt (capped: 66 s)
    fined = d.arrive(src, 0.0)
    assert isinstance(fined, Refused) and (fined.outcome.retry_after, fined.owed) == (66, 66)
    assert d.silent(src, 31).owed == 0


@pytest.mark.parametrize(
    ("source", "waited", "key"),
    [("10.0.0.1", 31, "10.0.0.1"), ("::ffff:10.0.0.1", 7, "10.0.0.1"),
     ("2001:db8:1:2::5", 63, "2001:db8:1:2::/64")],
)  # fmt: skip
def test_a_connection_silent_through_the_kernels_wait_is_a_read_timeout_at_the_door(
    source: str, waited: int, key: str
) -> None:
    d = door("1/minute", max_per_source=1)
    refused = d.silent(ip(source), waited)
    assert refused.reason == SILENT and str(source_network(refused.key)) == key
    assert refused.outcome.code is Code.READ_TIMEOUT and refused.outcome.status is Status.ERROR
    assert refused.outcome.retry_after is None
    assert refused.outcome.explanation.startswith(f"no request arrived within {waited} s ")
    assert d.caps.total == 0  # no slot taken...
    assert isinstance(d.arrive(ip(source), 0.0), Admitted)  # ...and no token: the one is left


@pytest.mark.parametrize(("seconds", "told"), [(1.5, 2), (60.0, 60), (60.2, 61), (0.1, 1)])
def test_the_refusal_that_bans_says_so_and_for_how_long(seconds: float, told: int) -> None:
    # Its source's next connects time out: without this line a student takes
    # that for a network fault. Everything else of the refusal is kept.
    d = door("1/minute")
    d.arrive(ip("192.0.2.7"), 0.0)
    refused = d.arrive(ip("192.0.2.7"), 0.0)
    assert isinstance(refused, Refused)
    out = told_of_ban(refused.outcome, seconds)
    assert out.explanation == (
        f"{refused.outcome.explanation}; your address is now blocked for about {told} s "
        "(connecting before then times out)"
    )
    assert out.with_(explanation=refused.outcome.explanation) == refused.outcome


# --- Window: refusals ------------------------------------------------------------------


def k(text: str) -> int:
    return source_of(ip(text), 64)


def test_tally_counts_a_window_and_keeps_totals() -> None:
    tally = Window()
    assert tally.flush() is None  # nothing refused: nothing to log
    assert [tally.add(k("10.0.0.1"), RATE_LIMITED) for _ in range(3)] == [1, 2, 3]  # repeats
    assert tally.add(k("10.0.0.2"), PER_SOURCE) == 1
    assert tally.flush() == {
        "refused": 4,
        "by_reason": {RATE_LIMITED: 3, PER_SOURCE: 1},
        "sources": 2,
        "top": [["10.0.0.1", RATE_LIMITED, 3], ["10.0.0.2", PER_SOURCE, 1]],
        "untracked": 0,
    }
    # repeats count in this window and the one before: three refusals that straddle
    # a flush are three
    assert tally.add(k("10.0.0.1"), RATE_LIMITED) == 4
    assert tally.flush() is not None
    assert tally.flush() is None  # a quiet window: the one before is now a quiet one
    assert tally.add(k("10.0.0.1"), RATE_LIMITED) == 1
    tally.add(k("10.0.0.3"), TOTAL)
    assert tally.add(k("10.0.0.3"), SILENT) == 1  # counted per reason
    assert tally.totals == {RATE_LIMITED: 5, PER_SOURCE: 1, TOTAL: 1, SILENT: 1}  # only grow


def test_tally_window_is_bounded_under_a_spray() -> None:
    tally = Window(max_sources=50)
    for n in range(10_000):
        tally.add(k(f"10.1.{n // 250}.{n % 250}"), RATE_LIMITED)
    assert tally.add(k("10.1.0.0"), RATE_LIMITED) == 2  # a tracked source still counts as itself
    assert tally.add(k("10.1.39.249"), RATE_LIMITED) == 1  # an untracked one: as if new
    summary = tally.flush(top=3)
    assert summary is not None
    assert summary["refused"] == 10_002 and summary["by_reason"] == {RATE_LIMITED: 10_002}
    assert summary["sources"] == 50 and summary["untracked"] == 10_000 - 50 + 1
    assert summary["top"][0] == ["10.1.0.0", RATE_LIMITED, 2]
    assert len(tally._sources) == 0


def test_tally_tracks_the_repeats_of_an_attack_from_5000_addresses() -> None:
    # The doubling hold and the bans read these repeats: an address past the cap
    # would always count as new (the shortest hold, never banned).
    tally = Window()
    sources = [k(f"10.2.{n // 250}.{n % 250}") for n in range(5000)]
    for _ in range(3):
        repeats = [tally.add(s, RATE_LIMITED) for s in sources]
    assert set(repeats) == {3}
    summary = tally.flush()
    assert summary is not None and summary["sources"] == 5000 and summary["untracked"] == 0


# --- Doorway: refused connections on real sockets -----------------------------------

BUSY = Outcome(code=Code.RATE_LIMITED, retry_after=7, explanation="slow down")
LINE = b"BUSY rate_limited retry_after=7 slow down\n"


async def _pair(listener: trio.SocketListener) -> tuple[trio.socket.SocketType, socket.socket]:
    """(client, the accepted stdlib socket, as the accept loop hands it over)."""
    client = trio.socket.socket()
    await client.connect(listener.socket.getsockname())
    sock, _ = await listener.socket.accept()
    return client, socket.socket(fileno=sock.detach())


async def _read_to_eof(client: trio.socket.SocketType) -> bytes:
    reply = b""
    with trio.fail_after(5):
        while chunk := await client.recv(4096):  # ECONNRESET would raise here
            reply += chunk
    return reply


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"127.0.0.1:15000\n", b""),  # the request was there when the door refused
        (b"", b""),  # nothing sent at all
        (b"", b"127.0.0.1:15000\n"),  # the request arrives while the refusal is held
        (b"127.0.0.1:", b"15000\n"),
    ],
)
async def test_doorway_answers_after_the_delay_and_closes_cleanly(
    autojump_clock: trio.testing.MockClock, before: bytes, after: bytes
) -> None:
    doorway = Doorway(delay=0.5)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        client, conn = await _pair(listener)
        with client:
            if before:
                await client.send(before)
            doorway.refuse(conn, BUSY, trio.current_time())
            assert doorway.held == 1
            if after:
                await client.send(after)
            assert doorway.reap(trio.current_time() + 0.499) == 0  # not yet
            assert conn.fileno() != -1
            assert doorway.reap(trio.current_time() + 0.5) == 1 and doorway.held == 0
            assert conn.fileno() == -1
            assert await _read_to_eof(client) == LINE
            # No RST reached the client (Linux reports one as EPIPE here even after
            # the reply and EOF were read; closing with the request unread fails this).
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


async def test_doorway_run_answers_on_time(autojump_clock: trio.testing.MockClock) -> None:
    doorway = Doorway(delay=0.5)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(doorway.run)
            await trio.sleep(3.0)  # the reaper idles on an empty queue, then is woken
            client, conn = await _pair(listener)
            with client:
                doorway.refuse(conn, BUSY, trio.current_time())
                refused_at = trio.current_time()
                assert await _read_to_eof(client) == LINE
                assert trio.current_time() - refused_at == pytest.approx(0.5)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("delay", [0.0, 0.5])
async def test_doorway_zero_delay_or_shutdown_answers_at_once(delay: float) -> None:
    doorway = Doorway(delay=delay)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        client, conn = await _pair(listener)
        with client:
            await client.send(b'{"host": "127.0.0.1", "port": 15000}\n')
            await trio.lowlevel.wait_readable(conn)
            doorway.refuse(conn, BUSY, trio.current_time())
            doorway.answer_all()  # what run() does when it is cancelled
            assert conn.fileno() == -1
            body = json.loads(await _read_to_eof(client))  # a JSON client: a JSON answer
    assert (body["status"], body["code"], body["retry_after"]) == ("BUSY", "rate_limited", 7)


def test_doorway_delay_doubles_per_repeat_up_to_the_cap() -> None:
    doorway = Doorway(delay=0.5, max_delay=5.0)
    assert [doorway.delay_for(k) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert doorway.delay_for(10_000) == 5.0  # no overflow
    assert Doorway(delay=0, max_delay=5.0).delay_for(3) == 0.0  # 0: answer at once


async def test_doorway_answers_each_at_its_own_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    doorway = Doorway(delay=0.5, max_delay=5.0)
    answered: dict[str, float] = {}
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(doorway.run)
            first, first_conn = await _pair(listener)
            second, second_conn = await _pair(listener)
            doorway.refuse(first_conn, BUSY, trio.current_time(), 4.0)  # a repeat offender
            doorway.refuse(second_conn, BUSY, trio.current_time(), 0.5)  # due sooner: run wakes

            async def read(name: str, client: trio.socket.SocketType) -> None:
                with client:
                    assert await _read_to_eof(client) == LINE
                answered[name] = trio.current_time()

            async with trio.open_nursery() as readers:
                readers.start_soon(read, "first", first)
                readers.start_soon(read, "second", second)
            nursery.cancel_scope.cancel()
    assert answered == {"second": pytest.approx(0.5), "first": pytest.approx(4.0)}


async def test_doorway_answers_a_crowd_a_chunk_at_a_time() -> None:
    doorway = Doorway(delay=60)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        pairs = [await _pair(listener) for _ in range(REAP_CHUNK + 5)]
        for _, conn in pairs:
            doorway.refuse(conn, BUSY, 0.0)
        assert doorway.reap(100.0) == REAP_CHUNK  # no more in one go
        assert doorway.reap(100.0) == 5 and doorway.held == 0
        for client, _ in pairs:
            with client:
                assert await _read_to_eof(client) == LINE


async def test_doorway_holds_at_most_max_held() -> None:
    doorway = Doorway(delay=60, max_held=3)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        pairs = [await _pair(listener) for _ in range(5)]
        for _, conn in pairs:
            doorway.refuse(conn, BUSY, trio.current_time())
        assert doorway.held == 3
        assert [conn.fileno() == -1 for _, conn in pairs] == [True, True, False, False, False]
        doorway.reconfigure(60, 60, 1)  # SIGHUP to a smaller bound applies at once
        assert doorway.held == 1
        doorway.answer_all()
        assert doorway.held == 0 and all(conn.fileno() == -1 for _, conn in pairs)
        for client, _ in pairs:
            with client:
                assert await _read_to_eof(client) == LINE


async def test_doorway_to_a_client_that_is_gone() -> None:
    doorway = Doorway(delay=0)
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        client, conn = await _pair(listener)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()  # RST
        await trio.sleep(0.05)
        doorway.refuse(conn, BUSY, trio.current_time())  # no exception: nobody to tell
        assert doorway.held == 0 and conn.fileno() == -1


# --- the whole path, in process ----------------------------------------------------


async def _line(port: int, src: str, data: bytes) -> bytes:
    reply = await exchange_from(port, src, data)
    assert reply is not None
    return reply


@pytest.mark.slow
async def test_junk_pays_at_the_door_and_refusals_leave_no_row(tmp_path: Path) -> None:
    # per_source 4/hour: two connections from 127.0.0.7 that send nothing (EOF) or
    # junk take a token each at the door and a second one for their protocol
    # error; the third connection is a valid registration, but the source has
    # nothing left: it is refused at the door, with no task, no row and no log
    # line of its own.
    db = tmp_path / "door.db"
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(db)},
            "ratelimit": {**OPEN, "per_source": "4/hour"},
        }
    )
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        junk = [await _line(port, "127.0.0.7", data) for data in (b"", b"hello\n")]
        refused = await _line(port, "127.0.0.7", b"127.0.0.7:15000\n")
        other = await _line(port, "127.0.0.8", b"nonsense\n")  # another source: served
        assert runtime.caps.total == 0 and runtime.caps.sources == 0
        assert runtime.tally.totals[RATE_LIMITED] == 1
        runtime.shutdown()
    assert [r.split()[:2] for r in junk] == [[b"ERROR", b"malformed"]] * 2, junk
    assert refused.startswith(b"BUSY rate_limited retry_after="), refused
    assert b" id=" not in refused  # not a registration: nothing was recorded
    assert other.startswith(b"ERROR malformed "), other
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT peer, code FROM registrations ORDER BY received_at").fetchall()
    assert [(peer.split(":")[0], code) for peer, code in rows] == [
        ("127.0.0.7", "malformed"),
        ("127.0.0.7", "malformed"),
        ("127.0.0.8", "malformed"),
    ]


@pytest.mark.slow
async def test_under_pressure_junk_locks_its_source_out_for_about_a_minute(tmp_path: Path) -> None:
    # errors_global 1/hour: the registry is "under pressure" from the second protocol
    # error on. 127.0.0.7's first junk pays the usual second token; its second is
    # fined 30 tokens (capped at a period of debt), so its next connection is
    # refused at the door with an honest retry_after of about a minute, while
    # another source is still served.
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(tmp_path / "p.db")},
            "ratelimit": {**OPEN, "per_source": "10/minute"},
            "tuning": {"errors_global": "1/hour", "error_fine": 30, "ban_after": 0},
        }
    )
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        junk = [await _line(port, "127.0.0.7", b"hello\n") for _ in range(2)]
        refused = await _line(port, "127.0.0.7", b"127.0.0.7:15000\n")
        other = await _line(port, "127.0.0.8", b"nonsense\n")
        runtime.shutdown()
    assert [r.split()[:2] for r in junk] == [[b"ERROR", b"malformed"]] * 2, junk
    # the first junk was not fined and is not told to wait; the fined one is, at once
    assert b"retry_after=" not in junk[0] and b"may connect again" not in junk[0], junk
    told = int(junk[1].split(b"retry_after=")[1].split()[0])
    assert 60 <= told <= 66 and f"again in {told} s".encode() in junk[1], junk[1]
    assert refused.startswith(b"BUSY rate_limited retry_after="), refused
    retry_after = int(refused.split()[2].split(b"=")[1])
    assert 60 <= retry_after <= 66, refused  # about a minute, not the usual 6 s
    assert other.startswith(b"ERROR malformed "), other


async def test_under_pressure_junk_is_recorded_and_its_lines_summed(tmp_path: Path) -> None:
    # errors_global 1/hour, no fines: 14 junk lines from 14 sources. The first is
    # calm; then, under pressure, ten more are logged one by one and the last three
    # are summed in one errors_not_logged line (the drain's last window). All 14
    # have their row.
    db = tmp_path / "p.db"
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(db)},
            "ratelimit": OPEN,
            "tuning": {"errors_global": "1/hour", "error_fine": 0},
        }
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime: Runtime = await nursery.start(
                Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
            )
            port = runtime.tcp[0].port
            junk = [await _line(port, f"127.0.0.{n}", b"hello\n") for n in range(10, 24)]
            runtime.shutdown()
    assert all(r.startswith(b"ERROR malformed id=") for r in junk), junk
    lines = [e for e in logs if e["event"] == "registration"]
    assert len(lines) == 11
    [summed] = [e for e in logs if e["event"] == "errors_not_logged"]
    assert summed["total"] == 3 and summed["by_code"] == {"malformed": 3}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM registrations").fetchone() == (14,)
