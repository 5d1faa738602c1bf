"""Admin HTTP endpoint over real loopback sockets.

Most tests run ``AdminServer`` in-process on 127.0.0.1:0 with a real SQLite
store and the real Service (a ScriptedConnector instead of dialling), and
talk to it with ``http.client`` (in a worker thread) or a raw trio stream for
malformed HTTP and the event stream. A few start the real ``registry serve``
executable. Every wait is bounded.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import json
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from registry import config as config_mod
from registry.admin import pages as dashboard
from registry.admin.core.grading import parse_roster
from registry.admin.events import EventHub
from registry.admin.http import AdminServer, AdminSettings, open_listeners
from registry.defense.conncaps import ConnectionCaps
from registry.metrics import Metrics
from registry.model import Endpoint, Protocol, Request
from registry.net.interfaces import is_local_address
from registry.server import Runtime, daemon_view
from registry.service import Service
from registry.store.aio import AsyncStore
from tests.fakes import ScriptedConnector
from tests.support import exe, free_port, run_registry, send_line, stored

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PEER = Endpoint(LOOPBACK, 40000)
EVIL = "<script>alert(1)</script>"
TOKEN = "s3cret-token"


@dataclass
class Admin:
    server: AdminServer
    runtime: Runtime
    port: int

    async def get(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return await trio.to_thread.run_sync(
            functools.partial(fetch, self.port, path, method, headers or {})
        )

    async def register(self, student: str = "alice", port: int = 15000) -> None:
        request = Request(LOOPBACK, port, student=student)
        await self.runtime.service.register(request, PEER, Protocol.TEXT, time.time())


def fetch(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with the stdlib client; (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@asynccontextmanager
async def admin_server(
    tmp_path: Path, cfg_text: str = "", settings: AdminSettings | None = None
) -> AsyncIterator[Admin]:
    cfg = config_mod.loads(cfg_text)
    async with AsyncStore(str(tmp_path / "registry.db")) as store:
        service = Service(
            cfg, is_local=is_local_address, connector=ScriptedConnector(), recorder=store
        )
        runtime = Runtime(cfg, service, ConnectionCaps(16, 4), store, tcp=[PEER])
        server = AdminServer(daemon_view(runtime), settings)
        listeners = await open_listeners("127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            yield Admin(server, runtime, port)
            nursery.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def read_until(stream: trio.SocketStream, buf: bytearray, marker: bytes) -> None:
    while marker not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, f"stream ended before {marker!r}; got {bytes(buf)!r}"
        buf += chunk


async def open_events(port: int) -> tuple[trio.SocketStream, bytearray]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    buf = bytearray()
    await read_until(stream, buf, b": connected\n\n")
    return stream, buf


# --- probes and pages ------------------------------------------------------------------


async def test_healthz_and_readyz_follow_draining(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        assert (await admin.get("/healthz"))[::2] == (200, b"ok\n")
        assert (await admin.get("/readyz"))[::2] == (200, b"ready\n")
        admin.runtime.draining = True
        assert (await admin.get("/readyz"))[::2] == (503, b"draining\n")
        assert (await admin.get("/healthz"))[0] == 200


async def test_dashboard_page_headers_and_content(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        await admin.register("alice")
        status, headers, body = await admin.get("/")
        detailed = (await admin.get("/registrations"))[2].decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == dashboard.CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store" and headers["connection"] == "close"
    page = body.decode()
    # The class view: students, not registrations; no ids or ephemeral ports.
    assert re.search(
        r'<span id="connected">1</span> of\s*<span id="students">1</span> students', page
    )
    assert "Send <b>IP:PORT</b> to <b>127.0.0.1:40000</b>" in page  # the listener (PEER here)
    students = page.split('id="working"')[1]
    assert "alice" in students and ":40000" not in students and "r0" not in students
    assert 'href="/registrations"' in page
    assert '<b id="count-OK">1</b>' in detailed and '<b id="count-total">1</b>' in detailed
    assert 'data-student="alice"' in detailed and "connected" in detailed


async def test_dashboard_escapes_a_hostile_student_from_the_store(tmp_path: Path) -> None:
    # The text parser only admits [A-Za-z0-9._@-] names, so the row goes into the store directly.
    async with admin_server(tmp_path) as admin:
        await admin.runtime.store.record(
            stored(1, student=EVIL, explanation=f'"><img src=x onerror=alert(2)> {EVIL}')
        )
        pages = [(await admin.get(p))[2].decode() for p in ("/", "/registrations")]
        api = json.loads((await admin.get("/api/registrations"))[2])
    for page in pages:
        assert EVIL not in page and "onerror=alert(2)>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert page.count("<script>") == 1  # ours
    assert api[0]["student"] == EVIL  # JSON carries the raw value; the browser uses textContent


async def test_dashboard_filters_and_bad_parameters(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        await admin.register("alice")
        await admin.register("bob")
        page = (await admin.get("/registrations?student=bob&since=1h&limit=5"))[2].decode()
        assert 'data-student="bob"' in page and 'data-student="alice"' not in page
        for path in ("/", "/registrations", "/api/summary"):
            bad = ("limit=0", "limit=abc", "limit=1001", "limit=%C2%B2", "since=yesterday")
            bad += ("student=a%E2%80%AEb", "student=" + "x" * 201)
            for query in bad:
                status, _, body = await admin.get(f"{path}?{query}")
                assert status == 400, (path, query)
                assert query.split("=")[0].encode() in body


async def test_student_filter_finds_a_name_however_it_is_typed(tmp_path: Path) -> None:
    """?student= is normalised as registrations are: josé typed decomposed finds josé."""
    async with admin_server(tmp_path) as admin:
        await admin.register("jos\u00e9")
        status, _, body = await admin.get("/api/registrations?student=jose%CC%81")
        assert status == 200
        assert [r["student"] for r in json.loads(body)] == ["jos\u00e9"]


# --- JSON API --------------------------------------------------------------------------


async def test_api_registrations_limit_student_since(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        for name in ("alice", "bob", "alice"):
            await admin.register(name)
        await admin.runtime.store.record(stored(9, received_at=time.time() - 7200, student="old"))
        status, headers, body = await admin.get("/api/registrations")
        assert status == 200 and headers["content-type"].startswith("application/json")
        everything = json.loads(body)
        assert [r["student"] for r in everything] == ["old", "alice", "bob", "alice"]
        assert set(everything[0]) >= {"id", "received_at", "status", "code", "explanation"}
        cases = {
            "/api/registrations?limit=2": ["bob", "alice"],
            "/api/registrations?student=alice": ["alice", "alice"],
            "/api/registrations?since=1h": ["alice", "bob", "alice"],
            "/api/registrations?student=nobody": [],
        }
        for path, students in cases.items():
            assert [r["student"] for r in json.loads((await admin.get(path))[2])] == students, path
        assert (await admin.get("/api/registrations?since=nonsense"))[0] == 400


async def test_api_summary(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        await admin.register("alice")
        await admin.runtime.store.record(stored(1, student="bob"))
        summary = json.loads((await admin.get("/api/summary"))[2])
    assert summary["counts"] == {
        "OK": 1,
        "FAILED": 1,
        "DENIED": 0,
        "BUSY": 0,
        "ERROR": 0,
        "total": 2,
    }
    assert [(s["student"], s["best_status"]) for s in summary["students"]] == [
        ("alice", "OK"),
        ("bob", "FAILED"),
    ]
    assert summary["class"] == {"students": 2, "connected": 1, "not_started": 0}


async def test_api_summary_with_a_roster_and_the_grade_sheet_download(tmp_path: Path) -> None:
    """Every roster student has a row (in roster order); a nameless registration from a
    roster address is that student's; /api/summary.csv is the grade sheet."""
    async with admin_server(tmp_path) as admin:
        admin.runtime.roster = parse_roster(
            "student,address\nzoë,\nbea,192.168.1.7\nalice,\n", "class.csv"
        )
        await admin.register("alice")
        await admin.runtime.store.record(stored(1, student=None, peer="192.168.1.7:50123"))
        await admin.runtime.store.record(stored(2, student=None, peer="192.168.1.9:50123"))
        summary = json.loads((await admin.get("/api/summary"))[2])
        status, headers, body = await admin.get("/api/summary.csv")
    assert summary["class"] == {"students": 3, "connected": 1, "not_started": 1}
    rows = [
        (s["student"], s["source"], s["attempts"], s["best_status"]) for s in summary["students"]
    ]
    assert rows == [
        ("zoë", None, 0, None),
        ("bea", None, 1, "FAILED"),
        ("alice", None, 1, "OK"),
        (None, "192.168.1.9", 1, "FAILED"),
    ]
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"] == 'attachment; filename="grades.csv"'
    lines = body.decode().splitlines()
    assert lines[0].startswith("student,source,best_status,best_code,first_success_at,attempts")
    assert [line.split(",")[0] for line in lines[1:]] == ["zoë", "bea", "alice", ""]


