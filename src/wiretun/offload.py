"""The transforms a TUN queue with offloads needs: the virtio-net header, GSO split and GRO coalesce.

With ``IFF_VNET_HDR`` every read and write on a TUN queue carries a 10-byte ``struct virtio_net_hdr``
in front of the IP packet. After ``TUNSETOFFLOAD(CSUM|TSO4|TSO6|USO4|USO6)`` the kernel may hand
us *super-packets* (one IP/TCP or IP/UDP header, up to 64 KiB of payload, ``gso_size`` bytes per
wire segment) whose transport checksum holds only the pseudo-header sum. :func:`split` turns one into
the wire-sized packets the kernel would have sent, with every length, ID, sequence number, flag and
checksum finished. :func:`coalesce` goes the other way for a batch about to be written: it merges
runs of same-flow TCP (and UDP) packets into super-packets with the header the kernel expects,
which saves the kernel (and Python) one trip through the stack per merged packet.

The header is in the host's byte order: TUN uses native ("legacy virtio") order unless
``TUNSETVNETLE``/``TUNSETVNETBE`` says otherwise, and wiretun never sets those.
"""

from __future__ import annotations

import struct
from typing import MutableSequence, NamedTuple, Sequence, TypeAlias

from .errors import InvalidData, InvalidParameter, NotSupported
from .packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_CWR, TCP_FIN, TCP_PSH, ones_sum

Buffer = bytes | bytearray | memoryview
WritableBuffer = bytearray | memoryview

VIRTIO_NET_HDR_LEN = 10

# virtio_net_hdr.flags
F_NEEDS_CSUM = 0x01  # checksum from csum_start to the end, stored at csum_start + csum_offset
F_DATA_VALID = 0x02  # the kernel already checked the checksum (reads only)

# virtio_net_hdr.gso_type
GSO_NONE = 0x00
GSO_TCPV4 = 0x01
GSO_UDP = 0x03  # legacy UFO (IPv4 fragmentation of one datagram); never negotiated by wiretun
GSO_TCPV6 = 0x04
GSO_UDP_L4 = 0x05  # USO: one datagram of gso_size per segment
GSO_ECN = 0x80  # flag: the TCP super-packet carries CWR

MAX_SUPER_PACKET = 0xFFFF  # the IP length fields cap a super-packet at 64 KiB - 1
DEFAULT_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels; also a sane bound for TCP

_HDR = struct.Struct("=BBHHHH")  # native order: see module docstring
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TCP_CSUM_OFFSET = 16
_UDP_CSUM_OFFSET = 6

ZERO_HEADER = bytes(VIRTIO_NET_HDR_LEN)
"""The header to write in front of a packet that needs nothing from the kernel."""


