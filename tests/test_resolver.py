"""Hostname resolution: the resolver edge, the service around it, the real daemon.

No DNS traffic: real lookups use only ``localhost`` (answered from
/etc/hosts); every other answer comes from a fake (a trio custom hostname
resolver, or a fake ``Resolver`` handed to the service). Callbacks go to
127.0.0.1 only; other addresses appear as values checked by the policy, and
the connector in the service tests only records dials.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from registry import config as config_mod
from registry.model import Code, Diagnosis, Endpoint, IPAddress, Protocol, Request, Status
from registry.net.interfaces import is_local_address
from registry.net.resolver import (
    MAX_ANSWERS,
    TooManyAnswers,
    TrioResolver,
    addresses_from_getaddrinfo,
)
from registry.policy.addresses import AddrClass, Address
from registry.service import Service
from tests.fakes import ListRecorder, ScriptedConnector
from tests.support import run_registry, send_line

ip = ipaddress.ip_address
INET, INET6, STREAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM
LOOP = Endpoint(ip("127.0.0.1"), 40000)
REMOTE = Endpoint(ip("203.0.113.5"), 40000)  # documentation range: a value, never dialled
NAMES = "[policy]\nallow_hostnames = true\n"


def row4(host: str, port: int = 15000) -> tuple[Any, ...]:
    return (INET, STREAM, 6, "", (host, port))


def row6(host: str, port: int = 15000, scope: int = 0) -> tuple[Any, ...]:
    return (INET6, STREAM, 6, "", (host, port, 0, scope))


# --- getaddrinfo rows -> addresses ------------------------------------------------------

ROWS: list[tuple[str, list[Any], list[str]]] = [
    ("v4", [row4("203.0.113.5")], ["203.0.113.5"]),
    ("v6", [row6("2001:db8::5")], ["2001:db8::5"]),
    ("order-kept", [row6("2001:db8::5"), row4("203.0.113.5")], ["2001:db8::5", "203.0.113.5"]),
    (
        "dedup",
        [row4("203.0.113.5"), row4("203.0.113.5"), row4("10.0.0.1")],
        ["203.0.113.5", "10.0.0.1"],
    ),
    ("scope-kept", [row6("fe80::1", scope=2)], ["fe80::1%2"]),
    ("scope-in-text", [row6("fe80::1%eth0", scope=2)], ["fe80::1%eth0"]),
    ("mapped-kept-as-sent", [row6("::ffff:127.0.0.1")], ["::ffff:127.0.0.1"]),
    (
        "other-family",
        [(socket.AF_UNIX, STREAM, 0, "", "/tmp/x"), row4("203.0.113.5")],
        ["203.0.113.5"],
    ),
    ("v6-text-in-v4-row", [(INET, STREAM, 6, "", ("2001:db8::5", 1))], []),
    ("v4-text-in-v6-row", [(INET6, STREAM, 6, "", ("203.0.113.5", 1, 0, 0))], []),
    (
        "garbage",
        [(INET, STREAM, 6, "", ("not-an-ip", 1)), (INET,), None, (INET, 1, 6, "", (7, 1))],
        [],
    ),
    ("empty", [], []),
]


@pytest.mark.parametrize(("rows", "want"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_addresses_from_getaddrinfo(rows: list[Any], want: list[str]) -> None:
    assert addresses_from_getaddrinfo(rows) == [ip(w) for w in want]


# --- TrioResolver: real /etc/hosts and a trio custom resolver ------------------------------


async def test_localhost_resolves_to_loopback_only() -> None:
    with trio.fail_after(5):
        got = await TrioResolver().resolve("localhost", 15000)
    assert got, "localhost did not resolve"
    assert all(Address.of(a).cls is AddrClass.LOOPBACK for a in got), got
    assert len(got) == len(set(got))


async def test_unknown_name_is_an_oserror() -> None:
    # ".invalid" is reserved (RFC 6761); a custom resolver answers, so nothing is sent.
    trio.socket.set_custom_hostname_resolver(FakeHostnames({}))
    with pytest.raises(OSError):
        await TrioResolver().resolve("nothing.invalid", 15000)


class FakeHostnames(trio.abc.HostnameResolver):
    """trio's resolver hook: canned getaddrinfo rows per name; records every call."""

    def __init__(self, table: dict[str, list[Any]]) -> None:
        self.table = table
        self.calls: list[tuple[Any, ...]] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        self.calls.append((host, port, family, type))
        name = (host or b"").decode()
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[name]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_trio_resolver_asks_for_stream_sockets_in_every_family() -> None:
    fake = FakeHostnames({"student.example": [row6("2001:db8::5"), row4("203.0.113.5")]})
    trio.socket.set_custom_hostname_resolver(fake)
    got = await TrioResolver().resolve("student.example", 15000)
    assert got == [ip("2001:db8::5"), ip("203.0.113.5")]
    assert fake.calls == [(b"student.example", 15000, 0, STREAM)]


