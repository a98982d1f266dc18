import os
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretun import offload as O
from wiretun import packet as P
from wiretun.errors import InvalidData, InvalidParameter, NotSupported

A4, B4 = "192.0.2.1", "198.51.100.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def naive_sum(data: bytes) -> int:
    """Independent one's-complement sum (word loop), not packet.py's big-int trick."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_ok(pkt: bytes) -> bool:
    """True if IPv4 header and TCP/UDP checksums verify, computed with the word loop."""
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 15) * 4
        if naive_sum(pkt[:ihl]) != 0xFFFF:
            return False
        proto, src, dst, l4 = pkt[9], pkt[12:16], pkt[16:20], pkt[ihl:]
        pseudo = src + dst + bytes([0, proto]) + struct.pack("!H", len(l4))
    else:
        proto, src, dst, l4 = pkt[6], pkt[8:24], pkt[24:40], pkt[40:]
        pseudo = src + dst + struct.pack("!I", len(l4)) + bytes([0, 0, 0, proto])
    return naive_sum(pseudo + l4) == 0xFFFF


def kernel_super(pkt: bytes, gso_type: int, gso_size: int, *, hdr_len: int | None = None,
                 csum_start: int | None = None) -> tuple[O.VirtioNetHeader, bytearray]:
    """Turn a complete packet into a super-packet as TUN reads it: partial (pseudo) checksum only."""
    info = P.parse(pkt)
    cs = info.header_length if csum_start is None else csum_start
    off = 16 if info.protocol == P.PROTO_TCP else 6
    b = bytearray(pkt)
    l4_len = len(b) - cs
    struct.pack_into("!H", b, cs + off, P.pseudo_header_sum(b, info.protocol, l4_len))
    hdr = O.VirtioNetHeader(O.F_NEEDS_CSUM, gso_type, info.payload_offset if hdr_len is None else hdr_len,
                            gso_size, cs, off)
    return hdr, b


def tcp4(payload, seq=1000, flags=P.TCP_ACK | P.TCP_PSH, ip_id=100, options=b"", **kw):
    return P.ipv4_tcp(A4, B4, 40000, 443, seq, 7777, flags, payload, ip_id=ip_id, options=options, **kw)


def tcp6(payload, seq=1000, flags=P.TCP_ACK | P.TCP_PSH, options=b"", **kw):
    return P.ipv6_tcp(A6, B6, 40000, 443, seq, 7777, flags, payload, options=options, **kw)


def masked(pkt: bytes, ip_id: bool = False) -> bytes:
    """Packet with IPv4 header checksum and TCP/UDP checksum (and with ``ip_id`` the IPv4 ID)
    zeroed, to compare everything else."""
    b = bytearray(pkt)
    info = P.parse(pkt)
    if info.version == 4:
        b[10:12] = b"\0\0"
        if ip_id:
            b[4:6] = b"\0\0"
    off = 16 if info.protocol == P.PROTO_TCP else 6
    b[info.header_length + off : info.header_length + off + 2] = b"\0\0"
    return bytes(b)


# --- header codec ----------------------------------------------------------------------------


def test_header_codec():
    h = O.VirtioNetHeader(O.F_NEEDS_CSUM, O.GSO_TCPV4, 52, 1448, 20, 16)
    raw = h.pack()
    assert len(raw) == O.VIRTIO_NET_HDR_LEN == 10
    if sys.byteorder == "little":
        assert raw == bytes.fromhex("0101" "3400" "a805" "1400" "1000")
    assert O.VirtioNetHeader.unpack_from(raw) == h
    buf = bytearray(16)
    h.pack_into(buf, 3)
    assert O.VirtioNetHeader.unpack_from(buf, 3) == h
    assert O.VirtioNetHeader.unpack_from(memoryview(bytes(buf)), 3) == h
    assert O.VirtioNetHeader() == O.VirtioNetHeader.unpack_from(O.ZERO_HEADER)
    with pytest.raises(InvalidData, match="10 bytes, 9 given"):
        O.VirtioNetHeader.unpack_from(bytes(9))
    with pytest.raises(InvalidData, match="10 bytes, 6 given"):
        O.VirtioNetHeader.unpack_from(bytes(16), 10)


# --- split -----------------------------------------------------------------------------------


def check_segments(segs, original, gso_size, *, tcp=True):
    """Every segment checksums right; payloads concatenate to the original's payload."""
    info0 = P.parse(original)
    payload = original[info0.payload_offset:]
    got = b""
    for i, s in enumerate(segs):
        assert P.verify_checksums(s) and naive_ok(s), i
        info = P.parse(s)
        assert info.total_length == len(s)
        data = s[info.payload_offset:]
        assert len(data) == min(gso_size, len(payload) - i * gso_size) or (not payload and not data)
        got += data
        assert s[: info0.header_length][12 if info.version == 4 else 8:] == \
            original[: info0.header_length][12 if info.version == 4 else 8:]  # addresses (and v6 ext)
        if info.version == 4:
            assert struct.unpack_from("!H", s, 4)[0] == (struct.unpack_from("!H", original, 4)[0] + i) & 0xFFFF
            assert s[1] == original[1] and s[6] == original[6] and s[8] == original[8]
        if tcp:
            h = info.header_length
            seq0 = struct.unpack_from("!I", original, info0.header_length + 4)[0]
            assert struct.unpack_from("!I", s, h + 4)[0] == (seq0 + i * gso_size) & 0xFFFFFFFF
            assert s[h + 8 : h + 12] == original[info0.header_length + 8 : info0.header_length + 12]
            assert s[h + 20 : info.payload_offset] == original[info0.header_length + 20 : info0.payload_offset]
        else:
            assert struct.unpack_from("!H", s, info.header_length + 4)[0] == len(s) - info.header_length
    assert got == payload
    return got


