"""structlog set-up: one pipeline, console on a TTY and JSON elsewhere.

Per structlog's best practices: shared processors, context bound through
``structlog.contextvars`` (``conn_id``, ``peer``, ``protocol``), and one
canonical ``registration`` event per request carrying the whole outcome.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")


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
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


_encoder = msgspec.json.Encoder(enc_hook=repr)  # what structlog's fallback does: repr()


def _json_dumps(event: dict[str, Any], **_: Any) -> str:
    # msgspec encodes in C, once per line (the registration line is on every
    # request's path); format() puts back the spaces json.dumps writes.
    return msgspec.json.format(_encoder.encode(event), indent=0).decode()


def get(name: str = "registry") -> Any:
    """A bound logger with ``logger=name``."""
    return structlog.get_logger(component=name)
