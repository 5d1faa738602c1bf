"""The callback dialler: the only place the registry opens connections.

It dials the canonical address it is given (never a string a resolver could
reinterpret), sends one CALLBACK line and half-closes, optionally waits for the
nonce echo, and maps every socket error to a reply code in one table.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

import trio

from registry.config import CallbackConfig
from registry.model import Code, Endpoint
from registry.protocol.callback import EchoScanner, callback_line
from registry.service import CallResult

# errno -> FAILED code: the one mapping of I/O errors to reply codes.
_ERRNO_CODES: dict[int, Code] = {
    errno.ECONNREFUSED: Code.CONNECTION_REFUSED,
    errno.ETIMEDOUT: Code.TIMEOUT,
    errno.ENETUNREACH: Code.UNREACHABLE,
    errno.EHOSTUNREACH: Code.UNREACHABLE,
    errno.EHOSTDOWN: Code.UNREACHABLE,
    errno.ENETDOWN: Code.UNREACHABLE,
    errno.EADDRNOTAVAIL: Code.UNREACHABLE,
    errno.EAFNOSUPPORT: Code.UNREACHABLE,
    errno.EACCES: Code.UNREACHABLE,  # a local firewall rule refused the dial
    errno.EPERM: Code.UNREACHABLE,
    errno.ECONNRESET: Code.RESET,
    errno.EPIPE: Code.RESET,
    errno.ECONNABORTED: Code.RESET,
    # The registry's own resources, not the target's fault: BUSY, try again later.
    errno.EMFILE: Code.OVERLOADED,
    errno.ENFILE: Code.OVERLOADED,
    errno.ENOBUFS: Code.OVERLOADED,
    errno.ENOMEM: Code.OVERLOADED,
}


def map_os_error(e: OSError) -> Code:
    """The reply code for a socket error: a FAILED code, or OVERLOADED when the
    registry itself is out of descriptors or memory (unknown errors: unreachable)."""
    return _ERRNO_CODES.get(e.errno or 0, Code.UNREACHABLE)


class TcpConnector:
    """Dial a target over TCP with a connect timeout and a bounded verify read."""

    def __init__(self, config: CallbackConfig) -> None:
        self.config = config

    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult:
        cfg = self.config
        family = socket.AF_INET6 if target.host.version == 6 else socket.AF_INET
        started = trio.current_time()
        try:
            # Inside the try: out of descriptors (EMFILE) is an outcome, not a crash.
            with trio.socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    with trio.fail_after(cfg.connect_timeout):
                        await sock.connect((target.host.compressed, target.port))
                except trio.TooSlowError:
                    return CallResult(Code.TIMEOUT, f"no answer within {cfg.connect_timeout:g} s")
                rtt_ms = (trio.current_time() - started) * 1000.0
                stream = trio.SocketStream(sock)
                return await self._converse(stream, reg_id, nonce, rtt_ms, wait_echo)
        except OSError as e:
            return CallResult(map_os_error(e), _describe(e))

    async def _converse(
        self, stream: trio.SocketStream, reg_id: str, nonce: str, rtt_ms: float, wait_echo: bool
    ) -> CallResult:
        cfg = self.config
        line = callback_line(reg_id, nonce, cfg.greeting)
        try:
            # A target that accepts and never reads cannot hold us: the line is
            # small, and the whole send is bounded by the verify timeout.
            with trio.fail_after(max(cfg.verify_timeout, 0.5)):
                await stream.send_all(line)
        except trio.TooSlowError:
            return CallResult(Code.CONNECTED, "target did not read the callback line", rtt_ms)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return CallResult(
                Code.RESET, "the target closed before the callback line was sent", rtt_ms
            )
        # The line is all we send: say so (half-close). A server that reads until
        # the end of stream (nc, a ``while (recv(...) > 0)`` loop) then answers or
        # closes at once instead of waiting out our verify timeout.
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
        verified = False
        if wait_echo:
            verified = await self._read_echo(stream, nonce)
        with trio.move_on_after(0.5):
            await stream.aclose()
        return CallResult(Code.CONNECTED, "connected", rtt_ms, verified)

    async def _read_echo(self, stream: trio.SocketStream, nonce: str) -> bool:
        scanner = EchoScanner(nonce, self.config.max_response_bytes)
        with trio.move_on_after(self.config.verify_timeout):
            try:
                while not scanner.verified and not scanner.overflowed:
                    data = await stream.receive_some(4096)
                    scanner.feed(data)
                    if not data:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return scanner.verified


def _describe(e: OSError) -> str:
    if not e.errno:
        return str(e)
    return f"{errno.errorcode.get(e.errno, 'error')}: {os.strerror(e.errno)}"
