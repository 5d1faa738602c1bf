"""The documents a newcomer meets stay true: the README's quick start and its
links, every reply the registry can send documented in docs/protocol.md, and
the handout's C++ change actually putting a name on a registration."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from registry.model import Code, Diagnosis, Status
from tests.support import ROOT, require_tool, run_registry
from tests.test_e2e import Spawned

README = (ROOT / "README.md").read_text()
PROTOCOL = (ROOT / "docs/protocol.md").read_text()
HANDOUT = (ROOT / "docs/student-handout.md").read_text()
LINKED_DOCS = [
    "docs/limits.md",
    "README.md",
    "docs/protocol.md",
    "docs/student-handout.md",
    "examples/lab-cpp/README.md",
]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>]+)>")
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _slugs(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    titles = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}


def _headings(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, re.M)


def test_readme_starts_with_what_to_run_then_a_class_then_links() -> None:
    order = [
        "Quick start",
        "Try it in one minute",
        "Running a class",
        "Installing the student tool alone",
        "More",
    ]
    assert _headings(README) == order
    assert README.index("## Quick start") < README.index("ban")  # no limits before running


def test_quick_start_is_exactly_the_two_commands_ci_runs() -> None:
    block = _FENCE.search(_section(README, "Quick start"))
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["python3 run.py registry serve", "python3 run.py pytest"]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip()]
    assert ci[-1] == "python3 run.py pytest"


def test_readme_try_it_and_grade_sheet_commands() -> None:
    assert "student lab --registry 127.0.0.1:9000" in _section(README, "Try it in one minute")
    klass = _section(README, "Running a class")
    assert "registry results --summary --format csv --config config/lab.toml > grades.csv" in klass
    assert 'roster = "roster.csv"' in klass
    assert "http://127.0.0.1:9100/" in klass
    assert "pip install .\n" in _section(README, "Installing the student tool alone")


def test_pip_install_brings_no_test_tools() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    for tool in ("pytest", "hypothesis", "ruff"):
        assert tool not in runtime
        assert any(tool in d for d in project["optional-dependencies"]["test"])


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_links_stay_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    for match in _LINK.finditer(path.read_text()):
        target = match.group(1) or match.group(2)
        if target.startswith(("http://", "https://")):
            # Only the registry's own loopback dashboard: nothing outside the repository.
            assert target.startswith("http://127.0.0.1:"), f"{doc} links outside: {target}"
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.is_relative_to(ROOT), f"{doc}: {target} leaves the repository"
        assert resolved.exists(), f"{doc}: {target} does not exist"
        if anchor:
            assert anchor in _slugs(resolved.read_text()), f"{doc}: no heading for #{anchor}"
    assert "shared/SPEC.md" not in path.read_text()


def test_readme_links_every_document() -> None:
    for name in [
        "docs/protocol.md",
        "docs/student-handout.md",
        "docs/grading.md",
        "docs/limits.md",
        "docs/deployment.md",
        "docs/discussion.md",
        "docs/architecture.md",
        "docs/benchmarks.md",
        "SECURITY.md",
        "examples/README.md",
    ]:
        assert f"]({name})" in README, name


def test_every_reply_code_status_and_diagnosis_is_documented() -> None:
    for value in [*Status, *Code, *Diagnosis]:
        assert f"`{value.value}`" in PROTOCOL, f"{value.value} is not in docs/protocol.md"
    table = _section(PROTOCOL, "Replies")
    for code in Code:  # each code has its row in the table, under its status
        assert f"| `{code.status.value}` | `{code.value}` |" in table, code
    for word in ("COOKIE cookie=", "pad=", "CALLBACK id=", "nonce="):
        assert word in PROTOCOL


def test_protocol_keeps_the_sections_the_lead_fills() -> None:
    assert "## How long a registration takes" in PROTOCOL
    assert "## The UDP reply budget" in PROTOCOL


def test_limits_page_opens_with_in_short() -> None:
    text = (ROOT / "docs/limits.md").read_text()
    assert _headings(text)[0] == "In short"
    for key in ("limits.profile", "ban_after", "error_fine", "defer_accept"):
        assert key in _section(text, "In short")


def test_the_handouts_cpp_change_puts_the_name_on_the_registration(tmp_path: Path) -> None:
    """The snippet printed in the handout, put into the lab's C++ client, really works."""
    gxx = require_tool("g++")
    snippet = next(b for b in _FENCE.findall(HANDOUT) if "message_to_send" in b).strip()
    name = re.search(r'" student=([^"]+)"', snippet).group(1)  # type: ignore[union-attr]
    source = (ROOT / "examples/lab-cpp/student_client.cpp").read_text()
    original = re.search(r"std::string message_to_send = [^;]*;", source)
    assert original is not None
    changed = tmp_path / "student_client.cpp"
    changed.write_text(source.replace(original.group(0), snippet))
    binary = tmp_path / "student_client"
    built = subprocess.run(
        [gxx, "-o", str(binary), str(changed), "-std=c++11"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    with run_registry(tmp_path) as reg:
        # Nobody listens on the port: the name is recorded whatever the outcome.
        sent = subprocess.run(
            [str(binary), "127.0.0.1", str(reg.port), "127.0.0.1", "15999"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.stdout == f"Sent to Registry Server: 127.0.0.1:15999 student={name}\n"
        event = reg.wait_event("registration")[0]
    assert event["student"] == name
    assert (event["status"], event["code"]) == ("FAILED", "connection_refused")


def test_the_handouts_echo_makes_the_lab_server_verified(tmp_path: Path) -> None:
    """The handout's one-line echo, put into the lab's C++ server, earns verified=yes."""
    gxx = require_tool("g++")
    snippet = next(b for b in _FENCE.findall(HANDOUT) if "send(instructor_conn_fd" in b).strip()
    source = (ROOT / "examples/lab-cpp/student_server.cpp").read_text()
    after = "        std::cout << message << std::endl;\n"
    assert source.count(after) == 1
    changed = tmp_path / "student_server.cpp"
    changed.write_text(source.replace(after, after + "        " + snippet + "\n"))
    binary = tmp_path / "student_server"
    built = subprocess.run(
        [gxx, "-o", str(binary), str(changed), "-std=c++11"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    with run_registry(tmp_path) as reg, Spawned([str(binary), "0"]) as server:
        port = server.wait_line(r"Student server listening on port (\d+)\.\.\.").group(1)
        with socket.create_connection(("127.0.0.1", reg.port), timeout=10) as client:
            client.sendall(f"127.0.0.1:{port}\n".encode())
            reply = client.makefile(encoding="utf-8").readline()
        assert server.finish() == 0, server.err
    assert reply.startswith("OK connected"), reply
    assert " verified=yes " in reply