@pytest.mark.parametrize("length", [1, 1447, 1448, 1449, 2 * 1448, 10 * 1448 + 17, 65535 - 40 - 12])
def test_split_tcp4_lengths(length):
    payload = os.urandom(length)
    orig = tcp4(payload, options=b"\x01\x01\x08\x0a" + bytes(8))
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1448)
    segs = O.split_packets(hdr, sp)
    assert len(segs) == -(-length // 1448) == O.segment_count(hdr, sp)
    check_segments(segs, orig, 1448)


def test_split_flags_fin_psh_last_cwr_first():
    orig = tcp4(os.urandom(5000), flags=P.TCP_ACK | P.TCP_PSH | P.TCP_FIN | P.TCP_CWR | P.TCP_ECE)
    hdr, sp = kernel_super(orig, O.GSO_TCPV4 | O.GSO_ECN, 1000)
    segs = O.split_packets(hdr, sp)
    flags = [P.parse(s).tcp_flags for s in segs]
    assert flags[0] == P.TCP_ACK | P.TCP_CWR | P.TCP_ECE
    assert flags[1:4] == [P.TCP_ACK | P.TCP_ECE] * 3
    assert flags[4] == P.TCP_ACK | P.TCP_ECE | P.TCP_PSH | P.TCP_FIN
    check_segments(segs, orig, 1000)


def test_split_single_segment_keeps_all_flags():
    orig = tcp4(b"x" * 10, flags=P.TCP_ACK | P.TCP_PSH | P.TCP_FIN | P.TCP_CWR)
    segs = O.split_packets(*kernel_super(orig, O.GSO_TCPV4, 1000))
    assert segs == [orig] or masked(segs[0]) == masked(orig)
    assert P.parse(segs[0]).tcp_flags == P.TCP_ACK | P.TCP_PSH | P.TCP_FIN | P.TCP_CWR


def test_split_no_payload_gives_one_segment():
    orig = tcp4(b"", flags=P.TCP_ACK)
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1448)
    segs = O.split_packets(hdr, sp)
    assert len(segs) == 1 and P.verify_checksums(segs[0]) and masked(segs[0]) == masked(orig)


def test_split_tcp6():
    payload = os.urandom(9000)
    orig = tcp6(payload, flags=P.TCP_ACK | P.TCP_PSH, options=b"\x01\x01\x08\x0a" + bytes(8))
    hdr, sp = kernel_super(orig, O.GSO_TCPV6, 1428)
    segs = O.split_packets(hdr, sp)
    assert len(segs) == 7
    check_segments(segs, orig, 1428)
    for s in segs:
        assert struct.unpack_from("!H", s, 4)[0] == len(s) - 40


