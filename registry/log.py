"""structlog set-up: one pipeline, the instructor's console on a TTY and JSON elsewhere.

Shared processors, context bound through ``structlog.contextvars``
(``conn_id``, ``peer``, ``protocol``), one canonical ``registration`` event
per request. Only the renderer differs: JSON keeps every key; the console
(``ClassConsole``) turns ``listening`` into a banner (where students send,
the dashboard) and each ``registration`` into one short line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import MutableMapping
from datetime import datetime
from typing import Any, TextIO

import msgspec
import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")

# The config shown in the banner; the CLI knows it, the daemon's events do not.
_config_shown: str | None = None

# A failure's reason in a few words; the student got the full explanation.
REASONS = {
    "source_mismatch": "advertised address is not where the request came from",
    "address_not_allowed": "that address may not be called",
    "port_not_allowed": "that port is outside the allowed range",
    "self_target": "that is the registry itself",
    "hostname_not_allowed": "a hostname, not an IP address",
    "unauthorized": "missing or wrong token",
    "connection_refused": "nothing listens on that port",
    "timeout": "no answer from that address (firewall, NAT or wrong address)",
    "unreachable": "no route to that address",
    "reset": "the student server reset the connection",
    "not_verified": "the server did not echo the nonce",
    "rate_limited": "too many tries, told to wait",
    "overloaded": "the registry is busy",
    "malformed": "the message is not HOST:PORT",
    "too_long": "the message is too long",
    "read_timeout": "sent nothing in time",
    "bad_json": "the JSON request is wrong",
}


def describe_config(path: str | None) -> None:
    """Name the config file in use for the console banner (None: embedded defaults)."""
    global _config_shown
    _config_shown = path


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog globally; ``fmt='auto'`` picks console on a TTY, JSON otherwise."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(serializer=_json_dumps)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = ClassConsole(colors=out.isatty(), config=_config_shown)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _fallback(value: Any) -> Any:
    # As json.dumps sees them: a float or int subclass (a Duration, an IntEnum) is a
    # number; anything else gets structlog's fallback, repr().
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return repr(value)


_encoder = msgspec.json.Encoder(enc_hook=_fallback)


def _json_dumps(event: dict[str, Any], **_: Any) -> str:
    # msgspec encodes in C, once per line (the registration line is on every
    # request's path); format() puts back the spaces json.dumps writes.
    return msgspec.json.format(_encoder.encode(event), indent=0).decode()


class ClassConsole:
    """The console renderer: a banner, one line per registration, structlog's for the rest."""

    def __init__(self, *, colors: bool, config: str | None) -> None:
        self._other = structlog.dev.ConsoleRenderer(colors=colors)
        self._config = config

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        if event.get("event") == "registration":
            return registration_line(event)
        if event.get("event") == "listening":
            return banner(event, self._config)
        if _group_start(event):
            raise structlog.DropEvent  # the banner says how many; JSON logs keep each
        return self._other(logger, name, event)


def _group_start(event: MutableMapping[str, Any]) -> bool:
    """A worker of the group starting for the first time, or ready: the banner says
    how many there are. A restart is still shown."""
    name = event.get("event")
    return name == "worker_ready" or (name == "worker_started" and not event.get("restarts"))


def registration_line(event: MutableMapping[str, Any]) -> str:
    """``12:03:04 OK   connected  alice  192.168.1.105:15000  verified``."""
    status = str(event.get("status", "?"))
    code = str(event.get("code", "?"))
    student = event.get("student")
    who = _printable(student) if student else f"(no name) {_host_of(event.get('peer'))}"
    where = event.get("target") or event.get("advertised") or event.get("peer") or "-"
    if status == "OK":
        how = "verified" if event.get("verified") else "not verified"
    else:
        how = REASONS.get(code, code)
        diagnosis = event.get("diagnosis")
        if diagnosis and diagnosis != "direct":
            how = f"{how} ({diagnosis})"
    return f"{_local_time(event)} {status:<4} {code}  {who}  {_printable(str(where))}  {how}"


def banner(event: MutableMapping[str, Any], config: str | None) -> str:
    """Where students send, the dashboard, the config and the database: the first screen."""
    from registry.net.interfaces import reachable

    listeners = [_split(e) for e in event.get("tcp") or []]
    send_to = reachable([hp for hp in listeners if hp is not None]) or ["(not listening)"]
    udp = " and UDP" if event.get("udp") else ""
    admin = event.get("admin") or "off"
    dashboard = "off" if admin == "off" else f"http://{admin}/"
    db = str(event.get("db") or "")
    first = send_to[0]
    if all(_is_loopback(a) for a in send_to):
        send_to[0] += "   (this machine only: no network address to offer)"
    bound = ", ".join(str(e) for e in event.get("tcp") or []) or "-"
    workers = int(event.get("workers") or 1)
    if workers > 1:
        bound += f"   ({workers} worker processes)"
    rows = [
        (f"Students send to (TCP{udp})", send_to[0]),
        *(("", more) for more in send_to[1:]),
        ("Listening on", bound),
        ("Dashboard", dashboard),
        ("Config", config or "(embedded defaults)"),
        ("Results database", os.path.abspath(db) if db else "-"),
    ]
    lines = [
        "Registry Server ready.",
        *(f"  {label:<32}{value}" for label, value in rows),
        f"  Try it:  student lab --registry {first}",
        "One line per registration follows. Ctrl-C stops (in-flight callbacks finish first).",
    ]
    return "\n".join(lines)


def _split(endpoint: str) -> tuple[str, int] | None:
    host, _, port = str(endpoint).rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return host, int(port)
    except ValueError:
        return None


def _is_loopback(endpoint: str) -> bool:
    hp = _split(endpoint)
    return hp is not None and ipaddress.ip_address(hp[0]).is_loopback


def _host_of(peer: object) -> str:
    hp = _split(str(peer)) if peer else None
    return hp[0] if hp else "?"


def _local_time(event: MutableMapping[str, Any]) -> str:
    try:
        when = datetime.fromisoformat(str(event["timestamp"]))
    except (KeyError, ValueError):
        when = datetime.now().astimezone()
    return when.astimezone().strftime("%H:%M:%S")


def _printable(text: str) -> str:
    """Escape anything a terminal would act on (names are validated; this is the last guard)."""
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)
