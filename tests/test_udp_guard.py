"""The UDP loop guard (never answer a reply), the unproven-reply budget, and UDP's
connection slot (an admission token, as a TCP connection takes).

Pure parts are table-driven and property-tested; the edge runs in-process on
loopback sockets; the admission test drives the real ``registry`` executable.
The namespace tests that forge sources are in tests/test_udp_loop.py.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from registry import config as config_mod
from registry.config import Rate
from registry.defense.ratelimit import ReplyBudget
from registry.metrics import Metrics, Probes
from registry.model import Code, Outcome
from registry.net.interfaces import is_local_address
from registry.net.udp import UdpConnector, UdpEdge, budget_settings
from registry.protocol.callback import callback_line
from registry.protocol.cookies import CookieJar
from registry.protocol.jsonl import format_json_reply
from registry.protocol.loopguard import DropReason, classify
from registry.protocol.reply import format_reply
from registry.protocol.text import parse_line
from registry.service import Service
from tests.fakes import ListRecorder
from tests.support import run_registry, send_line

COOKIE_RE = re.compile(rb"cookie=([A-Za-z0-9_-]+)")
R, C, E, P = DropReason.REPLY, DropReason.CALLBACK, DropReason.ECHO, DropReason.PRIVILEGED_PORT

# ------------------------------------------------------------------ classifier

CLASSIFY_TABLE = [
    # (datagram, source port, verdict)
    (b"192.0.2.5:15000", 50000, None),
    (b"192.0.2.5:15000 student=alice cookie=abc" + b" " * 40, 50000, None),
    (b"[2001:db8::1]:15000\n", 50000, None),
    (b"example.org:15000", 50000, None),  # a hostname: the policy decides, not the guard
    (b"ok:15000", 50000, None),  # a host named "ok" is still HOST:PORT
    (b"hello", 50000, None),  # junk: answered with ERROR malformed (within the budget)
    (b"", 50000, None),
    (b"   \n", 50000, None),
    (b'{"host": "192.0.2.5", "port": 15000}', 50000, None),  # JSON request: the parser says why
    (b"{not json", 50000, None),
    (b"OK connected id=1 target=192.0.2.5:15000", 50000, R),
    (b"DENIED address_not_allowed target=10.0.0.1:15000", 50000, R),
    (b"FAILED timeout", 50000, R),
    (b"BUSY rate_limited retry_after=6", 50000, R),
    (b"ERROR malformed 'hello' has no port", 50000, R),
    (b"ERROR", 50000, R),
    (b"error malformed", 50000, R),  # any case
    (b"  \tERROR malformed", 50000, R),  # leading blanks
    (b"COOKIE cookie=abc pad=512", 50000, R),
    (b"COOKIE pad=512", 50000, R),
    (b'{"status": "ERROR", "code": "bad_json"}', 50000, R),
    (b' {"status": "OK"}\n', 50000, R),
    (b"CALLBACK id=7 nonce=0123456789abcdef hello", 50000, C),
    (b"callback id=7", 50000, C),
    (b"ECHO nonce=0123456789abcdef", 50000, E),
    (b"CALLBACK-ish nonce=00", 50000, E),
    (b"you said: nonce=00 hello", 50000, E),
    (b"192.0.2.5:15000 nonce=00", 50000, E),  # nonce is no request key: never valid
    (b"192.0.2.5:15000", 1023, P),
    (b"192.0.2.5:15000", 1024, None),
    (b"192.0.2.5:15000", 7, P),  # echo
    (b"anything", 13, P),  # daytime
    (b"\x00" * 40, 19, P),  # chargen
    (b"\x00" * 48, 123, P),  # NTP
    (b"\x12\x34\x01\x00", 53, P),  # DNS
    (b"192.0.2.5:15000", 0, P),
]


@pytest.mark.parametrize(("data", "port", "verdict"), CLASSIFY_TABLE)
def test_classify(data: bytes, port: int, verdict: DropReason | None) -> None:
    assert classify(data, port) == verdict


@given(st.sampled_from(list(Code)), st.text(max_size=200), st.integers(1024, 65535))
def test_every_text_and_json_reply_is_never_answered(code: Code, text: str, port: int) -> None:
    outcome = Outcome(code=code, explanation=text)
    assert classify(format_reply(outcome), port) == R
    assert classify(format_json_reply(outcome), port) == R


@given(st.text(max_size=200), st.binary(min_size=1, max_size=8), st.integers(1024, 65535))
def test_every_callback_line_is_never_answered(greeting: str, nonce: bytes, port: int) -> None:
    assert classify(callback_line("42", nonce.hex(), greeting), port) == C


@given(st.binary(max_size=600), st.integers(0, 1023))
def test_nothing_from_a_privileged_port_is_answered(data: bytes, port: int) -> None:
    assert classify(data, port) == P


@given(
    st.ip_addresses(),
    st.integers(1, 65535),
    st.lists(
        st.sampled_from(["student=alice", "verify=yes", "token=t0k", "cookie=AbC_-9"]),
        max_size=4,
        unique=True,
    ),
    st.integers(0, 300),
    st.integers(1024, 65535),
)
def test_a_valid_request_is_never_dropped(
    host: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    keys: list[str],
    pad: int,
    source_port: int,
) -> None:
    target = f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"
    data = " ".join([target, *keys]).encode().ljust(pad)
    parse_line(data, allow_cookie=True)  # really a request
    assert classify(data, source_port) is None


# ---------------------------------------------------------------------- budget


def _budget(per_source: str = "10/minute", global_: str = "500/second") -> ReplyBudget:
    return ReplyBudget(Rate.parse(per_source), Rate.parse(global_), 64, 1000)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_budget_per_source_burst_then_refill() -> None:
    budget = _budget()
    a = _ip("192.0.2.1")
    assert [budget.take(a, 0.0) for _ in range(10)] == [None] * 10
    assert budget.take(a, 0.0) == "source"
    assert budget.take(_ip("192.0.2.2"), 0.0) is None  # another source is unaffected
    assert budget.take(a, 5.9) == "source"
    assert budget.take(a, 6.0) is None  # 10/minute: one token every 6 s
    assert budget.take(a, 6.0) == "source"


def test_budget_ipv6_counts_per_64() -> None:
    budget = _budget("2/minute")
    assert budget.take(_ip("2001:db8:0:1::1"), 0.0) is None
    assert budget.take(_ip("2001:db8:0:1::ffff"), 0.0) is None
    assert budget.take(_ip("2001:db8:0:1:abcd::9"), 0.0) == "source"  # the same /64
    assert budget.take(_ip("2001:db8:0:2::1"), 0.0) is None  # the next /64
    # an IPv4 peer seen through a dual-stack socket is that IPv4 source
    assert budget.take(_ip("192.0.2.7"), 0.0) is None
    assert budget.take(_ip("::ffff:192.0.2.7"), 0.0) is None
    assert budget.take(_ip("::ffff:192.0.2.7"), 0.0) == "source"


def test_budget_global_and_a_refused_source_spends_no_global_token() -> None:
    budget = _budget("2/minute", "3/second")
    a, b, c = _ip("192.0.2.1"), _ip("192.0.2.2"), _ip("192.0.2.3")
    assert budget.take(a, 0.0) is None
    assert budget.take(a, 0.0) is None
    for _ in range(50):
        assert budget.take(a, 0.0) == "source"  # these take nothing from the global bucket
    assert budget.take(b, 0.0) is None  # the third global token
    assert budget.take(c, 0.0) == "global"
    assert budget.take(c, 1.0 / 3) is None  # the global refills at 3/s


def test_budget_configure_keeps_used_tokens_and_new_prefix_resets() -> None:
    budget = _budget("2/minute")
    a = _ip("192.0.2.1")
    budget.take(a, 0.0)
    budget.take(a, 0.0)
    same = (Rate.parse("2/minute"), Rate.parse("500/second"), 64, 1000)
    budget.configure(*same)
    assert budget.take(a, 0.0) == "source"
    budget.configure(Rate.parse("4/minute"), Rate.parse("500/second"), 64, 1000)
    assert budget.take(a, 0.0) is None  # a larger burst: two more
    assert budget.take(a, 0.0) is None
    assert budget.take(a, 0.0) == "source"
    v6 = _ip("2001:db8::1")
    budget.take(v6, 0.0)
    budget.configure(Rate.parse("1/minute"), Rate.parse("500/second"), 48, 1000)
    assert budget.take(v6, 0.0) is None  # what a source is changed: a fresh table


# ---------------------------------------------------------------------- metric


def test_metric_counts_drops_by_reason() -> None:
    dropped = {"reply": 3, "source_budget": 2}
    body, _ = Metrics(Probes(udp_dropped=lambda: dropped), process=False).render()
    assert b'registry_udp_dropped_total{reason="reply"} 3.0' in body
    assert b'registry_udp_dropped_total{reason="source_budget"} 2.0' in body


# ------------------------------------------------------------------------ edge

TIGHT = """
[tuning]
unproven_per_source = "3/minute"
"""


async def test_edge_answers_an_unproven_source_within_its_budget_only() -> None:
    cfg = config_mod.loads(TIGHT)
    service = Service(
        cfg,
        is_local=is_local_address,
        connector=UdpConnector(lambda: cfg.callback),
        recorder=ListRecorder(),
    )
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind(("127.0.0.1", 0))
    other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await other.bind(("127.0.0.2", 0))
    addr = ("127.0.0.1", sock.getsockname()[1])
    junk = b"this is not a request".ljust(100)
    with sock, client, other, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            edge = UdpEdge(sock, service, CookieJar(b"k" * 32, 30.0), lambda: cfg)
            await nursery.start(edge.serve)
            for _ in range(3):
                await client.sendto(junk, addr)
                assert (await client.recv(4096)).startswith(b"ERROR malformed")
            await client.sendto(b"ERROR malformed 'x'".ljust(100), addr)  # a reply: dropped
            await client.sendto(junk, addr)  # past the budget: dropped
            await client.sendto(b"192.0.2.5:15000".ljust(100), addr)  # even a cookie request
            # Datagrams on one socket are handled in order: once another source's
            # junk is answered, the three above were handled, and any answer to
            # them is already waiting in the client's socket.
            await other.sendto(junk, addr)
            assert (await other.recv(4096)).startswith(b"ERROR malformed")
            with trio.move_on_after(0.2):
                extra = await client.recv(4096)
                pytest.fail(f"answered past the budget: {extra!r}")
            nursery.cancel_scope.cancel()
    assert edge.dropped == {"reply": 1, "source_budget": 2}


async def test_edge_takes_an_admission_token_without_waiting() -> None:
    """A proven UDP request needs a token from the TCP accept loops' limiter; none left:
    BUSY overloaded at once, and a finished registration gives its token back."""
    cfg = config_mod.loads("")
    service = Service(
        cfg,
        is_local=is_local_address,
        connector=UdpConnector(lambda: cfg.callback),
        recorder=ListRecorder(),
    )
    admission = trio.CapacityLimiter(1)
    tcp_connection = object()
    await admission.acquire_on_behalf_of(tcp_connection)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind(("127.0.0.1", 0))
    target = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await target.bind(("127.0.0.1", 0))
    addr = ("127.0.0.1", sock.getsockname()[1])
    request = f"127.0.0.1:{target.getsockname()[1]} verify=no"
    with sock, client, target, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            jar = CookieJar(b"k" * 32, 30.0)
            await nursery.start(UdpEdge(sock, service, jar, lambda: cfg, admission=admission).serve)
            await client.sendto(request.encode().ljust(512), addr)
            cookie = COOKIE_RE.search(await client.recv(4096)).group(1).decode()  # type: ignore[union-attr]
            proven = f"{request} cookie={cookie}".encode().ljust(512)
            await client.sendto(proven, addr)
            assert (await client.recv(4096)).startswith(b"BUSY overloaded")
            admission.release_on_behalf_of(tcp_connection)
            await client.sendto(proven, addr)
            assert (await client.recv(4096)).startswith(b"OK connected")
            assert admission.borrowed_tokens == 0  # given back
            nursery.cancel_scope.cancel()


# --------------------------------------------------------- admission, end to end

ONE_SLOT = """
[limits]
max_connections = 1
[callback]
verify_timeout = "2s"
"""


@pytest.mark.slow
def test_a_udp_registration_does_not_get_a_tcp_client_refused_for_total(tmp_path: Path) -> None:
    """With every connection slot held by a UDP registration, a TCP client waits for
    the slot (as behind another TCP client) instead of getting ``BUSY ... total``."""
    with (
        run_registry(tmp_path, config=ONE_SLOT) as reg,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_target,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_target,
    ):
        for s in (client, udp_target):
            s.bind(("127.0.0.1", 0))
            s.settimeout(10)
        tcp_target.bind(("127.0.0.1", 0))
        tcp_target.listen(4)
        addr = ("127.0.0.1", reg.port)
        request = f"127.0.0.1:{udp_target.getsockname()[1]}"
        client.sendto(request.encode().ljust(512), addr)
        cookie = COOKIE_RE.search(client.recv(4096)).group(1).decode()  # type: ignore[union-attr]
        client.sendto(f"{request} cookie={cookie}".encode().ljust(512), addr)
        # The callback arrived: the UDP registration holds the only slot now (no
        # echo, so for callback.verify_timeout).
        assert udp_target.recv(4096).startswith(b"CALLBACK ")
        replies: list[str] = []
        tcp = threading.Thread(
            target=lambda: replies.append(
                send_line(
                    "127.0.0.1",
                    reg.port,
                    f"127.0.0.1:{tcp_target.getsockname()[1]}\n".encode(),
                    timeout=15,
                )
            )
        )
        tcp.start()
        udp_reply = client.recv(4096)
        tcp.join(timeout=20)
    assert udp_reply.startswith(b"FAILED timeout"), udp_reply
    assert replies and replies[0].startswith("OK connected"), replies


async def test_edge_budget_follows_a_reload() -> None:
    """The server reconfigures the edges' shared budget on SIGHUP: it applies at once."""
    configs = [config_mod.loads('[tuning]\nunproven_per_source = "1/minute"\n')]
    cfg = configs[0]
    service = Service(
        cfg,
        is_local=is_local_address,
        connector=UdpConnector(lambda: cfg.callback),
        recorder=ListRecorder(),
    )
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind(("127.0.0.1", 0))
    other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await other.bind(("127.0.0.2", 0))
    addr = ("127.0.0.1", sock.getsockname()[1])
    junk = b"this is not a request".ljust(100)
    with sock, client, other, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            jar = CookieJar(b"k" * 32, 30.0)
            edge = UdpEdge(sock, service, jar, lambda: configs[-1])
            await nursery.start(edge.serve)
            await client.sendto(junk, addr)
            assert (await client.recv(4096)).startswith(b"ERROR malformed")
            await client.sendto(junk, addr)  # past 1/minute: dropped
            # handled in order: once another source is answered, that one was dropped
            await other.sendto(junk, addr)
            assert (await other.recv(4096)).startswith(b"ERROR malformed")
            configs.append(config_mod.loads('[tuning]\nunproven_per_source = "3/minute"\n'))
            edge.budget.configure(*budget_settings(configs[-1]))  # as Registry._reload does
            await client.sendto(junk, addr)  # a burst of 3: two more
            assert (await client.recv(4096)).startswith(b"ERROR malformed")
            nursery.cancel_scope.cancel()
    assert edge.dropped == {"source_budget": 1}
