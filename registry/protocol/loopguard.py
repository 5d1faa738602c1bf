"""Which UDP datagrams the registry must never answer (the reply-loop guard). Pure.

A service that answers whatever arrives can be tied to another such service
by one datagram with a forged source ("Loop DoS", CVE-2024-2169): each
answers the other's answer, forever. ``classify`` names the datagrams the
registry can never usefully answer (a reply or challenge, a ``CALLBACK``
line, a nonce's echo, a source port below 1024); the edge drops them and
counts them by reason. Why each rule, and what the reply budget catches
that these cannot: docs/architecture.md, "UDP loop guard".
"""

from __future__ import annotations

import json
from enum import StrEnum

from registry.model import Status
from registry.protocol.callback import CALLBACK_WORD

FIRST_UNPRIVILEGED_PORT = 1024
_REPLY_WORDS = frozenset(s.value.encode() for s in Status) | {b"COOKIE"}
_WHITESPACE = b" \t\r\n\x0b\x0c"


class DropReason(StrEnum):
    """Why a UDP datagram got no answer (the ``reason`` label of registry_udp_dropped_total)."""

    REPLY = "reply"
    CALLBACK = "callback"
    ECHO = "echo"
    PRIVILEGED_PORT = "privileged_port"
    SOURCE_BUDGET = "source_budget"  # the source's unproven-reply budget is spent
    GLOBAL_BUDGET = "global_budget"  # the registry's unproven-reply budget is spent


def classify(data: bytes, source_port: int) -> DropReason | None:
    """The reason never to answer ``data`` from ``source_port``, or None (answer it)."""
    if source_port < FIRST_UNPRIVILEGED_PORT:
        return DropReason.PRIVILEGED_PORT
    body = data.strip(_WHITESPACE)
    if body.startswith(b"{"):
        return DropReason.REPLY if _json_reply(body) else None
    words = body.split()
    if not words:
        return None
    first = words[0].upper()
    if first in _REPLY_WORDS:
        return DropReason.REPLY
    if first == CALLBACK_WORD.encode():
        return DropReason.CALLBACK
    if any(word.lower().startswith(b"nonce=") for word in words):
        return DropReason.ECHO
    return None


def _json_reply(body: bytes) -> bool:
    """Is ``body`` a JSON object with a ``status`` key (a JSON-lines reply)? The edge
    capped the datagram (max_datagram_bytes), so the parse is bounded."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "status" in obj
