"""A small pure reader of tcpdump's pcap files: the TCP handshakes in them.

Enough for the NAT lab's capture (``tcpdump -w`` on veths: classic pcap,
Ethernet or Linux "cooked" link layer, IPv4 or IPv6, TCP): every segment with
SYN, RST or FIN set, as a :class:`Segment` value, and a one-line rendering of
each. Pure: bytes in, values out, so it is tested on hand-built files.

Usage: ``python examples/pcapread.py FILE.pcap...`` prints the handshakes.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL = 1, 101, 113
_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10))


class PcapError(ValueError):
    """The file is not a pcap this reader understands (pcapng, truncated, ...)."""


@dataclass(frozen=True)
class Segment:
    """One TCP segment: time (s since the first packet), addresses, ports, flag names."""

    t: float
    src: str
    sport: int
    dst: str
    dport: int
    flags: frozenset[str]

    @property
    def kind(self) -> str:
        if "RST" in self.flags:
            return "RST"
        if "SYN" in self.flags:
            return "SYN-ACK" if "ACK" in self.flags else "SYN"
        if "FIN" in self.flags:
            return "FIN"
        return "ACK" if self.flags == {"ACK"} else "+".join(sorted(self.flags)) or "-"

    def render(self) -> str:
        return f"{f'+{self.t * 1000:.3f}ms':>10}  {self.kind:<7} {_ep(self.src, self.sport)} > {_ep(self.dst, self.dport)}"


def _ep(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def segments(data: bytes) -> list[Segment]:
    """Every TCP segment in a classic pcap file's bytes (other packets are skipped)."""
    if len(data) < 24 or data[:4] not in _MAGIC:
        raise PcapError("not a classic pcap file (tcpdump -w writes one)")
    order, unit = _MAGIC[data[:4]]
    linktype = struct.unpack(order + "I", data[20:24])[0] & 0x0FFFFFFF
    found: list[Segment] = []
    pos, first = 24, None
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(order + "IIII", data[pos : pos + 16])
        pos += 16
        frame = data[pos : pos + caplen]
        if len(frame) < caplen:
            raise PcapError("truncated packet record")
        pos += caplen
        t = sec + frac * unit
        first = t if first is None else first
        seg = _tcp(_network(linktype, frame), t - first)
        if seg is not None:
            found.append(seg)
    return found


def _network(linktype: int, frame: bytes) -> tuple[int, bytes]:
    """(ethertype, network-layer bytes) of a frame."""
    if linktype == LINKTYPE_ETHERNET:
        etype, off = struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else 0, 14
        while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:  # VLAN tags
            etype, off = struct.unpack("!H", frame[off + 2 : off + 4])[0], off + 4
        return etype, frame[off:]
    if linktype == LINKTYPE_LINUX_SLL:
        return (struct.unpack("!H", frame[14:16])[0] if len(frame) >= 16 else 0), frame[16:]
    if linktype == LINKTYPE_RAW and frame:
        return (0x0800 if frame[0] >> 4 == 4 else 0x86DD), frame
    return 0, b""


def _tcp(net: tuple[int, bytes], t: float) -> Segment | None:
    etype, pkt = net
    if etype == 0x0800 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != 6 or len(pkt) < ihl + 14:
            return None
        src, dst, tcp = pkt[12:16], pkt[16:20], pkt[ihl:]
    elif etype == 0x86DD and len(pkt) >= 40:
        if pkt[6] != 6 or len(pkt) < 54:  # extension headers: not in this lab
            return None
        src, dst, tcp = pkt[8:24], pkt[24:40], pkt[40:]
    else:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    flags = frozenset(name for name, bit in _FLAGS if tcp[13] & bit)
    return Segment(
        t, str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport, flags
    )


def handshakes(segs: list[Segment]) -> list[Segment]:
    """The segments that open, refuse or reset connections (SYN, SYN-ACK, RST)."""
    return [s for s in segs if s.flags & {"SYN", "RST"}]


def read(path: str | Path) -> list[Segment]:
    return segments(Path(path).read_bytes())


def main(argv: list[str]) -> int:
    for name in argv:
        print(f"{name}:")
        for seg in handshakes(read(name)):
            print("  " + seg.render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
