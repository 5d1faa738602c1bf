"""One forged datagram must not start an endless exchange (Loop DoS, CVE-2024-2169).

Each test builds its own network namespace (root only; tests/netns.py) and
uses only its loopback: the real ``registry`` executables, an echoing UDP
service and a raw socket that forges the first datagram's source all run
inside it, so nothing can leave. An nftables counter in the namespace's
output hook counts every UDP datagram sent there; the test reads it once it
has been still for 1 s (3 s at most). Before the loop guard, each of these
setups exchanged thousands of datagrams in those 3 s and never stopped.

Reflectors live on 127.0.0.2 and the real student on 127.0.0.1: a forged
loop spends the reflector's reply budget, not the student's.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import NetnsLab, Output, netns_lab, require_netns
from tests.support import exe

pytestmark = pytest.mark.slow  # a network-namespace lab per test

REGISTRY = "127.0.0.1:9000"
REFLECTOR_HOST = "127.0.0.2"
ECHO_PORT = 7007
SECOND_REGISTRY = f"{REFLECTOR_HOST}:9001"
WATCH_S = 3.0
QUIET_S = 1.0
# A loop the guard stops: the forged datagram, the registry's answer, at most
# the reflector's answer to that (which the registry drops). A handful.
HANDFUL = 5
# Long enough for a whole "ERROR malformed ..." answer (never larger than its request).
JUNK = "this is not a registration request".ljust(120)

COUNTER = """
table inet udploop {
    counter udp_sent { }
    chain out {
        type filter hook output priority 0; policy accept;
        meta l4proto udp counter name "udp_sent"
    }
}
"""

# Sends one UDP datagram whose source is SRC_HOST:SRC_PORT, whatever owns that
# port: a raw socket writes the UDP header itself (checksum 0: none, IPv4).
FORGE = """
import socket, struct, sys
src_host, src_port, dst_port, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = payload.encode()
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
s.bind((src_host, 0))
s.sendto(struct.pack("!HHHH", src_port, dst_port, 8 + len(data), 0) + data, ("127.0.0.1", 0))
s.close()
"""

# Echoes every datagram back to its source (RFC 862 on an unprivileged port),
# or with a prefix (a reflector that changes what it answers). Stops by itself.
ECHO = """
import socket, sys, time
host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
s.settimeout(0.2)
print("echo listening", flush=True)
end = time.monotonic() + 30
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(65535)
    except TimeoutError:
        continue
    s.sendto(prefix + data, addr)
"""


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    require_netns()
    with netns_lab("udploop") as lab:
        lab.add("r")
        lab.nft("r", COUNTER)
        yield lab


def _sent(lab: NetnsLab) -> int:
    listing = lab.exec_ok("r", "nft", "list", "counter", "inet", "udploop", "udp_sent")
    match = re.search(r"packets (\d+)", listing)
    assert match, listing
    return int(match.group(1))


def _registry(lab: NetnsLab, tmp: Path, listen: str) -> Output:
    reg = lab.registry("r", tmp, listen)
    reg.out.wait_for('"listening"', timeout=20)
    return reg.out


def _echo(lab: NetnsLab, prefix: str = "") -> None:
    out = lab.spawn("r", sys.executable, "-c", ECHO, REFLECTOR_HOST, str(ECHO_PORT), prefix)
    out.wait_for("echo listening")


def _forge_and_count(lab: NetnsLab, src_port: int, payload: str = JUNK) -> int:
    """Datagrams sent in the namespace within WATCH_S of one forged datagram."""
    before = _sent(lab)
    port = int(REGISTRY.rsplit(":", 1)[1])
    done = lab.run(
        "r", sys.executable, "-c", FORGE, REFLECTOR_HOST, str(src_port), str(port), payload
    )
    assert done.returncode == 0, done.stderr
    # The loop, if any, runs meanwhile. Each leg is a loopback datagram answered at
    # once (thousands a second), so a counter still for QUIET_S means it has ended.
    deadline, count, still_since = time.monotonic() + WATCH_S, _sent(lab), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < QUIET_S:
        time.sleep(0.1)
        if (now := _sent(lab)) != count:
            count, still_since = now, time.monotonic()
    return count - before


def _student_registers(lab: NetnsLab) -> None:
    """A real student still gets its cookie and its callback."""
    server = lab.spawn(
        "r", exe("student"), "server", "--udp", "--port", "0", "--bind", "127.0.0.1",
        "--count", "1", "--timeout", "20",
    )  # fmt: skip
    port = re.search(r"UDP port (\d+)", server.wait_for("listening on UDP port")).group(1)  # type: ignore[union-attr]
    client = lab.run(
        "r", exe("student"), "client", "--registry", REGISTRY, "--port", port, "--udp",
        "--student", "after-loop", "--verify", "yes", timeout=30,
    )  # fmt: skip
    assert client.returncode == 0, client.stdout + client.stderr
    assert "OK connected" in client.stdout and "verified=yes" in client.stdout, client.stdout
    server.wait_for("CALLBACK id=")


def test_forged_datagram_from_an_echo_service_is_a_handful(lab: NetnsLab, tmp_path: Path) -> None:
    _registry(lab, tmp_path, REGISTRY)
    _echo(lab)
    sent = _forge_and_count(lab, ECHO_PORT)
    # the forged datagram; the registry's ERROR; the echo of that ERROR, dropped
    assert 2 <= sent <= HANDFUL, sent
    _student_registers(lab)


def test_forged_datagram_from_a_second_registry_is_a_handful(lab: NetnsLab, tmp_path: Path) -> None:
    _registry(lab, tmp_path, REGISTRY)
    _registry(lab, tmp_path, SECOND_REGISTRY)
    sent = _forge_and_count(lab, int(SECOND_REGISTRY.rsplit(":", 1)[1]))
    # the forged datagram; the first registry's ERROR, which the second one drops
    assert 2 <= sent <= HANDFUL, sent
    _student_registers(lab)


def test_a_reflector_that_changes_its_answer_is_stopped_by_the_budget(
    lab: NetnsLab, tmp_path: Path
) -> None:
    """No classifier recognises "you said: ERROR ...": the source's reply budget
    (unproven_per_source, 10 by default) ends the loop."""
    _registry(lab, tmp_path, REGISTRY)
    _echo(lab, prefix="you said: ")
    sent = _forge_and_count(lab, ECHO_PORT)
    # the forged datagram, then at most 10 answers and 10 reflections
    assert 3 <= sent <= 1 + 2 * 10, sent
    _student_registers(lab)


def test_no_answer_to_a_privileged_source_port(lab: NetnsLab, tmp_path: Path) -> None:
    """Port 7 (echo) itself: not even one answer goes there."""
    _registry(lab, tmp_path, REGISTRY)
    assert _forge_and_count(lab, 7) == 1  # the forged datagram alone