def test_split_tcp6_with_extension_header():
    inner = tcp6(os.urandom(3000))
    hbh = bytes([P.PROTO_TCP, 0, 1, 4, 0, 0, 0, 0])  # hop-by-hop with PadN
    pkt = bytearray(inner[:40]) + hbh + inner[40:]
    pkt[6] = 0
    struct.pack_into("!H", pkt, 4, len(pkt) - 40)
    hdr, sp = kernel_super(bytes(pkt), O.GSO_TCPV6, 1000, csum_start=48)
    segs = O.split_packets(hdr, sp)
    assert len(segs) == 3
    for s in segs:
        assert P.verify_checksums(s)
        assert s[40:48] == hbh and struct.unpack_from("!H", s, 4)[0] == len(s) - 40
    assert b"".join(s[68:] for s in segs) == inner[60:]


@pytest.mark.parametrize("v6", [False, True])
def test_split_udp_l4(v6):
    payload = os.urandom(1200 * 7 + 5)
    orig = (P.ipv6_udp(A6, B6, 5000, 6000, payload) if v6 else
            P.ipv4_udp(A4, B4, 5000, 6000, payload, ip_id=0xFFFE, dont_fragment=True))
    hdr, sp = kernel_super(orig, O.GSO_UDP_L4, 1200)
    segs = O.split_packets(hdr, sp)
    assert [len(s) - (48 if v6 else 28) for s in segs] == [1200] * 7 + [5]
    check_segments(segs, orig, 1200, tcp=False)
    if not v6:
        assert [struct.unpack_from("!H", s, 4)[0] for s in segs[:3]] == [0xFFFE, 0xFFFF, 0]  # ID wraps


def test_split_seq_wraps():
    orig = tcp4(os.urandom(3000), seq=0xFFFFFF00)
    segs = O.split_packets(*kernel_super(orig, O.GSO_TCPV4, 1000))
    assert [struct.unpack_from("!I", s, 24)[0] for s in segs] == [0xFFFFFF00, 0x2E8, 0x6D0]
    check_segments(segs, orig, 1000)


def test_split_ignores_kernel_hdr_len():
    # The kernel's hdr_len may cover the whole linear part; split derives it from the TCP header.
    orig = tcp4(os.urandom(4000))
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1000, hdr_len=1500)
    check_segments(O.split_packets(hdr, sp), orig, 1000)


def test_split_into_caller_buffers_with_offset():
    orig = tcp4(os.urandom(4000))
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1460)
    out = [bytearray(1600) for _ in range(4)]
    sizes = [0] * 4
    n = O.split(hdr, memoryview(sp), out, sizes, offset=16)
    assert n == 3 and sizes == [1500, 1500, 1120, 0]
    segs = [bytes(out[i][16 : 16 + sizes[i]]) for i in range(n)]
    assert all(out[i][:16] == bytes(16) for i in range(n))
    check_segments(segs, orig, 1460)
    assert bytes(sp) == bytes(kernel_super(orig, O.GSO_TCPV4, 1460)[1])  # the input is left as given


def test_split_frame():
    orig = tcp4(os.urandom(3000))
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1000)
    check_segments(O.split_frame(hdr.pack() + bytes(sp)), orig, 1000)


@pytest.mark.parametrize("pkt", [
    tcp4(b"hello world"),
    tcp6(b"odd"),
    P.ipv4_udp(A4, B4, 1, 2, b"datagram"),
    P.ipv6_udp(A6, B6, 1, 2, b"v6 datagram"),
])
def test_split_non_gso_finishes_checksum(pkt):
    hdr, sp = kernel_super(pkt, O.GSO_NONE, 0, hdr_len=0)
    assert not P.verify_checksums(bytes(sp))
    segs = O.split_packets(hdr, sp)
    assert len(segs) == 1 and P.verify_checksums(segs[0]) and naive_ok(segs[0])
    assert masked(segs[0]) == masked(pkt)
    # Without NEEDS_CSUM the packet is passed through byte for byte.
    assert O.split_packets(O.VirtioNetHeader(), pkt) == [pkt]


