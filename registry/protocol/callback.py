"""The callback: the line the registry sends to a student server, and the echo check.

The registry connects to the target and writes one line,
``CALLBACK id=ID nonce=NONCE greeting``. A student server that writes back any
line containing ``nonce=NONCE`` proves it received this call (not merely that
something accepted a TCP connection on that port): ``verified=yes``.
Sans-io: ``EchoScanner`` is fed whatever the target sends back, in whatever
chunks, with a hard cap on how much it reads. (The student side parses the
line in ``student/wire.py``.)
"""

from __future__ import annotations

from registry.protocol.reply import safe_text, safe_value

CALLBACK_WORD = "CALLBACK"
GREETING_LIMIT = 200


def make_nonce(random_bytes: bytes) -> str:
    """Hex of ``random_bytes`` (the service passes 8 from its pooled os.urandom: 16 hex chars)."""
    if not random_bytes:
        raise ValueError("a nonce needs at least one random byte")
    return random_bytes.hex()


def callback_line(reg_id: str, nonce: str, greeting: str) -> bytes:
    """``b"CALLBACK id=ID nonce=NONCE greeting\\n"``: id and nonce are single tokens,
    the greeting one short line of printable ASCII."""
    parts = [CALLBACK_WORD, f"id={safe_value(reg_id)}", f"nonce={safe_value(nonce)}"]
    text = safe_text(greeting, GREETING_LIMIT)
    if text:
        parts.append(text)
    return (" ".join(parts) + "\n").encode("ascii")


class EchoScanner:
    """Watch the bytes a called-back server sends for ``nonce=NONCE``.

    ``feed`` returns ``verified``, True once the needle is complete (it has no
    newline, so the line that carries it contains it: no need to wait for the
    line's end or EOF). Only ``len(needle) - 1`` bytes are kept between chunks,
    so an echo split anywhere is still found. At most ``max_bytes`` are
    examined (``received``); past that ``overflowed`` is True and the caller
    stops reading (an echo within the limit still counts). ``feed(b"")`` is
    EOF; after EOF, overflow or success further data is ignored.
    """

    def __init__(self, nonce: str, max_bytes: int = 4096) -> None:
        if not nonce or not nonce.isascii() or any(ch.isspace() for ch in nonce):
            raise ValueError("the nonce must be non-empty ASCII without whitespace")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._needle = f"nonce={nonce}".encode("ascii")
        self._max = max_bytes
        self._tail = b""
        self._eof = False
        self.received = 0
        self.verified = False
        self.overflowed = False

    def feed(self, data: bytes) -> bool:
        """Examine the next bytes from the target; ``b""`` is EOF. Returns ``verified``."""
        if self.verified or self.overflowed or self._eof:
            return self.verified
        if not data:
            self._eof = True
            return False
        room = self._max - self.received
        if len(data) > room:
            data = data[:room]
            self.overflowed = True
        self.received += len(data)
        window = self._tail + data
        self.verified = self._needle in window
        self._tail = b"" if self.verified else window[-(len(self._needle) - 1) :]
        return self.verified
