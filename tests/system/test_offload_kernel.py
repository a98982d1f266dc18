"""offload.split / offload.coalesce against the kernel's own TUN offloads, in a fresh namespace.

* split: a kernel TCP socket sends 20 KiB (then FIN) to a peer routed through a TUN device with
  TUNSETOFFLOAD(CSUM|TSO4|TSO6|USO4|USO6); the test plays the peer (answers the SYN from the queue,
  ACKs what arrives) and splits the super-packets it reads. The same flow through a second device
  with TUNSETOFFLOAD(0), where the kernel segments in software, is the reference. The route has
  ``initcwnd 40`` so the whole 20 KiB leaves in one burst and both runs are shaped alike.
  Compared, segment by segment (sorted by sequence number, retransmissions dropped): relative
  sequence number, relative ACK number, TCP flags, TCP header length, TCP options with the
  timestamp values blanked, payload bytes, IP total length, TTL/hop limit, TOS/traffic class,
  DF, and IPv4 IDs relative to the first data segment's. Not compared: timestamp values, the
  advertised window, checksum values (each run's are verified instead) and absolute sequence
  numbers and IDs (random per connection).
* coalesce: the test plays a TCP client (or UDP sender) writing coalesced super-packets into an
  offload device; a local socket must receive the exact byte stream (datagrams), and the kernel
  must ACK all of it. Routed onward to a device without offloads instead, the kernel segments the
  super-packet itself and the segments must carry right checksums, which only happens when our
  header and pseudo-header seed were right.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from wiretun import offload as O
from wiretun import packet as P
from wiretun.linux import tun

OFFLOADS = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_USO4 | tun.TUN_F_USO6
PORT = 8000
SERVER_ISN = 0x1000_0000
CLIENT_ISN = 0x2000_0000
DEADLINE = 5.0  # seconds for any one phase; every loop below is bounded by it and by a count
MAX_FRAMES = 500


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@dataclass
class Tun:
    name: str
    fd: int
    local: str
    peer: str
    v6: bool
    frames: int = field(default=0)


def _wait_for_local_route(address: str) -> None:
    """IPv6 installs an address's local route after link up from a work queue, so a packet written at
    once can find no local route and be dropped (seen under load): wait, bounded, until it is in."""
    deadline = time.monotonic() + DEADLINE
    while True:
        r = subprocess.run(["ip", "-6", "route", "show", "table", "local", address], capture_output=True,
                           text=True, timeout=10)
        if r.stdout.strip():
            return
        assert time.monotonic() < deadline, f"no local route for {address} after {DEADLINE} s"
        time.sleep(0.02)


def make_tun(name: str, offloads: int, local: str, peer: str, *, v6: bool) -> Tun:
    fd = tun.open_queue(name, create=True)  # the device's only queue: it receives everything
    try:
        tun.set_offload(fd, offloads)
        fam = "-6" if v6 else "-4"
        extra = ["nodad"] if v6 else []
        ip(fam, "addr", "add", f"{local}/{128 if v6 else 32}", "dev", name, *extra)
        ip("link", "set", name, "up")
        ip(fam, "route", "add", f"{peer}/{128 if v6 else 32}", "dev", name, "initcwnd", "40")
        if v6:
            _wait_for_local_route(local)
    except BaseException:
        os.close(fd)
        raise
    return Tun(name, fd, local, peer, v6)


def next_frame(t: Tun, deadline: float) -> bytes:
    """The next frame (virtio-net header + packet) from the queue, or fail at ``deadline``."""
    t.frames += 1
    assert t.frames <= MAX_FRAMES, f"{t.name}: more than {MAX_FRAMES} frames"
    left = deadline - time.monotonic()
    if left > 0:
        r, _, _ = select.select([t.fd], [], [], left)
        if r:
            return os.read(t.fd, 70000)
    raise AssertionError(f"{t.name}: no frame before the deadline")


def tcp(t: Tun, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        options: bytes = b"", *, ip_id: int = 0, window: int = 65535) -> bytes:
    """A TCP segment from t.peer to t.local."""
    if t.v6:
        return P.ipv6_tcp(t.peer, t.local, sport, dport, seq, ack, flags, payload, options=options,
                          window=window)
    return P.ipv4_tcp(t.peer, t.local, sport, dport, seq, ack, flags, payload, options=options,
                      ip_id=ip_id, window=window)


def send(t: Tun, pkt: bytes) -> None:
    assert os.writev(t.fd, [O.ZERO_HEADER, pkt]) == O.VIRTIO_NET_HDR_LEN + len(pkt)


def tcp_options(opts: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        size = opts[i + 1] if i + 1 < len(opts) else 0
        if size < 2:
            break
        found[kind] = opts[i + 2 : i + size]
        i += size
    return found


def blank_timestamps(opts: bytes) -> bytes:
    b = bytearray(opts)
    i = 0
    while i < len(b):
        if b[i] == 0:
            break
        if b[i] == 1:
            i += 1
            continue
        if b[i] == 8 and i + 10 <= len(b):
            b[i + 2 : i + 10] = bytes(8)
        i += max(b[i + 1], 2)
    return bytes(b)


def our_tcp(t: Tun, pkt: bytes, sport: int | None, dport: int) -> P.PacketInfo | None:
    """Parsed ``pkt`` if it is TCP from the local address to ``dport`` (and ``sport``)."""
    try:
        info = P.parse(pkt)
    except Exception:
        return None
    if info.protocol != P.PROTO_TCP or info.dst_port != dport:
        return None
    if sport is not None and info.src_port != sport:
        return None
    return info


@dataclass
class Capture:
    headers: list[O.VirtioNetHeader]
    segments: list[bytes]  # wire segments, by sequence number
    isn: int
    super_flags: list[int]  # TCP flags of each GSO super-packet as read


def kernel_sends(t: Tun, data: bytes, *, hold: bool = False) -> Capture:
    """A local TCP socket connects to t.peer:PORT, sends ``data`` and FIN; we play the peer.

    With ``hold`` our SYN-ACK offers a zero window, opened only after the socket has queued all of
    ``data`` and its FIN: the kernel then sends data and FIN together (FIN on the last segment).
    """
    fam = socket.AF_INET6 if t.v6 else socket.AF_INET
    deadline = time.monotonic() + DEADLINE
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # sendall must not wait for ACKs
        s.setblocking(False)
        s.connect_ex((t.peer, PORT))
        # SYN (skip whatever else the kernel says on a new link, e.g. MLD / router solicitations)
        while True:
            pkt = next_frame(t, deadline)[O.VIRTIO_NET_HDR_LEN:]
            info = our_tcp(t, pkt, None, PORT)
            if info and info.tcp_flags == P.TCP_SYN:
                break
        h = info.header_length
        sport = info.src_port
        isn = struct.unpack_from("!I", pkt, h + 4)[0]
        opts = tcp_options(pkt[h + 20 : info.payload_offset])
        mss = 1440 if t.v6 else 1460
        synack_opts = struct.pack("!BBH", 2, 4, mss)
        if 8 in opts:  # echo the timestamp so the options of data segments are non-trivial
            synack_opts += b"\x01\x01" + struct.pack("!BBII", 8, 10, 1, struct.unpack("!I", opts[8][:4])[0])
        window = 0 if hold else 65535
        send(t, tcp(t, PORT, sport, SERVER_ISN, isn + 1, P.TCP_SYN | P.TCP_ACK, options=synack_opts,
                    window=window))
        while True:  # the handshake's ACK
            pkt = next_frame(t, deadline)[O.VIRTIO_NET_HDR_LEN:]
            info = our_tcp(t, pkt, sport, PORT)
            if info and info.tcp_flags == P.TCP_ACK and info.payload_length == 0:
                break
        s.setblocking(True)
        s.settimeout(DEADLINE)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        if hold:  # open the window: everything queued goes out now
            send(t, tcp(t, PORT, sport, SERVER_ISN + 1, isn + 1, P.TCP_ACK))

        headers: list[O.VirtioNetHeader] = []
        super_flags: list[int] = []
        by_seq: dict[int, bytes] = {}
        received = 0  # contiguous payload bytes
        fin = False
        while not (fin and received == len(data)):
            frame = next_frame(t, deadline)
            hdr = O.VirtioNetHeader.unpack_from(frame)
            pkt = frame[O.VIRTIO_NET_HDR_LEN:]
            if not our_tcp(t, pkt, sport, PORT):
                continue
            headers.append(hdr)
            if hdr.gso_type != O.GSO_NONE:
                super_flags.append(P.parse(pkt).tcp_flags)
            for seg in O.split_packets(hdr, pkt):
                info = P.parse(seg)
                rel = (struct.unpack_from("!I", seg, info.header_length + 4)[0] - isn) & 0xFFFFFFFF
                by_seq.setdefault(rel, seg)  # a retransmission does not replace the original
            while True:  # advance over what is contiguous
                seg = by_seq.get(received + 1)
                if seg is None:
                    break
                info = P.parse(seg)
                if info.payload_length == 0:
                    break
                received += info.payload_length
            last = by_seq.get(received + 1)
            if received == len(data) and last is not None and P.parse(last).tcp_flags & P.TCP_FIN:
                fin = True
            elif received == len(data):
                # FIN piggybacked on the last data segment?
                for seg in by_seq.values():
                    info = P.parse(seg)
                    rel = (struct.unpack_from("!I", seg, info.header_length + 4)[0] - isn) & 0xFFFFFFFF
                    if info.tcp_flags & P.TCP_FIN and rel + info.payload_length == received + 1:
                        fin = True
            ack = isn + 1 + received + (1 if fin else 0)
            send(t, tcp(t, PORT, sport, SERVER_ISN + 1, ack & 0xFFFFFFFF, P.TCP_ACK))
        segments = [by_seq[k] for k in sorted(by_seq)]
        return Capture(headers, segments, isn, super_flags)


def wire_view(seg: bytes, isn: int, first_id: int) -> tuple:
    info = P.parse(seg)
    h = info.header_length
    seq, ack = struct.unpack_from("!II", seg, h + 4)
    if info.version == 4:
        ip_part = (seg[1], seg[6] & 0x40, seg[8], (struct.unpack_from("!H", seg, 4)[0] - first_id) & 0xFFFF)
    else:
        ip_part = (((seg[0] & 0x0F) << 4) | (seg[1] >> 4), seg[7])
    return (
        (seq - isn) & 0xFFFFFFFF,
        (ack - SERVER_ISN) & 0xFFFFFFFF,
        info.tcp_flags,
        info.payload_offset - h,
        blank_timestamps(seg[h + 20 : info.payload_offset]),
        info.total_length,
        ip_part,
        seg[info.payload_offset :],
    )


@pytest.mark.parametrize("hold", [False, True], ids=["fin-apart", "fin-inside"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_split_matches_kernel_segmentation(netns, v6, hold):
    data = bytes(range(256)) * 80  # 20 KiB
    if v6:
        off = make_tun("wtoff0", OFFLOADS, "fd00:9:0::1", "fd00:9:0::2", v6=True)
        ref = make_tun("wtref0", 0, "fd00:9:1::1", "fd00:9:1::2", v6=True)
    else:
        off = make_tun("wtoff0", OFFLOADS, "10.9.0.1", "10.9.0.2", v6=False)
        ref = make_tun("wtref0", 0, "10.9.1.1", "10.9.1.2", v6=False)
    try:
        got = kernel_sends(off, data, hold=hold)
        want = kernel_sends(ref, data, hold=hold)
    finally:
        os.close(off.fd)
        os.close(ref.fd)

    # The offload device really got super-packets, the reference device never did.
    gso = O.GSO_TCPV6 if v6 else O.GSO_TCPV4
    supers = [h for h in got.headers if h.gso_type & ~O.GSO_ECN == gso]
    assert supers, f"no TCP super-packet arrived: {got.headers}"
    assert len(got.segments) > len(got.headers)
    assert all(h == O.VirtioNetHeader() for h in want.headers), want.headers
    if hold:  # the kernel put FIN (and PSH) on the super-packet; split must move them to the end
        assert any(f & P.TCP_FIN for f in got.super_flags), got.super_flags

    for seg in got.segments + want.segments:
        assert P.verify_checksums(seg)
    assert b"".join(s[P.parse(s).payload_offset:] for s in got.segments) == data

    def first_id(cap: Capture) -> int:
        return 0 if v6 else struct.unpack_from("!H", cap.segments[0], 4)[0]

    mine = [wire_view(s, got.isn, first_id(got)) for s in got.segments]
    theirs = [wire_view(s, want.isn, first_id(want)) for s in want.segments]
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a == b, f"segment {i} differs: {a[:7]} != {b[:7]}"
    # PSH on the last data segment, FIN once at the very end, every other segment a plain ACK.
    flags = [v[2] for v in mine]
    data_flags = [f for v, f in zip(mine, flags) if v[7]]
    assert data_flags[-1] & P.TCP_PSH
    assert flags[-1] & P.TCP_FIN and not any(f & P.TCP_FIN for f in flags[:-1])
    assert all(f == P.TCP_ACK for f in data_flags[:-1])


def handshake(t: Tun, sport: int, deadline: float) -> int:
    """We connect from t.peer:sport to t.local:PORT; returns the server's ISN."""
    send(t, tcp(t, sport, PORT, CLIENT_ISN, 0, P.TCP_SYN, options=struct.pack("!BBH", 2, 4, 1400)))
    while True:
        pkt = next_frame(t, deadline)[O.VIRTIO_NET_HDR_LEN:]
        info = P.parse(pkt)
        if (info.protocol == P.PROTO_TCP and info.src_port == PORT and info.dst_port == sport
                and info.tcp_flags == P.TCP_SYN | P.TCP_ACK):
            break
    server_isn = struct.unpack_from("!I", pkt, info.header_length + 4)[0]
    send(t, tcp(t, sport, PORT, CLIENT_ISN + 1, server_isn + 1, P.TCP_ACK))
    return server_isn


