"""WireGuard transport messages in batches: one call per TUN super-packet or UDP train, not per packet.

Two calls, pure computation (no I/O), each with a C implementation in ``wiretun.wireguard._wgcrypto``
(OpenSSL's ChaCha20-Poly1305, the GIL released for the whole batch) and a pure-Python twin here on
``cryptography`` with the same results, byte for byte. :data:`SPEEDUPS` says which one runs;
``WIRETUN_NO_SPEEDUPS=1`` or a build without the extension selects the twins.

* :func:`seal_super` takes one read of an offload session (virtio-net header + IP packet, possibly a
  TCP/UDP super-packet), cuts it into wire packets as :func:`wiretun.offload.split` does, pads each as
  WireGuard pads (to a multiple of 16, never past the MTU) and seals each as a transport message with
  consecutive counters, end to end in one ``bytes``: a UDP GSO train.
* :func:`open_train` opens the transport messages for one receiver index at the front of a UDP GRO
  train, checks each counter against the keypair's replay window, validates the IP packets as the core
  does and coalesces runs of one TCP (or UDP) flow into super-packets with their virtio-net header
  (the rules of :func:`wiretun.offload.coalesce`, for packets that follow each other).

Errors: :func:`seal_super` raises ``ValueError`` for a header and packet that disagree (the core counts
it as a bad packet); :func:`open_train` never raises for bad datagrams, it counts them.
"""

from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import WintunError
from ..offload import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
    VirtioNetHeader,
    split,
)
from ..offload import segment_count as _segment_count
from ..offload import split_packets as _split_packets
from ..packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_PSH, ones_sum
from .replay import RING_BITS, WINDOW_SIZE

__all__ = ["SPEEDUPS", "seal_super", "open_train", "OpenResult", "segment_count", "split_packets", "frame_packets"]

Buffer = bytes | bytearray | memoryview

HEADER_SIZE = 16  # type, reserved, receiver index, counter
TAG_SIZE = 16
MIN_MESSAGE = HEADER_SIZE + TAG_SIZE
MAX_SEGMENTS = 64
MAX_SUPER = 0xFFFF
_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_NATIVE_HDR = struct.Struct("=BBHHHH")
_ZERO_HDR = bytes(VIRTIO_NET_HDR_LEN)
_MASK = RING_BITS - 1


class OpenResult(NamedTuple):
    """What :func:`open_train` did. ``frames`` are ``(virtio-net header, start, end)`` in ``out``."""

    consumed: int  # datagrams taken from the front of the train (all for this receiver)
    last: int  # the replay window's newest counter, to store back
    nbytes: int  # datagram bytes of the authenticated, fresh messages
    ok: int  # IP packets delivered into frames
    keepalives: int
    bad_tag: int
    replay: int
    bad_ip: int
    frames: list[tuple[bytes, int, int]]


def _padded(n: int, mtu: int) -> int:
    if mtu == 0:
        return (n + 15) & ~15
    last = n % mtu if n > mtu else n
    padded = (last + 15) & ~15
    if padded > mtu:
        padded = mtu
    return n - last + padded


def segment_count(header: Buffer, packet: Buffer) -> int:
    """How many wire packets :func:`seal_super` makes of this read; ValueError where it would refuse it."""
    if len(header) != VIRTIO_NET_HDR_LEN:
        raise ValueError(f"virtio-net header must be {VIRTIO_NET_HDR_LEN} bytes, not {len(header)}")
    n = len(packet)
    if not 0 < n <= MAX_SUPER:
        raise ValueError(f"packet of {n} bytes is outside 1..65535")
    flags, gso_type, _, _, csum_start, csum_offset = _NATIVE_HDR.unpack_from(header)
    if gso_type & ~GSO_ECN == GSO_NONE:
        if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > n:
            raise ValueError("checksum field lies beyond the packet")
        return 1
    try:
        return _segment_count(VirtioNetHeader.unpack_from(header), packet)
    except WintunError as e:
        raise ValueError(str(e)) from None


def split_packets(header: Buffer, packet: Buffer) -> list[bytes]:
    """The wire packets of one offload read, as :func:`wiretun.offload.split_packets` (ValueError if
    malformed)."""
    if len(header) != VIRTIO_NET_HDR_LEN:
        raise ValueError(f"virtio-net header must be {VIRTIO_NET_HDR_LEN} bytes, not {len(header)}")
    if not 0 < len(packet) <= MAX_SUPER:
        raise ValueError(f"packet of {len(packet)} bytes is outside 1..65535")
    try:
        return _split_packets(VirtioNetHeader.unpack_from(header), packet)
    except WintunError as e:
        raise ValueError(str(e)) from None


