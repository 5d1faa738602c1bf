"""The lab's NAT question on a real network a class can watch (root needed).

Builds, in network namespaces it creates and removes, a classroom LAN, a home
router that masquerades (nft), a port forward, a container bridge and a
carrier-grade NAT (two levels of NAT); runs the real ``registry serve`` and
the real ``student server`` / ``student client`` in them, and narrates each
case with the replies they really printed.

    sudo .venv/bin/python examples/nat-lab/natlab.py [--step] [--case NAME] [--pcap DIR]

``--step`` waits for Enter before each case, ``--case`` runs one case (see
``--help``), ``--pcap DIR`` runs tcpdump on both sides of the case's router
and prints the handshakes seen on each side. Topology (no namespace is
connected to this host's network; every address exists only inside)::

   home 192.168.77.10 --lan-- router --wan 198.51.100.2 ---- 198.51.100.1 registry
                              masquerade, forward 15100 -> home      :9000 strict
   cghost 192.168.88.10 --lan-- cpe --wan 100.64.0.2 -- carrier --   :9001 nat-observed
                                masquerade   masquerade 203.0.113.2 -- 203.0.113.1
   ct 172.17.0.2 --docker0-- class 10.77.0.20 ---- classroom LAN ---- 10.77.0.1
                             masquerade, publish 15200 -> ct

Exit status: 0 every case answered as narrated, 1 a case did not, 77 not
root or no namespaces here, 130 interrupted (everything removed first).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netlab import NetnsLab, Output, exe, netns_lab, netns_unavailable  # noqa: E402
from pcapread import Segment, handshakes, read  # noqa: E402

EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 77, 130
REGISTRY, ROUTER, REGISTRY2, CARRIER = "198.51.100.1", "198.51.100.2", "203.0.113.1", "203.0.113.2"
REGISTRY_LAN, CLASS, HOME, CGHOST = "10.77.0.1", "10.77.0.20", "192.168.77.10", "192.168.88.10"
CPE_WAN, CONTAINER = "100.64.0.2", "172.17.0.2"
STRICT, OBSERVED, FORWARDED, PUBLISHED = 9000, 9001, 15100, 15200

MASQUERADE = """
table ip nat {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    {dnat}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{out}" masquerade
  }}
}}
"""


def build(lab: NetnsLab) -> None:
    for role in ("registry", "router", "home", "carrier", "cpe", "cghost", "class", "ct"):
        lab.add(role)
    lab.link("registry", "pub", f"{REGISTRY}/24", "router", "wan", f"{ROUTER}/24")
    lab.link("router", "lan", "192.168.77.1/24", "home", "eth0", f"{HOME}/24")
    lab.link("registry", "pub2", f"{REGISTRY2}/24", "carrier", "wan", f"{CARRIER}/24")
    lab.link("carrier", "sub", "100.64.0.1/10", "cpe", "wan", f"{CPE_WAN}/10")
    lab.link("cpe", "lan", "192.168.88.1/24", "cghost", "eth0", f"{CGHOST}/24")
    lab.link("registry", "cls", f"{REGISTRY_LAN}/24", "class", "eth0", f"{CLASS}/24")
    lab.link("class", "docker0", "172.17.0.1/16", "ct", "eth0", f"{CONTAINER}/16")
    for role, via in (
        ("home", "192.168.77.1"),
        ("cpe", "100.64.0.1"),
        ("cghost", "192.168.88.1"),
        ("ct", "172.17.0.1"),
    ):
        lab.route_default(role, via)
    for router in ("router", "carrier", "cpe", "class"):
        lab.forward(router)
    fwd = f'iifname "wan" tcp dport {FORWARDED} dnat to {HOME}:{FORWARDED}'
    lab.nft("router", MASQUERADE.format(dnat=fwd, out="wan"))
    lab.nft("carrier", MASQUERADE.format(dnat="", out="wan"))
    # The student did forward 15000 on their own router: it does not help under CGNAT.
    cpe_fwd = f'iifname "wan" tcp dport 15000 dnat to {CGHOST}:15000'
    lab.nft("cpe", MASQUERADE.format(dnat=cpe_fwd, out="wan"))
    lab.nft("class", MASQUERADE.format(dnat="", out="eth0"))


@dataclass
class Attempt:
    """What one ``student server`` + ``student client`` run printed, and its status."""

    command: str
    reply: str
    status: int
    called_from: str | None

    def field(self, key: str) -> str | None:
        for token in self.reply.split():
            k, sep, v = token.partition("=")
            if sep and k == key:
                return v
        return None

    @property
    def explanation(self) -> str:
        words = self.reply.split()
        return " ".join(w for w in words[2:] if "=" not in w)


class Narrator:
    def __init__(self, lab: NetnsLab, out: Callable[[str], None], pcap: Path | None) -> None:
        self.lab, self.out, self.pcap = lab, out, pcap
        self.failures: list[str] = []

    def say(self, text: str = "") -> None:
        self.out(text)

    def attempt(self, where: str, port: int, registry: str, advertise: str) -> Attempt:
        server = self.lab.spawn(
            where, exe("student"), "server", "--port", str(port), "--count", "1", "--timeout", "8"
        )
        server.wait_for("Student server listening on port", timeout=15)
        command = f"student client --registry {registry} --port {port} --advertise {advertise}"
        self.say(f"  [{where}]$ student server --port {port}")
        self.say(f"  [{where}]$ {command}")
        done = self.lab.run(where, *[exe("student"), *command.split()[1:]], "--timeout", "10")
        reply = next(
            (
                x
                for x in done.stdout.splitlines()
                if x.split(" ", 1)[0] in ("OK", "DENIED", "FAILED", "BUSY", "ERROR")
            ),
            "(no reply) " + (done.stdout + done.stderr).strip(),
        )
        self.say(f"  registry: {reply}")
        called = None
        if reply.startswith("OK "):
            line = server.wait_for("Connection accepted from instructor's server at", 10)
            called = line.rsplit(" at ", 1)[1]
            self.say(f"  [{where}] student server: {line}")
        else:
            if server.proc.poll() is None:
                server.proc.terminate()
            server.finish()
            self.say(f"  [{where}] student server: no callback arrived")
        self.say(f"  student client exit status {done.returncode}")
        return Attempt(command, reply, done.returncode, called)

    def expect(self, a: Attempt, status: str, code: str, **fields: str) -> None:
        wrong = [] if a.reply.startswith(f"{status} {code} ") else [f"{status} {code}"]
        wrong += [f"{k}={v}" for k, v in fields.items() if a.field(k) != v]
        if wrong:
            self.failures.append(f"{a.command}: expected {', '.join(wrong)}; got {a.reply}")
            self.say(f"  UNEXPECTED: expected {', '.join(wrong)}")


class Capture:
    """tcpdump on both sides of a router while a case runs; prints the handshakes."""

    def __init__(self, n: Narrator, case: str, router: str, sides: tuple[str, ...]) -> None:
        self.n, self.case, self.router, self.sides = n, case, router, sides
        self.running: list[tuple[str, Path, Output]] = []

    def __enter__(self) -> Capture:
        if self.n.pcap is None:
            return self
        for dev in self.sides:
            path = self.n.pcap / f"{self.case}-{self.router}-{dev}.pcap"
            out = self.n.lab.spawn(
                self.router,
                "tcpdump",
                "-n",
                "-U",
                "--immediate-mode",
                "-i",
                dev,
                "-w",
                str(path),
                "tcp",
            )
            out.wait_for("listening on", timeout=10)
            self.running.append((dev, path, out))
        return self

    def __exit__(self, *exc: object) -> None:
        for _, _, out in self.running:
            out.proc.terminate()
            out.finish()
        if exc[0] is not None or not self.running:
            return
        self.n.say(f"  capture on {self.router} (tcpdump -i ... -w):")
        seen = []
        for dev, path, _ in self.running:
            self.n.say(f"    {self.router} {dev} side, {path}:")
            seen.append(handshakes(read(path)))
            for seg in seen[-1]:
                self.n.say(f"      {seg.render():<62} {role(seg)}")
        if len(seen) == 2:
            self.n.say(f"  what {self.router} did to each connection's SYN:")
            for line in crossing(*seen):
                self.n.say(f"    {line}")


def role(seg: Segment) -> str:
    """Which of the lab's connections a handshake segment belongs to."""
    registration = {seg.sport, seg.dport} & {STRICT, OBSERVED}
    what = "registration" if registration else "callback"
    if seg.kind == "SYN":
        return f"({what}: {'client -> registry' if registration else 'registry -> server'})"
    return f"({what}: {'refused' if seg.kind == 'RST' else 'answer'})"


