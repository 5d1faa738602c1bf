"""Connection slots of the admin endpoint: who is evicted when it is crowded.

Pure bookkeeping. A connection is *idle* from accept until its request head
is complete, then *busy* (serving, or an event stream, capped on its own).
Idle connections cost the most and prove nothing, so when a source holds more
than ``per_source`` connections, or the endpoint is one short of ``total``,
the oldest idle one goes (its source's, then anyone's but the newcomer's). A crowd of idle
connections therefore never keeps a health probe or the dashboard out: the
newcomer is served and the crowd's oldest member is closed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class AdminSlots:
    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._source: dict[Hashable, str] = {}
        self._count: dict[str, int] = {}
        self._idle: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._source)

    def arrive(self, key: Hashable, source: str) -> list[Hashable]:
        """Count a new (idle) connection; return the connections to close for it."""
        self._source[key] = source
        self._count[source] = self._count.get(source, 0) + 1
        self._idle[key] = None
        evict: list[Hashable] = []
        if self._count[source] > self.per_source:
            oldest = next((k for k in self._idle if self._source[k] == source), None)
            if oldest is not None:
                evict.append(oldest)
        # Keep one slot free while an older idle connection can make room (the accept
        # loop waits for a free slot before it accepts the next connection). The
        # newcomer itself is never the one: it may be the probe the crowd keeps out.
        if len(self._source) - len(evict) >= self.total:
            oldest = next((k for k in self._idle if k not in evict and k != key), None)
            if oldest is not None:
                evict.append(oldest)
        for k in evict:
            self._idle.pop(k, None)  # closing: never chosen twice
        self.evicted += len(evict)
        return evict

    def busy(self, key: Hashable) -> None:
        """The connection's request head is complete: it is no longer evictable."""
        self._idle.pop(key, None)

    def leave(self, key: Hashable) -> None:
        source = self._source.pop(key, None)
        self._idle.pop(key, None)
        if source is not None:
            self._count[source] -= 1
            if not self._count[source]:
                del self._count[source]
