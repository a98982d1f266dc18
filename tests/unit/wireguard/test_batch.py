"""wiretun.wireguard.batch: transport messages sealed and opened in batches, C and pure Python alike.

Every check runs on both implementations (the C one is skipped when not built); the differential tests
compare their bytes for the same keys, counters and packets, and the pure one is checked against
``cryptography`` and wiretun.offload directly.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiretun import offload as O
from wiretun import packet as P
from wiretun.wireguard import batch
from wiretun.wireguard.replay import RING_BITS, ReplayFilter
from wiretun.wireguard.timers import REJECT_AFTER_MESSAGES

A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "fd00::1", "fd00::2"
KEY = bytes(range(32))
RECEIVER = 0x11223344

IMPLS: dict[str, tuple[Callable[..., Any], Callable[..., Any]] | None] = {
    "python": (batch._py_seal_super, batch._py_open_train),
    "c": (batch._c.seal_super, batch._c.open_train) if batch._c is not None else None,
}


@pytest.fixture(params=["python", "c"])
def impl(request: pytest.FixtureRequest) -> tuple[Callable[..., Any], Callable[..., Any]]:
    pair = IMPLS[request.param]
    if pair is None:
        pytest.skip("wiretun.wireguard._wgcrypto is not built")
    return pair


def kernel_super(pkt: bytes, gso_type: int, gso_size: int) -> tuple[bytes, bytes]:
    """A complete packet as an offload TUN read gives it: partial checksum, header in front."""
    info = P.parse(pkt)
    cs = info.header_length
    off = 16 if info.protocol == P.PROTO_TCP else 6
    b = bytearray(pkt)
    struct.pack_into("!H", b, cs + off, P.pseudo_header_sum(b, info.protocol, len(b) - cs))
    hdr = O.VirtioNetHeader(O.F_NEEDS_CSUM, gso_type, info.payload_offset, gso_size, cs, off)
    return hdr.pack(), bytes(b)


def tcp(v6: bool, payload: bytes, seq: int = 1000, flags: int = P.TCP_ACK | P.TCP_PSH, ip_id: int = 77) -> bytes:
    if v6:
        return P.ipv6_tcp(A6, B6, 40000, 5201, seq, 7777, flags, payload)
    # A merged super-packet is split again with IDs counting up from its first: give them that.
    return P.ipv4_tcp(A4, B4, 40000, 5201, seq, 7777, flags, payload, ip_id=ip_id)


def udp(v6: bool, payload: bytes) -> bytes:
    return (P.ipv6_udp if v6 else P.ipv4_udp)(A6 if v6 else A4, B6 if v6 else B4, 4000, 5000, payload)


def datagrams(train: bytes, size: int) -> list[bytes]:
    return [train[i : i + size] for i in range(0, len(train), size)]


def unseal(dgram: bytes) -> tuple[int, int, bytes]:
    kind, receiver, counter = struct.unpack_from("<IIQ", dgram)
    assert kind == 4
    plain = ChaCha20Poly1305(KEY).decrypt(struct.pack("<4xQ", counter), dgram[16:], None)
    return receiver, counter, plain


SUPERS = [
    pytest.param(False, True, 1380, 40_000, id="tcp4"),
    pytest.param(True, True, 1360, 40_000, id="tcp6"),
    pytest.param(False, False, 1372, 20_000, id="udp4"),
    pytest.param(True, False, 1352, 9_000, id="udp6"),
    pytest.param(False, True, 1380, 1380 * 3, id="tcp4-exact"),
]


@pytest.mark.parametrize("v6,is_tcp,gso,length", SUPERS)
def test_seal_super_is_offload_split_then_wireguard(impl: Any, v6: bool, is_tcp: bool, gso: int, length: int) -> None:
    seal, _ = impl
    payload = os.urandom(length)
    whole = tcp(v6, payload) if is_tcp else udp(v6, payload)
    gso_type = (O.GSO_TCPV6 if v6 else O.GSO_TCPV4) if is_tcp else O.GSO_UDP_L4
    hdr, pkt = kernel_super(whole, gso_type, gso)
    expected = O.split_packets(O.VirtioNetHeader.unpack_from(hdr), pkt)
    train, count, size = seal(KEY, RECEIVER, 500, hdr, pkt, 1420)
    assert count == len(expected) > 1
    dgrams = datagrams(train, size)
    assert len(dgrams) == count
    for i, (dgram, want) in enumerate(zip(dgrams, expected)):
        receiver, counter, plain = unseal(dgram)
        assert (receiver, counter) == (RECEIVER, 500 + i)
        assert len(plain) % 16 == 0 or len(plain) == 1420
        assert plain[: len(want)] == want and not any(plain[len(want):])
        assert P.verify_checksums(want)


def test_seal_super_c_equals_python() -> None:
    if batch._c is None:
        pytest.skip("wiretun.wireguard._wgcrypto is not built")
    cases = []
    for v6 in (False, True):
        for n in (1, 100, 1379, 1380, 1381, 30_000, 64_000):
            cases.append(kernel_super(tcp(v6, os.urandom(n)), O.GSO_TCPV6 if v6 else O.GSO_TCPV4, 1380 - 20 * v6))
            cases.append(kernel_super(udp(v6, os.urandom(min(n, 60_000))), O.GSO_UDP_L4, 1372 - 20 * v6))
        plain = tcp(v6, b"ack", flags=P.TCP_ACK)
        cases.append((bytes(10), plain))
        info = P.parse(plain)
        partial = bytearray(plain)
        struct.pack_into("!H", partial, info.header_length + 16,
                         P.pseudo_header_sum(partial, P.PROTO_TCP, len(partial) - info.header_length))
        cases.append((O.VirtioNetHeader(O.F_NEEDS_CSUM, 0, 0, 0, info.header_length, 16).pack(), bytes(partial)))
    for mtu in (1420, 1280, 0):
        for hdr, pkt in cases:
            a = batch._c.seal_super(KEY, RECEIVER, 2**40, hdr, pkt, mtu)
            b = batch._py_seal_super(KEY, RECEIVER, 2**40, hdr, pkt, mtu)
            assert a == b


@pytest.mark.parametrize("hdr,pkt", [
    (O.VirtioNetHeader(O.F_NEEDS_CSUM, O.GSO_TCPV4, 40, 0, 20, 16).pack(), bytes(100)),  # gso_size 0
    (O.VirtioNetHeader(0, O.GSO_TCPV4, 40, 1000, 20, 16).pack(), bytes(100)),  # no NEEDS_CSUM
    (O.VirtioNetHeader(O.F_NEEDS_CSUM, O.GSO_UDP, 28, 1000, 20, 6).pack(), bytes(100)),  # UFO
    (O.VirtioNetHeader(O.F_NEEDS_CSUM, 0, 0, 0, 90, 16).pack(), bytes(100)),  # checksum beyond the end
    (bytes(9), bytes(100)),  # short header
    (bytes(10), b""),  # empty packet
])
def test_seal_super_rejects_malformed(impl: Any, hdr: bytes, pkt: bytes) -> None:
    seal, _ = impl
    with pytest.raises(ValueError):
        seal(KEY, RECEIVER, 0, hdr, pkt, 1420)


def open_all(open_train: Any, train: bytes, size: int, *, filt: ReplayFilter | None = None,
             udp: bool = False, receiver: int = RECEIVER) -> tuple[batch.OpenResult, bytearray, ReplayFilter]:
    filt = filt or ReplayFilter()
    out = bytearray(len(train) + 64)
    r = batch.OpenResult(*open_train(KEY, receiver, train, size, filt._ring, filt.last, REJECT_AFTER_MESSAGES,
                                     out, udp))
    filt.last = r.last
    return r, out, filt


def frames_to_packets(r: batch.OpenResult, out: bytearray) -> list[bytes]:
    """Split every frame back into wire packets (what the kernel does with a GSO write)."""
    packets = []
    for hdr, start, end in r.frames:
        packets += O.split_packets(O.VirtioNetHeader.unpack_from(hdr), out[start:end])
    return packets


@pytest.mark.parametrize("v6,is_tcp,gso,length", SUPERS)
def test_open_train_coalesces_back(impl: Any, v6: bool, is_tcp: bool, gso: int, length: int) -> None:
    seal, open_train = impl
    whole = tcp(v6, os.urandom(length)) if is_tcp else udp(v6, os.urandom(length))
    gso_type = (O.GSO_TCPV6 if v6 else O.GSO_TCPV4) if is_tcp else O.GSO_UDP_L4
    hdr, pkt = kernel_super(whole, gso_type, gso)
    segments = O.split_packets(O.VirtioNetHeader.unpack_from(hdr), pkt)
    train, count, size = seal(KEY, RECEIVER, 0, hdr, pkt, 1420)
    r, out, filt = open_all(open_train, train, size, udp=True)
    assert (r.consumed, r.ok, r.bad_tag, r.replay, r.bad_ip, r.keepalives) == (count, count, 0, 0, 0, 0)
    assert r.nbytes == len(train) and filt.last == count - 1
    assert len(r.frames) == 1  # one flow, in order: one super-packet
    fhdr = O.VirtioNetHeader.unpack_from(r.frames[0][0])
    assert fhdr.gso_type == gso_type and fhdr.gso_size == gso and fhdr.flags == O.F_NEEDS_CSUM
    assert frames_to_packets(r, out) == segments
    # Without udp=True, UDP packets stay single (kernels before 6.2 take no USO writes).
    if not is_tcp:
        r, out, _ = open_all(open_train, train, size, udp=False)
        assert len(r.frames) == count and all(h == bytes(10) for h, _, _ in r.frames)
        assert [bytes(out[s:e]) for _, s, e in r.frames] == segments


def test_open_train_c_equals_python() -> None:
    if batch._c is None:
        pytest.skip("wiretun.wireguard._wgcrypto is not built")
    payload = os.urandom(50_000)
    hdr, pkt = kernel_super(tcp(False, payload), O.GSO_TCPV4, 1380)
    train, count, size = batch._c.seal_super(KEY, RECEIVER, 10, hdr, pkt, 1420)
    dgrams = datagrams(train, size)
    # Reordered, duplicated, one tampered, one replayed from before the window start.
    mixed = dgrams[:5] + [dgrams[7], dgrams[5], dgrams[6], dgrams[6]] + dgrams[8:]
    bad = bytearray(mixed[10])
    bad[-1] ^= 1
    mixed[10] = bytes(bad)
    same = [m for m in mixed if len(m) == size]
    joined = b"".join(same)
    results = []
    for fn in (batch._c.open_train, batch._py_open_train):
        r, out, filt = open_all(fn, joined, size, udp=True)
        results.append((r, [bytes(out[s:e]) for _, s, e in r.frames], bytes(filt._ring), filt.last))
    assert results[0] == results[1]
    r = results[0][0]
    assert r.bad_tag == 1 and r.replay == 1 and r.consumed == len(same)


def test_open_train_counts_tampered_replayed_and_bad_ip(impl: Any) -> None:
    seal, open_train = impl
    pkts = [tcp(False, b"x" * 100, seq=1000 + 100 * i, flags=P.TCP_ACK, ip_id=i) for i in range(4)]
    sealed = [seal(KEY, RECEIVER, i, bytes(10), p, 1420) for i, p in enumerate(pkts)]
    size = sealed[0][2]
    tampered = bytearray(sealed[1][0])
    tampered[20] ^= 0x80
    # Not IP: version 5 (the core's rx_bad_ip), sealed like data.
    notip, _, _ = seal(KEY, RECEIVER, 9, bytes(10), b"\x50" + bytes(139), 1420)
    keepalive = struct.pack("<IIQ", 4, RECEIVER, 10) + ChaCha20Poly1305(KEY).encrypt(struct.pack("<4xQ", 10), b"", None)
    train = sealed[0][0] + bytes(tampered) + sealed[2][0] + sealed[2][0] + sealed[3][0] + notip
    assert len(notip) == size
    r, out, filt = open_all(open_train, train, size)
    assert (r.consumed, r.ok, r.bad_tag, r.replay, r.bad_ip) == (6, 3, 1, 1, 1)
    assert r.nbytes == 4 * size  # authenticated and fresh: 0, 2, 3 and the bad IP one
    assert frames_to_packets(r, out) == [pkts[0], pkts[2], pkts[3]]
    # A keepalive as a train of its own (shorter than the others: the last of a train).
    r, out, filt = open_all(open_train, keepalive, 32, filt=filt)
    assert (r.consumed, r.keepalives, r.ok, r.frames) == (1, 1, 0, [])
    # Everything again: all replays now.
    r, out, filt = open_all(open_train, train, size, filt=filt)
    assert r.replay == 5 and r.ok == 0 and r.bad_tag == 1


def test_open_train_stops_at_another_receiver_or_type(impl: Any) -> None:
    seal, open_train = impl
    p = tcp(True, b"y" * 200, flags=P.TCP_ACK)
    a, _, size = seal(KEY, RECEIVER, 0, bytes(10), p, 1420)
    b, _, _ = seal(KEY, RECEIVER + 1, 1, bytes(10), p, 1420)
    r, _, _ = open_all(open_train, a + b + a, size)
    assert r.consumed == 1 and r.ok == 1
    handshake = b"\x01" + bytes(size - 1)
    r, _, _ = open_all(open_train, handshake + a, size)
    assert r.consumed == 0 and r.frames == []


def test_open_train_keeps_flows_apart_and_order(impl: Any) -> None:
    seal, open_train = impl
    a = [tcp(False, bytes([i]) * 1000, seq=1000 + 1000 * i, flags=P.TCP_ACK, ip_id=i) for i in range(3)]
    b = [P.ipv4_tcp(A4, B4, 40001, 5201, 9000 + 1000 * i, 1, P.TCP_ACK, bytes([i]) * 1000, ip_id=i) for i in range(2)]
    order = [a[0], a[1], b[0], b[1], a[2]]
    train = b"".join(seal(KEY, RECEIVER, i, bytes(10), p, 1420)[0] for i, p in enumerate(order))
    size = len(train) // 5
    r, out, _ = open_all(open_train, train, size)
    assert frames_to_packets(r, out) == order
    assert len(r.frames) == 3  # a0+a1, b0+b1, a2


def test_replay_window_matches_replay_filter(impl: Any) -> None:
    _, open_train = impl
    seal = batch._py_seal_super
    p = udp(False, b"z" * 10)
    counters = [0, 5, 3, 3, 9000, 800, 900, 8999, 8000, 20000, 11873, 11872, 11871]
    reference = ReplayFilter()
    expected = [reference.validate(c) for c in counters]
    filt = ReplayFilter()
    got = []
    for c in counters:
        train, _, size = seal(KEY, RECEIVER, c, bytes(10), p, 1420)
        r, _, filt = open_all(open_train, train, size, filt=filt)
        got.append(r.ok == 1)
    assert got == expected
    assert filt.last == reference.last and bytes(filt._ring) == bytes(reference._ring)
    assert len(filt._ring) == RING_BITS
