"""The admin endpoint's limits and access control: a crowd of idle connections,
the token, the expiring cookie, the DNS-rebinding guard (issue 17).

Slots and cookies are pure and table-tested; the crowd runs against the real
admin server on loopback sockets, in virtual time (autojump_clock): nothing
here sleeps for real.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import trio

from registry.admin.core import access
from registry.admin.core.access import (
    COOKIE,
    COOKIE_MAX_AGE,
    Login,
    Verdict,
    cookie_valid,
    cookie_value,
    host_allowed,
)
from registry.admin.core.slots import AdminSlots
from registry.admin.http import AdminSettings
from tests.test_admin import TOKEN, admin_server, raw_exchange

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
NOW = 1_800_000_000


# --- slots (pure) -------------------------------------------------------------------------


def test_a_source_past_its_cap_loses_its_oldest_idle_connection() -> None:
    slots = AdminSlots(total=64, per_source=2)
    assert slots.arrive("a1", "10.0.0.1") == []
    assert slots.arrive("a2", "10.0.0.1") == []
    assert slots.arrive("b1", "10.0.0.2") == []
    assert slots.arrive("a3", "10.0.0.1") == ["a1"]
    slots.leave("a1")
    slots.busy("a2")  # a2 sent its request: no longer evictable
    assert slots.arrive("a4", "10.0.0.1") == ["a3"]
    slots.leave("a3")
    assert len(slots) == 3 and slots.evicted == 2


def test_a_full_endpoint_keeps_one_slot_free_at_the_expense_of_the_oldest_idle() -> None:
    slots = AdminSlots(total=3, per_source=16)
    assert slots.arrive(1, "a") == []
    slots.busy(1)  # an event stream, say
    assert slots.arrive(2, "b") == []
    assert slots.arrive(3, "c") == [2]  # 3 of 3: the oldest idle (2) goes, not the busy 1
    slots.leave(2)
    slots.busy(3)
    assert slots.arrive(4, "d") == []  # only the newcomer is idle: it takes the last slot
    assert len(slots) == 3  # full: the accept loop waits for a slot to free


def test_a_source_over_its_cap_with_only_busy_connections_loses_the_newcomer() -> None:
    slots = AdminSlots(total=64, per_source=2)
    for key in (1, 2):
        slots.arrive(key, "a")
        slots.busy(key)  # two event streams, say
    assert slots.arrive(3, "a") == [3]


def test_an_evicted_connection_is_never_chosen_twice() -> None:
    slots = AdminSlots(total=2, per_source=1)
    slots.arrive(1, "a")
    assert slots.arrive(2, "a") == [1]  # per source, and it also frees the total
    assert slots.arrive(3, "b") == [2]  # 1 is closing already: the next oldest idle


async def test_the_last_slot_goes_to_the_newcomer_and_an_older_idle_one_makes_room(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(max_connections=3)) as admin:
        idle = [await trio.open_tcp_stream("127.0.0.1", admin.port) for _ in range(2)]
        reply = await raw_exchange(admin.port, HEALTHZ)  # 3 of 3: the oldest idle goes
        assert reply.startswith(b"HTTP/1.1 200")
        with trio.fail_after(1):
            assert await idle[0].receive_some(10) == b""  # closed for the newcomer
        for stream in idle:
            await stream.aclose()


# --- the crowd, against the real server ---------------------------------------------------


async def test_seventy_idle_connections_do_not_keep_healthz_out(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with admin_server(tmp_path) as admin:
        crowd = [await trio.open_tcp_stream("127.0.0.1", admin.port) for _ in range(70)]
        reply = await raw_exchange(admin.port, HEALTHZ)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok\n")
        assert admin.server.slots.evicted >= 70 - 16
        for stream in crowd:
            await stream.aclose()


async def test_a_crowd_from_many_sources_does_not_keep_healthz_out(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with admin_server(tmp_path) as admin:
        crowd = [
            await trio.open_tcp_stream(
                "127.0.0.1", admin.port, local_address=f"127.0.0.{2 + i % 5}"
            )
            for i in range(75)  # 5 sources x 15: under the per-source cap, over the total
        ]
        reply = await raw_exchange(admin.port, HEALTHZ)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n")
        for stream in crowd:
            await stream.aclose()


async def test_a_silent_connection_is_closed_at_the_first_byte_deadline(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with admin_server(tmp_path) as admin:
        silent = await trio.open_tcp_stream("127.0.0.1", admin.port)
        slow = await trio.open_tcp_stream("127.0.0.1", admin.port)
        start = trio.current_time()
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")  # spoke: the head's 10 s apply
        with trio.fail_after(30):
            assert await silent.receive_some(100) == b""
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
        with trio.fail_after(30):
            assert await slow.receive_some(100) == b""
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
        await silent.aclose()
        await slow.aclose()


# --- access control -------------------------------------------------------------------------

TOKEN_CFG = f'[server]\nadmin_token = "{TOKEN}"\n'
PROTECTED = (
    "/", "/api/registrations", "/api/summary", "/api/events", "/metrics", "/readyz",
    "/registrations", "/api/summary.csv", "/api/bans",
)  # fmt: skip


async def test_token_required_everywhere_but_healthz(tmp_path: Path) -> None:
    async with admin_server(tmp_path, TOKEN_CFG) as admin:
        assert (await admin.get("/healthz"))[0] == 200
        for path in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                status, got, _ = await admin.get(path, headers=headers)
                assert status == 401, (path, headers)
                assert got["www-authenticate"].startswith("Bearer")
        for path in PROTECTED[1:]:
            if path != "/api/events":
                status = (await admin.get(path, headers={"Authorization": f"Bearer {TOKEN}"}))[0]
                assert status == 200, path


async def test_token_in_url_sets_a_strict_cookie_and_redirects_without_it(tmp_path: Path) -> None:
    async with admin_server(tmp_path, TOKEN_CFG) as admin:
        assert (await admin.get("/?token=wrong"))[0] == 401
        status, headers, _ = await admin.get(f"/?token={TOKEN}&student=bob")
        assert status == 303 and headers["location"] == "/?student=bob"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        value = cookie.split(";", 1)[0]
        assert value.startswith(f"{COOKIE}=") and "Max-Age=43200" in cookie
        assert cookie_valid(value.split("=", 1)[1], TOKEN, time.time())
        assert (await admin.get("/", headers={"Cookie": f"a=b; {value}"}))[0] == 200
        assert (await admin.get("/metrics", headers={"Cookie": f"{COOKIE}=forged"}))[0] == 401


async def test_dns_rebinding_guard_without_token(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        assert (await admin.get("/", headers={"Host": "attacker.example:9100"}))[0] == 403
        assert (await admin.get("/healthz", headers={"Host": "attacker.example"}))[0] == 200
        assert (await admin.get("/", headers={"Host": "localhost:9100"}))[0] == 200
    async with admin_server(tmp_path, TOKEN_CFG) as admin:  # a token makes names fine
        auth = {"Host": "registry.example", "Authorization": f"Bearer {TOKEN}"}
        assert (await admin.get("/", headers=auth))[0] == 200


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),
        ("127.0.0.1", True),
        ("127.0.0.1:9100", True),
        ("[::1]:9100", True),
        ("[::1]", True),
        ("LOCALHOST:80", True),
        ("10.0.0.5", True),
        ("attacker.example", False),
        ("attacker.example:9100", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.attacker.example", False),
    ],
)
def test_host_allowed(host: str | None, allowed: bool) -> None:
    assert host_allowed(host) is allowed


# --- the cookie (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token", "now", "valid"),
    [
        (cookie_value(TOKEN, NOW), TOKEN, NOW, True),
        (cookie_value(TOKEN, NOW), TOKEN, NOW + COOKIE_MAX_AGE - 1, True),
        (cookie_value(TOKEN, NOW), TOKEN, NOW + COOKIE_MAX_AGE, False),  # expired
        (cookie_value(TOKEN, NOW), "rotated-token", NOW, False),  # the token changed
        (cookie_value(TOKEN, NOW + 3600), TOKEN, NOW, False),  # issued in the future
        (cookie_value(TOKEN, NOW + 30), TOKEN, NOW, True),  # a small clock step is fine
        (f"{NOW + 1}." + cookie_value(TOKEN, NOW).split(".")[1], TOKEN, NOW, False),  # re-dated
        (cookie_value(TOKEN, NOW).split(".")[1], TOKEN, NOW, False),  # no issue time
        ("", TOKEN, NOW, False),
        ("-5.abc", TOKEN, NOW, False),
        ("99999999999999999999." + "0" * 64, TOKEN, NOW, False),
    ],
)
def test_cookie_validity(value: str, token: str, now: float, valid: bool) -> None:
    assert cookie_valid(value, token, now) is valid


def test_login_sets_an_expiring_strict_cookie_without_the_token() -> None:
    decision = access.check("/", {"token": TOKEN, "student": "bob"}, {}, TOKEN, NOW)
    assert isinstance(decision, Login) and decision.location == "/?student=bob"
    cookie = decision.set_cookie
    assert cookie.startswith(f"{COOKIE}={NOW}.") and TOKEN not in cookie
    assert "Max-Age=43200" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    headers = {"cookie": f"{COOKIE}={value}"}
    assert access.check("/metrics", {}, headers, TOKEN, NOW + 60) is Verdict.ALLOW
    late = NOW + COOKIE_MAX_AGE + 1
    assert access.check("/metrics", {}, headers, TOKEN, late) is Verdict.UNAUTHORIZED
    assert access.check("/metrics", {}, headers, "new-token", NOW) is Verdict.UNAUTHORIZED


async def test_a_new_token_invalidates_the_cookies_of_the_old_one(tmp_path: Path) -> None:
    async with admin_server(tmp_path, TOKEN_CFG) as admin:
        status, headers, _ = await admin.get(f"/?token={TOKEN}")
        assert status == 303
        jar = headers["set-cookie"].split(";", 1)[0]
        assert (await admin.get("/api/summary", headers={"Cookie": jar}))[0] == 200
        # what a SIGHUP with a new server.admin_token does to the config in force
        cfg = admin.runtime.config
        server = msgspec.structs.replace(cfg.server, admin_token="another-token")
        admin.runtime.config = msgspec.structs.replace(cfg, server=server)
        assert (await admin.get("/api/summary", headers={"Cookie": jar}))[0] == 401
        assert admin.runtime.config.server.admin_token == "another-token"


async def test_an_expired_cookie_is_refused_by_the_server(tmp_path: Path) -> None:
    async with admin_server(tmp_path, TOKEN_CFG) as admin:
        old = cookie_value(TOKEN, int(time.time()) - COOKIE_MAX_AGE - 5)
        fresh = cookie_value(TOKEN, int(time.time()) - 60)
        assert (await admin.get("/api/summary", headers={"Cookie": f"{COOKIE}={old}"}))[0] == 401
        assert (await admin.get("/api/summary", headers={"Cookie": f"{COOKIE}={fresh}"}))[0] == 200