async def test_trio_resolver_keeps_the_scope_for_the_policy_to_refuse() -> None:
    trio.socket.set_custom_hostname_resolver(
        FakeHostnames({"zone.example": [row6("fe80::1", scope=3)]})
    )
    got = await TrioResolver().resolve("zone.example", 15000)
    assert got == [ip("fe80::1%3")] and got[0].scope_id == "3"  # type: ignore[union-attr]


async def test_too_many_answers_is_refused_not_sampled() -> None:
    rows = [row4(f"203.0.113.{i}") for i in range(1, MAX_ANSWERS + 2)]
    trio.socket.set_custom_hostname_resolver(FakeHostnames({"many.example": rows}))
    with pytest.raises(TooManyAnswers):
        await TrioResolver().resolve("many.example", 15000)
    assert len(await TrioResolver(max_answers=MAX_ANSWERS + 1).resolve("many.example", 1)) == 65


# --- the service with a resolver ---------------------------------------------------------


class FakeResolver:
    """A ``Resolver``: scripted answers per call (a list of lists), or an error, or a hang."""

    def __init__(self, *answers: list[str], error: OSError | None = None, hang: bool = False):
        self.answers = [[ip(a) for a in ans] for ans in answers]
        self.error = error
        self.hang = hang
        self.calls: list[tuple[str, int, float]] = []

    async def resolve(self, name: str, port: int) -> list[IPAddress]:
        self.calls.append((name, port, trio.current_time()))
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error
        # A rebinding server answers differently each time: the last answer repeats.
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def make(cfg_text: str, resolver: Any) -> tuple[Service, ScriptedConnector, ListRecorder]:
    conn, rec = ScriptedConnector(), ListRecorder()
    service = Service(
        config_mod.loads(cfg_text),
        is_local=is_local_address,
        connector=conn,
        recorder=rec,
        resolver=resolver,
    )
    return service, conn, rec


async def register(service: Service, host: str, peer: Endpoint, port: int = 15000) -> Any:
    return await service.register(Request(host, port), peer, Protocol.TEXT, 1.0)


async def test_localhost_from_loopback_dials_the_checked_loopback_address() -> None:
    service, conn, rec = make(NAMES, TrioResolver())
    outcome = await register(service, "localhost", LOOP)
    assert (outcome.status, outcome.code) == (Status.OK, Code.CONNECTED), outcome.explanation
    assert [d.target for d in conn.dials] == [Endpoint(ip("127.0.0.1"), 15000)]
    assert outcome.target == "127.0.0.1:15000" and outcome.diagnosis is Diagnosis.DIRECT
    assert [r.code for r in rec.records] == ["connected"]


async def test_localhost_from_a_remote_peer_is_refused_without_a_dial() -> None:
    service, conn, _ = make(NAMES, TrioResolver())
    outcome = await register(service, "localhost", REMOTE)
    assert outcome.code is Code.ADDRESS_NOT_ALLOWED, outcome.explanation
    # /etc/hosts may list ::1 for localhost too, and first.
    assert re.search(r"localhost resolved to (127\.0\.0\.1|::1): ", outcome.explanation)
    assert conn.dials == []


async def test_names_off_never_resolve() -> None:
    fake = FakeResolver(["127.0.0.1"])
    service, conn, _ = make("", fake)
    outcome = await register(service, "localhost", LOOP)
    assert outcome.code is Code.HOSTNAME_NOT_ALLOWED and outcome.diagnosis is Diagnosis.HOSTNAME
    assert fake.calls == [] and conn.dials == []


