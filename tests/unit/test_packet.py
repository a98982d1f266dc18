import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretun import packet as P
from wiretun.errors import InvalidData, InvalidParameter


def simple_checksum(data: bytes, initial: int = 0) -> int:
    """Deliberately naive RFC 1071 word loop, independent of packet.py's big-int trick."""
    if len(data) % 2:
        data = data + b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def simple_pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + struct.pack("!H", length)
    return src + dst + struct.pack("!I", length) + b"\0\0\0" + bytes([proto])


# --- checksums -------------------------------------------------------------------------------


def test_rfc1071_example():
    # RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2, so the checksum is 220d.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert P.ones_sum(data) == 0xDDF2
    assert P.checksum(data) == 0x220D


def test_known_ipv4_header_checksum():
    # A well-known header (192.168.0.1 -> 192.168.0.199, UDP, DF) whose checksum is b861.
    hdr = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert P.ipv4_header_checksum(hdr) == 0xB861
    hdr[10:12] = b"\xb8\x61"
    assert P.ones_sum(hdr) == 0xFFFF


def test_checksum_edge_values():
    assert P.checksum(b"") == 0xFFFF
    assert P.checksum(b"\0\0\0") == 0xFFFF
    assert P.checksum(b"\xff\xff") == 0x0000
    assert P.checksum(b"\x01") == simple_checksum(b"\x01") == 0xFEFF  # odd byte is the high byte
    assert P.ones_sum(b"\xff\xff\xff\xff") == 0xFFFF


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_naive(data, initial):
    assert P.checksum(data, initial) == simple_checksum(data, initial)
    assert P.checksum(memoryview(data), initial) == simple_checksum(data, initial)


def test_checksum_large():
    data = bytes(range(256)) * 256  # 64 KiB
    assert P.checksum(data) == simple_checksum(data)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 255), st.integers(1, 0xFFFF))
def test_pseudo_v4_matches_naive(src, dst, proto, length):
    # length >= 1: a real pseudo header is never all zero (an all-zero one is "negative zero").
    expect = simple_checksum(simple_pseudo(src, dst, proto, length))
    assert ~P.pseudo_header_sum_v4(src, dst, proto, length) & 0xFFFF == expect


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.integers(0, 255), st.integers(1, 0xFFFF))
def test_pseudo_v6_matches_naive(src, dst, proto, length):
    expect = simple_checksum(simple_pseudo(src, dst, proto, length))
    assert ~P.pseudo_header_sum_v6(src, dst, proto, length) & 0xFFFF == expect


# --- the Wintun example packet -----------------------------------------------------------------


WINTUN_ECHO = bytes.fromhex(
    # 45 00 len=28 | id 0 | no flags | TTL 255, ICMP, checksum 99c6 (computed by hand) | 10.6.7.8 | 10.6.7.7
    "4500001c" "00000000" "ff0199c6" "0a060708" "0a060707"
    # ICMP type 8 code 0, checksum ~0x0800 = f7ff, identifier 0, sequence 0
    "0800f7ff" "00000000"
)


def test_wintun_example_packet_bytes():
    assert P.wintun_example_echo_request() == WINTUN_ECHO
    assert P.ipv4_icmp_echo("10.6.7.8", "10.6.7.7", 0, 0, b"", 255, True) == WINTUN_ECHO
    assert len(WINTUN_ECHO) == 28


def test_wintun_example_packet_parses():
    info = P.parse(WINTUN_ECHO)
    assert info.version == 4
    assert info.src == ipaddress.IPv4Address("10.6.7.8")
    assert info.dst == ipaddress.IPv4Address("10.6.7.7")
    assert info.protocol == P.PROTO_ICMP
    assert (info.icmp_type, info.icmp_code) == (P.ICMP_ECHO_REQUEST, 0)
    assert (info.header_length, info.payload_offset, info.total_length, info.ttl) == (20, 28, 28, 255)
    assert P.verify_checksums(WINTUN_ECHO)


