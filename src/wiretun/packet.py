"""IPv4/IPv6 with ICMP, ICMPv6, UDP and TCP: checksums, builders, a parser and a checksum verifier.

Used by the example (Wintun's ICMP echo), the tests and the offloads (GSO split, GRO coalesce).
Addresses in builders may be ``str``, ``bytes`` (4 or 16) or ``ipaddress`` objects. The hot-path
helpers (:func:`ip_version`, :func:`destination_address_bytes`, :func:`source_address_bytes`) make
no ``ipaddress`` objects and raise nothing: they return 0 / ``None`` for packets too short to tell.

Checksum arithmetic: the 16-bit one's-complement sum of a byte string is congruent, modulo 0xFFFF,
to the string read as one big-endian integer (because 2**16 == 1 mod 0xFFFF). ``int.from_bytes``
plus one ``%`` runs in C and is far faster than summing words in Python.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .errors import InvalidData, InvalidParameter

Buffer = bytes | bytearray | memoryview
Address = str | bytes | bytearray | ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
TCP_HEADER_LEN = 20
ICMP_HEADER_LEN = 8

IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF

# IPv6 extension headers we walk through to reach the upper-layer protocol.
_V6_EXT_HOP_BY_HOP = 0
_V6_EXT_ROUTING = 43
_V6_EXT_FRAGMENT = 44
_V6_EXT_DEST_OPTS = 60
_V6_EXT_AH = 51
_V6_EXT_LIMIT = 8  # more extension headers than this is treated as malformed

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")
_U16 = struct.Struct("!H")


# --------------------------------------------------------------------------------------------
# Checksums


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """The folded 16-bit one's-complement sum of ``data`` plus ``initial`` (0..0xFFFF).

    An odd trailing byte counts as the high byte of a last word (RFC 1071). Never returns 0 for
    input that is not all zero (one's-complement "negative zero" 0xFFFF is returned instead).
    """
    n = len(data)
    value = int.from_bytes(data, "big")
    if n & 1:
        value <<= 8
    value += initial
    if value == 0:
        return 0
    r = value % 0xFFFF
    return r if r else 0xFFFF


def checksum(data: Buffer, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, seeded with the partial sum ``initial``."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum_v4(src: Buffer, dst: Buffer, protocol: int, length: int) -> int:
    """Folded one's-complement sum of the IPv4 pseudo header (not inverted)."""
    value = (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length) % 0xFFFF
    return value if value else 0xFFFF


def pseudo_header_sum_v6(src: Buffer, dst: Buffer, next_header: int, length: int) -> int:
    """Folded one's-complement sum of the IPv6 pseudo header (RFC 8200 section 8.1), not inverted."""
    value = (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + next_header + length) % 0xFFFF
    return value if value else 0xFFFF


def pseudo_header_sum(packet: Buffer, protocol: int, l4_length: int) -> int:
    """Pseudo-header sum for the addresses of ``packet`` (IPv4 or IPv6, by its version nibble)."""
    if packet[0] >> 4 == 4:
        return pseudo_header_sum_v4(packet[12:16], packet[16:20], protocol, l4_length)
    return pseudo_header_sum_v6(packet[8:24], packet[24:40], protocol, l4_length)


def ipv4_header_checksum(header: Buffer) -> int:
    """Checksum of an IPv4 header whose checksum field (bytes 10-11) is zero."""
    return checksum(header)


# --------------------------------------------------------------------------------------------
# Addresses


def _addr_bytes(value: Address, size: int, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = ipaddress.ip_address(value).packed
        except ValueError as e:
            raise InvalidParameter(f"{what} {value!r} is not an IP address") from e
    elif isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raw = value.packed
    else:
        raise InvalidParameter(f"{what} {value!r} is not an IP address")
    if len(raw) != size:
        raise InvalidParameter(f"{what} {value!r} is not an IPv{4 if size == 4 else 6} address")
    return raw


def _check_u16(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise InvalidParameter(f"{what} {value} is out of range 0..65535")


def _check_u8(value: int, what: str) -> None:
    if not 0 <= value <= 0xFF:
        raise InvalidParameter(f"{what} {value} is out of range 0..255")


# --------------------------------------------------------------------------------------------
# Builders


def ipv4_header(
    src: Address,
    dst: Address,
    protocol: int,
    payload_length: int,
    *,
    ttl: int = 64,
    ident: int = 0,
    dont_fragment: bool = False,
    tos: int = 0,
) -> bytes:
    """A 20-byte IPv4 header (no options) with its checksum filled in."""
    total = IPV4_HEADER_LEN + payload_length
    if total > 0xFFFF:
        raise InvalidParameter(f"IPv4 total length {total} exceeds 65535")
    _check_u8(ttl, "ttl")
    _check_u8(tos, "tos")
    _check_u8(protocol, "protocol")
    _check_u16(ident, "ident")
    flags = IPV4_DF if dont_fragment else 0
    hdr = bytearray(
        _IPV4.pack(0x45, tos, total, ident, flags, ttl, protocol, 0,
                   _addr_bytes(src, 4, "source"), _addr_bytes(dst, 4, "destination"))
    )
    _U16.pack_into(hdr, 10, checksum(hdr))
    return bytes(hdr)


def ipv6_header(
    src: Address,
    dst: Address,
    next_header: int,
    payload_length: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A 40-byte IPv6 header without extension headers."""
    if payload_length > 0xFFFF:
        raise InvalidParameter(f"IPv6 payload length {payload_length} exceeds 65535")
    _check_u8(hop_limit, "hop_limit")
    _check_u8(traffic_class, "traffic_class")
    _check_u8(next_header, "next_header")
    if not 0 <= flow_label <= 0xFFFFF:
        raise InvalidParameter(f"flow_label {flow_label} is out of range 0..0xFFFFF")
    first = (6 << 28) | (traffic_class << 20) | flow_label
    return _IPV6.pack(first, payload_length, next_header, hop_limit,
                      _addr_bytes(src, 16, "source"), _addr_bytes(dst, 16, "destination"))


def ipv4_icmp_echo(
    src: Address,
    dst: Address,
    ident: int = 0,
    seq: int = 0,
    payload: Buffer = b"",
    ttl: int = 255,
    request: bool = True,
    *,
    ip_id: int = 0,
) -> bytes:
    """An IPv4 ICMP echo request (or reply with ``request=False``), checksums filled in.

    With the defaults and src 10.6.7.8, dst 10.6.7.7 this is byte for byte the 28-byte packet
    Wintun's example.c sends (see :func:`wintun_example_echo_request`).
    """
    _check_u16(ident, "ident")
    _check_u16(seq, "seq")
    icmp = bytearray(_ICMP_ECHO.pack(ICMP_ECHO_REQUEST if request else ICMP_ECHO_REPLY, 0, 0, ident, seq))
    icmp += payload
    _U16.pack_into(icmp, 2, checksum(icmp))
    return ipv4_header(src, dst, PROTO_ICMP, len(icmp), ttl=ttl, ident=ip_id) + icmp


def wintun_example_echo_request() -> bytes:
    """The exact packet Wintun's example.c builds: ICMP echo request 10.6.7.8 -> 10.6.7.7, TTL 255."""
    return ipv4_icmp_echo("10.6.7.8", "10.6.7.7", 0, 0, b"", 255, True)


def ipv6_icmp_echo(
    src: Address,
    dst: Address,
    ident: int = 0,
    seq: int = 0,
    payload: Buffer = b"",
    hop_limit: int = 64,
    request: bool = True,
) -> bytes:
    """An IPv6 ICMPv6 echo request (or reply), checksum over the pseudo header filled in."""
    _check_u16(ident, "ident")
    _check_u16(seq, "seq")
    icmp = bytearray(
        _ICMP_ECHO.pack(ICMPV6_ECHO_REQUEST if request else ICMPV6_ECHO_REPLY, 0, 0, ident, seq)
    )
    icmp += payload
    ip = ipv6_header(src, dst, PROTO_ICMPV6, len(icmp), hop_limit=hop_limit)
    _U16.pack_into(icmp, 2, checksum(icmp, pseudo_header_sum_v6(ip[8:24], ip[24:40], PROTO_ICMPV6, len(icmp))))
    return ip + icmp


def _udp(src: bytes, dst: bytes, sport: int, dport: int, payload: Buffer, v6: bool) -> bytes:
    _check_u16(sport, "sport")
    _check_u16(dport, "dport")
    length = UDP_HEADER_LEN + len(payload)
    if length > 0xFFFF:
        raise InvalidParameter(f"UDP length {length} exceeds 65535")
    seg = bytearray(_UDP.pack(sport, dport, length, 0))
    seg += payload
    pseudo = (pseudo_header_sum_v6 if v6 else pseudo_header_sum_v4)(src, dst, PROTO_UDP, length)
    # A computed zero is sent as 0xFFFF: zero on the wire means "no checksum" (RFC 768).
    _U16.pack_into(seg, 6, checksum(seg, pseudo) or 0xFFFF)
    return bytes(seg)


def ipv4_udp(
    src: Address, dst: Address, sport: int, dport: int, payload: Buffer = b"", ttl: int = 64,
    *, ip_id: int = 0, dont_fragment: bool = False, tos: int = 0,
) -> bytes:
    """An IPv4 UDP datagram with both checksums filled in."""
    s, d = _addr_bytes(src, 4, "source"), _addr_bytes(dst, 4, "destination")
    seg = _udp(s, d, sport, dport, payload, False)
    return ipv4_header(s, d, PROTO_UDP, len(seg), ttl=ttl, ident=ip_id,
                       dont_fragment=dont_fragment, tos=tos) + seg


def ipv6_udp(
    src: Address, dst: Address, sport: int, dport: int, payload: Buffer = b"", hop_limit: int = 64,
    *, traffic_class: int = 0,
) -> bytes:
    """An IPv6 UDP datagram with its checksum filled in."""
    s, d = _addr_bytes(src, 16, "source"), _addr_bytes(dst, 16, "destination")
    seg = _udp(s, d, sport, dport, payload, True)
    return ipv6_header(s, d, PROTO_UDP, len(seg), hop_limit=hop_limit, traffic_class=traffic_class) + seg


def _tcp(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
    payload: Buffer, window: int, options: Buffer, urgent: int, v6: bool,
) -> bytes:
    _check_u16(sport, "sport")
    _check_u16(dport, "dport")
    _check_u16(window, "window")
    _check_u16(urgent, "urgent")
    _check_u8(flags, "flags")
    if not 0 <= seq <= 0xFFFFFFFF:
        raise InvalidParameter(f"seq {seq} is out of range 0..2**32-1")
    if not 0 <= ack <= 0xFFFFFFFF:
        raise InvalidParameter(f"ack {ack} is out of range 0..2**32-1")
    if len(options) % 4 or len(options) > 40:
        raise InvalidParameter(f"TCP options length {len(options)} is not a multiple of 4 up to 40")
    hlen = TCP_HEADER_LEN + len(options)
    seg = bytearray(_TCP.pack(sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, urgent))
    seg += options
    seg += payload
    pseudo = (pseudo_header_sum_v6 if v6 else pseudo_header_sum_v4)(src, dst, PROTO_TCP, len(seg))
    _U16.pack_into(seg, 16, checksum(seg, pseudo))
    return bytes(seg)


def ipv4_tcp(
    src: Address, dst: Address, sport: int, dport: int, seq: int = 0, ack: int = 0,
    flags: int = TCP_ACK, payload: Buffer = b"", *, window: int = 65535, options: Buffer = b"",
    urgent: int = 0, ttl: int = 64, ip_id: int = 0, dont_fragment: bool = True, tos: int = 0,
) -> bytes:
    """An IPv4 TCP segment with both checksums filled in. ``options`` must be padded to 4 bytes."""
    s, d = _addr_bytes(src, 4, "source"), _addr_bytes(dst, 4, "destination")
    seg = _tcp(s, d, sport, dport, seq, ack, flags, payload, window, options, urgent, False)
    return ipv4_header(s, d, PROTO_TCP, len(seg), ttl=ttl, ident=ip_id,
                       dont_fragment=dont_fragment, tos=tos) + seg


def ipv6_tcp(
    src: Address, dst: Address, sport: int, dport: int, seq: int = 0, ack: int = 0,
    flags: int = TCP_ACK, payload: Buffer = b"", *, window: int = 65535, options: Buffer = b"",
    urgent: int = 0, hop_limit: int = 64, traffic_class: int = 0,
) -> bytes:
    """An IPv6 TCP segment with its checksum filled in."""
    s, d = _addr_bytes(src, 16, "source"), _addr_bytes(dst, 16, "destination")
    seg = _tcp(s, d, sport, dport, seq, ack, flags, payload, window, options, urgent, True)
    return ipv6_header(s, d, PROTO_TCP, len(seg), hop_limit=hop_limit, traffic_class=traffic_class) + seg


# --------------------------------------------------------------------------------------------
# Hot-path helpers (no exceptions, no ipaddress objects)


def ip_version(packet: Buffer) -> int:
    """4 or 6 from the first nibble; 0 for an empty packet or any other version."""
    if not packet:
        return 0
    v = packet[0] >> 4
    return v if v == 4 or v == 6 else 0


def destination_address_bytes(packet: Buffer) -> bytes | None:
    """The destination address (4 or 16 bytes), or ``None`` if ``packet`` is not IPv4/IPv6 or too short."""
    if not packet:
        return None
    v = packet[0] >> 4
    if v == 4:
        return bytes(packet[16:20]) if len(packet) >= IPV4_HEADER_LEN else None
    if v == 6:
        return bytes(packet[24:40]) if len(packet) >= IPV6_HEADER_LEN else None
    return None


def source_address_bytes(packet: Buffer) -> bytes | None:
    """The source address (4 or 16 bytes), or ``None`` if ``packet`` is not IPv4/IPv6 or too short."""
    if not packet:
        return None
    v = packet[0] >> 4
    if v == 4:
        return bytes(packet[12:16]) if len(packet) >= IPV4_HEADER_LEN else None
    if v == 6:
        return bytes(packet[8:24]) if len(packet) >= IPV6_HEADER_LEN else None
    return None


# --------------------------------------------------------------------------------------------
# Parser


@dataclass(frozen=True, slots=True)
class PacketInfo:
    """What :func:`parse` found. Offsets are from the start of the packet.

    ``protocol`` is the upper-layer protocol (IPv6: after walking extension headers);
    ``header_length`` is the IP header length including IPv6 extension headers, so it is also
    the offset of the transport header; ``payload_offset`` is where the transport payload starts
    (after the TCP/UDP/ICMP header; equal to ``header_length`` for other protocols and for
    non-first fragments). ``ttl`` is the hop limit for IPv6. Ports are ``None`` unless TCP/UDP;
    ICMP fields are ``None`` unless ICMP/ICMPv6.
    """

    version: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: int
    header_length: int
    payload_offset: int
    total_length: int
    ttl: int
    fragment: bool = False
    first_fragment: bool = True
    src_port: int | None = None
    dst_port: int | None = None
    tcp_flags: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def payload_length(self) -> int:
        return self.total_length - self.payload_offset


def parse(packet: Buffer) -> PacketInfo:
    """Parse an IPv4 or IPv6 packet; raise :class:`InvalidData` naming what is wrong if malformed.

    The packet must be exactly one IP packet: the IP length field must equal ``len(packet)``.
    """
    n = len(packet)
    if n == 0:
        raise InvalidData("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_LEN:
            raise InvalidData(f"IPv4 packet of {n} bytes is shorter than the 20-byte header")
        vihl, _tos, total, _ident, frag, ttl, protocol, _csum, s, d = _IPV4.unpack_from(packet, 0)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_HEADER_LEN:
            raise InvalidData(f"IPv4 header length {ihl} is below 20")
        if ihl > n:
            raise InvalidData(f"IPv4 header length {ihl} exceeds the packet's {n} bytes")
        if total != n:
            raise InvalidData(f"IPv4 total length {total} does not match the packet's {n} bytes")
        if total < ihl:
            raise InvalidData(f"IPv4 total length {total} is below the header length {ihl}")
        offset = frag & IPV4_OFFSET_MASK
        fragment = bool(frag & IPV4_MF) or offset != 0
        first = offset == 0
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(s)
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(d)
        hlen = ihl
    elif version == 6:
        if n < IPV6_HEADER_LEN:
            raise InvalidData(f"IPv6 packet of {n} bytes is shorter than the 40-byte header")
        _first, plen, protocol, ttl, s, d = _IPV6.unpack_from(packet, 0)
        total = IPV6_HEADER_LEN + plen
        if total != n:
            raise InvalidData(
                f"IPv6 payload length {plen} (+40) does not match the packet's {n} bytes"
            )
        src, dst = ipaddress.IPv6Address(s), ipaddress.IPv6Address(d)
        hlen = IPV6_HEADER_LEN
        fragment, first = False, True
        for _ in range(_V6_EXT_LIMIT):
            if protocol in (_V6_EXT_HOP_BY_HOP, _V6_EXT_ROUTING, _V6_EXT_DEST_OPTS):
                if hlen + 8 > n:
                    raise InvalidData(f"IPv6 extension header {protocol} at {hlen} is truncated")
                ext_len = (packet[hlen + 1] + 1) * 8
            elif protocol == _V6_EXT_FRAGMENT:
                if hlen + 8 > n:
                    raise InvalidData(f"IPv6 fragment header at {hlen} is truncated")
                frag = _U16.unpack_from(packet, hlen + 2)[0]
                fragment = True
                first = first and (frag >> 3) == 0
                ext_len = 8
            elif protocol == _V6_EXT_AH:
                if hlen + 8 > n:
                    raise InvalidData(f"IPv6 authentication header at {hlen} is truncated")
                ext_len = (packet[hlen + 1] + 2) * 4
            else:
                break
            if hlen + ext_len > n:
                raise InvalidData(f"IPv6 extension header {protocol} of {ext_len} bytes at {hlen} "
                                  f"overruns the packet's {n} bytes")
            protocol = packet[hlen]
            hlen += ext_len
        else:
            raise InvalidData(f"more than {_V6_EXT_LIMIT} IPv6 extension headers")
    else:
        raise InvalidData(f"IP version {version} is neither 4 nor 6")

    l4 = n - hlen
    poff = hlen
    sport = dport = tflags = itype = icode = None
    if first:
        if protocol == PROTO_TCP:
            if l4 < TCP_HEADER_LEN:
                raise InvalidData(f"TCP segment of {l4} bytes is shorter than the 20-byte header")
            doff = (packet[hlen + 12] >> 4) * 4
            if doff < TCP_HEADER_LEN or doff > l4:
                raise InvalidData(f"TCP data offset {doff} is outside 20..{l4}")
            sport, dport = _U16.unpack_from(packet, hlen)[0], _U16.unpack_from(packet, hlen + 2)[0]
            tflags = packet[hlen + 13]
            poff = hlen + doff
        elif protocol == PROTO_UDP:
            if l4 < UDP_HEADER_LEN:
                raise InvalidData(f"UDP datagram of {l4} bytes is shorter than the 8-byte header")
            sport, dport, ulen, _ = _UDP.unpack_from(packet, hlen)
            if not fragment and ulen != l4:
                raise InvalidData(f"UDP length {ulen} does not match the {l4} bytes after the IP header")
            poff = hlen + UDP_HEADER_LEN
        elif protocol == PROTO_ICMP or protocol == PROTO_ICMPV6:
            if l4 < ICMP_HEADER_LEN:
                raise InvalidData(f"ICMP message of {l4} bytes is shorter than the 8-byte header")
            itype, icode = packet[hlen], packet[hlen + 1]
            poff = hlen + ICMP_HEADER_LEN
    return PacketInfo(version, src, dst, protocol, hlen, poff, total, ttl, fragment, first,
                      sport, dport, tflags, itype, icode)


# --------------------------------------------------------------------------------------------
# Checksum verification and repair


def _l4_checksum_offset(protocol: int) -> int | None:
    if protocol == PROTO_TCP:
        return 16
    if protocol == PROTO_UDP:
        return 6
    if protocol == PROTO_ICMP or protocol == PROTO_ICMPV6:
        return 2
    return None


def verify_checksums(packet: Buffer) -> bool:
    """True if the IPv4 header checksum and the TCP/UDP/ICMP/ICMPv6 checksum are right.

    Fragments only have their IPv4 header checked (the transport checksum spans all fragments).
    IPv4 UDP with checksum 0 ("none") passes; IPv6 UDP with checksum 0 fails (RFC 8200).
    Raises :class:`InvalidData` if the packet is malformed (see :func:`parse`).
    """
    info = parse(packet)
    mv = memoryview(packet)
    if info.version == 4 and ones_sum(mv[: info.header_length]) != 0xFFFF:
        return False
    if info.fragment:
        return True
    protocol = info.protocol
    if _l4_checksum_offset(protocol) is None:
        return True
    seg = mv[info.header_length : info.total_length]
    if protocol == PROTO_UDP and seg[6] == 0 and seg[7] == 0:
        return info.version == 4
    # ICMP (IPv4) has no pseudo header; ICMPv6, TCP and UDP do.
    pseudo = 0 if protocol == PROTO_ICMP else pseudo_header_sum(mv, protocol, len(seg))
    return ones_sum(seg, pseudo) == 0xFFFF


def fix_checksums(packet: bytearray | memoryview) -> None:
    """Recompute, in place, the IPv4 header checksum and the TCP/UDP/ICMP/ICMPv6 checksum."""
    info = parse(packet)
    mv = memoryview(packet)
    if info.version == 4:
        mv[10] = mv[11] = 0
        _U16.pack_into(mv, 10, checksum(mv[: info.header_length]))
    off = _l4_checksum_offset(info.protocol)
    if info.fragment or off is None:
        return
    h = info.header_length
    seg = mv[h : info.total_length]
    seg[off] = seg[off + 1] = 0
    pseudo = 0 if info.protocol == PROTO_ICMP else pseudo_header_sum(mv, info.protocol, len(seg))
    value = checksum(seg, pseudo)
    if info.protocol == PROTO_UDP and value == 0:
        value = 0xFFFF
    _U16.pack_into(seg, off, value)
