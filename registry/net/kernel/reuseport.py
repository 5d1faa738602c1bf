"""Worker groups share each registration port, steered by the source address.

``server.workers = N`` opens N sockets on every registration address with
``SO_REUSEPORT`` (one reuseport group per address and transport) and attaches
a classic BPF program to the group (``SO_ATTACH_REUSEPORT_CBPF``) that returns
the index of the socket a packet goes to: a hash of its source address (IPv4),
or of its ``ratelimit.ipv6_prefix`` network (IPv6) modulo N. One source, or
one IPv6 network the rate limiter counts as one, therefore always reaches the
same worker, so per-source limits, bans, cookies and the door stay exact.

The supervisor (``registry/group.py``) holds every socket for the whole
run and hands worker ``i`` the ``i``-th socket of each group. A socket is never
closed while the group lives, so the group's order (the kernel's index) never
changes; connections steered to a worker that died wait in its backlog until
its replacement accepts them.

``worker_index`` is the same hash in Python: what tests and the docs use to
say which worker a source reaches.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

from registry.net.kernel.classic import pack

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
SKF_NET_OFF = -0x100000
GOLDEN = 0x9E3779B1  # Fibonacci hashing: 2^32 / phi, odd

LD_W_ABS, TAX, RET_A = 0x20, 0x07, 0x16
AND_K, MUL_K, RSH_K, MOD_K, XOR_X = 0x54, 0x24, 0x74, 0x94, 0xAC

Insn = tuple[int, int, int, int]


@dataclass(frozen=True)
class Inherited:
    """A worker's share of its group's sockets: the ``i``-th of each (``WorkerSeat.sockets``)."""

    tcp: list[socket.socket]
    udp: list[socket.socket]


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def _v6_masks(prefix: int) -> list[int]:
    """The 32-bit masks of the source address words the IPv6 key covers."""
    masks = []
    for i in range(4):
        covered = min(32, max(0, prefix - 32 * i))
        if covered:
            masks.append((0xFFFFFFFF << (32 - covered)) & 0xFFFFFFFF)
    return masks or [0]


def _mix(word: int, n: int) -> int:
    return (((word * GOLDEN) & 0xFFFFFFFF) >> 16) % n


def worker_index(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, n: int, v6_prefix: int) -> int:
    """The worker (0..n-1) the kernel steers ``ip`` to: the program below, in Python."""
    if n <= 1:
        return 0
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        value, word = int(ip), 0
        for i, mask in enumerate(_v6_masks(v6_prefix)):
            word ^= ((value >> (96 - 32 * i)) & 0xFFFFFFFF) & mask
        return _mix(word, n)
    v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
    assert v4 is not None
    return _mix(int(v4), n)


def steering_program(family: int, n: int, v6_prefix: int) -> list[Insn]:
    """Return hash(source) % n: the socket index in the group (classic BPF, 32-bit ALU)."""
    if family == socket.AF_INET:
        body: list[Insn] = [(LD_W_ABS, 0, 0, _net(12))]  # the IPv4 source address
    else:  # the IPv6 source's words under the prefix, folded by xor
        body = []
        for i, mask in enumerate(_v6_masks(v6_prefix)):
            if i:
                body.append((TAX, 0, 0, 0))
            body.append((LD_W_ABS, 0, 0, _net(8 + 4 * i)))
            if mask != 0xFFFFFFFF:
                body.append((AND_K, 0, 0, mask))
            if i:
                body.append((XOR_X, 0, 0, 0))
    return [*body, (MUL_K, 0, 0, GOLDEN), (RSH_K, 0, 0, 16), (MOD_K, 0, 0, n), (RET_A, 0, 0, 0)]


def attach_steering(sock: socket.socket, n: int, v6_prefix: int) -> None:
    """Attach the program to ``sock``'s reuseport group (any one member will do)."""
    program = steering_program(sock.family, n, v6_prefix)
    code = pack(program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # the kernel copies it
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


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
