"""The edge of the ban list: keep the listeners' kernel filter in step with it and
with the silent drop (defense/bans.py, defense/window.py decide), lift bans when
they expire and report what did not fit. Changes are coalesced (at most every
``REFRESH_S``), ``STEP`` kernel calls between two checkpoints (docs/architecture.md,
"Short steps"). The filter is eBPF where the kernel lets us load it, else classic,
chosen once by ``bind`` (docs/limits.md, "Two kernel filters").
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import structlog
import trio

from registry.defense.bans import Ban, BanList
from registry.defense.window import SilentGuard
from registry.net.kernel.bpf import SO_DETACH_FILTER, Sock, detach
from registry.net.kernel.classic import ClassicFilter, insn_budget
from registry.net.kernel.ebpf import EbpfFilter

log = structlog.get_logger(component="bans")

REFRESH_S = 0.1  # the filter is rebuilt at most this often
LOGGED_SOURCES = 10  # sources named in one bans_lifted line
STEP = 64  # kernel calls between two checkpoints (an eBPF map change: ~15 us)


class ListenerFilter(Protocol):
    """One way of filtering the listeners (ClassicFilter, EbpfFilter). ``sync`` brings
    ``socks`` in step with ``bans`` (``changed``: the keys banned or lifted since the
    last pass) and ``dropping``, one item per kernel call; OSError: the kernel refused."""

    kind: str

    @property
    def filtered(self) -> int: ...  # the bans the kernel drops now

    def sync(
        self, socks: Sequence[Sock], bans: BanList, changed: list[int], dropping: bool
    ) -> Iterator[None]: ...

    def close(self) -> None: ...


def detach_inherited(conn: Sock) -> None:
    """Take the listener's filter off a socket ``accept()`` returned (it inherits a
    copy). The filter is for handshakes: on a connection, the silent drop would
    drop the client's ACKs of our reply. Never raises. Per connection, so the
    setsockopt is inlined: bpf.detach in contextlib.suppress cost ~5k instructions
    more."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:  # ENOENT: it had none
        pass