def test_finish_checksum_zero_becomes_ffff():
    # Payload chosen so the UDP checksum computes to 0: it must be stored as 0xFFFF.
    base = P.ipv4_udp(A4, B4, 1, 2, b"\0\0")
    csum = struct.unpack_from("!H", base, 26)[0]
    pkt = P.ipv4_udp(A4, B4, 1, 2, struct.pack("!H", csum))
    hdr, sp = kernel_super(pkt, O.GSO_NONE, 0)
    O.finish_checksum(sp, hdr.csum_start, hdr.csum_offset)
    assert sp[26:28] == b"\xff\xff" and P.verify_checksums(bytes(sp))
    with pytest.raises(InvalidData, match="beyond the packet's 30 bytes"):
        O.finish_checksum(bytearray(30), 20, 16)


def test_split_errors():
    orig = tcp4(os.urandom(3000))
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, 1000)
    with pytest.raises(InvalidParameter, match="needs 3 output buffers, 2 given"):
        O.split(hdr, sp, [bytearray(1100)] * 2, [0] * 2)
    with pytest.raises(InvalidParameter, match="needs 3 output buffers, 1 given"):
        O.split(hdr, sp, [bytearray(1100)] * 3, [0])
    with pytest.raises(InvalidParameter, match="output buffer 1 holds 1000 bytes .* needs 1040"):
        O.split(hdr, sp, [bytearray(1040), bytearray(1000), bytearray(1040)], [0] * 3)
    with pytest.raises(InvalidParameter, match="after offset 50, segment needs 1040"):
        O.split(hdr, sp, [bytearray(1040)] * 3, [0] * 3, offset=50)
    with pytest.raises(InvalidParameter, match="packet needs 3040"):
        O.split(O.VirtioNetHeader(), orig, [bytearray(100)], [0])
    with pytest.raises(InvalidParameter, match="0 given"):
        O.split(O.VirtioNetHeader(), orig, [], [])
    with pytest.raises(InvalidData, match="gso_size 0"):
        O.split_packets(hdr._replace(gso_size=0), sp)
    with pytest.raises(InvalidData, match="without NEEDS_CSUM"):
        O.split_packets(hdr._replace(flags=0), sp)
    with pytest.raises(InvalidData, match="csum_start 24 does not match the IPv4 header length 20"):
        O.split_packets(hdr._replace(csum_start=24), sp)
    with pytest.raises(InvalidData, match="TCPV6 on an IPv4"):
        O.split_packets(hdr._replace(gso_type=O.GSO_TCPV6), sp)
    with pytest.raises(InvalidData, match="protocol 6"):
        O.split_packets(hdr._replace(gso_type=O.GSO_UDP_L4, csum_offset=6), sp)
    with pytest.raises(InvalidData, match="csum_offset 6 is not the TCP"):
        O.split_packets(hdr._replace(csum_offset=6), sp)
    with pytest.raises(InvalidData, match="unknown gso_type 0x9"):
        O.split_packets(hdr._replace(gso_type=9), sp)
    with pytest.raises(NotSupported, match="UFO"):
        O.split_packets(hdr._replace(gso_type=O.GSO_UDP), sp)
    with pytest.raises(InvalidData, match="overruns"):
        O.split_packets(hdr, sp[:30])
    with pytest.raises(InvalidData, match="version 5"):
        O.split_packets(hdr, b"\x50" + bytes(59))
    h6, sp6 = kernel_super(tcp6(b"x" * 3000), O.GSO_TCPV6, 1000)
    with pytest.raises(InvalidData, match="TCPV4 on an IPv6"):
        O.split_packets(h6._replace(gso_type=O.GSO_TCPV4), sp6)
    with pytest.raises(InvalidData, match="inside the 40-byte IPv6 header"):
        O.split_packets(h6._replace(csum_start=20), sp6)
    with pytest.raises(InvalidData, match="empty"):
        O.split_packets(h6, b"")


# --- coalesce --------------------------------------------------------------------------------