class VirtioNetHeader(NamedTuple):
    """``struct virtio_net_hdr`` (include/uapi/linux/virtio_net.h)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack_from(cls, buffer: Buffer, offset: int = 0) -> VirtioNetHeader:
        """The header at ``offset``: InvalidParameter for a negative offset (it would read from the end),
        InvalidData when fewer than 10 bytes follow it."""
        _check_offset(offset, "offset")
        if len(buffer) - offset < VIRTIO_NET_HDR_LEN:
            raise InvalidData(
                f"virtio-net header needs {VIRTIO_NET_HDR_LEN} bytes, {len(buffer) - offset} given"
            )
        return cls._make(_HDR.unpack_from(buffer, offset))

    def pack_into(self, buffer: WritableBuffer, offset: int = 0) -> None:
        """Write the header at ``offset``; InvalidParameter when a field or the offset is out of range."""
        _check_offset(offset, "offset")
        if len(buffer) - offset < VIRTIO_NET_HDR_LEN:
            raise InvalidParameter(f"virtio-net header needs {VIRTIO_NET_HDR_LEN} bytes at offset {offset}, "
                                   f"the buffer has {max(0, len(buffer) - offset)}")
        _HDR.pack_into(buffer, offset, *self._checked())

    def pack(self) -> bytes:
        """The 10 bytes; InvalidParameter when a field is out of range (flags and gso_type are 8-bit)."""
        return _HDR.pack(*self._checked())

    def _checked(self) -> VirtioNetHeader:
        for name, value, limit in zip(self._fields, self, _FIELD_LIMITS):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise InvalidParameter(f"virtio-net header field {name} must be an int in 0..{limit:#x}, "
                                       f"not {value!r}")
        return self


HeaderLike: TypeAlias = VirtioNetHeader | bytes | bytearray | memoryview
"""A virtio-net header as sessions take it: a :class:`VirtioNetHeader`, or its 10 packed bytes."""

_FIELD_LIMITS = (0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF)


def _check_offset(value: object, what: str) -> None:
    # A negative offset would index from the end: refuse it rather than read or write elsewhere.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameter(f"{what} must be an int >= 0, not {value!r}")


# --------------------------------------------------------------------------------------------
# Checksum completion


def finish_checksum(packet: WritableBuffer, csum_start: int, csum_offset: int) -> None:
    """Complete a ``NEEDS_CSUM`` checksum in place, as the kernel's skb_checksum_help does.

    The field at ``csum_start + csum_offset`` holds a partial sum (the pseudo header); the result
    is the one's complement of the sum of everything from ``csum_start`` to the end. A zero result
    is stored as 0xFFFF (equal in one's complement, and UDP reserves 0 for "no checksum").
    InvalidParameter for a negative ``csum_start`` or ``csum_offset``, InvalidData when the field
    lies beyond the packet; the packet is unchanged then.
    """
    _check_offset(csum_start, "csum_start")
    _check_offset(csum_offset, "csum_offset")
    n = len(packet)
    at = csum_start + csum_offset
    if at + 2 > n:
        raise InvalidData(f"checksum field at csum_start {csum_start} + csum_offset {csum_offset} "
                          f"lies beyond the packet's {n} bytes")
    mv = memoryview(packet)
    initial = (mv[at] << 8) | mv[at + 1]
    mv[at] = mv[at + 1] = 0
    value = ~ones_sum(mv[csum_start:], initial) & 0xFFFF
    _U16.pack_into(mv, at, value or 0xFFFF)


# --------------------------------------------------------------------------------------------
# GSO split


class _Layout(NamedTuple):
    ip_len: int  # IP header(s), = csum_start
    hdr_len: int  # IP + TCP/UDP header
    is_v4: bool
    is_tcp: bool
    count: int  # type: ignore[assignment]  # number of segments (shadows tuple.count, as a field may)


def _layout(header: VirtioNetHeader, pkt: memoryview) -> _Layout:
    """Check a GSO super-packet against its header; say where things are and how many segments."""
    n = len(pkt)
    gso = header.gso_type & ~GSO_ECN
    if gso == GSO_UDP:
        raise NotSupported("legacy UFO super-packets (gso_type 3) are not supported; "
                           "wiretun never enables TUN_F_UFO")
    if gso not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):
        raise InvalidData(f"unknown gso_type {header.gso_type:#x}")
    if not header.flags & F_NEEDS_CSUM:
        raise InvalidData(f"GSO super-packet (gso_type {header.gso_type:#x}) without NEEDS_CSUM")
    if header.gso_size == 0:
        raise InvalidData("GSO super-packet with gso_size 0")
    if n == 0:
        raise InvalidData("empty GSO super-packet")
    version = pkt[0] >> 4
    cs = header.csum_start
    if version == 4:
        if gso == GSO_TCPV6:
            raise InvalidData("gso_type TCPV6 on an IPv4 packet")
        if n < 20:
            raise InvalidData(f"IPv4 super-packet of {n} bytes is shorter than its header")
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or cs != ihl:
            raise InvalidData(f"csum_start {cs} does not match the IPv4 header length {ihl}")
        proto = pkt[9]
    elif version == 6:
        if gso == GSO_TCPV4:
            raise InvalidData("gso_type TCPV4 on an IPv6 packet")
        if n < 40:
            raise InvalidData(f"IPv6 super-packet of {n} bytes is shorter than its header")
        if cs < 40:
            raise InvalidData(f"csum_start {cs} is inside the 40-byte IPv6 header")
        proto = pkt[6] if cs == 40 else -1  # after extension headers we trust csum_start
    else:
        raise InvalidData(f"IP version {version} in a GSO super-packet")
    is_tcp = gso != GSO_UDP_L4
    want = PROTO_TCP if is_tcp else PROTO_UDP
    if proto not in (want, -1):
        raise InvalidData(f"gso_type {header.gso_type:#x} on a packet of protocol {proto}")
    if is_tcp:
        if header.csum_offset != _TCP_CSUM_OFFSET:
            raise InvalidData(f"csum_offset {header.csum_offset} is not the TCP checksum's 16")
        if cs + 20 > n:
            raise InvalidData(f"TCP header at csum_start {cs} overruns the packet's {n} bytes")
        l4 = (pkt[cs + 12] >> 4) * 4
        if l4 < 20:
            raise InvalidData(f"TCP data offset {l4} is below 20")
    else:
        if header.csum_offset != _UDP_CSUM_OFFSET:
            raise InvalidData(f"csum_offset {header.csum_offset} is not the UDP checksum's 6")
        l4 = 8
    # Our own hdr_len: the kernel's may be the whole linear part, not just the headers.
    hlen = cs + l4
    if hlen > n:
        raise InvalidData(f"headers of {hlen} bytes overrun the packet's {n} bytes")
    data = n - hlen
    count = max(1, -(-data // header.gso_size))
    return _Layout(cs, hlen, version == 4, is_tcp, count)


def segment_count(header: VirtioNetHeader, packet: Buffer) -> int:
    """How many packets :func:`split` will produce for this header and packet."""
    if header.gso_type & ~GSO_ECN == GSO_NONE:
        return 1
    return _layout(header, memoryview(packet)).count


def split(
    header: VirtioNetHeader,
    packet: Buffer,
    out: Sequence[WritableBuffer],
    sizes: MutableSequence[int],
    offset: int = 0,
) -> int:
    """Cut ``packet`` (as read after ``header``) into wire-sized packets; return how many.

    Packet ``i`` is written to ``out[i][offset : offset + sizes[i]]``. ``offset`` leaves room in front
    (for a WireGuard header, say). Non-GSO packets are copied, their checksum finished if
    ``NEEDS_CSUM``. Raises :class:`InvalidParameter` when ``out``/``sizes`` are too few or a buffer
    too small (nothing is truncated), :class:`InvalidData` when header and packet disagree.
    """
    _check_offset(offset, "offset")
    pkt = memoryview(packet)
    n = len(pkt)
    if header.gso_type & ~GSO_ECN == GSO_NONE:
        if not out or not sizes:
            raise InvalidParameter("split needs at least 1 output buffer, 0 given")
        dst = memoryview(out[0])
        if len(dst) - offset < n:
            raise InvalidParameter(f"output buffer 0 holds {len(dst) - offset} bytes after offset "
                                   f"{offset}, packet needs {n}")
        seg = dst[offset : offset + n]
        seg[:] = pkt
        if header.flags & F_NEEDS_CSUM:
            finish_checksum(seg, header.csum_start, header.csum_offset)
        sizes[0] = n
        return 1

    lay = _layout(header, pkt)
    count = lay.count
    if count > len(out) or count > len(sizes):
        raise InvalidParameter(f"super-packet of {n} bytes with gso_size {header.gso_size} needs "
                               f"{count} output buffers, {min(len(out), len(sizes))} given")
    cs, hlen, gso_size = lay.ip_len, lay.hdr_len, header.gso_size
    is_v4, is_tcp = lay.is_v4, lay.is_tcp
    # One template of the headers; the kernel's partial checksum and the IPv4 one are zeroed.
    tmpl = bytearray(pkt[:hlen])
    csum_at = cs + (_TCP_CSUM_OFFSET if is_tcp else _UDP_CSUM_OFFSET)
    tmpl[csum_at] = tmpl[csum_at + 1] = 0
    if is_v4:
        tmpl[10] = tmpl[11] = 0
        addr_sum = int.from_bytes(pkt[12:20], "big")
        ip_id0 = _U16.unpack_from(pkt, 4)[0]
    else:
        addr_sum = int.from_bytes(pkt[8:40], "big")
        ip_id0 = 0
    addr_sum += PROTO_TCP if is_tcp else PROTO_UDP
    if is_tcp:
        seq0 = _U32.unpack_from(pkt, cs + 4)[0]
        flags0 = tmpl[cs + 13]
    last = count - 1
    start = hlen
    for i in range(count):
        end = min(start + gso_size, n)
        size = hlen + (end - start)
        dst = memoryview(out[i])
        if len(dst) - offset < size:
            raise InvalidParameter(f"output buffer {i} holds {len(dst) - offset} bytes after offset "
                                   f"{offset}, segment needs {size}")
        seg = dst[offset : offset + size]
        seg[:hlen] = tmpl
        seg[hlen:] = pkt[start:end]
        l4_len = size - cs
        if is_v4:
            _U16.pack_into(seg, 2, size)
            _U16.pack_into(seg, 4, (ip_id0 + i) & 0xFFFF)
            _U16.pack_into(seg, 10, ~ones_sum(seg[:cs]) & 0xFFFF)
        else:
            _U16.pack_into(seg, 4, size - 40)
        if is_tcp:
            _U32.pack_into(seg, cs + 4, (seq0 + i * gso_size) & 0xFFFFFFFF)
            flags = flags0
            if i != last:
                flags &= ~(TCP_FIN | TCP_PSH)  # only the last segment ends the push / stream
            if i != 0:
                flags &= ~TCP_CWR  # the congestion-window-reduced signal goes out once
            seg[cs + 13] = flags
        else:
            _U16.pack_into(seg, cs + 4, l4_len)
        pseudo = (addr_sum + l4_len) % 0xFFFF
        value = ~ones_sum(seg[cs:], pseudo) & 0xFFFF
        _U16.pack_into(seg, csum_at, value or 0xFFFF)
        sizes[i] = size
        start = end
    return count


def split_packets(header: VirtioNetHeader, packet: Buffer) -> list[bytes]:
    """:func:`split` returning a new list of packets (convenient, allocates)."""
    if header.gso_type & ~GSO_ECN == GSO_NONE:
        count, size = 1, len(packet)
    else:
        lay = _layout(header, memoryview(packet))
        count, size = lay.count, lay.hdr_len + header.gso_size
    out = [bytearray(size) for _ in range(count)]
    sizes = [0] * count
    split(header, packet, out, sizes)
    return [bytes(memoryview(b)[:s]) for b, s in zip(out, sizes)]


def split_frame(frame: Buffer) -> list[bytes]:
    """Split one TUN read (virtio-net header + packet) into wire-sized packets."""
    return split_packets(VirtioNetHeader.unpack_from(frame), memoryview(frame)[VIRTIO_NET_HDR_LEN:])


# --------------------------------------------------------------------------------------------
# GRO coalesce


class Frame(NamedTuple):
    """One write for a TUN queue with ``IFF_VNET_HDR``: ``os.writev(fd, (header, packet))``.

    ``packet`` is the caller's own object when nothing was merged (``header`` is all zero), or a
    new ``bytearray`` holding the super-packet. ``count`` is how many input packets it carries.
    """

    header: bytes
    packet: Buffer
    count: int  # type: ignore[assignment]  # shadows tuple.count, as a NamedTuple field may


class _Group:
    __slots__ = ("first", "items", "gso_size", "length", "next_seq", "closed", "psh", "ip_len",
                 "hdr_len", "is_tcp", "is_v4", "match")

    def __init__(self, first: int, pkt: memoryview, ip_len: int, hdr_len: int, is_tcp: bool,
                 is_v4: bool, match: bytes, seq: int, psh: bool) -> None:
        self.first = first
        self.items = [first]
        self.gso_size = len(pkt) - hdr_len
        self.length = len(pkt)
        self.next_seq = (seq + self.gso_size) & 0xFFFFFFFF
        self.psh = psh
        self.closed = psh  # nothing may follow a PSH segment
        self.ip_len = ip_len
        self.hdr_len = hdr_len
        self.is_tcp = is_tcp
        self.is_v4 = is_v4
        self.match = match


def _checksums_ok(pkt: memoryview, ip_len: int, is_v4: bool, proto: int) -> bool:
    # The kernel trusts NEEDS_CSUM packets, so a bad packet merged here would be delivered:
    # check what the kernel would have checked (IPv4 header, transport checksum).
    n = len(pkt)
    if is_v4:
        if ones_sum(pkt[:20]) != 0xFFFF:
            return False
        addr = int.from_bytes(pkt[12:20], "big")
    else:
        addr = int.from_bytes(pkt[8:40], "big")
    return ones_sum(pkt[ip_len:], (addr + proto + n - ip_len) % 0xFFFF) == 0xFFFF


def coalesce(
    packets: Sequence[Buffer],
    *,
    udp: bool = False,
    max_size: int = MAX_SUPER_PACKET,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
    out: list[Frame] | None = None,
) -> list[Frame]:
    """Merge runs of same-flow TCP (and, with ``udp``, UDP) packets into GSO super-packets.

    Packets of one flow merge when they follow each other in sequence (TCP), carry payload, have
    equal IP (TOS/traffic class, TTL/hop limit, DF, flow label) and TCP (ACK number, window,
    options) fields, TCP flags ACK or ACK|PSH (PSH only last), all but the last exactly the first's
    payload size, a valid checksum, and together stay within ``max_size`` bytes and
    ``max_segments`` packets. IPv4 with options or fragmentation and IPv6 with extension headers
    never merge. Every other packet is returned untouched; packets of one flow keep their order
    (a packet that cannot join its flow's run ends that run), and each super-packet takes the place
    of its first packet. Frames are appended to ``out`` if given, and returned.

    TCP super-packets (GSO_TCPV4/TCPV6) are accepted on any TUN queue with IFF_VNET_HDR. Pass
    ``udp=True`` only when the kernel takes GSO_UDP_L4 writes (Linux 6.2+: TUNSETOFFLOAD with
    TUN_F_USO4|TUN_F_USO6 succeeded); older kernels reject the whole write with EINVAL.
    """
    if not 0 < max_size <= MAX_SUPER_PACKET:
        raise InvalidParameter(f"max_size {max_size} is outside 1..{MAX_SUPER_PACKET}")
    if max_segments < 1:
        raise InvalidParameter(f"max_segments {max_segments} is below 1")
    frames: list[Frame] = [] if out is None else out
    open_groups: dict[bytes, _Group] = {}
    # slot[i] is a _Group when packet i heads one, None when it joined a group, else untouched.
    slot: list[_Group | None | bool] = [True] * len(packets)
    tcp_ok = (TCP_ACK, TCP_ACK | TCP_PSH)

    for i, raw in enumerate(packets):
        pkt = memoryview(raw)
        n = len(pkt)
        if n < 28:
            continue
        version = pkt[0] >> 4
        # --- find a flow key and decide whether this packet could merge at all
        if version == 4:
            proto = pkt[9]
            if proto != PROTO_TCP and (proto != PROTO_UDP or not udp):
                continue
            ip_len, is_v4 = (pkt[0] & 0x0F) * 4, True
            if ip_len < 20 or ip_len + 8 > n or _U16.unpack_from(pkt, 2)[0] != n:
                continue  # malformed: the kernel drops it
            key = bytes(pkt[9:10]) + bytes(pkt[12:20]) + bytes(pkt[ip_len : ip_len + 4])
            # IPv4 options, MF or a fragment offset: never merged (but it still ends its flow's run)
            mergeable = ip_len == 20 and not (pkt[6] & 0x3F or pkt[7])
            ip_match = bytes((pkt[1], pkt[6] & 0xE0, pkt[8]))  # TOS, DF/reserved, TTL
        elif version == 6:
            proto = pkt[6]
            if proto != PROTO_TCP and (proto != PROTO_UDP or not udp):
                continue  # extension headers never merge (their flow is not looked into)
            if n < 48 or _U16.unpack_from(pkt, 4)[0] != n - 40:
                continue
            ip_len, is_v4 = 40, False
            key = bytes(pkt[6:7]) + bytes(pkt[8:44])
            mergeable = True
            ip_match = bytes(pkt[0:4]) + bytes(pkt[7:8])  # version, class, flow label; hop limit
        else:
            continue
        group = open_groups.get(key)
        mergeable = mergeable and n <= max_size
        seq = 0
        psh = False
        if proto == PROTO_TCP:
            hdr_len = ip_len + (pkt[ip_len + 12] >> 4) * 4 if n >= ip_len + 20 else n
            # A malformed header, no payload, or flags other than ACK / ACK|PSH: not mergeable.
            mergeable = mergeable and ip_len + 20 <= hdr_len < n and pkt[ip_len + 13] in tcp_ok
            if mergeable:
                psh = pkt[ip_len + 13] == TCP_ACK | TCP_PSH
                seq = _U32.unpack_from(pkt, ip_len + 4)[0]
                # ACK number, data offset, window, urgent pointer and options must all match.
                match = (ip_match + bytes(pkt[ip_len + 8 : ip_len + 13])
                         + bytes(pkt[ip_len + 14 : ip_len + 16]) + bytes(pkt[ip_len + 18 : hdr_len]))
        else:
            hdr_len = ip_len + 8
            mergeable = (mergeable and hdr_len < n and _U16.unpack_from(pkt, ip_len + 4)[0] == n - ip_len
                         and (pkt[ip_len + 6] or pkt[ip_len + 7]) != 0)  # checksum 0 = none: leave alone
            if mergeable:
                match = ip_match
        if mergeable:
            mergeable = _checksums_ok(pkt, ip_len, is_v4, proto)
        if not mergeable:
            if group is not None:
                del open_groups[key]  # keep this flow's order: later packets start afresh
            continue
        payload = n - hdr_len
        if (
            group is not None
            and not group.closed
            and group.match == match
            and payload <= group.gso_size
            and group.length + payload <= max_size
            and len(group.items) < max_segments
            and (not group.is_tcp or seq == group.next_seq)
        ):
            group.items.append(i)
            group.length += payload
            group.next_seq = (seq + payload) & 0xFFFFFFFF
            group.psh = psh
            group.closed = psh or payload < group.gso_size
            slot[i] = None
            continue
        group = _Group(i, pkt, ip_len, hdr_len, proto == PROTO_TCP, is_v4, match, seq, psh)
        open_groups[key] = group
        slot[i] = group

    for i, raw in enumerate(packets):
        s = slot[i]
        if s is None:
            continue
        if s is True or len(s.items) == 1:  # type: ignore[union-attr]
            frames.append(Frame(ZERO_HEADER, raw, 1))
            continue
        frames.append(_build(s, packets))  # type: ignore[arg-type]
    return frames


def _build(group: _Group, packets: Sequence[Buffer]) -> Frame:
    """One super-packet from a group, with the virtio-net header the kernel expects on write."""
    hlen, cs = group.hdr_len, group.ip_len
    head = memoryview(packets[group.first])
    parts = [head]
    parts.extend(memoryview(packets[j])[hlen:] for j in group.items[1:])
    sp = bytearray(b"".join(parts))
    total = len(sp)
    if group.is_v4:
        _U16.pack_into(sp, 2, total)
        sp[10] = sp[11] = 0
        _U16.pack_into(sp, 10, ~ones_sum(memoryview(sp)[:20]) & 0xFFFF)
        addr = int.from_bytes(sp[12:20], "big")
    else:
        _U16.pack_into(sp, 4, total - 40)
        addr = int.from_bytes(sp[8:40], "big")
    l4_len = total - cs
    if group.is_tcp:
        if group.psh:
            sp[cs + 13] |= TCP_PSH
        csum_off = _TCP_CSUM_OFFSET
        gso_type = GSO_TCPV4 if group.is_v4 else GSO_TCPV6
        proto = PROTO_TCP
    else:
        _U16.pack_into(sp, cs + 4, l4_len)  # the super-datagram's length, as the kernel's GRO sets it
        csum_off = _UDP_CSUM_OFFSET
        gso_type = GSO_UDP_L4
        proto = PROTO_UDP
    # CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum, not inverted.
    pseudo = (addr + proto + l4_len) % 0xFFFF or 0xFFFF
    _U16.pack_into(sp, cs + csum_off, pseudo)
    hdr = _HDR.pack(F_NEEDS_CSUM, gso_type, hlen, group.gso_size, cs, csum_off)
    return Frame(hdr, sp, len(group.items))


def frame_bytes(frame: Frame) -> bytes:
    """Header and packet of ``frame`` as one bytes object (for ``os.write``; allocates)."""
    return frame.header + bytes(frame.packet)

