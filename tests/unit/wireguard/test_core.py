"""The WireGuard core end to end: several cores exchange datagrams in memory under a fake clock.

No sockets and no TUN: a tiny "network" hands each core's outgoing datagrams to the core whose
endpoint they are addressed to, and time advances from deadline to deadline.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import random
import struct
from typing import Callable

import pytest

from wiretun.errors import AlreadyExists, InvalidParameter, NotFound
from wiretun.wireguard import keys, messages, noise, tai64n
from wiretun.wireguard.cookie import mac1_key
from wiretun.wireguard.core import WireGuard
from wiretun.wireguard.timers import (
    MAX_TIMER_HANDSHAKES,
    QUEUE_STAGED_SIZE,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES,
)

WALL0 = 1_700_000_000.0
T0 = 1000.0


def ipv4(src: str, dst: str, payload: bytes = b"ping", total: int | None = None) -> bytes:
    length = 20 + len(payload) if total is None else total
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, length, 0, 0, 64, 17, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    )  # fmt: skip
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"ping6") -> bytes:
    header = struct.pack(">IHBB16s16s", 6 << 28, len(payload), 17, 64,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)  # fmt: skip
    return header + payload


class Node:
    def __init__(self, net: Net, name: str, address: tuple[str, int], seed: int) -> None:
        self.name = name
        self.address = address
        self.private_key = keys.generate_private_key()
        self.public_key = keys.public_key(self.private_key)
        self.wall_offset = 0.0
        self.wg = WireGuard(
            self.private_key,
            wall_clock=lambda: WALL0 + net.now + self.wall_offset,
            rng=random.Random(seed),
        )

    def peer_of(self, other: Node):
        return self.wg.peer(other.public_key)


Filter = Callable[["Node", tuple, bytes], bool]


class Net:
    """Delivers datagrams between nodes by endpoint; logs every datagram sent."""

    def __init__(self) -> None:
        self.now = T0
        self.nodes: dict[tuple[str, int], Node] = {}
        self.log: list[tuple[float, str, tuple, bytes]] = []
        self.source_override: dict[str, tuple[str, int]] = {}

    def node(self, name: str, ip: str) -> Node:
        node = Node(self, name, (ip, 51820), seed=len(self.nodes) + 1)
        self.nodes[node.address] = node
        return node

    def deliver(self, keep: Filter | None = None) -> int:
        """Move datagrams until no core has anything to send.  ``keep`` may drop some."""
        moved = 0
        busy = True
        while busy:
            busy = False
            for node in list(self.nodes.values()):
                for data, endpoint in node.wg.take_datagrams():
                    busy = True
                    self.log.append((self.now, node.name, endpoint, data))
                    if keep is not None and not keep(node, endpoint, data):
                        continue
                    target = self.nodes.get(endpoint)
                    if target is not None:
                        source = self.source_override.get(node.name, node.address)
                        target.wg.receive_datagram(data, source, self.now)
                        moved += 1
        return moved

    def run(self, until: float, keep: Filter | None = None) -> None:
        """Advance time to ``until`` through every timer deadline, delivering as we go."""
        self.deliver(keep)
        while True:
            deadlines = [d for d in (n.wg.next_deadline() for n in self.nodes.values()) if d is not None]
            if not deadlines or min(deadlines) > until:
                break
            self.now = max(self.now, min(deadlines))
            for node in self.nodes.values():
                node.wg.tick(self.now)
            self.deliver(keep)
        self.now = until

    def sent(self, name: str, mtype: int | None = None, since: float = -math.inf) -> list[bytes]:
        return [d for t, n, _, d in self.log if n == name and t >= since and (mtype is None or d[0] == mtype)]


def link(a: Node, b: Node, a_ip: str, b_ip: str, *, endpoints: bool = True) -> None:
    pb = a.wg.add_peer(b.public_key)
    pb.add_allowed_ip(f"{b_ip}/32")
    pa = b.wg.add_peer(a.public_key)
    pa.add_allowed_ip(f"{a_ip}/32")
    pb.endpoint = b.address
    if endpoints:
        pa.endpoint = a.address


@pytest.fixture
def pair():
    net = Net()
    a = net.node("A", "192.0.2.1")
    b = net.node("B", "192.0.2.2")
    link(a, b, "10.0.0.1", "10.0.0.2", endpoints=False)
    return net, a, b


def handshake(net: Net, a: Node, b: Node) -> None:
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"hello"), net.now)
    net.deliver()
    assert b.wg.take_packets() == [ipv4("10.0.0.1", "10.0.0.2", b"hello")]
    assert a.peer_of(b).has_session and b.peer_of(a).has_session


# ----------------------------------------------------------------------------- basic session


def test_handshake_transport_both_ways_and_counters(pair) -> None:
    net, a, b = pair
    packet = ipv4("10.0.0.1", "10.0.0.2", b"x" * 100)
    a.wg.send_packet(packet, net.now)
    out = a.wg.datagrams
    assert len(out) == 1 and len(out[0][0]) == messages.INITIATION_SIZE and out[0][1] == b.address
    assert a.peer_of(b).staged_packets == 1
    net.deliver()
    assert b.wg.take_packets() == [packet]
    # Initiation (A), response (B), then the queued packet, which also confirms the keypair (no
    # separate keepalive is needed when data is waiting).
    kinds = [(n, len(d)) for _, n, _, d in net.log]
    assert kinds == [("A", 148), ("B", 92), ("A", 16 + 128 + 16)]
    reply = ipv4("10.0.0.2", "10.0.0.1", b"pong")
    b.wg.send_packet(reply, net.now)
    assert b.wg.datagrams[0][1] == a.address  # learnt from the initiation (roaming)
    net.deliver()
    assert a.wg.take_packets() == [reply]
    pa, pb = b.peer_of(a), a.peer_of(b)
    assert pb.tx_bytes == pa.rx_bytes == 148 + 160
    assert pa.tx_bytes == pb.rx_bytes == 92 + 16 + 32 + 16
    assert pb.last_handshake == (int(WALL0 + T0), 0)
    assert pa.last_handshake == (int(WALL0 + T0), 0)
    assert a.wg.stats.dropped() == 0 and b.wg.stats.dropped() == 0
    assert a.wg.stats.rx_data_packets == 1 and b.wg.stats.rx_data_packets == 1


def test_padding_to_16_and_mtu_cap(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    # IP length -> padded length, MTU 1420 (wireguard-go's calculatePaddingSize).
    cases = {21: 32, 32: 32, 33: 48, 1419: 1420, 1420: 1420, 1500: 1500}
    for size, padded in cases.items():
        a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", bytes(size - 20)), net.now)
        data = a.wg.take_datagrams()[0][0]
        assert len(data) == 16 + padded + 16, size
        b.wg.receive_datagram(data, a.address, net.now)
    assert [len(p) for p in b.wg.take_packets()] == list(cases)  # trimmed back to the IP length
    a.wg.mtu = 0  # no cap: always a multiple of 16
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", bytes(1400)), net.now)
    assert len(a.wg.take_datagrams()[0][0]) == 16 + 1424 + 16


def test_keepalive_is_32_bytes_and_not_delivered(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    net.log.clear()
    net.run(net.now + 9.9)
    assert net.log == []
    net.run(net.now + 0.2)  # B received data 10 s ago and sent nothing back: keepalive
    assert [(n, len(d)) for _, n, _, d in net.log] == [("B", 32)]
    assert a.wg.take_packets() == []
    assert a.wg.stats.rx_keepalives == 1


def test_persistent_keepalive(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    net.run(net.now + 20)
    net.log.clear()
    pb = a.peer_of(b)
    with pytest.raises(InvalidParameter, match="0..65535"):
        pb.persistent_keepalive_interval = 70000
    pb.persistent_keepalive_interval = 25
    a.wg.apply_config(net.now)  # turning it on sends one right away
    assert [len(d) for d, _ in a.wg.datagrams] == [32]
    start = net.now
    net.run(start + 101)
    times = [t - start for t, n, _, d in net.log if n == "A" and len(d) == 32]
    assert times == pytest.approx([0, 25, 50, 75, 100])
    pb.persistent_keepalive_interval = 0
    net.log.clear()
    net.run(net.now + 100)
    assert net.sent("A") == []


def test_batch_calls_match_single_calls(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * i) for i in range(1, 40)]
    a.wg.send_packets(packets, net.now)
    b.wg.receive_datagrams([(d, a.address) for d, _ in a.wg.take_datagrams()], net.now)
    assert b.wg.take_packets() == packets


# ----------------------------------------------------------------------------- rekeying and expiry


def test_responder_keeps_next_keypair_until_first_transport(pair) -> None:
    net, a, b = pair
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    init = a.wg.take_datagrams()
    b.wg.receive_datagrams([(d, a.address) for d, _ in init], net.now)
    pa = b.peer_of(a)
    assert pa.next is not None and pa.current is None
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"early"), net.now)  # must wait: not confirmed
    response = b.wg.take_datagrams()
    assert [len(d) for d, _ in response] == [92] and pa.staged_packets == 1
    a.wg.receive_datagrams([(d, b.address) for d, _ in response], net.now)
    confirm = a.wg.take_datagrams()
    b.wg.receive_datagram(confirm[0][0], a.address, net.now)  # A's keepalive confirms the keypair
    assert pa.current is not None and pa.next is None and pa.staged_packets == 0
    sent = b.wg.take_datagrams()
    a.wg.receive_datagrams([(d, b.address) for d, _ in sent], net.now)
    assert a.wg.take_packets() == [ipv4("10.0.0.2", "10.0.0.1", b"early")]


def test_rekey_after_120_seconds(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    pb, pa = a.peer_of(b), b.peer_of(a)
    first = pb.current
    net.run(T0 + 119.5)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert [len(d) for d, _ in a.wg.datagrams] == [64]
    net.deliver()
    assert pb.current is first
    net.run(T0 + 120.5)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert [len(d) for d, _ in a.wg.datagrams] == [64, 148]  # sent on the old keys, then rekey
    net.deliver()
    assert pb.current is not first and pb.previous is first
    assert pa.current is not None and pa.current.local_index == pb.current.remote_index
    assert pb.last_handshake == (int(WALL0 + T0 + 120.5), 500_000_000)
    # The old keypair still decrypts what was in flight.
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    net.deliver()
    assert len(a.wg.take_packets()) == 1


def test_reject_after_180_seconds(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)

    def no_handshakes(node, endpoint, data):
        return data[0] == 4

    late = None
    net.run(T0 + 179.9, keep=no_handshakes)
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1", b"late"), net.now)
    late = b.wg.take_datagrams()[0][0]
    net.now = T0 + 180.5
    a.wg.receive_datagram(late, b.address, net.now)
    assert a.wg.stats.rx_expired_keypair == 1 and a.wg.take_packets() == []
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert [len(d) for d, _ in a.wg.datagrams] == [148]  # no transport on the dead keys
    assert a.peer_of(b).staged_packets == 1
    a.wg.datagrams.clear()
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)  # responder: same rule
    assert [len(d) for d, _ in b.wg.datagrams] == [148]


def test_zero_key_material_after_540_seconds(pair) -> None:
    net, a, b = pair
    events = []
    a.wg.on_event = lambda name, peer: events.append((net.now, name))
    handshake(net, a, b)
    net.run(T0 + 539.9)
    assert a.peer_of(b).current is not None
    net.run(T0 + 540.1)
    for node, other in ((a, b), (b, a)):
        peer = node.peer_of(other)
        assert peer.current is None and peer.previous is None and peer.next is None
        assert node.wg._keypairs == {} and node.wg._handshakes == {}
    assert events[-1] == (pytest.approx(T0 + 540), "keys_zeroed")
    assert a.wg.next_deadline() is None and b.wg.next_deadline() is None


def test_new_handshake_after_15_seconds_of_silence(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    net.run(T0 + 30)  # settle: B's keepalive went out at +10
    start = net.now
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), start)

    def b_is_mute(node, endpoint, data):
        return node is not b

    net.run(start + 14.99, keep=b_is_mute)
    assert net.sent("A", 1, since=start) == []
    net.run(start + 15.334, keep=b_is_mute)
    inits = [t - start for t, n, _, d in net.log if n == "A" and d[0] == 1 and t >= start]
    assert len(inits) == 1 and 15.0 <= inits[0] < 15.334


def test_initiator_rekeys_when_receiving_on_a_165_second_old_session(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    net.run(T0 + 164.9)
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    net.deliver()
    assert net.sent("A", 1, since=T0 + 1) == []
    net.run(T0 + 165.5)
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    b_data = b.wg.take_datagrams()
    a.wg.receive_datagram(b_data[0][0], b.address, net.now)
    assert [len(d) for d, _ in a.wg.datagrams] == [148]  # immediately, not on a timer
    assert a.peer_of(b).timers.sent_last_minute_handshake


def test_retransmit_then_give_up_and_drop_queued_packets(pair) -> None:
    net, a, b = pair
    events = []
    a.wg.on_event = lambda name, peer: events.append(name)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    net.run(T0 + 200, keep=lambda node, ep, data: False)  # B never hears anything
    inits = [t - T0 for t, n, _, d in net.log if n == "A" and d[0] == 1]
    assert len(inits) == MAX_TIMER_HANDSHAKES + 2 == 20
    gaps = [y - x for x, y in zip(inits, inits[1:])]
    assert all(5.0 <= g < 5.334 for g in gaps), gaps
    assert a.wg.stats.tx_handshake_timeout == 2 and a.peer_of(b).staged_packets == 0
    assert events == ["handshake_gave_up"]
    assert a.peer_of(b).timers.pending(3)  # zero_key_material armed


def test_send_counter_limits(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    kp = a.peer_of(b).current
    kp.send_counter = REKEY_AFTER_MESSAGES
    net.now += 6  # past REKEY_TIMEOUT since the first initiation, which limits initiations
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert [len(d) for d, _ in a.wg.take_datagrams()] == [64, 148]
    a.peer_of(b).handshake.last_sent_handshake = -math.inf
    kp.send_counter = REJECT_AFTER_MESSAGES - 1
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)  # the very last nonce
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)  # none left: queue + handshake
    assert [len(d) for d, _ in a.wg.take_datagrams()] == [64, 148]
    assert a.peer_of(b).staged_packets == 1


# ----------------------------------------------------------------------------- replay


def test_replay_rejected_and_reordering_accepted(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * 8) for i in range(50)]
    a.wg.send_packets(packets, net.now)
    datagrams = [d for d, _ in a.wg.take_datagrams()]
    order = list(range(50))
    random.Random(7).shuffle(order)
    for i in order:
        b.wg.receive_datagram(datagrams[i], a.address, net.now)
    assert sorted(b.wg.take_packets()) == sorted(packets)
    for i in (0, 17, 49):
        b.wg.receive_datagram(datagrams[i], a.address, net.now)
    assert b.wg.stats.rx_replay == 3 and b.wg.take_packets() == []


# ----------------------------------------------------------------------------- handshake protections


def _initiation(net: Net, a: Node, b: Node, wall_shift: float) -> bytes:
    """A fresh initiation from A to B, with A's wall clock moved by ``wall_shift``."""
    peer = a.peer_of(b)
    peer.handshake.last_sent_handshake = -math.inf
    a.wall_offset = wall_shift
    a.wg._send_handshake_initiation(peer, False, net.now)
    data = [d for d, _ in a.wg.take_datagrams() if d[0] == 1]
    assert len(data) == 1
    return data[0]


