"""The eBPF ban filter: banned sources in a kernel map, one small socket filter.

Why: the classic filter (classic.py) compares every packet with every ban in
turn, is rebuilt and re-attached on each change, and must fit 4,096
instructions and ``optmem_max`` on every accepted socket: about 2,000 IPv4 bans. An attack from 5,000 addresses does not fit. Here the program
is 36 instructions whatever the bans (47 with ``silent_drop``, which
``registry/defense/window.py`` switches on: a second program, swapped in and out),
and the bans live in a longest-prefix-match trie (``BPF_MAP_TYPE_LPM_TRIE``)
that is changed one entry at a time: a ban is one ``bpf()`` call, a packet
costs one lookup, and the map holds up to ``MAX_ENTRIES`` sources.

Keys are 16-byte addresses: an IPv4 source as ``::ffff:a.b.c.d/128``, an IPv6
source as its network (``limits``' ``ipv6_prefix``, say ``2001:db8::/64``). The
program looks the packet's source up as a /128, so a /64 ban matches every
address in it.

Linux only, and the kernel must let us load it: root or ``CAP_BPF`` where
unprivileged BPF is disabled (the default on current distributions). When it
will not, ``EbpfBans.create`` raises OSError and the edge
(``registry/net/kernel/banfilter.py``) falls back to the classic filter.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import socket
import struct
import sys
from typing import Protocol

from registry.defense.ratelimit import SourceNetwork as Key
from registry.net.kernel.rules import BARE_ACK, NEXT, SKF_NET_OFF, compile_rule

SO_ATTACH_BPF = getattr(socket, "SO_ATTACH_BPF", 50)  # the Linux value
MAX_ENTRIES = 100_000  # the most max_bans allows; LPM tries allocate per entry

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD = 0, 2, 3, 5
_MAP_TYPE_LPM_TRIE, _F_NO_PREALLOC = 11, 1
_PROG_TYPE_SOCKET_FILTER = 1
_KEY = struct.Struct("=I16s")  # struct bpf_lpm_trie_key: prefixlen, then the address
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96
_ATTR_SIZE = 128  # larger than every bpf_attr variant used here; the tail stays zero

# --- the program ----------------------------------------------------------------------
#
# struct bpf_insn: u8 code, u8 dst:4 src:4, s16 off, s32 imm (little end first on x86).

R0, R1, R2, R6, R10 = 0, 1, 2, 6, 10
_MOV64_X, _MOV64_K, _MOV32_K = 0xBF, 0xB7, 0xB4
_AND64_K, _ADD64_K, _RSH64_K, _LSH64_K = 0x57, 0x07, 0x77, 0x67
_LDX_W, _JNE_K, _JEQ_X = 0x61, 0x55, 0x1D
_LD_ABS_B, _LD_ABS_W = 0x30, 0x20  # r0 = packet[imm], network order made host order
_TO_BE = 0xDC  # r0 to big endian (imm 32): back to network order, for the key bytes
_ST_W, _STX_W = 0x62, 0x63
_JEQ_K, _JA, _CALL, _EXIT = 0x15, 0x05, 0x85, 0x95
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_MAP_LOOKUP_ELEM = 1  # the helper's number
KEEP = -1  # a socket filter returns how many bytes to keep: -1 (as u32) is all of them

Insn = tuple[int, int, int, int, int]  # code, dst, src, off, imm


class _Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def _native_u32(data: bytes) -> int:
    """The s32 immediate that stores ``data`` (4 bytes) as they are on this host."""
    return struct.unpack("=i", data)[0]


_EMIT = {
    "load_byte": lambda k: [(_LD_ABS_B, 0, 0, 0, k)],
    "and": lambda k: [(_AND64_K, R0, 0, 0, k)],
    "rsh": lambda k: [(_RSH64_K, R0, 0, 0, k)],
    "lsh": lambda k: [(_LSH64_K, R0, 0, 0, k)],
    "next_unless": lambda k: [(_JNE_K, R0, 0, NEXT, k)],
    # r2 = skb->len (the context's first word: the TCP header and payload); equal: drop
    "drop_if_length": lambda: [
        (_LDX_W, R2, R6, 0, 0),
        (_JEQ_X, R2, R0, 1, 0),
        (_JA, 0, 0, NEXT, 0),
        (_MOV64_K, R0, 0, 0, 0),
        (_EXIT, 0, 0, 0, 0),
    ],
}


def silent_drop() -> list[Insn]:
    """``rules.BARE_ACK`` in eBPF: drop a bare ACK. Expects the context in r6."""
    return compile_rule(BARE_ACK, _EMIT, lambda i, dist: (i[0], i[1], i[2], dist, i[4]))


def program(map_fd: int, *, drop_silent: bool = False) -> list[Insn]:
    """Drop a packet whose source is in the map ``map_fd``, and, with
    ``drop_silent``, every bare ACK first; keep every other one."""
    key = -20  # the lookup key on the stack: prefixlen at -20, the address at -16..-1
    v4: list[Insn] = [
        (_ST_W, R10, 0, key + 4, 0),  # ::ffff:a.b.c.d, the first twelve bytes
        (_ST_W, R10, 0, key + 8, 0),
        (_ST_W, R10, 0, key + 12, _native_u32(b"\x00\x00\xff\xff")),
        (_LD_ABS_W, 0, 0, 0, SKF_NET_OFF + 12),  # the IPv4 source address
        (_TO_BE, R0, 0, 0, 32),
        (_STX_W, R10, R0, key + 16, 0),
    ]
    v6: list[Insn] = []
    for i in range(4):  # the IPv6 source address, at offset 8
        v6 += [
            (_LD_ABS_W, 0, 0, 0, SKF_NET_OFF + 8 + 4 * i),
            (_TO_BE, R0, 0, 0, 32),
            (_STX_W, R10, R0, key + 4 + 4 * i, 0),
        ]
    lookup: list[Insn] = [
        (_ST_W, R10, 0, key, 128),  # look the source up as a /128
        (_LD_IMM64, R1, _PSEUDO_MAP_FD, 0, map_fd),
        (0, 0, 0, 0, 0),  # the second half of the 64-bit load
        (_MOV64_X, R2, R10, 0, 0),
        (_ADD64_K, R2, 0, 0, key),
        (_CALL, 0, 0, 0, _MAP_LOOKUP_ELEM),
        (_JEQ_K, R0, 0, 2, 0),  # not banned: keep
        (_MOV64_K, R0, 0, 0, 0),  # banned: drop
        (_EXIT, 0, 0, 0, 0),
        (_MOV32_K, R0, 0, 0, KEEP),
        (_EXIT, 0, 0, 0, 0),
    ]
    keep = len(lookup) - 2  # from the start of ``lookup``
    head: list[Insn] = [
        (_LD_ABS_B, 0, 0, 0, SKF_NET_OFF),  # version (high nibble)
        (_AND64_K, R0, 0, 0, 0xF0),
        (_JEQ_K, R0, 0, 2, 0x40),  # -> v4
        (_JEQ_K, R0, 0, 1 + len(v4) + 1, 0x60),  # -> v6
        (_JA, 0, 0, len(v4) + 1 + len(v6) + keep, 0),  # neither: keep
    ]
    v4.append((_JA, 0, 0, len(v6), 0))  # -> lookup
    ctx: list[Insn] = [(_MOV64_X, R6, R1, 0, 0)]  # packet loads take the context from r6
    return ctx + (silent_drop() if drop_silent else []) + head + v4 + v6 + lookup


def pack(insns: list[Insn]) -> bytes:
    out = bytearray()
    for code, dst, src, off, imm in insns:
        out += struct.pack("=BBhi", code, dst | (src << 4), off, imm)
    return bytes(out)


def lpm_key(key: Key) -> bytes:
    """The map key of a ban: an IPv4 address as ::ffff:a.b.c.d/128, an IPv6 network as is."""
    if isinstance(key, ipaddress.IPv4Address):
        return _KEY.pack(128, _V4_MAPPED + key.packed)
    return _KEY.pack(key.prefixlen, key.network_address.packed)


# --- the kernel -----------------------------------------------------------------------


def _syscall_number() -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None or sys.platform != "linux":
        raise OSError(errno.ENOSYS, f"no bpf() on {platform.system()} {platform.machine()}")
    return number


_libc: ctypes.CDLL | None = None
_number: int | None = None


def _bpf(cmd: int, attr: bytes) -> int:
    """``bpf(cmd, attr)``: its result (a descriptor, or 0), OSError on failure."""
    global _libc, _number
    if _libc is None or _number is None:
        _number = _syscall_number()
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(
        ctypes.c_long(_number),
        ctypes.c_int(cmd),
        ctypes.c_void_p(ctypes.addressof(buf)),
        ctypes.c_uint(_ATTR_SIZE),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


class EbpfBans:
    """The map and its two programs (without and with ``silent_drop``); ``attach``
    one to listeners, ``add``/``remove`` bans."""

    def __init__(self, map_fd: int, prog_fd: int, silent_fd: int) -> None:
        self.map_fd, self.prog_fd, self.silent_fd = map_fd, prog_fd, silent_fd

    @classmethod
    def create(cls, max_entries: int = MAX_ENTRIES) -> EbpfBans:
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

    def attach(self, sock: _Sock, *, drop_silent: bool = False) -> None:
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

    def close(self) -> None:
        """Our descriptors; sockets that carry the program keep it (and the map) alive."""
        for fd in (self.prog_fd, self.silent_fd, self.map_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.prog_fd = self.silent_fd = self.map_fd = -1


def _load(code: bytes) -> int:
    license_ = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))
    log = ctypes.create_string_buffer(65536)

    def attr(level: int) -> bytes:
        return struct.pack(
            "=IIQQIIQII",
            _PROG_TYPE_SOCKET_FILTER,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            level,
            len(log) if level else 0,
            ctypes.addressof(log) if level else 0,
            0,
            0,
        )

    try:
        return _bpf(_PROG_LOAD, attr(0))
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EACCES):
            raise  # EPERM: not allowed to load at all
        try:  # the verifier refused it: say why
            return _bpf(_PROG_LOAD, attr(1))
        except OSError as again:
            text = log.value.decode("ascii", "replace").strip().splitlines()
            raise OSError(again.errno, f"{again.strerror}: {' | '.join(text[-3:])}") from None
