"""``student lab``: both lab roles in one process, and the timeline between them.

The server and the client run in one trio nursery; each reports what it sees to
a ``Timeline``, which stamps every event with the milliseconds since the start.
The answer to the lab's first discussion question ("what was the sequence of
connections?") is then printed rather than guessed:

    +0.0ms  server  listening on [::]:15000 and 0.0.0.0:15000
    +1.2ms  client  connected to registry 127.0.0.1:9000 from 127.0.0.1:53412
    +1.3ms  client  sent "127.0.0.1:15000 student=alice"
    +3.0ms  server  accepted callback from 127.0.0.1:40122 (the registry dialled us)
    +3.1ms  server  received CALLBACK id=... nonce=...; echoed nonce
    +4.0ms  client  reply: OK connected verified=yes ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import trio

from student.client import ClientOptions, Registration, register, report_lines
from student.explain import LabTrace, explain_lines
from student.netio import BindError
from student.server import CallbackServer, Received
from student.wire import EXIT_LOCAL_ERROR, EXIT_USAGE, printable

# After the reply, how long a callback already under way may take to be reported:
# the registry replies once its call is over, so this is only scheduling slack.
SETTLE_TIMEOUT = 0.5


class Timeline:
    """Prints ``+12.3ms  role  text`` lines, relative to its creation."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.start = trio.current_time()

    def note(self, role: str, text: str) -> None:
        ms = (trio.current_time() - self.start) * 1000
        self.out(f"+{ms:.1f}ms  {role}  {text}")


class LabServerEvents:
    """The server's side of the timeline."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.received_calls: list[Received] = []

    def accepted(self, peer: str, *, udp: bool) -> None:
        what = "received a callback datagram" if udp else "accepted callback"
        self.timeline.note("server", f"{what} from {peer} (the registry dialled us)")

    def received(self, got: Received) -> None:
        self.received_calls.append(got)
        if got.callback is not None:
            cb = got.callback
            ident = f"id={cb.id} " if cb.id else ""
            echo = "echoed nonce" if got.echoed else "could not echo the nonce"
            self.timeline.note("server", f"received CALLBACK {ident}nonce={cb.nonce}; {echo}")
        elif got.message:
            self.timeline.note("server", f'received "{got.message}" (not a CALLBACK line)')
        else:
            self.timeline.note("server", "the connection brought no message")


class LabClientEvents:
    """The client's side of the timeline."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    def connected(self, local: str, remote: str, *, udp: bool) -> None:
        if udp:
            self.timeline.note("client", f"sending datagrams to registry {remote} from {local}")
        else:
            self.timeline.note("client", f"connected to registry {remote} from {local}")

    def sent(self, advertised: str, line: str) -> None:
        self.timeline.note("client", f'sent "{printable(line)}"')


def verdict(reg: Registration, calls: list[Received]) -> str:
    """One sentence joining the registry's verdict with what our server saw."""
    if reg.reply is None:
        return f"verdict: no verdict — {reg.problem}"
    reply, head = reg.reply, f"verdict: {reg.reply.status} {reg.reply.code}"
    target = reply.get("target") or (reg.request.advertised if reg.request else "?")
    if reply.status == "OK":
        if not calls:
            return (
                f"{head} — but the call did not reach this process: another program "
                f"answered at {target}"
            )
        proof = (
            "and it echoed the nonce"
            if any(c.echoed for c in calls)
            else "(the nonce was not echoed)"
        )
        return f"{head} — the registry called this server back at {target} {proof}"
    if calls:
        return f"{head} — a callback did arrive here from {calls[0].peer}, but it did not count"
    return f"{head} — no callback arrived at this server"


def lab_trace(
    opts: ClientOptions, listening: list[str], reg: Registration, calls: list[Received]
) -> LabTrace:
    """What this run saw, for ``--explain``."""
    reply = reg.reply
    return LabTrace(
        listening=listening,
        port_asked=opts.port,
        client_local=reg.local,
        registry=reg.registry,
        sent=printable(reg.sent) if reg.sent is not None else None,
        observed=reply.get("observed") if reply else None,
        target=reply.get("target") if reply else None,
        callback_peer=calls[0].peer if calls else None,
        callback_local=(calls[0].local or None) if calls else None,
        verdict=f"{reply.status} {reply.code}" if reply else f"no verdict: {reg.problem}",
        udp=opts.udp,
    )


async def run_lab(
    opts: ClientOptions,
    out: Callable[[str], None],
    err: Callable[[str], None] | None = None,
    *,
    explain: bool = False,
) -> int:
    """Run ``student lab``; the exit status is the client's (1 when the port is taken).

    ``explain``: afterwards, print the connections with every address and port."""
    err = err or out
    timeline = Timeline(out)
    server_events = LabServerEvents(timeline)
    try:
        server = await CallbackServer.open(
            server_events, port=opts.port, bind=None, count=1, udp=opts.udp
        )
    except BindError as exc:
        err(f"student lab: {exc}")
        return EXIT_LOCAL_ERROR
    try:
        listening = server.addresses
        timeline.note("server", "listening on " + " and ".join(listening))
        # Advertise the port really bound: with --port 0 it is an ephemeral one.
        client_opts = dataclasses.replace(opts, port=server.port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            try:
                reg = await register(client_opts, LabClientEvents(timeline))
            except ValueError as exc:
                err(f"student lab: {exc}")
                nursery.cancel_scope.cancel()
                return EXIT_USAGE
            lines = report_lines(client_opts, reg)
            timeline.note("client", f"reply: {lines[0]}" if reg.reply else lines[0])
            # Wait only when a call is under way or the registry says one connected.
            ok = reg.reply is not None and reg.reply.status == "OK"
            if ok or server.accepted > server.handled:
                with trio.move_on_after(SETTLE_TIMEOUT):
                    await server.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        await server.aclose()
    out(verdict(reg, server_events.received_calls))
    for line in lines[1:]:
        out(line)
    if explain:
        for line in explain_lines(lab_trace(opts, listening, reg, server_events.received_calls)):
            out(line)
    return reg.exit_code