def test_initiation_flood_limit_20ms(pair) -> None:
    net, a, b = pair
    first = _initiation(net, a, b, 0.0)
    second = _initiation(net, a, b, 1.0)  # newer timestamp
    third = _initiation(net, a, b, 2.0)
    b.wg.receive_datagram(first, a.address, T0)
    assert b.wg.stats.tx_responses == 1
    b.wg.receive_datagram(second, a.address, T0 + 0.010)
    assert b.wg.stats.rx_handshake_flood == 1 and b.wg.stats.tx_responses == 1
    b.wg.receive_datagram(third, a.address, T0 + 0.021)
    assert b.wg.stats.tx_responses == 2


def test_older_or_replayed_timestamp_rejected(pair) -> None:
    net, a, b = pair
    older = _initiation(net, a, b, 0.0)
    newer = _initiation(net, a, b, 5.0)
    b.wg.receive_datagram(newer, a.address, T0)
    b.wg.receive_datagram(older, a.address, T0 + 1)
    b.wg.receive_datagram(newer, a.address, T0 + 2)
    assert b.wg.stats.rx_handshake_replay == 2 and b.wg.stats.tx_responses == 1


def test_cookie_reply_flow_under_load(pair) -> None:
    net, a, b = pair
    b.wg.under_load = True
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"loaded"), net.now)
    net.deliver()
    assert b.wg.stats.rx_cookie_sent == 1
    assert [(n, len(d)) for _, n, _, d in net.log] == [("A", 148), ("B", 64)]
    assert a.peer_of(b).cookie_generator.has_cookie and not a.peer_of(b).has_session
    net.run(T0 + 5.4)  # the retransmission carries MAC2 and gets through
    assert b.wg.stats.rx_cookie_sent == 1
    assert b.wg.take_packets() == [ipv4("10.0.0.1", "10.0.0.2", b"loaded")]
    assert a.peer_of(b).has_session
    retry = net.sent("A", 1)[1]
    assert retry[-16:] != bytes(16)  # MAC2 present