# --- metrics -----------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_counters_move(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        status, headers, body = await admin.get("/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        before = samples(body.decode())
        await admin.register("alice")
        await admin.register("alice")
        after = samples((await admin.get("/metrics"))[2].decode())
    ok = (
        "registry_registrations_total",
        (("code", "connected"), ("protocol", "text"), ("status", "OK")),
    )
    assert ok not in before and after[ok] == 2
    assert after[("registry_callback_rtt_seconds_count", ())] == 2
    assert after[("registry_callback_rtt_seconds_sum", ())] == pytest.approx(0.003)
    assert after[("registry_registration_duration_seconds_count", ())] == 2
    for gauge in ("open_connections", "callbacks_in_flight", "ratelimit_entries", "draining"):
        assert (f"registry_{gauge}", ()) in after, gauge
    assert after[("registry_ratelimit_entries", ())] > before[("registry_ratelimit_entries", ())]
    info = [k for k in after if k[0] == "registry_info"]
    assert info and dict(info[0][1])["policy_mode"] == "strict" and dict(info[0][1])["version"]


async def test_metrics_count_door_refusals_by_reason(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        before = samples((await admin.get("/metrics"))[2].decode())
        admin.runtime.tally.add("203.0.113.9", "rate_limited")
        admin.runtime.tally.add("203.0.113.9", "rate_limited")
        admin.runtime.tally.add("203.0.113.8", "per_source")
        after = samples((await admin.get("/metrics"))[2].decode())
    key = "registry_door_refusals_total"
    assert before[(key, (("reason", "rate_limited"),))] == 0
    assert after[(key, (("reason", "rate_limited"),))] == 2
    assert after[(key, (("reason", "per_source"),))] == 1
    assert after[(key, (("reason", "total"),))] == 0


async def test_metrics_count_udp_datagrams_dropped_by_reason(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        admin.runtime.udp_dropped["reply"] += 3
        after = samples((await admin.get("/metrics"))[2].decode())
    assert after[("registry_udp_dropped_total", (("reason", "reply"),))] == 3


def test_metrics_use_their_own_registry() -> None:
    first, second = Metrics(process=False), Metrics(process=False)  # no duplicate-name clash
    first.observe(stored(1, status="OK", code="connected", rtt_ms=2.0))
    assert b'registry_registrations_total{code="connected"' in first.render()[0]
    assert b"registry_registrations_total{" not in second.render()[0]
    assert REGISTRY.get_sample_value("registry_registrations_total") is None


# --- the event stream ----------------------------------------------------------------------


async def test_events_deliver_a_new_registration_promptly(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        with trio.fail_after(5):
            stream, buf = await open_events(admin.port)
            async with stream:
                head = bytes(buf).split(b"\r\n\r\n", 1)[0].decode().lower()
                assert (
                    "content-type: text/event-stream" in head and "cache-control: no-store" in head
                )
                assert admin.server.hub.clients == 1
                await admin.register("carol")
                await read_until(stream, buf, b"}\n\n")
    event = re.search(rb"data: (\{.*\})\n\n", bytes(buf))
    assert event is not None
    record = json.loads(event.group(1))
    assert record["student"] == "carol" and record["status"] == "OK"


async def test_events_heartbeat_when_idle(tmp_path: Path) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(heartbeat=0.2)) as admin:
        with trio.fail_after(5):
            stream, buf = await open_events(admin.port)
            async with stream:
                await read_until(stream, buf, b": heartbeat\n\n")


async def test_event_client_cap_and_slot_freed_on_disconnect(tmp_path: Path) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(max_event_clients=1)) as admin:
        with trio.fail_after(5):
            stream, _ = await open_events(admin.port)
            status, headers, _ = await admin.get("/api/events")
            assert status == 503 and headers["retry-after"] == "10"
            await stream.aclose()
            # The server notices the close without waiting for a heartbeat (bounded above).
            while admin.server.hub.clients:  # noqa: ASYNC110 (no event to wait on: polled state)
                await trio.sleep(0.01)
            stream, _ = await open_events(admin.port)
            await stream.aclose()


async def test_slow_event_client_is_dropped_not_buffered(tmp_path: Path) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(event_queue=2)) as admin:
        with trio.fail_after(5):
            stream, buf = await open_events(admin.port)
            # Publish without yielding, as a burst of registrations would: the queue holds
            # two (plus one handed straight to the stream task if it is already waiting).
            hub, published = admin.server.hub, 0
            while hub.clients and published < 10:
                hub.publish(stored(published))
                published += 1
            assert hub.dropped == 1 and published in (3, 4)
            async with stream:
                while chunk := await stream.receive_some(65536):
                    buf += chunk
    # What was queued is still delivered, then the stream ends.
    assert bytes(buf).count(b"data: ") == published - 1
    assert bytes(buf).endswith(b"0\r\n\r\n")  # the chunked stream ended cleanly


