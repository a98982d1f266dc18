"""What the session system tests share, on the Linux backend (tests/system/test_session.py) and on the
Windows backend over the wintun.dll stand-in (tests/windows/test_session_standin.py): the addresses of the
adapter under test, packet helpers, and the test bodies both backends must pass alike.

The far side of the adapter is the namespace's own kernel on both: it answers pings sent through the
session, delivers UDP to sockets in the namespace, and routes datagrams for 10.0.0.2 / fd00:1::2 out
through the adapter.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import Any, Iterator

import pytest

from wiretun import packet
from wiretun.adapter import Adapter
from wiretun.errors import BufferOverflow, EndOfFile, InvalidParameter
from wiretun.ring import record_size
from wiretun.session import Session

V4_LOCAL, V4_PEER = "10.0.0.1", "10.0.0.2"
V6_LOCAL, V6_PEER = "fd00:1::1", "fd00:1::2"
SMALL = 0x20000


def make_adapter() -> Iterator[Adapter]:
    """The adapter under test (for a fixture, in the test's namespace): "wts0" with V4_LOCAL/24 and
    V6_LOCAL/64, up (nothing to do on Windows: the link comes up with the session); closed at the end."""
    a = Adapter.create("wts0", "SessionTest")
    try:
        a.add_address(f"{V4_LOCAL}/24")
        a.add_address(f"{V6_LOCAL}/64")
        a.up()
        yield a
    finally:
        a.close()


def receive_matching(session: Session, match: Any, timeout: float = 3.0) -> bytes:
    """The first packet for which ``match(bytes)`` holds; others (IPv6 MLD, router solicitations ...)
    are released and skipped. Returns a copy; the packet itself is released."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no matching packet arrived")
        pkt = session.wait_receive_packet(remaining)
        if pkt is None:
            continue
        data = bytes(pkt)
        session.release_receive_packet(pkt)
        if match(data):
            return data


def send(session: Session, data: bytes) -> None:
    buf = session.allocate_send_packet(len(data))
    buf[:] = data
    session.send_packet(buf)


def is_v4(proto: int, dst: str | None = None) -> Any:
    dst_b = socket.inet_aton(dst) if dst else None
    return lambda p: p[0] >> 4 == 4 and p[9] == proto and (dst_b is None or p[16:20] == dst_b)


def is_v6(next_header: int, first_byte: int | None = None) -> Any:
    return lambda p: p[0] >> 4 == 6 and p[6] == next_header and (first_byte is None or p[40] == first_byte)


def v4_expected(received: bytes, body: bytes, src: str, dst: str, proto: int, ttl: int = 64) -> bytes:
    """The IPv4 packet the kernel must have sent: every byte fixed except the IP ID and the DF bit,
    which are taken from what arrived (the checksum is recomputed over them)."""
    ident = struct.unpack_from("!H", received, 4)[0]
    df = bool(received[6] & 0x40)
    return packet.ipv4_header(src, dst, proto, len(body), ttl=ttl, ident=ident, dont_fragment=df) + body


def v6_expected(received: bytes, body: bytes, src: str, dst: str, next_header: int) -> bytes:
    """The IPv6 packet the kernel must have sent; the flow label (auto flow labels) is taken as received."""
    flow = struct.unpack_from("!I", received, 0)[0] & 0xFFFFF
    return packet.ipv6_header(src, dst, next_header, len(body), hop_limit=64, flow_label=flow) + body


def drain(s: Session) -> None:
    time.sleep(0.2)
    while (p := s.try_receive_packet()) is not None:  # link-up chatter (IPv6 MLD, RS)
        s.release_receive_packet(p)