def stream4(n, size=1000, seq=5000, last=None, psh_last=True, **kw):
    """n in-sequence TCP segments of one IPv4 flow (last one may be shorter), PSH on the last."""
    out = []
    for i in range(n):
        plen = last if (i == n - 1 and last is not None) else size
        flags = P.TCP_ACK | (P.TCP_PSH if psh_last and i == n - 1 else 0)
        out.append(tcp4(os.urandom(plen), seq=seq, flags=flags, ip_id=(100 + i) & 0xFFFF, **kw))
        seq += plen
    return out


def stream6(n, size=1000, seq=5000, last=None, **kw):
    out = []
    for i in range(n):
        plen = last if (i == n - 1 and last is not None) else size
        flags = P.TCP_ACK | (P.TCP_PSH if i == n - 1 else 0)
        out.append(tcp6(os.urandom(plen), seq=seq, flags=flags, **kw))
        seq += plen
    return out


def check_super(frame: O.Frame, segs):
    """The super-packet has the header the kernel wants and splits back into ``segs``."""
    hdr = O.VirtioNetHeader.unpack_from(frame.header)
    sp = bytes(frame.packet)
    info = P.parse(sp)
    assert hdr.flags == O.F_NEEDS_CSUM
    assert hdr.csum_start == info.header_length
    assert hdr.hdr_len == info.payload_offset
    assert hdr.gso_size == len(segs[0]) - info.payload_offset
    assert frame.count == len(segs)
    if info.version == 4:
        assert naive_sum(sp[:20]) == 0xFFFF
    # The checksum field holds the pseudo-header sum: finishing it makes the packet verify.
    full = bytearray(sp)
    O.finish_checksum(full, hdr.csum_start, hdr.csum_offset)
    assert P.verify_checksums(bytes(full)) and naive_ok(bytes(full))
    back = O.split_packets(hdr, sp)
    # IPv4 IDs: a super-packet keeps the first's; segmenting counts up from it (as the kernel does).
    assert [masked(b, ip_id=True) for b in back] == [masked(s, ip_id=True) for s in segs]
    assert all(P.verify_checksums(b) for b in back)


@pytest.mark.parametrize("n, last", [(2, None), (5, 300), (40, 999), (3, 1000)])
def test_coalesce_round_trip_tcp4(n, last):
    segs = stream4(n, last=last)
    frames = O.coalesce(segs)
    assert len(frames) == 1
    hdr = O.VirtioNetHeader.unpack_from(frames[0].header)
    assert hdr.gso_type == O.GSO_TCPV4 and hdr.csum_offset == 16 and hdr.gso_size == 1000
    assert len(frames[0].packet) == sum(len(s) for s in segs) - 40 * (n - 1)
    check_super(frames[0], segs)


def test_coalesce_round_trip_tcp6_with_options():
    segs = stream6(6, size=1200, last=10, options=b"\x01\x01\x08\x0a" + b"\x00\x00\x01\x00" * 2)
    (frame,) = O.coalesce(segs)
    assert O.VirtioNetHeader.unpack_from(frame.header).gso_type == O.GSO_TCPV6
    check_super(frame, segs)


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_round_trip_udp(v6):
    # Consecutive IPv4 IDs, as a sender (and split) gives them.
    mk = (lambda p, i: P.ipv6_udp(A6, B6, 53, 5353, p)) if v6 else (
        lambda p, i: P.ipv4_udp(A4, B4, 53, 5353, p, ip_id=i))
    segs = [mk(os.urandom(1200), i) for i in range(5)] + [mk(b"tail", 5)]
    (frame,) = O.coalesce(segs, udp=True)
    hdr = O.VirtioNetHeader.unpack_from(frame.header)
    assert (hdr.gso_type, hdr.csum_offset, hdr.gso_size) == (O.GSO_UDP_L4, 6, 1200)
    ih = 40 if v6 else 20
    assert struct.unpack_from("!H", frame.packet, ih + 4)[0] == len(frame.packet) - ih  # whole length
    check_super(frame, segs)
    # Without udp=True (the default) they all stay as they are.
    assert [f.packet for f in O.coalesce(segs)] == segs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1400), min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_split_then_coalesce_round_trip(sizes, seq):
    gso = max(sizes)
    payload = os.urandom(sum(sizes))
    orig = tcp4(payload, seq=seq, flags=P.TCP_ACK | P.TCP_PSH)
    hdr, sp = kernel_super(orig, O.GSO_TCPV4, gso)
    segs = O.split_packets(hdr, sp)
    frames = O.coalesce(segs)
    assert sum(f.count for f in frames) == len(segs)
    if len(segs) == 1:
        assert frames[0].header == O.ZERO_HEADER and frames[0].packet is segs[0]
    else:
        assert len(frames) == 1
        check_super(frames[0], segs)
        # And the super-packet is the kernel's, field for field (checksum fields aside).
        assert masked(bytes(frames[0].packet)) == masked(bytes(sp))


