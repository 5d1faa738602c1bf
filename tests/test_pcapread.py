"""examples/pcapread.py: the pure pcap reader, on hand-built capture files."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from examples.pcapread import PcapError, Segment, handshakes, segments

SYN, ACK, RST, FIN, PSH = 0x02, 0x10, 0x04, 0x01, 0x08


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def ipv4(src: str, dst: str, payload: bytes, proto: int = 6) -> bytes:
    head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0)
    return head + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload


def ipv6(src: str, dst: str, payload: bytes) -> bytes:
    head = struct.pack("!IHBB", 6 << 28, len(payload), 6, 64)
    return head + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload


def ether(net: bytes, etype: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", etype) + net


def sll(net: bytes, etype: int = 0x0800) -> bytes:
    return b"\x00" * 14 + struct.pack("!H", etype) + net


def pcap(linktype: int, frames: list[tuple[float, bytes]], order: str = "<") -> bytes:
    magic = 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for t, frame in frames:
        sec, usec = int(t), round((t - int(t)) * 1e6)
        out += struct.pack(order + "IIII", sec, usec, len(frame), len(frame)) + frame
    return out


@pytest.mark.parametrize(
    ("linktype", "frame", "want"),
    [
        (
            1,
            ether(ipv4("198.51.100.1", "198.51.100.2", tcp(40000, 15100, SYN))),
            ("198.51.100.1", 40000, "198.51.100.2", 15100, "SYN"),
        ),
        (
            1,
            ether(ipv4("10.0.0.2", "10.0.0.1", tcp(15100, 40000, SYN | ACK))),
            ("10.0.0.2", 15100, "10.0.0.1", 40000, "SYN-ACK"),
        ),
        (
            113,
            sll(ipv4("203.0.113.2", "203.0.113.1", tcp(15000, 5555, RST | ACK))),
            ("203.0.113.2", 15000, "203.0.113.1", 5555, "RST"),
        ),
        (
            1,
            ether(ipv6("2001:db8::1", "2001:db8::2", tcp(1, 2, FIN | ACK)), 0x86DD),
            ("2001:db8::1", 1, "2001:db8::2", 2, "FIN"),
        ),
        (
            101,
            ipv4("192.0.2.1", "192.0.2.2", tcp(3, 4, PSH | ACK)),
            ("192.0.2.1", 3, "192.0.2.2", 4, "ACK+PSH"),
        ),
        (
            1,
            b"\x02" * 12
            + b"\x81\x00\x00\x05\x08\x00"
            + ipv4("192.0.2.1", "192.0.2.9", tcp(7, 8, ACK)),
            ("192.0.2.1", 7, "192.0.2.9", 8, "ACK"),
        ),
    ],
)
def test_one_segment_per_frame(linktype: int, frame: bytes, want: tuple) -> None:
    for order in ("<", ">"):
        (seg,) = segments(pcap(linktype, [(100.0, frame)], order))
        assert (seg.src, seg.sport, seg.dst, seg.dport, seg.kind) == want


@pytest.mark.parametrize(
    "frame",
    [
        ether(ipv4("192.0.2.1", "192.0.2.2", b"\x00" * 8, proto=17)),  # UDP
        ether(b"\x00" * 28, 0x0806),  # ARP
        ether(b""),  # nothing after the Ethernet header
        b"\x00\x01",  # runt frame
    ],
)
def test_other_packets_are_skipped(frame: bytes) -> None:
    assert segments(pcap(1, [(1.0, frame)])) == []


def test_times_are_relative_to_the_first_packet_and_handshakes_filter() -> None:
    frames = [
        (10.0, ether(ipv4("192.0.2.1", "192.0.2.2", tcp(5, 6, SYN)))),
        (10.25, ether(ipv4("192.0.2.2", "192.0.2.1", tcp(6, 5, SYN | ACK)))),
        (10.5, ether(ipv4("192.0.2.1", "192.0.2.2", tcp(5, 6, ACK)))),
        (11.0, ether(ipv4("192.0.2.2", "192.0.2.1", tcp(6, 5, RST)))),
    ]
    segs = segments(pcap(1, frames))
    assert [round(s.t, 3) for s in segs] == [0.0, 0.25, 0.5, 1.0]
    assert [s.kind for s in handshakes(segs)] == ["SYN", "SYN-ACK", "RST"]
    assert handshakes(segs)[1].render() == "+250.000ms  SYN-ACK 192.0.2.2:6 > 192.0.2.1:5"


def test_ipv6_endpoints_render_in_brackets() -> None:
    seg = Segment(0.0, "2001:db8::1", 1, "2001:db8::2", 2, frozenset({"SYN"}))
    assert seg.render().endswith("SYN     [2001:db8::1]:1 > [2001:db8::2]:2")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x0a\x0d\x0d\x0a" + b"\x00" * 40,  # pcapng
        pcap(1, [(1.0, ether(ipv4("192.0.2.1", "192.0.2.2", tcp(1, 2, SYN))))])[:-5],
    ],
)
def test_bad_files_are_refused_clearly(data: bytes) -> None:
    with pytest.raises(PcapError):
        segments(data)
