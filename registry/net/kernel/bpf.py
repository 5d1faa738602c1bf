"""The classic BPF vocabulary every program here is written in (linux/filter.h).

The ban filter (classic.py) and the reuseport steering program (reuseport.py) are
classic BPF; the silent-drop block below also runs in the eBPF filter, converted
by ``ebpf.from_classic`` the way the kernel converts a classic filter. Programs
are pure (instructions in, bytes out); ``attach`` is the one kernel call.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from typing import Protocol

Insn = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k

# opcode = class | size | mode (loads), or class | operation | operand (K: k, X: register X)
LD_W_ABS, LD_B_ABS, LD_W_LEN, LD_MEM, ST, TAX = 0x20, 0x30, 0x80, 0x60, 0x02, 0x07
AND_K, LSH_K, RSH_K, MUL_K, MOD_K, XOR_X = 0x54, 0x64, 0x74, 0x24, 0x94, 0xAC
JA, JEQ_K, JEQ_X, RET_K, RET_A = 0x05, 0x15, 0x1D, 0x06, 0x16

SKF_NET_OFF = -0x100000  # loads at offsets from the network header (the source address)
ACCEPT, DROP = 0xFFFFFFFF, 0  # a filter returns how many bytes to keep
BPF_MAXINSNS = 4096
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # the Linux values
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)

TCP_FLAGS_MASK, TCP_ACK = 0x17, 0x10  # the flags that matter here: FIN, SYN, RST, ACK

# Drop a bare ACK (the ACK flag alone, no payload), else fall through. Positive
# offsets are from the TCP header, where a TCP socket filter's data starts, and the
# length is the TCP header and payload. On a listener a bare ACK is the client's
# last handshake step: dropped, the kernel never makes the connection, and the
# client's first bytes (or its FIN) make it instead. A client that sends nothing
# stays a half-open entry in the kernel until its SYN-ACK retries run out (about a
# minute), at no cost to us (docs/limits.md, "Silent drop").
SILENT_DROP: list[Insn] = [
    (LD_B_ABS, 0, 0, 13),  # the flags
    (AND_K, 0, 0, TCP_FLAGS_MASK),
    (JEQ_K, 0, 7, TCP_ACK),  # anything but a lone ACK: past the block
    (LD_B_ABS, 0, 0, 12),  # the data offset, in 32-bit words, in the high nibble
    (RSH_K, 0, 0, 4),
    (LSH_K, 0, 0, 2),
    (TAX, 0, 0, 0),  # X = the TCP header's length
    (LD_W_LEN, 0, 0, 0),  # A = the header and payload
    (JEQ_X, 0, 1, 0),
    (RET_K, 0, 0, DROP),  # no payload: drop
]


def net(offset: int) -> int:
    """``k`` of a load at ``offset`` in the network header."""
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def prefix_masks(bits: int) -> list[int]:
    """The masks of the 32-bit words of an IPv6 address that a /``bits`` covers."""
    covered = [min(32, bits - 32 * i) for i in range(4) if bits > 32 * i]
    return [(0xFFFFFFFF << (32 - c)) & 0xFFFFFFFF for c in covered]


def pack(program: list[Insn]) -> bytes:
    """``struct sock_filter[]`` in native byte order."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


class Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None: ...


def attach(sock: Sock, program: list[Insn], option: int = SO_ATTACH_FILTER) -> None:
    """``setsockopt(option)`` with a ``struct sock_fprog``; OSError on failure."""
    code = pack(program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # the kernel copies it
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)


def detach(sock: Sock) -> None:
    """Take the filter off ``sock``; none there is fine."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
