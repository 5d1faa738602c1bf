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
from registry.net.tcp import RawStream
from registry.protocol.callback import EchoScanner, callback_line
from registry.service import CallResult

# errno -> reply code, the one mapping of I/O errors to reply codes. Any other
# error (ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL, EACCES or EPERM from a local
# firewall rule, ...) is UNREACHABLE.
_ERRNO_CODES: dict[int, Code] = {
    errno.ECONNREFUSED: Code.CONNECTION_REFUSED,
    errno.ETIMEDOUT: Code.TIMEOUT,
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
    return _ERRNO_CODES.get(e.errno or 0, Code.UNREACHABLE)


class TcpConnector:
    """Dial a target over TCP with a connect timeout and a bounded verify read.

    On the path of every registration, so on a plain non-blocking socket: no
    ``trio.SocketStream`` options, no ``trio.socket`` re-resolution (the target
    is a canonical IP address), and a deadline only around a wait that happens
    (each cancel scope costs a few µs).
    """

    def __init__(self, config: CallbackConfig) -> None:
        self.config = config

    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult:
        cfg = self.config
        family = socket.AF_INET6 if target.host.version == 6 else socket.AF_INET
        started = trio.current_time()
        try:  # out of descriptors (EMFILE) is an outcome, not a crash
            sock = socket.SocketType(  # bare, as the accept loop's (accept.py)
                family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        except OSError as e:
            return CallResult(map_os_error(e), describe(e))
        stream = RawStream(sock)
        line = callback_line(reg_id, nonce, cfg.greeting)
        sent = 0
        try:
            err = sock.connect_ex((target.host.compressed, target.port))
            if err == errno.EINPROGRESS:
                try:  # a handshake the kernel completed inside connect() (loopback, a
                    # namespace on this host) takes the line at once: no wait, no epoll
                    sent, err = sock.send(line, socket.MSG_DONTWAIT), 0
                except BlockingIOError:  # still connecting
                    with trio.move_on_at(started + cfg.connect_timeout):
                        await stream.wait_writable()
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == errno.EINPROGRESS:
                        return CallResult(
                            Code.TIMEOUT, f"no answer within {cfg.connect_timeout:g} s"
                        )
                except OSError as e:  # refused (or reset) before we could wait
                    err = e.errno or errno.ECONNREFUSED
            if err:
                e = OSError(err, os.strerror(err))
                return CallResult(map_os_error(e), describe(e))
            rtt_ms = (trio.current_time() - started) * 1000.0
            rest = line[sent or stream.send_now(line) :]
            if not rest and not wait_echo:  # nothing left to wait for: no deadline to set
                # and no half-close: the close() below sends the FIN a shutdown() would
                return CallResult(Code.CONNECTED, "connected", rtt_ms)
            return await self._converse(stream, reg_id, nonce, rtt_ms, wait_echo, rest)
        finally:
            stream.close()

    async def _converse(
        self,
        stream: RawStream,  # or any stream with its four methods (tests script one)
        reg_id: str,
        nonce: str,
        rtt_ms: float,
        wait_echo: bool,
        line: bytes | None = None,  # what is left to send of the callback line
    ) -> CallResult:
        cfg = self.config
        line = callback_line(reg_id, nonce, cfg.greeting) if line is None else line
        verified = sent = False
        # One deadline for the conversation. A target that accepts and never
        # reads cannot hold us: the line is small, and its send is bounded by the
        # verify timeout (never below 0.5 s, so a slow but honest server can take
        # it); the echo then has the verify timeout from the moment it was sent.
        with trio.CancelScope(deadline=trio.current_time() + max(cfg.verify_timeout, 0.5)) as scope:
            try:
                await stream.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return CallResult(
                    Code.RESET, "the target closed before the callback line was sent", rtt_ms
                )
            sent = True
            # The line is all we send: say so (half-close). A server that reads until
            # the end of stream (nc, a ``while (recv(...) > 0)`` loop) then answers or
            # closes at once instead of waiting out our verify timeout.
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_eof()
            if wait_echo:
                scope.deadline = trio.current_time() + cfg.verify_timeout
                verified = await self._read_echo(stream, nonce)
        if scope.cancelled_caught and not sent:
            return CallResult(Code.CONNECTED, "target did not read the callback line", rtt_ms)
        await stream.aclose()
        return CallResult(Code.CONNECTED, "connected", rtt_ms, verified)

    async def _read_echo(self, stream: RawStream, nonce: str) -> bool:
        """Read until the nonce is seen, EOF, or the byte cap (the caller's deadline bounds it)."""
        scanner = EchoScanner(nonce, self.config.max_response_bytes)
        try:
            while not scanner.verified and not scanner.overflowed:
                data = await stream.receive_some(4096)
                scanner.feed(data)
                if not data:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return scanner.verified


def describe(e: OSError) -> str:
    if not e.errno:
        return str(e)
    return f"{errno.errorcode.get(e.errno, 'error')}: {os.strerror(e.errno)}"