def _ends(seg: Segment) -> str:
    return seg.render().split(None, 2)[2]


def crossing(inside: list[Segment], outside: list[Segment]) -> list[str]:
    """How each connection's SYN looked on both sides of a router (paired in order)."""
    syns = [[x for x in side if x.kind == "SYN"] for side in (inside, outside)]
    lines = []
    for kind, direction in (("registration", 0), ("callback", 1)):
        pick = [[x for x in side if role(x).startswith(f"({kind}")] for side in syns]
        first, then = (pick[0], pick[1]) if direction == 0 else (pick[1], pick[0])
        for i, a in enumerate(first):
            if i >= len(then):
                refused = any(
                    x.kind == "RST" and (x.src, x.sport) == (a.dst, a.dport)
                    for x in (outside if direction else inside)
                )
                ending = "answered with RST" if refused else "went no further"
                lines.append(f"{kind}: {_ends(a)}  did not pass the router: {ending}")
                continue
            b = then[i]
            what = []
            if (a.src, a.sport) != (b.src, b.sport):
                what.append("source rewritten (masquerade)")
            if (a.dst, a.dport) != (b.dst, b.dport):
                what.append("destination rewritten (the forward)")
            lines.append(
                f"{kind}: {_ends(a)}  became  {_ends(b)}: {', '.join(what) or 'unchanged'}"
            )
    return lines