def client_segments(t: Tun, sport: int, server_isn: int, data: bytes, size: int) -> list[bytes]:
    segs = []
    for i, start in enumerate(range(0, len(data), size)):
        chunk = data[start : start + size]
        last = start + size >= len(data)
        flags = P.TCP_ACK | (P.TCP_PSH if last else 0)
        segs.append(tcp(t, sport, PORT, CLIENT_ISN + 1 + start, server_isn + 1, flags, chunk, ip_id=i))
    return segs


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesced_tcp_delivered_to_socket(netns, v6):
    if v6:
        t = make_tun("wtgro0", OFFLOADS, "fd00:9:2::1", "fd00:9:2::2", v6=True)
    else:
        t = make_tun("wtgro0", OFFLOADS, "10.9.2.1", "10.9.2.2", v6=False)
    data = os.urandom(29_500)  # 29 segments of 1000 bytes and one of 500
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    deadline = time.monotonic() + DEADLINE
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as listener:
            listener.bind((t.local, PORT))
            listener.listen(1)
            listener.settimeout(DEADLINE)
            server_isn = handshake(t, 40000, deadline)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(DEADLINE)
                segs = client_segments(t, 40000, server_isn, data, 1000)
                frames = O.coalesce(segs)
                assert [f.count for f in frames] == [30]
                hdr = O.VirtioNetHeader.unpack_from(frames[0].header)
                assert hdr.gso_type == (O.GSO_TCPV6 if v6 else O.GSO_TCPV4) and hdr.gso_size == 1000
                n = os.writev(t.fd, [frames[0].header, frames[0].packet])
                assert n == O.VIRTIO_NET_HDR_LEN + len(frames[0].packet)
                got = b""
                for _ in range(100):
                    if len(got) >= len(data):
                        break
                    chunk = conn.recv(65536)
                    assert chunk, "connection closed early"
                    got += chunk
                assert got == data
                # The kernel acknowledges the whole super-packet.
                want_ack = (CLIENT_ISN + 1 + len(data)) & 0xFFFFFFFF
                while True:
                    pkt = next_frame(t, deadline)[O.VIRTIO_NET_HDR_LEN:]
                    info = P.parse(pkt)
                    if info.protocol == P.PROTO_TCP and info.src_port == PORT:
                        if struct.unpack_from("!I", pkt, info.header_length + 8)[0] == want_ack:
                            break
    finally:
        os.close(t.fd)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesced_udp_delivered_to_socket(netns, v6):
    if v6:
        t = make_tun("wtgro1", OFFLOADS, "fd00:9:3::1", "fd00:9:3::2", v6=True)
    else:
        t = make_tun("wtgro1", OFFLOADS, "10.9.3.1", "10.9.3.2", v6=False)
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as u:
            u.bind((t.local, PORT))
            u.settimeout(DEADLINE)
            payloads = [os.urandom(1200) for _ in range(20)] + [b"last datagram"]
            mk = P.ipv6_udp if v6 else P.ipv4_udp
            dgrams = [mk(t.peer, t.local, 5555, PORT, p) for p in payloads]
            frames = O.coalesce(dgrams, udp=True)
            assert [f.count for f in frames] == [21]
            assert O.VirtioNetHeader.unpack_from(frames[0].header).gso_type == O.GSO_UDP_L4
            os.writev(t.fd, [frames[0].header, frames[0].packet])
            got = [u.recv(65536) for _ in payloads]  # each recv bounded by the timeout
            assert got == payloads  # datagram boundaries survive
    finally:
        os.close(t.fd)


