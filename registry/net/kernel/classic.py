"""The classic BPF ban filter (linux/filter.h): every ban compared in turn.

The fallback where the kernel will not load eBPF (ebpf.py): ``SO_ATTACH_FILTER``
needs no privilege, but the program is rebuilt on each change and must fit
``insn_budget()`` (banfilter.py says why). The program is pure: keys in,
instructions out.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Protocol

from registry.defense.ratelimit import SourceNetwork as Key
from registry.net.kernel.rules import ACCEPT, BARE_ACK, DROP, NEXT, SKF_NET_OFF, compile_rule

BPF_MAXINSNS = 4096
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # the Linux value
OPTMEM_MAX = Path("/proc/sys/net/core/optmem_max")

LD_W_ABS, LD_B_ABS, LD_MEM, ST = 0x20, 0x30, 0x60, 0x02
AND_K, JEQ_K, JA, RET_K = 0x54, 0x15, 0x05, 0x06
LD_W_LEN, TAX, RSH_K, LSH_K, JEQ_X = 0x80, 0x07, 0x74, 0x64, 0x1D

Insn = tuple[int, int, int, int]  # code, jt, jf, k


_EMIT = {
    "load_byte": lambda k: [(LD_B_ABS, 0, 0, k)],
    "and": lambda k: [(AND_K, 0, 0, k)],
    "rsh": lambda k: [(RSH_K, 0, 0, k)],
    "lsh": lambda k: [(LSH_K, 0, 0, k)],
    "next_unless": lambda k: [(JEQ_K, 0, NEXT, k)],
    # X = the header's length, A = header and payload; equal: drop
    "drop_if_length": lambda: [
        (TAX, 0, 0, 0),
        (LD_W_LEN, 0, 0, 0),
        (JEQ_X, 0, NEXT, 0),
        (RET_K, 0, 0, DROP),
    ],
}
SILENT_DROP: list[Insn] = compile_rule(  # type: ignore[assignment]
    BARE_ACK, _EMIT, lambda insn, dist: (insn[0], 0, dist, insn[3])
)


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def entry_cost(key: Key) -> int:
    """Instructions one ban takes in the program."""
    if isinstance(key, ipaddress.IPv4Address):
        return 2  # jeq, ret
    return len(_v6_entry(key))


def drop_program(
    keys: list[Key], max_insns: int = BPF_MAXINSNS, *, drop_silent: bool = False
) -> tuple[list[Insn], int]:
    """A filter that drops packets from ``keys``: (program, how many keys it holds),
    and, with ``drop_silent``, every bare ACK (``SILENT_DROP``) first.

    Keys are taken in order until the program would exceed ``max_insns``; the
    rest are left out (the caller reports them). Conditional jumps in classic
    BPF reach at most 255 instructions ahead, so every entry carries its own
    ``ret 0`` and the two families' sections are reached by ``ja``.
    """
    v4 = [k for k in keys if isinstance(k, ipaddress.IPv4Address)]
    v6 = [k for k in keys if isinstance(k, ipaddress.IPv6Network)]
    prefix = SILENT_DROP if drop_silent else []
    head = len(prefix) + 7  # the version dispatch below
    tails = 1 + 1 + 9  # v4: ld + ret; v6: 4 x (ld, st) + ret
    budget = max_insns - head - tails
    taken: list[Key] = []
    for key in keys:  # in the caller's order, across both families
        cost = entry_cost(key)
        if cost > budget:
            break
        budget -= cost
        taken.append(key)
    held = set(taken)
    v4 = [k for k in v4 if k in held]
    v6 = [k for k in v6 if k in held]

    v4_body: list[Insn] = [(LD_W_ABS, 0, 0, _net(12))]  # IPv4 source address
    for key in v4:
        v4_body += [(JEQ_K, 0, 1, int(key)), (RET_K, 0, 0, DROP)]
    v4_body.append((RET_K, 0, 0, ACCEPT))

    v6_body: list[Insn] = []
    if v6:  # the source address (offset 8) into scratch words M[0..3]
        for i in range(4):
            v6_body += [(LD_W_ABS, 0, 0, _net(8 + 4 * i)), (ST, 0, 0, i)]
    for key in v6:
        v6_body += _v6_entry(key)
    v6_body.append((RET_K, 0, 0, ACCEPT))

    program: list[Insn] = prefix + [
        (LD_B_ABS, 0, 0, _net(0)),  # version and IHL / traffic class
        (AND_K, 0, 0, 0xF0),
        (JEQ_K, 0, 1, 0x40),
        (JA, 0, 0, 3),  # -> v4_body (at 7)
        (JEQ_K, 0, 1, 0x60),
        (JA, 0, 0, 1 + len(v4_body)),  # -> v6_body
        (RET_K, 0, 0, ACCEPT),  # neither (cannot happen on an IP socket)
    ]
    return program + v4_body + v6_body, len(taken)


def _v6_entry(key: ipaddress.IPv6Network) -> list[Insn]:
    """Compare the scratch words with ``key``; a full match drops, any mismatch skips on."""
    value, bits = int(key.network_address), key.prefixlen
    tests: list[list[Insn]] = []
    for i in range(4):
        covered = min(32, max(0, bits - 32 * i))
        if not covered:
            break
        mask = (0xFFFFFFFF << (32 - covered)) & 0xFFFFFFFF
        word = (value >> (96 - 32 * i)) & mask
        test: list[Insn] = [(LD_MEM, 0, 0, i)]
        if covered < 32:
            test.append((AND_K, 0, 0, mask))
        test.append((JEQ_K, 0, 0, word))  # jf patched below
        tests.append(test)
    out: list[Insn] = []
    remaining = sum(len(t) for t in tests) + 1  # the tests and the final ret
    for test in tests:
        remaining -= len(test)
        code, jt, _, k = test[-1]
        test[-1] = (code, jt, remaining, k)  # mismatch: past this entry's ret
        out += test
    out.append((RET_K, 0, 0, DROP))
    return out


def pack(program: list[Insn]) -> bytes:
    """``struct sock_filter[]`` in native byte order."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


class _Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes, /) -> None: ...


def insn_budget(optmem_path: Path = OPTMEM_MAX) -> int:
    """How many instructions a filter may have on this host (banfilter.py says why)."""
    try:
        optmem = int(optmem_path.read_text())
    except (OSError, ValueError):
        optmem = 20480  # the long-standing default before Linux 6.9
    return max(64, min(BPF_MAXINSNS, optmem // 32))


def attach(sock: _Sock, program_bytes: bytes, length: int) -> None:
    """``setsockopt(SO_ATTACH_FILTER)`` with a ``struct sock_fprog``; OSError on failure."""
    buf = ctypes.create_string_buffer(program_bytes, len(program_bytes))
    fprog = struct.pack("@HP", length, ctypes.addressof(buf))  # the kernel copies it
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
