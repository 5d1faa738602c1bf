#!/usr/bin/env python3
"""What the registry says when the address you advertise is not the one it sees.

Lab discussion question:
  - If your student_server was behind a home router with NAT, what IP address
    would your client have needed to send for the instructor's server to reach
    it? What else would need to be configured on your home router?

For each case the registry distinguishes (SPEC "NAT and mis-advertisement
cases") this prints the advertised and the observed address, the diagnosis,
the registry's explanation, and what the default (strict) policy and the
opt-in ``nat-observed`` mode decide. It calls the registry's own pure policy
functions (registry.policy.diagnosis.diagnose / explain and
registry.policy.decide.decide): no packet is sent.

Run:  python3 run.py python examples/02_nat.py
"""

from __future__ import annotations

import ipaddress
import textwrap

from registry.config import from_dict
from registry.model import Endpoint, Request
from registry.policy.decide import Allow, decide
from registry.policy.diagnosis import diagnose, explain

PORT = 15000

# (story, advertised, observed). Example addresses: RFC 1918 / RFC 6598 private
# ones, and the documentation ranges 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32
# standing in for public addresses.
CASES: list[tuple[str, str, str]] = [
    ("same LAN as the registry (the lab's setup)", "192.168.1.105", "192.168.1.105"),
    ("home router NAT: advertised the laptop's LAN address", "192.168.1.105", "203.0.113.7"),
    ("home router NAT, port forwarded, router's address advertised", "203.0.113.7", "203.0.113.7"),
    ("carrier-grade NAT at the ISP", "100.64.12.34", "203.0.113.7"),
    ("server in a Docker container, client inside it", "172.17.0.2", "192.168.1.105"),
    ("copied 127.0.0.1 from a local test", "127.0.0.1", "192.168.1.105"),
    ("advertised the bind address 0.0.0.0", "0.0.0.0", "192.168.1.105"),
    ("advertised a link-local address", "169.254.10.20", "192.168.1.105"),
    ("advertised IPv6, connected over IPv4", "2001:db8::105", "192.168.1.105"),
    ("client ran on another machine than the server", "192.168.1.105", "192.168.1.77"),
]

STRICT = from_dict({}).policy
NAT_OBSERVED = from_dict({"policy": {"mode": "nat-observed"}}).policy


def verdict(advertised: str, observed: str, mode: str) -> str:
    """What the registry would do, in the words of its reply line."""
    policy = STRICT if mode == "strict" else NAT_OBSERVED
    request = Request(ipaddress.ip_address(advertised), PORT)
    d = decide(request, Endpoint(ipaddress.ip_address(observed), 40000), policy)
    if isinstance(d, Allow):
        fixed = " corrected=yes" if d.corrected else ""
        return f"call back {d.target}{fixed}"
    return f"DENIED {d.code.value}"


def main() -> int:
    wrap = textwrap.TextWrapper(width=96, initial_indent="    ", subsequent_indent="    ")
    for n, (story, advertised, observed) in enumerate(CASES, 1):
        diagnosis = diagnose(ipaddress.ip_address(advertised), ipaddress.ip_address(observed))
        print(f"{n:2}. {story}")
        shown = Endpoint(ipaddress.ip_address(advertised), PORT)
        print(f"    advertised {shown}   observed {observed}")
        print(f"    diagnosis={diagnosis.value}")
        print(
            f"    strict: {verdict(advertised, observed, 'strict')}   "
            f"nat-observed: {verdict(advertised, observed, 'nat-observed')}"
        )
        print(wrap.fill(explain(diagnosis, advertised, observed, PORT)))
        print()
    answer = (
        "Answer: behind a home NAT, advertise the router's PUBLIC address (the one the "
        "registry saw, here 203.0.113.7) and configure a port forward on the router: "
        f"TCP {PORT} -> 192.168.1.105:{PORT}. Without the forward the router drops or "
        "refuses the callback, even in nat-observed mode (case 3 is the working setup)."
    )
    print(textwrap.fill(answer, width=96))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
