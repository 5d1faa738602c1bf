"""The UDP datagrams never answered, so one forged datagram cannot tie the registry
to another service in an endless exchange ("Loop DoS", CVE-2024-2169). Pure; why
each rule, and what the reply budget catches instead: docs/architecture.md,
"UDP loop guard"."""

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
    """A JSON object with a ``status`` key; the edge capped the datagram, so the parse
    is bounded."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "status" in obj
