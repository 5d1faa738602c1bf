"""examples/nat-lab/natlab.py, run as the instructor runs it: as root, real namespaces,
the real ``registry`` and ``student`` executables, tcpdump on the routers.

Each run is a child process; the tests assert the replies and key lines it
printed, the handshakes in the pcap files it wrote, and that no namespace or
process of it is left afterwards (also after Ctrl-C).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from examples.netlab import lab_processes, run_cmd
from examples.pcapread import handshakes, read
from tests.netns import require_netns
from tests.support import ROOT, require_tool

pytestmark = pytest.mark.netns

NATLAB = ROOT / "examples" / "nat-lab" / "natlab.py"
REGISTRY, ROUTER, HOME = "198.51.100.1", "198.51.100.2", "192.168.77.10"


def natlab(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(NATLAB), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lab_tag(out: str) -> str:
    m = re.search(r"namespaces (cbl-discussion-nat-\d+)-\*", out)
    assert m, out
    return m.group(1)


def assert_nothing_left(tag: str) -> None:
    names = run_cmd(["ip", "netns", "list"], check=False)
    assert tag not in names, names
    assert lab_processes(tag) == []


def reply(out: str, case: str) -> list[str]:
    """The registry replies printed under ``== case NAME``."""
    part = out.split(f"== case {case}:", 1)[1].split("\n== case ", 1)[0]
    return [line.split("registry: ", 1)[1] for line in part.splitlines() if "registry: " in line]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path | None]:
    """One run of every case; with --pcap when tcpdump is here (.ci/run installs it)."""
    require_netns("discussion-nat")
    pcaps = tmp_path_factory.mktemp("pcap") if shutil.which("tcpdump") else None
    done = natlab(*(("--pcap", str(pcaps)) if pcaps else ()))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, pcaps


def captured(full_run: tuple[str, Path | None]) -> Path:
    if full_run[1] is None:
        pytest.skip("tcpdump not installed: the capture was not taken (.ci/run installs it)")
    return full_run[1]


def test_every_case_answers_with_its_code(full_run: tuple[str, Path]) -> None:
    out, _ = full_run
    want = {
        "lan": [r"OK connected .*diagnosis=direct"],
        "home": [
            r"DENIED source_mismatch .*observed=198\.51\.100\.2:\d+ diagnosis=private_behind_nat"
        ],
        "forward": [r"OK connected .*target=198\.51\.100\.2:15100 .*diagnosis=direct"],
        "observed": [r"OK connected .*diagnosis=private_behind_nat .*corrected=yes"],
        "cgnat": [
            r"DENIED source_mismatch .*diagnosis=cgnat",
            r"FAILED connection_refused .*target=203\.0\.113\.2:15000",
        ],
        "container": [
            r"DENIED source_mismatch .*diagnosis=container_nat",
            r"OK connected .*target=10\.77\.0\.20:15200",
        ],
    }
    for case, patterns in want.items():
        got = reply(out, case)
        assert len(got) == len(patterns), (case, got)
        for line, pattern in zip(got, patterns, strict=True):
            assert re.match(pattern, line), (case, line)
    assert "Forward port 15000 on the router to 192.168.77.10:15000" in out
    assert "Impossible from outside." in out
    assert "All 6 case(s) answered as narrated." in out
    assert_nothing_left(lab_tag(out))


def test_capture_shows_the_registrys_syn_to_the_public_address_and_the_forward(
    full_run: tuple[str, Path],
) -> None:
    pcaps = captured(full_run)
    wan = handshakes(read(pcaps / "forward-router-wan.pcap"))
    lan = handshakes(read(pcaps / "forward-router-lan.pcap"))
    to_public = [s for s in wan if s.kind == "SYN" and (s.dst, s.dport) == (ROUTER, 15100)]
    assert len(to_public) == 1 and to_public[0].src == REGISTRY, wan
    # The router rewrote only the destination: same source address and port inside.
    forwarded = [s for s in lan if s.kind == "SYN" and s.dport == 15100]
    assert [(s.src, s.sport, s.dst) for s in forwarded] == [(REGISTRY, to_public[0].sport, HOME)], (
        lan
    )
    # The registration went out masqueraded: the home address inside, the router's outside.
    assert any(s.kind == "SYN" and s.src == HOME and s.dport == 9000 for s in lan)
    assert any(s.kind == "SYN" and s.src == ROUTER and s.dport == 9000 for s in wan)
    # ... and the narration says so, from the same capture.
    port = to_public[0].sport
    assert (
        f"callback: {REGISTRY}:{port} > {ROUTER}:15100  became  {REGISTRY}:{port} > "
        f"{HOME}:15100: destination rewritten (the forward)"
    ) in full_run[0]


def test_capture_of_a_denied_case_holds_no_callback(full_run: tuple[str, Path]) -> None:
    out, pcaps = full_run[0], captured(full_run)
    wan = handshakes(read(pcaps / "home-router-wan.pcap"))
    assert [s.dport for s in wan if s.kind == "SYN"] == [9000], wan
    assert "(registration: client -> registry)" in out
    assert "(callback: registry -> server)" in out


def test_cgnat_capture_shows_the_refusal_at_the_carrier(full_run: tuple[str, Path]) -> None:
    pcaps = captured(full_run)
    wan = handshakes(read(pcaps / "cgnat-carrier-wan.pcap"))
    sub = handshakes(read(pcaps / "cgnat-carrier-sub.pcap"))
    assert any(s.kind == "SYN" and s.dst == "203.0.113.2" and s.dport == 15000 for s in wan)
    assert any(s.kind == "RST" and s.src == "203.0.113.2" and s.sport == 15000 for s in wan)
    # The carrier's own refusal: the call never reached the customer's side.
    assert not any(s.dport == 15000 for s in sub), sub
    assert re.search(
        r"callback: 203\.0\.113\.1:\d+ > 203\.0\.113\.2:15000  did not pass the router: "
        r"answered with RST",
        full_run[0],
    )


def test_step_waits_for_enter_from_piped_input() -> None:
    require_netns("discussion-nat")
    done = natlab("--step", "--case", "lan", stdin="\n")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.index("[Enter: same LAN: direct]") < out.index("== case lan:")
    assert "== case home:" not in out
    assert_nothing_left(lab_tag(out))


def test_ctrl_c_at_a_step_removes_everything_and_exits_130() -> None:
    require_netns("discussion-nat")
    proc = subprocess.Popen(
        [sys.executable, str(NATLAB), "--step"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while "[Enter: " not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096).decode()
                assert chunk, seen
                seen += chunk
        proc.send_signal(signal.SIGINT)  # what Ctrl-C at the terminal delivers
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = seen + rest
    assert proc.returncode == 130, out + err
    assert "interrupted; every namespace and process it made is removed" in out
    assert "== case" not in out
    assert_nothing_left(lab_tag(out))


def test_without_root_it_says_so_and_exits_77() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    setpriv = require_tool("setpriv")
    done = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, str(NATLAB)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 77, done.stdout + done.stderr
    assert "needs root" in done.stderr and "run it as root" in done.stderr