async def test_event_hub_bounds() -> None:
    hub = EventHub(max_clients=2, queue_size=3)
    with hub.subscribe() as a, hub.subscribe() as b, hub.subscribe() as c:
        assert a is not None and b is not None and c is None
        for n in range(3):
            hub.publish(stored(n))
        assert a.receive_nowait().startswith(b"data: {")  # a keeps up a little
        hub.publish(stored(3))  # a has room, b is full
        assert hub.clients == 1 and hub.dropped == 1
        assert len([b.receive_nowait() for _ in range(3)]) == 3
        with pytest.raises(trio.EndOfChannel):
            b.receive_nowait()
    assert hub.clients == 0


# --- HTTP edge cases ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/9.9\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, b"400"),  # TLS hello
        (b"POST /api/registrations HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", b"405"),
        (b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", b"404"),
        (b"GET /healthz HTTP/1.0\r\n\r\n", b"200"),
        (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: a\r\n\r\n", b"200"),
    ],
)
async def test_bad_or_odd_http(tmp_path: Path, request_bytes: bytes, status: bytes) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(max_head_bytes=16384)) as admin:
        reply = await raw_exchange(admin.port, request_bytes)
        assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
        # ...and the server is still there.
        assert (await admin.get("/healthz"))[0] == 200


