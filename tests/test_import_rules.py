"""The layering in docs/architecture.md, enforced: pure cores import no I/O,
and the student tools import nothing from the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    *sorted((ROOT / "registry/protocol").glob("*.py")),
    *sorted((ROOT / "registry/policy").glob("*.py")),
    ROOT / "registry/ratelimit.py",
    ROOT / "registry/door.py",
    ROOT / "registry/bans.py",
    ROOT / "registry/silence.py",
    ROOT / "registry/conncaps.py",
    ROOT / "registry/config.py",
    ROOT / "registry/auth.py",
    ROOT / "registry/model.py",
    ROOT / "registry/errors.py",
    ROOT / "registry/admin/grading.py",
    ROOT / "registry/admin/access.py",
    ROOT / "registry/admin/slots.py",
]
FORBIDDEN_IN_PURE = {
    "trio",
    "socket",
    "sqlite3",
    "time",
    "asyncio",
    "select",
    "selectors",
    "subprocess",
    "threading",
    "structlog",
    "registry.net",
    "registry.server",
    "registry.service",
    "registry.store",
}
STDLIB_OK_PREFIXES = (
    "registry.model",
    "registry.errors",
    "registry.config",
    "registry.protocol",
    "registry.policy",
    "registry.ratelimit",  # pure cores themselves (the door combines these two)
    "registry.conncaps",
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _forbidden(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


@pytest.mark.parametrize(
    "path", [p for p in PURE if p.exists()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_pure_core_imports_no_io(path: Path) -> None:
    bad = {m for m in imported_modules(path) if _forbidden(m, FORBIDDEN_IN_PURE)}
    assert not bad, f"{path.name} imports I/O modules {sorted(bad)}"
    third_party = {
        m
        for m in imported_modules(path)
        if not m.startswith(STDLIB_OK_PREFIXES)
        and m.split(".")[0] not in _stdlib()
        and m != "msgspec"
    }
    assert not third_party, f"{path.name} imports non-stdlib modules {sorted(third_party)}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names) | {"__future__"}


def test_msgspec_only_in_config() -> None:
    for path in PURE:
        if path.exists() and path.name != "config.py":
            assert "msgspec" not in imported_modules(path), path


@pytest.mark.parametrize("path", sorted((ROOT / "student").glob("*.py")), ids=lambda p: p.name)
def test_student_imports_nothing_from_registry(path: Path) -> None:
    bad = {m for m in imported_modules(path) if _forbidden(m, {"registry"})}
    assert not bad, f"student/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "registry/admin").glob("*.py")), ids=lambda p: p.name
)
def test_admin_never_imports_the_server(path: Path) -> None:
    """The server passes the admin side a view (admin/view.py); never the other way."""
    assert not {m for m in imported_modules(path) if _forbidden(m, {"registry.server"})}


def test_the_checker_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom trio import sleep\n")
    assert _forbidden("trio", FORBIDDEN_IN_PURE)
    assert {"socket", "trio"} <= imported_modules(bad)