@pytest.mark.parametrize("v6, proto", [(False, "tcp"), (True, "tcp"), (False, "udp"), (True, "udp")],
                         ids=["tcp4", "tcp6", "udp4", "udp6"])
def test_kernel_resegments_coalesced_super_packet(netns, v6, proto):
    """Forwarded to a device without offloads, the kernel cuts our super-packet itself: its
    segments checksum right only if our GSO header and pseudo-header seed were right."""
    if v6:
        src, dst = "fd00:9:5::2", "fd00:9:6::2"
        a = make_tun("wtfwa", OFFLOADS, "fd00:9:5::1", src, v6=True)
        b = make_tun("wtfwb", 0, "fd00:9:6::1", dst, v6=True)
        subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True, timeout=10)
    else:
        src, dst = "10.9.5.2", "10.9.6.2"
        a = make_tun("wtfwa", OFFLOADS, "10.9.5.1", src, v6=False)
        b = make_tun("wtfwb", 0, "10.9.6.1", dst, v6=False)
        subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=10)
    try:
        data = os.urandom(9 * 1300 + 77)
        chunks = [data[i : i + 1300] for i in range(0, len(data), 1300)]
        if proto == "tcp":
            mk = P.ipv6_tcp if v6 else P.ipv4_tcp
            segs, seq = [], 1000
            for i, c in enumerate(chunks):
                flags = P.TCP_ACK | (P.TCP_PSH if i == len(chunks) - 1 else 0)
                kw = {} if v6 else {"ip_id": 50 + i}
                segs.append(mk(src, dst, 40000, 9999, seq, 1, flags, c, **kw))
                seq += len(c)
        else:
            mk = P.ipv6_udp if v6 else P.ipv4_udp
            kw = {} if v6 else {"dont_fragment": True}
            segs = [mk(src, dst, 40000, 9999, c, **kw) for c in chunks]
        frames = O.coalesce(segs, udp=proto == "udp")
        assert [f.count for f in frames] == [len(segs)]
        os.writev(a.fd, [frames[0].header, frames[0].packet])
        deadline = time.monotonic() + DEADLINE
        out: list[bytes] = []
        while len(out) < len(segs):
            frame = next_frame(b, deadline)
            pkt = frame[O.VIRTIO_NET_HDR_LEN:]
            info = P.parse(pkt)
            if info.protocol not in (P.PROTO_TCP, P.PROTO_UDP) or info.dst_port != 9999:
                continue
            assert frame[: O.VIRTIO_NET_HDR_LEN] == O.ZERO_HEADER
            out.append(pkt)
        for i, (fwd, orig) in enumerate(zip(out, segs)):
            assert P.verify_checksums(fwd), f"segment {i} has a bad checksum"
            fi, oi = P.parse(fwd), P.parse(orig)
            assert fi.ttl == oi.ttl - 1
            assert fwd[fi.payload_offset:] == orig[oi.payload_offset:]
            assert fi.tcp_flags == oi.tcp_flags
            if proto == "tcp":
                seq = slice(fi.header_length + 4, fi.header_length + 8)
                assert fwd[seq] == orig[oi.header_length + 4 : oi.header_length + 8]
    finally:
        os.close(a.fd)
        os.close(b.fd)