def test_echo_reply_type_and_checksum():
    rep = P.ipv4_icmp_echo("10.6.7.7", "10.6.7.8", 0x1234, 7, b"ping", request=False, ttl=64)
    info = P.parse(rep)
    assert info.icmp_type == P.ICMP_ECHO_REPLY and info.ttl == 64
    assert rep[24:28] == b"\x12\x34\x00\x07" and rep[28:] == b"ping"
    assert simple_checksum(rep[20:]) == 0 and simple_checksum(rep[:20]) == 0


# --- builders + round trip ---------------------------------------------------------------------


def _check_l4(pkt: bytes, proto: int):
    info = P.parse(pkt)
    seg = pkt[info.header_length:]
    pseudo = b"" if proto == P.PROTO_ICMP else simple_pseudo(
        P.source_address_bytes(pkt), P.destination_address_bytes(pkt), proto, len(seg))
    assert simple_checksum(pseudo + seg) == 0
    if info.version == 4:
        assert simple_checksum(pkt[:20]) == 0
    return info


def test_ipv6_icmp_echo():
    pkt = P.ipv6_icmp_echo("fd00::1", "fd00::2", 5, 6, b"hello", hop_limit=9)
    info = _check_l4(pkt, P.PROTO_ICMPV6)
    assert info.version == 6 and info.protocol == P.PROTO_ICMPV6
    assert (info.icmp_type, info.ttl, info.payload_offset) == (P.ICMPV6_ECHO_REQUEST, 9, 48)
    assert P.parse(P.ipv6_icmp_echo("::1", "::2", request=False)).icmp_type == P.ICMPV6_ECHO_REPLY


@given(st.binary(max_size=1500), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
@settings(max_examples=100)
def test_udp_round_trip(payload, sport, dport):
    for pkt, v in ((P.ipv4_udp("192.0.2.1", "198.51.100.2", sport, dport, payload), 4),
                   (P.ipv6_udp("2001:db8::1", "2001:db8::2", sport, dport, payload), 6)):
        info = _check_l4(pkt, P.PROTO_UDP)
        assert info.version == v and (info.src_port, info.dst_port) == (sport, dport)
        assert pkt[info.payload_offset:] == payload and info.payload_length == len(payload)
        assert P.verify_checksums(pkt)


@given(st.binary(max_size=1500), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 255), st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01" * 12]))
@settings(max_examples=100)
def test_tcp_round_trip(payload, seq, ack, flags, options):
    for pkt in (P.ipv4_tcp("10.0.0.1", "10.0.0.2", 1000, 80, seq, ack, flags, payload, options=options),
                P.ipv6_tcp("fd00::a", "fd00::b", 1000, 80, seq, ack, flags, payload, options=options)):
        info = _check_l4(pkt, P.PROTO_TCP)
        h = info.header_length
        assert struct.unpack_from("!II", pkt, h + 4) == (seq, ack)
        assert info.tcp_flags == flags
        assert info.payload_offset == h + 20 + len(options)
        assert pkt[info.payload_offset:] == payload
        assert P.verify_checksums(pkt)


def test_ipv4_header_fields():
    pkt = P.ipv4_udp("1.2.3.4", b"\x05\x06\x07\x08", 1, 2, b"x", ttl=3, ip_id=0xBEEF,
                     dont_fragment=True, tos=0x10)
    assert pkt[1] == 0x10 and pkt[4:6] == b"\xbe\xef" and pkt[6:8] == b"\x40\x00" and pkt[8] == 3
    assert P.source_address_bytes(pkt) == bytes([1, 2, 3, 4])
    assert P.destination_address_bytes(pkt) == bytes([5, 6, 7, 8])


def test_address_kinds_and_bad_addresses():
    a = P.ipv4_udp(ipaddress.ip_address("1.2.3.4"), "5.6.7.8", 1, 2)
    assert a == P.ipv4_udp(b"\x01\x02\x03\x04", bytearray(b"\x05\x06\x07\x08"), 1, 2)
    with pytest.raises(InvalidParameter, match="'::1'"):
        P.ipv4_udp("::1", "1.2.3.4", 1, 2)
    with pytest.raises(InvalidParameter, match="nonsense"):
        P.ipv6_udp("nonsense", "::1", 1, 2)
    with pytest.raises(InvalidParameter):
        P.ipv4_udp(1234, "1.2.3.4", 1, 2)


def test_builder_limits():
    with pytest.raises(InvalidParameter, match="65536"):
        P.ipv4_udp("1.2.3.4", "1.2.3.5", 65536, 2)
    with pytest.raises(InvalidParameter, match="65535"):
        P.ipv4_udp("1.2.3.4", "1.2.3.5", 1, 2, bytes(65535 - 28 + 1))
    assert len(P.ipv4_udp("1.2.3.4", "1.2.3.5", 1, 2, bytes(65535 - 28))) == 65535
    with pytest.raises(InvalidParameter, match="256"):
        P.ipv4_icmp_echo("1.2.3.4", "1.2.3.5", ttl=256)
    with pytest.raises(InvalidParameter, match="options length 3"):
        P.ipv4_tcp("1.2.3.4", "1.2.3.5", 1, 2, options=b"abc")
    with pytest.raises(InvalidParameter, match="seq"):
        P.ipv4_tcp("1.2.3.4", "1.2.3.5", 1, 2, seq=2**32)


def test_udp_zero_checksum_sent_as_ffff():
    # Find a payload whose UDP checksum computes to zero; the builder must send 0xFFFF instead.
    base = P.ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"\0\0")
    csum = struct.unpack_from("!H", base, 26)[0]
    # Adding word w to the data lowers the checksum by w (one's complement); choose w = csum.
    pkt = P.ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, struct.pack("!H", csum))
    assert pkt[26:28] == b"\xff\xff"
    assert P.verify_checksums(pkt)


