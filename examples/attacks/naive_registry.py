"""UNSAFE: a deliberately naive callback registry, written to be abused in the demo.

DO NOT RUN THIS ON A REAL NETWORK. It connects wherever it is told, believes
any address spelling ``inet_aton`` or ``getaddrinfo`` accepts, reads with no
deadline in a fixed pool of 8 workers, answers every datagram (even a reply),
calls back whatever a datagram's text names, and has no rate limit. It is
what the lab text's registry looks like when written in an afternoon, and it
exists so ``attacks.py`` can show, side by side with ours, what each abuse
does to it. It refuses to start outside the demo's namespaces (no lab mark in
its environment) and binds only the address it is given.

    naive_registry.py HOST:PORT          TCP and UDP on the same port
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

LAB_MARK = "CBL_NETNS_LAB"
WORKERS = 8


def target_of(text: str) -> tuple[str, int]:
    host, _, port = text.strip().split()[0].rpartition(":")
    host = host.strip("[]")
    # Any spelling the C library understands: 0x7f.1, 2130706433, 127.1, ::ffff:...
    info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return info[0][4][0], int(port)


def call_back(target: tuple[str, int]) -> str:
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(target)
        s.sendall(b"CALLBACK hello from the naive registry\n")
        try:
            banner = s.recv(200)
        except OSError:
            banner = b""
    text = banner.decode(errors="replace").replace("\r", " ").replace("\n", " ").strip()
    return f"OK connected to {target[0]}:{target[1]}" + (f" banner: {text}" if text else "")


def handle(conn: socket.socket) -> None:
    with conn:
        data = b""
        while not data.endswith(b"\n"):  # no deadline: whatever holds the line holds a worker
            chunk = conn.recv(512)
            if not chunk:
                break
            data += chunk
        try:
            reply = call_back(target_of(data.decode(errors="replace")))
        except (OSError, ValueError, IndexError) as e:
            reply = f"FAILED {e}"
        try:
            conn.sendall(reply.encode() + b"\n")
        except OSError:
            pass


def serve_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        text = data.decode(errors="replace")
        try:
            host, port = target_of(text)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.sendto(b"CALLBACK hello from the naive registry " * 4, (host, port))
            reply = f"OK called {host}:{port} back; you sent {text}"
        except (OSError, ValueError, IndexError):
            reply = f"ERROR I do not understand: {text}"
        sock.sendto(reply.encode()[:1400], peer)


def main(argv: list[str]) -> int:
    if LAB_MARK not in os.environ or len(argv) != 1:
        print("UNSAFE demo server: run only by examples/attacks/attacks.py", file=sys.stderr)
        return 2
    host, _, port = argv[0].rpartition(":")
    tcp = socket.create_server((host, int(port)))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, int(port)))
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    print(f"UNSAFE naive registry listening on {argv[0]} (tcp and udp)", flush=True)
    with ThreadPoolExecutor(WORKERS) as pool:
        while True:
            conn, _ = tcp.accept()
            pool.submit(handle, conn)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
