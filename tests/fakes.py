"""Test doubles for the service's injected edges.

``ScriptedConnector`` records every dial instead of making it, so policy tests
can ask for 10.1.2.3 without a packet leaving the machine. ``ListRecorder``
keeps records in memory for unit tests (integration tests use the real
SQLite store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from registry.model import Code, Endpoint
from registry.service import CallResult
from registry.store import Record


@dataclass
class Dial:
    target: Endpoint
    reg_id: str
    nonce: str
    wait_echo: bool
    at: float


@dataclass
class ScriptedConnector:
    """Answers every dial with ``result`` after ``delay`` virtual seconds."""

    result: CallResult = field(default_factory=lambda: CallResult(Code.CONNECTED, "ok", 1.5, True))
    delay: float = 0.0
    dials: list[Dial] = field(default_factory=list)

    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult:
        self.dials.append(Dial(target, reg_id, nonce, wait_echo, trio.current_time()))
        if self.delay:
            await trio.sleep(self.delay)
        return self.result


@dataclass
class ListRecorder:
    records: list[Record] = field(default_factory=list)
    fail: bool = False

    async def record(self, record: Record) -> None:
        await self.record_many((record,))

    async def record_many(self, records: Sequence[Record]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise OSError("disk full")
        self.records.extend(records)
