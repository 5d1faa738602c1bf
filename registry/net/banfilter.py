"""The edge of the ban list: keep the listeners' kernel filter in step with it.

``registry/bans.py`` decides who is banned and compiles the classic BPF
program; this module attaches it to the registration listeners
(``SO_ATTACH_FILTER``, Linux, no privilege needed) whenever the list changes,
lifts bans when they expire, and detaches the filter when none is left (no
cost per packet then). One task; changes are coalesced so a burst of bans
re-attaches the filter at most every ``REFRESH_S``.

Budget: every socket ``accept()`` returns inherits the listener's filter and
is charged its size against ``net.core.optmem_max``; if the charge fails the
kernel drops the new connection. So the program is kept to ``optmem_max / 32``
bytes' worth of instructions (4,096 with today's 128 KB default, 640 with the
old 20 KB one), whatever ``limits.max_bans`` says; bans beyond it stay in the
list (and in ``/api/bans``) without a kernel rule, and are logged.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import structlog
import trio

from registry.bans import BPF_MAXINSNS, Ban, BanList, drop_program, pack

log = structlog.get_logger(component="bans")

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # the Linux values
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
REFRESH_S = 0.1  # the filter is rebuilt at most this often
OPTMEM_MAX = Path("/proc/sys/net/core/optmem_max")
LOGGED_SOURCES = 10  # sources named in one bans_lifted line


class _Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None: ...


def insn_budget(optmem_path: Path = OPTMEM_MAX) -> int:
    """How many instructions a filter may have on this host (see the module doc)."""
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


def detach(sock: _Sock) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: there was none
            raise


class BanFilter:
    """Applies ``bans`` to ``socks`` (the registration listeners) until cancelled."""

    def __init__(self, socks: Sequence[_Sock], bans: BanList, *, budget: int | None = None):
        self.socks = list(socks)
        self.bans = bans
        self.budget = insn_budget() if budget is None else budget
        self.available = sys.platform == "linux"  # False after the kernel refused a filter
        self.filtered = 0  # bans in the attached program
        self._truncated = False  # some bans did not fit the program last time
        self._applied = 0  # the BanList version the sockets carry (0: no filter, no bans)
        self._wait = trio.CancelScope()

    def poke(self) -> None:
        """The list changed: apply it soon (called synchronously by the door)."""
        self._wait.cancel()

    async def run(self) -> None:
        while True:
            self.lift(trio.current_time())
            if self.bans.version != self._applied:
                self.apply()
                await trio.sleep(REFRESH_S)  # coalesce: a wave of bans is one re-attach
                continue
            with trio.CancelScope(deadline=self.bans.next_expiry()) as self._wait:
                await trio.sleep_forever()

    def lift(self, now: float) -> list[Ban]:
        lifted = self.bans.expire(now)
        self.report_lifted(lifted, reason="expired")
        return lifted

    def report_lifted(self, lifted: list[Ban], *, reason: str) -> None:
        """One ``bans_lifted`` line for bans that ended together (expired, or a reload)."""
        if lifted:
            log.info(
                "bans_lifted",
                reason=reason,
                count=len(lifted),
                sources=[str(ban.key) for ban in lifted[:LOGGED_SOURCES]],
                banned=len(self.bans),
            )

    def apply(self) -> None:
        """Attach the program for the current bans (detach when there are none)."""
        self._applied = self.bans.version
        if not self.available:
            return
        keys = [ban.key for ban in self.bans.active()]
        program, held = drop_program(keys, self.budget)
        packed = pack(program)
        try:
            for sock in self.socks:
                if keys:
                    attach(sock, packed, len(program))
                else:
                    detach(sock)
        except OSError as e:
            self.available = False  # the bans still stand; only the kernel's help is gone
            self.filtered = 0
            log.error("ban_filter_failed", error=e.strerror or str(e), bans=len(keys))
            return
        truncated = held < len(keys)
        if truncated and not self._truncated:  # once per spell of a full filter
            log.warning("bans_not_filtered", bans=len(keys), filtered=held, budget=self.budget)
        self._truncated = truncated
        self.filtered = held
