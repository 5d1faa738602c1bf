"""The JSON log line is what json.dumps would write (msgspec encodes it, for speed), its
timestamp what structlog's TimeStamper would."""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
from types import SimpleNamespace

import pytest
import structlog

from registry.log import Stamper, _json_dumps
from registry.model import Code, Duration, Protocol, Status


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    "event",
    [
        {"event": "draining", "grace_s": Duration(10.0), "in_flight": 0},
        {"event": "x", "level": Level.HIGH, "ok": True, "none": None, "n": 1.5},
        {"event": "nested", "by_code": {"timeout": 2}, "tcp": ["127.0.0.1:9000"]},
        {"event": "text", "student": "jos\u00e9 \u202e", "quote": 'a"b\\c'},
        {
            "event": "registration",
            "status": Status.OK,
            "code": Code.CONNECTED,
            "protocol": Protocol.TEXT,
        },
    ],
)
def test_a_line_decodes_to_what_json_dumps_writes(event: dict[str, object]) -> None:
    line = _json_dumps(dict(event))
    assert json.loads(line) == json.loads(json.dumps(event))
    assert "\n" not in line


def test_other_objects_are_their_repr_as_structlog_does() -> None:
    address = ipaddress.ip_address("192.0.2.1")
    assert json.loads(_json_dumps({"event": "x", "peer": address}))["peer"] == repr(address)


def _ns(text: str) -> int:
    """An instant in integer nanoseconds from ISO text (microsecond precision, + ns)."""
    head, _, extra_ns = text.partition("+ns")
    when = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    seconds = int(when.replace(microsecond=0).timestamp())
    return (seconds * 1_000_000 + when.microsecond) * 1000 + int(extra_ns or 0)


INSTANTS = [
    "2026-12-06T04:46:02.345390",
    "2026-12-06T04:46:02.000000",  # isoformat drops a zero fraction
    "2026-12-06T04:46:02.000001",
    "2026-12-06T04:46:02.999999+ns999",  # floored, as datetime.now() does
    "2028-02-29T23:59:59.999999",
    "2026-12-31T23:59:59.500000",
    "1970-01-01T00:00:00.000000",
    "2099-07-04T12:00:00.123456+ns1",
]


@pytest.mark.parametrize("instant", INSTANTS)
def test_the_stamper_writes_what_structlogs_timestamper_does(
    instant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = _ns(instant)
    second, micro = divmod(ns // 1000, 1_000_000)
    frozen = datetime.datetime.fromtimestamp(second, datetime.UTC).replace(microsecond=micro)

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            assert tz is datetime.UTC
            return frozen

    monkeypatch.setattr(
        structlog.processors,
        "datetime",
        SimpleNamespace(datetime=Frozen, timezone=datetime.timezone),
    )
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    assert Stamper(clock=lambda: ns)(None, "info", {}) == theirs


def test_the_stamper_formats_each_second_anew() -> None:
    # The second's text is kept: a new second (or a clock set back) must not reuse it.
    times = iter(
        [
            _ns(t)
            for t in (
                "2026-12-06T04:46:02.5",
                "2026-12-06T04:46:02.75",
                "2026-12-06T04:46:03.25",
                "2026-12-06T04:45:59.0",
            )
        ]
    )
    stamper = Stamper(clock=lambda: next(times))
    assert [stamper(None, "info", {})["timestamp"] for _ in range(4)] == [
        "2026-12-06T04:46:02.500000Z",
        "2026-12-06T04:46:02.750000Z",
        "2026-12-06T04:46:03.250000Z",
        "2026-12-06T04:45:59Z",
    ]
