"""The classic BPF ban filter: every ban compared in turn.

The way where the kernel will not load eBPF (ebpf.py): ``SO_ATTACH_FILTER`` needs
no privilege, but the program is rebuilt and re-attached on each change, and must
fit ``insn_budget()``: every socket ``accept()`` returns inherits the listener's
filter and is charged its size against ``net.core.optmem_max``; if the charge
fails the kernel drops the new connection. So the program is kept to
``optmem_max / 32`` bytes' worth of instructions (4,096 with the 128 KB default of
current kernels, 640 with older ones' 20 KB): about 2,000 IPv4 bans. Bans beyond
it stay in the list (and in ``/api/bans``) without a kernel rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from pathlib import Path

from registry.defense.bans import BanList
from registry.defense.ratelimit import SourceKey as Key
from registry.net.kernel.bpf import (
    ACCEPT,
    AND_K,
    BPF_MAXINSNS,
    DROP,
    JA,
    JEQ_K,
    LD_B_ABS,
    LD_MEM,
    LD_W_ABS,
    RET_K,
    SILENT_DROP,
    ST,
    Insn,
    Sock,
    attach,
    detach,
    net,
    prefix_masks,
)

OPTMEM_MAX = Path("/proc/sys/net/core/optmem_max")
DISPATCH, TAILS = 7, 1 + 1 + 9  # the version dispatch; v4: ld + ret, v6: 4 x (ld, st) + ret
# The IPv6 source address (offset 8) into the scratch words M[0..3].
_V6_LOADS = [insn for i in range(4) for insn in ((LD_W_ABS, 0, 0, net(8 + 4 * i)), (ST, 0, 0, i))]


def entry_cost(key: Key) -> int:
    """Instructions one ban takes in the program."""
    return 2 if isinstance(key, ipaddress.IPv4Address) else len(_v6_entry(key))


def drop_program(
    keys: list[Key], max_insns: int = BPF_MAXINSNS, *, drop_silent: bool = False
) -> tuple[list[Insn], int]:
    """A filter that drops packets from ``keys``: (program, how many keys it holds),
    and, with ``drop_silent``, every bare ACK (``SILENT_DROP``) first.

    Keys are taken in order until the program would exceed ``max_insns``. Conditional
    jumps reach at most 255 instructions ahead, so every entry carries its own
    ``ret 0`` and the two families' sections are reached by ``ja``.
    """
    prefix = SILENT_DROP if drop_silent else []
    budget = max_insns - len(prefix) - DISPATCH - TAILS
    held = 0
    for key in keys:  # in the caller's order, across both families
        budget -= entry_cost(key)
        if budget < 0:
            break
        held += 1

    v4_body: list[Insn] = [(LD_W_ABS, 0, 0, net(12))]  # the IPv4 source address
    v6_body: list[Insn] = []
    for key in keys[:held]:
        if isinstance(key, ipaddress.IPv4Address):
            v4_body += [(JEQ_K, 0, 1, int(key)), (RET_K, 0, 0, DROP)]
        else:
            v6_body += _v6_entry(key)
    v4_body.append((RET_K, 0, 0, ACCEPT))
    v6_body = [*(_V6_LOADS if v6_body else []), *v6_body, (RET_K, 0, 0, ACCEPT)]

    dispatch: list[Insn] = [
        (LD_B_ABS, 0, 0, net(0)),  # version and IHL / traffic class
        (AND_K, 0, 0, 0xF0),
        (JEQ_K, 0, 1, 0x40),
        (JA, 0, 0, 3),  # -> v4_body
        (JEQ_K, 0, 1, 0x60),
        (JA, 0, 0, 1 + len(v4_body)),  # -> v6_body
        (RET_K, 0, 0, ACCEPT),  # neither (cannot happen on an IP socket)
    ]
    return prefix + dispatch + v4_body + v6_body, held


def _v6_entry(key: ipaddress.IPv6Network) -> list[Insn]:
    """Compare the scratch words with ``key``; a full match drops, any mismatch skips on."""
    value = int(key.network_address)
    out: list[Insn] = []
    for i, mask in enumerate(prefix_masks(key.prefixlen)):
        out.append((LD_MEM, 0, 0, i))
        if mask != 0xFFFFFFFF:
            out.append((AND_K, 0, 0, mask))
        out.append((JEQ_K, 0, 0, (value >> (96 - 32 * i)) & mask))
    end = len(out)  # where the ret 0 goes: a mismatch jumps past it
    out = [(c, jt, end - pc if c == JEQ_K else jf, k) for pc, (c, jt, jf, k) in enumerate(out)]
    return [*out, (RET_K, 0, 0, DROP)]


def insn_budget(optmem_path: Path = OPTMEM_MAX) -> int:
    """How many instructions a filter may have on this host (the module says why)."""
    try:
        optmem = int(optmem_path.read_text())
    except (OSError, ValueError):
        optmem = 20480  # the long-standing default before Linux 6.9
    return max(64, min(BPF_MAXINSNS, optmem // 32))


class ClassicFilter:
    """The whole list compiled into one program, re-attached on every change, and
    detached when no ban (and no silent drop) is left."""

    kind = "classic"

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.filtered = 0  # the bans the program holds

    def sync(
        self, socks: Sequence[Sock], bans: BanList, changed: list[Key], dropping: bool
    ) -> Iterator[None]:
        keys = [ban.key for ban in bans.active()]  # ``changed`` unused: compiled whole
        program, self.filtered = drop_program(keys, self.budget, drop_silent=dropping)
        for sock in socks:
            if keys or dropping:
                attach(sock, program)
            else:
                detach(sock)
            yield None

    def close(self) -> None:
        pass  # nothing of ours: the listeners hold the program
