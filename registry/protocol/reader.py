"""One registration request read from a stream, handed the time (sans-io).

Both TCP drivers run it: net/tcp.py (a task awaiting its stream) and the
waiting room (one epoll set). A driver calls ``feed(data, now)`` with what it
read, else ``tick(now)`` at ``next_deadline``; each returns ``None`` (not yet),
the ``Request`` or the ``ProtocolError`` to answer. The rules: the first bytes
choose the protocol (``sniff``); LF, EOF or the size cap frame a request; one
with no terminator (the lab's C++ client waits for the reply) is framed after
the quiet period with no new byte; the total read deadline counts from
``arrived`` (accept, or connect for one the kernel held) and wins a tie; EOF
before any byte is malformed. Errors come back without a traceback: kept (the
waiting room holds a wave), it would tie the caller's frames into a cycle.
"""

from __future__ import annotations

from registry.config import ProtocolConfig
from registry.errors import ProtocolError
from registry.model import Code, Protocol
from registry.protocol.jsonl import JsonReceiver
from registry.protocol.text import Decision, TextReceiver

_WHITESPACE = b" \t\r\n"


def sniff(first: bytes) -> Protocol:
    """JSON if the first non-whitespace byte is ``{`` (no text request starts so: a
    host is a digit, a letter or ``[``), else TEXT, whose parser reports an empty one."""
    return Protocol.JSON if first.lstrip(_WHITESPACE)[:1] == b"{" else Protocol.TEXT


class RequestReader:
    """Sniff, frame and time one request; ``protocol`` is what the client speaks."""

    __slots__ = ("_cfg", "deadline", "next_deadline", "protocol", "receiver")

    def __init__(self, cfg: ProtocolConfig, arrived: float) -> None:
        self._cfg = cfg
        self.deadline = arrived + cfg.read_deadline
        # When ``tick`` has something to decide, unless a byte comes first: the end of
        # the quiet period when it falls before the deadline, else the deadline.
        self.next_deadline = self.deadline
        self.protocol = Protocol.TEXT
        self.receiver: TextReceiver | JsonReceiver | None = None

    @property
    def started(self) -> bool:
        """A byte arrived (a silent connection never sends one)."""
        return self.receiver is not None

    def feed(self, data: bytes, now: float) -> Decision:
        """Bytes from the peer at ``now``; ``b""``: it closed or half-closed."""
        receiver = self.receiver
        if receiver is None:
            if not data:
                return ProtocolError(
                    Code.MALFORMED, "the connection closed before any request was sent"
                )
            self.protocol = sniff(data)
            kind = JsonReceiver if self.protocol is Protocol.JSON else TextReceiver
            receiver = self.receiver = kind(self._cfg.max_request_bytes)
        receiver.receive_data(data)
        decision = receiver.next_event()
        if decision is None and receiver.buffered:  # a new byte restarts the quiet period
            quiet_end = now + self._cfg.quiet_period
            self.next_deadline = quiet_end if quiet_end < self.deadline else self.deadline
        return decision

    def tick(self, now: float) -> Decision:
        """The time is ``now`` and no byte came: the deadline, or the quiet period."""
        if now >= self.deadline:
            return ProtocolError(Code.READ_TIMEOUT, self._timeout_text())
        if now < self.next_deadline:
            return None
        self.next_deadline = self.deadline  # the quiet period ended: its one look
        return self.receiver.quiet()  # type: ignore[union-attr]

    def _timeout_text(self) -> str:
        limit = f"{self._cfg.read_deadline:g} s"
        if self.receiver is None:
            return f"no request arrived within {limit}; send HOST:PORT, e.g. 192.168.1.105:15000"
        return f"the request was not complete within {limit}"
