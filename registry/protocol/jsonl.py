"""JSON lines on the registration port: one request object, one reply object, sans-io.

Strict (docs/protocol.md, "JSON lines over TCP"): a repeated key means different
things to different parsers, NaN is not JSON, and nesting is counted on the raw
bytes, so a nested bomb never reaches the recursive ``json.loads``. ``host`` and
the names follow text.py's rules; every problem is ``bad_json`` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from registry.errors import ProtocolError
from registry.model import Code, IPAddress, Outcome, Request
from registry.protocol.reply import quote_input, safe_text, safe_value
from registry.protocol.text import OneRequestReceiver, check_value, decode, parse_host, parse_ipv6

# A request is a flat object (depth 1). A little room above that lets a nested
# value be reported as the wrong type of a named field rather than as nesting.
MAX_DEPTH = 4
EXAMPLE = '{"host": "192.168.1.105", "port": 15000, "student": "alice"}'

REQUIRED = ("host", "port")
OPTIONAL = ("student", "token", "verify")
FIELDS = REQUIRED + OPTIONAL
REPLY_KEYS = tuple(
    "status code id target observed diagnosis rtt_ms verified retry_after explanation".split()
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _bad(explanation: str) -> ProtocolError:
    return ProtocolError(Code.BAD_JSON, explanation)


def _field_error(name: str, problem: str) -> ProtocolError:
    """``"port": problem``: the field named first, as JSON writes it (escaped, capped)."""
    shown = name if len(name) <= 30 else name[:27] + "..."
    return _bad(f"{json.dumps(shown, ensure_ascii=True)}: {problem}")


def scan_depth(body: bytes, limit: int = MAX_DEPTH) -> tuple[int, bool]:
    """``(deepest nesting, brackets balanced)`` of raw JSON bytes; brackets in strings
    do not count, and the scan stops once the depth passes ``limit``. Balanced: at
    least one bracket opened and every one closed."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest, False
        elif byte in (0x7D, 0x5D) and depth > 0:  # } ]
            depth -= 1
    return deepest, deepest > 0 and depth == 0 and not in_string


def parse_json(body: bytes | str) -> Request:
    """One JSON request object (no terminator) as a ``Request``, else
    ``ProtocolError(BAD_JSON)`` naming the field or saying why it is not one object."""
    if isinstance(body, bytes):
        text, raw = decode(body, Code.BAD_JSON, f"one JSON object like {EXAMPLE}"), body
    else:
        text, raw = body, body.encode("utf-8", "surrogatepass")
    deepest, _ = scan_depth(raw)
    if deepest > MAX_DEPTH:
        raise _bad(
            f"nesting too deep (more than {MAX_DEPTH} levels); a request is one flat object "
            f"like {EXAMPLE}"
        )
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _bad(
            f"not valid JSON: {exc.msg} at offset {exc.pos}; send one object like {EXAMPLE}"
        ) from None
    if not isinstance(obj, dict):
        raise _bad(
            f"the request is {_type_name(obj)}, not an object; send one object like {EXAMPLE}"
        )
    return _request(obj)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _field_error(key, "given twice; give each field once")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise _bad(
        f"{name} is not a JSON value (JSON has no NaN or Infinity); send one object like {EXAMPLE}"
    )


_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number with a fraction or exponent",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), "an object")


def _request(obj: dict[str, Any]) -> Request:
    """The object's fields, checked in a fixed order so errors are stable."""
    unknown = [key for key in obj if key not in FIELDS]
    if unknown:
        hint = " (cookies are for the UDP text protocol)" if unknown[0] == "cookie" else ""
        raise _field_error(unknown[0], f"unknown field{hint}; accepted fields: {', '.join(FIELDS)}")
    for key in REQUIRED:
        if key not in obj:
            raise _field_error(key, f"missing; a request needs host and port, like {EXAMPLE}")
    host = _host(obj["host"])
    port = _port(obj["port"])
    options: dict[str, Any] = {}
    for key in OPTIONAL:
        value = obj.get(key)
        if value is not None:  # null means absent
            options[key] = _option(key, value)
    return Request(host=host, port=port, **options)