def test_coalesce_interleaved_flows_and_untouched_order():
    a = stream4(3)
    b = [P.ipv4_tcp(A4, B4, 40001, 443, 9000 + i * 500, 1, P.TCP_ACK, os.urandom(500)) for i in range(3)]
    icmp = P.ipv4_icmp_echo(A4, B4, 1, 1)
    syn = P.ipv4_tcp(A4, B4, 40002, 443, 1, 0, P.TCP_SYN)
    junk = b"\x00" * 5
    batch = [a[0], b[0], icmp, a[1], syn, b[1], junk, a[2], b[2]]
    frames = O.coalesce(batch)
    assert [f.count for f in frames] == [3, 3, 1, 1, 1]
    assert frames[2].packet is icmp and frames[3].packet is syn and frames[4].packet is junk
    assert all(f.header == O.ZERO_HEADER for f in frames[2:])
    check_super(frames[0], a)
    check_super(frames[1], b)


def _flows(frames):
    return [f.count for f in frames]


def test_coalesce_keeps_flow_order_around_unmergeable_packet():
    a = stream4(4, psh_last=False)
    pure_ack = tcp4(b"", seq=5000 + 2000, flags=P.TCP_ACK)
    frames = O.coalesce([a[0], a[1], pure_ack, a[2], a[3]])
    assert _flows(frames) == [2, 1, 2]
    assert frames[1].packet is pure_ack
    check_super(frames[0], a[:2])
    check_super(frames[2], a[2:])


def _swap1(**kw):
    """Replace the middle of a 3-segment stream with a variant (same seq and payload)."""
    return lambda s: [s[0], tcp4(s[1][40:], seq=6000, flags=kw.pop("flags", P.TCP_ACK), **kw), s[2]]


@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s[:1] + [tcp4(os.urandom(1000), seq=9999, flags=P.TCP_ACK)] + s[2:], [1, 1, 1]),  # gap
    (_swap1(ttl=7), [1, 1, 1]),
    (_swap1(tos=4), [1, 1, 1]),
    (_swap1(dont_fragment=False), [1, 1, 1]),
    (_swap1(window=1), [1, 1, 1]),
    (_swap1(options=b"\x01" * 4), [1, 1, 1]),
    (_swap1(flags=P.TCP_ACK | P.TCP_URG), [1, 1, 1]),
    (_swap1(flags=P.TCP_ACK | P.TCP_FIN), [1, 1, 1]),
    (_swap1(flags=P.TCP_ACK | P.TCP_ECE), [1, 1, 1]),
    (_swap1(flags=P.TCP_ACK | P.TCP_PSH), [2, 1]),  # PSH ends a run
    (lambda s: [s[0], tcp4(s[1][40:500], seq=6000, flags=P.TCP_ACK),
                tcp4(s[2][40:], seq=6460, flags=P.TCP_ACK)], [2, 1]),  # a short segment ends a run
    (lambda s: [tcp4(s[0][40:540], seq=5500, flags=P.TCP_ACK), s[1], s[2]], [1, 2]),  # larger after
    (lambda s: [s[0], s[1], s[2]], [3]),
])
def test_coalesce_rules(mutate, expect):
    segs = mutate(stream4(3))
    frames = O.coalesce(segs)
    assert _flows(frames) == expect
    assert sum(f.count for f in frames) == len(segs)
    i = 0
    for f in frames:  # whatever merged still round-trips; singles are untouched
        group = segs[i : i + f.count]
        if f.count == 1:
            assert f.packet is segs[i] and f.header == O.ZERO_HEADER
        else:
            check_super(f, group)
        i += f.count


