"""Which registration protocol a TCP client speaks, from its first bytes.

JSON lines and the lab's text format share the registration port. A JSON
request is an object, so its first significant byte is ``{``; no valid text
request can start with ``{`` (a host is a digit, a letter or ``[``).
"""

from __future__ import annotations

from registry.model import Protocol

_WHITESPACE = b" \t\r\n"


def sniff(first: bytes) -> Protocol:
    """``Protocol.JSON`` if the first non-whitespace byte is ``{``, else ``Protocol.TEXT``.

    With nothing but whitespace (or nothing) to look at, the answer is TEXT:
    the text parser then reports the empty request.
    """
    significant = first.lstrip(_WHITESPACE)
    return Protocol.JSON if significant[:1] == b"{" else Protocol.TEXT


def decided(first: bytes) -> bool:
    """True once ``first`` holds a non-whitespace byte, so ``sniff`` has real evidence."""
    return bool(first.lstrip(_WHITESPACE))
