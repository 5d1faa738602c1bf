"""``student lab --explain``: the pure explanation, and the real executable end to end."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from student.explain import LabTrace, explain_lines
from tests.support import exe, run_registry

BASE = LabTrace(
    listening=["[::]:15000", "0.0.0.0:15000"],
    port_asked=15000,
    client_local="10.0.0.5:41000",
    registry="10.0.0.1:9000",
    sent="10.0.0.5:15000 student=alice",
    observed="10.0.0.5:41000",
    target="10.0.0.5:15000",
    callback_peer="10.0.0.1:52000",
    callback_local="10.0.0.5:15000",
    verdict="OK connected",
)


def text(**changes: object) -> str:
    fields = {**{f: getattr(BASE, f) for f in BASE.__dataclass_fields__}, **changes}
    return "\n".join(explain_lines(LabTrace(**fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "present", "absent"),
    [
        (
            {},
            [
                "     10.0.0.5:41000  ->  10.0.0.1:9000",
                "port 41000: ephemeral, chosen by YOUR kernel",
                "port 9000: the registry's, chosen by the instructor",
                "     10.0.0.1:52000  ->  10.0.0.5:15000",
                "port 52000: ephemeral, chosen by the REGISTRY's kernel",
                "port 15000: chosen by you (--port)",
                "Why the registry could not have guessed port 15000",
                "whose source port 41000 is a throw-away port",
            ],
            ["rewrote the source", "a forward in between", "none arrived"],
        ),
        (
            {"observed": "198.51.100.2:41000", "target": "198.51.100.2:15000"},
            [
                "the registry saw it come from 198.51.100.2:41000 (observed=)",
                "That is not 10.0.0.5:41000: something between you",
                "The registry dialled 198.51.100.2:15000; a forward in between delivered it "
                "to 10.0.0.5:15000",
            ],
            [],
        ),
        (
            {"callback_peer": None, "callback_local": None, "verdict": "DENIED source_mismatch"},
            ["3. Callback connection: registry -> your server", "none arrived here (DENIED"],
            ["chosen by the REGISTRY's kernel"],
        ),
        (
            {"port_asked": 0, "listening": ["0.0.0.0:38211"]},
            ["port 38211: chosen by the kernel (you asked for --port 0)"],
            ["chosen by you"],
        ),
        (
            {"udp": True},
            ["(UDP)", "2. Registration datagrams: client -> registry"],
            ["(TCP)"],
        ),
        (
            {"udp": True, "callback_local": "0.0.0.0:15000", "target": "10.0.0.5:15000"},
            ["     10.0.0.1:52000  ->  10.0.0.5:15000"],
            ["a forward in between", "0.0.0.0:15000  "],
        ),
        (
            {"client_local": None, "observed": None, "sent": None},
            ["     ?  ->  10.0.0.1:9000"],
            ["your client sent:", "(observed=)"],
        ),
    ],
)
def test_explanation(changes: dict, present: list[str], absent: list[str]) -> None:
    out = text(**changes)
    for needle in present:
        assert needle in out, (needle, out)
    for needle in absent:
        assert needle not in out, (needle, out)


def student_lab(reg_port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe("student"), "lab", "--registry", f"127.0.0.1:{reg_port}", "--port", "0", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_lab_explain_end_to_end_names_the_ports_the_timeline_saw(tmp_path: Path) -> None:
    with run_registry(tmp_path) as reg:
        done = student_lab(reg.port, "--explain")
        plain = student_lab(reg.port)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    client = re.search(
        rf"connected to registry 127\.0\.0\.1:{reg.port} from 127\.0\.0\.1:(\d+)", out
    )
    listen = re.search(r"listening on \[::\]:(\d+)", out)
    callback = re.search(r"accepted callback from 127\.0\.0\.1:(\d+)", out)
    assert client and listen and callback, out
    eph, server, reg_eph = client.group(1), listen.group(1), callback.group(1)
    assert f"     127.0.0.1:{eph}  ->  127.0.0.1:{reg.port}" in out
    assert f"the registry saw it come from 127.0.0.1:{eph} (observed=)" in out
    assert f"     127.0.0.1:{reg_eph}  ->  127.0.0.1:{server}" in out
    assert f"port {server}: chosen by the kernel (you asked for --port 0)" in out
    assert f"Why the registry could not have guessed port {server}" in out
    assert "rewrote the source" not in out
    assert plain.returncode == 0 and "Why the registry" not in plain.stdout


def test_lab_explain_when_denied_says_no_callback_arrived(tmp_path: Path) -> None:
    with run_registry(tmp_path) as reg:
        done = student_lab(reg.port, "--explain", "--advertise", "192.0.2.7")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "none arrived here (DENIED source_mismatch)" in done.stdout
    assert "Why the registry could not have guessed port" in done.stdout


def test_explain_is_only_a_lab_option() -> None:
    done = subprocess.run(
        [exe("student"), "client", "--registry", "127.0.0.1:9", "--explain"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 64 and "--explain" in done.stderr


def test_lab_explain_over_udp_names_the_datagrams(tmp_path: Path) -> None:
    with run_registry(tmp_path) as reg:
        done = student_lab(reg.port, "--explain", "--udp")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "2. Registration datagrams: client -> registry" in out
    callback = re.search(r"received a callback datagram from 127\.0\.0\.1:(\d+)", out)
    listen = re.search(r"listening on \S+:(\d+)", out)
    assert callback and listen, out
    assert f"     127.0.0.1:{callback.group(1)}  ->  127.0.0.1:{listen.group(1)}" in out
    assert "a forward in between" not in out
