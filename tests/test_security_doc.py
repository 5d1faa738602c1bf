"""SECURITY.md's bypass table cites tests that exist.

Every row of the table names the tests that prove a bypass class is refused.
A renamed test or a dropped parametrize id would silently turn that proof into
a dead reference; this test collects the cited files with pytest and checks
every cited node id against the collection. A cited id with ``*`` in it
(``corpus [loop-*]``) stands for a family and must match at least one.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import ROOT

DOC = ROOT / "SECURITY.md"
CORPUS = ("tests/test_policy_bypass.py", "test_bypass_corpus")


def table_rows() -> list[str]:
    text = DOC.read_text()
    start = text.index("| bypass class |")
    end = text.index("\n\n", start)
    return text[start:end].splitlines()[2:]


def cited(cell: str) -> list[str]:
    """Node ids in one 'proven by' cell; ``::name`` and ``[id]`` continue the last one."""
    out: list[str] = []
    file = func = ""
    for m in re.finditer(r"(corpus )?`([^`]+)`", cell):
        corpus, token = m.group(1), m.group(2)
        if corpus:
            file, func = CORPUS
        if token.startswith("tests/"):
            file, _, token = token.partition("::")
            token = "::" + token
        if token.startswith("::"):
            func, bracket, param = token[2:].partition("[")
            out.append(f"{file}::{func}" + (f"[{param}" if bracket else ""))
        elif token.startswith("["):
            out.append(f"{file}::{func}{token}")
    return out


def collected(files: set[str]) -> set[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *sorted(files),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    return {line for line in done.stdout.splitlines() if "::" in line}


@pytest.mark.slow
def test_every_cited_test_exists() -> None:
    citations: list[str] = []
    for row in table_rows():
        cells = row.strip("|").split(" | ")
        assert len(cells) == 4, row
        found = cited(cells[3])
        pending = "pending" in cells[3]
        assert found or pending, f"row cites no test: {cells[0]}"
        citations += found
    files = {c.split("::")[0] for c in citations}
    missing_files = [f for f in files if not (ROOT / f).exists()]
    assert not missing_files
    ids = collected(files)
    functions = {i.split("[")[0] for i in ids}
    missing = []
    for c in citations:
        if "*" in c:
            family = re.compile(".*".join(map(re.escape, c.split("*"))))
            ok = any(family.fullmatch(i) for i in ids)
        elif c.endswith("[...]") or "[" not in c:
            ok = c.removesuffix("[...]") in functions
        else:
            ok = c in ids
        if not ok:
            missing.append(c)
    assert len(citations) > 150
    assert not missing, f"SECURITY.md cites tests that do not exist: {missing}"


def test_every_table_cell_is_short_enough_to_read() -> None:
    for line in DOC.read_text().splitlines():
        if line.startswith("| "):
            for cell in line.strip("|").split(" | "):
                assert len(cell) <= 800, (
                    f"a SECURITY.md cell of {len(cell)} characters: {cell[:80]}"
                )


def test_pending_udp_row_is_updated_when_udp_tests_land() -> None:
    udp_tests = sorted(p.name for p in (ROOT / "tests").glob("test_udp*.py"))
    row = next(r for r in table_rows() if r.startswith("| UDP source spoofing"))
    if udp_tests:
        assert "pending" not in row, f"{udp_tests} exist: cite them in SECURITY.md's UDP row"
    else:
        assert "pending" in row
