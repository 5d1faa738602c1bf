"""Which UDP datagrams the registry must never answer (the reply-loop guard). Pure.

A UDP service that answers whatever arrives can be tied to another such
service by ONE datagram whose forged source is that other service: each
answers the other's answer, forever ("Loop DoS", CVE-2024-2169). Before this
guard, a forged datagram from a second registry's UDP port made the two
exchange about 25,000 ``ERROR malformed`` datagrams in 3 s, without end.

``classify`` says whether a datagram is one the registry can never usefully
answer; the edge drops those silently and counts them by reason:

- ``reply``: it is itself a registry reply or challenge (first word ``OK``,
  ``DENIED``, ``FAILED``, ``BUSY``, ``ERROR`` or ``COOKIE``, any case, or a
  JSON object with a ``"status"`` key). A request always starts with
  ``HOST:PORT``; a word without a colon is never one, and answering a reply is
  exactly how two registries loop.
- ``callback``: a ``CALLBACK ...`` line, what a registry sends a student server.
- ``echo``: it holds a ``nonce=`` token, i.e. it echoes a callback (``nonce``
  is not a request key, so no request can hold one). A reflector that echoes
  our ``CALLBACK`` line is caught by the same rule.
- ``privileged_port``: its source port is below 1024. Students' clients send
  from ephemeral ports (Linux 32768-60999, Windows and macOS 49152-65535);
  below 1024 live the classic reflectors (echo 7, discard 9, daytime 13,
  chargen 19, time 37, DNS 53, NTP 123, NetBIOS 137, SNMP 161...), and a
  program binding such a port needs root on purpose. Nothing legitimate is
  lost, and a loop through any of those services cannot start.

What this cannot recognise (a reflector that transforms what it gets, e.g.
prefixes it) the reply budget stops: each unproven datagram answered costs
its source a token (``ratelimit.ReplyBudget``), so such a loop dies when the
budget is spent, within a few exchanges.
"""

from __future__ import annotations

import json
from enum import StrEnum

from registry.model import Status

FIRST_UNPRIVILEGED_PORT = 1024
REPLY_WORDS = frozenset(s.value for s in Status) | {"COOKIE"}
CALLBACK_WORD = "CALLBACK"
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
    if first in _REPLY_WORDS_B:
        return DropReason.REPLY
    if first == _CALLBACK_B:
        return DropReason.CALLBACK
    if any(word.lower().startswith(b"nonce=") for word in words):
        return DropReason.ECHO
    return None


_REPLY_WORDS_B = frozenset(w.encode("ascii") for w in REPLY_WORDS)
_CALLBACK_B = CALLBACK_WORD.encode("ascii")


def _json_reply(body: bytes) -> bool:
    """Is ``body`` a JSON object with a ``status`` key (a JSON-lines reply)?

    Only called on datagrams the edge already capped (max_datagram_bytes),
    so the parse is bounded; anything that is not such an object is left to
    the request parser, whose ERROR tells a student what to send instead.
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "status" in obj
