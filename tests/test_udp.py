"""UDP registrations: cookies, callbacks, no amplification, forged sources, dual stack.

Most tests drive the real ``registry serve`` executable on 127.0.0.1 / ::1
(tests/support.py); the dual-stack tests run the edge in-process on a ``[::]``
socket without V6ONLY, which the registry itself never opens. The netns test
creates its own namespace (root only) so that a datagram can come from a
second address of a real interface. Every socket has a timeout, every loop a
bound; all traffic stays on loopback or inside the test's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from registry import config as config_mod
from registry.model import Code, Endpoint, Request
from registry.net.connector import TcpConnector
from registry.net.interfaces import is_local_address
from registry.net.tcp import TcpHandler
from registry.net.udp import UdpConnector, UdpEdge, challenge_reply, fit_reply
from registry.protocol.cookies import CookieJar
from registry.service import Service
from tests.fakes import ListRecorder
from tests.support import IN_CI, RegistryProcess, exe, require_tool, run_registry

GENEROUS = """
[ratelimit]
per_source = "1000/minute"
per_target = "1000/minute"
per_target_port = "1000/minute"
[callback]
verify_timeout = "1s"
[tuning]
unproven_per_source = "1000/minute"
"""
PAD = 512
COOKIE_RE = re.compile(rb"cookie=([A-Za-z0-9_-]+)")
NONCE_RE = re.compile(rb"nonce=([0-9a-f]+)")


# --------------------------------------------------------------------- helpers


def _udp(host: str = "127.0.0.1", port: int = 0, timeout: float = 3.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(timeout)
    return sock


def _pad(text: str, size: int = PAD) -> bytes:
    return text.encode().ljust(size)


def _recv(sock: socket.socket, timeout: float) -> bytes | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(65535)
    except TimeoutError:
        return None


def _cookie(sock: socket.socket, registry: tuple[str, int], request: str) -> bytes:
    sock.sendto(_pad(request), registry)
    reply = _recv(sock, 3.0)
    assert reply is not None and reply.startswith(b"COOKIE cookie="), reply
    match = COOKIE_RE.search(reply)
    assert match is not None
    return match.group(1)


def _echo_callback(target: socket.socket, timeout: float) -> bytes | None:
    """Receive one CALLBACK datagram (or None) and echo its nonce like `student server --udp`."""
    got = None
    try:
        target.settimeout(timeout)
        got, addr = target.recvfrom(4096)
    except TimeoutError:
        return None
    match = NONCE_RE.search(got)
    if match:
        target.sendto(b"ECHO nonce=" + match.group(1) + b"\n", addr)
    return got


def _udp_endpoints(reg: RegistryProcess) -> list[str]:
    listening = reg.events("listening")
    assert listening and listening[0].get("udp"), f"no UDP in the listening event: {listening}"
    return listening[0]["udp"]


def _rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT protocol, status, code FROM registrations ORDER BY seq"
        ).fetchall()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One shared registry on 127.0.0.1 with UDP and generous rate limits."""
    with run_registry(tmp_path_factory.mktemp("udp"), config=GENEROUS) as reg:
        assert _udp_endpoints(reg) == reg.tcp  # same address, same port number
        yield reg


# ------------------------------------------------------------- datagram shapes


@pytest.mark.parametrize(
    ("line", "limit", "expected"),
    [
        (b"OK connected id=1 the end\n", 100, b"OK connected id=1 the end\n"),
        (b"OK connected id=1 the end\n", 25, b"OK connected id=1 the end"),
        (b"OK connected id=1 the end\n", 24, b"OK connected id=1 ...\n"),
        (b"OK connected id=1 the end\n", 21, b"OK connected id=1 ..."),
        (b"OK connected id=1 the end\n", 20, b"OK connected ...\n"),
        (b"OK connected id=1 the end\n", 13, b"OK connected\n"),
        (b"OK connected id=1 the end\n", 12, b"OK connected"),
        (b"OK connected id=1 the end\n", 11, None),
        (b"COOKIE pad=512\n", 14, b"COOKIE pad=512"),
        (b"", 0, b""),
    ],
)
def test_fit_reply(line: bytes, limit: int, expected: bytes | None) -> None:
    assert fit_reply(line, limit) == expected


