"""The eBPF ban filter: the bans in a kernel map, one small constant program on the
listeners (docs/limits.md, "Two kernel filters", says why and what it holds).

Map keys are 16-byte addresses: an IPv4 source as ``::ffff:a.b.c.d/128``, an IPv6
source as its network (``ipv6_prefix``). The program looks the packet's source up
as a /128 in the longest-prefix-match trie, so a /64 ban matches every address in
it. Loading needs root or ``CAP_BPF`` where unprivileged BPF is off (the default on
current distributions); else ``EbpfFilter.create`` raises OSError.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import itertools
import os
import platform
import socket
import struct
import sys
from collections.abc import Iterator, Sequence

from registry.defense.bans import BanList
from registry.defense.ratelimit import SourceNetwork as Key
from registry.defense.ratelimit import source_network
from registry.net.kernel import bpf
from registry.net.kernel.bpf import AND_K, JA, JEQ_K, LD_B_ABS, LD_W_ABS, SKF_NET_OFF, Sock

SO_ATTACH_BPF = getattr(socket, "SO_ATTACH_BPF", 50)  # the Linux value
MAX_ENTRIES = 100_000  # the most max_bans allows; LPM tries allocate per entry

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD = 0, 2, 3, 5
_MAP_TYPE_LPM_TRIE, _F_NO_PREALLOC, _PROG_TYPE_SOCKET_FILTER = 11, 1, 1
_KEY = struct.Struct("=I16s")  # struct bpf_lpm_trie_key: prefixlen, then the address
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96
_ATTR_SIZE = 128  # larger than every bpf_attr variant used here; the tail stays zero

# struct bpf_insn: u8 code, u8 dst:4 src:4, s16 off, s32 imm. Loads, 32-bit ALU and
# jumps share classic's opcodes (bpf.py); these are eBPF's own.
Insn = tuple[int, int, int, int, int]  # code, dst, src, off, imm
R0, R1, R2, R6, R7, R10 = 0, 1, 2, 6, 7, 10
MOV64_X, MOV32_K, ADD64_K, LDX_W, ST_W, STX_W = 0xBF, 0xB4, 0x07, 0x61, 0x62, 0x63
JNE_K, TO_BE, CALL, EXIT, LD_IMM64 = 0x55, 0xDC, 0x85, 0x95, 0x18
_PSEUDO_MAP_FD, _MAP_LOOKUP_ELEM = 1, 1  # the helper's number
KEEP = -1  # a socket filter returns how many bytes to keep: -1 (as u32) is all of them


def _s32(k: int) -> int:
    return k - (1 << 32) if k & 0x80000000 else k


def from_classic(block: list[bpf.Insn]) -> list[Insn]:
    """A classic block in eBPF, as the kernel converts a classic filter: A is r0, X is
    r7, the context is in r6; ``ret k`` is ``r0 = k; exit``. A conditional jump must
    fall through when true (jt 0); one past the block's end lands on what follows."""
    at = list(itertools.accumulate((2 if i[0] == bpf.RET_K else 1 for i in block), initial=0))
    out: list[Insn] = []
    for pc, (code, jt, jf, k) in enumerate(block):
        to = at[pc + 1 + (k if code == JA else jf)] - at[pc] - 1  # a jump's offset
        if code in (JEQ_K, bpf.JEQ_X) and not jt:
            x = code & 0x08  # BPF_X: compare A with X
            out.append((JNE_K | x, R0, R7 if x else 0, to, 0 if x else _s32(k)))
        elif code == JA:
            out.append((JA, 0, 0, to, 0))
        elif code == bpf.RET_K:
            out += [(MOV32_K, R0, 0, 0, _s32(k)), (EXIT, 0, 0, 0, 0)]
        elif code == bpf.TAX:
            out.append((MOV64_X, R7, R0, 0, 0))
        elif code == bpf.LD_W_LEN:
            out.append((LDX_W, R0, R6, 0, 0))  # skb->len, the context's first word
        elif code in (LD_B_ABS, LD_W_ABS):
            out.append((code, 0, 0, 0, _s32(k)))
        elif code & 0x0F == 0x04:  # ALU on A and k: the same opcode, 32 bits
            out.append((code, R0, 0, 0, _s32(k)))
        else:
            raise ValueError(f"no eBPF here for classic {(code, jt, jf, k)}")
    return out