async def test_405_names_the_allowed_methods_and_head_has_no_body(tmp_path: Path) -> None:
    async with admin_server(tmp_path) as admin:
        status, headers, _ = await admin.get("/", method="DELETE")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        get_headers = (await admin.get("/api/summary"))[1]
        status, headers, body = await admin.get("/api/summary", method="HEAD")
        assert status == 200 and body == b""
        assert headers["content-length"] == get_headers["content-length"]
        # the event stream's headers, and no stream: the answer ends
        status, headers, body = await admin.get("/api/events", method="HEAD")
        assert status == 200 and body == b"" and headers["content-type"] == "text/event-stream"
        assert admin.server.hub.clients == 0
        assert (await admin.get("/api/events", method="POST"))[0] == 405


async def test_incomplete_request_head_is_cut_off(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with admin_server(tmp_path, settings=AdminSettings(read_timeout=0.3)) as admin:
        start = trio.current_time()
        reply = await raw_exchange(admin.port, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=5)
        assert reply == b""
        assert trio.current_time() - start == pytest.approx(0.3, abs=0.01)


# --- the real executable -----------------------------------------------------------------------


@pytest.mark.slow
def test_real_registry_serves_admin_and_protects_its_port(tmp_path: Path) -> None:
    with run_registry(tmp_path, admin="127.0.0.1:0") as reg:
        assert reg.admin is not None
        port = int(reg.admin.rsplit(":", 1)[1])
        assert fetch(port, "/healthz")[0] == 200 and fetch(port, "/readyz")[0] == 200
        # The admin port is ours: advertising it is refused as a self target.
        reply = send_line("127.0.0.1", reg.port, f"127.0.0.1:{port} student=eve\n".encode())
        assert reply.startswith("DENIED self_target"), reply
        registrations = json.loads(fetch(port, "/api/registrations")[2])
        assert [(r["student"], r["code"]) for r in registrations] == [("eve", "self_target")]
        text = fetch(port, "/metrics")[2].decode()
        key = ("registry_registrations_total", (("code", "self_target"), ("protocol", "text"), ("status", "DENIED")))  # fmt: skip
        assert samples(text)[key] == 1
        assert reg.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        fetch(port, "/healthz")


@pytest.mark.slow
def test_admin_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        cmd = [exe("registry"), "serve", "--db", str(tmp_path / "r.db"), "--log-format", "json"]
        cmd += [
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--admin",
            f"127.0.0.1:{busy}",
            "--workers",
            "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert done.returncode != 0
    assert f"127.0.0.1:{busy} for the admin endpoint" in done.stderr
