"""The dashboard in a real headless Chromium: rendered without JavaScript, then live.

Two ways of driving the browser:

- ``--dump-dom``: load the page once and print the DOM after the load event,
  with JavaScript on and off (``--blink-settings=scriptEnabled=false``);
- the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
  separated by NUL on file descriptors 3 and 4; no WebSocket client needed),
  to watch the page update live while the test registers, and to check that
  hostile student text arriving over the event stream stays text.

Chromium is confined to loopback: the host resolver maps every name except
127.0.0.1 to "not found", and background networking is off.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from registry.store import Record
from tests.support import require_tool, run_registry, send_line
from tests.test_admin import admin_server, stored

pytestmark = pytest.mark.slow  # a real Chromium per test

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots (git-ignored)
HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def chromium() -> str:
    return require_tool("chromium")


# Puts the DevTools pipe on fds 3 and 4 (what --remote-debugging-pipe expects), then
# execs the browser. (A shell cannot do it: dash only redirects fds 0-9.)
_TRAMPOLINE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])"
)


def _high_fd(fd: int) -> int:
    """Move fd to >= 10 so the trampoline's dup2 onto 3 and 4 cannot clobber its other fd."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class CdpError(Exception):
    """The browser answered a DevTools command with an error."""


class Cdp:
    """A minimal DevTools-protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._out = (_high_fd(fd) for fd in os.pipe())
        self._in, from_chrome_w = (_high_fd(fd) for fd in os.pipe())
        args = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile.parent / f"{profile.name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w), *args],
                pass_fds=(to_chrome_r, from_chrome_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise CdpError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"no reply to {method} within {timeout}s"
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                assert chunk, "the browser closed its DevTools pipe: " + self.log_tail()
                self._buf += chunk

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "dbus" not in line)[-2000:]

    def open(self, url: str, *, javascript: bool = True) -> None:
        """``url`` in a new tab, which later calls talk to; ``javascript=False``: its
        scripts off (what Puppeteer's setJavaScriptEnabled(false) does)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
        if not javascript:
            self.call("Emulation.setScriptExecutionDisabled", {"value": True})
        self.call("Page.navigate", {"url": url})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """The value of ``expression`` once it is truthy. The page itself re-evaluates
        it (every 20 ms) and answers when it holds: nothing here sleeps, so an async
        test may run this in a thread without a sleep of its own."""
        until = (
            "new Promise((resolve, reject) => {"
            f" const end = performance.now() + {timeout * 1000:.0f};"
            " const check = () => {"
            f"  let value; try {{ value = ({expression}); }} catch (e) {{}}"
            "  if (value) resolve(value);"
            "  else if (performance.now() > end) reject(new Error('timed out'));"
            "  else setTimeout(check, 20);"
            " };"
            " check();"
            "})"
        )
        params = {"expression": until, "returnByValue": True, "awaitPromise": True}
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.call("Runtime.evaluate", params, timeout=timeout + 5)
            except CdpError:  # the page navigated away under the wait: wait in the new one
                assert time.monotonic() < deadline, f"timed out waiting for {expression}"
                continue
            assert "exceptionDetails" not in result, f"timed out waiting for {expression}"
            return result["result"].get("value")

    def html(self) -> str:
        """The live DOM as markup, through the DOM domain (works with page scripts off)."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        return str(self.call("DOM.getOuterHTML", {"nodeId": root})["outerHTML"])

    def wait_for_html(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                markup = self.html()
            except CdpError:  # the document was replaced mid-call (navigation): ask again
                markup = ""
            if needle in markup:
                return markup
            assert time.monotonic() < deadline, f"{needle!r} never appeared"
            time.sleep(0.05)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, CdpError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its PID
            self.proc.wait(timeout=5)
        os.close(self._in)
        os.close(self._out)


@contextmanager
def browser(profile: Path) -> Iterator[Cdp]:
    cdp = Cdp(profile)
    try:
        yield cdp
    finally:
        cdp.close()


@contextmanager
def echo_server() -> Iterator[int]:
    """A student server on 127.0.0.1: echo each callback line (the nonce), bounded in time."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.sendall(conn.recv(4096))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


# Row text of the registrations table, newest first, and the counts.
ROWS_JS = "Array.from(document.querySelectorAll('#registrations tr')).map(r => r.textContent)"
COUNT_JS = "document.getElementById('count-{}').textContent"


def test_dashboard_without_and_with_javascript_and_live(tmp_path: Path) -> None:
    with echo_server() as student_port, run_registry(tmp_path, admin="127.0.0.1:0") as reg:
        assert reg.admin is not None
        url = f"http://{reg.admin}/registrations"  # the detailed view; the class view is /
        ok = send_line("127.0.0.1", reg.port, f"127.0.0.1:{student_port} student=alice\n".encode())
        assert ok.startswith("OK connected"), ok
        closed = free_tcp_port()
        failed = send_line("127.0.0.1", reg.port, f"127.0.0.1:{closed} student=bob\n".encode())
        assert failed.startswith("FAILED connection_refused"), failed

        # Both pages are read through the DevTools DOM domain, which works with scripts
        # off (--dump-dom prints nothing then: it reads the DOM with script).
        with browser(tmp_path / "profile") as page:
            page.open(url, javascript=False)
            static = page.wait_for_html("source.onmessage = onRecord;")  # the end of the page
            assert "static page: reload for new registrations" in static  # no script ran
            assert "alice" in static and "bob" in static and "connection_refused" in static
            assert '<b id="count-OK">1</b>' in static and '<b id="count-total">2</b>' in static

            page.open(url)  # another tab, scripts on
            page.wait_for("document.body && document.body.getAttribute('data-live') === 'open'")
            scripted = page.html()
            assert "static page" not in scripted  # the script ran (it announces its state)
            assert "alice" in scripted and "bob" in scripted
            assert page.js(COUNT_JS.format("total")) == "2"
            reply = send_line(
                "127.0.0.1", reg.port, f"127.0.0.1:{student_port} student=carol\n".encode()
            )
            assert reply.startswith("OK connected"), reply
            page.wait_for(f"{COUNT_JS.format('total')} === '3'")
            rows = page.js(ROWS_JS)
            assert "carol" in rows[0] and "OK" in rows[0] and len(rows) == 3
            assert page.js(COUNT_JS.format("OK")) == "2"
            students = page.js(
                "Array.from(document.querySelectorAll('#students tr'))"
                ".map(r => [r.getAttribute('data-student'), r.cells[1].textContent,"
                " r.cells[3].textContent])"
            )
            assert students == [["alice", "OK", "1"], ["bob", "FAILED", "1"], ["carol", "OK", "1"]]
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(ARTIFACTS / "registrations-1400x900.png")
        assert (ARTIFACTS / "registrations-1400x900.png").stat().st_size > 10_000


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_hostile_text_stays_text_in_the_live_page(tmp_path: Path) -> None:
    chromium()  # skip (or fail in CI) before starting anything
    async with admin_server(tmp_path) as admin:
        first: Record = stored(1, student=HOSTILE, explanation=HOSTILE)
        await admin.runtime.store.record(first)
        cdp = await trio.to_thread.run_sync(Cdp, tmp_path / "profile")
        try:
            await trio.to_thread.run_sync(cdp.open, f"http://127.0.0.1:{admin.port}/registrations")
            await trio.to_thread.run_sync(
                cdp.wait_for, "document.body && document.body.getAttribute('data-live') === 'open'"
            )
            live = stored(2, student=HOSTILE, code=HOSTILE, explanation=HOSTILE)
            await admin.runtime.store.record(live)
            for observer in admin.runtime.service.observers:
                observer(live)
            await trio.to_thread.run_sync(cdp.wait_for, f"{COUNT_JS.format('total')} === '2'")
            checks = await trio.to_thread.run_sync(
                cdp.js,
                "({scripts: document.scripts.length,"
                " injected: document.querySelectorAll('tbody img, tbody script, tbody svg').length,"
                " xss: window.__xss === undefined ? null : window.__xss,"
                " cells: Array.from(document.querySelectorAll('#registrations tr'))"
                "   .map(r => r.cells[1].textContent)})",
            )
        finally:
            await trio.to_thread.run_sync(cdp.close)
    assert checks == {"scripts": 1, "injected": 0, "xss": None, "cells": [HOSTILE, HOSTILE]}
