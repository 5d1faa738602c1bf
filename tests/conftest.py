from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import trio
from hypothesis import HealthCheck, settings

# Bytecode caches (gitignored __pycache__) even under PYTHONDONTWRITEBYTECODE=1: without
# them each run re-rewrites every test module (~3 s) and each of the ~100 registry and
# student processes the suite starts recompiles the package it imports (~70 ms each).
sys.dont_write_bytecode = False

# CI runs more examples; local runs stay quick.
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

# A shell starts a background job with SIGINT ignored, and every child inherits that:
# the demos' Ctrl-C tests need it delivered, however pytest itself was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _no_blocking_sleep_in_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.sleep on trio's own thread stalls every task of an async test: an error.
    (In a worker thread, trio.to_thread.run_sync, it is fine.)"""
    real = time.sleep

    def sleep(seconds: float) -> None:
        if trio.lowlevel.in_trio_run():
            raise AssertionError("time.sleep inside trio: use await trio.sleep")
        real(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