def program(map_fd: int, *, drop_silent: bool = False) -> list[Insn]:
    """Drop a packet whose source is in the map ``map_fd``, and, with
    ``drop_silent``, every bare ACK first; keep every other one."""
    key = -20  # the lookup key on the stack: prefixlen at -20, the address at -16..-1
    v4: list[Insn] = [
        (ST_W, R10, 0, key + 4, 0),  # ::ffff:a.b.c.d, the first twelve bytes
        (ST_W, R10, 0, key + 8, 0),
        (ST_W, R10, 0, key + 12, struct.unpack("=i", b"\x00\x00\xff\xff")[0]),
        (LD_W_ABS, 0, 0, 0, SKF_NET_OFF + 12),  # the IPv4 source address, host order
        (TO_BE, R0, 0, 0, 32),  # back to network order, for the key's bytes
        (STX_W, R10, R0, key + 16, 0),
    ]
    v6: list[Insn] = []
    for i in range(4):  # the IPv6 source address, at offset 8
        v6 += [
            (LD_W_ABS, 0, 0, 0, SKF_NET_OFF + 8 + 4 * i),
            (TO_BE, R0, 0, 0, 32),
            (STX_W, R10, R0, key + 4 + 4 * i, 0),
        ]
    lookup: list[Insn] = [
        (ST_W, R10, 0, key, 128),  # look the source up as a /128
        (LD_IMM64, R1, _PSEUDO_MAP_FD, 0, map_fd),
        (0, 0, 0, 0, 0),  # the second half of the 64-bit load
        (MOV64_X, R2, R10, 0, 0),
        (ADD64_K, R2, 0, 0, key),
        (CALL, 0, 0, 0, _MAP_LOOKUP_ELEM),
        (JEQ_K, R0, 0, 2, 0),  # not banned: keep
        (MOV32_K, R0, 0, 0, 0),  # banned: drop
        (EXIT, 0, 0, 0, 0),
        (MOV32_K, R0, 0, 0, KEEP),
        (EXIT, 0, 0, 0, 0),
    ]
    keep = len(lookup) - 2  # from the start of ``lookup``
    head: list[Insn] = [
        (LD_B_ABS, 0, 0, 0, SKF_NET_OFF),  # version (high nibble)
        (AND_K, R0, 0, 0, 0xF0),
        (JEQ_K, R0, 0, 2, 0x40),  # -> v4
        (JEQ_K, R0, 0, 1 + len(v4) + 1, 0x60),  # -> v6
        (JA, 0, 0, len(v4) + 1 + len(v6) + keep, 0),  # neither: keep
    ]
    v4.append((JA, 0, 0, len(v6), 0))  # -> lookup
    ctx: list[Insn] = [(MOV64_X, R6, R1, 0, 0)]  # packet loads take the context from r6
    silent = from_classic(bpf.SILENT_DROP) if drop_silent else []
    return ctx + silent + head + v4 + v6 + lookup


def pack(insns: list[Insn]) -> bytes:
    return b"".join(
        struct.pack("=BBhi", c, dst | (src << 4), off, imm) for c, dst, src, off, imm in insns
    )


def lpm_key(key: Key) -> bytes:
    """The map key of a ban: an IPv4 address as ::ffff:a.b.c.d/128, an IPv6 network as is."""
    if isinstance(key, ipaddress.IPv4Address):
        return _KEY.pack(128, _V4_MAPPED + key.packed)
    return _KEY.pack(key.prefixlen, key.network_address.packed)


_libc: ctypes.CDLL | None = None


