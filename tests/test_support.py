"""The suite's own guards (tests/conftest.py) and helpers (tests/support.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio

from tests.support import wait_exit


async def test_time_sleep_on_trios_thread_fails_the_test() -> None:
    with pytest.raises(AssertionError, match="use await trio.sleep"):
        time.sleep(0)  # noqa: ASYNC251 (the guard under test)


async def test_time_sleep_in_a_worker_thread_is_allowed() -> None:
    await trio.to_thread.run_sync(time.sleep, 0)


def test_wait_exit_returns_the_status_without_sleeping_and_is_bounded() -> None:
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2); exit(3)"])
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

    async def on_trios_thread() -> int:  # where the guard catches Popen.wait's polling
        return wait_exit(later, 10)

    try:
        assert trio.run(on_trios_thread) == 3
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(hung, 0.05)
    finally:
        hung.kill()
        assert wait_exit(hung, 10) == -9