class BanFilter:
    """Applies ``bans`` and the silent drop to ``socks`` (the registration listeners)
    until cancelled."""

    def __init__(
        self,
        socks: Sequence[Sock],
        bans: BanList,
        *,
        budget: int | None = None,
        silent: SilentGuard | None = None,
    ):
        self.socks = list(socks)
        self.bans = bans
        self.silent = silent or SilentGuard(0, 0.0)
        self.budget = insn_budget() if budget is None else budget  # the classic one's
        self.kernel: ListenerFilter = ClassicFilter(self.budget)
        self.available = sys.platform == "linux"  # False after the kernel refused a change
        self.dropping = False  # what the next apply puts in the kernel
        self._dropped = False  # what the listeners' filter does now
        self._truncated = False  # some bans did not fit the filter last time
        self._applied = 0  # the BanList version the sockets carry (0: no filter, no bans)
        self._wait = trio.CancelScope()

    @property
    def kind(self) -> str:
        return self.kernel.kind

    @property
    def filtered(self) -> int:
        """The bans the kernel drops."""
        return self.kernel.filtered if self.available else 0

    @property
    def dropping_now(self) -> bool:
        """The listeners' filter drops bare handshake ACKs now."""
        return self._dropped and self.available

    @property
    def drops_new_bans(self) -> bool:
        """A ban made now will be dropped in the kernel: the filter works and held
        every ban at its last apply (a full one leaves the newest bans to the door,
        which keeps refusing them instead)."""
        return self.available and not self._truncated

    def report(self, now: float, limit: int | None = None) -> dict[str, Any]:
        """The ``/api/bans`` body: the bans, oldest first (the first ``limit``: a worker's
        snapshot builds only what it sends), and the silent drop."""
        return {
            "banned": len(self.bans),
            "kernel_filtered": self.filtered,
            "kernel_filter": self.kind,  # a kernel map, up to max_bans; classic: ~2,000
            "total": self.bans.total,
            "skipped_list_full": self.bans.skipped,
            "ban_after": self.bans.after,
            # the kernel drops bare handshake ACKs: only a client's bytes connect
            "silent_drop": {
                "active": self.dropping_now,
                "seconds_left": round(max(0.0, self.silent.until - now), 1),
                "after": self.silent.after,
            },
            "bans": [
                {
                    "source": str(ban.network),
                    "refusals": ban.refusals,
                    "banned_for_s": round(now - ban.since, 1),
                    "seconds_left": round(max(0.0, ban.until - now), 1),
                }
                for ban in self.bans.active(limit)
            ],
        }

    def bind(self, socks: Sequence[Sock]) -> str:
        """The listeners, before any ban: the eBPF filter goes on them when the kernel
        lets us, else the classic one will. Returns the kind."""
        self.socks = list(socks)
        if self.available and self.socks:
            try:
                self.kernel = EbpfFilter.on(self.socks)
            except OSError as e:
                log.info("ban_filter", kind=self.kind, ebpf_refused=e.strerror or str(e))
        return self.kind

    def poke(self) -> None:
        """The list changed: apply it soon (called synchronously by the door)."""
        self._wait.cancel()

    async def run(self) -> None:
        try:
            while True:
                now = trio.current_time()
                self.lift(now)
                self.dropping = self.silent.active(now)
                if self.bans.version != self._applied or self.dropping != self._dropped:
                    await self._apply_in_steps()
                    await trio.sleep(REFRESH_S)  # coalesce: a wave of bans is one pass
                    continue
                wake = self.bans.next_expiry()
                if self.dropping:
                    wake = min(wake, self.silent.until)
                with trio.CancelScope(deadline=wake) as self._wait:
                    await trio.sleep_forever()
        finally:  # the listeners keep the program until they close
            self.kernel.close()

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
                sources=[str(ban.network) for ban in lifted[:LOGGED_SOURCES]],
                banned=len(self.bans),
            )

    def apply(self) -> None:
        """Put the current bans (and ``dropping``) in the kernel, at once."""
        for _ in self._steps():
            pass

    async def _apply_in_steps(self) -> None:
        for n, _ in enumerate(self._steps(), 1):
            if n % STEP == 0:
                await trio.lowlevel.checkpoint()

    def _steps(self) -> Iterator[None]:
        self._applied = self.bans.version
        changed = self.bans.take_changes()  # taken even when unused: it must not grow
        if not self.available:
            self._dropped = self.dropping  # nothing to change: the wish is all there is
            return
        try:
            yield from self.kernel.sync(self.socks, self.bans, changed, self.dropping)
        except OSError as e:
            self._failed(e)
            return
        if self.dropping != self._dropped:
            self._dropped = self.dropping
            if self.dropping:
                log.warning(
                    "silent_drop_started",  # the kernel now keeps silent connections
                    seconds=round(self.silent.duration, 1),
                    after=self.silent.after,  # silent connections within 10 s that did it
                    kind=self.kind,
                )
            else:
                log.info("silent_drop_ended")
        truncated = self.kernel.filtered < len(self.bans)
        if truncated and not self._truncated:  # once per spell of a full filter
            log.warning(
                "bans_not_filtered",
                bans=len(self.bans),
                filtered=self.filtered,
                budget=self.budget,
                kind=self.kind,
            )
        self._truncated = truncated

    def _failed(self, e: OSError) -> None:
        """The kernel refused a change: stop using it. The bans still stand; only the
        kernel's help is gone. A filter we can no longer change must not drop anyone
        (the classic one may be on the first listener with bans never lifted)."""
        self.available = False
        self._dropped = self.dropping  # nothing left to switch: silent ones reach us
        for sock in self.socks:
            with contextlib.suppress(OSError):
                detach(sock)
        log.error("ban_filter_failed", error=e.strerror or str(e), bans=len(self.bans))
