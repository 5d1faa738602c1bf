"""Bans: sources that keep coming back after refusals, dropped by the kernel a while.

Pure (``now`` is passed in). The door refuses a source over its limits and
the doorway answers it late (registry/net/doorway.py); that still costs an
``accept()``, a descriptor and an answer per attempt. A source refused
``after`` times within one refusal window (``RefusalTally``: 10-20 s) is not a
student retrying by hand (the doubling hold lets a serial client be refused
about four times in 10 s): it is a loop with many connections in parallel.
``BanList`` bans it for ``duration`` seconds, and ``drop_program`` compiles
the bans into a classic BPF socket filter that the edge attaches to the
registration listeners (registry/net/kernel/banfilter.py): the kernel then drops
the source's SYNs before they become connections, so a banned source costs
the registry nothing at all. Its connect attempts time out.

A second rule catches the loop that runs one connection at a time. A source
refused ``rate_limited`` with a wait longer than any hold of the door
(``long_wait``: ``limits.max_refusal_delay``) is in debt: it was fined for
junk during an attack (``ratelimit.error_fine``), and told so, with the time,
in ``retry_after``. Coming back ``ignored_after`` times within the window
anyway is not a person reading the reply: it is banned for what it was told
to wait (at most ``duration``). Measured (docs/benchmarks.md): 5,000 one-byte
stalls from 5,000 addresses, each reconnecting serially, were otherwise
refused ~700 times a second for as long as the attack lasted.

The filter is the listeners' own (an eBPF map where the kernel lets us load
one, else ``SO_ATTACH_FILTER``, which needs no privilege): it touches no host
firewall and goes away with the registry.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from registry.defense.ratelimit import SourceKey as Key  # the door's identity of a source


@dataclass(frozen=True, slots=True)
class Ban:
    key: Key
    since: float
    until: float
    refusals: int  # the refusals in the window that triggered it


class BanList:
    """Banned sources, bounded, each until its own expiry.

    Full (``max_entries``), a new ban is not made (``skipped`` counts them):
    evicting a live ban would let its source back in just as it is most
    active, and the filter would churn. The door's hold and rate limits still
    apply to a source that could not be banned.

    Every operation the event loop repeats during a wave costs O(log n) or
    O(changes), not O(bans): expiries are kept in a heap, and the keys whose
    state changed are kept for ``take_changes`` (the eBPF filter applies just
    those). Measured: with 5,000 bans, one O(n) pass of the filter every 0.1 s
    was a 5-10 ms step of the event loop each time (docs/benchmarks.md).
    """

    def __init__(
        self,
        after: int,
        duration: float,
        max_entries: int,
        exempt: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        *,
        ignored_after: int = 0,
        long_wait: float = math.inf,
        spread: float = 0.0,
    ) -> None:
        self.after, self.duration, self.max_entries = after, duration, max_entries
        self.exempt = tuple(exempt)  # never banned: a campus NAT, the instructor's own hosts
        self.ignored_after, self.long_wait = ignored_after, long_wait
        self.spread = spread  # a ban lasts up to this fraction longer (spread_share)
        self._bans: dict[Key, Ban] = {}
        # (until, n, ban) by expiry; entries of bans lifted otherwise (a reload) are
        # stale and skipped: a ban counts only while it is the one in _bans.
        self._expiries: list[tuple[float, int, Ban]] = []
        self._seq = itertools.count()
        self._changed: dict[Key, None] = {}  # banned or lifted since take_changes()
        self.total = 0  # bans made since start (a Prometheus counter)
        self.skipped = 0  # bans not made because the list was full
        self.version = 0  # bumped on every change: the edge re-attaches the filter

    def __len__(self) -> int:
        return len(self._bans)

    def __contains__(self, key: object) -> bool:
        return key in self._bans

    def consider(self, key: Key, repeat: int, now: float, wait: float = 0.0) -> Ban | None:
        """A refusal of ``key``, its ``repeat``-th in the window, telling it to ``wait``
        seconds (rate_limited; 0 for other reasons): the new ban, or None."""
        if self.after <= 0 or key in self._bans:  # after 0: no bans at all
            return None
        ignored = 0 < self.ignored_after <= repeat and wait > self.long_wait
        if (repeat < self.after and not ignored) or self.is_exempt(key):
            return None
        if len(self._bans) >= self.max_entries:
            self.skipped += 1
            return None
        duration = self.duration if repeat >= self.after else min(wait, self.duration)
        duration *= 1 + self.spread * spread_share(key)
        ban = Ban(key, now, now + duration, repeat)
        self._bans[key] = ban
        heapq.heappush(self._expiries, (ban.until, next(self._seq), ban))
        self._changed[key] = None
        self.total += 1
        self.version += 1
        return ban

    def is_exempt(self, key: Key) -> bool:
        """Is ``key`` (an address, or an IPv6 source network) inside an exempt network?
        A source network counts when it overlaps one: part of it is exempt."""
        for net in self.exempt:
            if net.version != key.version:
                continue
            if isinstance(key, ipaddress.IPv4Address):
                if key in net:
                    return True
            elif key.overlaps(net):  # type: ignore[arg-type]
                return True
        return False

    def expire(self, now: float) -> list[Ban]:
        """Lift the bans whose time is up; return them (soonest first)."""
        over = []
        while self._expiries and self._expiries[0][0] <= now:
            ban = heapq.heappop(self._expiries)[2]
            if self._bans.get(ban.key) is ban:
                del self._bans[ban.key]
                self._changed[ban.key] = None
                over.append(ban)
        if over:
            self.version += 1
        return over

    def next_expiry(self) -> float:
        heap = self._expiries
        while heap and self._bans.get(heap[0][2].key) is not heap[0][2]:
            heapq.heappop(heap)  # lifted by a reload
        return heap[0][0] if heap else math.inf

    def take_changes(self) -> list[Key]:
        """The keys banned or lifted since the last call, in that order (ask ``key in
        self`` which); for one consumer, the kernel filter."""
        changed, self._changed = list(self._changed), {}
        return changed

    def active(self) -> list[Ban]:
        """The bans in the order they were made (oldest first)."""
        return list(self._bans.values())

    def reconfigure(
        self,
        after: int,
        duration: float,
        max_entries: int,
        exempt: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        *,
        ignored_after: int = 0,
        long_wait: float = math.inf,
        spread: float = 0.0,
    ) -> list[Ban]:
        """SIGHUP. ``after`` 0 lifts every ban; a newly exempt source is lifted; a
        smaller cap lifts the newest beyond it. Live bans keep their expiry.
        Returns the bans lifted."""
        self.after, self.duration, self.max_entries = after, duration, max_entries
        self.exempt = tuple(exempt)
        self.ignored_after, self.long_wait, self.spread = ignored_after, long_wait, spread
        bans = self.active()
        keep = [ban for ban in bans if not self.is_exempt(ban.key)][
            : max_entries if after > 0 else 0
        ]
        kept = {ban.key for ban in keep}
        lifted = [ban for ban in bans if ban.key not in kept]
        if lifted:
            self._bans = {ban.key: ban for ban in keep}
            self._changed.update(dict.fromkeys(ban.key for ban in lifted))
            self.version += 1
        return lifted


def spread_share(key: Key) -> float:
    """A fixed number in [0, 1) for ``key``, even over neighbouring addresses.

    Why: sources banned in one wave (an attack's onset) would all be let back
    in one wave, and come back together. Each ban lasts ``1 + spread x share``
    times its duration instead: fixed per source (a test or an operator can
    predict it), spread evenly (Fibonacci hashing of the address bits)."""
    if isinstance(key, ipaddress.IPv4Address):
        bits = int(key)
    else:  # the network's own bits (a /64's low half is all zero), folded to 64
        bits = int(key.network_address) >> (128 - key.prefixlen)
        bits ^= bits >> 64
    return ((bits * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) / 2.0**64


# --- the classic BPF program (linux/filter.h) ------------------------------------
#
# A socket filter on a TCP listener runs on every packet delivered to it (SYNs,
# and handshake ACKs); accepted sockets inherit it. It returns 0 to drop and
# ACCEPT to keep the packet whole. Offsets are from the network header
# (SKF_NET_OFF), where the source address is, whatever the transport.

BPF_MAXINSNS = 4096
SKF_NET_OFF = -0x100000
ACCEPT = 0xFFFFFFFF  # "keep this many bytes": all of them
DROP = 0

LD_W_ABS, LD_B_ABS, LD_MEM, ST = 0x20, 0x30, 0x60, 0x02
AND_K, JEQ_K, JA, RET_K = 0x54, 0x15, 0x05, 0x06
LD_W_LEN, TAX, RSH_K, LSH_K, JEQ_X = 0x80, 0x07, 0x74, 0x64, 0x1D

# The TCP flags a handshake segment may carry that matter here: FIN, SYN, RST, ACK.
TCP_FLAGS_MASK, TCP_ACK = 0x17, 0x10

# Drop a bare ACK: only the ACK flag and no payload. Positive offsets are from
# the TCP header (where the packet's data starts when a TCP socket's filter runs)
# and ``len`` is the TCP header and payload. On a listener a bare ACK is the
# client's last handshake step: dropped, the kernel never makes the connection,
# and the client's first bytes (or its FIN) make it instead, in one step. A
# client that sends nothing stays a half-open entry in the kernel until the
# kernel's SYN-ACK retries run out (about a minute), and costs us nothing.
SILENT_DROP: list[tuple[int, int, int, int]] = [
    (LD_B_ABS, 0, 0, 13),  # the flags
    (AND_K, 0, 0, TCP_FLAGS_MASK),
    (JEQ_K, 0, 7, TCP_ACK),  # anything but a lone ACK: on to the bans
    (LD_B_ABS, 0, 0, 12),  # the data offset, in 32-bit words, in the high nibble
    (RSH_K, 0, 0, 4),
    (LSH_K, 0, 0, 2),
    (TAX, 0, 0, 0),  # X = the TCP header's length
    (LD_W_LEN, 0, 0, 0),  # A = header and payload
    (JEQ_X, 0, 1, 0),  # no payload: drop; else on to the bans
    (RET_K, 0, 0, 0),
]

Insn = tuple[int, int, int, int]  # code, jt, jf, k


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