def _host(value: Any) -> IPAddress | str:
    if not isinstance(value, str):
        raise _field_error("host", f"expected a string, got {_type_name(value)}")
    bad = _CONTROL.search(value)
    if bad is not None:
        raise _field_error("host", f"contains the control character {quote_input(bad.group())}")
    if not value:
        raise _field_error("host", 'empty; write an address like "192.168.1.105"')
    if value != value.strip():
        raise _field_error("host", f"{quote_input(value)} has surrounding spaces; remove them")
    bracketed = value.startswith("[")
    if bracketed and not value.endswith("]"):
        raise _field_error(
            "host", f"{quote_input(value)} has no closing ']'; brackets are optional here"
        )
    try:
        if bracketed:
            return parse_ipv6(value[1:-1])
        return parse_ipv6(value) if ":" in value else parse_host(value)
    except ProtocolError as exc:  # the text grammar's words, put the JSON way
        raise _field_error("host", _json_words(exc.explanation)) from None


def _json_words(explanation: str) -> str:
    return (
        explanation.replace("write HOST:PORT, like 192.168.1.105:15000", 'like "192.168.1.105"')
        .replace("write [IPv6]:PORT, like [2001:db8::1]:15000", 'like "2001:db8::1"')
        .replace("like 192.168.1.105:15000", 'like "192.168.1.105"')
    )


def _port(value: Any) -> int:
    # bool is a subclass of int in Python, and true == 1: refuse it by name.
    if isinstance(value, bool) or not isinstance(value, int):
        extra = ""
        if isinstance(value, float) and value.is_integer() and 0 < value <= 65535:
            extra = f"; write {int(value)} without a fraction or exponent"
        elif isinstance(value, str):
            extra = "; write the number without quotes"
        raise _field_error("port", f"expected an integer 1-65535, got {_type_name(value)}{extra}")
    if not 1 <= value <= 65535:
        shown = str(value) if abs(value) < 10**12 else "a huge number"
        raise _field_error("port", f"{shown} is out of range; ports go from 1 to 65535")
    return value


def _option(key: str, value: Any) -> object:
    if key == "verify":
        if not isinstance(value, bool):
            raise _field_error(key, f"expected true or false, got {_type_name(value)}")
        return value
    if not isinstance(value, str):
        raise _field_error(key, f"expected a string, got {_type_name(value)}")
    try:
        return check_value(key, value, spaces=True)
    except ValueError as exc:
        raise _field_error(key, str(exc)) from None


class JsonReceiver(OneRequestReceiver):
    """Leading whitespace skipped; ``quiet`` takes only balanced brackets (a slow
    client's half object waits): docs/architecture.md, "Request framing"."""

    _SKIP = b" \t\r\n"
    _EMPTY = (Code.BAD_JSON, f"empty request; send one JSON object like {EXAMPLE}")
    _SEND = f"send one short JSON object on one line, like {EXAMPLE}"

    def _complete(self) -> bool:
        deepest, balanced = scan_depth(bytes(self._buf))
        return balanced or deepest > MAX_DEPTH

    def _parse(self, body: bytes) -> Request:
        return parse_json(body)


def format_json_reply(outcome: Outcome) -> bytes:
    """One JSON object and ``\\n``, printable ASCII: every key of ``REPLY_KEYS``, in order,
    ``null`` when it does not apply."""
    rtt = outcome.rtt_ms
    reply = {
        "status": outcome.status.value,
        "code": outcome.code.value,
        "id": outcome.id and safe_value(outcome.id),
        "target": outcome.target and safe_value(outcome.target),
        "observed": outcome.observed and safe_value(outcome.observed),
        "diagnosis": outcome.diagnosis.value if outcome.diagnosis is not None else None,
        "rtt_ms": round(rtt, 1) if rtt is not None and math.isfinite(rtt) else None,
        "verified": outcome.verified,
        "retry_after": int(outcome.retry_after) if outcome.retry_after is not None else None,
        "explanation": safe_text(outcome.explanation) or None,
    }
    return (json.dumps(reply, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