def case_lan(n: Narrator) -> None:
    n.say(f"A student machine {CLASS} on the classroom LAN, the registry's own subnet.")
    with Capture(n, "lan", "class", ("eth0",)):
        a = n.attempt("class", 15000, f"{REGISTRY_LAN}:{STRICT}", CLASS)
    n.expect(a, "OK", "connected", diagnosis="direct", target=f"{CLASS}:15000")
    n.say(
        "Why: the address the client advertised is the one its connection came from, "
        "so the registry can call it back directly; no NAT in between."
    )


def case_home(n: Narrator) -> None:
    n.say(f"The student's laptop {HOME} is at home, behind a router that masquerades")
    n.say(f"(nft masquerade) everything it sends out of its public address {ROUTER}.")
    with Capture(n, "home", "router", ("lan", "wan")):
        a = n.attempt("home", 15000, f"{REGISTRY}:{STRICT}", HOME)
    n.expect(a, "DENIED", "source_mismatch", diagnosis="private_behind_nat")
    n.say(
        f"Why: the registry saw the connection come from {a.field('observed')}, the router's "
        f"public address (the router rewrote the source). {HOME} is a private address: "
        "from the registry it names no machine at all, so calling it back would reach "
        "nothing (or someone else's network). Strict mode calls back only the observed "
        "address, so it refuses and says what to do:"
    )
    n.say(f"  {a.explanation}")


def case_forward(n: Narrator) -> None:
    n.say(f"The same laptop, after forwarding port {FORWARDED} on the router to {HOME}")
    n.say(f"(nft dnat) and advertising the router's public address {ROUTER}.")
    with Capture(n, "forward", "router", ("lan", "wan")):
        a = n.attempt("home", FORWARDED, f"{REGISTRY}:{STRICT}", ROUTER)
    n.expect(a, "OK", "connected", diagnosis="direct", target=f"{ROUTER}:{FORWARDED}")
    n.say(
        f"Why: the registry dials {ROUTER}:{FORWARDED}; the router's forward rewrites the "
        f"destination to {HOME}:{FORWARDED}. The source is untouched, so the laptop's server "
        f"sees the registry itself ({a.called_from}). That is the lab's answer: advertise "
        "the public address AND forward the port."
    )


def case_observed(n: Narrator) -> None:
    n.say("The laptop advertises its private address again, to a registry running the")
    n.say('opt-in policy mode "nat-observed" (port 9001): it dials the OBSERVED address at')
    n.say("the advertised port, like SIP servers do. The port forward is still in place.")
    with Capture(n, "observed", "router", ("lan", "wan")):
        a = n.attempt("home", FORWARDED, f"{REGISTRY}:{OBSERVED}", HOME)
    n.expect(
        a,
        "OK",
        "connected",
        diagnosis="private_behind_nat",
        corrected="yes",
        target=f"{ROUTER}:{FORWARDED}",
    )
    n.say(
        "Why: corrected=yes: the registry replaced the advertised host by the one it "
        "observed. It still needed the forward: correcting the address cannot open the "
        "router, and it never reaches an address the policy denies."
    )


def case_cgnat(n: Narrator) -> None:
    n.say(f"A student {CGHOST} behind their home router (WAN {CPE_WAN}), which is itself")
    n.say(f"behind the ISP's carrier-grade NAT (public {CARRIER}): two levels of NAT.")
    n.say("The student forwarded 15000 on their own router and advertises its WAN address.")
    with Capture(n, "cgnat", "carrier", ("sub", "wan")):
        a = n.attempt("cghost", 15000, f"{REGISTRY2}:{STRICT}", CPE_WAN)
        n.expect(a, "DENIED", "source_mismatch", diagnosis="cgnat")
        n.say(f"Then the ISP's public address {CARRIER}, as the registry saw it:")
        b = n.attempt("cghost", 15000, f"{REGISTRY2}:{STRICT}", CARRIER)
    n.expect(b, "FAILED", "connection_refused", target=f"{CARRIER}:15000")
    n.say(
        f"Why: {CPE_WAN} is in 100.64.0.0/10, the carrier's shared space: the registry saw "
        f"{CARRIER}, shared by many customers. The call to {CARRIER}:15000 reaches the "
        "carrier's NAT, which has no forward for this customer and never will: only the "
        "ISP could add one. Impossible from outside. What works instead: a network where "
        "the server has a public or same-LAN address (the classroom LAN, case lan), IPv6 "
        "(no NAT), or a VPN / tunnel to a host that has one."
    )
    n.say(f"  {a.explanation}")


