"""Sticky source addresses: replies leave from the local address the peer last reached, and when that
address goes, from the one the routing picks ("sticky, but not too sticky"). On wiretun (in-process,
``wiretun-wg``) and on Debian's wireguard-go, which sticks too, so the test is known to test something.

The node under test has two addresses on its end of the wire and learns its peer's endpoint; the peer
(wireguard-go) reaches it at one address, then the other. What leaves the node is captured on the
peer's side with tcpdump; the peer's ``wg show`` endpoint says where the replies came from (it roams
to whatever source authenticates). Then each address is removed in turn while traffic goes on.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from typing import Iterator

import pytest

from .wgutil import WIREGUARD_GO, Lab, bracket, iperf, nsx, ping, wait_for

pytestmark = pytest.mark.skipif(
    WIREGUARD_GO is None or any(shutil.which(t) is None for t in ("wg", "tcpdump", "iperf3", "ss")),
    reason="needs wireguard-go, wg, tcpdump, iperf3 and ss",
)


@contextlib.contextmanager
def sources(ns: str, ifname: str, port: int, *, other_than: str | None = None) -> Iterator[list[str]]:
    """Source addresses of the UDP datagrams from ``port`` seen on ``ifname`` in ``ns`` during the
    block (filled in when it ends); with ``other_than``, only those from any other address."""
    found: list[str] = []
    expression = f"udp and src port {port}" + (f" and not src host {other_than}" if other_than else "")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "tcpdump", "-i", ifname, "-n", "-l", "-p", "-U", "--immediate-mode",
         expression],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        for _ in range(5):  # "listening on ...": capturing from here on
            line = proc.stderr.readline()
            if "listening" in line or not line:
                break
        assert "listening" in line, line
        yield found
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    for text in out.splitlines():
        fields = text.split()
        if len(fields) > 2 and fields[1] in ("IP", "IP6"):
            found.append(fields[2].rsplit(".", 1)[0])


@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("kind", ["inproc", "daemon", "wggo"])
def test_replies_leave_from_the_address_the_peer_reached(lab: Lab, kind: str, outer: int) -> None:
    left_ns, right_ns = lab.namespace(), lab.namespace()
    wire = lab.wire(left_ns, right_ns)
    # Two addresses on the node's end; with promote_secondaries the second keeps the subnet route
    # when the first goes.
    first = wire.a4 if outer == 4 else wire.a6
    second = wire.a4 + "1" if outer == 4 else wire.a6 + "1"
    nsx(left_ns, "sysctl", "-qw", "net.ipv4.conf.all.promote_secondaries=1",
        f"net.ipv4.conf.{wire.a_if}.promote_secondaries=1")
    prefix = "/24" if outer == 4 else "/64"
    extra = () if outer == 4 else ("nodad",)
    nsx(left_ns, "ip", "addr", "add", second + prefix, "dev", wire.a_if, *extra)

    node = lab.node(kind, left_ns, 51031)
    peer = lab.node("wggo", right_ns, 51032)
    node.add_peer(peer)  # no endpoint: learnt from the peer
    peer.add_peer(node, first)

    def reached(address: str) -> None:
        peer.set("peer", node.public, "endpoint", f"{bracket(address)}:{node.port}")

    def endpoint_seen_by_peer() -> str:
        return peer.peer(node).endpoint

    # The peer reaches the first address: replies come from it.
    with sources(right_ns, wire.b_if, node.port) as seen:
        assert ping(right_ns, node.inner4, 3) == 3
        assert ping(left_ns, peer.inner4, 3) == 3
    assert seen and set(seen) == {first}, seen
    # Then the second one: replies follow, and the peer's endpoint stays there.
    reached(second)
    with sources(right_ns, wire.b_if, node.port) as seen:
        assert ping(right_ns, node.inner6, 3) == 3
        assert ping(left_ns, peer.inner6, 3) == 3
    assert seen and set(seen) == {second}, seen
    assert endpoint_seen_by_peer() == f"{bracket(second)}:{node.port}"
    if kind != "wggo":
        # Bulk both ways (UDP GSO trains leave the node): still from the second address, every datagram.
        trains = node.stats()["udp_tx_trains"] if node.device is not None else 0
        with sources(right_ns, wire.b_if, node.port, other_than=second) as stray:
            assert iperf(peer, node, peer.inner4) > 1_000_000
            assert iperf(peer, node, peer.inner4, reverse=True) > 1_000_000
        assert stray == [], stray[:5]
        if node.device is not None:
            assert node.stats()["udp_tx_trains"] > trains
        assert endpoint_seen_by_peer() == f"{bracket(second)}:{node.port}"

    if kind == "wggo" and outer == 4:
        # Debian's wireguard-go (0.0.20220316) keeps sending from a removed IPv4 address (the kernel
        # says ENETUNREACH) until a handshake retransmission clears it, so the steps below fail there
        # (IPv6 passes). Upstream (f333402), checked by hand, passes them, but only because it does
        # not stick at all here: its replies leave from the routing's choice in every step above.
        return
    # The second address goes while the tunnel is in use: the node's next packets leave from the
    # first one, the peer roams there, traffic goes on both ways.
    nsx(left_ns, "ip", "addr", "del", second + prefix, "dev", wire.a_if)
    with sources(right_ns, wire.b_if, node.port) as seen:
        assert ping(left_ns, peer.inner4, 3) == 3
        assert ping(right_ns, node.inner4, 3) == 3
    assert seen and set(seen) == {first}, seen
    wait_for(lambda: endpoint_seen_by_peer() == f"{bracket(first)}:{node.port}", 5, "the peer to roam back")

    # And the other way round: the second address back, the first one removed.
    nsx(left_ns, "ip", "addr", "add", second + prefix, "dev", wire.a_if, *extra)
    nsx(left_ns, "ip", "addr", "del", first + prefix, "dev", wire.a_if)
    with sources(right_ns, wire.b_if, node.port) as seen:
        assert ping(left_ns, peer.inner4, 3) == 3
        assert ping(right_ns, node.inner6, 3) == 3
    assert seen and set(seen) == {second}, seen
    assert endpoint_seen_by_peer() == f"{bracket(second)}:{node.port}"
    if node.device is not None:
        stats = node.stats()
        assert stats["udp_tx_errors"] == 0, stats  # a vanished source is retried, never dropped
