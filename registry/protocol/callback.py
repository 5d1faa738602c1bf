"""The callback: the line the registry sends to a student server, and the echo check.

The registry connects to the target and writes one line,
``CALLBACK id=ID nonce=NONCE greeting``. A student server that writes back any
line containing ``nonce=NONCE`` proves it really received this call (and not
merely that *something* accepted a TCP connection on that port), which makes
the registration ``verified=yes``.

Sans-io: ``EchoScanner`` is fed whatever bytes the target sends back, in
whatever chunks the network delivers, with a hard cap on how much it reads.
"""

from __future__ import annotations

from registry.protocol.reply import parse_reply, safe_text, safe_value

CALLBACK_WORD = "CALLBACK"
GREETING_LIMIT = 200
DEFAULT_ECHO_MAX_BYTES = 4096


def make_nonce(random_bytes: bytes) -> str:
    """Hex of ``random_bytes`` (the caller passes ``os.urandom(8)``: 16 hex chars).

    Randomness comes from the caller so this module stays pure and testable.
    """
    if not random_bytes:
        raise ValueError("a nonce needs at least one random byte")
    return random_bytes.hex()


def callback_line(reg_id: str, nonce: str, greeting: str) -> bytes:
    """The one line sent on the callback connection, ending in ``\\n``.

    ``b"CALLBACK id=ID nonce=NONCE greeting\\n"``: id and nonce are single
    tokens, the greeting is sanitised to one short line of printable ASCII.
    """
    parts = [CALLBACK_WORD, f"id={safe_value(reg_id)}", f"nonce={safe_value(nonce)}"]
    text = safe_text(greeting, GREETING_LIMIT)
    if text:
        parts.append(text)
    return (" ".join(parts) + "\n").encode("ascii")


def parse_callback_line(line: bytes | str) -> tuple[str, str] | None:
    """``(id, nonce)`` from a callback line, or None if it is not one (never raises)."""
    parsed = parse_reply(line)
    if parsed.status != CALLBACK_WORD or parsed.code:
        return None
    reg_id = parsed.fields.get("id")
    nonce = parsed.fields.get("nonce")
    if not reg_id or not nonce:
        return None
    return reg_id, nonce


class EchoScanner:
    """Watch the bytes a called-back server sends for ``nonce=NONCE``.

    ``feed`` returns True once the echo has been seen. The needle has no
    newline, so seeing its bytes means the line that carries it contains it:
    the scanner reports as soon as the needle is complete, without waiting for
    the end of that line (or for EOF, for a last line without a newline). It
    keeps only ``len(needle) - 1`` bytes between chunks, so an echo split at
    any point is still found.

    At most ``max_bytes`` are examined; past that ``overflowed`` is True and
    the caller must stop reading (an echo found within the limit still counts).
    ``feed(b"")`` marks EOF; after EOF, overflow or success further data is ignored.
    """

    def __init__(self, nonce: str, max_bytes: int = DEFAULT_ECHO_MAX_BYTES) -> None:
        if not nonce or not nonce.isascii() or any(ch.isspace() for ch in nonce):
            raise ValueError("the nonce must be non-empty ASCII without whitespace")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._needle = f"nonce={nonce}".encode("ascii")
        self._max = max_bytes
        self._seen = 0
        self._tail = b""
        self._verified = False
        self._overflowed = False
        self._eof = False

    @property
    def verified(self) -> bool:
        """The echo has been seen."""
        return self._verified

    @property
    def overflowed(self) -> bool:
        """More than ``max_bytes`` arrived: stop reading."""
        return self._overflowed

    @property
    def received(self) -> int:
        """Bytes examined so far (at most ``max_bytes``)."""
        return self._seen

    def feed(self, data: bytes) -> bool:
        """Examine the next bytes from the target; ``b""`` is EOF. Returns ``verified``."""
        if self._verified or self._overflowed or self._eof:
            return self._verified
        if not data:
            self._eof = True
            return self._verified
        room = self._max - self._seen
        if len(data) > room:
            data = data[:room]
            self._overflowed = True
        self._seen += len(data)
        window = self._tail + data
        if self._needle in window:
            self._verified = True
            self._tail = b""
        else:
            self._tail = window[-(len(self._needle) - 1) :]
        return self._verified
