"""NAT and mis-advertisement diagnosis: how the advertised address relates to the peer.

Pure. :func:`diagnose` names the case (SPEC "NAT and mis-advertisement
cases"; the precedence when several hold is in docs/architecture.md, "NAT
diagnosis"); :func:`explain` turns it into one ASCII line (< 400 characters)
for students: what was sent, what the registry saw, and what to do.
"""

from __future__ import annotations

import ipaddress

from registry.model import Diagnosis, IPAddress
from registry.policy.addresses import PUBLIC, AddrClass, Address, ascii_safe

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Default address pools of container runtimes: (network, what uses it).
CONTAINER_NETWORKS: tuple[tuple[Network, str], ...] = (
    (ipaddress.ip_network("172.17.0.0/16"), "Docker bridge docker0"),
    *(
        (ipaddress.ip_network(f"172.{n}.0.0/16"), "Docker user-defined bridge")
        for n in range(18, 32)
    ),
    (ipaddress.ip_network("10.88.0.0/16"), "Podman default network"),
    (ipaddress.ip_network("10.244.0.0/16"), "Kubernetes pod network"),
    (ipaddress.ip_network("10.42.0.0/16"), "k3s pod network"),
)

MAX_EXPLANATION = 399  # SPEC-facing promise: strictly under 400 characters


def container_network(addr: IPAddress) -> tuple[Network, str] | None:
    """The container pool holding ``addr`` (normalised), if any."""
    norm = Address.of(addr).norm
    for net, what in CONTAINER_NETWORKS:
        if norm.version == net.version and norm in net:
            return net, what
    return None


_BY_ADVERTISED = {
    AddrClass.UNSPECIFIED: Diagnosis.UNSPECIFIED_ADVERTISED,
    AddrClass.LOOPBACK: Diagnosis.LOOPBACK_ADVERTISED,
    AddrClass.LINK_LOCAL: Diagnosis.LINK_LOCAL_ADVERTISED,
}


def diagnose(advertised: IPAddress, observed: IPAddress) -> Diagnosis:
    """Name the relation between the advertised address and the observed peer."""
    a, o = Address.of(advertised), Address.of(observed)
    if a.norm == o.norm:
        return Diagnosis.DIRECT
    ca, co = a.cls, o.cls
    if ca in _BY_ADVERTISED:
        return _BY_ADVERTISED[ca]
    if a.family != o.family:
        return Diagnosis.FAMILY_MISMATCH
    if AddrClass.CGNAT in (ca, co):
        return Diagnosis.CGNAT
    pool = container_network(a)
    if pool is not None and co in (AddrClass.PRIVATE, AddrClass.LOOPBACK) and o.norm not in pool[0]:
        return Diagnosis.CONTAINER_NAT
    if ca is AddrClass.PRIVATE and co in PUBLIC:
        return Diagnosis.PRIVATE_BEHIND_NAT
    return Diagnosis.DIFFERENT_HOST


Shown = Address | str  # an address, or a name / any text shown as it is


def _host(host: Shown) -> str:
    """A host for display: ASCII, short, IPv6 in brackets (so ``:port`` reads right)."""
    text = host.display if isinstance(host, Address) else ascii_safe(str(host), 48)
    if ":" in text and not text.startswith("["):
        return f"[{text}]"
    return text


def _family(host: Shown) -> str:
    """The family the registry would use (``::ffff:198.51.100.5`` is IPv4); a text
    is never parsed back into an address: only its look is left to go by."""
    if isinstance(host, Address):
        return f"IPv{host.family}"
    return "IPv6" if ":" in str(host) else "IPv4"


