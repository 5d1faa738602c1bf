"""Grading: who a registration belongs to, and one row per student (SPEC "grading").

Pure: the store's per-group aggregates and an optional roster in, grade rows
out. A group is a student name, or, for registrations sent without a name
(the lab's own C++ client sends only ``IP:PORT``), the observed source IP: on
a LAN each student's machine has its own.

The roster is a CSV file with a header row: ``student`` (required) and
``address`` (optional, the student's machine). Every roster student gets a
row, attempted or not, in roster order; a nameless group whose source is a
roster student's address counts as that student's.
"""

from __future__ import annotations

import csv
import io
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from registry.config import Config, read_text
from registry.errors import ConfigError
from registry.model import STATUS_RANK, GradeRow
from registry.policy.addresses import Address
from registry.protocol.names import BadName, normalise

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_ROSTER_ROWS = 5000


@dataclass(frozen=True, slots=True)
class RosterEntry:
    student: str
    address: IPAddress | None
    line: int


@dataclass(frozen=True, slots=True)
class Roster:
    path: str
    entries: tuple[RosterEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)


def _address(text: str) -> IPAddress:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return Address.of(text).peer  # a roster's ::ffff:a.b.c.d is the IPv4 student a.b.c.d


def _cell(row: list[str], at: int | None) -> str:
    return row[at].strip() if at is not None and at < len(row) else ""


def parse_roster(text: str, path: str) -> Roster:
    """The roster in ``text`` (read from ``path``); ConfigError with one ``path:line:``
    problem per bad row."""
    where = f"class.roster: {path}"
    if text.startswith("\ufeff"):  # spreadsheets save CSV with a byte-order mark
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise ConfigError([f"{where}:1: {e}"]) from None
    if header is None:
        raise ConfigError([f"{where}:1: empty file; expected a header row with a student column"])
    columns = [h.strip().lower() for h in header]
    if "student" not in columns:
        raise ConfigError(
            [
                f"{where}:1: no 'student' column in the header {', '.join(header)!r}"
                " (expected student and optionally address)"
            ]
        )
    name_at = columns.index("student")
    address_at = columns.index("address") if "address" in columns else None
    problems: list[str] = []
    entries: list[RosterEntry] = []
    names: dict[str, int] = {}
    addresses: dict[IPAddress, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank lines are harmless
            if len(entries) >= MAX_ROSTER_ROWS:
                problems.append(f"{where}:{line}: more than {MAX_ROSTER_ROWS} students")
                break
            # The same rule as a registration's student= (a roster name must be one
            # a student can send), so the same message names what is wrong.
            try:
                name = normalise(_cell(row, name_at), spaces=True)
            except BadName as e:
                problems.append(f"{where}:{line}: student name {e}")
                continue
            if name in names:
                problems.append(f"{where}:{line}: student {name!r} already on line {names[name]}")
                continue
            address, cell = None, _cell(row, address_at)
            if cell:
                try:
                    address = _address(cell)
                except ValueError:
                    problems.append(f"{where}:{line}: address {cell!r} is not an IP address")
                    continue
                if address in addresses:
                    problems.append(
                        f"{where}:{line}: address {address} already belongs to line "
                        f"{addresses[address]}"
                    )
                    continue
                addresses[address] = line
            names[name] = line
            entries.append(RosterEntry(name, address, line))
    except csv.Error as e:
        problems.append(f"{where}:{reader.line_num}: {e}")
    if problems:
        raise ConfigError(problems)
    return Roster(path, tuple(entries))


def read_roster(path: str) -> Roster:
    """The roster file at ``path``; ConfigError names the file, and the line of every bad
    row. Over 4 MiB is refused, never cut mid-row (thousands of students fit)."""
    return parse_roster(read_text(path, "class.roster", 4 << 20), path)


def load_roster(cfg: Config) -> Roster | None:
    """The roster named by ``[class] roster``, None without one."""
    return read_roster(cfg.class_.roster) if cfg.class_.roster else None


# --- grade rows ---------------------------------------------------------------------------


def _rank(status: str | None) -> int:
    return len(STATUS_RANK) + 1 if status is None else STATUS_RANK.get(status, len(STATUS_RANK))


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def merge(a: GradeRow, b: GradeRow) -> GradeRow:
    """Two groups of one student (their name, and their machine's nameless attempts)."""
    best = a if _rank(a.best_status) <= _rank(b.best_status) else b
    last = a if (a.last_attempt_at or 0.0) >= (b.last_attempt_at or 0.0) else b
    return replace(
        a,
        attempts=a.attempts + b.attempts,
        successes=a.successes + b.successes,
        best_status=best.best_status,
        best_code=best.best_code,
        first_success_at=_min(a.first_success_at, b.first_success_at),
        last_attempt_at=last.last_attempt_at,
        verified_ever=a.verified_ever or b.verified_ever,
        last_status=last.last_status,
        last_code=last.last_code,
        last_explanation=last.last_explanation,
    )


def _source_key(source: str | None) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(source or "")
    except ValueError:
        return (9, 0, source or "")
    return (ip.version, int(ip), "")


def grade(groups: Iterable[GradeRow], roster: Roster | None = None) -> list[GradeRow]:
    """One row per student: roster students first in roster order (with their
    machine's nameless attempts), then other names (A-Z), then nameless sources."""
    by_name: dict[str, GradeRow] = {}
    by_address: dict[IPAddress, str] = {}
    ordered: list[str] = []
    if roster is not None:
        for entry in roster.entries:
            by_name[entry.student] = GradeRow(entry.student, None, on_roster=True)
            ordered.append(entry.student)
            if entry.address is not None:
                by_address[entry.address] = entry.student
    others: dict[str, GradeRow] = {}
    nameless: list[GradeRow] = []
    for row in groups:
        if row.student is None:
            owner = _owner(row.source, by_address)
            if owner is None:
                nameless.append(row)
            else:
                by_name[owner] = merge(by_name[owner], replace(row, student=owner, source=None))
        elif row.student in by_name:
            by_name[row.student] = merge(by_name[row.student], row)
        else:
            others[row.student] = row
    rows = [by_name[name] for name in ordered]
    rows += [others[n] for n in sorted(others, key=lambda n: (n.casefold(), n))]
    rows += sorted(nameless, key=lambda r: _source_key(r.source))
    return rows


def _owner(source: str | None, by_address: dict[IPAddress, str]) -> str | None:
    if not source or not by_address:
        return None
    try:
        return by_address.get(_address(source))
    except ValueError:
        return None


def class_counts(rows: Sequence[GradeRow], roster: Roster | None) -> dict[str, int]:
    """SPEC: students (roster size, or rows), connected (best OK), not_started (no attempt)."""
    return {
        "students": len(roster) if roster is not None else len(rows),
        "connected": sum(1 for r in rows if r.done and (roster is None or r.on_roster)),
        "not_started": sum(1 for r in rows if r.attempts == 0),
    }


def stuck_first(rows: Sequence[GradeRow]) -> list[GradeRow]:
    """The class view's order: those not done (tried, most recent first; then not
    started), then the done ones (first success first)."""
    tried = [r for r in rows if not r.done and r.attempts]
    waiting = [r for r in rows if not r.attempts]
    done = [r for r in rows if r.done]
    tried.sort(key=lambda r: -(r.last_attempt_at or 0.0))
    done.sort(key=lambda r: r.first_success_at or 0.0)
    return tried + waiting + done


def ago(seconds: float) -> str:
    """``just now``, ``40 s ago``, ``3 min ago``, ``2 h ago``: for the back of the room."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"
