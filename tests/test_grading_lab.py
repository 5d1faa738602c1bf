"""Issue 18's "done when": two student machines, the lab's own C++ client (no name),
two graded rows; with a roster they carry the students' names.

Topology (namespaces this test creates; nothing reaches the host's network):

    pc1 192.168.1.105 ── 192.168.1.10  registry (listens on 0.0.0.0:9000)
    pc2 192.168.2.107 ── 192.168.2.10

Each PC runs the lab's C++ server and then its C++ client, which sends only
``IP:PORT`` (no name, no newline). The grade sheet is read with the real
``registry results`` from the registry's SQLite file.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

from tests.netns import netns_lab, require_netns
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
        reg = lab.registry("registry", tmp_path, "0.0.0.0:9000")
        reg.out.wait_for('"event": "listening"', timeout=20)
        for pc, (gateway, address) in PCS.items():
            server = lab.spawn(pc, cpp["student_server"], "15000")
            server.wait_for("Student server listening on port 15000")
            sent = lab.run(pc, cpp["student_client"], gateway, "9000", address, "15000")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert f"{address}:15000" in sent.stdout
            server.wait_for("Connection accepted from instructor's server", timeout=15)
        deadline = time.monotonic() + 15  # both recorded: the log line follows the commit
        while len(reg.registrations()) < len(PCS):
            assert time.monotonic() < deadline, reg.out.lines[-10:]
            time.sleep(0.05)

        rows = json.loads(results(reg.db, "--format", "json"))
        assert [(r["student"], r["source"], r["attempts"], r["best_status"]) for r in rows] == [
            (None, "192.168.1.105", 1, "OK"),
            (None, "192.168.2.107", 1, "OK"),
        ]
        table = results(reg.db)
        assert "(no name) 192.168.1.105" in table and "(no name) 192.168.2.107" in table

        roster = tmp_path / "class.csv"
        roster.write_text("student,address\nbea,192.168.2.107\nali,192.168.1.105\ncem,\n")
        sheet = list(
            csv.reader(io.StringIO(results(reg.db, "--format", "csv", "--roster", str(roster))))
        )
        assert sheet[0][:3] == ["student", "source", "best_status"]
        assert [(r[0], r[1], r[2], r[5]) for r in sheet[1:]] == [
            ("bea", "", "OK", "1"),
            ("ali", "", "OK", "1"),
            ("cem", "", "", "0"),
        ]