def test_coalesce_different_ack_does_not_merge():
    first = stream4(1, psh_last=False)[0]
    same_ack = P.ipv4_tcp(A4, B4, 40000, 443, 6000, 7777, P.TCP_ACK, os.urandom(1000), ip_id=101)
    other_ack = P.ipv4_tcp(A4, B4, 40000, 443, 6000, 8888, P.TCP_ACK, os.urandom(1000), ip_id=101)
    assert _flows(O.coalesce([first, same_ack])) == [2]
    assert _flows(O.coalesce([first, other_ack])) == [1, 1]


def test_coalesce_bad_checksum_left_alone():
    segs = stream4(4, psh_last=False)
    bad = bytearray(segs[2])
    bad[-1] ^= 0xFF
    batch = [segs[0], segs[1], bytes(bad), segs[3]]
    frames = O.coalesce(batch)
    assert _flows(frames) == [2, 1, 1]
    assert frames[1].packet is batch[2]  # the kernel will drop it, as it would have anyway
    bad_ip = bytearray(segs[1])
    bad_ip[10] ^= 1  # a bad IPv4 header checksum must not be laundered by a fresh one either
    assert _flows(O.coalesce([segs[0], bytes(bad_ip), segs[2]])) == [1, 1, 1]


def test_coalesce_ipv4_options_fragments_and_v6_ext_untouched():
    segs = stream4(2)
    frag = bytearray(segs[1])
    frag[6] |= 0x20  # MF
    P.fix_checksums(frag)
    assert _flows(O.coalesce([segs[0], bytes(frag)])) == [1, 1]
    opt = bytearray(segs[1][:20]) + b"\x01\x01\x01\x00" + segs[1][20:]
    opt[0] = 0x46
    struct.pack_into("!H", opt, 2, len(opt))
    P.fix_checksums(opt)
    assert _flows(O.coalesce([segs[0], bytes(opt)])) == [1, 1]
    # In the middle of a run it ends the run, so nothing of its flow overtakes it.
    three = stream4(3, psh_last=False)
    opt = bytearray(three[1][:20]) + b"\x01\x01\x01\x00" + three[1][20:]
    opt[0] = 0x46
    struct.pack_into("!H", opt, 2, len(opt))
    P.fix_checksums(opt)
    frames = O.coalesce([three[0], bytes(opt), three[2]])
    assert _flows(frames) == [1, 1, 1] and frames[1].packet == bytes(opt)
    six = stream6(2)
    ext = bytearray(six[1][:40]) + bytes([P.PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]) + six[1][40:]
    ext[6] = 0
    struct.pack_into("!H", ext, 4, len(ext) - 40)
    assert _flows(O.coalesce([six[0], bytes(ext)])) == [1, 1]


def test_coalesce_limits():
    segs = stream4(70, size=1000, psh_last=False)
    frames = O.coalesce(segs)
    # 65535 bytes hold 40 + 65 * 1000; max_segments (64) bites first.
    assert _flows(frames) == [64, 6]
    assert all(len(f.packet) <= 65535 for f in frames)
    check_super(frames[0], segs[:64])
    big = stream4(5, size=16000, psh_last=False)
    assert _flows(O.coalesce(big)) == [4, 1]  # 40 + 4 * 16000 = 64040; a fifth would pass 65535
    assert _flows(O.coalesce(segs[:10], max_segments=4)) == [4, 4, 2]
    assert _flows(O.coalesce(segs[:10], max_size=3040)) == [3, 3, 3, 1]
    with pytest.raises(InvalidParameter, match="max_size 65536"):
        O.coalesce(segs, max_size=65536)
    with pytest.raises(InvalidParameter, match="max_segments 0"):
        O.coalesce(segs, max_segments=0)


