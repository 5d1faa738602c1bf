"""``server.workers``' pure and kernel parts: the reuseport steering program against
the kernel (each source reaches the socket ``worker_index`` names, IPv6 by its
prefix), a worker's share of the limits, the ``server.workers`` key, and the
store's feed of rows (``Store.after``) the supervisor reads.

Traffic goes to 127.0.0.0/8 only, or to a namespace the test creates (IPv6 sources).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import sys
from pathlib import Path

import pytest

from registry import config as config_mod
from registry.errors import ConfigError
from registry.group import split_limits
from registry.model import Rate
from registry.net.kernel.reuseport import open_group, steering_program, worker_index
from registry.store import Store
from tests.netns import netns_lab, require_netns
from tests.test_store import T0, rec

# --- the steering program, against the kernel -----------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
@pytest.mark.parametrize("n", [2, 3])
def test_kernel_steers_each_source_to_the_socket_worker_index_names(kind: int, n: int) -> None:
    socks = open_group("127.0.0.1", 0, n, kind=kind)
    port = socks[0].getsockname()[1]
    seen: dict[int, int] = {}
    try:
        for last in range(1, 41):
            src = f"127.0.0.{last}"
            with socket.socket(socket.AF_INET, kind) as c:
                c.bind((src, 0))
                if kind == socket.SOCK_STREAM:
                    c.connect(("127.0.0.1", port))
                else:
                    c.sendto(b"x", ("127.0.0.1", port))
                ready, _, _ = select.select(socks, [], [], 5)
                assert len(ready) == 1, src
                if kind == socket.SOCK_STREAM:
                    ready[0].accept()[0].close()
                else:
                    ready[0].recvfrom(16)
            got = socks.index(ready[0])
            assert got == worker_index(ipaddress.ip_address(src), n, 64), src
            seen[got] = seen.get(got, 0) + 1
    finally:
        for s in socks:
            s.close()
    assert sorted(seen) == list(range(n)), f"every worker gets sources: {seen}"


@pytest.mark.parametrize(
    ("a", "b", "prefix", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", 64, True),  # one /64: one worker
        ("2001:db8:1:2::1", "2001:db8:1:2::1", 128, True),
        ("::ffff:127.0.0.7", "127.0.0.7", 64, True),  # a mapped IPv4 is that IPv4
    ],
)
def test_worker_index_keys_like_the_rate_limiter(a: str, b: str, prefix: int, same: bool) -> None:
    for n in (2, 3, 4, 7):
        ia = worker_index(ipaddress.ip_address(a), n, prefix)
        ib = worker_index(ipaddress.ip_address(b), n, prefix)
        assert (ia == ib) is same
        assert 0 <= ia < n


def test_worker_index_spreads_sources_and_one_worker_is_index_0() -> None:
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[worker_index(ipaddress.ip_address(f"10.{i >> 8}.{i & 255}.1"), 4, 64)] += 1
    assert min(counts) > 800, counts  # about 1000 each
    assert worker_index(ipaddress.ip_address("192.0.2.1"), 1, 64) == 0


def test_steering_program_v6_reads_only_the_prefix_words() -> None:
    loads = [i for i in steering_program(socket.AF_INET6, 2, 64) if i[0] == 0x20]
    assert len(loads) == 2  # the /64: two words
    assert len([i for i in steering_program(socket.AF_INET6, 2, 48) if i[0] == 0x20]) == 2
    assert len([i for i in steering_program(socket.AF_INET6, 2, 128) if i[0] == 0x20]) == 4


# --- config ---------------------------------------------------------------------------


def test_split_limits_divides_global_limits_and_keeps_per_source_ones() -> None:
    cfg = config_mod.loads(
        '[ratelimit]\nglobal = "101/second"\nper_source = "5/minute"\n'
        "[limits]\nmax_connections = 100\nmax_callbacks_in_flight = 9\n"
        "max_connections_per_source = 60\n"
    )
    w = split_limits(cfg, 2)
    assert w.ratelimit.global_ == Rate(51, 1.0)
    assert w.ratelimit.per_source == Rate(5, 60.0)
    assert w.limits.max_callbacks_in_flight == 5
    assert w.limits.max_connections == 60  # never below the per-source cap
    assert w.limits.max_connections_per_source == 60
    assert w.udp.unproven_global == Rate(250, 1.0)  # the profile's 500/second, halved
    assert w.server.admin == "off"  # the supervisor's
    assert config_mod._semantic_problems(w) == []  # still a valid config


@pytest.mark.parametrize(
    ("value", "ok"), [(0, True), (1, True), (64, True), (65, False), (-1, False)]
)
def test_workers_key_is_validated(value: int, ok: bool) -> None:
    text = f"[server]\nworkers = {value}\n"
    if ok:
        assert config_mod.loads(text).server.workers == value
    else:
        with pytest.raises(ConfigError, match="server.workers"):
            config_mod.loads(text)


def test_store_after_reads_other_writers_rows_in_commit_order_once(tmp_path: Path) -> None:
    """The supervisor's feed: rows two writers commit, each seen once, in commit order,
    even when an older received_at commits later."""
    path = str(tmp_path / "r.db")
    a, b, reader = Store.open(path), Store.open(path), Store.open(path)
    try:
        assert reader.last_seq() == 0
        a.record_many([rec(1, received_at=T0 + 5)])
        start = reader.last_seq()
        b.record_many([rec(2, received_at=T0 + 9)])
        a.record_many([rec(3, received_at=T0 + 1)])  # received earlier, committed later
        seq, rows = reader.after(start)
        assert [r.id for r in rows] == ["r2", "r3"]
        assert reader.after(seq) == (seq, [])
        b.record_many([rec(4)])
        seq2, rows = reader.after(seq, limit=5)
        assert [r.id for r in rows] == ["r4"] and seq2 > seq
        assert [r.id for r in reader.after(0, limit=2)[1]] == ["r1", "r2"]
    finally:
        for s in (a, b, reader):
            s.close()


_V6_PROBE = """
import ipaddress, select, socket, sys
from registry.net.kernel.reuseport import attach_steering, open_group, worker_index
n, prefix = int(sys.argv[1]), int(sys.argv[2])
socks = open_group("::1", 0, n, kind=socket.SOCK_STREAM, v6_prefix=128)
attach_steering(socks[0], n, prefix)  # what a reload of ipv6_prefix does: it replaces
port = socks[0].getsockname()[1]
for src in sys.argv[3:]:
    with socket.socket(socket.AF_INET6) as c:
        c.bind((src, 0))
        c.connect(("::1", port))
        ready, _, _ = select.select(socks, [], [], 5)
        ready[0].accept()[0].close()
        print(src, socks.index(ready[0]), worker_index(ipaddress.ip_address(src), n, prefix))