@pytest.mark.parametrize(
    ("answers", "peer", "code", "dialled"),
    [
        (["203.0.113.5"], REMOTE, Code.CONNECTED, "203.0.113.5"),
        (["::ffff:203.0.113.5"], REMOTE, Code.CONNECTED, "203.0.113.5"),
        (["2001:db8::9", "203.0.113.5"], REMOTE, Code.CONNECTED, "203.0.113.5"),
        (["203.0.113.5", "169.254.169.254"], REMOTE, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "10.0.0.1"], REMOTE, Code.CONNECTED, "203.0.113.5"),
        (["203.0.113.5", "::ffff:127.0.0.1"], REMOTE, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "64:ff9b::a9fe:a9fe"], REMOTE, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "fe80::1%2"], REMOTE, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "224.0.0.1"], REMOTE, Code.ADDRESS_NOT_ALLOWED, None),
        (["198.51.100.7"], REMOTE, Code.SOURCE_MISMATCH, None),
        ([], REMOTE, Code.HOSTNAME_NOT_ALLOWED, None),
    ],
    ids=[
        "public-match",
        "mapped-match",
        "v6-and-v4",
        "metadata-beside-good",
        "private-beside-good",
        "mapped-loopback-beside-good",
        "nat64-metadata-beside-good",
        "zone-beside-good",
        "multicast-beside-good",
        "other-host",
        "no-answers",
    ],
)
async def test_every_answer_is_checked_and_the_checked_one_dialled(
    answers: list[str], peer: Endpoint, code: Code, dialled: str | None
) -> None:
    service, conn, _ = make(NAMES, FakeResolver(answers))
    outcome = await register(service, "student.example", peer)
    assert outcome.code is code, outcome.explanation
    want = [Endpoint(ip(dialled), 15000)] if dialled else []
    assert [d.target for d in conn.dials] == want


async def test_rebinding_gets_one_lookup_and_the_dial_is_the_checked_answer() -> None:
    # First lookup: the requester's own address. Any later lookup: cloud metadata.
    fake = FakeResolver(["203.0.113.5"], ["169.254.169.254"])
    service, conn, _ = make(NAMES, fake)
    outcome = await register(service, "rebind.example", REMOTE)
    assert outcome.code is Code.CONNECTED
    assert len(fake.calls) == 1
    assert [d.target for d in conn.dials] == [Endpoint(ip("203.0.113.5"), 15000)]
    # The next request looks up again, gets the internal answer, and is refused.
    outcome = await register(service, "rebind.example", REMOTE)
    assert outcome.code is Code.ADDRESS_NOT_ALLOWED and len(conn.dials) == 1


async def test_port_is_checked_before_any_lookup() -> None:
    fake = FakeResolver(["203.0.113.5"])
    service, _, _ = make(NAMES, fake)
    outcome = await register(service, "student.example", REMOTE, port=22)
    assert outcome.code is Code.PORT_NOT_ALLOWED and fake.calls == []


async def test_lookup_failure_is_denied() -> None:
    fake = FakeResolver(error=socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    service, conn, rec = make(NAMES, fake)
    outcome = await register(service, "nothing.example", REMOTE)
    assert outcome.code is Code.HOSTNAME_NOT_ALLOWED and "gaierror" in outcome.explanation
    assert conn.dials == [] and len(rec.records) == 1


async def test_slow_lookup_is_cut_at_resolve_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeResolver(hang=True)
    service, conn, _ = make(NAMES + "[tuning]\nresolve_timeout = 1.5\n", fake)
    start = trio.current_time()
    outcome = await register(service, "slow.example", REMOTE)
    assert outcome.code is Code.HOSTNAME_NOT_ALLOWED and "TooSlowError" in outcome.explanation
    assert trio.current_time() - start == pytest.approx(1.5)
    assert conn.dials == []


async def test_rate_limited_source_causes_no_lookup() -> None:
    fake = FakeResolver(["203.0.113.5"])
    service, _, _ = make(NAMES + '[ratelimit]\nper_source = "1/minute"\n', fake)
    assert (await register(service, "a.example", REMOTE)).code is Code.CONNECTED
    busy = await register(service, "b.example", REMOTE)
    assert busy.code is Code.RATE_LIMITED
    assert len(fake.calls) == 1


# --- the real daemon: wiring and reload ----------------------------------------------


class OneShotListener:
    """A blocking 127.0.0.1 listener in a thread that records the callback line it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = conn.recv(4096)
                self.lines.append(data.decode(errors="replace"))

    def join(self) -> None:
        self.thread.join(10)


def test_daemon_resolves_localhost_only_when_enabled_and_follows_reload(tmp_path: Path) -> None:
    target = OneShotListener()
    request = f"localhost:{target.port}\n".encode()
    with run_registry(tmp_path, config="") as reg:
        refused = send_line("127.0.0.1", reg.port, request)
        assert refused.startswith("DENIED hostname_not_allowed "), refused
        (tmp_path / "registry.toml").write_text(NAMES)
        reg.proc.send_signal(signal.SIGHUP)
        reg.wait_event("reloaded")
        reply = send_line("127.0.0.1", reg.port, request)
    target.join()
    assert reply.startswith("OK connected "), reply
    assert f" target=127.0.0.1:{target.port} " in reply and " diagnosis=direct " in reply
    assert target.lines and target.lines[0].startswith("CALLBACK id=")
