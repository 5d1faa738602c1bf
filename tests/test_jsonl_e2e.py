"""JSON lines over TCP: the real registry executable, and the TCP edge in-process.

End to end, every kind of reply (OK, DENIED, ERROR bad_json naming the field,
too_long) is followed by a good request, to show that a bad client leaves
nothing behind; the records say ``protocol=json``. In-process (memory
streams, virtual clock) the edge's framing is checked: a JSON client is
answered in JSON even when its request cannot be parsed.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from registry import config as config_mod
from registry.model import Endpoint, Protocol
from registry.net.interfaces import is_local_address
from registry.net.tcp import TcpHandler, read_request
from registry.protocol.jsonl import REPLY_KEYS
from registry.protocol.reader import RequestReader
from registry.service import Service
from tests.fakes import ListRecorder, ScriptedConnector
from tests.support import RegistryProcess, run_registry, send_line

NONCE = re.compile(rb"nonce=[0-9a-f]+")


class _Callee:
    """A TCP target in a thread: accepts callbacks and echoes the nonce (bounded, loopback)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                self.calls += 1
                try:
                    line = conn.recv(4096)
                    match = NONCE.search(line)
                    if match:
                        conn.sendall(b"ECHO " + match.group(0) + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    config = '[ratelimit]\nper_source = "1000/minute"\nper_target_port = "1000/minute"\n'
    with run_registry(
        tmp_path_factory.mktemp("jsonl"), listen=("127.0.0.1:0", "[::1]:0"), config=config
    ) as reg:
        yield reg


@pytest.fixture
def callee() -> Iterator[_Callee]:
    target = _Callee()
    yield target
    target.close()


def _ask(reg: RegistryProcess, obj: object | bytes, host: str = "127.0.0.1") -> dict:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
    port = reg.port if host == "127.0.0.1" else int(reg.tcp[1].rsplit(":", 1)[1])
    reply = send_line(host, port, data)
    assert reply.endswith("\n") and reply.count("\n") == 1, reply
    parsed = json.loads(reply)
    assert tuple(parsed) == REPLY_KEYS
    return parsed


def _good(reg: RegistryProcess, callee: _Callee) -> None:
    reply = _ask(reg, {"host": "127.0.0.1", "port": callee.port, "student": "again"})
    assert (reply["status"], reply["code"], reply["verified"]) == ("OK", "connected", True), reply


def test_ok(registry: RegistryProcess, callee: _Callee) -> None:
    reply = _ask(
        registry,
        {"host": "127.0.0.1", "port": callee.port, "student": "alice", "verify": True},
    )
    assert reply["status"] == "OK" and reply["code"] == "connected"
    assert reply["verified"] is True and reply["diagnosis"] == "direct"
    assert reply["target"] == f"127.0.0.1:{callee.port}"
    assert reply["observed"].startswith("127.0.0.1:")
    assert isinstance(reply["rtt_ms"], float) and re.fullmatch(r"[0-9a-f]{12}", reply["id"])
    assert reply["retry_after"] is None
    assert callee.calls == 1
    _good(registry, callee)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"host": "127.0.0.2", "port": 15000}, "source_mismatch"),  # not the address it came from
        ({"host": "127.0.0.1", "port": 80}, "port_not_allowed"),
        ({"host": "169.254.169.254", "port": 15000}, "address_not_allowed"),
        ({"host": "lab.example.com", "port": 15000}, "hostname_not_allowed"),
    ],
)
def test_denied(registry: RegistryProcess, callee: _Callee, request_: dict, code: str) -> None:
    reply = _ask(registry, request_)
    assert (reply["status"], reply["code"]) == ("DENIED", code), reply
    assert reply["explanation"] and reply["verified"] is None and reply["rtt_ms"] is None
    assert callee.calls == 0
    _good(registry, callee)


@pytest.mark.parametrize(
    ("data", "code", "starts"),
    [
        ({"host": "127.0.0.1", "port": "15000"}, "bad_json", '"port": expected an integer'),
        ({"host": "127.0.0.1", "port": True}, "bad_json", '"port": expected an integer'),
        ({"host": "127.0.0.1"}, "bad_json", '"port": missing'),
        ({"host": "127.0.0.1", "port": 15000, "colour": "red"}, "bad_json", '"colour": unknown'),
        ({"host": "127.1", "port": 15000}, "bad_json", '"host": '),
        (b'{"host": "127.0.0.1", "port": 1, "port": 2}\n', "bad_json", '"port": given twice'),
        (b'{"host": "127.0.0.1", "port": NaN}\n', "bad_json", "NaN is not a JSON value"),
        (b'{"host": [[[[["x"]]]]]}\n', "bad_json", "nesting too deep"),
        (b'{"host": \n', "bad_json", "not valid JSON"),
        (b'{"student": "' + b"a" * 600 + b'"}\n', "too_long", "request longer than 512"),
    ],
)
def test_errors_name_the_field(
    registry: RegistryProcess, callee: _Callee, data: dict | bytes, code: str, starts: str
) -> None:
    reply = _ask(registry, data)
    assert (reply["status"], reply["code"]) == ("ERROR", code), reply
    assert reply["explanation"].startswith(starts), reply["explanation"]
    assert reply["observed"].startswith("127.0.0.1:") and reply["id"]
    assert callee.calls == 0
    _good(registry, callee)