"""


@pytest.mark.parametrize("prefix", [64, 48])
def test_kernel_steers_ipv6_sources_by_their_prefix(prefix: int) -> None:
    """IPv6 sources from many networks, in a namespace of the test's own (only ::1 is on
    the host's loopback): the kernel's choice is worker_index's, and one network's
    addresses share a worker, after the program was replaced (a reload's re-attach)."""
    require_netns("workers")
    sources = [f"2001:db8:{a:x}:{b:x}::{c:x}" for a in (1, 2) for b in range(1, 9) for c in (1, 2)]
    with netns_lab("kernel-workers") as lab:
        lab.add(f"v6-{prefix}")
        for src in sources:
            lab.ip(f"v6-{prefix}", "addr", "add", f"{src}/128", "dev", "lo", "nodad")
        probe = [sys.executable, "-c", _V6_PROBE, "3", str(prefix), *sources]
        out = lab.exec_ok(f"v6-{prefix}", *probe)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == len(sources)
    assert all(got == expected for _, got, expected in rows), rows
    assert len({got for _, got, _ in rows}) > 1, "the sources all reached one worker"
    by_net: dict[str, set[str]] = {}
    for src, got, _ in rows:
        net = ipaddress.ip_network(f"{src}/{prefix}", strict=False)
        by_net.setdefault(str(net), set()).add(got)
    assert all(len(workers) == 1 for workers in by_net.values()), by_net
