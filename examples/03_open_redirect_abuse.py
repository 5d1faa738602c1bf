#!/usr/bin/env python3
"""A program that connects wherever it is told is a weapon. Here is how, and the defence.

Lab discussion question:
  - Consider the security implications of a program that accepts
    instructions on where to connect back.

Part 1 runs a NAIVE callback server (what the lab's registry would be without
a policy) on 127.0.0.1 and uses it, from a client, as a port scanner: for each
"HOST:PORT" it is sent, it dials that address and reports whether the dial
worked, and even what the far end said first. The "internal services" it
finds are little listeners this script starts on 127.0.0.1 itself. Everything
stays on loopback; every wait is bounded.

Part 2 feeds the same requests, plus the classic SSRF targets (cloud metadata,
private networks, other spellings of 127.0.0.1), to the real registry's parser
and policy (registry.protocol.text.parse_line, registry.policy.decide.decide)
as if they came from a remote attacker at 203.0.113.66. Nothing is dialled in
part 2: the policy is pure, and every request is refused with a reply code.

Run:  python3 run.py python examples/03_open_redirect_abuse.py
"""

from __future__ import annotations

import ipaddress
import socket
import textwrap
import threading
import time

from registry.config import from_dict
from registry.errors import ProtocolError
from registry.model import Endpoint
from registry.policy.decide import Allow, decide
from registry.protocol.text import parse_line

HOST = "127.0.0.1"
TIMEOUT = 1.0
BANNERS = {
    "fake-redis": b"-NOAUTH Authentication required.\r\n",
    "fake-admin": b"HTTP/1.1 200 OK\r\n",
}


def serve_banner(sock: socket.socket, banner: bytes, stop: threading.Event) -> None:
    """An 'internal service': greets whoever connects with its banner."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            try:
                conn.sendall(banner)
            except OSError:
                pass


def naive_callback(host: str, port: int) -> str:
    """What a policy-free registry does: dial anything, report what happened."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.settimeout(0.3)
            s.sendall(b"CALLBACK hello\n")
            try:
                first = s.recv(64)
            except OSError:
                first = b""
            ms = (time.monotonic() - started) * 1000
            return f"OK connected rtt_ms={ms:.1f} said={first.decode(errors='replace').strip()!r}"
    except ConnectionRefusedError:
        return "FAILED connection_refused"
    except OSError as e:
        return f"FAILED {type(e).__name__}"


def naive_registry(sock: socket.socket, stop: threading.Event) -> None:
    """One line in, one dial, one line out: no policy at all."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            host, _, port = conn.recv(256).decode().strip().rpartition(":")
            conn.sendall((naive_callback(host, int(port)) + "\n").encode())


def ask(registry_port: int, line: str) -> str:
    with socket.create_connection((HOST, registry_port), timeout=5) as c:
        c.sendall(line.encode() + b"\n")
        return c.recv(512).decode().strip()


def closed_port() -> int:
    """A port nothing listens on (the kernel just gave it to us and we let it go)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def part1(stop: threading.Event) -> tuple[list[int], list[str]]:
    services: dict[int, str] = {}
    for name, banner in BANNERS.items():
        sock = socket.create_server((HOST, 0))
        services[sock.getsockname()[1]] = name
        threading.Thread(target=serve_banner, args=(sock, banner, stop), daemon=True).start()
    registry_sock = socket.create_server((HOST, 0))
    registry_port = registry_sock.getsockname()[1]
    threading.Thread(target=naive_registry, args=(registry_sock, stop), daemon=True).start()

    targets = sorted([*services, closed_port(), closed_port(), closed_port()])
    print(f"Part 1: a NAIVE callback server on {HOST}:{registry_port}; the attacker sends it")
    print(f"        {len(targets)} requests, one per port to probe on {HOST}.")
    found: list[int] = []
    lines: list[str] = []
    for port in targets:
        line = f"{HOST}:{port}"
        reply = ask(registry_port, line)
        lines.append(line)
        print(f"  attacker -> {line:<16} naive reply: {reply}")
        if reply.startswith("OK"):
            found.append(port)
    names = ", ".join(f"{p} ({services.get(p, 'another program')})" for p in found)
    print(f"naive server: found open ports {names}: a port scan, by proxy, with banners.")
    print("  (From outside, the attacker could never reach 127.0.0.1 of that machine.)")
    return found, lines


# Classic SSRF targets, as text lines a remote attacker would send.
EXTRA = [
    "169.254.169.254:80",  # cloud instance metadata: credentials
    "[::ffff:169.254.169.254]:8080",  # the same, IPv4-mapped
    "[64:ff9b::a9fe:a9fe]:8080",  # the same, NAT64
    "10.0.0.5:6379",  # a private network's Redis
    "192.168.1.1:8080",  # a home router's admin page
    "[::ffff:127.0.0.1]:15000",  # loopback, IPv4-mapped
    "[::1]:15000",  # IPv6 loopback
    "0.0.0.0:15000",  # 'this host' on Linux
    "255.255.255.255:15000",  # broadcast
    "224.0.0.1:15000",  # multicast
    "127.0.0.1:22",  # ssh on the registry host
    "198.51.100.9:15000",  # a third party: reflect the callback at someone else
    "203.0.113.66:25",  # the attacker's own address, but the SMTP port
    "0x7f.0.0.1:15000",  # other spellings of 127.0.0.1
    "2130706433:15000",
    "127.1:15000",
    "localhost:15000",  # names are not resolved by default
]


def part2(lines: list[str]) -> int:
    attacker = Endpoint(ipaddress.ip_address("203.0.113.66"), 40000)
    policy = from_dict({}).policy
    print()
    print("Part 2: the same requests, and classic SSRF targets, judged by the real registry")
    print(f"        (parser + default policy) as if sent by a remote attacker at {attacker.host}:")
    refused = 0
    requests = [*lines, *EXTRA]
    for line in requests:
        try:
            request = parse_line(line)
        except ProtocolError as e:
            verdict = f"ERROR {e.code.value}"
        else:
            d = decide(request, attacker, policy)
            verdict = f"would dial {d.target}" if isinstance(d, Allow) else f"DENIED {d.code.value}"
        refused += not verdict.startswith("would dial")
        print(f"  {line:<32} {verdict}")
    print(f"real policy: refused {refused} of {len(requests)} requests; nothing was dialled.")
    return len(requests) - refused


def main() -> int:
    stop = threading.Event()
    try:
        found, lines = part1(stop)
        allowed = part2(lines)
    finally:
        stop.set()
    print()
    why = (
        "Why: a callback service turns 'connect to X' into a connection made FROM the server: "
        "SSRF into its private network and cloud metadata, port scanning and banner grabbing, "
        "and reflection of its traffic at third parties. The registry calls back only the "
        "address a request came from, never special addresses, only allowed ports, and "
        "rate-limits it all (see SECURITY.md)."
    )
    print(textwrap.fill(why, width=96))
    return 0 if found and allowed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