def test_framing_without_lf_and_the_text_protocol_alongside(
    registry: RegistryProcess, callee: _Callee
) -> None:
    body = json.dumps({"host": "127.0.0.1", "port": callee.port}).encode()
    # No LF, the client waits: the quiet period ends the (complete) object.
    assert json.loads(send_line("127.0.0.1", registry.port, body))["status"] == "OK"
    # No LF, the client half-closes.
    assert json.loads(send_line("127.0.0.1", registry.port, body, shut=True))["status"] == "OK"
    # The same port still speaks the lab's text format to text clients.
    text = send_line("127.0.0.1", registry.port, f"127.0.0.1:{callee.port}\n".encode())
    assert text.startswith("OK connected ")


def test_ipv6_json(registry: RegistryProcess) -> None:
    target = _Callee("::1")
    try:
        for host in ("::1", "[::1]"):
            reply = _ask(registry, {"host": host, "port": target.port}, host="::1")
            assert (reply["status"], reply["target"]) == ("OK", f"[::1]:{target.port}"), reply
            assert reply["observed"].startswith("[::1]:")
        # IPv6 advertised over IPv4: refused, not dialled.
        reply = _ask(registry, {"host": "::1", "port": target.port})
        assert (reply["status"], reply["code"]) == ("DENIED", "source_mismatch"), reply
    finally:
        target.close()
    assert target.calls == 2


def test_records_say_json(tmp_path: Path) -> None:
    with run_registry(tmp_path) as reg:
        _ask(reg, {"host": "127.0.0.1", "port": 80})
        _ask(reg, {"host": "127.0.0.1", "port": 1.5})
        reg.stop()
    with sqlite3.connect(reg.db) as db:
        rows = db.execute(
            "SELECT protocol, status, code FROM registrations ORDER BY seq"
        ).fetchall()
    assert rows == [("json", "DENIED", "port_not_allowed"), ("json", "ERROR", "bad_json")]


# ------------------------------------------------------------- the edge, in-process

PEER = Endpoint(ipaddress.ip_address("127.0.0.1"), 50000)
CFG = config_mod.loads("")


async def _serve(chunks: list[tuple[float, bytes]]) -> tuple[bytes, ListRecorder]:
    recorder = ListRecorder()
    service = Service(
        CFG, is_local=is_local_address, connector=ScriptedConnector(), recorder=recorder
    )
    client, server = trio.testing.memory_stream_pair()

    async def drip() -> None:
        for delay, data in chunks:
            await trio.sleep(delay)
            await client.send_all(data)

    reply = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip)
        nursery.start_soon(TcpHandler(service).handle, server, PEER)
        while not reply.endswith(b"\n"):
            reply += await client.receive_some(4096)
    return reply, recorder


@pytest.mark.parametrize(
    ("chunks", "code", "at"),
    [
        ([(0, b'{"host": "127.0.0.1", "port": "x"}\n')], "bad_json", 0.0),
        ([(0, b"  {oops\n")], "bad_json", 0.0),
        # An incomplete object is not parsed at the quiet period: it waits for the deadline.
        ([(0, b'{"host": "127.0.0.1",')], "read_timeout", 5.0),
        ([(0, b"{" + b" " * 600)], "too_long", 0.0),
    ],
)
async def test_json_clients_get_json_errors(
    autojump_clock: trio.testing.MockClock, chunks: list[tuple[float, bytes]], code: str, at: float
) -> None:
    reply, recorder = await _serve(chunks)
    obj = json.loads(reply)
    assert (obj["status"], obj["code"]) == ("ERROR", code)
    assert trio.current_time() == pytest.approx(at)
    assert [r.protocol for r in recorder.records] == ["json"]


async def test_json_request_split_across_writes(autojump_clock: trio.testing.MockClock) -> None:
    chunks = [(0, b'{"host": "127.0.0.1", '), (1.0, b'"port": 15000}'), (0, b"\n")]
    reply, recorder = await _serve(chunks)
    assert json.loads(reply)["status"] == "OK"
    assert trio.current_time() == pytest.approx(1.0)


async def test_read_request_reports_json(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b'\r\n {"host": "::1", "port": 15000}')
    protocol, request = await read_request(server, RequestReader(CFG.protocol, trio.current_time()))
    assert protocol is Protocol.JSON and request.port == 15000
    assert trio.current_time() == pytest.approx(0.25)  # complete object + quiet period
