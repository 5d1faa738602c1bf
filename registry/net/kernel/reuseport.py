"""Worker groups share each registration port, steered by the source address.

``server.workers = N`` opens N ``SO_REUSEPORT`` sockets on every registration
address, and a classic BPF program on the group (``SO_ATTACH_REUSEPORT_CBPF``)
returns the socket a packet goes to: a hash of its source address, or of its
``ipv6_prefix`` network, modulo N (docs/architecture.md, "Workers", says why).
``worker_index`` is the same hash in Python.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from registry.net.kernel import bpf

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
GOLDEN = 0x9E3779B1  # Fibonacci hashing: 2^32 / phi, odd


@dataclass(frozen=True)
class Inherited:
    """A worker's share of its group's sockets: the ``i``-th of each (``WorkerSeat.sockets``)."""

    tcp: list[socket.socket]
    udp: list[socket.socket]


def worker_index(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, n: int, v6_prefix: int) -> int:
    """The worker (0..n-1) the kernel steers ``ip`` to: the program below, in Python."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    word = int(ip)
    if ip.version == 6:  # the words under the prefix, folded by xor
        word = 0
        for i, mask in enumerate(bpf.prefix_masks(v6_prefix)):
            word ^= (int(ip) >> (96 - 32 * i)) & mask
    return (((word * GOLDEN) & 0xFFFFFFFF) >> 16) % n if n > 1 else 0


def steering_program(family: int, n: int, v6_prefix: int) -> list[bpf.Insn]:
    """Return hash(source) % n: the socket index in the group (classic BPF, 32-bit ALU)."""
    if family == socket.AF_INET:
        body: list[bpf.Insn] = [(bpf.LD_W_ABS, 0, 0, bpf.net(12))]  # the IPv4 source address
    else:  # the IPv6 source's words under the prefix, folded by xor
        body = []
        for i, mask in enumerate(bpf.prefix_masks(v6_prefix) or [0]):  # /0: A = 0
            if i:
                body.append((bpf.TAX, 0, 0, 0))
            body.append((bpf.LD_W_ABS, 0, 0, bpf.net(8 + 4 * i)))
            if mask != 0xFFFFFFFF:
                body.append((bpf.AND_K, 0, 0, mask))
            if i:
                body.append((bpf.XOR_X, 0, 0, 0))
    hash_ = [(bpf.MUL_K, 0, 0, GOLDEN), (bpf.RSH_K, 0, 0, 16), (bpf.MOD_K, 0, 0, n)]
    return [*body, *hash_, (bpf.RET_A, 0, 0, 0)]


def attach_steering(sock: socket.socket, n: int, v6_prefix: int) -> None:
    """Attach the program to ``sock``'s reuseport group (any one member will do)."""
    bpf.attach(sock, steering_program(sock.family, n, v6_prefix), SO_ATTACH_REUSEPORT_CBPF)


def open_group(
    host: str, port: int, n: int, *, kind: int, backlog: int = 128, v6_prefix: int = 64
) -> list[socket.socket]:
    """N sockets of one reuseport group on ``host:port`` (port 0: one the kernel picks),
    steered by source. TCP sockets are listening; OSError closes what was opened."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, kind)
            socks.append(sock)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if n > 1:  # one process alone keeps its port to itself
                sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # the rest join the first one's port
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)  # joins the group here: index order is listen order
        if n > 1:
            attach_steering(socks[0], n, v6_prefix)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
