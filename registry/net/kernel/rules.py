"""What the listeners' filter decides, written once for both of its programs.

It runs on every packet a listener gets (SYNs, handshake ACKs) and drops a bare
ACK while the silent drop is on (defense/window.py), then a packet from a
banned source (defense/bans.py), and keeps the rest. The bare-ACK test is the
same in both programs, so it is described once (``BARE_ACK``) and compiled by
each: classic BPF (classic.py) and eBPF (ebpf.py). The ban test differs by
design: the classic program compares every ban, the eBPF one looks up a map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SKF_NET_OFF = -0x100000  # packet loads at offsets from the network header (the source address)
ACCEPT = 0xFFFFFFFF  # "keep this many bytes": all of them
DROP = 0

# The TCP flags a handshake segment may carry that matter here: FIN, SYN, RST, ACK.
TCP_FLAGS_MASK, TCP_ACK = 0x17, 0x10

# A bare ACK: only the ACK flag and no payload. Positive offsets are from the
# TCP header (where the packet's data starts when a TCP socket's filter runs)
# and the packet's length is the TCP header and payload. On a listener a bare
# ACK is the client's last handshake step: dropped, the kernel never makes the
# connection, and the client's first bytes (or its FIN) make it instead, in one
# step. A client that sends nothing stays a half-open entry in the kernel until
# its SYN-ACK retries run out (about a minute), and costs us nothing.
BARE_ACK: tuple[tuple[Any, ...], ...] = (
    ("load_byte", 13),  # the flags
    ("and", TCP_FLAGS_MASK),
    ("next_unless", TCP_ACK),  # anything but a lone ACK: on to the next step
    ("load_byte", 12),  # the data offset, in 32-bit words, in the high nibble
    ("rsh", 4),
    ("lsh", 2),  # the TCP header's length
    ("drop_if_length",),  # the whole segment is that long (no payload): drop
)

# In an emitted jump: "to the instruction after this step", made a distance by compile_rule.
NEXT: Any = object()

Emitter = Callable[..., list[tuple[Any, ...]]]


def compile_rule(
    rule: Sequence[tuple[Any, ...]],
    emit: dict[str, Emitter],
    patch: Callable[[tuple[Any, ...], int], tuple[Any, ...]],
) -> list[tuple[Any, ...]]:
    """``rule`` in one instruction set: each operation through ``emit``, then every
    jump to ``NEXT`` made relative (``patch(insn, distance)``) to the end of the step."""
    out = [insn for op, *args in rule for insn in emit[op](*args)]
    end = len(out) - 1
    return [
        patch(insn, end - pc) if any(f is NEXT for f in insn) else insn
        for pc, insn in enumerate(out)
    ]
