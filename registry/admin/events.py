"""The live event hub behind ``/api/events`` (Server-Sent Events)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
import trio

from registry.admin.results import record_json
from registry.store import Record

log = structlog.get_logger(component="admin")


class EventHub:
    """Fan-out of recorded registrations to the open ``/api/events`` streams.

    ``publish`` is a ``Service.observers`` callback: it runs on the request
    path, so it never waits: each client has a bounded queue, and a client
    whose queue is full is dropped (its stream ends) instead of slowing the
    registry or growing memory.
    """

    def __init__(self, max_clients: int = 32, queue_size: int = 256) -> None:
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.dropped = 0  # clients dropped for not keeping up
        self._clients: set[trio.MemorySendChannel[bytes]] = set()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, record: Record) -> None:
        """Queue one record for every client; drop the clients that are full."""
        if not self._clients:
            return
        # One Server-Sent Event, ``data: {json}`` (json.dumps never emits a newline).
        data = b"data: " + json.dumps(record_json(record), separators=(",", ":")).encode() + b"\n\n"
        for send in list(self._clients):
            try:
                send.send_nowait(data)
            except trio.WouldBlock:
                self._clients.discard(send)
                send.close()  # the stream sends what is queued, then ends
                self.dropped += 1
                log.warning("admin_event_client_dropped", reason="queue full")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._clients.discard(send)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[bytes] | None]:
        """A receive channel of encoded events, or None when ``max_clients`` are connected."""
        if len(self._clients) >= self.max_clients:
            yield None
            return
        send, receive = trio.open_memory_channel[bytes](self.queue_size)
        self._clients.add(send)
        try:
            yield receive
        finally:
            self._clients.discard(send)
            send.close()
            receive.close()
