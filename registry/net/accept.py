"""The accept loop shared by the registration and admin listeners, and the kernel's
deferral of silent connections (``TCP_DEFER_ACCEPT``).

A connection slot is taken BEFORE accept(): beyond the cap, clients wait in the
listen backlog and cost no descriptor. Out-of-resource errors (EMFILE...) back
off briefly instead of spinning, as trio's serve_listeners does. Once the
socket is readable, up to ``BATCH`` connections are taken with plain
non-blocking accept() calls and handed to ``on_accept`` as stdlib sockets
before the loop yields: under a flood a scheduler round and a trio socket per
connection cost more than the refusal at the door, and the batch bounds one
step (docs/architecture.md, "short steps").
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import structlog
import trio

log = structlog.get_logger(component="accept")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# What trio's SocketListener.accept treats as "this one connection failed, go on".
IGNORABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR",
        "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip
BACKOFF_S = 0.1
BATCH = 8  # ~55 us each under attack (accept, door, hold or admit): ~0.5 ms a step
TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", None)  # Linux only
TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h, append-only ABI): eight u8 fields, then u32s;
# tcpi_total_retrans is the 24th u32.
_TOTAL_RETRANS = struct.Struct("=I")
_TOTAL_RETRANS_AT = 8 + 23 * 4

# on_accept(conn, peer address as accept() gave it, slot token): runs synchronously
# and owns both the (blocking-mode, stdlib) socket and the slot from then on.
OnAccept = Callable[[socket.SocketType, object, object], None]


async def accept_loop(
    listener: trio.SocketListener,
    admission: trio.CapacityLimiter,
    on_accept: OnAccept,
    *,
    name: str,
    bare: bool = False,
) -> None:
    """Accept until cancelled (or the listener is closed); ``on_accept`` per connection.

    ``bare``: each connection a ``socket.SocketType``, the C socket that
    ``socket.socket`` wraps in Python (its accept, constructor and close): 9k
    instructions a connection instead of 27k. Trio's sockets take only
    ``socket.socket``.
    """
    # A second Python socket object over the listener's descriptor, for plain
    # synchronous accept() calls; detached on the way out so that it never
    # closes the descriptor, which stays the trio listener's to close.
    raw = socket.socket(fileno=listener.socket.fileno())
    make = socket.SocketType if bare else socket.socket
    try:
        while True:
            await trio.lowlevel.wait_readable(raw)
            for _ in range(BATCH):
                token = object()
                try:
                    admission.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    await admission.acquire_on_behalf_of(token)  # at the cap: wait for a slot
                try:
                    fd, addr = raw._accept()  # raw.accept(), as socket.py does it
                    conn = make(raw.family, raw.type, raw.proto, fd)
                except BlockingIOError:
                    admission.release_on_behalf_of(token)
                    break  # the backlog is empty: wait for readability again
                except OSError as e:
                    admission.release_on_behalf_of(token)
                    if e.errno in IGNORABLE_ERRNOS:
                        continue
                    if e.errno in CAPACITY_ERRNOS:
                        log.error("accept_capacity", listener=name, error=e.strerror)
                        await trio.sleep(BACKOFF_S)
                        break
                    raise
                except BaseException:
                    admission.release_on_behalf_of(token)
                    raise
                on_accept(conn, addr, token)
            else:
                await trio.lowlevel.checkpoint()  # a full batch: let everyone else run first
    finally:
        raw.detach()


class _SockOpts(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...
    def getsockopt(self, level: int, optname: int, /) -> int: ...


def defer_accept(sock: _SockOpts, seconds: float) -> int | None:
    """Keep connections that have sent nothing in the kernel for about ``seconds``
    (rounded up to its SYN-ACK retransmit schedule: docs/limits.md, "Deferred
    accept"). Returns the seconds the kernel will wait (0: off), or None where the
    option does not exist or is refused (the registry holds silent ones itself)."""
    if TCP_DEFER_ACCEPT is None:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT, math.ceil(seconds))
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT)
    except OSError:  # an emulated or restricted network stack: serve without it
        return None


def held_silent(conn: socket.SocketType) -> bool:
    """Did the kernel hold ``conn`` for its whole ``TCP_DEFER_ACCEPT`` wait without a
    byte arriving? (Meaningful on a listener with the option on.) Never raises.

    While it defers, the kernel drops the client's bare ACKs and re-sends its
    SYN-ACK; the socket inherits the count (``tcpi_total_retrans``). At least one
    with nothing to read (not even EOF) means the wait ran out; one let in by a
    SYN cookie (never deferred) has a count of 0.
    """
    if TCP_INFO is None:
        return False
    try:
        info = conn.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TOTAL_RETRANS_AT + 4)
        if len(info) < _TOTAL_RETRANS_AT + 4:
            return False
        if _TOTAL_RETRANS.unpack_from(info, _TOTAL_RETRANS_AT)[0] == 0:
            return False
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # re-sent SYN-ACKs and nothing to read: the wait ran out
    except OSError:  # reset, or no TCP_INFO here: let the usual path find out
        return False
    return False  # something (or EOF) to read: it did not stay silent