# --- hot-path helpers --------------------------------------------------------------------------


def test_fast_helpers():
    v4 = P.ipv4_udp("1.2.3.4", "5.6.7.8", 1, 2)
    v6 = P.ipv6_udp("2001:db8::1", "2001:db8::2", 1, 2)
    assert P.ip_version(v4) == 4 and P.ip_version(memoryview(v6)) == 6
    assert P.ip_version(b"") == 0 and P.ip_version(b"\x50") == 0
    assert P.destination_address_bytes(memoryview(v6)) == ipaddress.ip_address("2001:db8::2").packed
    assert P.source_address_bytes(bytearray(v6)) == ipaddress.ip_address("2001:db8::1").packed
    assert isinstance(P.destination_address_bytes(memoryview(v4)), bytes)
    for bad in (b"", v4[:19], v6[:39], b"\x55" * 60):
        assert P.destination_address_bytes(bad) is None
        assert P.source_address_bytes(bad) is None


# --- malformed input ---------------------------------------------------------------------------


def _set(pkt: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(pkt)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


V4 = P.ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, 5, 6, P.TCP_ACK, b"payload")
V6 = P.ipv6_udp("fd00::1", "fd00::2", 1, 2, b"payload")


@pytest.mark.parametrize("pkt, message", [
    (b"", "empty"),
    (b"\x45" + bytes(10), "shorter than the 20-byte header"),
    (b"\x60" + bytes(30), "shorter than the 40-byte header"),
    (b"\x75" + bytes(40), "version 7"),
    (_set(V4, 0, "!B", 0x44), "header length 16 is below 20"),
    (_set(V4, 0, "!B", 0x4F), "header length 60 exceeds"),
    (_set(V4, 2, "!H", len(V4) + 1), f"total length {len(V4) + 1} does not match"),
    (_set(V4, 2, "!H", len(V4) - 1), f"total length {len(V4) - 1} does not match"),
    (V4 + b"\0", "does not match the packet's"),
    (_set(V4, 32, "!B", 0x40), "TCP data offset 16"),
    (_set(V4, 32, "!B", 0xF0), "TCP data offset 60"),
    (_set(V6, 4, "!H", 100), "payload length 100"),
    (_set(V6, 44, "!H", 9), "UDP length 9"),
    (P.ipv4_header("1.1.1.1", "2.2.2.2", P.PROTO_TCP, 10) + bytes(10), "shorter than the 20-byte"),
    (P.ipv4_header("1.1.1.1", "2.2.2.2", P.PROTO_UDP, 4) + bytes(4), "shorter than the 8-byte"),
    (P.ipv6_header("::1", "::2", P.PROTO_ICMPV6, 4) + bytes(4), "shorter than the 8-byte"),
    (P.ipv6_header("::1", "::2", 0, 4) + bytes(4), "truncated"),
    (P.ipv6_header("::1", "::2", 60, 8) + bytes([17, 5]) + bytes(6), "overruns"),
])
def test_parse_rejects_malformed(pkt, message):
    with pytest.raises(InvalidData, match=message):
        P.parse(pkt)
    with pytest.raises(InvalidData):
        P.verify_checksums(pkt)


