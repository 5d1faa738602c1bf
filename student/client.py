"""``student client``: tell the registry where the student server listens.

One registration over TCP (text or ``--json``) or UDP (with the cookie
challenge), then the reply, then advice when it failed. ``register`` is the
reusable core (``student lab`` drives it too); it reports progress through a
``ClientEvents`` object and returns a ``Registration`` value: problems are
values here, and only the CLI turns them into lines and an exit status.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from student.advice import AdviceContext, advice_for, format_advice
from student.netio import os_error_text, read_line
from student.wire import (
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UDP_MIN_BYTES,
    RegistrationRequest,
    Reply,
    ReplyError,
    build_json_request,
    build_text_request,
    check_value,
    cookie_of,
    display_ip,
    format_endpoint,
    format_sockaddr,
    pad_datagram,
    pad_of,
    parse_json_reply,
    parse_reply,
    printable,
    unbracket,
)

REPLY_LIMIT = 8192  # bytes: a reply is one short line
# UDP: a lost datagram is retried 3 times with backoff. The cookie challenge comes
# back at once; the final reply only after the registry's callback, so wait longer.
CHALLENGE_WAITS = (1.0, 2.0, 4.0, 8.0)
FINAL_WAITS = (5.0, 5.0, 10.0, 10.0)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """The options of ``student client`` (and ``student lab``)."""

    registry: tuple[str, int]
    port: int = 15000
    advertise: str = "auto"
    student: str | None = None
    token: str | None = None
    verify: bool | None = None
    json: bool = False
    udp: bool = False
    timeout: float = 15.0

    @property
    def registry_text(self) -> str:
        return format_endpoint(*self.registry)


@dataclass(slots=True)
class Registration:
    """Everything one registration attempt produced, filled in as it goes."""

    registry: str
    local: str | None = None  # our end of the conversation with the registry
    request: RegistrationRequest | None = None
    sent: str | None = None  # the request exactly as sent (text line or JSON)
    reply: Reply | None = None
    reply_text: str | None = None  # the reply as printed: raw text line or JSON as text
    problem: str | None = None  # why there is no usable reply, as a sentence
    problem_code: str | None = None  # registry_unreachable, registry_timeout, no_reply, bad_reply

    def fail(self, code: str, problem: str) -> None:
        self.problem_code, self.problem = code, problem

    @property
    def exit_code(self) -> int:
        return self.reply.exit_code if self.reply is not None else EXIT_UNREACHABLE

    @property
    def code(self) -> str | None:
        """The reply code, or the client-side problem code when there is no reply."""
        return self.reply.code if self.reply is not None else self.problem_code


class ClientEvents(Protocol):
    """Receives the client's progress, as it happens."""

    def connected(self, local: str, remote: str, *, udp: bool) -> None: ...

    def sent(self, advertised: str, line: str) -> None: ...


class QuietEvents:
    """Ignores progress (tests, and callers that only want the result)."""

    def connected(self, local: str, remote: str, *, udp: bool) -> None:
        pass

    def sent(self, advertised: str, line: str) -> None:
        pass