def test_rate_limit_under_load() -> None:
    net = Net()
    a = net.node("A", "192.0.2.1")
    b = net.node("B", "192.0.2.2")
    link(a, b, "10.0.0.1", "10.0.0.2")
    b.wg.under_load = True
    first = _initiation(net, a, b, 0.0)
    b.wg.receive_datagram(first, a.address, net.now)
    a.wg.receive_datagrams([(d, b.address) for d, _ in b.wg.take_datagrams()], net.now)  # cookie
    assert a.peer_of(b).cookie_generator.has_cookie
    for i in range(7):  # 1 us apart, as wireguard-go's test steps by 1 ns: a burst of 5 passes
        b.wg.receive_datagram(_initiation(net, a, b, 1.0 + i), a.address, net.now + i * 1e-6)
    assert b.wg.stats.rx_ratelimited == 2
    # Another source is limited separately: its MAC2 is bound to its own address, so it gets a cookie.
    b.wg.receive_datagram(_initiation(net, a, b, 20.0), ("198.51.100.7", 1), net.now)
    assert b.wg.stats.rx_cookie_sent == 2


def _mac1_valid_junk(receiver_public_key: bytes, seed: int) -> bytes:
    """A 148-byte initiation with random contents but a correct MAC1 for ``receiver_public_key``:
    what a flooder who knows the public key (and nothing else) can make."""
    body = bytearray(bytes([1, 0, 0, 0]) + random.Random(seed).randbytes(144))
    body[-32:-16] = hashlib.blake2s(bytes(body[:-32]), digest_size=16, key=mac1_key(receiver_public_key)).digest()
    body[-16:] = bytes(16)
    return bytes(body)


