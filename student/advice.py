"""What to check, per failure code: the registry's verdict turned into next steps.

A table of templates, filled from ``AdviceContext`` (the student's own address,
port, registry and what the registry observed), so the advice names the
student's values rather than placeholders. ``source_mismatch`` depends on the
registry's ``diagnosis=`` (the SPEC's NAT cases); codes this tool does not know
get a generic line, never a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ADDRESSES_HINT = (
    "run `student addresses --registry {registry}` to see which address routes to the registry"
)

# Codes that are not the registry's: the client could not get a usable reply.
CLIENT_CODES: tuple[str, ...] = (
    "registry_unreachable",
    "registry_timeout",
    "no_reply",
    "bad_reply",
)

ADVICE: dict[str, tuple[str, ...]] = {
    # FAILED: the registry tried to call back and could not.
    "connection_refused": (
        "nothing was listening on {port} at {host} — is `student server` running with the same --port?",
        "start `student server --port {port}` first, in another terminal, and keep it running",
    ),
    "timeout": (
        "the registry's call to {target} got no answer at all: a firewall on your machine or "
        "network is probably dropping it — allow incoming TCP on port {port}",
        "or {host} is the wrong address for this machine; " + ADDRESSES_HINT,
    ),
    "unreachable": (
        "the registry has no route to {host}: it is on a network the registry cannot reach "
        "(behind a router, on a VPN, or a typo)",
        ADDRESSES_HINT,
    ),
    "reset": (
        "something at {target} refused the call with a reset: another program may own port "
        "{port}, or a firewall rejects the connection",
    ),
    "not_verified": (
        "your server accepted the call but did not write back the nonce: it must answer the "
        "CALLBACK line with a line containing nonce=NONCE (`student server` does this)",
        "a server that only prints and closes (like the lab's) passes only with verify=no",
    ),
    # DENIED: refused by policy, nothing was attempted.
    "source_mismatch": (
        "the registry calls back only the address your request came from ({observed}); "
        "advertise that one",
    ),
    "address_not_allowed": (
        "the registry never calls {host}: that range is refused (unspecified, broadcast, "
        "multicast, link-local, reserved, or loopback from another machine)",
        "advertise the address of your network interface; " + ADDRESSES_HINT,
    ),
    "port_not_allowed": (
        "port {port} is outside the range the registry accepts (the lab suggests 10000-20000): "
        "pick another --port, the same for `student server` and `student client`",
    ),
    "self_target": (
        "{host}:{port} is the registry's own address: advertise your server's address, not the "
        "registry's",
    ),
    "hostname_not_allowed": (
        "the registry takes IP addresses, not names: advertise a dotted-decimal IPv4 address "
        "like 192.168.1.105, or an IPv6 address in brackets",
    ),
    "unauthorized": (
        "the registry needs a valid --token: ask your instructor for yours, and check that "
        "--student is the name it was issued for",
    ),
    # BUSY: try later.
    "rate_limited": (
        "you sent too many registrations: wait {retry_after} seconds, then try again once",
    ),
    "overloaded": (
        "the registry is busy with other students: wait {retry_after} seconds, then try again",
    ),
    # ERROR: the message itself was bad.
    "malformed": (
        "the registry could not parse what you sent: {sent}",
        "the format is HOST:PORT — four-part dotted-decimal IPv4 without leading zeros, or "
        "[IPv6] — optionally followed by key=value options",
    ),
    "too_long": (
        "your request is longer than the registry accepts (512 bytes by default): {sent}",
        "shorten --student or --token",
    ),
    "read_timeout": (
        "the registry did not receive a complete request in time: end it with a newline, or "
        "close the connection after sending",
    ),
    "bad_json": (
        "the registry could not read the JSON you sent: {sent}",
        'the format is {{"host": "192.168.1.105", "port": 15000}} on one line',
    ),
    # The client's own problems (no usable reply).
    "registry_unreachable": (
        "is the registry running at {registry}? check the IP address and port your instructor gave you",
        "a firewall between you and the registry may block outgoing connections",
    ),
    "registry_timeout": (
        "the registry did not answer within {timeout} s: it may be overloaded, or a firewall "
        "drops the traffic; check the address {registry}",
        "if you (or a script sharing your address) retried many times in a row, or again "
        "before the retry_after a previous reply told you, the registry may have banned your "
        "address for a minute or more: wait, then try once",
    ),
    "no_reply": (
        "the program at {registry} accepted the connection but did not answer: is it really the "
        "registry, and the port your instructor gave you?",
    ),
    "bad_reply": (
        "the program at {registry} does not answer like the registry: check the address and port",
    ),
}

DIAGNOSIS_ADVICE: dict[str, tuple[str, ...]] = {
    "loopback_advertised": (
        "{host} is a loopback address: it means 'this machine' to whoever dials it, so the "
        "registry would call itself — advertise {observed_target} instead",
    ),
    "unspecified_advertised": (
        "0.0.0.0 is a bind address ('all interfaces'), not a destination — advertise the "
        "address of your interface, {observed}",
    ),
    "private_behind_nat": (
        "you are behind a NAT router: {host} is a private address, and the registry sees you "
        "as {observed}",
        "to be reached from outside, the router must forward port {port} to {host}:{port} "
        "(port forwarding) and you advertise {observed_target}; or join the registry's network",
    ),
    "cgnat": (
        "your provider uses carrier-grade NAT (100.64.0.0/10): no port forwarding you can set "
        "up will let the registry in — use the lab network, a VPN the registry is on, or IPv6",
    ),
    "container_nat": (
        "{host} is a container bridge address: the registry cannot reach inside the container",
        "publish the port (`docker run -p {port}:{port} ...`) and advertise the host's "
        "address {observed}, or use host networking",
    ),
    "different_host": (
        "{host} is not the machine your request came from ({observed}): run `student client` "
        "on the same machine as `student server`, or advertise {observed_target}",
    ),
    "link_local_advertised": (
        "{host} is link-local (169.254.0.0/16 or fe80::/10), valid on one network segment "
        "only — advertise a routable address; " + ADDRESSES_HINT,
    ),
    "family_mismatch": (
        "you advertised an address of one IP family but reached the registry over the other "
        "(it saw {observed}): advertise {observed_target}, or connect to the registry over the same family",
    ),
}

GENERIC_ADVICE: tuple[str, ...] = (
    "the registry answered with code {code}, which this tool does not know: read its explanation above",
)


@dataclass(frozen=True, slots=True)
class AdviceContext:
    """The student's own values, named in the advice."""

    host: str  # the advertised host, without brackets
    port: int
    registry: str
    sent: str | None = None
    observed: str | None = None
    target: str | None = None
    retry_after: str | None = None
    timeout: float | None = None

    def values(self, code: str | None) -> dict[str, str]:
        """Template values; every missing one gets readable words, not ``None``."""
        fallback = {
            "sent": "(nothing was sent)",
            "observed": "the address the registry saw",
            "retry_after": "a few",
            "timeout": "the --timeout",
        }
        values = {k: ("" if v is None else str(v)) for k, v in asdict(self).items()}
        values.update({k: fallback[k] for k in fallback if not values[k]})
        if self.sent is not None:
            values["sent"] = (
                repr(self.sent) if len(self.sent) <= 200 else repr(self.sent[:200]) + "..."
            )
        if self.timeout is not None:
            values["timeout"] = f"{self.timeout:g}"
        values["target"] = values["target"] or _endpoint(self.host, self.port)
        if self.observed:
            # The registry reports observed=HOST:PORT with the client's ephemeral
            # port; advice names the host, and the student's server port with it.
            host = _host_only(self.observed)
            values["observed"] = host
            values["observed_target"] = _endpoint(host, self.port)
        else:
            values["observed_target"] = "the address the registry saw"
        values["code"] = code or "(none)"
        return values


def _host_only(endpoint: str) -> str:
    if endpoint.startswith("[") and "]" in endpoint:
        return endpoint[1 : endpoint.index("]")]
    host, sep, port = endpoint.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else endpoint


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advice_for(code: str | None, diagnosis: str | None, ctx: AdviceContext) -> list[str]:
    """The lines of advice for a failure ``code`` (and ``diagnosis``, for source_mismatch)."""
    templates: tuple[str, ...] = ADVICE.get(code or "", GENERIC_ADVICE)
    # A refused address with a named NAT case (0.0.0.0, loopback, link-local...)
    # is best explained by that case, whichever DENIED code carried it.
    if code in ("source_mismatch", "address_not_allowed") and diagnosis in DIAGNOSIS_ADVICE:
        templates = DIAGNOSIS_ADVICE[diagnosis]
    values = ctx.values(code)
    return [template.format_map(values) for template in templates]


def format_advice(lines: list[str]) -> list[str]:
    """The block printed under a failed reply."""
    if not lines:
        return []
    return ["What to check:"] + [f"  - {line}" for line in lines]
