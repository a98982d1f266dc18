"""Big MTUs and unlimited-rate UDP through a tunnel: the interface MTU raised to ~34 KB on both sides
(and back), TCP and ``iperf3 -u -b 0`` both ways, over IPv4 and IPv6 outer transport; the daemon lives
on, and the counters agree: what one side's ``ip -s link`` and ``wg show transfer`` say it sent, the
other side says it received, less what iperf3 reports lost.

The node under test is ``wiretun-wg`` or (so the test is known to test something) Debian's
wireguard-go; the other side is wireguard-go. ``make test`` moves tens of MB per case;
``make soak`` sets WIRETUN_WG_BYTES=1G (1 GB each way per case).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, nsx, pair, ping, stream_tcp, wait_for

pytestmark = pytest.mark.skipif(
    WIREGUARD_GO is None or any(shutil.which(t) is None for t in ("wg", "iperf3", "ss")),
    reason="needs wireguard-go, wg, iperf3 and ss",
)

BIG_MTU = 34000
WIRE_MTU = BIG_MTU + 100  # room for the outer IPv6 + UDP + WireGuard headers: nothing is fragmented
UDP_PAYLOAD = 30000  # one iperf3 datagram: an inner packet of ~30 KB
SLACK_PACKETS = 16  # keepalives, handshakes, IPv6 housekeeping on the interfaces during a run
WG_OVERHEAD = 32  # message header + tag
KEEPALIVE = 32


def amount() -> int:
    """Bytes per transfer: WIRETUN_WG_BYTES (e.g. 1G, 200M), default 24 MB."""
    text = os.environ.get("WIRETUN_WG_BYTES", "24M").strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


@dataclass
class Sample:
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    wg_rx: int
    wg_tx: int


def sample(node: Node, other: Node) -> Sample:
    link = json.loads(nsx(node.ns, "ip", "-j", "-s", "link", "show", "dev", node.ifname).stdout)[0]["stats64"]
    peer = node.peer(other)
    return Sample(link["tx"]["packets"], link["tx"]["bytes"], link["rx"]["packets"], link["rx"]["bytes"],
                  peer.rx, peer.tx)


def settled(node: Node, other: Node) -> Sample:
    """A sample once the counters stop moving (iperf3 returns when the last bytes are written, not
    delivered); bounded to 20 s."""
    last = sample(node, other)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = sample(node, other)
        if now == last:
            return now
        last = now
    return last


def set_mtu(nodes: tuple[Node, Node], mtu: int) -> None:
    for node in nodes:
        nsx(node.ns, "ip", "link", "set", node.ifname, "mtu", str(mtu))


def run_iperf(server: Node, client: Node, address: str, size: int, *, udp: bool) -> dict:
    """One iperf3 run of ``size`` bytes from ``client`` to ``server`` (``-u -b 0`` with ``udp``)."""
    port = random.randint(20000, 40000)
    srv = subprocess.Popen(["ip", "netns", "exec", server.ns, "iperf3", "-s", "-1", "-B", address, "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: nsx(server.ns, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), 10, "iperf3 to listen")
        argv = ["iperf3", "-c", address, "-p", str(port), "-n", str(size), "-J", "--connect-timeout", "5000"]
        if udp:
            argv += ["-u", "-b", "0", "-l", str(UDP_PAYLOAD)]
        # Generous: 2 MB/s at the least, on a loaded machine.
        r = nsx(client.ns, *argv, check=False, timeout=60 + size / (2 << 20))
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
        return result["end"]
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


def tcp_transfer(server: Node, client: Node, address: str, size: int) -> int:
    """Send ``size`` bytes of a known pattern over TCP from ``client`` to ``server``'s ``address``;
    returns how many arrived, after checking their digest (bounded in time)."""
    pattern = bytes(random.Random(size).randrange(256) for _ in range(1 << 16))
    expected = hashlib.sha256()

    def pieces() -> Iterator[memoryview]:
        left = size
        view = memoryview(pattern)
        while left > 0:
            piece = view[: min(left, len(pattern))]
            expected.update(piece)
            left -= len(piece)
            yield piece

    n, digest = stream_tcp(client.ns, server.ns, address, pieces(), timeout=60 + size / (2 << 20))
    assert n != size or digest == expected.hexdigest(), "the bytes arrived changed"
    return n


def check_counters(sender: tuple[Sample, Sample], receiver: tuple[Sample, Sample], *, sent: int, received: int,
                   datagram: int) -> None:
    """Packets (datagrams of ``datagram`` bytes on the wire) went sender -> receiver; the client sent
    ``sent`` and the server got ``received`` of them. Interfaces and WireGuard counters must agree."""
    s_if = sender[1].tx_packets - sender[0].tx_packets
    r_if = receiver[1].rx_packets - receiver[0].rx_packets
    s_wg = sender[1].wg_tx - sender[0].wg_tx
    r_wg = receiver[1].wg_rx - receiver[0].wg_rx
    lost = sent - received
    facts = {"sent": sent, "received": received, "lost": lost, "s_if": s_if, "r_if": r_if, "s_wg": s_wg,
             "r_wg": r_wg}
    # Every packet iperf3 got passed the receiver's interface, which got no more than the sender's
    # interface took, which took no more than the client sent.
    assert received <= r_if + SLACK_PACKETS, facts
    assert r_if <= s_if + SLACK_PACKETS, facts
    assert s_if <= sent + SLACK_PACKETS, facts
    # What went missing between the two interfaces is part of what iperf3 reports lost.
    assert s_if - r_if <= lost + SLACK_PACKETS, facts
    # WireGuard's bytes: the receiver's rx is the sender's tx less whole lost datagrams, and it covers
    # every packet the receiving interface got.
    slack = SLACK_PACKETS * (148 + KEEPALIVE)
    assert 0 <= s_wg - r_wg + slack, facts
    assert s_wg - r_wg <= (s_if - r_if + SLACK_PACKETS) * datagram + slack, facts
    # Bytes: each datagram is larger than the packet inside it, so WireGuard's counters cover the
    # interfaces' on both sides (iperf3's control connection adds a few small packets both ways).
    s_bytes = sender[1].tx_bytes - sender[0].tx_bytes
    r_bytes = receiver[1].rx_bytes - receiver[0].rx_bytes
    assert s_bytes <= s_wg + slack, (s_bytes, facts)
    assert r_bytes <= r_wg + slack, (r_bytes, facts)


@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("kind", ["daemon", "wggo"])
def test_big_mtu_tcp_and_unlimited_udp(lab: Lab, kind: str, outer: int) -> None:
    left, right, wire = pair(lab, kind, "wggo", outer)
    nodes = (left, right)
    size = amount()
    for ns, ifname in ((left.ns, wire.a_if), (right.ns, wire.b_if)):
        nsx(ns, "ip", "link", "set", ifname, "mtu", str(WIRE_MTU))
    set_mtu(nodes, BIG_MTU)
    assert ping(left.ns, right.inner4, 3, size=BIG_MTU - 28) == 3  # one packet of the full MTU each way

    for sender, receiver in ((left, right), (right, left)):
        # TCP: every byte arrives, unchanged (iperf3 -n may reset the connection before the end).
        before = (sample(sender, receiver), sample(receiver, sender))
        started = time.monotonic()
        assert tcp_transfer(receiver, sender, receiver.inner6, size) == size
        took = time.monotonic() - started
        print(f"\n{kind} outer IPv{outer} MTU {BIG_MTU} {sender.kind}->{receiver.kind}: TCP {size} bytes in "
              f"{took:.1f} s ({size * 8 / took / 1e6:.0f} Mbit/s)")
        after = (settled(sender, receiver), settled(receiver, sender))
        s_if = after[0].tx_bytes - before[0].tx_bytes
        r_if = after[1].rx_bytes - before[1].rx_bytes
        assert size <= r_if <= s_if, (s_if, r_if)
        # UDP at no rate limit: the counters agree, less what iperf3 says is lost.
        before = (sample(sender, receiver), sample(receiver, sender))
        end = run_iperf(receiver, sender, receiver.inner4, size, udp=True)
        after = (settled(sender, receiver), settled(receiver, sender))
        sent = end["sum_sent"]["packets"]
        received = end["sum_received"]["packets"] - end["sum"]["lost_packets"]
        assert sent >= size // UDP_PAYLOAD and received > 0, end["sum"]
        inner = UDP_PAYLOAD + 8 + 20
        datagram = -(-inner // 16) * 16 + WG_OVERHEAD
        print(f"{kind} outer IPv{outer} {sender.kind}->{receiver.kind}: UDP -b 0: {sent} datagrams sent, "
              f"{received} received, {sent - received} lost; sender if tx "
              f"{after[0].tx_packets - before[0].tx_packets} pkts, receiver if rx "
              f"{after[1].rx_packets - before[1].rx_packets} pkts; wg tx {after[0].wg_tx - before[0].wg_tx} B, "
              f"wg rx {after[1].wg_rx - before[1].wg_rx} B")
        check_counters((before[0], after[0]), (before[1], after[1]), sent=sent, received=received,
                       datagram=datagram)

    # The daemon lived through it, and answers.
    if left.proc is not None:
        assert left.proc.poll() is None
    assert left.dump()[1][right.public].latest_handshake > 0
    # And back to the usual MTU.
    set_mtu(nodes, 1420)
    assert ping(left.ns, right.inner6, 3, size=1372) == 3 and ping(right.ns, left.inner4, 3, size=1392) == 3
    assert tcp_transfer(right, left, right.inner4, 4 << 20) == 4 << 20
    assert tcp_transfer(left, right, left.inner6, 4 << 20) == 4 << 20