def test_junk_failing_mac1_never_creates_load() -> None:
    net = Net()
    a = net.node("A", "192.0.2.1")
    b = net.node("B", "192.0.2.2")
    link(a, b, "10.0.0.1", "10.0.0.2")
    rnd = random.Random(7)
    # 20 000 random handshake-shaped datagrams in one second (a hundred times the threshold).
    for i in range(20_000):
        junk = bytes([1 + i % 2, 0, 0, 0]) + rnd.randbytes(144 if i % 2 == 0 else 88)
        b.wg.receive_datagram(junk, ("198.51.100.9", 1000 + i % 512), net.now + i * 50e-6)
    assert b.wg.stats.rx_bad_mac1 == 20_000
    b.wg.receive_datagram(_initiation(net, a, b, 0.0), a.address, net.now + 1.0)
    assert b.wg.stats.rx_cookie_sent == 0 and b.wg.stats.tx_responses == 1


def test_under_load_from_the_rate_of_mac1_valid_handshakes() -> None:
    net = Net()
    a = net.node("A", "192.0.2.1")
    b = net.node("B", "192.0.2.2")
    link(a, b, "10.0.0.1", "10.0.0.2")
    assert b.wg.under_load_threshold == UNDER_LOAD_HANDSHAKES == 128
    t = net.now
    # One short of the threshold within a second: not under load, the initiation is answered.
    for i in range(UNDER_LOAD_HANDSHAKES - 2):
        b.wg.receive_datagram(_mac1_valid_junk(b.public_key, i), ("198.51.100.9", 2000 + i), t + i * 1e-3)
    assert b.wg.stats.rx_bad_handshake == UNDER_LOAD_HANDSHAKES - 2 and b.wg.stats.rx_bad_mac1 == 0
    b.wg.receive_datagram(_initiation(net, a, b, 0.0), a.address, t + 0.5)
    assert b.wg.stats.rx_cookie_sent == 0 and b.wg.stats.tx_responses == 1
    # The 128th in the same second: under load, so this valid initiation without MAC2 gets a cookie.
    b.wg.receive_datagram(_initiation(net, a, b, 1.0), a.address, t + 0.6)
    assert b.wg.stats.rx_cookie_sent == 1 and b.wg.stats.tx_responses == 1
    # Load is remembered for UNDER_LOAD_AFTER_TIME after it was last seen, then it is over.
    b.wg.receive_datagram(_initiation(net, a, b, 2.0), a.address, t + 0.6 + UNDER_LOAD_AFTER_TIME - 0.05)
    assert b.wg.stats.rx_cookie_sent == 2
    b.wg.receive_datagram(_initiation(net, a, b, 3.0), a.address, t + 3.0)
    assert b.wg.stats.rx_cookie_sent == 2 and b.wg.stats.tx_responses == 2
    b.wg.handshake_backlog = UNDER_LOAD_HANDSHAKES  # the device may report its own queue
    b.wg.receive_datagram(_initiation(net, a, b, 4.0), a.address, t + 4.0)
    assert b.wg.stats.rx_cookie_sent == 3


