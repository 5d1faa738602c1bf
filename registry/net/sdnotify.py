"""systemd's sd_notify protocol in a few stdlib lines (no libsystemd needed).

With ``Type=notify`` the service manager passes ``$NOTIFY_SOCKET``; we send
``READY=1`` once listening, ``STOPPING=1`` when draining, ``RELOADING=1`` /
``READY=1`` around a reload and ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` when the unit asks for a watchdog.
"""

from __future__ import annotations

import os
import socket
import time

import trio


class Notifier:
    """Sends sd_notify datagrams; a no-op when $NOTIFY_SOCKET is unset."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace socket
            addr = "\0" + addr[1:]
        self.address = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2_000_000 if wanted else None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False (never an exception) when it cannot be delivered."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """WATCHDOG=1 every watchdog_interval, until cancelled (run it when one is set)."""
        while self.watchdog_interval:
            self.watchdog()
            await trio.sleep(self.watchdog_interval)
