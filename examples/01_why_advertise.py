#!/usr/bin/env python3
"""Why must the client *tell* the registry where its server listens?

Lab discussion questions:
  - What was the sequence of connections in this lab?
  - Why was it necessary for your client to tell the Registry Server where
    your server was listening?

This script plays all three roles on 127.0.0.1 (loopback only; ports chosen
by the kernel) with plain sockets, the way the lab's C++ programs do:

  1. the student server listens on a port of its choosing;
  2. the student client connects to a tiny registry and sends "IP:PORT";
  3. the registry looks at what it can *see* of the client: the address and
     the source port of the client's connection. That port is an ephemeral
     port the client's kernel picked for this one outgoing connection; nothing
     listens on it. Calling it back fails;
  4. calling back the port the client *advertised* reaches the server.

Run:  python3 run.py python examples/01_why_advertise.py
"""

from __future__ import annotations

import socket
import threading
import time

HOST = "127.0.0.1"  # loopback only: this demo never sends a packet off the machine
TIMEOUT = 5.0

START = time.monotonic()


def say(who: str, text: str) -> None:
    print(f"[{time.monotonic() - START:6.3f}s] {who:<9} {text}", flush=True)


def student_server(listener: socket.socket, got: list[str]) -> None:
    """Accept one connection (the callback) and read its message, like student_server.cpp."""
    conn, peer = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        say("server", f"Connection accepted from instructor's server at {peer[0]}:{peer[1]}")
        got.append(conn.recv(1024).decode(errors="replace").strip())


def try_callback(host: str, port: int) -> str:
    """What the registry gets when it opens a NEW connection to host:port."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            if s.getsockname() == s.getpeername():
                # A rare TCP "self-connect": the kernel picked the target port as our
                # own source port. Still nobody listening there.
                return "no server there (the socket connected to itself)"
            s.sendall(b"CALLBACK hello from the registry\n")
            return "connected"
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except OSError as e:
        return f"failed: {e.strerror or e}"


def registry(listener: socket.socket, seen: dict[str, object]) -> None:
    """Accept one registration, then try both possible callback targets."""
    conn, (peer_ip, peer_port) = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        message = conn.recv(512).decode(errors="replace").strip()
        conn.sendall(b"thanks\n")
        conn.recv(1)  # wait until the client hangs up
    seen.update(peer_ip=peer_ip, peer_port=peer_port, message=message)
    say("registry", f"a client connected from {peer_ip}:{peer_port} and sent {message!r}")
    # The client has hung up: nothing listens on its ephemeral port (nothing ever did).
    say("registry", f"calling back what it SAW, {peer_ip}:{peer_port} ...")
    seen["observed_result"] = try_callback(peer_ip, peer_port)
    say("registry", f"  -> {seen['observed_result']}")
    adv_host, _, adv_port = message.rpartition(":")
    say("registry", f"calling back what it was TOLD, {adv_host}:{adv_port} ...")
    seen["advertised_result"] = try_callback(adv_host, int(adv_port))
    say("registry", f"  -> {seen['advertised_result']}")


def main() -> int:
    server_sock = socket.create_server((HOST, 0))
    registry_sock = socket.create_server((HOST, 0))
    for s in (server_sock, registry_sock):
        s.settimeout(TIMEOUT)
    server_port = server_sock.getsockname()[1]
    registry_port = registry_sock.getsockname()[1]
    got: list[str] = []
    seen: dict[str, object] = {}
    with server_sock, registry_sock:
        say("server", f"Student server listening on port {server_port}...")
        srv = threading.Thread(target=student_server, args=(server_sock, got), daemon=True)
        reg = threading.Thread(target=registry, args=(registry_sock, seen), daemon=True)
        srv.start()
        reg.start()

        with socket.create_connection((HOST, registry_port), timeout=TIMEOUT) as client:
            local_ip, local_port = client.getsockname()
            say("client", f"connected to the registry from {local_ip}:{local_port} (ephemeral)")
            message = f"{HOST}:{server_port}"
            client.sendall(message.encode())
            say("client", f"Sent to Registry Server: {message}")
            client.recv(64)
        reg.join(TIMEOUT * 3)
        srv.join(TIMEOUT)

    print()
    print(
        f"The registry saw the client at {seen['peer_ip']}:{seen['peer_port']}: "
        f"port {seen['peer_port']} is the client's ephemeral source port, "
        f"not the server's listening port {server_port}."
    )
    print(f"Calling back the observed port: {seen['observed_result']}.")
    print(f"Calling back the advertised port: {seen['advertised_result']}.")
    print(f"The student server received: {got[0] if got else '(nothing)'}")
    print(
        "Sequence: server listens -> client connects to registry and sends IP:PORT -> "
        "registry opens a NEW connection to that IP:PORT -> server accepts it."
    )
    print(
        "Why advertise: a TCP connection shows only where it came FROM (address + a "
        "throw-away port); where your server LISTENS is something only you can tell."
    )
    ok = seen.get("advertised_result") == "connected" and bool(got)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