def test_preshared_key_must_match(pair) -> None:
    net, a, b = pair
    psk = keys.generate_preshared_key()
    a.peer_of(b).preshared_key = psk
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    net.deliver()
    assert a.wg.stats.rx_bad_handshake == 1 and not a.peer_of(b).has_session
    b.peer_of(a).preshared_key = psk
    assert b.peer_of(a).preshared_key == psk
    net.run(T0 + 6)
    assert a.peer_of(b).has_session and b.wg.take_packets() != []
    with pytest.raises(InvalidParameter, match="32 bytes"):
        a.peer_of(b).preshared_key = b"short"


# ----------------------------------------------------------------------------- routing


def test_allowed_ips_source_filter_and_inner_validation(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    a.peer_of(b).add_allowed_ip("10.9.0.0/16")  # so A routes these to B
    a.wg.send_packet(ipv4("10.0.0.99", "10.0.0.2"), net.now)  # spoofed inner source
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"x" * 30, total=200), net.now)  # length lies
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"x" * 30, total=19), net.now)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", b"x" * 30, total=30), net.now)  # trimmed to 30
    a.wg.send_packet(ipv6("fd00::1", "fd00::2"), net.now)  # no IPv6 route on A: dropped there
    assert a.wg.stats.tx_no_route == 1
    net.deliver()
    assert b.wg.stats.rx_disallowed_source == 1
    assert b.wg.stats.rx_bad_ip == 2
    assert b.wg.take_packets() == [ipv4("10.0.0.1", "10.0.0.2", b"x" * 30, total=30)[:30]]
    for bad in (b"", b"\x45" * 10, b"\x60" * 39, b"\x10" * 40):
        a.wg.send_packet(bad, net.now)
    assert a.wg.stats.tx_bad_packet == 4