def frame_packets(header: Buffer, size: int) -> int:
    """How many wire packets a frame of :func:`open_train` carries (``size``: its packet's bytes)."""
    _, gso_type, hdr_len, gso_size, _, _ = _NATIVE_HDR.unpack_from(header)
    if not gso_type or not gso_size:
        return 1
    return max(1, -(-(size - int(hdr_len)) // int(gso_size)))


def _py_seal_super(key: bytes, receiver: int, counter: int, header: Buffer, packet: Buffer,
                   mtu: int) -> tuple[bytes, int, int]:
    if len(key) != 32:
        raise ValueError("key must be 32 bytes")
    if not 0 <= mtu <= 65535:
        raise ValueError(f"mtu {mtu} is outside 0..65535")
    if len(header) != VIRTIO_NET_HDR_LEN:
        raise ValueError(f"virtio-net header must be {VIRTIO_NET_HDR_LEN} bytes, not {len(header)}")
    n = len(packet)
    if not 0 < n <= MAX_SUPER:
        raise ValueError(f"packet of {n} bytes is outside 1..65535")
    hdr = VirtioNetHeader.unpack_from(header)
    try:
        count = 1 if hdr.gso_type & ~GSO_ECN == GSO_NONE else segment_count(header, packet)
        size = n if count == 1 else min(n, hdr.csum_start + 60 + hdr.gso_size)  # room for any segment
        out = [bytearray(size) for _ in range(count)]
        sizes = [0] * count
        split(hdr, packet, out, sizes)
    except WintunError as e:
        raise ValueError(str(e)) from None
    aead = ChaCha20Poly1305(bytes(key))
    parts = []
    stride = 0
    for i in range(count):
        plain = bytes(memoryview(out[i])[: sizes[i]])
        padded = _padded(sizes[i], mtu)
        sealed = aead.encrypt(_NONCE.pack(counter + i), plain + bytes(padded - sizes[i]), None)
        parts.append(_HEADER.pack(4, receiver, counter + i) + sealed)
        if i == 0:
            stride = HEADER_SIZE + len(sealed)
    return b"".join(parts), count, stride


def _replay_ok(ring: bytearray, last: int, counter: int, limit: int) -> tuple[bool, int]:
    """ReplayFilter.validate on a bare ring and newest counter: (accepted, new newest)."""
    if counter >= limit:
        return False, last
    if counter > last:
        gap = counter - last
        if gap > 1:
            if gap >= RING_BITS:
                ring[:] = bytes(RING_BITS)
            else:
                start = (last + 1) & _MASK
                end = counter & _MASK
                if start <= end:
                    ring[start:end] = bytes(end - start)
                else:
                    ring[start:] = bytes(RING_BITS - start)
                    ring[:end] = bytes(end)
        ring[counter & _MASK] = 1
        return True, counter
    if last - counter > WINDOW_SIZE:
        return False, last
    slot = counter & _MASK
    if ring[slot]:
        return False, last
    ring[slot] = 1
    return True, last


class _Group:
    __slots__ = ("start", "length", "ip_len", "hdr_len", "gso_size", "count", "next_seq", "is_v4", "is_tcp",
                 "psh", "closed")

    def __init__(self, start: int, length: int, ip_len: int, hdr_len: int, is_v4: bool, is_tcp: bool, seq: int,
                 psh: bool) -> None:
        self.start = start
        self.length = length
        self.ip_len = ip_len
        self.hdr_len = hdr_len
        self.gso_size = length - hdr_len
        self.count = 1
        self.next_seq = (seq + self.gso_size) & 0xFFFFFFFF
        self.is_v4 = is_v4
        self.is_tcp = is_tcp
        self.psh = psh
        self.closed = psh


def _mergeable(p: memoryview, udp: bool) -> tuple[int, int, bool, bool, int, bool] | None:
    """(ip_len, hdr_len, is_v4, is_tcp, seq, psh) if the packet may head or join a super-packet."""
    n = len(p)
    if n < 28:
        return None
    if p[0] >> 4 == 4:
        proto = p[9]
        ip_len = (p[0] & 0x0F) * 4
        if ip_len != 20 or p[6] & 0x3F or p[7] or _U16.unpack_from(p, 2)[0] != n:
            return None
        if ones_sum(p[:20]) != 0xFFFF:
            return None
        is_v4 = True
        addr = int.from_bytes(p[12:20], "big")
    else:
        proto = p[6]
        ip_len = 40
        if n < 48 or _U16.unpack_from(p, 4)[0] != n - 40:
            return None
        is_v4 = False
        addr = int.from_bytes(p[8:40], "big")
    if proto == PROTO_TCP:
        if n < ip_len + 20:
            return None
        hdr_len = ip_len + (p[ip_len + 12] >> 4) * 4
        if hdr_len < ip_len + 20 or hdr_len >= n:
            return None
        flags = p[ip_len + 13]
        if flags != TCP_ACK and flags != TCP_ACK | TCP_PSH:
            return None
        psh = flags == TCP_ACK | TCP_PSH
        seq = _U32.unpack_from(p, ip_len + 4)[0]
        is_tcp = True
    elif proto == PROTO_UDP and udp:
        hdr_len = ip_len + 8
        if hdr_len >= n or _U16.unpack_from(p, ip_len + 4)[0] != n - ip_len or not (p[ip_len + 6] | p[ip_len + 7]):
            return None
        psh, seq, is_tcp = False, 0, False
    else:
        return None
    if ones_sum(p[ip_len:], (addr + proto + n - ip_len) % 0xFFFF) != 0xFFFF:
        return None
    return ip_len, hdr_len, is_v4, is_tcp, seq, psh


def _same_flow(h: memoryview, p: memoryview, g: _Group, hdr_len: int, is_v4: bool, is_tcp: bool) -> bool:
    ip = g.ip_len
    if is_v4 != g.is_v4 or is_tcp != g.is_tcp or hdr_len != g.hdr_len:
        return False
    if g.is_v4:
        if h[12:20] != p[12:20] or h[1] != p[1] or h[6] & 0xE0 != p[6] & 0xE0 or h[8] != p[8]:
            return False
    elif h[8:40] != p[8:40] or h[0:4] != p[0:4] or h[7] != p[7]:
        return False
    if h[ip : ip + 4] != p[ip : ip + 4]:
        return False
    if g.is_tcp and (h[ip + 8 : ip + 13] != p[ip + 8 : ip + 13] or h[ip + 14 : ip + 16] != p[ip + 14 : ip + 16]
                     or h[ip + 18 : g.hdr_len] != p[ip + 18 : g.hdr_len]):
        return False
    return True


def _finish_group(out: memoryview, g: _Group) -> bytes:
    if g.count < 2:
        return _ZERO_HDR
    sp = out[g.start : g.start + g.length]
    total, cs = g.length, g.ip_len
    l4_len = total - cs
    if g.is_v4:
        _U16.pack_into(sp, 2, total)
        sp[10] = sp[11] = 0
        _U16.pack_into(sp, 10, ~ones_sum(sp[:20]) & 0xFFFF)
        addr = int.from_bytes(sp[12:20], "big")
    else:
        _U16.pack_into(sp, 4, total - 40)
        addr = int.from_bytes(sp[8:40], "big")
    if g.is_tcp:
        if g.psh:
            sp[cs + 13] |= TCP_PSH
        proto, csum_off, gso_type = PROTO_TCP, 16, (GSO_TCPV4 if g.is_v4 else GSO_TCPV6)
    else:
        _U16.pack_into(sp, cs + 4, l4_len)
        proto, csum_off, gso_type = PROTO_UDP, 6, GSO_UDP_L4
    _U16.pack_into(sp, cs + csum_off, (addr + proto + l4_len) % 0xFFFF or 0xFFFF)
    return _NATIVE_HDR.pack(F_NEEDS_CSUM, gso_type, g.hdr_len, g.gso_size, cs, csum_off)


def _py_open_train(key: bytes, receiver: int, data: Buffer, segment: int, ring: bytearray, last: int, limit: int,
                   out: Any, udp: bool) -> tuple[int, int, int, int, int, int, int, int, list[tuple[bytes, int, int]]]:
    if len(key) != 32 or len(ring) != RING_BITS or segment < 1:
        raise ValueError("open_train: key must be 32 bytes, ring 8192, segment >= 1")
    if len(out) < len(data):
        raise ValueError("open_train: out must be at least as large as data")
    aead = ChaCha20Poly1305(bytes(key))
    src = memoryview(data)
    dst = memoryview(out).cast("B")
    n = len(src)
    pos = end = consumed = total = ok = keepalives = bad_tag = replay = bad_ip = 0
    frames: list[tuple[bytes, int, int]] = []
    g: _Group | None = None
    while pos < n:
        length = min(segment, n - pos)
        d = src[pos : pos + length]
        if length < MIN_MESSAGE or d[0] != 4 or d[1] or d[2] or d[3]:
            break
        _, index, counter = _HEADER.unpack_from(d)
        if index != receiver:
            break
        pos += length
        consumed += 1
        try:
            plain = aead.decrypt(_NONCE.pack(counter), d[HEADER_SIZE:], None)
        except InvalidTag:
            bad_tag += 1
            continue
        accepted, last = _replay_ok(ring, last, counter, limit)
        if not accepted:
            replay += 1
            continue
        total += length
        clen = len(plain)
        if clen == 0:
            keepalives += 1
            continue
        version = plain[0] >> 4
        if version == 4:
            plen = _U16.unpack_from(plain, 2)[0] if clen >= 20 else 0
            if clen < 20 or plen > clen or plen < 20:
                bad_ip += 1
                continue
        elif version == 6:
            plen = _U16.unpack_from(plain, 4)[0] + 40 if clen >= 40 else 0
            if clen < 40 or plen > clen:
                bad_ip += 1
                continue
        else:
            bad_ip += 1
            continue
        ok += 1
        p = memoryview(plain)[:plen]
        info = _mergeable(p, udp)
        if info is not None and g is not None and not g.closed and g.count < MAX_SEGMENTS:
            ip_len, hdr_len, is_v4, is_tcp, seq, psh = info
            if _same_flow(dst[g.start : g.start + g.hdr_len], p, g, hdr_len, is_v4, is_tcp):
                payload = plen - hdr_len
                if payload <= g.gso_size and g.length + payload <= MAX_SUPER and (not g.is_tcp or seq == g.next_seq):
                    at = g.start + g.length
                    dst[at : at + payload] = p[hdr_len:]
                    g.length += payload
                    g.count += 1
                    g.next_seq = (seq + payload) & 0xFFFFFFFF
                    g.psh = psh
                    g.closed = psh or payload < g.gso_size
                    frames[-1] = (frames[-1][0], g.start, g.start + g.length)
                    end = g.start + g.length
                    continue
        if g is not None:
            frames[-1] = (_finish_group(dst, g), frames[-1][1], frames[-1][2])
        g = None
        dst[end : end + plen] = p
        frames.append((_ZERO_HDR, end, end + plen))
        if info is not None:
            ip_len, hdr_len, is_v4, is_tcp, seq, psh = info
            g = _Group(end, plen, ip_len, hdr_len, is_v4, is_tcp, seq, psh)
        end += plen
    if g is not None:
        frames[-1] = (_finish_group(dst, g), frames[-1][1], frames[-1][2])
    return consumed, last, total, ok, keepalives, bad_tag, replay, bad_ip, frames


def _load() -> Any:
    if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1":
        return None
    try:
        from . import _wgcrypto
    except ImportError:
        return None
    return _wgcrypto


_c = _load()
SPEEDUPS: bool = _c is not None
"""Whether batches are sealed and opened in C (``wiretun.wireguard._wgcrypto``)."""


def seal_super(key: bytes, receiver: int, counter: int, header: Buffer, packet: Buffer,
               mtu: int) -> tuple[bytes, int, int]:
    """Seal one offload read as a train: ``(train, count, datagram_size)``; all datagrams are
    ``datagram_size`` bytes but the last, which may be shorter. Counters ``counter .. counter+count-1``."""
    if _c is not None:
        result: tuple[bytes, int, int] = _c.seal_super(key, receiver, counter, header, packet, mtu)
        return result
    return _py_seal_super(key, receiver, counter, header, packet, mtu)


def open_train(key: bytes, receiver: int, data: Buffer, segment: int, ring: bytearray, last: int, limit: int,
               out: bytearray | memoryview, udp: bool = False) -> OpenResult:
    """Open the messages for ``receiver`` at the front of ``data`` (datagrams of ``segment`` bytes, the last
    may be shorter) into ``out`` (at least ``len(data)`` bytes), stopping at the first datagram that is
    not a transport message for ``receiver``. ``ring``/``last`` are the keypair's replay window (updated
    in place; store the returned ``last``). ``udp``: coalesce UDP too (the kernel takes USO writes)."""
    if _c is not None:
        return OpenResult(*_c.open_train(key, receiver, data, segment, ring, last, limit, out, udp))
    return OpenResult(*_py_open_train(key, receiver, data, segment, ring, last, limit, out, udp))