def case_container(n: Narrator) -> None:
    n.say(f"A student server in a container {CONTAINER} on the classroom host {CLASS},")
    n.say("whose bridge (docker0) masquerades like docker's default network.")
    with Capture(n, "container", "class", ("docker0", "eth0")):
        a = n.attempt("ct", 15000, f"{REGISTRY_LAN}:{STRICT}", CONTAINER)
        n.expect(a, "DENIED", "source_mismatch", diagnosis="container_nat")
        n.say(f"Publishing port {PUBLISHED} (docker run -p {PUBLISHED}:{PUBLISHED}: an nft dnat")
        n.say(f"on the host) and advertising the host's address {CLASS}:")
        dnat = f'iifname "eth0" tcp dport {PUBLISHED} dnat to {CONTAINER}:{PUBLISHED}'
        n.lab.nft("class", "flush ruleset\n" + MASQUERADE.format(dnat=dnat, out="eth0"))
        try:
            b = n.attempt("ct", PUBLISHED, f"{REGISTRY_LAN}:{STRICT}", CLASS)
        finally:
            n.lab.nft("class", "flush ruleset\n" + MASQUERADE.format(dnat="", out="eth0"))
    n.expect(b, "OK", "connected", diagnosis="direct", target=f"{CLASS}:{PUBLISHED}")
    n.say(
        "Why: the container's address exists only on the host's bridge; the host "
        "masquerades it, so the registry sees the host. A published port is a port forward "
        "on the host: the same fix as at home, one level down."
    )


CASES: dict[str, tuple[str, Callable[[Narrator], None]]] = {
    "lan": ("same LAN: direct", case_lan),
    "home": ("behind a home router: private_behind_nat", case_home),
    "forward": ("port forward and the public address", case_forward),
    "observed": ("the nat-observed mode", case_observed),
    "cgnat": ("carrier-grade NAT: two levels", case_cgnat),
    "container": ("a container: container_nat, then a published port", case_container),
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", action="store_true", help="wait for Enter before each case")
    p.add_argument("--case", choices=list(CASES), help="run only this case")
    p.add_argument("--pcap", type=Path, metavar="DIR", help="capture each case into DIR")
    return p.parse_args(argv)


def wait_for_enter(title: str) -> None:
    print(f"[Enter: {title}] ", end="", flush=True)
    sys.stdin.readline()  # EOF (nothing piped) goes on, so scripts never hang here
    print(flush=True)


def main(argv: list[str]) -> int:
    args = parse(argv)
    why = netns_unavailable("discussion-nat")
    if why is not None:
        print(f"natlab: {why}; run it as root (sudo) on Linux with ip and nft", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.pcap is not None:
        if shutil.which("tcpdump") is None:
            print("natlab: --pcap needs tcpdump", file=sys.stderr)
            return EXIT_UNAVAILABLE
        args.pcap.mkdir(parents=True, exist_ok=True)
    names = [args.case] if args.case else list(CASES)
    try:
        # The directory outlives the lab: the registries write their files until stopped.
        with tempfile.TemporaryDirectory() as tmp, netns_lab("discussion-nat") as lab:
            return run_cases(lab, Path(tmp), names, args)
    except KeyboardInterrupt:
        print("\nnatlab: interrupted; every namespace and process it made is removed")
        return EXIT_INTERRUPTED


def run_cases(lab: NetnsLab, tmp: Path, names: list[str], args: argparse.Namespace) -> int:
    started = time.monotonic()
    build(lab)
    regs = [
        lab.registry("registry", tmp, f"0.0.0.0:{STRICT}"),
        lab.registry("registry", tmp, f"0.0.0.0:{OBSERVED}", '[policy]\nmode = "nat-observed"\n'),
    ]
    for reg in regs:
        reg.out.wait_for('"event": "listening"', timeout=20)
    print(f"NAT lab up in {time.monotonic() - started:.1f}s: namespaces {lab.tag}-*")
    n = Narrator(lab, lambda line: print(line, flush=True), args.pcap)
    for name in names:
        title, run = CASES[name]
        if args.step:
            wait_for_enter(title)
        print(f"\n== case {name}: {title} ==", flush=True)
        run(n)
    if n.failures:
        print("\nSome cases did not answer as narrated:")
        for f in n.failures:
            print(f"  {f}")
        return 1
    print(f"\nAll {len(names)} case(s) answered as narrated.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