def test_coalesce_udp_rules():
    def mk(p, **kw):
        return P.ipv4_udp(A4, B4, 53, 5353, p, **kw)

    def runs(batch):
        return _flows(O.coalesce(batch, udp=True))

    same = [mk(b"a" * 100) for _ in range(3)]
    assert runs(same) == [3]
    assert _flows(O.coalesce(same)) == [1, 1, 1]  # UDP only when asked for
    assert runs([mk(b"a" * 50), mk(b"a" * 100)]) == [1, 1]  # larger after smaller
    assert runs([mk(b"a" * 100), mk(b"a" * 50), mk(b"a" * 50)]) == [2, 1]  # short one ends a run
    assert runs([mk(b"a" * 100), mk(b"a" * 100, ttl=3)]) == [1, 1]
    nocsum = bytearray(mk(b"a" * 100))
    nocsum[26:28] = b"\0\0"  # "no checksum": nothing for the kernel to finish, leave it alone
    assert runs([mk(b"a" * 100), bytes(nocsum), mk(b"a" * 100)]) == [1, 1, 1]
    assert runs([mk(b""), mk(b"")]) == [1, 1]  # empty datagrams never merge
    # A tiny or empty datagram of the flow ends the run too; nothing overtakes it.
    assert runs([mk(b"a" * 100), mk(b""), mk(b"a" * 100)]) == [1, 1, 1]
    assert runs([mk(b"a" * 100), mk(b"a" * 100), mk(b"a" * 100)]) == [3]
    assert _flows(O.coalesce([mk(b"a" * 100), mk(b"b" * 200), mk(b"a" * 100)], udp=True,
                             max_size=200)) == [1, 1, 1]


def test_coalesce_out_list_and_frame_bytes():
    segs = stream4(3)
    out: list[O.Frame] = [O.Frame(O.ZERO_HEADER, b"old", 1)]
    res = O.coalesce(segs, out=out)
    assert res is out and len(out) == 2 and out[0].packet == b"old"
    fb = O.frame_bytes(out[1])
    assert fb[:10] == out[1].header and fb[10:] == bytes(out[1].packet)
    assert O.coalesce([]) == []


def test_split_short_ipv6_super_packet_is_invalid_data():
    header = O.VirtioNetHeader(O.F_NEEDS_CSUM, O.GSO_TCPV6, 60, 1400, 40, 16)
    for n in (1, 6, 39):
        with pytest.raises(InvalidData, match="shorter than its header"):
            O.split_packets(header, b"\x60" + bytes(n - 1))


# --- hostile offsets and fields (found by fuzz/library.py) -------------------------------------


@pytest.mark.parametrize("offset", [-1, -2, -10, -12, 2**63, 1.5, None])
def test_virtio_header_offsets_out_of_range_are_refused(offset):
    buf = bytearray(range(24))
    with pytest.raises((InvalidParameter, InvalidData)):
        O.VirtioNetHeader.unpack_from(buf, offset)
    with pytest.raises((InvalidParameter, InvalidData)):
        O.VirtioNetHeader(1, 2, 3, 4, 5, 6).pack_into(buf, offset)
    assert buf == bytearray(range(24))


@pytest.mark.parametrize("fields", [(256, 0, 0, 0, 0, 0), (0, -1, 0, 0, 0, 0), (0, 0, 0x10000, 0, 0, 0),
                                    (0, 0, 0, 0, 0, -5), (0, 0, 0, 1.0, 0, 0)])
def test_virtio_header_fields_out_of_range_are_refused(fields):
    with pytest.raises(InvalidParameter, match="virtio-net header field"):
        O.VirtioNetHeader(*fields).pack()
    buf = bytearray(10)
    with pytest.raises(InvalidParameter):
        O.VirtioNetHeader(*fields).pack_into(buf)
    assert buf == bytearray(10)


@pytest.mark.parametrize("start, where", [(-10, 2), (3, -2), (-1, 0), (2**63, 0), (0, 2**63)])
def test_finish_checksum_refuses_negative_or_huge_offsets_and_leaves_the_packet(start, where):
    pkt = bytearray(range(40))
    with pytest.raises((InvalidParameter, InvalidData)):
        O.finish_checksum(pkt, start, where)
    assert pkt == bytearray(range(40))


def test_split_refuses_a_negative_offset():
    pkt = P.ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"x" * 100)
    out = [bytearray(2000)]
    with pytest.raises(InvalidParameter, match="offset"):
        O.split(O.VirtioNetHeader(), pkt, out, [0], -16)
    assert out[0] == bytearray(2000)
