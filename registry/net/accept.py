"""The accept loop shared by the registration and admin listeners.

A connection slot is taken BEFORE accept(): beyond the cap, clients wait in
the kernel's listen backlog and cost us no file descriptor. accept() errors
that mean "out of some resource" (EMFILE and friends) back off briefly
instead of spinning, as trio's serve_listeners does.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger(component="accept")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
BACKOFF_S = 0.1


async def accept_loop(
    listener: trio.SocketListener,
    admission: trio.CapacityLimiter,
    spawn: Callable[[trio.SocketStream, object], None],
    *,
    name: str,
) -> None:
    """Accept forever; ``spawn(stream, token)`` owns the slot ``token`` and must release it."""
    while True:
        token = object()
        await admission.acquire_on_behalf_of(token)
        try:
            stream = await listener.accept()
        except OSError as e:
            admission.release_on_behalf_of(token)
            if e.errno in CAPACITY_ERRNOS:
                log.error("accept_capacity", listener=name, error=e.strerror)
                await trio.sleep(BACKOFF_S)
                continue
            raise
        except BaseException:
            admission.release_on_behalf_of(token)
            raise
        spawn(stream, token)
