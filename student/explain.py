"""``student lab --explain``: the lab's connections, with every address and port.

Answers the lab's first two discussion questions on the student's own
machine: what the sequence of connections was, and why the client had to
tell the registry where the server listens. Pure: a :class:`LabTrace` of what
``student lab`` saw goes in, lines come out.
"""

from __future__ import annotations

from dataclasses import dataclass

from student.wire import parse_hostport


@dataclass(frozen=True, slots=True)
class LabTrace:
    """What one ``student lab`` run saw, as ``IP:PORT`` texts (None: did not happen)."""

    listening: list[str]  # the server's bound addresses
    port_asked: int  # --port (0: let the kernel choose)
    client_local: str | None  # our end of the registration connection
    registry: str  # the registry's end
    sent: str | None  # the request as sent
    observed: str | None  # where the registry saw the registration come from (observed=)
    target: str | None  # what the registry dialled back (target=)
    callback_peer: str | None  # the registry's end of the callback, as our server saw it
    callback_local: str | None  # our server's end of the callback
    verdict: str  # "OK connected", "DENIED source_mismatch", ...
    udp: bool = False


def _port(endpoint: str | None) -> str:
    if endpoint is None:
        return "?"
    try:
        return str(parse_hostport(endpoint)[1])
    except ValueError:
        return "?"


def _host(endpoint: str | None) -> str | None:
    try:
        return parse_hostport(endpoint)[0] if endpoint else None
    except ValueError:
        return None


def _known(endpoint: str | None) -> str | None:
    """``endpoint``, or None for a wildcard name (a UDP socket bound to every address)."""
    return None if _host(endpoint) in ("0.0.0.0", "::") else endpoint


def explain_lines(t: LabTrace) -> list[str]:
    """The explanation ``student lab --explain`` prints after the verdict."""
    local = _known(t.callback_local)
    what = "datagrams" if t.udp else "connection"
    server_port = _port(t.listening[0]) if t.listening else "?"
    chooser = (
        "the kernel (you asked for --port 0)"
        if t.port_asked == 0
        else "you (--port), before anything was sent"
    )
    lines = [
        "",
        f"The lab's three steps, with full address pairs ({'UDP' if t.udp else 'TCP'}):",
        "",
        "1. Your server listens (a listening socket: a local address, no peer yet)",
        f"     {' and '.join(t.listening) or '?'}",
        f"     port {server_port}: chosen by {chooser}.",
        "",
        f"2. Registration {what}: client -> registry",
        f"     {t.client_local or '?'}  ->  {t.registry}",
        f"     port {_port(t.client_local)}: ephemeral, chosen by YOUR kernel for this one "
        f"{what} (the client never bind()s); port {_port(t.registry)}: the registry's, "
        "chosen by the instructor.",
    ]
    if t.sent is not None:
        lines.append(f"     your client sent: {t.sent}")
    if t.observed:
        lines.append(f"     the registry saw it come from {t.observed} (observed=).")
        if t.client_local and t.observed != t.client_local:
            lines.append(
                f"     That is not {t.client_local}: something between you (a NAT router, a "
                "container bridge) rewrote the source."
            )
    lines += ["", f"3. Callback {what}: registry -> your server"]
    if t.callback_peer is not None:
        lines += [
            f"     {t.callback_peer}  ->  {local or t.target or '?'}",
            f"     port {_port(t.callback_peer)}: ephemeral, chosen by the REGISTRY's kernel; "
            f"port {_port(local or t.target)}: your server's, which the registry "
            "learnt only from what your client sent.",
        ]
        if t.target and local and _host(t.target) != _host(local):
            lines.append(
                f"     The registry dialled {t.target}; a forward in between delivered it to "
                f"{local}."
            )
    else:
        lines.append(f"     none arrived here ({t.verdict}).")
    lines += [
        "",
        f"Why the registry could not have guessed port {server_port}: the only thing it had "
        f"from you was the registration {what}, whose source port {_port(t.client_local)} is "
        "a throw-away port your kernel picked for that one "
        f"{what}; nothing listens there, and it is gone once the reply is read. Your server's "
        "port was chosen in another program (and another socket), and no packet carries it "
        "except the text your client sent. The address can be wrong too: the registry sees "
        "only the address your packets arrive from, which behind a NAT is not your machine's.",
    ]
    return lines