def iterator_ends_with_the_session(s: Session, sock: socket.socket) -> None:
    """The session's iterator, run by a thread: blocking, it sees a datagram ``sock`` sends to V4_PEER
    (routed out through the adapter) and ends when the session does."""
    seen: list[bytes] = []

    def iterate() -> None:
        for p in s:
            seen.append(bytes(p))
            s.release_receive_packet(p)

    t = threading.Thread(target=iterate)
    t.start()
    sock.sendto(b"iterated", (V4_PEER, 5999))
    deadline = time.monotonic() + 10  # the loop exits as soon as the packet is in
    while not any(p[28:] == b"iterated" for p in seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    s.end()
    t.join(2)
    assert not t.is_alive()
    assert any(p[28:] == b"iterated" for p in seen)


def bad_session_arguments(s: Session) -> None:
    """Bad sizes, packets and views are InvalidParameter on both backends (a size's message names it)."""
    for size in (0, 0x10000, -5):
        with pytest.raises(InvalidParameter) as e:
            s.allocate_send_packet(size)
        assert str(size) in str(e.value)
    with pytest.raises(InvalidParameter):
        s.send_packets([b""])
    with pytest.raises(InvalidParameter):
        s.send_packets([bytes(0x10000)])
    with pytest.raises(InvalidParameter):
        s.receive_packets(0)
    with pytest.raises(InvalidParameter):
        s.release_receive_packet(memoryview(bytearray(20)))
    with pytest.raises(InvalidParameter):
        s.send_packet(memoryview(bytearray(20)))


def full_send_ring(adapter: Adapter, *, quiet: float, dropped: int | None) -> None:
    """A full send ring is BufferOverflow and nothing else breaks: receiving goes on, allocations are sent
    in order whatever order they are sent in, and the ring is usable again after. Nothing may arrive for
    ``quiet`` seconds while the first allocation is unsent; ``dropped`` is the session's send_dropped
    at the end when the backend counts the 41 packets the kernel refuses (None: not checked)."""
    fit = (SMALL - 4) // record_size(1400)
    with adapter.start_session(SMALL) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6200))
        sock.settimeout(3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        bufs = []
        for i in range(fit):
            buf = s.allocate_send_packet(1400)
            buf[:] = packet.ipv4_udp(V4_PEER, V4_LOCAL, 7200, 6200, struct.pack("!I", i) + bytes(1400 - 32))
            bufs.append(buf)
        with pytest.raises(BufferOverflow) as e:
            s.allocate_send_packet(1400)
        assert e.value.code == 111
        big = packet.ipv4_udp(V4_PEER, V4_LOCAL, 7200, 6200, bytes(1372))
        assert s.send_packets([big] * 3) == 0  # the caller drops them
        # The 496 bytes left take 41 records of 8-byte packets, then nothing (4 bytes always stay free).
        smalls = []
        while True:
            try:
                smalls.append(s.allocate_send_packet(8))
            except BufferOverflow:
                break
        assert len(smalls) == (SMALL - 4 - fit * record_size(1400)) // record_size(8) == 41
        # Receiving is unaffected (the ring is full, so nothing can be sent yet; the kernel's own
        # traffic still arrives).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.sendto(b"rx ok", (V4_PEER, 9))
        assert receive_matching(s, is_v4(packet.PROTO_UDP, V4_PEER))[28:] == b"rx ok"
        # Send in reverse: nothing leaves until the first allocation is sent, then all in order.
        for buf in reversed(bufs[1:]):
            s.send_packet(buf)
        sock.settimeout(quiet)
        with pytest.raises(socket.timeout):
            sock.recvfrom(2000)
        for small in smalls:
            s.send_packet(small)  # 8 zero bytes: not IP; the kernel refuses them
        s.send_packet(bufs[0])
        sock.settimeout(3)
        order = [struct.unpack_from("!I", sock.recvfrom(2000)[0])[0] for _ in range(fit)]
        assert order == list(range(fit))
        if dropped is not None:
            assert s.send_dropped == dropped  # refused by the kernel (EINVAL), counted, logged once
        send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 1, 1, b"still alive", 64))
        assert receive_matching(s, is_v4(packet.PROTO_ICMP, V4_PEER)).endswith(b"still alive")


def _blocked_reader(s: Session, how: str, out: dict[str, Any]) -> None:
    try:
        if how == "receive":
            while True:
                p = s.wait_receive_packet()
                if p is not None:
                    s.release_receive_packet(p)
        else:
            handle = s.get_read_wait_event()  # a descriptor (on the stand-in an eventfd): select waits on it
            while True:
                select.select([handle], [], [])
                p = s.try_receive_packet()
                if p is not None:
                    s.release_receive_packet(p)
    except EndOfFile as e:
        out["woke"] = time.monotonic()
        out["error"] = e


def ending_wakes_a_blocked_reader(adapter: Adapter, how: str, ender: str, receive: str) -> None:
    """A reader blocked in ``how`` ("receive": wait_receive_packet; "select": select on the read-wait
    event) wakes with EndOfFile as soon as ``ender`` ("end" or "adapter.close") ends the session; after,
    the session's ``receive`` method, allocating and batch receiving are EndOfFile too, the wait event
    stays valid and a second end does nothing."""
    s = adapter.start_session()
    out: dict[str, Any] = {}
    t = threading.Thread(target=_blocked_reader, args=(s, how, out), daemon=True)
    t.start()
    time.sleep(0.3)  # the reader is asleep by now
    assert t.is_alive()
    t0 = time.monotonic()
    if ender == "end":
        s.end()
    else:
        adapter.close()
    t.join(2)
    assert not t.is_alive()
    assert out["error"].code == 38
    # The end wakes the reader (it had slept 0.3 s without waking; the select() reader has no timeout
    # at all): an event, not the reader's own timer. Wintun's figure is 100 ms; a loaded 2-core machine
    # may schedule the thread later (seen: 320 ms), so the bound here is ten times that.
    assert 0 <= out["woke"] - t0 < 1.0, f"woke after {1000 * (out['woke'] - t0):.1f} ms"
    assert s.ended
    with pytest.raises(EndOfFile):
        getattr(s, receive)()
    with pytest.raises(EndOfFile):
        s.allocate_send_packet(20)
    with pytest.raises(EndOfFile):
        s.receive_packets()
    select.select([s.get_read_wait_event()], [], [], 0)  # still valid
    s.end()  # again: nothing
