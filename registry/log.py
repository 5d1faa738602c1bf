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
import select
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog
import trio

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
        Stamper(),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(serializer=_json_dumps)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = ClassConsole(colors=out.isatty(), config=_config_shown)
    lines = Lines(out)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_: lines,
        cache_logger_on_first_use=False,
    )


class CachedLogger:
    """``structlog.get_logger(**initial)`` for the line on every request's path,
    its bound logger built once per structlog configuration: the lazy proxy
    builds one per call (17k of the registration line's ~110k instructions;
    checking the configuration costs ~4k). A new configuration (``configure``
    on a reload; ``structlog.configure`` or ``reset_defaults`` in a test) is
    seen by the identity of what the logger is built from; ``capture_logs``
    edits the processor list in place, which the logger holds too."""

    def __init__(self, **initial: Any) -> None:
        self._initial = initial
        self._built_from: tuple[Any, ...] = ()
        self._bound: Any = None

    def current(self) -> Any:
        config = structlog.get_config()
        built_from = self._built_from
        if (
            not built_from
            or built_from[0] is not config["processors"]
            or built_from[1] is not config["wrapper_class"]
            or built_from[2] is not config["logger_factory"]
            or built_from[3] is not config["context_class"]
        ):
            self._bound = structlog.get_logger(**self._initial).bind()
            self._built_from = (
                config["processors"],
                config["wrapper_class"],
                config["logger_factory"],
                config["context_class"],
            )
        return self._bound


# The canonical registration line's (Service._recorded).
registration_log = CachedLogger(component="service")


class Stamper:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``, the same text
    (``2026-12-06T04:46:02.345390Z``, no fraction at .000000), with the date
    and time to the second formatted once a second: 2.5 -> 0.7 us a line."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._second: int | None = None
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        second, micro = divmod(self._clock() // 1000, 1_000_000)  # floored, as datetime.now()
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).isoformat()[:19]
        event["timestamp"] = f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"
        return event


class Lines:
    """structlog's logger: whole lines, those of one trio scheduler wave in one write().

    The store's group commit wakes a batch of registrations (~8 a commit at
    c=16) whose lines are logged in the same wave; a write() and flush each
    was ~5 % of the main thread. On the trio thread a line is held and the
    run's ``_Flusher`` task writes the wave's lines when it runs next (within
    the next wave, so an operator tailing the log sees no delay). Elsewhere
    (the store's thread, before and after the run) a line is written at once.
    A write never splits a line nor exceeds PIPE_BUF, so the lines of a worker
    group's processes sharing stderr never interleave. Lost at SIGKILL: the
    lines of the last wave, if it has not been written yet (their rows are
    committed; the SQLite row is the record).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # the store's thread logs too
        self._held: list[str] = []
        self._size = 0

    def msg(self, line: str) -> None:
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        with self._lock:
            if self._size + size > select.PIPE_BUF:
                self._write()
            self._held.append(line)
            self._size += size
        if not _Flusher.hold(self):
            self.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        if not self._held:
            return
        held, self._held, self._size = self._held, [], 0
        held.append("")
        self._stream.write("\n".join(held))
        self._stream.flush()


_UNSET = object()


class _Flusher:
    """A trio run's system task: writes the lines its scheduler wave held."""

    # None: the run is ending (its system tasks are cancelled)
    _current: trio.lowlevel.RunVar[Any] = trio.lowlevel.RunVar("log_flusher")

    def __init__(self) -> None:
        self.waiting: set[Lines] = set()
        self.wake = trio.Event()

    @classmethod
    def hold(cls, lines: Lines) -> bool:
        """Leave ``lines``' held lines to this run's flusher; False if there is none
        (not on a trio thread, or the run is ending): write them now."""
        try:
            flusher = cls._current.get(_UNSET)
        except RuntimeError:  # not on a trio run's thread
            return False
        if flusher is _UNSET:
            flusher = cls._start()
        if flusher is None:
            return False
        flusher.waiting.add(lines)
        flusher.wake.set()
        return True

    @classmethod
    def _start(cls) -> _Flusher | None:
        flusher: _Flusher | None = cls()
        try:
            trio.lowlevel.spawn_system_task(flusher.run, name="log flusher")  # type: ignore[union-attr]
        except RuntimeError:  # the run is ending
            flusher = None
        cls._current.set(flusher)
        return flusher

    async def run(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                self._write()
        finally:  # the run is ending: what is held now, and every later line, at once
            self._current.set(None)
            self._write()

    def _write(self) -> None:
        while self.waiting:
            lines = self.waiting.pop()
            try:
                lines.flush()
            except Exception:  # stderr gone or closed: nowhere to say so, and a system
                pass  # task's error would end the run


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
    send_to = list(event.get("send_to") or ["(not listening)"])
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
