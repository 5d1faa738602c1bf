"""The lab's NAT discussion question, on a real (namespaced) network.

The real ``registry serve`` runs in a namespace of its own; the real
``student server`` / ``student client`` run behind a home router that does
NAT (nft masquerade), on the registry's own subnet, and in "containers"
masqueraded by their host. Each case asserts the exact reply.

Topology (every address exists only inside namespaces this module creates)::

                     198.51.100.0/24 "internet"          10.77.0.0/24 classroom LAN
    home 192.168.77.10 -- router --------------- registry ------------------ class 10.77.0.20
      |  (eth0)   .1 lan| wan .2             pub .1 | cls .1                  (eth0) |
    homect 172.17.0.2   masquerade + port        .1:9000 strict                 ct 172.17.0.2
      masqueraded by      forward 15100          .1:9001 nat-observed      masqueraded by class,
      home (double NAT)   -> 192.168.77.10                                 -p 15200 -> ct:15200

The registry has no route to 192.168.77.0/24 or 172.17.0.0/16: like a real
server on the internet, it reaches the home only through the router's public
address. No namespace is connected to the host's network.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns import NetnsLab, RegistryInNs, netns_lab, require_netns
from tests.support import exe

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REGISTRY_PUBLIC = "198.51.100.1"
ROUTER_PUBLIC = "198.51.100.2"
REGISTRY_CLASS = "10.77.0.1"
HOME = "192.168.77.10"
CLASS = "10.77.0.20"
CONTAINER = "172.17.0.2"
STRICT, OBSERVED = 9000, 9001
FORWARDED = 15100  # the router forwards this port to HOME
PUBLISHED = 15200  # the classroom host publishes this port to its container

ROUTER_NFT = f"""
table ip nat {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan" tcp dport {FORWARDED} dnat to {HOME}:{FORWARDED}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade
  }}
}}
"""

# A container host: masquerade the bridge network out of eth0 (docker's default),
# and on the classroom host also publish one port (docker run -p).
CONTAINER_HOST_NFT = """
table ip nat {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    {publish}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 172.17.0.0/16 oifname "eth0" masquerade
  }}
}}
"""


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NetnsLab, dict[int, RegistryInNs]]]:
    require_netns()
    tmp = tmp_path_factory.mktemp("natlab")
    with netns_lab("nat") as lab:
        started = time.monotonic()
        build(lab)
        registries = {
            STRICT: lab.registry("registry", tmp, f"0.0.0.0:{STRICT}"),
            OBSERVED: lab.registry(
                "registry", tmp, f"0.0.0.0:{OBSERVED}", '[policy]\nmode = "nat-observed"\n'
            ),
        }
        for reg in registries.values():
            reg.out.wait_for('"event": "listening"', timeout=20)
        print(f"netns lab up in {time.monotonic() - started:.2f}s")
        yield lab, registries


def build(lab: NetnsLab) -> None:
    """Namespaces, links, routes and NAT of the topology in the module docstring."""
    for role in ("registry", "router", "home", "homect", "class", "ct"):
        lab.add(role)
    lab.link("registry", "pub", f"{REGISTRY_PUBLIC}/24", "router", "wan", f"{ROUTER_PUBLIC}/24")
    lab.link("router", "lan", "192.168.77.1/24", "home", "eth0", f"{HOME}/24")
    lab.link("home", "docker0", "172.17.0.1/16", "homect", "eth0", f"{CONTAINER}/16")
    lab.link("registry", "cls", f"{REGISTRY_CLASS}/24", "class", "eth0", f"{CLASS}/24")
    lab.link("class", "docker0", "172.17.0.1/16", "ct", "eth0", f"{CONTAINER}/16")
    lab.route_default("home", "192.168.77.1")
    lab.route_default("homect", "172.17.0.1")
    lab.route_default("ct", "172.17.0.1")
    for router in ("router", "home", "class"):
        lab.forward(router)
    lab.nft("router", ROUTER_NFT)
    lab.nft("home", CONTAINER_HOST_NFT.format(publish=""))
    publish = f'iifname "eth0" tcp dport {PUBLISHED} dnat to {CONTAINER}:{PUBLISHED}'
    lab.nft("class", CONTAINER_HOST_NFT.format(publish=publish))


class Attempt:
    """One run of the lab: ``student server`` in one namespace, ``student client`` in another."""

    def __init__(self, lab: NetnsLab, where: str, port: int, registry: str, advertise: str) -> None:
        server = lab.spawn(
            where, exe("student"), "server", "--port", str(port), "--count", "1", "--timeout", "20"
        )
        server.wait_for("Student server listening on port", timeout=15)
        done = lab.run(
            where,
            exe("student"),
            "client",
            "--registry",
            registry,
            "--port",
            str(port),
            "--advertise",
            advertise,
            "--timeout",
            "15",
        )
        self.server = server
        self.status = done.returncode
        self.output = done.stdout + done.stderr
        lines = done.stdout.splitlines()
        self.reply = next(
            (x for x in lines if x.split(" ", 1)[0] in ("OK", "DENIED", "FAILED", "BUSY")), ""
        )

    def field(self, key: str) -> str | None:
        for token in self.reply.split():
            k, sep, v = token.partition("=")
            if sep and k == key:
                return v
        return None

    def accepted_from(self) -> str:
        """The registry address the student server printed (waits for the server to exit)."""
        line = self.server.wait_for("Connection accepted from instructor's server at", 10)
        return line.rsplit(" at ", 1)[1].rsplit(":", 1)[0]

    def not_called(self) -> bool:
        return not any("Connection accepted" in line for line in self.server.lines)

    def stop(self) -> None:
        """Stop the server (by its PID) if no callback ended it, so its port is free again."""
        proc = self.server.proc
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def attempt(lab: tuple) -> Iterator[Callable[..., Attempt]]:
    """Run attempts in the lab; their servers are stopped when the test ends."""
    made: list[Attempt] = []

    def run(where: str, port: int, registry: str, advertise: str) -> Attempt:
        made.append(Attempt(lab[0], where, port, registry, advertise))
        return made[-1]

    yield run
    for a in made:
        a.stop()


def logged(reg: RegistryInNs, a: Attempt) -> dict:
    """The registry's canonical log event for the attempt's registration (by its id)."""
    reg.out.wait_for(f'"id": "{a.field("id")}"', timeout=5)
    return next(e for e in reg.registrations() if e.get("id") == a.field("id"))


def check(attempt: Attempt, status: str, code: str, **fields: str) -> None:
    assert attempt.reply.startswith(f"{status} {code} "), attempt.output
    for key, want in fields.items():
        assert attempt.field(key) == want, (key, attempt.reply)


def test_private_address_behind_home_nat_is_denied_with_the_diagnosis(
    lab: tuple, attempt: Callable[..., Attempt]
) -> None:
    a = attempt("home", 15000, f"{REGISTRY_PUBLIC}:{STRICT}", HOME)
    check(a, "DENIED", "source_mismatch", diagnosis="private_behind_nat")
    assert (a.field("observed") or "").startswith(f"{ROUTER_PUBLIC}:")
    assert f"Forward port 15000 on the router to {HOME}:15000" in a.reply
    assert a.status == 2 and a.not_called()
    event = logged(lab[1][STRICT], a)
    assert event["peer"].startswith(f"{ROUTER_PUBLIC}:") and event["advertised"] == f"{HOME}:15000"


def test_port_forward_and_the_routers_public_address_connects(
    attempt: Callable[..., Attempt],
) -> None:
    a = attempt("home", FORWARDED, f"{REGISTRY_PUBLIC}:{STRICT}", ROUTER_PUBLIC)
    check(
        a,
        "OK",
        "connected",
        target=f"{ROUTER_PUBLIC}:{FORWARDED}",
        diagnosis="direct",
        verified="yes",
    )
    assert a.status == 0
    # DNAT rewrites only the destination: the home server sees the registry itself.
    assert a.accepted_from() == REGISTRY_PUBLIC


def test_nat_observed_mode_corrects_to_the_observed_address(
    lab: tuple, attempt: Callable[..., Attempt]
) -> None:
    a = attempt("home", FORWARDED, f"{REGISTRY_PUBLIC}:{OBSERVED}", HOME)
    check(
        a,
        "OK",
        "connected",
        target=f"{ROUTER_PUBLIC}:{FORWARDED}",
        diagnosis="private_behind_nat",
        corrected="yes",
    )
    assert a.status == 0 and a.accepted_from() == REGISTRY_PUBLIC
    event = logged(lab[1][OBSERVED], a)
    assert event["corrected"] is True and event["advertised"] == f"{HOME}:{FORWARDED}"


def test_nat_observed_without_a_forward_fails_honestly(attempt: Callable[..., Attempt]) -> None:
    # Correction cannot open the router: nothing forwards 15000, so the callback is refused.
    a = attempt("home", 15000, f"{REGISTRY_PUBLIC}:{OBSERVED}", HOME)
    check(a, "FAILED", "connection_refused", target=f"{ROUTER_PUBLIC}:15000", corrected="yes")
    assert a.status == 3 and a.not_called()


def test_host_on_the_registrys_own_subnet_is_direct(attempt: Callable[..., Attempt]) -> None:
    a = attempt("class", 15000, f"{REGISTRY_CLASS}:{STRICT}", CLASS)
    check(a, "OK", "connected", target=f"{CLASS}:15000", diagnosis="direct", verified="yes")
    assert a.status == 0 and a.accepted_from() == REGISTRY_CLASS


def test_container_address_from_its_host_is_container_nat(attempt: Callable[..., Attempt]) -> None:
    a = attempt("ct", 15000, f"{REGISTRY_CLASS}:{STRICT}", CONTAINER)
    check(a, "DENIED", "source_mismatch", diagnosis="container_nat")
    assert (a.field("observed") or "").startswith(f"{CLASS}:")
    assert "docker/podman run -p 15000:15000" in a.reply
    assert a.status == 2 and a.not_called()


def test_published_container_port_on_the_host_address_connects(
    attempt: Callable[..., Attempt],
) -> None:
    a = attempt("ct", PUBLISHED, f"{REGISTRY_CLASS}:{STRICT}", CLASS)
    check(a, "OK", "connected", target=f"{CLASS}:{PUBLISHED}", diagnosis="direct")
    assert a.status == 0 and a.accepted_from() == REGISTRY_CLASS


def test_container_behind_a_home_router_is_denied(attempt: Callable[..., Attempt]) -> None:
    # Double NAT (container -> host -> router): the registry sees the router's public
    # address. diagnosis.py rule 7 names container_nat only for a private observed
    # address, so rule 8 (private advertised, public observed) applies here.
    a = attempt("homect", 15000, f"{REGISTRY_PUBLIC}:{STRICT}", CONTAINER)
    check(a, "DENIED", "source_mismatch", diagnosis="private_behind_nat")
    assert (a.field("observed") or "").startswith(f"{ROUTER_PUBLIC}:")
    assert a.status == 2 and a.not_called()


def test_double_nat_advice_does_not_point_the_router_at_a_container(
    attempt: Callable[..., Attempt],
) -> None:
    a = attempt("homect", 15000, f"{REGISTRY_PUBLIC}:{STRICT}", CONTAINER)
    assert a.reply.startswith("DENIED source_mismatch "), a.output
    assert f"on the router to {CONTAINER}" not in a.reply


def test_lab_leaves_nothing_behind(tmp_path: Path) -> None:
    """A lab that fails while being built still deletes its namespaces."""
    require_netns()
    with pytest.raises(RuntimeError), netns_lab("natcheck") as lab:
        lab.add("a")
        lab.add("b")
        made = list(lab.namespaces)
        raise RuntimeError("boom")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert made and not any(n in names.stdout for n in made)
