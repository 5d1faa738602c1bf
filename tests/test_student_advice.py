"""Advice names the student's own values: the observed HOST with the student's
server port, never the client's ephemeral source port the registry reports."""

from __future__ import annotations

import pytest

from student.advice import AdviceContext, advice_for


@pytest.mark.parametrize(
    ("observed", "want", "not_want"),
    [
        ("127.0.0.1:34542", "advertise 127.0.0.1:15234", "34542"),
        ("[2001:db8::7]:50000", "advertise [2001:db8::7]:15234", "50000"),
        ("203.0.113.9", "advertise 203.0.113.9:15234", None),
    ],
)
def test_different_host_advice_uses_observed_host_and_server_port(
    observed: str, want: str, not_want: str | None
) -> None:
    ctx = AdviceContext(host="192.0.2.5", port=15234, registry="127.0.0.1:9000", observed=observed)
    text = " ".join(advice_for("source_mismatch", "different_host", ctx))
    assert want in text
    if not_want:
        assert not_want not in text


def test_missing_observed_reads_as_words() -> None:
    ctx = AdviceContext(host="192.0.2.5", port=15234, registry="127.0.0.1:9000")
    text = " ".join(advice_for("source_mismatch", "different_host", ctx))
    assert "None" not in text and "the address the registry saw" in text


def test_address_not_allowed_uses_the_diagnosis_advice() -> None:
    ctx = AdviceContext(
        host="0.0.0.0", port=15000, registry="127.0.0.1:9000", observed="127.0.0.1:5"
    )
    generic = advice_for("address_not_allowed", None, ctx)
    specific = advice_for("address_not_allowed", "unspecified_advertised", ctx)
    assert specific != generic
    assert "0.0.0.0" in " ".join(specific) or "bind" in " ".join(specific)


def test_a_registry_timeout_mentions_a_possible_ban() -> None:
    # A banned address's connects time out (the registry's kernel filter drops its
    # SYNs): the student is told why that may be and what to do.
    ctx = AdviceContext(host="192.0.2.5", port=15000, registry="127.0.0.1:9000", timeout=10)
    text = " ".join(advice_for("registry_timeout", None, ctx))
    assert "within 10 s" in text and "banned your address" in text and "wait" in text
    # the ban_after_ignored rule: one return inside a told wait is enough
    assert "retry_after" in text
