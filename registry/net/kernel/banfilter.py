"""The edge of the ban list: keep the listeners' kernel filter in step with it.

``registry/defense/bans.py`` decides who is banned; this module puts the bans in the
kernel, lifts them when they expire, and reports what did not fit. One task;
changes are coalesced so a burst of bans is applied at most every
``REFRESH_S``. Two ways, chosen when the listeners exist (``bind``):

- **eBPF** (``registry/net/kernel/ebpf.py``), where the kernel lets us load a program
  (root or ``CAP_BPF``): one constant program on the listeners, the bans in
  a kernel map, one ``bpf()`` call per ban or lift, up to ``max_bans``
  sources. A wave of changes is applied ``EBPF_STEP`` at a time between
  checkpoints (short steps, docs/architecture.md).
- **classic** (``SO_ATTACH_FILTER``, no privilege needed): the whole list
  compiled into one program and re-attached on every change, detached when
  no ban is left. Budget: every socket ``accept()`` returns inherits the
  listener's filter and is charged its size against ``net.core.optmem_max``;
  if the charge fails the kernel drops the new connection. So the program is
  kept to ``optmem_max / 32`` bytes' worth of instructions (4,096 with
  the 128 KB default of current kernels, 640 with older ones' 20 KB): about 2,000 IPv4
  bans. Bans beyond it stay in the list (and in ``/api/bans``) without a
  kernel rule, and are logged.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import structlog
import trio

from registry.defense.bans import Ban, BanList
from registry.defense.ratelimit import source_network
from registry.defense.window import SilentGuard
from registry.net.kernel.classic import attach, drop_program, insn_budget, pack
from registry.net.kernel.ebpf import EbpfBans

log = structlog.get_logger(component="bans")

SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)  # the Linux value
REFRESH_S = 0.1  # the filter is rebuilt at most this often
LOGGED_SOURCES = 10  # sources named in one bans_lifted line
EBPF_STEP = 64  # map changes between two checkpoints (~15 us each)
CLASSIC, EBPF = "classic", "ebpf"


class _Sock(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None: ...


def detach(sock: _Sock) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: there was none
            raise


def detach_inherited(conn: _Sock) -> None:
    """Take the listener's filter off a socket ``accept()`` returned (it inherits a
    copy). The filter is for handshakes: on a connection, the silent drop would
    drop the client's ACKs of our reply. Never raises."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:  # ENOENT: it had none
        pass


