"""examples/attacks/attacks.py, run as root: every abuse on the naive registry and on ours.

One run of the whole demo (module fixture); each test checks one row of its
final table, both ways: the naive registry really did the harm (else the
demo proves nothing), and ours answered with the expected codes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from examples.netlab import lab_processes, run_cmd
from tests.netns import require_netns
from tests.support import ROOT, require_tool

pytestmark = pytest.mark.netns

ATTACKS = ROOT / "examples" / "attacks" / "attacks.py"


@pytest.fixture(scope="module")
def demo() -> tuple[subprocess.CompletedProcess[str], dict[str, tuple[str, str]]]:
    require_netns("discussion-atk")
    done = subprocess.run(
        [sys.executable, str(ATTACKS)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.stderr == "", done.stderr
    rows = {}
    for line in done.stdout.split("abuse ", 1)[1].splitlines()[2:]:
        abuse, naive, ours = (part.strip() for part in line.split(" | "))
        rows[abuse] = (naive, ours)
    return done, rows


def row(demo: tuple, abuse: str) -> tuple[str, str]:
    return demo[1][abuse]


def test_all_nine_abuses_are_in_the_table_and_nothing_is_left(demo: tuple) -> None:
    done, rows = demo
    assert len(rows) == 9, done.stdout
    tag = re.search(r"namespaces (cbl-discussion-atk-\d+)-\*", done.stdout)
    assert tag, done.stdout
    assert tag.group(1) not in run_cmd(["ip", "netns", "list"], check=False)
    assert lab_processes(tag.group(1)) == []
    held = all("[NOT HELD]" not in ours for _, ours in rows.values())
    assert done.returncode == (0 if held else 1), done.stdout


def test_reflection(demo: tuple) -> None:
    naive, ours = row(demo, "reflection onto a victim")
    assert naive == "connected to the victim (1 connection(s) seen there)"
    assert ours == "DENIED source_mismatch (victim saw 0)"


def test_internal_port_scan(demo: tuple) -> None:
    naive, ours = row(demo, "internal port scan + banners")
    assert naive.startswith("2 banner(s) grabbed")
    assert "SSH-2.0-OpenSSH_9.6 internal-admin" in demo[0].stdout
    assert ours == "DENIED address_not_allowed"


def test_cloud_metadata(demo: tuple) -> None:
    naive, ours = row(demo, "cloud metadata 169.254.169.254")
    assert naive == "leaked the credentials"
    assert ours == "DENIED address_not_allowed"
    assert "diagnosis=link_local_advertised" in demo[0].stdout


def test_alternative_ipv4_spellings(demo: tuple) -> None:
    naive, ours = row(demo, "alternative IPv4 spellings")
    assert naive == "4 of 4 reached 127.0.0.1"
    assert ours == "ERROR malformed"
    assert "uses hexadecimal ('0x7f')" in demo[0].stdout


def test_ipv4_mapped_ipv6(demo: tuple) -> None:
    naive, ours = row(demo, "IPv4-mapped IPv6")
    assert naive.startswith("2 of 2 reached")
    assert ours == "DENIED address_not_allowed"


def test_spoofed_udp_source(demo: tuple) -> None:
    naive, ours = row(demo, "spoofed UDP source")
    m = re.fullmatch(
        r"2 datagram\(s\), (\d+) bytes for a (\d+)-byte request, 1 callback\(s\)", naive
    )
    assert m and int(m.group(1)) > int(m.group(2)), naive
    m = re.fullmatch(r"COOKIE challenge only: (\d+) bytes, 0 callback\(s\)", ours)
    assert m and int(m.group(1)) <= 31, ours


def test_udp_reply_loop_is_bounded_by_ours(demo: tuple) -> None:
    naive, ours = row(demo, "UDP reply loop")
    assert int(naive.split()[0]) > 100, naive  # the naive pair really loops
    # Ours answers an unproven source at most unproven_per_source times (10 a
    # minute by default), and never a datagram that is itself a reply.
    count = int(ours.split()[0])
    assert count <= 10 and "[NOT HELD]" not in ours, ours


def test_slowloris(demo: tuple) -> None:
    naive, ours = row(demo, "slowloris")
    assert naive == "student: (no reply: timed out); slow ones: (still held open) x20"
    assert ours.startswith("student: OK connected; slow ones: "), ours
    slow = dict(
        (k.strip(), int(v))
        for k, v in (p.rsplit(" x", 1) for p in ours.split("slow ones: ")[1].split(", "))
    )
    assert set(slow) <= {"ERROR read_timeout", "BUSY rate_limited", "BUSY overloaded"}, slow
    assert sum(slow.values()) == 20


def test_registration_flood(demo: tuple) -> None:
    naive, ours = row(demo, "registration flood")
    assert naive == "60 connections made to the victim"
    assert ours.endswith("; victim saw 0"), ours
    tally = ours.rsplit(";", 1)[0]
    assert "DENIED source_mismatch" in tally and "OK" not in tally
    assert "BUSY rate_limited" in tally, tally


def test_without_root_it_says_so_and_exits_77() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    setpriv = require_tool("setpriv")
    done = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, str(ATTACKS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 77, done.stdout + done.stderr
    assert "needs root" in done.stderr


def test_the_unsafe_registry_refuses_to_run_outside_the_demo() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CBL_NETNS_LAB"}
    naive = ROOT / "examples" / "attacks" / "naive_registry.py"
    done = subprocess.run(
        [sys.executable, str(naive), "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode == 2 and "UNSAFE demo server" in done.stderr