def test_routing_to_the_right_one_of_three_peers() -> None:
    net = Net()
    a = net.node("A", "192.0.2.1")
    others = [net.node(name, f"192.0.2.{i}") for i, name in ((2, "B"), (3, "C"), (4, "D"))]
    routes = {"B": ["10.0.0.2/32", "fd00::2/128"], "C": ["10.0.1.0/24"], "D": ["0.0.0.0/0", "::/0"]}
    for other in others:
        peer = a.wg.add_peer(other.public_key)
        peer.endpoint = other.address
        peer.replace_allowed_ips(routes[other.name])
        back = other.wg.add_peer(a.public_key)
        back.replace_allowed_ips(["10.0.0.1/32", "fd00::1/128"])
    for dst in ("10.0.0.2", "10.0.1.77", "10.0.0.3", "8.8.8.8"):  # to B, C, D, D
        a.wg.send_packet(ipv4("10.0.0.1", dst, dst.encode()), net.now)
    a.wg.send_packet(ipv6("fd00::1", "fd00::2"), net.now)
    a.wg.send_packet(ipv6("fd00::1", "2001:db8::1"), net.now)
    net.deliver()
    got = {o.name: [bytes(p) for p in o.wg.take_packets()] for o in others}
    assert got["B"] == [ipv4("10.0.0.1", "10.0.0.2", b"10.0.0.2"), ipv6("fd00::1", "fd00::2")]
    assert got["C"] == [ipv4("10.0.0.1", "10.0.1.77", b"10.0.1.77")]
    assert got["D"] == [
        ipv4("10.0.0.1", "10.0.0.3", b"10.0.0.3"),
        ipv4("10.0.0.1", "8.8.8.8", b"8.8.8.8"),
        ipv6("fd00::1", "2001:db8::1"),
    ]
    assert [str(n) for n in a.wg.peer(others[0].public_key).allowed_ips] == routes["B"]