def test_parse_ipv6_extension_headers():
    udp = P.ipv6_udp("fd00::1", "fd00::2", 7, 9, b"data")
    hop_by_hop = bytes([17, 0]) + bytes(6)  # next header UDP, 8 bytes
    pkt = bytearray(P.ipv6_header("fd00::1", "fd00::2", 0, len(hop_by_hop) + len(udp) - 40))
    pkt += hop_by_hop + udp[40:]
    info = P.parse(bytes(pkt))
    assert (info.protocol, info.header_length, info.payload_offset) == (P.PROTO_UDP, 48, 56)
    assert (info.src_port, info.dst_port) == (7, 9)
    assert P.verify_checksums(bytes(pkt))  # pseudo header uses the same addresses and UDP length


def test_ipv4_fragments():
    pkt = _set(P.ipv4_udp("1.1.1.1", "2.2.2.2", 1, 2, b"abcdefgh"), 6, "!H", 0x2000)  # MF set
    pkt = bytearray(pkt)
    pkt[10:12] = b"\0\0"
    pkt[10:12] = struct.pack("!H", P.checksum(pkt[:20]))
    info = P.parse(bytes(pkt))
    assert info.fragment and info.first_fragment and info.src_port == 1
    later = bytearray(pkt)
    later[6:8] = struct.pack("!H", 3)  # offset 24 bytes: no transport header here
    later[10:12] = b"\0\0"
    later[10:12] = struct.pack("!H", P.checksum(later[:20]))
    info = P.parse(bytes(later))
    assert info.fragment and not info.first_fragment and info.src_port is None
    assert info.payload_offset == 20
    assert P.verify_checksums(bytes(later))


# --- verify / fix ------------------------------------------------------------------------------


@pytest.mark.parametrize("pkt", [
    WINTUN_ECHO,
    P.ipv6_icmp_echo("fd00::1", "fd00::2", 1, 1, b"x" * 33),
    P.ipv4_udp("10.0.0.1", "10.0.0.2", 53, 5353, b"odd"),
    P.ipv6_udp("fd00::1", "fd00::2", 53, 5353, b"even"),
    V4,
    P.ipv6_tcp("fd00::1", "fd00::2", 1, 2, 3, 4, P.TCP_SYN, options=b"\x02\x04\x05\xb4"),
])
def test_verify_detects_any_flipped_bit(pkt):
    assert P.verify_checksums(pkt)
    info = P.parse(pkt)
    # Flip one bit in the payload / transport header / (IPv4) header checksum field.
    for off in {len(pkt) - 1, info.header_length, info.header_length + 3, 10 if info.version == 4 else 8}:
        bad = bytearray(pkt)
        bad[off] ^= 0x01
        assert not P.verify_checksums(bytes(bad)), off
        P.fix_checksums(bad)
        assert P.verify_checksums(bytes(bad))


def test_ipv4_udp_zero_checksum_means_none():
    pkt = bytearray(P.ipv4_udp("1.1.1.1", "2.2.2.2", 1, 2, b"x"))
    pkt[26:28] = b"\0\0"
    assert P.verify_checksums(bytes(pkt))
    v6 = bytearray(P.ipv6_udp("::1", "::2", 1, 2, b"x"))
    v6[46:48] = b"\0\0"
    assert not P.verify_checksums(bytes(v6))


def test_fix_checksums_on_memoryview():
    pkt = bytearray(V4)
    pkt[10:12] = b"\0\0"
    pkt[36:38] = b"\0\0"
    P.fix_checksums(memoryview(pkt))
    assert bytes(pkt) == V4
