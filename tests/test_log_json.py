"""The JSON log line is what json.dumps would write (msgspec encodes it, for speed)."""

from __future__ import annotations

import enum
import ipaddress
import json

import pytest

from registry.log import _json_dumps
from registry.model import Duration


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    "event",
    [
        {"event": "draining", "grace_s": Duration(10.0), "in_flight": 0},
        {"event": "x", "level": Level.HIGH, "ok": True, "none": None, "n": 1.5},
        {"event": "nested", "by_code": {"timeout": 2}, "tcp": ["127.0.0.1:9000"]},
        {"event": "text", "student": "jos\u00e9 \u202e", "quote": 'a"b\\c'},
    ],
)
def test_a_line_decodes_to_what_json_dumps_writes(event: dict[str, object]) -> None:
    line = _json_dumps(dict(event))
    assert json.loads(line) == json.loads(json.dumps(event))
    assert "\n" not in line


def test_other_objects_are_their_repr_as_structlog_does() -> None:
    address = ipaddress.ip_address("192.0.2.1")
    assert json.loads(_json_dumps({"event": "x", "peer": address}))["peer"] == repr(address)