class LabClientLines:
    """``student client`` output: the lab's ``Sent to Registry Server: IP:PORT``."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def connected(self, local: str, remote: str, *, udp: bool) -> None:
        pass

    def sent(self, advertised: str, line: str) -> None:
        self.out(f"Sent to Registry Server: {advertised}")


def _local_host(sockaddr: tuple[object, ...]) -> str:
    """Our address as the registry will see it (before any NAT): no zone, no v4 mapping."""
    return display_ip(str(sockaddr[0])).partition("%")[0]


def build_request(opts: ClientOptions, local_host: str) -> RegistrationRequest:
    """The registration for ``opts``; ``auto`` advertises the address we connected from."""
    host = local_host if opts.advertise == "auto" else unbracket(opts.advertise)
    check_value("advertised address", host)
    return RegistrationRequest(host, opts.port, opts.student, opts.token, opts.verify)


def _take_reply(reg: Registration, data: bytes, *, as_json: bool) -> None:
    text = data.decode("utf-8", "replace").strip()
    if not text:
        reg.fail(
            "no_reply", f"the registry at {reg.registry} closed the connection without replying"
        )
        return
    try:
        reply = parse_json_reply(text) if as_json else parse_reply(text)
    except ReplyError as exc:
        shown = printable(text[:200])
        reg.fail("bad_reply", f"the reply is not in the registry's format ({exc}): {shown}")
        return
    if reply.status == "COOKIE":
        reg.fail("bad_reply", f"unexpected cookie challenge outside UDP: {printable(text[:200])}")
        return
    reg.reply = reply
    reg.reply_text = printable(reply.to_text() if as_json else text)


async def _register_tcp(opts: ClientOptions, reg: Registration, events: ClientEvents) -> None:
    host, port = opts.registry
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        reg.fail(
            "registry_unreachable",
            f"could not connect to the registry at {reg.registry}: {os_error_text(exc)}",
        )
        return
    async with stream:
        reg.local = format_sockaddr(stream.socket.getsockname())
        try:
            remote = format_sockaddr(stream.socket.getpeername())
        except OSError:  # reset already: the send below will report it
            remote = reg.registry
        events.connected(reg.local, remote, udp=False)
        reg.request = build_request(opts, _local_host(stream.socket.getsockname()))
        reg.sent = build_json_request(reg.request) if opts.json else build_text_request(reg.request)
        # Noted before the send: send_all yields, and the callback it triggers can
        # reach our own server (and the timeline) before this task runs again.
        events.sent(reg.request.advertised, reg.sent)
        try:
            await stream.send_all(reg.sent.encode() + b"\n")
        except trio.BrokenResourceError as exc:
            reg.fail("registry_unreachable", f"the registry closed the connection: {exc}")
            return
        line = await read_line(stream, limit=REPLY_LIMIT)
    _take_reply(reg, line.data, as_json=opts.json)


async def _recv_within(sock: trio.socket.SocketType, seconds: float) -> bytes | None:
    with trio.move_on_after(seconds):
        return await sock.recv(REPLY_LIMIT)
    return None


async def _udp_exchange(sock: trio.socket.SocketType, req: RegistrationRequest) -> bytes | None:
    """Request, cookie challenge, request with cookie, final reply; ``None`` if all lost.

    A registry never answers with more bytes than it received, so the request
    is padded to what the challenge's ``pad=N`` asks for (``COOKIE pad=N``
    alone means: too short to carry a cookie, send it again padded).
    """
    cookie: str | None = None
    pad = UDP_MIN_BYTES
    waits = list(CHALLENGE_WAITS)
    while waits:
        await sock.send(pad_datagram(build_text_request(req, cookie=cookie), pad))
        data = await _recv_within(sock, waits.pop(0))
        if data is None:
            continue  # lost either way: send again after the backoff
        try:
            reply = parse_reply(data)
        except ReplyError:
            return data  # let the caller report it as a bad reply
        challenge, asked = cookie_of(reply), pad_of(reply)
        if challenge is None and asked is None:
            return data
        pad = max(pad, asked or 0)
        if challenge is not None:
            if cookie is None:
                waits = list(FINAL_WAITS)
            cookie = challenge  # the first, or a fresher one if the window turned
    return None


async def _register_udp(opts: ClientOptions, reg: Registration, events: ClientEvents) -> None:
    host, port = opts.registry
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        reg.fail(
            "registry_unreachable",
            f"could not reach the registry at {reg.registry}: {os_error_text(exc)}",
        )
        return
    with sock:
        try:
            await sock.connect(sockaddr)  # also filters: only the registry's datagrams arrive
            reg.local = format_sockaddr(sock.getsockname())
            events.connected(reg.local, format_sockaddr(sockaddr), udp=True)
            reg.request = build_request(opts, _local_host(sock.getsockname()))
            reg.sent = build_text_request(reg.request)
            events.sent(reg.request.advertised, reg.sent)
            data = await _udp_exchange(sock, reg.request)
        except OSError as exc:  # ICMP port unreachable arrives as ECONNREFUSED
            reg.fail(
                "registry_unreachable",
                f"the registry at {reg.registry} did not take the datagram: {os_error_text(exc)}",
            )
            return
    if data is None:
        reg.fail(
            "registry_timeout", f"no reply from the registry at {reg.registry} after 4 datagrams"
        )
        return
    _take_reply(reg, data, as_json=False)


async def register(opts: ClientOptions, events: ClientEvents | None = None) -> Registration:
    """Register once, within ``opts.timeout``; never raises for network trouble.

    ``ValueError`` (a bad ``--advertise``, ``--student`` or ``--token``) is the
    only exception: it is a usage error.
    """
    events = events or QuietEvents()
    reg = Registration(registry=opts.registry_text)
    with trio.move_on_after(opts.timeout if opts.timeout > 0 else math.inf):
        if opts.udp:
            await _register_udp(opts, reg, events)
        else:
            await _register_tcp(opts, reg, events)
        return reg
    reg.fail(
        "registry_timeout",
        f"no reply from the registry at {reg.registry} within {opts.timeout:g} s",
    )
    return reg


def advice_context(opts: ClientOptions, reg: Registration) -> AdviceContext:
    """What the advice needs to name the student's own addresses and values."""
    req = reg.request
    reply = reg.reply
    return AdviceContext(
        host=req.host if req else opts.advertise,
        port=req.port if req else opts.port,
        registry=reg.registry,
        sent=reg.sent,
        observed=reply.get("observed") if reply else None,
        target=reply.get("target") if reply else None,
        retry_after=reply.get("retry_after") if reply else None,
        timeout=opts.timeout,
    )


def report_lines(opts: ClientOptions, reg: Registration) -> list[str]:
    """The reply (or problem) and, unless it is OK, the block of advice."""
    lines = [reg.reply_text] if reg.reply_text is not None else [f"Error: {reg.problem}"]
    if reg.reply is not None and reg.reply.status == "OK":
        return lines
    diagnosis = reg.reply.get("diagnosis") if reg.reply else None
    return lines + format_advice(advice_for(reg.code, diagnosis, advice_context(opts, reg)))


async def run_client(
    opts: ClientOptions,
    out: Callable[[str], None],
    err: Callable[[str], None] | None = None,
) -> int:
    """Run ``student client``; return the exit status (0 OK ... 5 unreachable, 64 usage)."""
    err = err or out
    try:
        reg = await register(opts, LabClientLines(out))
    except ValueError as exc:
        err(f"student client: {exc}")
        return EXIT_USAGE
    for line in report_lines(opts, reg):
        out(line)
    return reg.exit_code
