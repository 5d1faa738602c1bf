"""The class view (/) in a real headless Chromium: what a person in the room sees.

The real ``registry serve`` with a roster; the browser is driven over the
DevTools pipe (tests/test_dashboard_browser.py). Screenshots at 1024x768 and
1920x1080 are kept under tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from registry.store import Record
from tests.support import run_registry, send_line
from tests.test_admin import admin_server, stored
from tests.test_dashboard_browser import (
    ARTIFACTS,
    HOSTILE,
    Cdp,
    browser,
    chromium,
    echo_server,
    free_tcp_port,
)

pytestmark = pytest.mark.slow  # a real Chromium per test

LONG = "a" * 30 + "-" + "b" * 33  # 64 characters, no space to break at
ROSTER = f"student,address\nalice,\nbob,\ncarol,\n{LONG},\n"
LIVE = "document.body && document.body.getAttribute('data-live') === 'open'"
HEADLINE = "document.getElementById('headline').textContent.replace(/\\s+/g, ' ').trim()"
ROWS = (
    "Array.from(document.querySelectorAll('li')).map(li => ({who: li.children[0].textContent,"
    " state: li.className, what: li.children[1].textContent, when: li.children[2].textContent,"
    " top: li.getBoundingClientRect().top}))"
)
NO_SIDEWAYS = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"


def viewport(page: Cdp, width: int, height: int) -> None:
    page.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def by_who(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {r["who"]: r for r in rows}


def test_class_view_stuck_first_live_headline_and_no_sideways_scroll(tmp_path: Path) -> None:
    (tmp_path / "class.csv").write_text(ROSTER)
    config = '[class]\nroster = "class.csv"\n'
    with (
        echo_server() as student_port,
        run_registry(tmp_path, config=config, admin="127.0.0.1:0") as reg,
    ):
        assert reg.admin is not None
        url = f"http://{reg.admin}/"
        ok = send_line("127.0.0.1", reg.port, f"127.0.0.1:{student_port} student=alice\n".encode())
        assert ok.startswith("OK connected"), ok
        refused = f"127.0.0.1:{free_tcp_port()} student=bob\n".encode()
        assert send_line("127.0.0.1", reg.port, refused).startswith("FAILED")

        # Without JavaScript: complete, times in UTC (ISO 8601).
        with browser(tmp_path / "profile") as page:
            page.open(url, javascript=False)
            static = page.wait_for_html("</ol>")
            assert "1</span> of\n<span" in static and "students connected" in static
            assert "connected at 20" in static and "Z</time>" in static  # UTC, ISO
            assert "last tried just now" in static

            page.open(url)  # another tab, scripts on
            viewport(page, 1024, 768)
            page.wait_for(LIVE)
            assert page.js(HEADLINE) == "1 of 4 students connected"
            rows = by_who(page.js(ROWS))
            assert rows["bob"]["state"] == "stuck" and rows["alice"]["state"] == "done"
            assert rows["bob"]["top"] < rows["alice"]["top"]  # stuck above done
            assert rows["carol"]["what"] == "not started"
            assert "connection" in str(rows["bob"]["what"]).lower()  # the reason, in words
            assert str(rows["bob"]["when"]).startswith("last tried")
            assert "Z" not in str(rows["alice"]["when"])  # converted to the viewer's zone
            assert page.js(NO_SIDEWAYS), page.js("document.documentElement.scrollWidth")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(ARTIFACTS / "class-1024x768.png")

            reply = send_line(
                "127.0.0.1", reg.port, f"127.0.0.1:{student_port} student=carol\n".encode()
            )
            assert reply.startswith("OK connected"), reply
            page.wait_for(f"{HEADLINE} === '2 of 4 students connected'")
            rows = by_who(page.js(ROWS))
            assert rows["carol"]["state"] == "done" and rows["bob"]["top"] < rows["carol"]["top"]
            assert page.js("document.getElementById('not-started').textContent") == "1"

            viewport(page, 1920, 1080)
            page.wait_for(NO_SIDEWAYS)
            page.screenshot(ARTIFACTS / "class-1920x1080.png")
        for name in ("class-1024x768.png", "class-1920x1080.png"):
            assert (ARTIFACTS / name).stat().st_size > 10_000


async def test_hostile_name_is_text_in_the_class_view(tmp_path: Path) -> None:
    chromium()  # skip (or fail in CI) before starting anything
    async with admin_server(tmp_path) as admin:
        first: Record = stored(1, student=HOSTILE, explanation=HOSTILE)
        await admin.runtime.store.record(first)
        cdp = await trio.to_thread.run_sync(Cdp, tmp_path / "profile")
        try:
            await trio.to_thread.run_sync(cdp.open, f"http://127.0.0.1:{admin.port}/")
            await trio.to_thread.run_sync(cdp.wait_for, LIVE)
            live = stored(2, student=HOSTILE + "!", status="OK", code="connected")
            await admin.runtime.store.record(live)
            for observer in admin.runtime.service.observers:
                observer(live)
            await trio.to_thread.run_sync(
                cdp.wait_for, "document.querySelectorAll('#done li').length === 1"
            )
            checks = await trio.to_thread.run_sync(
                cdp.js,
                "({scripts: document.scripts.length,"
                " injected: document.querySelectorAll('ol img, ol script, ol svg').length,"
                " xss: window.__xss === undefined ? null : window.__xss,"
                " who: Array.from(document.querySelectorAll('li .who')).map(e => e.textContent)})",
            )
        finally:
            await trio.to_thread.run_sync(cdp.close)
    assert checks == {"scripts": 1, "injected": 0, "xss": None, "who": [HOSTILE, HOSTILE + "!"]}
