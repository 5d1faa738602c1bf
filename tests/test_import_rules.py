"""The layering in docs/architecture.md, enforced by folder: pure folders import
no I/O, the edge is the only place that does, and the student tools import
nothing from the registry. A new module is checked by where it stands."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "registry"
# Folders whose every module is a pure core: values in, decisions out, time handed in.
PURE_FOLDERS = ("protocol", "policy", "defense", "admin/core")
# The ground floor every layer stands on: values, errors, the parsed config.
GROUND = ("model.py", "errors.py", "config.py")
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
    "registry.admin",
    "registry.log",
    "registry.metrics",
    "registry.cli",
}
# What a pure module may import from the registry: other pure folders and the ground.
PURE_OK = tuple(f"registry.{f.replace('/', '.')}" for f in PURE_FOLDERS) + tuple(
    f"registry.{g.removesuffix('.py')}" for g in GROUND
)


def pure_modules(root: Path = REGISTRY) -> list[Path]:
    found = [p for f in PURE_FOLDERS for p in sorted((root / f).rglob("*.py"))]
    return found + [root / g for g in GROUND]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _forbidden(name: str, banned: set[str] | tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def _stdlib() -> frozenset[str]:
    return frozenset(sys.stdlib_module_names) | {"__future__"}


def impurities(path: Path) -> list[str]:
    """What makes ``path`` not pure: I/O modules, and third-party modules but msgspec
    (in config alone). Empty when it is pure."""
    names = imported_modules(path)
    problems = [
        f"imports I/O module {m}" for m in sorted(names) if _forbidden(m, FORBIDDEN_IN_PURE)
    ]
    for m in sorted(names - {"msgspec"} if path.name == "config.py" else names):
        if _forbidden(m, FORBIDDEN_IN_PURE) or m.split(".")[0] in _stdlib():
            continue
        if not _forbidden(m, PURE_OK):
            problems.append(f"imports {m}, which is neither stdlib nor a pure core")
    return problems


def test_pure_folders_exist() -> None:
    for folder in PURE_FOLDERS:
        assert list((REGISTRY / folder).glob("*.py")), folder


@pytest.mark.parametrize("path", pure_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_imports_no_io(path: Path) -> None:
    assert not impurities(path), f"{path.relative_to(ROOT)}: {impurities(path)}"


def test_msgspec_only_in_config() -> None:
    for path in pure_modules():
        if path.name != "config.py":
            assert "msgspec" not in imported_modules(path), path


@pytest.mark.parametrize("path", sorted((ROOT / "student").glob("*.py")), ids=lambda p: p.name)
def test_student_imports_nothing_from_registry(path: Path) -> None:
    bad = {m for m in imported_modules(path) if _forbidden(m, {"registry"})}
    assert not bad, f"student/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REGISTRY / "admin").rglob("*.py")), ids=lambda p: p.name)
def test_admin_never_imports_the_server(path: Path) -> None:
    """The server passes the admin side a view (admin/view.py); never the other way."""
    assert not {m for m in imported_modules(path) if _forbidden(m, {"registry.server"})}


def test_the_service_imports_no_edge_above_it() -> None:
    """Imports flow one way, down: the edge (net/, admin/, server, cli) imports the
    service, never the other way; the host's facts are handed in (is_local)."""
    edge = {"registry.net", "registry.admin", "registry.server", "registry.cli", "trio.socket"}
    bad = {m for m in imported_modules(REGISTRY / "service.py") if _forbidden(m, edge)}
    assert not bad, sorted(bad)


def test_at_most_ten_top_level_modules() -> None:
    top = sorted(p.name for p in REGISTRY.glob("*.py"))
    assert len(top) <= 10, top


@pytest.mark.parametrize(
    "source",
    ["import socket\n", "from trio import sleep\n", "import registry.net.tcp\n", "import h11\n"],
)
def test_a_pure_folder_importing_io_fails_the_rule(tmp_path: Path, source: str) -> None:
    """A new module dropped in a pure folder is checked without being listed anywhere."""
    root = tmp_path / "registry"
    for folder in PURE_FOLDERS:
        (root / folder).mkdir(parents=True)
    for g in GROUND:
        (root / g).write_text("")
    (root / "defense" / "new.py").write_text("import math\n" + source)
    (root / "policy" / "clean.py").write_text("import math\nfrom registry.model import Code\n")
    found = {p.name: impurities(p) for p in pure_modules(root)}
    assert found["new.py"], source
    assert found["clean.py"] == []
