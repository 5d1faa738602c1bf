"""Reference registry (c): minimal trio (trio.serve_tcp, no validation, no logging).

The only addition to the bare minimum is the try/except: without it one bad
request (e.g. a single garbage byte, or a callback address that refuses)
raises out of the handler and takes the whole trio.serve_tcp server down
(run with --bare to see that).  serve_tcp closes the client stream when the
handler returns.  Usage: python registry_trio.py PORT [--bare] [--rawcb]
"""

import functools
import sys

import trio


async def handler(stream):
    data = (await stream.receive_some(1024)).decode().split()[0]  # "IP:PORT verify=no"
    ip, port = data.split(":")
    if not ip.startswith("127."):  # a baseline dials loopback only, whoever asks
        return
    cb = await trio.open_tcp_stream(ip, int(port))
    await cb.send_all(b"HELLO from registry\n")
    await cb.aclose()
    await stream.send_all(f"OK {ip}:{port}\n".encode())


async def handler_rawcb(stream):
    """Variant (extra row): same cycle, but the callback uses trio.socket
    directly instead of trio.open_tcp_stream (no happy-eyeballs machinery,
    no getaddrinfo, no nursery)."""
    data = (await stream.receive_some(1024)).decode().split()[0]
    ip, port = data.split(":")
    if not ip.startswith("127."):  # a baseline dials loopback only, whoever asks
        return
    with trio.socket.socket() as s:
        await s.connect((ip, int(port)))
        await s.send(b"HELLO from registry\n")
    await stream.send_all(f"OK {ip}:{port}\n".encode())


async def guarded(stream):
    try:
        await HANDLER(stream)
    except Exception:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1])
    HANDLER = handler_rawcb if "--rawcb" in sys.argv else handler
    h = HANDLER if "--bare" in sys.argv else guarded
    trio.run(functools.partial(trio.serve_tcp, h, port, host="127.0.0.1"))