def _bpf(cmd: int, attr: bytes) -> int:
    """``bpf(cmd, attr)``: its result (a descriptor, or 0), OSError on failure."""
    global _libc
    number = _SYS_BPF.get(platform.machine())
    if number is None or sys.platform != "linux":
        raise OSError(errno.ENOSYS, f"no bpf() on {platform.system()} {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    args = (ctypes.c_int(cmd), ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_uint(_ATTR_SIZE))
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _load(code: bytes) -> int:
    """A loaded socket filter's descriptor; the verifier's last words in the OSError."""
    license_ = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))
    log = ctypes.create_string_buffer(65536)
    prog = (_PROG_TYPE_SOCKET_FILTER, len(code) // 8, *map(ctypes.addressof, (insns, license_)))
    attr = struct.pack("=IIQQIIQ", *prog, 1, len(log), ctypes.addressof(log))  # log level 1
    try:
        return _bpf(_PROG_LOAD, attr)
    except OSError as e:
        said = log.value.decode("ascii", "replace").strip().splitlines()[-3:]
        raise OSError(e.errno, " | ".join([e.strerror or "", *said])) from None


class EbpfFilter:
    """The map and its two programs (without and with the silent drop): one program
    on the listeners, swapped when the silent drop switches; bans added to the map
    and removed one ``bpf()`` call each, only those that changed."""

    kind = "ebpf"

    def __init__(self, map_fd: int, prog_fd: int, silent_fd: int) -> None:
        self.map_fd, self.prog_fd, self.silent_fd = map_fd, prog_fd, silent_fd
        self.dropping = False  # which program the listeners carry
        self._in_map: set[int] = set()  # sources (ratelimit.source_of)
        self._waiting: dict[int, None] = {}  # banned, not in the map yet (oldest first)

    @classmethod
    def create(cls, max_entries: int = MAX_ENTRIES) -> EbpfFilter:
        """A new empty map and its programs; OSError when the kernel will not."""
        attr = struct.pack("=IIIII", _MAP_TYPE_LPM_TRIE, _KEY.size, 1, max_entries, _F_NO_PREALLOC)
        map_fd = _bpf(_MAP_CREATE, attr)
        fds: list[int] = []
        try:
            for drop_silent in (False, True):
                fds.append(_load(pack(program(map_fd, drop_silent=drop_silent))))
        except OSError:
            for fd in [*fds, map_fd]:
                os.close(fd)
            raise
        return cls(map_fd, *fds)

    @classmethod
    def on(cls, socks: Sequence[Sock]) -> EbpfFilter:
        """A new filter, attached to every one of ``socks``; OSError leaves none of them one."""
        self = cls.create()
        try:
            for sock in socks:
                self.attach(sock)
        except OSError:
            for sock in socks:
                bpf.detach(sock)
            self.close()
            raise
        return self

    @property
    def filtered(self) -> int:
        return len(self._in_map)

    def attach(self, sock: Sock, *, drop_silent: bool = False) -> None:
        """Put a program on ``sock`` (replacing the one it has, in one step)."""
        fd = self.silent_fd if drop_silent else self.prog_fd
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fd)

    def add(self, key: Key) -> None:
        """Ban ``key``; OSError (E2BIG) when the map is full."""
        k = ctypes.create_string_buffer(lpm_key(key), _KEY.size)
        v = ctypes.create_string_buffer(b"\x01", 1)
        attr = struct.pack("=I4xQQQ", self.map_fd, ctypes.addressof(k), ctypes.addressof(v), 0)
        _bpf(_MAP_UPDATE_ELEM, attr)

    def remove(self, key: Key) -> None:
        """Lift ``key``; one that is not in the map is fine."""
        k = ctypes.create_string_buffer(lpm_key(key), _KEY.size)
        try:
            _bpf(_MAP_DELETE_ELEM, struct.pack("=I4xQ", self.map_fd, ctypes.addressof(k)))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def sync(
        self, socks: Sequence[Sock], bans: BanList, changed: list[int], dropping: bool
    ) -> Iterator[None]:
        """One item per map change. Bans made or lifted meanwhile are the next pass's."""
        if dropping != self.dropping:  # one program for the other, on every listener
            for sock in socks:
                self.attach(sock, drop_silent=dropping)
            self.dropping = dropping
        for key in changed:  # lifts first: they make room in a full map
            if key in bans:
                if key not in self._in_map:
                    self._waiting[key] = None
                continue
            self._waiting.pop(key, None)
            if key in self._in_map:
                self.remove(source_network(key))
                self._in_map.discard(key)
                yield None
        for key in list(self._waiting):  # the oldest first, until the map is full
            try:
                self.add(source_network(key))
            except OSError as e:
                if e.errno in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC):
                    break  # the rest stay listed only, and wait for room
                raise
            del self._waiting[key]
            self._in_map.add(key)
            yield None

    def close(self) -> None:
        """Our descriptors; sockets that carry the program keep it (and the map) alive."""
        for fd in (self.prog_fd, self.silent_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fd = self.silent_fd = self.map_fd = -1