# One template per case; {A} advertised host, {O} observed host, {P} port,
# {FA}/{FO} the address families. Every template states what was sent, what
# the registry saw, and the fix.
_TEMPLATES: dict[Diagnosis, str] = {
    Diagnosis.DIRECT: (
        "You sent {A}:{P} and the registry saw your connection come from {O}, the same "
        "host, so it calls {A}:{P} back directly; nothing to fix."
    ),
    Diagnosis.LOOPBACK_ADVERTISED: (
        "You sent {A}:{P}, but loopback means 'this machine' to the registry, so it would "
        "call itself, not you; it saw you at {O}. Advertise an address of your machine the "
        "registry can reach, e.g. {O}:{P} (student client --advertise auto)."
    ),
    Diagnosis.UNSPECIFIED_ADVERTISED: (
        "You sent {A}:{P}, but 0.0.0.0 (or ::) is a bind address meaning 'every interface', "
        "not a destination; the registry saw you at {O}. Keep binding your server to it, but "
        "advertise a real address such as {O}:{P}."
    ),
    Diagnosis.PRIVATE_BEHIND_NAT: (
        "You sent the private address {A}:{P}, but the registry saw the public address {O}: "
        "you are behind a NAT router. Forward port {P} on the router to {A}:{P} and "
        "advertise {O}:{P}, or run the registry and your server on the same network."
    ),
    Diagnosis.CGNAT: (
        "You sent {A}:{P} and the registry saw {O}; 100.64.0.0/10 (and DS-Lite 192.0.0.0/29) "
        "is carrier-grade NAT: your ISP shares one public address among many customers, so "
        "you cannot forward a port to yourself. Use a network with a public or same-LAN "
        "address, IPv6, or a VPN."
    ),
    Diagnosis.CONTAINER_NAT: (
        "You sent the container address {A}:{P}, but the registry saw the host at {O}: the "
        "container sits behind the host's NAT. Publish the port (docker/podman run -p "
        "{P}:{P}, or a Kubernetes NodePort) and advertise the host address {O}:{P}."
    ),
    Diagnosis.DIFFERENT_HOST: (
        "You sent {A}:{P} but the registry saw your connection come from {O}, another "
        "address; it only calls back the address a request comes from. Run the client on "
        "the machine that runs your server, or advertise {O}:{P}."
    ),
    Diagnosis.LINK_LOCAL_ADVERTISED: (
        "You sent the link-local address {A}:{P}; link-local addresses (169.254.0.0/16, "
        "fe80::/10) only work on one network segment, so the registry never calls them; it "
        "saw you at {O}. Advertise a routable address such as {O}:{P}."
    ),
    Diagnosis.FAMILY_MISMATCH: (
        "You sent the {FA} address {A}:{P} but connected over {FO} from {O}; the registry "
        "only calls back the address your request came from. Advertise {O}:{P}, or connect "
        "to the registry over {FA}."
    ),
    Diagnosis.HOSTNAME: (
        "You sent the name {A}:{P} and the registry saw {O}; names are resolved only when "
        "the registry allows it, and then must resolve to {O}. Advertise the IP address "
        "{O}:{P} instead."
    ),
}


def explain(diagnosis: Diagnosis, advertised: Shown, observed: Shown, port: int) -> str:
    """One ASCII line (< 400 chars) for ``diagnosis``: what was sent, what was seen, the fix.

    ``advertised`` and ``observed`` are :class:`Address` values, or texts (a
    hostname) shown as they are, made ASCII and shortened here, so any input
    is safe to pass.
    """
    template = _TEMPLATES.get(diagnosis, _TEMPLATES[Diagnosis.DIFFERENT_HOST])
    a, o = advertised, observed
    in_pool = isinstance(a, Address) and container_network(a) is not None
    if diagnosis is Diagnosis.PRIVATE_BEHIND_NAT and in_pool:
        # Double NAT: the router cannot reach a container bridge address, so
        # "forward the router to A" would be advice nobody can follow.
        template = _DOUBLE_NAT
    line = template.format(A=_host(a), O=_host(o), P=_port(port), FA=_family(a), FO=_family(o))
    if len(line) > MAX_EXPLANATION:
        line = line[: MAX_EXPLANATION - 3] + "..."
    return line


_DOUBLE_NAT = (
    "You sent {A}:{P}, a container bridge address, and the registry saw the public "
    "address {O}: your server is in a container behind its host, behind a NAT router. "
    "Publish the port on the host (docker run -p {P}:{P}), forward port {P} on the router "
    "to the host's LAN address, and advertise {O}:{P}."
)


def _port(port: object) -> str:
    return str(port) if isinstance(port, int) and not isinstance(port, bool) else "?"
