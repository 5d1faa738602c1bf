"""Issue 18's "done when": two student machines, the lab's own C++ client (no name),
two graded rows; with a roster they carry the students' names.

Topology (namespaces this test creates; nothing reaches the host's network):

    pc1 192.168.1.105 ── 192.168.1.10  registry (listens on 0.0.0.0:9000)
    pc2 192.168.2.107 ── 192.168.2.10

Each PC runs the lab's C++ server and then its C++ client, which sends only
``IP:PORT`` (no name, no newline). The grade sheet is read with the real
``registry results`` from the registry's SQLite file, and the class view and
``/api/summary`` from its admin endpoint (inside its namespace).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import NetnsLab, netns_lab, require_netns
from tests.support import exe
from tests.test_interop import cpp  # noqa: F401  (the compiled lab programs: a fixture)

PCS = {"pc1": ("192.168.1.10", "192.168.1.105"), "pc2": ("192.168.2.10", "192.168.2.107")}


def results(db: Path, *args: str) -> str:
    done = subprocess.run(
        [exe("registry"), "results", "--db", str(db), "--summary", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_two_machines_with_the_nameless_cpp_client_are_two_graded_rows(
    tmp_path: Path,
    cpp: dict[str, str],  # noqa: F811
) -> None:
    require_netns()
    with netns_lab("classadmin") as lab:
        lab.add("registry")
        for n, (pc, (gateway, address)) in enumerate(PCS.items(), start=1):
            lab.add(pc)
            lab.link("registry", f"lan{n}", f"{gateway}/24", pc, "eth0", f"{address}/24")
        roster = tmp_path / "class.csv"
        roster.write_text("student,address\nbea,192.168.2.107\nali,192.168.1.105\ncem,\n")
        config = tmp_path / "registry.toml"
        config.write_text('[class]\nroster = "class.csv"\n')
        db = tmp_path / "registry.db"
        reg = lab.spawn(
            "registry", exe("registry"), "serve", "--listen", "0.0.0.0:9000", "--db", str(db),
            "--config", str(config), "--log-format", "json", "--admin", "127.0.0.1:9100",
            "--workers", "1",
        )  # fmt: skip
        reg.wait_for('"event": "listening"', timeout=20)
        # The class view, read inside the registry's namespace: where to send, and the count.
        page = admin_get(lab, "/")
        assert "Send <b>IP:PORT</b> to <b>192.168.1.10:9000</b> or <b>192.168.2.10:9000</b>" in page
        assert '<span id="connected">0</span> of\n<span id="students">3</span>' in page
        for pc, (gateway, address) in PCS.items():
            server = lab.spawn(pc, cpp["student_server"], "15000")
            server.wait_for("Student server listening on port 15000")
            sent = lab.run(pc, cpp["student_client"], gateway, "9000", address, "15000")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert f"{address}:15000" in sent.stdout
            server.wait_for("Connection accepted from instructor's server", timeout=15)
        deadline = time.monotonic() + 15  # both recorded: the log line follows the commit
        while sum('"event": "registration"' in line for line in reg.lines) < len(PCS):
            assert time.monotonic() < deadline, reg.lines[-10:]
            time.sleep(0.05)

        # Without the roster: one row per machine, by its source address.
        rows = json.loads(results(db, "--format", "json"))
        assert [(r["student"], r["source"], r["attempts"], r["best_status"]) for r in rows] == [
            (None, "192.168.1.105", 1, "OK"),
            (None, "192.168.2.107", 1, "OK"),
        ]
        table = results(db)
        assert "(no name) 192.168.1.105" in table and "(no name) 192.168.2.107" in table

        # With it (the grade sheet, and the running registry's view): the students' names.
        sheet = list(
            csv.reader(io.StringIO(results(db, "--format", "csv", "--config", str(config))))
        )
        assert sheet[0][:3] == ["student", "source", "best_status"]
        assert [(r[0], r[1], r[2], r[5]) for r in sheet[1:]] == [
            ("bea", "", "OK", "1"),
            ("ali", "", "OK", "1"),
            ("cem", "", "", "0"),
        ]
        summary = json.loads(admin_get(lab, "/api/summary"))
        assert summary["class"] == {"students": 3, "connected": 2, "not_started": 1}
        assert [(s["student"], s["source"]) for s in summary["students"]] == [
            ("bea", None), ("ali", None), ("cem", None),
        ]  # fmt: skip


def admin_get(lab: NetnsLab, path: str) -> str:
    """GET on the admin endpoint from inside the registry's namespace (its loopback)."""
    fetch = (
        "import sys, urllib.request; "
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    done = lab.run("registry", sys.executable, "-c", fetch, f"http://127.0.0.1:9100{path}")
    assert done.returncode == 0, done.stderr
    return done.stdout