def test_roaming_endpoint_follows_authenticated_source(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    pa = b.peer_of(a)
    assert pa.endpoint == a.address
    net.source_override["A"] = ("203.0.113.9", 40000)  # A moved behind a new NAT mapping
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    net.deliver()
    assert pa.endpoint == ("203.0.113.9", 40000)
    # Garbage or unauthenticated traffic from elsewhere does not move it.
    b.wg.receive_datagram(os.urandom(100), ("198.51.100.1", 1), net.now)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    forged = bytearray(a.wg.take_datagrams()[0][0])
    forged[-1] ^= 1
    b.wg.receive_datagram(bytes(forged), ("198.51.100.1", 2), net.now)
    assert pa.endpoint == ("203.0.113.9", 40000)
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    assert b.wg.datagrams[0][1] == ("203.0.113.9", 40000)


def test_garbage_is_counted_and_dropped_without_disturbing_the_session(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    good = a.wg.take_datagrams()[0][0]
    index = struct.unpack_from("<I", good, 4)[0]
    before = b.wg.stats.as_dict()
    rng = random.Random(1)
    garbage = [b"", b"\x04", bytes(31), b"\x04\x00\x00\x00" + bytes(27)]
    garbage += [bytes([t, 0, 0, 0]) + bytes(60) for t in (0, 5, 255)]  # bad types
    garbage += [b"\x04\x00\x01\x00" + bytes(60)]  # reserved byte set
    garbage += [bytes([1, 0, 0, 0]) + bytes(n - 4) for n in (147, 149, 64, 1000)]
    garbage += [bytes([2, 0, 0, 0]) + bytes(n - 4) for n in (91, 93, 148)]
    garbage += [bytes([3, 0, 0, 0]) + bytes(n - 4) for n in (63, 65, 148)]
    garbage += [bytes([1, 0, 0, 0]) + os.urandom(144), bytes([2, 0, 0, 0]) + os.urandom(88)]  # bad MAC1
    garbage += [bytes([3, 0, 0, 0]) + os.urandom(60)]  # cookie reply for an unknown index
    garbage += [struct.pack("<II", 3, index) + os.urandom(56)]  # cookie reply that does not decrypt
    garbage += [struct.pack("<IIQ", 4, index ^ 1, 0) + os.urandom(32)]  # unknown index
    garbage += [struct.pack("<IIQ", 4, index, 5) + os.urandom(48)]  # right index, bad tag
    flipped = bytearray(good)
    flipped[20] ^= 0x80
    garbage += [bytes(flipped)]
    garbage += [rng.randbytes(rng.randrange(0, 1500)) for _ in range(300)]
    for g in garbage:
        b.wg.receive_datagram(g, ("198.51.100.1", 9), net.now)
        b.wg.receive_datagram(memoryview(bytearray(g)), ("198.51.100.1", 9), net.now)
    after = b.wg.stats.as_dict()
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert sum(delta.values()) == 2 * len(garbage), delta
    assert delta["rx_bad_size"] >= 2 * 14 and delta["rx_bad_type"] >= 2 * 4
    assert delta["rx_bad_mac1"] >= 4 and delta["rx_bad_tag"] >= 4 and delta["rx_unknown_index"] >= 4
    assert delta["rx_bad_cookie_reply"] >= 2
    assert b.wg.datagrams == [] and b.wg.packets == []
    assert b.peer_of(a).endpoint == a.address
    b.wg.receive_datagram(good, a.address, net.now)
    assert b.wg.take_packets() == [ipv4("10.0.0.1", "10.0.0.2")]
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    net.deliver()
    assert a.wg.take_packets() == [ipv4("10.0.0.2", "10.0.0.1")]


# ----------------------------------------------------------------------------- configuration


def test_staged_queue_is_bounded() -> None:
    net = Net()
    a = net.node("A", "192.0.2.1")
    b = net.node("B", "192.0.2.2")
    link(a, b, "10.0.0.1", "10.0.0.2")
    for i in range(QUEUE_STAGED_SIZE + 2):
        a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2", i.to_bytes(2, "big")), net.now)
    assert a.peer_of(b).staged_packets == QUEUE_STAGED_SIZE and a.wg.stats.tx_staged_overflow == 2
    net.deliver()
    got = b.wg.take_packets()
    assert len(got) == QUEUE_STAGED_SIZE and got[0][-2:] == (2).to_bytes(2, "big")  # the oldest went


def test_no_endpoint_counts_and_keeps_trying(pair) -> None:
    net, a, b = pair
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)  # B does not know where A is
    assert b.wg.datagrams == [] and b.wg.stats.tx_no_endpoint == 1
    assert b.peer_of(a).staged_packets == 1
    handshake(net, a, b)  # A initiates; B learns the endpoint, and its queued packet flows
    net.deliver()
    assert a.wg.take_packets() == [ipv4("10.0.0.2", "10.0.0.1")]


def test_peer_api_and_errors(pair) -> None:
    net, a, b = pair
    with pytest.raises(AlreadyExists):
        a.wg.add_peer(b.public_key)
    with pytest.raises(InvalidParameter, match="own public key"):
        a.wg.add_peer(a.public_key)
    with pytest.raises(InvalidParameter, match="32 bytes"):
        a.wg.add_peer(b"\x01" * 31)
    with pytest.raises(NotFound):
        a.wg.peer(bytes(32))
    assert a.wg.get_peer(bytes(32)) is None
    peer = a.peer_of(b)
    assert peer.public_key == b.public_key and peer.last_handshake == (0, 0)
    assert peer.preshared_key == bytes(32)
    peer.replace_allowed_ips(["10.0.0.2/32", "10.0.5.0/24"])
    with pytest.raises(InvalidParameter):
        peer.replace_allowed_ips(["10.0.0.3/32", "bogus"])
    assert [str(n) for n in peer.allowed_ips] == ["10.0.0.2/32", "10.0.5.0/24"]  # unchanged
    assert peer.remove_allowed_ip("10.0.5.0/24") and not peer.remove_allowed_ip("10.0.5.0/24")
    assert a.wg.public_key == a.public_key and a.wg.private_key == a.private_key
    with pytest.raises(InvalidParameter, match="mtu"):
        a.wg.mtu = -1


def test_remove_peer_cleans_everything(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    peer = a.peer_of(b)
    assert a.wg.remove_peer(b.public_key) and not a.wg.remove_peer(b.public_key)
    assert a.wg._keypairs == {} and a.wg._handshakes == {} and a.wg.peers() == []
    assert a.wg.next_deadline() is None
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert a.wg.stats.tx_no_route == 1
    with pytest.raises(NotFound):
        peer.add_allowed_ip("10.0.0.2/32")
    b.wg.send_packet(ipv4("10.0.0.2", "10.0.0.1"), net.now)
    net.deliver()
    assert a.wg.stats.rx_unknown_index == 1


def test_set_private_key_expires_sessions_and_drops_own_key_peer(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    pb = a.peer_of(b)
    old = pb.current
    a.wg.set_private_key(a.private_key)  # same key: nothing happens
    assert pb.has_session
    new_key = keys.generate_private_key()
    a.wg.set_private_key(new_key)
    assert not pb.has_session and old.send_counter == REJECT_AFTER_MESSAGES
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert [len(d) for d, _ in a.wg.take_datagrams()] == [148]
    # B only knows A's old key: A's initiation is from an unknown static key now.
    # Setting B's key to A's new key removes B's peer entry for it if one existed.
    b.wg.add_peer(keys.public_key(new_key))
    b.wg.set_private_key(new_key)
    assert b.wg.get_peer(keys.public_key(new_key)) is None
    a.wg.set_private_key(None)
    assert a.wg.public_key is None
    a.peer_of(b).handshake.last_sent_handshake = -math.inf
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), net.now)
    assert a.wg.take_datagrams() == []  # no identity, no handshake


def test_down_and_up(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    a.peer_of(b).persistent_keepalive_interval = 15
    a.wg.down()
    assert not a.peer_of(b).has_session and a.wg.next_deadline() is None
    net.now += 1.0  # (a new initiation needs a newer TAI64N timestamp than the last one)
    a.wg.up(net.now)
    assert [len(d) for d, _ in a.wg.datagrams] == [148]  # persistent keepalive needs a session
    net.deliver()
    assert a.peer_of(b).has_session


def test_timers_keep_running_after_down_and_up(pair) -> None:
    # Regression: stop() left the old wake-up time behind; after a down/up cycle a timer armed later
    # than it was never scheduled, so the peer never retransmitted (nor kept alive, nor zeroed keys).
    net, a, b = pair
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0)  # initiation; retransmit armed at ~T0+5
    a.wg.down()
    a.wg.up(T0 + 20)
    a.wg.send_packet(ipv4("10.0.0.1", "10.0.0.2"), T0 + 20)  # retransmit due at ~T0+25
    sent = 0
    for second in range(21, 120):
        a.wg.tick(T0 + second)
        sent += sum(1 for d, _ in a.wg.take_datagrams() if len(d) == 148)
    assert sent >= 15, sent  # one retransmission every REKEY_TIMEOUT (5 s + jitter)


def test_next_deadline_is_exact(pair) -> None:
    net, a, b = pair
    handshake(net, a, b)
    timers = a.peer_of(b).timers
    pending = [d for d in timers.deadlines if d is not None]
    assert a.wg.next_deadline() == min(pending)
    # A cleared timer does not leave a stale wake-up behind.
    for node in (a, b):
        deadlines = [d for d in node.peer_of(b if node is a else a).timers.deadlines if d is not None]
        assert node.wg.next_deadline() == (min(deadlines) if deadlines else None)


def test_handshake_between_noise_layers_directly() -> None:
    # The WireGuard handshake functions alone, as wireguard-go's TestNoiseHandshake.
    ka, kb = keys.generate_private_key(), keys.generate_private_key()
    ida, idb = noise.Identity(ka), noise.Identity(kb)
    hs_a = noise.Handshake("peer-b", idb.public_key)
    hs_b = noise.Handshake("peer-a", ida.public_key)
    hs_a.precompute(ida)
    hs_b.precompute(idb)
    assert hs_a.static_static == hs_b.static_static
    msg = noise.create_initiation(ida, hs_a, 11, tai64n.stamp(WALL0))
    assert msg is not None and len(msg) == 148
    result, hs = noise.consume_initiation(idb, msg, lambda s: hs_b if s == ida.public_key else None, 5.0)
    assert result is noise.ConsumeResult.OK and hs is hs_b
    assert (hs_a.chain_key, hs_a.hash) == (hs_b.chain_key, hs_b.hash)
    resp = noise.create_response(hs_b, 22)
    assert resp is not None and len(resp) == 92
    result, hs = noise.consume_response(ida, resp, lambda i: hs_a if i == 11 else None)
    assert result is noise.ConsumeResult.OK and hs_a.remote_index == 22
    assert (hs_a.chain_key, hs_a.hash) == (hs_b.chain_key, hs_b.hash)
    kp_a, kp_b = noise.derive_keypair(hs_a, 0.0), noise.derive_keypair(hs_b, 0.0)
    assert kp_a.is_initiator and not kp_b.is_initiator
    nonce = noise.NONCE.pack(0)
    assert kp_b.receive.decrypt(nonce, kp_a.send.encrypt(nonce, b"test 1", None), None) == b"test 1"
    assert kp_a.receive.decrypt(nonce, kp_b.send.encrypt(nonce, b"test 2", None), None) == b"test 2"
    assert hs_a.state == noise.HandshakeState.ZEROED and hs_a.chain_key == b""
    # A peer whose public key is a low-order point has no static-static secret: no handshake.
    bad = noise.Handshake("bad", bytes(32))
    bad.precompute(ida)
    assert bad.static_static is None and noise.create_initiation(ida, bad, 1, bytes(12)) is None


def test_timer_armed_by_a_handler_does_not_delay_an_earlier_one(pair) -> None:
    # A timer handler that arms a later timer must not hide an earlier pending one.
    net, a, b = pair
    handshake(net, a, b)
    timers = a.peer_of(b).timers
    for index in range(len(timers.deadlines)):
        timers.clear(index)
    fired = []
    a.wg.on_event = lambda name, peer: fired.append((net.now, name))
    timers.set(1, net.now + 1)  # send_keepalive in 1 s: its handler arms nothing earlier
    timers.set(3, net.now + 3)  # zero_key_material in 3 s
    timers.need_another_keepalive = True  # so the keepalive handler re-arms itself at +10
    start = net.now
    net.run(start + 4, keep=lambda node, ep, data: False)
    assert (pytest.approx(start + 3), "keys_zeroed") in fired


def test_keylog_hook_gets_the_keys_of_each_handshake_message(pair) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    net, a, b = pair
    logged: dict[str, list[tuple[bytes, bytes, bytes, bytes]]] = {"A": [], "B": []}
    a.wg.keylog = lambda *keys: logged["A"].append(keys)
    b.wg.keylog = lambda *keys: logged["B"].append(keys)
    psk = bytes(range(32))
    a.peer_of(b).preshared_key = psk
    b.peer_of(a).preshared_key = psk
    handshake(net, a, b)
    initiation = net.sent("A", 1)[0]
    response = net.sent("B", 2)[0]
    [(a_static, a_remote, a_ephemeral, a_psk)] = logged["A"]
    [(b_static, b_remote, b_ephemeral, b_psk)] = logged["B"]
    assert (a_static, a_remote, a_psk) == (keys.clamp(a.private_key), b.public_key, psk)
    assert (b_static, b_remote, b_psk) == (keys.clamp(b.private_key), a.public_key, psk)
    # The logged ephemeral private keys are the ones whose public halves went on the wire.
    assert X25519PrivateKey.from_private_bytes(a_ephemeral).public_key().public_bytes_raw() == initiation[8:40]
    assert X25519PrivateKey.from_private_bytes(b_ephemeral).public_key().public_bytes_raw() == response[12:44]
