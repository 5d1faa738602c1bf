"""A naive registry for comparison: one thread per connection, no limits, no deadlines.

This is what the lab's text suggests an instructor might write first: read
the student's ``IP:PORT`` with a single ``recv``, connect back, send the
callback line, wait for the student's echo, reply, close. It does the same
wire work as the real registry on the honest path (the ``CALLBACK id= nonce=``
line, the echo, one reply line starting ``OK connected verified=yes``), so
bench/bench_attack.py can drive both with the same honest client, and it
has none of the hardening: no read deadline, no connect or verify timeout,
no cap on connections, threads or bytes, no rate limits, no address policy.

One deviation from a bare ``socketserver.ThreadingTCPServer``: the listen
backlog is 4096 (as the registry's), not socketserver's default of 5, so the
comparison is about the threading model and the missing limits rather than
about a backlog setting.

Run:  python bench/baselines/threaded_registry.py --port 9000 [--host 127.0.0.1]
It prints ``listening on HOST:PORT`` on stderr once it accepts connections.
Loopback only is enforced: it refuses to bind anything but 127.0.0.0/8 or ::1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import socketserver
import sys

GREETING = "Hello from the instructor's Registry Server!"


def parse_target(data: bytes) -> tuple[str, int] | None:
    """``b"IP:PORT"`` (LF optional) -> (ip, port), or None if it does not look like one."""
    text = data.decode("ascii", "replace").strip().split(" ", 1)[0]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


class Handler(socketserver.BaseRequestHandler):
    """One registration: parse, call back (no timeouts), reply."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        data = sock.recv(512)  # the lab's server reads once
        target = parse_target(data)
        if target is None:
            sock.sendall(b"ERROR malformed expected IP:PORT\n")
            return
        reg_id, nonce = os.urandom(6).hex(), os.urandom(8).hex()
        try:
            with socket.create_connection(target) as callback:  # no timeout
                callback.sendall(f"CALLBACK id={reg_id} nonce={nonce} {GREETING}\n".encode())
                echo = b""
                while b"\n" not in echo and len(echo) < 1 << 20:  # unbounded in time
                    chunk = callback.recv(4096)
                    if not chunk:
                        break
                    echo += chunk
        except OSError as e:
            sock.sendall(f"FAILED unreachable {e.strerror or e}\n".encode())
            return
        verified = "yes" if f"nonce={nonce}".encode() in echo else "no"
        sock.sendall(f"OK connected id={reg_id} verified={verified} target={target[0]}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the baseline binds loopback only")
    with Server((args.host, args.port), Handler) as server:
        print(f"listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
        server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
