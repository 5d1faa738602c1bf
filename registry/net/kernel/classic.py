"""The classic BPF ban filter: every ban compared in turn (docs/limits.md, "Two kernel
filters"). The way where the kernel will not load eBPF: ``SO_ATTACH_FILTER`` needs
no privilege, but the program is rebuilt on each change and must fit ``insn_budget()``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from pathlib import Path

from registry.defense.bans import BanList
from registry.defense.ratelimit import SourceNetwork as Key
from registry.net.kernel import bpf

OPTMEM_MAX = Path("/proc/sys/net/core/optmem_max")
DISPATCH, TAILS = 7, 1 + 1 + 9  # the version dispatch; v4: ld + ret, v6: 4 x (ld, st) + ret
# The IPv6 source address (offset 8) into the scratch words M[0..3].
_V6_LOADS = [
    insn for i in range(4) for insn in ((bpf.LD_W_ABS, 0, 0, bpf.net(8 + 4 * i)), (bpf.ST, 0, 0, i))
]


def entry_cost(key: Key) -> int:
    """Instructions one ban takes in the program."""
    return 2 if isinstance(key, ipaddress.IPv4Address) else len(_v6_entry(key))


def drop_program(
    keys: list[Key], max_insns: int = bpf.BPF_MAXINSNS, *, drop_silent: bool = False
) -> tuple[list[bpf.Insn], int]:
    """A filter that drops packets from ``keys``: (program, how many keys it holds),
    and, with ``drop_silent``, every bare ACK (``bpf.SILENT_DROP``) first.

    Keys are taken in order until the program would exceed ``max_insns``. Conditional
    jumps reach at most 255 instructions ahead, so every entry carries its own
    ``ret 0`` and the two families' sections are reached by ``ja``.
    """
    prefix = bpf.SILENT_DROP if drop_silent else []
    budget = max_insns - len(prefix) - DISPATCH - TAILS
    held = 0
    for key in keys:  # in the caller's order, across both families
        budget -= entry_cost(key)
        if budget < 0:
            break
        held += 1

    v4_body: list[bpf.Insn] = [(bpf.LD_W_ABS, 0, 0, bpf.net(12))]  # the IPv4 source address
    v6_body: list[bpf.Insn] = []
    for key in keys[:held]:
        if isinstance(key, ipaddress.IPv4Address):
            v4_body += [(bpf.JEQ_K, 0, 1, int(key)), (bpf.RET_K, 0, 0, bpf.DROP)]
        else:
            v6_body += _v6_entry(key)
    v4_body.append((bpf.RET_K, 0, 0, bpf.ACCEPT))
    v6_body = [*(_V6_LOADS if v6_body else []), *v6_body, (bpf.RET_K, 0, 0, bpf.ACCEPT)]

    dispatch: list[bpf.Insn] = [
        (bpf.LD_B_ABS, 0, 0, bpf.net(0)),  # version and IHL / traffic class
        (bpf.AND_K, 0, 0, 0xF0),
        (bpf.JEQ_K, 0, 1, 0x40),
        (bpf.JA, 0, 0, 3),  # -> v4_body
        (bpf.JEQ_K, 0, 1, 0x60),
        (bpf.JA, 0, 0, 1 + len(v4_body)),  # -> v6_body
        (bpf.RET_K, 0, 0, bpf.ACCEPT),  # neither (cannot happen on an IP socket)
    ]
    return prefix + dispatch + v4_body + v6_body, held


def _v6_entry(key: ipaddress.IPv6Network) -> list[bpf.Insn]:
    """Compare the scratch words with ``key``; a full match drops, any mismatch skips on."""
    value = int(key.network_address)
    out: list[bpf.Insn] = []
    for i, mask in enumerate(bpf.prefix_masks(key.prefixlen)):
        out.append((bpf.LD_MEM, 0, 0, i))
        if mask != 0xFFFFFFFF:
            out.append((bpf.AND_K, 0, 0, mask))
        out.append((bpf.JEQ_K, 0, 0, (value >> (96 - 32 * i)) & mask))
    end = len(out)  # where the ret 0 goes: a mismatch jumps past it
    out = [(c, jt, end - pc if c == bpf.JEQ_K else jf, k) for pc, (c, jt, jf, k) in enumerate(out)]
    return [*out, (bpf.RET_K, 0, 0, bpf.DROP)]


def insn_budget(optmem_path: Path = OPTMEM_MAX) -> int:
    """How many instructions a filter may have on this host: every socket ``accept()``
    returns inherits the listener's filter and is charged its size against optmem_max;
    a failed charge drops the new connection."""
    try:
        optmem = int(optmem_path.read_text())
    except (OSError, ValueError):
        optmem = 20480  # the long-standing default before Linux 6.9
    return max(64, min(bpf.BPF_MAXINSNS, optmem // 32))


class ClassicFilter:
    """The whole list compiled into one program, re-attached on every change, and
    detached when no ban (and no silent drop) is left."""

    kind = "classic"

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.filtered = 0  # the bans the program holds

    def sync(
        self, socks: Sequence[bpf.Sock], bans: BanList, changed: list[int], dropping: bool
    ) -> Iterator[None]:
        keys = [ban.network for ban in bans.active()]  # ``changed`` unused: compiled whole
        program, self.filtered = drop_program(keys, self.budget, drop_silent=dropping)
        for sock in socks:
            if keys or dropping:
                bpf.attach(sock, program)
            else:
                bpf.detach(sock)
            yield None

    def close(self) -> None:
        pass  # nothing of ours: the listeners hold the program