class BanFilter:
    """Applies ``bans`` to ``socks`` (the registration listeners) until cancelled."""

    def __init__(
        self,
        socks: Sequence[_Sock],
        bans: BanList,
        *,
        budget: int | None = None,
        silent: SilentGuard | None = None,
    ):
        self.socks = list(socks)
        self.bans = bans
        # When it is on, the filter also drops bare handshake ACKs (registry/defense/window.py).
        self.silent = silent or SilentGuard(0, 0.0)
        self.dropping = False  # what the next apply puts in the kernel
        self._dropped = False  # what the listeners' filter does now
        self.budget = insn_budget() if budget is None else budget
        self.available = sys.platform == "linux"  # False after the kernel refused a filter
        self.filtered = 0  # bans the kernel drops
        self._truncated = False  # some bans did not fit the filter last time
        self._applied = 0  # the BanList version the sockets carry (0: no filter, no bans)
        self._ebpf: EbpfBans | None = None
        self._in_map: set[int] = set()  # the eBPF map's keys
        self._unfitted: dict[int, None] = {}  # banned, but the map was full
        self._wait = trio.CancelScope()

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

    @property
    def kind(self) -> str:
        """EBPF once bind() has attached the eBPF program, else CLASSIC."""
        return EBPF if self._ebpf is not None else CLASSIC

    def report(self, now: float) -> dict[str, Any]:
        """The ``/api/bans`` body: the bans, oldest first, and the silent drop."""
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
                for ban in self.bans.active()
            ],
        }

    def bind(self, socks: Sequence[_Sock], *, ebpf: bool = True) -> str:
        """The listeners, before any ban: the eBPF program goes on them when the
        kernel lets us (``ebpf``), else the classic filter will. Returns the kind."""
        self.socks = list(socks)
        if not (ebpf and self.available and self.socks):
            return self.kind
        try:
            program = EbpfBans.create()
        except OSError as e:
            log.info("ban_filter", kind=CLASSIC, ebpf_refused=e.strerror or str(e))
            return self.kind
        try:
            for sock in self.socks:
                program.attach(sock)
        except OSError as e:
            for sock in self.socks:
                detach(sock)
            program.close()
            log.info("ban_filter", kind=CLASSIC, ebpf_refused=e.strerror or str(e))
            return self.kind
        self._ebpf = program
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
                    if self._ebpf is not None:
                        await self._apply_ebpf()
                    else:
                        self.apply()
                    await trio.sleep(REFRESH_S)  # coalesce: a wave of bans is one pass
                    continue
                wake = self.bans.next_expiry()
                if self.dropping:
                    wake = min(wake, self.silent.until)
                with trio.CancelScope(deadline=wake) as self._wait:
                    await trio.sleep_forever()
        finally:
            if self._ebpf is not None:  # the listeners keep the program until they close
                self._ebpf.close()

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
        if self._ebpf is not None:
            for _ in self._ebpf_changes():
                pass
            return
        self._applied = self.bans.version
        self.bans.take_changes()  # unused: the classic program is compiled whole
        if not self.available:
            self._dropped = self.dropping  # nothing to change: the wish is all there is
            return
        keys = [ban.network for ban in self.bans.active()]
        program, held = drop_program(keys, self.budget, drop_silent=self.dropping)
        packed = pack(program)
        try:
            for sock in self.socks:
                if keys or self.dropping:
                    attach(sock, packed, len(program))
                else:
                    detach(sock)
        except OSError as e:
            self._failed(e)
            return
        self._switched()
        self._report_fit(len(keys), held)
        self.filtered = held

    async def _apply_ebpf(self) -> None:
        for n, _ in enumerate(self._ebpf_changes(), 1):
            if n % EBPF_STEP == 0:
                await trio.lowlevel.checkpoint()

    def _ebpf_changes(self) -> Iterator[None]:
        """Bring the map in step with the list, one change per item yielded. Only the
        keys that changed since the last pass are looked at (``BanList.take_changes``):
        a pass over all 5,000 bans of a wave was a 5-10 ms step every ``REFRESH_S``.
        Bans made or lifted meanwhile are picked up by the next pass (the version moved)."""
        assert self._ebpf is not None
        self._applied = self.bans.version
        changed = self.bans.take_changes()  # taken even when unused: it must not grow
        if not self.available:
            self._dropped = self.dropping
            return
        if self.dropping != self._dropped:
            try:  # one program for the other, on every listener
                for sock in self.socks:
                    self._ebpf.attach(sock, drop_silent=self.dropping)
            except OSError as e:
                self._failed(e)
                return
            self._switched()
        lifted = [key for key in changed if key not in self.bans]
        for key in lifted:  # first: they make room in a full map
            self._unfitted.pop(key, None)
            if key not in self._in_map:
                continue
            try:
                self._ebpf.remove(source_network(key))
            except OSError as e:
                self._failed(e)
                return
            self._in_map.discard(key)
            yield None
        # bans that did not fit before go first (oldest first), if there is room now
        wanted = [*self._unfitted, *(key for key in changed if key in self.bans)]
        self._unfitted = {}
        for key in wanted:
            if key in self._in_map:
                continue
            if self._unfitted:  # the map is full: the rest stay listed only
                self._unfitted[key] = None
                continue
            try:
                self._ebpf.add(source_network(key))
            except OSError as e:
                if e.errno not in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC):
                    self._failed(e)
                    return
                self._unfitted[key] = None
                continue
            self._in_map.add(key)
            yield None
        self.filtered = len(self._in_map)
        self._report_fit(len(self.bans), self.filtered)

    def _switched(self) -> None:
        """The listeners now do what ``dropping`` says: log when that changed."""
        if self.dropping == self._dropped:
            return
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

    def _failed(self, e: OSError) -> None:
        """The kernel refused a change (either filter): stop using it. The bans still
        stand; only the kernel's help is gone."""
        self.available = False
        self.filtered = 0
        self._dropped = self.dropping  # nothing left to switch: silent ones reach us
        # A filter we can no longer change must not drop anyone: the classic one may
        # have been attached to the first listener with bans that will never lift.
        for sock in self.socks:
            try:
                detach(sock)
            except OSError:
                pass
        log.error("ban_filter_failed", error=e.strerror or str(e), bans=len(self.bans))

    def _report_fit(self, bans: int, held: int) -> None:
        truncated = held < bans
        if truncated and not self._truncated:  # once per spell of a full filter
            log.warning(
                "bans_not_filtered", bans=bans, filtered=held, budget=self.budget, kind=self.kind
            )
        self._truncated = truncated