@given(
    st.lists(st.text(alphabet="abc=xyz0123.", min_size=1, max_size=12), min_size=2, max_size=30),
    st.integers(min_value=0, max_value=400),
)
def test_fit_reply_never_exceeds_the_limit(words: list[str], limit: int) -> None:
    line = " ".join(words).encode() + b"\n"
    out = fit_reply(line, limit)
    head = b" ".join(line.rstrip(b"\n").split(b" ")[:2])
    if len(head) > limit:
        assert out is None
    else:
        assert out is not None and len(out) <= limit and out.startswith(head)


@pytest.mark.parametrize(
    ("limit", "starts"),
    [
        (512, b"COOKIE cookie=AAAAAAAAAAAAAAAA pad=512 send"),
        (40, b"COOKIE cookie=AAAAAAAAAAAAAAAA pad=512\n"),
        (38, b"COOKIE cookie=AAAAAAAAAAAAAAAA pad=512"),
        (37, b"COOKIE pad=512\n"),  # the cookie cannot come with its pad=: ask for padding
        (14, b"COOKIE pad=512"),
    ],
)
def test_challenge_shapes(limit: int, starts: bytes) -> None:
    out = challenge_reply("A" * 16, 512, limit)
    assert out is not None and out.startswith(starts) and len(out) <= limit


def test_challenge_too_small_for_anything() -> None:
    assert challenge_reply("A" * 16, 512, 13) is None


# ---------------------------------------------------------- the real registry


@pytest.mark.slow
def test_bare_datagram_gets_a_cookie_and_no_callback(registry: RegistryProcess) -> None:
    reg = ("127.0.0.1", registry.port)
    with _udp() as client, _udp() as target:
        tport = target.getsockname()[1]
        request = f"127.0.0.1:{tport} student=bare"
        client.sendto(_pad(request), reg)
        reply = _recv(client, 3.0)
        assert reply is not None and reply.startswith(b"COOKIE cookie=") and b" pad=512 " in reply
        assert _echo_callback(target, 0.5) is None  # the challenge alone calls nobody
        # Control (the test can fail): the same request with its cookie does call back.
        cookie = COOKIE_RE.search(reply).group(1).decode()  # type: ignore[union-attr]
        client.sendto(_pad(f"{request} cookie={cookie}"), reg)
        assert (_echo_callback(target, 3.0) or b"").startswith(b"CALLBACK id=")
        final = _recv(client, 5.0)
        assert final is not None and final.startswith(b"OK connected "), final
        assert b"verified=yes" in final


def test_unpadded_short_request_is_asked_to_pad(registry: RegistryProcess) -> None:
    with _udp() as client:
        client.sendto(b"127.0.0.1:15000", ("127.0.0.1", registry.port))
        assert _recv(client, 3.0) == b"COOKIE pad=512\n"


