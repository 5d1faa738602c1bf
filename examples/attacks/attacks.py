"""Each abuse of a callback server, run twice: on a naive one (UNSAFE) and on ours.

Builds namespaces it creates and removes (root needed), runs the real
``registry serve`` and ``naive_registry.py`` (a deliberately unsafe registry,
bound only inside the demo namespace) side by side on the same host, attacks
both the same way, and ends with a table: what the naive one did, what ours
answered (codes).

    sudo .venv/bin/python examples/attacks/attacks.py [--case NAME] [--step]

Topology (no namespace is connected to this host's network)::

    attacker 10.88.0.66 (.67) ---- 10.88.0.1  target  10.99.0.1 ---- 10.99.0.77 victim
    student  10.88.1.20 ---------- 10.88.1.1  (no forwarding)        tcp 8080, udp 8081
                                   naive registry (UNSAFE) 10.88.0.1:7000 tcp+udp
                                   ours                    10.88.0.1:9000 tcp+udp
                                   lo: 127.0.0.1:2222 ssh, :6379 redis,
                                       169.254.169.254:80 "cloud metadata"

The attacker cannot reach the victim or the target's lo itself; only a
callback server can. Forged-source datagrams are sent from inside the target
namespace, so they travel over its lo only.

Exit status: 0 ours refused every abuse, 1 it did not, 77 not root or no
namespaces here, 130 interrupted (everything removed first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from netlab import NetnsLab, Output, exe, netns_lab, netns_unavailable  # noqa: E402

EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 77, 130
TARGET, ATTACKER, BOT, VICTIM, STUDENT = (
    "10.88.0.1",
    "10.88.0.66",
    "10.88.0.67",
    "10.99.0.77",
    "10.88.1.20",
)
NAIVE, OURS = f"{TARGET}:7000", f"{TARGET}:9000"
TOOLS = str(HERE / "tools.py")


@dataclass
class Row:
    abuse: str
    naive: str
    ours: str
    held: bool  # ours refused it (the naive one's harm did not happen)


class Demo:
    def __init__(self, lab: NetnsLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.rows: list[Row] = []
        self.victim: Output | None = None

    def build(self) -> None:
        lab = self.lab
        for role in ("target", "attacker", "victim", "student"):
            lab.add(role)
        lab.link("target", "atk", f"{TARGET}/24", "attacker", "eth0", f"{ATTACKER}/24")
        lab.ip("attacker", "addr", "add", f"{BOT}/24", "dev", "eth0")
        lab.link("target", "vic", "10.99.0.1/24", "victim", "eth0", f"{VICTIM}/24")
        lab.link("target", "stu", "10.88.1.1/24", "student", "eth0", f"{STUDENT}/24")
        lab.ip("target", "addr", "add", "169.254.169.254/32", "dev", "lo")
        lab.route_default("attacker", TARGET)
        lab.route_default("victim", "10.99.0.1")
        lab.route_default("student", "10.88.1.1")
        self.tool("target", "services", "--for", "600").wait_for("services listening")
        self.victim = self.tool("victim", "victim", "--for", "600")
        self.victim.wait_for("victim listening")
        naive = self.lab.spawn("target", sys.executable, str(HERE / "naive_registry.py"), NAIVE)
        naive.wait_for("UNSAFE naive registry listening")
        ours = self.lab.registry("target", self.tmp, OURS)
        ours.out.wait_for('"event": "listening"', timeout=20)

    def tool(self, role: str, *args: str) -> Output:
        return self.lab.spawn(role, sys.executable, TOOLS, *args)

    def run_tool(self, role: str, *args: str, timeout: float = 60) -> list[str]:
        done = self.lab.run(role, sys.executable, TOOLS, *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"tools.py {' '.join(args)} failed: {done.stderr}")
        return done.stdout.splitlines()

    def send(self, where: str, *lines: str) -> list[str]:
        """The replies to each line, sent from the attacker."""
        got = self.run_tool("attacker", "send", where, *lines)
        for line in got:
            print(f"    {line}")
        return [line.split(" -> ", 1)[1] for line in got]

    def victim_lines(self) -> int:
        assert self.victim is not None
        return len(self.victim.lines)

    def victim_since(self, mark: int) -> list[str]:
        assert self.victim is not None
        time.sleep(0.3)  # let the victim print what reached it (its own process)
        return self.victim.lines[mark:]

    def row(self, abuse: str, naive: str, ours: str, held: bool) -> None:
        self.rows.append(Row(abuse, naive, ours, held))
        print(f"  naive (UNSAFE): {naive}")
        print(f"  ours:           {ours}{'' if held else '   <-- NOT HELD'}")


def codes(replies: list[str]) -> str:
    return ", ".join(sorted({" ".join(r.split()[:2]) for r in replies}))


def refused(replies: list[str], *allowed: str) -> bool:
    return all(any(r.startswith(a + " ") for a in allowed) for r in replies)


def case_reflection(d: Demo) -> None:
    print(f"The attacker asks for a callback to a third party, the victim {VICTIM}:8080.")
    for where in (NAIVE, OURS):
        mark = d.victim_lines()
        print(f"  -> {where}")
        replies = d.send(where, f"{VICTIM}:8080")
        hit = [x for x in d.victim_since(mark) if x.startswith("victim tcp")]
        if where == NAIVE:
            naive = f"connected to the victim ({len(hit)} connection(s) seen there)"
        else:
            ours = f"{codes(replies)} (victim saw {len(hit)})"
            d.row("reflection onto a victim", naive, ours, refused(replies, "DENIED") and not hit)


SCAN = ["127.0.0.1:2222", "127.0.0.1:6379", "127.0.0.1:2223"]


def banners(replies: list[str]) -> int:
    return sum("banner:" in r for r in replies)


def case_scan(d: Demo) -> None:
    print("The attacker scans the target's own loopback through the callback server.")
    print("From outside it cannot reach 127.0.0.1 there; the callback server can.")
    print("  -> naive")
    naive = d.send(NAIVE, *SCAN)
    print("  -> ours")
    ours = d.send(OURS, *SCAN)
    d.row(
        "internal port scan + banners",
        f"{banners(naive)} banner(s) grabbed, closed port told apart",
        codes(ours),
        refused(ours, "DENIED", "ERROR"),
    )


def case_metadata(d: Demo) -> None:
    print("The cloud metadata address 169.254.169.254 (on the target's lo here).")
    naive = d.send(NAIVE, "169.254.169.254:80")
    ours = d.send(OURS, "169.254.169.254:80")
    leaked = "AccessKeyId" in naive[0]
    d.row(
        "cloud metadata 169.254.169.254",
        "leaked the credentials" if leaked else naive[0][:50],
        codes(ours),
        refused(ours, "DENIED", "ERROR"),
    )


SPELLINGS = ["0x7f.0.0.1:2222", "2130706433:2222", "127.1:6379", "0177.0.0.1:2222"]


def case_spellings(d: Demo) -> None:
    print("Other spellings of 127.0.0.1 (hex, one integer, short form, octal).")
    naive = d.send(NAIVE, *SPELLINGS)
    ours = d.send(OURS, *SPELLINGS)
    d.row(
        "alternative IPv4 spellings",
        f"{banners(naive)} of {len(SPELLINGS)} reached 127.0.0.1",
        codes(ours),
        refused(ours, "ERROR", "DENIED"),
    )


MAPPED = ["[::ffff:127.0.0.1]:2222", "[::ffff:a9fe:a9fe]:80"]


def case_mapped(d: Demo) -> None:
    print("IPv4-mapped IPv6: ::ffff:127.0.0.1 and ::ffff:169.254.169.254 in hex.")
    naive = d.send(NAIVE, *MAPPED)
    ours = d.send(OURS, *MAPPED)
    reached = sum(r.startswith("OK") for r in naive)
    d.row(
        "IPv4-mapped IPv6",
        f"{reached} of {len(MAPPED)} reached (ssh banner, metadata)",
        codes(ours),
        refused(ours, "DENIED", "ERROR"),
    )


def case_spoof(d: Demo) -> None:
    print(f"A UDP request whose source is forged to be the victim {VICTIM}:8081")
    print("(sent over the target's lo): who gets what?")
    request = f"{VICTIM}:8081 student=mallory"
    result = {}
    for where in (NAIVE, OURS):
        mark = d.victim_lines()
        d.run_tool("target", "spoof", f"{VICTIM}:8081", where, request)
        got = [x for x in d.victim_since(mark) if x.startswith("victim udp")]
        for line in got:
            print(f"    {line}")
        total = sum(int(x.split(" bytes")[0].rsplit(" ", 1)[1]) for x in got)
        calls = sum("CALLBACK" in x for x in got)
        result[where] = (len(got), total, calls, got)
    n, total, calls, _ = result[NAIVE]
    naive = f"{n} datagram(s), {total} bytes for a {len(request)}-byte request, {calls} callback(s)"
    n, total, calls, got = result[OURS]
    first = got[0].split(": ", 1)[1][2:].split()[0] if got else "nothing"
    ours = f"{first} challenge only: {total} bytes, {calls} callback(s)"
    d.row("spoofed UDP source", naive, ours, calls == 0 and total <= len(request))


LOOP_SECONDS = 2.0


def case_loop(d: Demo) -> None:
    print(f"Another naive UDP server on {VICTIM}:7001 answers everything. One forged")
    print("datagram 'from' it to the registry: do the two servers answer each other forever?")
    counts = {}
    for where in (NAIVE, OURS):
        echo = d.tool("victim", "echo", f"{VICTIM}:7001", "--for", str(LOOP_SECONDS))
        echo.wait_for("echo listening")
        # Long enough that an error reply fits in it (no reply is larger than its request).
        d.run_tool("target", "spoof", f"{VICTIM}:7001", where, "hello" + " there" * 40)
        line = echo.wait_for("echo answered", timeout=LOOP_SECONDS + 10)
        counts[where] = int(line.split()[2])
        print(f"    -> {where}: the other server answered {counts[where]} datagrams")
    d.row(
        "UDP reply loop",
        f"{counts[NAIVE]} datagrams in {LOOP_SECONDS:g} s, until stopped",
        f"{counts[OURS]} datagrams in {LOOP_SECONDS:g} s",
        counts[OURS] <= 10,  # unproven_per_source: 10 a minute by default
    )


def case_slowloris(d: Demo) -> None:
    print("20 connections that trickle a request one byte per 0.1 s, never finishing it;")
    print("meanwhile a student registers. Both servers are attacked at once.")
    server = d.lab.spawn(
        "student", exe("student"), "server", "--port", "15000", "--count", "2", "--timeout", "30"
    )
    server.wait_for("listening")
    slow = {w: d.tool("attacker", "slowloris", w, "20", "6") for w in (NAIVE, OURS)}
    for out in slow.values():
        out.wait_for("connections open")
    got = d.lab.run("student", sys.executable, TOOLS, "send", NAIVE, f"{STUDENT}:15000")
    n_student = got.stdout.strip().split(" -> ", 1)[-1]
    cmd = ["client", "--registry", OURS, "--advertise", STUDENT, "--timeout", "10"]
    got = d.lab.run("student", exe("student"), *cmd)
    o_student = next((x for x in got.stdout.splitlines() if x[:2] in ("OK", "DE", "FA", "BU")), "")
    n_slow, o_slow = (
        slow[w].wait_for("slowloris result: ", timeout=30).split(": ", 1)[1] for w in (NAIVE, OURS)
    )
    for who, student, slow in (("naive", n_student, n_slow), ("ours", o_student, o_slow)):
        print(f"    {who}: student got {student[:60]!r}; slow connections: {slow}")
    d.row(
        "slowloris",
        f"student: {n_student[:30]}; slow ones: {n_slow}",
        f"student: {' '.join(o_student.split()[:2])}; slow ones: {o_slow}",
        o_student.startswith("OK ") and "still held open" not in o_slow,
    )


def case_flood(d: Demo) -> None:
    print(f"60 registrations from {BOT}, 10 at a time, all naming the victim {VICTIM}:8080.")
    result = {}
    for where in (NAIVE, OURS):
        mark = d.victim_lines()
        line = d.run_tool("attacker", "flood", where, f"{VICTIM}:8080", "60", "--from", BOT)[0]
        hits = sum(x.startswith("victim tcp") for x in d.victim_since(mark))
        print(f"    -> {where}: {line}; the victim got {hits} connection(s)")
        result[where] = (line.split(": ", 1)[1], hits)
    if "timed out" in result[OURS][0]:
        print("    (timed out: ours banned the source, and the kernel now drops its SYNs)")
    d.row(
        "registration flood",
        f"{result[NAIVE][1]} connections made to the victim",
        f"{result[OURS][0]}; victim saw {result[OURS][1]}",
        result[OURS][1] == 0 and "OK" not in result[OURS][0],
    )


CASES: dict[str, tuple[str, Callable[[Demo], None]]] = {
    "reflection": ("reflection onto a victim", case_reflection),
    "scan": ("internal port scan with banner grabbing", case_scan),
    "metadata": ("the cloud metadata address", case_metadata),
    "spellings": ("alternative IPv4 spellings", case_spellings),
    "mapped": ("IPv4-mapped IPv6", case_mapped),
    "spoof": ("a spoofed UDP source", case_spoof),
    "loop": ("a UDP reply loop between two servers", case_loop),
    "slowloris": ("slowloris", case_slowloris),
    "flood": ("a registration flood", case_flood),
}


def table(rows: list[Row]) -> list[str]:
    widths = [max(len(r.abuse) for r in rows), max(len(r.naive) for r in rows)]
    head = f"{'abuse':<{widths[0]}} | {'naive registry (UNSAFE) did':<{widths[1]}} | ours answered"
    out = [head, "-" * len(head)]
    for r in rows:
        mark = "" if r.held else "  [NOT HELD]"
        out.append(f"{r.abuse:<{widths[0]}} | {r.naive:<{widths[1]}} | {r.ours}{mark}")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=list(CASES), help="run only this case")
    p.add_argument("--step", action="store_true", help="wait for Enter before each case")
    args = p.parse_args(argv)
    why = netns_unavailable("discussion-atk")
    if why is not None:
        print(f"attacks: {why}; run it as root (sudo) on Linux with ip", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        with tempfile.TemporaryDirectory() as tmp, netns_lab("discussion-atk") as lab:
            d = Demo(lab, Path(tmp))
            d.build()
            print(f"attack demo up: namespaces {lab.tag}-*")
            for name in [args.case] if args.case else list(CASES):
                title, run = CASES[name]
                if args.step:
                    print(f"[Enter: {title}] ", end="", flush=True)
                    sys.stdin.readline()
                print(f"\n== {name}: {title} ==", flush=True)
                run(d)
    except KeyboardInterrupt:
        print("\nattacks: interrupted; every namespace and process it made is removed")
        return EXIT_INTERRUPTED
    print()
    for line in table(d.rows):
        print(line)
    return 0 if all(r.held for r in d.rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
