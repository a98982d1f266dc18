"""wiretun.wireguard.conn on loopback: sticky source endpoints, replies from the address reached, and
the fall back to the routing's choice when that address is not (or no longer) local."""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

import pytest

from wiretun.linux import netlink
from wiretun.wireguard.conn import Conn, Endpoint


@pytest.fixture
def conn() -> Any:
    ns = netlink.Namespace()
    c = Conn("test", ns)
    c.bind(0, 0)
    yield c
    c.close()
    ns.close()


def _exchange(conn: Conn, family: int, host: str) -> tuple[Endpoint, socket.socket]:
    peer = socket.socket(family, socket.SOCK_DGRAM)
    peer.settimeout(5)
    peer.bind((host, 0))
    peer.sendto(b"hello", (host, conn.port))
    got: list[tuple[bytes, Any]] = []
    sock = conn.sock6 if family == socket.AF_INET6 else conn.sock4
    assert sock is not None
    select.select([sock], [], [], 5)
    assert conn.receive(sock, lambda view, source, now: got.append((bytes(view), source)), 0.0) == 1
    data, source = got[0]
    assert data == b"hello"
    assert isinstance(source, Endpoint)
    return source, peer


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_reply_leaves_from_the_address_reached(conn: Conn, family: int, host: str) -> None:
    source, peer = _exchange(conn, family, host)
    try:
        assert source.local_address == host
        assert source == tuple(source) and hash(source) == hash(tuple(source))  # a plain address to the core
        assert conn.send([(b"reply", source)]) == 1
        data, sender = peer.recvfrom(100)
        assert data == b"reply" and sender[0] == host and sender[1] == conn.port
    finally:
        peer.close()


def test_a_source_that_is_not_local_falls_back_to_the_routing(conn: Conn) -> None:
    source, peer = _exchange(conn, socket.AF_INET, "127.0.0.1")
    try:
        # As if the address it arrived at had been removed since: 192.0.2.1 is not on this host.
        stale = Endpoint(tuple(source), bytes(4) + socket.inet_aton("192.0.2.1") + bytes(4))
        assert conn.send([(b"again", stale), (b"again", stale)]) == 2  # also as a GSO train
        for _ in range(2):
            data, sender = peer.recvfrom(100)
            assert data == b"again" and sender[0] == "127.0.0.1"
        assert stale.source is None and stale.local_address is None
        assert conn.counters.udp_tx_errors == 0
    finally:
        peer.close()


def test_local_address_of_an_ipv6_source() -> None:
    info = struct.pack("=16sI", socket.inet_pton(socket.AF_INET6, "fe80::1"), 7)
    assert Endpoint(("fe80::2", 1, 0, 7), info).local_address == "fe80::1"
