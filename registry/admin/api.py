"""The admin endpoint's routes: JSON views, the grade sheet, the dashboard, probes.

Each route takes a parsed request and returns a ``Response`` value; the HTTP
server (``admin/http.py``) does the sockets. Live state comes only through
the ``DaemonView`` the server passed in.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from registry.admin import pages
from registry.admin.core import grading

# The JSON shapes of `registry results --format json`, reused so the API and the CLI agree.
from registry.admin.results import grade_json, parse_since, record_json, render_grades
from registry.admin.view import DaemonView
from registry.metrics import Metrics
from registry.net.interfaces import send_to
from registry.protocol.names import BadName, normalise

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
CSV = "text/csv; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


class BadRequest(Exception):
    """A query parameter the handler cannot use; becomes a 400 naming it."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The parts of an h11 request the routes use, decoded."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, req: h11.Request) -> HttpRequest:
        """Raises BadRequest for an unparseable target or query."""
        target = req.target.decode("ascii", "replace")
        split = urlsplit(target)
        try:
            pairs = parse_qs(split.query, keep_blank_values=True, max_num_fields=32)
        except ValueError as e:
            raise BadRequest(f"bad query string: {e}") from None
        headers: dict[str, str] = {}
        for name, value in req.headers:
            # Repeated headers: the first wins (Host, Authorization: there should be one).
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return cls(
            method=req.method.decode("ascii", "replace"),
            path=split.path or "/",
            query={k: v[0] for k, v in pairs.items()},
            headers=headers,
        )


@dataclass(frozen=True, slots=True)
class Filters:
    limit: int
    student: str | None
    since: float | None
    since_text: str | None


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n", JSON)


Route = Callable[[HttpRequest], Awaitable[Response]]


@dataclass
class Views:
    """The routes of one admin endpoint over one daemon view."""

    view: DaemonView
    metrics: Metrics
    version: str
    default_limit: int
    max_limit: int
    wallclock: Callable[[], float]

    def __post_init__(self) -> None:
        self.routes: dict[str, Route] = {
            "/": self.dashboard,
            "/registrations": self.registrations_page,
            "/api/registrations": self.registrations,
            "/api/summary": self.summary,
            "/api/summary.csv": self.summary_csv,
            "/api/bans": self.bans,
            "/metrics": self.metrics_text,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }

    def _filters(self, req: HttpRequest) -> Filters:
        """``limit``, ``student`` and ``since`` query parameters; empty means absent."""
        query, max_limit = req.query, self.max_limit
        text = query.get("limit", "").strip()
        limit = self.default_limit
        if text:
            # isdigit() is true for "²" too, which int() refuses: ASCII digits only
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= max_limit:
                raise BadRequest(
                    f"limit: expected a whole number from 1 to {max_limit}, got {text!r}"
                )
            limit = int(text)
        student = query.get("student") or None
        if student is not None:  # the stored (NFC) form, as `registry results --student`
            try:
                student = normalise(student, spaces=True)
            except BadName as e:
                raise BadRequest(f"student: {e}") from None
        since_text = query.get("since", "").strip() or None
        since = None
        if since_text is not None:
            try:
                since = parse_since(since_text, self.wallclock())
            except ValueError as e:
                raise BadRequest(f"since: {e}") from None
        return Filters(limit, student, since, since_text)

    async def _grades(self, f: Filters) -> tuple[list[grading.GradeRow], dict[str, int]]:
        roster = self.view.roster()
        groups = await self.view.store.summary(since=f.since, student=f.student)
        rows = grading.grade(groups, roster if f.student is None else None)
        return rows, grading.class_counts(rows, roster if f.student is None else None)

    async def _counts(self, f: Filters) -> dict[str, int]:
        counted = await self.view.store.count_by_status(since=f.since, student=f.student)
        return pages.complete_counts(counted)

    async def dashboard(self, req: HttpRequest) -> Response:
        """The class view: who is connected, who is stuck (pages.render_class)."""
        f = self._filters(req)
        rows, klass = await self._grades(f)
        page = pages.ClassPage(
            rows=rows,
            klass=klass,
            generated_at=self.wallclock(),
            send_to=send_to(self.view.listening()),
            version=self.version,
            draining=self.view.probes.draining(),
            student=f.student,
            since=f.since_text,
        )
        return Response(200, pages.render_class(page).encode(), HTML)

    async def registrations_page(self, req: HttpRequest) -> Response:
        """The detailed view: every registration, with ids and ports."""
        f = self._filters(req)
        store = self.view.store
        page = pages.Page(
            records=await store.query(since=f.since, student=f.student, limit=f.limit),
            summaries=(await self._grades(f))[0],
            counts=await self._counts(f),
            generated_at=self.wallclock(),
            version=self.version,
            policy_mode=self.view.config().policy.mode,
            listening=[str(e) for e in self.view.listening()],
            limit=f.limit,
            student=f.student,
            since=f.since_text,
            draining=self.view.probes.draining(),
        )
        return Response(200, pages.render_dashboard(page).encode(), HTML)

    async def registrations(self, req: HttpRequest) -> Response:
        f = self._filters(req)
        records = await self.view.store.query(since=f.since, student=f.student, limit=f.limit)
        return json_response([record_json(r) for r in records])

    async def summary(self, req: HttpRequest) -> Response:
        f = self._filters(req)
        rows, klass = await self._grades(f)
        counts = await self._counts(f)
        return json_response(
            {"counts": counts, "class": klass, "students": [grade_json(r) for r in rows]}
        )

    async def summary_csv(self, req: HttpRequest) -> Response:
        """The grade sheet, as ``registry results --summary --format csv`` writes it."""
        rows, _ = await self._grades(self._filters(req))
        disposition = ("Content-Disposition", 'attachment; filename="grades.csv"')
        return Response(200, render_grades(rows, "csv").encode(), CSV, (disposition,))

    async def bans(self, req: HttpRequest) -> Response:
        """Sources banned now, oldest first, with the time left; the silent drop."""
        return json_response(self.view.bans())

    async def metrics_text(self, req: HttpRequest) -> Response:
        body, content_type = self.metrics.render(req.headers.get("accept", ""))
        return Response(200, body, content_type)

    async def healthz(self, req: HttpRequest) -> Response:
        return Response(200, b"ok\n")

    async def readyz(self, req: HttpRequest) -> Response:
        if self.view.probes.draining():
            return Response(503, b"draining\n")
        return Response(200, b"ready\n")
