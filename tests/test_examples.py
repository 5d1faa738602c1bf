"""The examples/ scripts run, finish quickly, and still say what examples/README.md promises.

Each script runs as a child process with this interpreter, under a timeout;
the scripts use loopback only (01, 03) or no network at all (02).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import ROOT

EXAMPLES = ROOT / "examples"
TIMEOUT = 30.0


def run_example(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


def test_01_registry_sees_the_ephemeral_port_not_the_servers() -> None:
    out = run_example("01_why_advertise.py")
    m = re.search(
        r"The registry saw the client at 127\.0\.0\.1:(\d+): port \1 is the client's ephemeral "
        r"source port, not the server's listening port (\d+)\.",
        out,
    )
    assert m and m.group(1) != m.group(2), out
    assert "Calling back the advertised port: connected." in out
    assert "Calling back the observed port: connected." not in out
    assert "Connection accepted from instructor's server at 127.0.0.1:" in out
    assert "The student server received: CALLBACK" in out


def test_02_prints_every_nat_case_with_the_registrys_diagnosis() -> None:
    out = run_example("02_nat.py")
    for diagnosis in (
        "direct",
        "private_behind_nat",
        "cgnat",
        "container_nat",
        "loopback_advertised",
        "unspecified_advertised",
        "link_local_advertised",
        "family_mismatch",
        "different_host",
    ):
        assert f"diagnosis={diagnosis}\n" in out, diagnosis
    assert (
        "strict: DENIED source_mismatch   nat-observed: call back 203.0.113.7:15000 corrected=yes"
        in out
    )
    assert "advertise the router's PUBLIC address" in out and "port forward" in out


def test_03_naive_server_scans_and_the_real_policy_refuses_everything() -> None:
    out = run_example("03_open_redirect_abuse.py")
    scan = re.search(r"naive server: found open ports (.*): a port scan", out)
    assert scan and "fake-admin" in scan.group(1) and "fake-redis" in scan.group(1), out
    assert "said='-NOAUTH Authentication required.'" in out
    total = re.search(r"real policy: refused (\d+) of (\d+) requests; nothing was dialled\.", out)
    assert total and total.group(1) == total.group(2), out
    assert "would dial" not in out
    for line, verdict in [
        ("169.254.169.254:80", "DENIED address_not_allowed"),
        ("[64:ff9b::a9fe:a9fe]:8080", "DENIED address_not_allowed"),
        ("10.0.0.5:6379", "DENIED source_mismatch"),
        ("203.0.113.66:25", "DENIED port_not_allowed"),
        ("0x7f.0.0.1:15000", "ERROR malformed"),
        ("localhost:15000", "DENIED hostname_not_allowed"),
    ]:
        assert re.search(rf"^  {re.escape(line)} +{verdict}$", out, re.M), line


@pytest.mark.parametrize("name", ["01_why_advertise.py", "02_nat.py", "03_open_redirect_abuse.py"])
def test_example_is_documented(name: str) -> None:
    assert f"examples/{name}" in (EXAMPLES / "README.md").read_text()