@pytest.mark.slow
def test_student_server_and_client_over_udp(registry: RegistryProcess, tmp_path: Path) -> None:
    server = subprocess.Popen(
        [exe("student"), "server", "--udp", "--port", "0", "--bind", "127.0.0.1",
         "--count", "1", "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.match(r"Student server listening on UDP port (\d+)\.\.\.", first)
        assert match, first
        client = subprocess.run(
            [exe("student"), "client", "--registry", f"127.0.0.1:{registry.port}",
             "--port", match.group(1), "--udp", "--student", "udp-e2e", "--verify", "yes"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        assert f"Sent to Registry Server: 127.0.0.1:{match.group(1)}" in client.stdout
        assert "OK connected" in client.stdout and "verified=yes" in client.stdout
        out, _ = server.communicate(timeout=20)
        assert server.returncode == 0
        assert "Datagram received from instructor's server at 127.0.0.1:" in out
        assert "CALLBACK id=" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)


@pytest.mark.slow
def test_cookie_replayed_after_its_windows_fails(tmp_path: Path) -> None:
    config = GENEROUS + 'cookie_window = "300ms"\n'  # GENEROUS ends in [tuning]
    with run_registry(tmp_path, config=config) as reg, _udp() as client, _udp() as target:
        addr = ("127.0.0.1", reg.port)
        request = f"127.0.0.1:{target.getsockname()[1]}"
        cookie = _cookie(client, addr, request).decode()
        time.sleep(0.7)  # more than two 300 ms windows: the cookie must be dead
        client.sendto(_pad(f"{request} cookie={cookie}"), addr)
        reply = _recv(client, 3.0)
        assert reply is not None and reply.startswith(b"COOKIE cookie="), reply
        assert COOKIE_RE.search(reply).group(1).decode() != cookie  # type: ignore[union-attr]
        assert _echo_callback(target, 0.5) is None
        # Control: a fresh cookie, used at once, works.
        fresh = _cookie(client, addr, request).decode()
        client.sendto(_pad(f"{request} cookie={fresh}"), addr)
        assert _echo_callback(target, 3.0) is not None
        assert (_recv(client, 5.0) or b"").startswith(b"OK connected")
        reg.stop()
        assert _rows(reg.db) == [("udp", "OK", "connected")]  # challenges are not recorded


@pytest.mark.slow
def test_policy_and_rate_limits_apply_to_udp(tmp_path: Path) -> None:
    config = '[ratelimit]\nper_source = "2/minute"\n'
    with run_registry(tmp_path, config=config) as reg, _udp() as client, _udp() as target:
        addr = ("127.0.0.1", reg.port)
        tport = target.getsockname()[1]
        replies = []
        for advertised in (f"127.0.0.2:{tport}", "127.0.0.1:80", f"127.0.0.1:{tport}"):
            cookie = _cookie(client, addr, advertised).decode()
            client.sendto(_pad(f"{advertised} cookie={cookie}"), addr)
            replies.append(_recv(client, 5.0) or b"")
        assert replies[0].startswith(b"DENIED source_mismatch "), replies[0]
        assert replies[1].startswith(b"DENIED port_not_allowed "), replies[1]
        assert replies[2].startswith(b"BUSY rate_limited "), replies[2]  # 3rd within a minute
        assert _echo_callback(target, 0.3) is None
        reg.stop()
        assert [r[2] for r in _rows(reg.db)] == [
            "source_mismatch",
            "port_not_allowed",
            "rate_limited",
        ]


class _Echoer:
    """A background UDP target that answers every CALLBACK datagram (bounded by stop())."""

    def __init__(self) -> None:
        self.sock = _udp(timeout=0.1)
        self.port = self.sock.getsockname()[1]
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            if _echo_callback(self.sock, 0.1) is not None:
                self.calls += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _shapes(tport: int) -> list[bytes]:
    """Requests of every kind and size, none of them carrying a valid cookie."""
    good = f"127.0.0.1:{tport}"
    return [
        b"",
        b"x",
        b"\n",
        b" " * 40,
        b"\x00" * 30,
        b"1.2.3.4:1024",
        b"127.0.0.1:15000",
        good.encode(),
        f"{good} student=alice verify=yes".encode(),
        f"{good} token=abc".encode(),
        f"[::1]:{tport}".encode(),
        b"127.1:15000",
        b"0x7f.0.0.1:15000 student=a-long-student-name-to-make-a-long-error-message",
        b"GET / HTTP/1.1",
        b'{"host": "127.0.0.1", "port": 15000}',
        b"lab.example.com:15000",
        f"{good} cookie=AAAAAAAAAAAAAAAA".encode(),
        f"{good} cookie=forged".encode(),
        f"{good} bogus=1".encode(),
        b"\xff\xfe" * 20,
        _pad(good, 100),
        _pad(good, 511),
        _pad(good, 512),
        b"y" * 513,
        b"z" * 4000,
        b"w" * 60000,
    ]


def _exchange(
    sends: list[tuple[socket.socket, bytes]],
    addr: tuple[str, int],
    wait: float,
    *,
    until_each_answered: bool = False,
) -> dict[socket.socket, list[bytes]]:
    """Send every datagram, then collect every reply for ``wait`` seconds (or, with
    ``until_each_answered``, until each socket has one, plus a short linger for extras)."""
    got: dict[socket.socket, list[bytes]] = {s: [] for s, _ in sends}
    for sock, data in sends:
        sock.sendto(data, addr)
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if until_each_answered and all(got.values()):
            deadline = min(deadline, time.monotonic() + 0.2)
        ready, _, _ = select.select(list(got), [], [], min(left, 0.1))
        for sock in ready:
            try:
                got[sock].append(sock.recv(65535))
            except OSError:
                pass
    return got


@pytest.mark.slow
def test_no_reply_is_ever_larger_than_its_request(registry: RegistryProcess) -> None:
    addr = ("127.0.0.1", registry.port)
    echoer = _Echoer()
    sockets: list[socket.socket] = []
    try:
        shapes = _shapes(echoer.port)
        # Round 1: every shape from its own socket (challenges, errors, silence).
        sends = [(_udp(), data) for data in shapes]
        sockets += [s for s, _ in sends]
        round1 = _exchange(sends, addr, 1.0)
        # Round 2: valid cookies, padded and not, so that real outcomes come back.
        verified = []
        for pad in (0, 40, 60, 120, 200, 512):
            sock = _udp()
            sockets.append(sock)
            request = f"127.0.0.1:{echoer.port} student=amp{pad}"
            cookie = _cookie(sock, addr, request).decode()
            verified.append((sock, _pad(f"{request} cookie={cookie}", pad)))
        round2 = _exchange(verified, addr, 5.0, until_each_answered=True)
    finally:
        echoer.stop()
        for sock in sockets:
            sock.close()
    sent = received = 0
    for sends_, got in ((sends, round1), (verified, round2)):
        for sock, data in sends_:
            requested = min(len(data), PAD + 1)  # the registry reads at most 513 bytes
            for reply in got[sock]:
                assert len(reply) <= requested, (data[:60], reply)
            sent += len(data)
            received += sum(len(r) for r in got[sock])
    assert received / sent <= 1.0
    # The shapes did exercise every path: silence, errors, challenges and outcomes.
    replies = [r for got in (round1, round2) for rs in got.values() for r in rs]
    assert any(r.startswith(b"ERROR malformed") for r in replies)
    assert any(r.startswith(b"ERROR too_long") for r in replies)
    assert any(r.startswith(b"COOKIE cookie=") for r in replies)
    assert any(r == b"COOKIE pad=512\n" for r in replies)
    assert sum(r.startswith(b"OK connected") for r in replies) >= 4
    assert round1[sends[0][0]] == []  # an empty datagram gets nothing back
    assert echoer.calls == len(verified)  # only valid cookies caused callbacks


@pytest.mark.slow
def test_forged_source_on_loopback_gets_no_callback(registry: RegistryProcess) -> None:
    """127.0.0.2 is a second local address on Linux: a datagram from it carrying a
    cookie issued to 127.0.0.1 (same port) must not cause a callback."""
    addr = ("127.0.0.1", registry.port)
    with _udp("127.0.0.1") as real, _udp("127.0.0.2") as target:
        tport = target.getsockname()[1]
        cookie = _cookie(real, addr, f"127.0.0.1:{tport}").decode()
        with _udp("127.0.0.2", real.getsockname()[1]) as forger:
            forger.sendto(_pad(f"127.0.0.2:{tport} cookie={cookie}"), addr)
            reply = _recv(forger, 3.0)
            assert reply is not None and reply.startswith(b"COOKIE cookie="), reply
            assert _echo_callback(target, 0.5) is None
            # Control: 127.0.0.2 with a cookie of its own is called back.
            own = _cookie(forger, addr, f"127.0.0.2:{tport}").decode()
            forger.sendto(_pad(f"127.0.0.2:{tport} cookie={own}"), addr)
            assert _echo_callback(target, 3.0) is not None
            assert (_recv(forger, 5.0) or b"").startswith(b"OK connected")


# --------------------------------------------------------- forged source in a netns

NETNS_CLIENT = r"""
import json, re, socket, sys
reg = ("198.51.100.1", int(sys.argv[1]))
def udp(host, port=0, timeout=3.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(timeout)
    return s
def recv(s, t):
    s.settimeout(t)
    try: return s.recvfrom(4096)
    except TimeoutError: return None, None
def cookie(s, text):
    s.sendto(text.encode().ljust(512), reg)
    data, _ = recv(s, 3.0)
    return re.search(rb"cookie=([A-Za-z0-9_-]+)", data).group(1).decode()
first, target = udp("198.51.100.1"), udp("198.51.100.2")
tport = target.getsockname()[1]
issued = cookie(first, f"198.51.100.1:{tport}")
second = udp("198.51.100.2", first.getsockname()[1])
second.sendto(f"198.51.100.2:{tport} cookie={issued}".encode().ljust(512), reg)
forged_reply, _ = recv(second, 3.0)
forged_call, _ = recv(target, 1.0)
own = cookie(second, f"198.51.100.2:{tport}")
second.sendto(f"198.51.100.2:{tport} cookie={own}".encode().ljust(512), reg)
call, frm = recv(target, 3.0)
if call:
    target.sendto(b"ECHO " + re.search(rb"nonce=\S+", call).group(0), frm)
final, _ = recv(second, 5.0)
out = lambda b: b.decode("ascii", "replace") if b else None
print(json.dumps({"forged_reply": out(forged_reply), "forged_call": out(forged_call),
                  "call": out(call), "final": out(final)}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def _netns() -> Iterator[str]:
    """A namespace with lo up and a veth pair holding 198.51.100.1 and .2 (removed after)."""
    name = f"cbl-udp-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        run = ["netns", "exec", name, "ip"]
        _ip(*run, "link", "set", "lo", "up")
        _ip(*run, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip(*run, "addr", "add", "198.51.100.1/24", "dev", "v0")
        _ip(*run, "addr", "add", "198.51.100.2/24", "dev", "v0")
        _ip(*run, "link", "set", "v1", "up")
        _ip(*run, "link", "set", "v0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.slow
@pytest.mark.netns
def test_forged_source_in_a_namespace_gets_no_callback(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the netns tests must run as root in CI")
        pytest.skip("needs root to create a network namespace")
    require_tool("ip")
    with (
        _netns() as ns,
        run_registry(
            tmp_path, listen=("198.51.100.1:0",), prefix=("ip", "netns", "exec", ns)
        ) as reg,
    ):
        assert _udp_endpoints(reg) == ["198.51.100.1:" + str(reg.port)]
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_CLIENT, str(reg.port)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
    assert result["forged_reply"].startswith("COOKIE cookie="), result
    assert result["forged_call"] is None, result
    assert result["call"].startswith("CALLBACK id="), result  # the control did call back
    assert result["final"].startswith("OK connected"), result
    assert "verified=yes" in result["final"]


# ------------------------------------------------------------ IPv6 end to end


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--json"], ["--udp"]], ids=["text", "json", "udp"])
def test_ipv6_end_to_end_with_the_real_executables(
    ipv6_registry: RegistryProcess, mode: list[str]
) -> None:
    lab = subprocess.run(
        [exe("student"), "lab", "--registry", f"[::1]:{ipv6_registry.port}", "--port", "0",
         "--student", "six", *mode],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert lab.returncode == 0, lab.stdout + lab.stderr
    reply = next(line for line in lab.stdout.splitlines() if "reply: " in line)
    assert "OK connected" in reply and "verified=yes" in reply, reply
    assert re.search(r"target=\[::1\]:\d+", reply) and re.search(r"observed=\[::1\]:\d+", reply)


@pytest.fixture(scope="module")
def ipv6_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with run_registry(tmp_path_factory.mktemp("v6"), listen=("[::1]:0",), config=GENEROUS) as reg:
        assert _udp_endpoints(reg) == reg.tcp and reg.tcp[0].startswith("[::1]:")
        yield reg


# ----------------------------------------------- dual stack: v4-mapped peers


def _dual_stack_socket(kind: socket.SocketKind) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 peers appear as ::ffff:a.b.c.d
    return sock


def _service(config: str = GENEROUS, tcp: bool = False) -> tuple[Service, ListRecorder]:
    cfg = config_mod.loads(config)
    recorder = ListRecorder()
    connector = TcpConnector(cfg.callback) if tcp else UdpConnector(lambda: cfg.callback)
    return Service(cfg, is_local=is_local_address, connector=connector, recorder=recorder), recorder


async def _udp_target() -> tuple[trio.socket.SocketType, int]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


async def _echo_once(sock: trio.socket.SocketType) -> None:
    data, addr = await sock.recvfrom(4096)
    match = NONCE_RE.search(data)
    assert match is not None
    await sock.sendto(b"ECHO nonce=" + match.group(1), addr)


async def test_v4_mapped_udp_peer_on_a_dual_stack_socket() -> None:
    service, recorder = _service()
    sock = _dual_stack_socket(socket.SOCK_DGRAM)
    await sock.bind(("::", 0))
    port = sock.getsockname()[1]
    jar = CookieJar(os.urandom(32), 30.0, now=trio.current_time())
    target, tport = await _udp_target()
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind(("127.0.0.1", 0))
    with sock, target, client, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(UdpEdge(sock, service, jar, lambda: service.config).serve)
            request = f"127.0.0.1:{tport}"
            await client.sendto(_pad(request), ("127.0.0.1", port))
            challenge = await client.recv(4096)
            cookie = COOKIE_RE.search(challenge).group(1).decode()  # type: ignore[union-attr]
            await client.sendto(_pad(f"{request} cookie={cookie}"), ("127.0.0.1", port))
            await _echo_once(target)
            final = await client.recv(4096)
            nursery.cancel_scope.cancel()
    assert final.startswith(b"OK connected "), final
    assert b"diagnosis=direct" in final and b"verified=yes" in final
    [record] = recorder.records
    # The edge reports the IPv4 peer itself, not the socket's ::ffff: spelling of it.
    assert record.protocol == "udp" and record.peer.startswith("127.0.0.1:")


async def test_v4_mapped_tcp_peer_on_a_dual_stack_listener() -> None:
    service, recorder = _service(tcp=True)
    sock = _dual_stack_socket(socket.SOCK_STREAM)
    await sock.bind(("::", 0))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    port = sock.getsockname()[1]
    target = await trio.open_tcp_listeners(0, host="127.0.0.1")
    tport = target[0].socket.getsockname()[1]

    async def callee() -> None:
        stream = await target[0].accept()
        async with stream:
            line = await stream.receive_some(4096)
            await stream.send_all(b"ECHO " + NONCE_RE.search(line).group(0) + b"\n")  # type: ignore[union-attr]

    with trio.fail_after(10):
        async with listener, target[0], trio.open_nursery() as nursery:
            nursery.start_soon(callee)

            async def serve_one() -> None:
                await TcpHandler(service)(await listener.accept())

            nursery.start_soon(serve_one)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"127.0.0.1:{tport}\n".encode())
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    reply += chunk
    assert reply.startswith(b"OK connected "), reply
    assert b"diagnosis=direct" in reply and b"target=127.0.0.1:" in reply
    assert recorder.records[0].peer.startswith("127.0.0.1:")


# ------------------------------------------------------------- the connector


async def _call(target: Endpoint, wait_echo: bool) -> tuple[Code, bool]:
    cfg = config_mod.loads('[callback]\nverify_timeout = "300ms"\n').callback
    result = await UdpConnector(lambda: cfg).call(target, "id1", "abc123", wait_echo=wait_echo)
    return result.code, result.verified


@pytest.mark.slow
async def test_connector_outcomes() -> None:
    loop = ipaddress.ip_address("127.0.0.1")
    with trio.fail_after(10):
        # Nothing bound there: the ICMP port-unreachable reads as refused.
        free, fport = await _udp_target()
        free.close()
        assert await _call(Endpoint(loop, fport), True) == (Code.CONNECTION_REFUSED, False)
        assert await _call(Endpoint(loop, fport), False) == (Code.CONNECTION_REFUSED, False)
        silent, sport = await _udp_target()
        with silent:
            assert await _call(Endpoint(loop, sport), True) == (Code.TIMEOUT, False)
            assert await _call(Endpoint(loop, sport), False) == (Code.CONNECTED, False)
        echo, eport = await _udp_target()
        with echo:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_echo_once, echo)
                assert await _call(Endpoint(loop, eport), True) == (Code.CONNECTED, True)

            async def answer_without_nonce() -> None:
                _, addr = await echo.recvfrom(4096)
                await echo.sendto(b"hello", addr)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_without_nonce)
                assert await _call(Endpoint(loop, eport), True) == (Code.CONNECTED, False)


def test_request_with_cookie_parses_as_udp_text() -> None:
    # The UDP edge reads requests with the text parser, cookie= allowed and padding ignored.
    from registry.protocol.text import parse_line

    got = parse_line(_pad("127.0.0.1:15000 cookie=AAAAAAAAAAAAAAAA", 100), allow_cookie=True)
    assert got == Request(ipaddress.ip_address("127.0.0.1"), 15000, cookie="A" * 16)


async def test_a_reload_reconfigures_the_udp_reply_budget(tmp_path: Path) -> None:
    """The answers to unproven datagrams follow a SIGHUP's budget at once."""
    from registry.server import Registry

    path = tmp_path / "registry.toml"
    text = (
        f'[server]\nlisten = ["127.0.0.1:0"]\nadmin = "off"\ndb = "{tmp_path / "r.db"}"\n'
        '[tuning]\nunproven_per_source = "1/minute"\n'
    )
    path.write_text(text)
    registry = Registry(config_mod.load(str(path)), config_path=str(path), handle_signals=False)
    junk = b"this is not a request".ljust(100)
    async with trio.open_nursery() as nursery:
        runtime = await nursery.start(registry.run)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await client.bind(("127.0.0.1", 0))
        addr = ("127.0.0.1", runtime.udp[0].port)
        with client, trio.fail_after(10):
            await client.sendto(junk, addr)
            assert (await client.recv(4096)).startswith(b"ERROR malformed")
            path.write_text(text.replace("1/minute", "3/minute"))
            runtime.reload()  # a burst of 3: two more answers for this source
            await client.sendto(junk, addr)
            assert (await client.recv(4096)).startswith(b"ERROR malformed")
        runtime.shutdown()
