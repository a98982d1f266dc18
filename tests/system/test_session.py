"""Sessions on real TUN adapters, each test in its own network namespace (the ``netns`` fixture).

The far side of the adapter is the namespace's own kernel: it answers pings sent through the session,
delivers UDP to sockets in the namespace, and routes datagrams for 10.0.0.2 / fd00:1::2 out through the
adapter. Every check is on exact bytes, addresses and counts.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import struct
import subprocess
import time

import pytest

from wiretun import packet
from wiretun.adapter import Adapter
from wiretun.errors import Busy, EndOfFile, InvalidParameter, NoMoreItems
from wiretun.linux import tun
from wiretun.linux.engine import REWIND_OFFSET
from wiretun.ring import RELEASE_BIT, record_size

from ..sessionutil import (
    SMALL,
    V4_LOCAL,
    V4_PEER,
    V6_LOCAL,
    V6_PEER,
    bad_session_arguments,
    drain,
    ending_wakes_a_blocked_reader,
    full_send_ring,
    is_v4,
    is_v6,
    iterator_ends_with_the_session,
    make_adapter,
    receive_matching,
    send,
    v4_expected,
    v6_expected,
)


@pytest.fixture
def adapter(netns):
    yield from make_adapter()


# ----------------------------------------------------------------------------- kernel <-> session


def test_kernel_echo_reply_arrives_with_exact_bytes(adapter):
    with adapter.start_session(0x400000) as s:
        request = packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, ident=0x1234, seq=7, payload=b"wiretun ping", ttl=64)
        send(s, request)
        reply = receive_matching(s, is_v4(packet.PROTO_ICMP, V4_PEER))
        icmp = packet.ipv4_icmp_echo(V4_LOCAL, V4_PEER, 0x1234, 7, b"wiretun ping", request=False)[20:]
        assert icmp[:2] == b"\x00\x00"  # echo reply, code 0
        assert reply == v4_expected(reply, icmp, V4_LOCAL, V4_PEER, packet.PROTO_ICMP)
        assert packet.verify_checksums(reply)


def test_kernel_icmpv6_echo_reply_arrives_with_exact_bytes(adapter):
    with adapter.start_session() as s:
        request = packet.ipv6_icmp_echo(V6_PEER, V6_LOCAL, ident=0x77, seq=3, payload=b"v6 ping")
        send(s, request)
        reply = receive_matching(s, is_v6(packet.PROTO_ICMPV6, packet.ICMPV6_ECHO_REPLY))
        icmp = packet.ipv6_icmp_echo(V6_LOCAL, V6_PEER, 0x77, 3, b"v6 ping", request=False)[40:]
        assert reply == v6_expected(reply, icmp, V6_LOCAL, V6_PEER, packet.PROTO_ICMPV6)
        assert packet.verify_checksums(reply)


def test_udp_from_a_socket_arrives_byte_for_byte(adapter):
    payload = bytes(range(256)) * 3
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 4444))
        sock.sendto(payload, (V4_PEER, 5555))
        got = receive_matching(s, is_v4(packet.PROTO_UDP, V4_PEER))
        udp = packet.ipv4_udp(V4_LOCAL, V4_PEER, 4444, 5555, payload)[20:]
        assert got == v4_expected(got, udp, V4_LOCAL, V4_PEER, packet.PROTO_UDP)


def test_udp6_from_a_socket_arrives_byte_for_byte(adapter):
    payload = b"six" * 100
    with adapter.start_session() as s, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind((V6_LOCAL, 4446))
        sock.sendto(payload, (V6_PEER, 5556))
        got = receive_matching(s, is_v6(packet.PROTO_UDP))
        udp = packet.ipv6_udp(V6_LOCAL, V6_PEER, 4446, 5556, payload)[40:]
        assert got == v6_expected(got, udp, V6_LOCAL, V6_PEER, packet.PROTO_UDP)


def test_allocated_packet_reaches_a_udp_socket(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6000))
        sock.settimeout(3)
        datagram = packet.ipv4_udp(V4_PEER, V4_LOCAL, 7000, 6000, b"through the send ring")
        buf = s.allocate_send_packet(len(datagram))
        assert len(buf) == len(datagram) and not buf.readonly
        buf[:] = datagram
        s.send_packet(buf)
        data, addr = sock.recvfrom(2000)
        assert data == b"through the send ring"
        assert addr == (V4_PEER, 7000)


def test_allocated_ipv6_packet_reaches_a_udp_socket(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind((V6_LOCAL, 6006))
        sock.settimeout(3)
        send(s, packet.ipv6_udp(V6_PEER, V6_LOCAL, 7006, 6006, b"v6 through the ring"))
        data, addr = sock.recvfrom(2000)
        assert data == b"v6 through the ring"
        assert addr[:2] == (V6_PEER, 7006)


def test_batch_forms_and_iterator(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6100))
        sock.settimeout(3)
        datagrams = [packet.ipv4_udp(V4_PEER, V4_LOCAL, 7100 + i, 6100, b"batch %d" % i) for i in range(10)]
        assert s.send_packets(datagrams) == 10
        assert sorted(sock.recvfrom(100) for _ in range(10)) == sorted(
            (b"batch %d" % i, (V4_PEER, 7100 + i)) for i in range(10)
        )
        # Out: ten datagrams through the kernel, read back with one batch call.
        for i in range(10):
            sock.sendto(b"out %d" % i, (V4_PEER, 5000 + i))
        got: list[bytes] = []
        deadline = time.monotonic() + 10  # both loops exit as soon as the packets are in
        while len(got) < 10 and time.monotonic() < deadline:
            batch = s.receive_packets(64, block=True, timeout=0.5)
            got += [bytes(p) for p in batch if is_v4(packet.PROTO_UDP, V4_PEER)(p)]
            s.release_receive_packets(batch)
        assert [p[28:] for p in got] == [b"out %d" % i for i in range(10)]
        # The iterator: blocking, ends when the session does.
        iterator_ends_with_the_session(s, sock)


def test_empty_polls(adapter):
    with adapter.start_session() as s:
        while s.try_receive_packet() is not None:  # drain what the kernel sent on link-up
            pass
        with pytest.raises(NoMoreItems) as e:
            s.receive_packet()
        assert e.value.code == 259
        assert s.try_receive_packet() is None
        assert s.receive_packets(64) == []
        t0, cpu0 = time.monotonic(), time.thread_time()
        assert s.wait_receive_packet(0.2) is None
        waited, cpu = time.monotonic() - t0, time.thread_time() - cpu0
        # It waits the whole timeout (never returns early), asleep rather than spinning (this thread's
        # CPU time, which a loaded machine does not inflate); the upper bound only catches a hang.
        assert 0.18 <= waited < 10.0, waited
        assert cpu < 0.1, f"{cpu:.3f} s of CPU in a {waited:.3f} s wait: a busy loop?"


# ----------------------------------------------------------------------------- ring semantics


def test_out_of_order_release_frees_space_only_from_head(adapter):
    """A 128 KiB receive ring holds 93 records of 1400-byte packets; what does not fit is dropped (as
    Wintun's driver drops). Releasing a packet in the middle frees nothing; releasing the first frees
    both it and the already released one after it."""
    rec = record_size(1400)
    fit = (SMALL - 4) // rec
    assert fit == 93
    with adapter.start_session(SMALL) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        time.sleep(0.2)
        while (p := s.try_receive_packet()) is not None:  # link-up chatter
            s.release_receive_packet(p)
        ring = s._backend._rx

        def blast(first: int, count: int) -> None:
            for i in range(first, first + count):
                sock.sendto(struct.pack("!I", i) + bytes(1368), (V4_PEER, 9))

        def seqs(pkts) -> list[int]:
            return [struct.unpack_from("!I", p, 28)[0] for p in pkts]

        blast(0, fit + 7)
        held = s.receive_packets(fit + 7)
        assert len(held) == fit and all(len(p) == 1400 for p in held)
        assert seqs(held) == list(range(fit))
        assert s.receive_dropped == 7
        head0 = ring.head

        s.release_receive_packet(held[1])  # out of order: marked, Head stays
        assert ring.head == head0
        assert ring.stored_size(head0 + rec) == RELEASE_BIT | 1400
        blast(1000, 1)
        assert s.receive_packets(10) == []  # its space is not usable yet: dropped
        assert s.receive_dropped == 8

        s.release_receive_packet(held[0])  # now Head moves over both
        assert ring.head == (head0 + 2 * rec) % SMALL
        blast(2000, 3)
        more = s.receive_packets(10)
        assert seqs(more) == [2000, 2001]  # two records' worth came back; the third did not fit
        # The first of them runs from the ring's last record on into the trailing bytes; the second
        # starts again at the front (wrapped). Both are whole, byte for byte.
        assert ring.tail < ring.head
        for p, seq in zip(more, (2000, 2001)):
            udp = packet.ipv4_udp(V4_LOCAL, V4_PEER, sock.getsockname()[1], 9, struct.pack("!I", seq) + bytes(1368))
            assert bytes(p) == v4_expected(bytes(p), udp[20:], V4_LOCAL, V4_PEER, packet.PROTO_UDP)
        assert s.receive_dropped == 9
        s.release_receive_packets(held[2:])
        s.release_receive_packets(more)
        assert ring.head == ring.tail


def test_full_send_ring_is_buffer_overflow_and_nothing_else_breaks(adapter):
    full_send_ring(adapter, quiet=0.2, dropped=41)


def test_sending_while_the_adapter_is_down_drops_and_goes_on(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6300))
        sock.settimeout(3)
        datagram = packet.ipv4_udp(V4_PEER, V4_LOCAL, 7300, 6300, b"after")
        adapter.down()
        assert s.send_packets([datagram] * 3) == 3  # taken, and dropped by the kernel (EIO)
        send(s, datagram)
        assert s.send_dropped == 4 and not s.ended
        adapter.up()
        assert s.send_packets([datagram]) == 1
        assert sock.recvfrom(100) == (b"after", (V4_PEER, 7300))


def test_bad_arguments_are_clear_errors(adapter):
    for bad in (0x1000, 0x20001, 0x30000, 0x8000000, 0):
        with pytest.raises(InvalidParameter) as e:
            adapter.start_session(bad)
        assert f"{bad:#x}" in str(e.value) and "0x20000" in str(e.value) and "0x4000000" in str(e.value)
    with adapter.start_session() as s:
        bad_session_arguments(s)
        buf = s.allocate_send_packet(28)
        buf[:] = packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 9, 9)
        s.send_packet(buf)
        with pytest.raises((InvalidParameter, ValueError)):
            s.send_packet(buf)  # sent twice (the view was also released)
        pkt = s.wait_receive_packet(3)
        assert pkt is not None
        s.release_receive_packet(pkt)
        with pytest.raises(InvalidParameter):
            s.release_receive_packet(pkt)  # released twice
        with pytest.raises(ValueError):
            bytes(pkt)  # a released packet's view is released too


def test_packet_from_another_session_is_refused(adapter):
    with Adapter.create("wts1", "SessionTest") as other:
        other.add_address("10.9.9.1/24")
        other.up()
        with adapter.start_session() as s1, other.start_session() as s2:
            send(s2, packet.ipv4_icmp_echo("10.9.9.2", "10.9.9.1", 1, 1, b"other"))
            foreign = s2.wait_receive_packet(3)
            assert foreign is not None
            with pytest.raises(InvalidParameter):
                s1.release_receive_packet(foreign)
            with pytest.raises(InvalidParameter):
                s1.release_receive_packets([foreign])
            s2.release_receive_packet(foreign)  # still releasable by its own session
            buf = s2.allocate_send_packet(20)
            with pytest.raises(InvalidParameter):
                s1.send_packet(buf)


# ----------------------------------------------------------------------------- waiting and ending


def test_read_wait_event_with_selectors_and_asyncio(adapter):
    with adapter.start_session() as s:
        fd = s.get_read_wait_event()
        assert isinstance(fd, int)
        while (p := s.try_receive_packet()) is not None:
            s.release_receive_packet(p)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            assert sel.select(0.05) == []
            send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 2, 2, b"selector"))
            assert sel.select(3)
        assert receive_matching(s, is_v4(packet.PROTO_ICMP)).endswith(b"selector")

        async def via_asyncio() -> bytes:
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()
            loop.add_reader(fd, ready.set)
            try:
                send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 3, 3, b"asyncio"))
                while True:
                    await asyncio.wait_for(ready.wait(), 3)
                    ready.clear()
                    pkt = s.try_receive_packet()
                    if pkt is None:
                        continue
                    data = bytes(pkt)
                    s.release_receive_packet(pkt)
                    if is_v4(packet.PROTO_ICMP)(data):
                        return data
            finally:
                loop.remove_reader(fd)

        assert asyncio.run(via_asyncio()).endswith(b"asyncio")


def test_the_read_wait_handle_stays_readable_while_read_ahead_packets_wait(adapter):
    """A loop that receives one packet per wake-up gets every packet: the first receive reads all the
    waiting packets ahead into the ring (the queue is empty after it), so the handle must stay readable
    while they wait there, and stop being readable once a receive finds nothing."""
    with adapter.start_session() as s:
        drain(s)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(8):
                sock.sendto(b"ahead %d" % i, (V4_PEER, 9))  # routed out through the adapter: queued
        got: list[bytes] = []
        with selectors.DefaultSelector() as sel:
            sel.register(s.get_read_wait_event(), selectors.EVENT_READ)
            deadline = time.monotonic() + 10
            while len(got) < 8 and time.monotonic() < deadline:
                if not sel.select(2):
                    break  # not readable although packets wait: the loop would sleep forever
                pkt = s.try_receive_packet()
                if pkt is None:
                    continue
                data = bytes(pkt)
                s.release_receive_packet(pkt)
                if is_v4(packet.PROTO_UDP, V4_PEER)(data):
                    got.append(data[28:])
            assert got == [b"ahead %d" % i for i in range(8)]
            drain(s)
            assert sel.select(0.05) == []


def test_a_wait_with_every_packet_held_sleeps_instead_of_spinning(adapter):
    """Found in review: hold every packet until the small ring is full, then wait. The read-ahead
    eventfd must be clear once nothing waits read ahead, or the handle stays readable and the wait
    spins (it measured 341,266 receive calls in 0.5 s). Thread CPU time, not wall time, tells."""
    with adapter.start_session(SMALL) as s:
        drain(s)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(100):  # 140 KB: more than the 128 KiB ring holds
                sock.sendto(bytes([i]) * 1400, (V4_PEER, 9))
        held = []
        while (pkt := s.wait_receive_packet(0.5)) is not None and len(held) < 200:
            held.append(pkt)
        assert 40 < len(held) < 100 and s.receive_dropped
        cpu = time.thread_time()
        assert s.wait_receive_packet(0.5) is None
        assert time.thread_time() - cpu < 0.25
        s.release_receive_packets(held)


@pytest.mark.parametrize("how", ["receive", "select"])
@pytest.mark.parametrize("ender", ["end", "adapter.close"])
def test_ending_wakes_a_blocked_reader_within_100ms(adapter, how, ender):
    ending_wakes_a_blocked_reader(adapter, how, ender, "receive_packet")


def test_closing_the_adapter_ends_the_session_cleanly(adapter):
    s = adapter.start_session()
    send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 5, 5, b"held"))
    held = s.wait_receive_packet(3)
    assert held is not None
    before = bytes(held)
    buf = s.allocate_send_packet(100)
    name = adapter.kernel_name
    adapter.close()
    assert s.ended
    assert bytes(held) == before and len(before) >= 20  # views still held stay readable and unchanged
    s.release_receive_packet(held)  # after the end: nothing happens
    s.send_packet(buf)
    r = subprocess.run(["ip", "link", "show", "dev", name], capture_output=True)
    assert r.returncode != 0  # the adapter is gone
    with pytest.raises(EndOfFile):
        s.receive_packet()


def test_deleting_the_device_underneath_gives_end_of_file(adapter):
    s = adapter.start_session()
    subprocess.run(["ip", "link", "del", "dev", adapter.kernel_name], check=True)
    assert s.wait(2)  # the handle wakes up
    with pytest.raises(EndOfFile):
        while True:
            p = s.try_receive_packet()
            if p is not None:
                s.release_receive_packet(p)
    s.end()


# ----------------------------------------------------------------------------- one session per adapter


def test_second_session_is_busy(adapter):
    s = adapter.start_session()
    with pytest.raises(Busy) as e:
        adapter.start_session()
    assert e.value.code == 170
    s.end()
    with adapter.start_session() as again:
        send(again, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 6, 6, b"again"))
        assert receive_matching(again, is_v4(packet.PROTO_ICMP)).endswith(b"again")


def test_queue_held_elsewhere_is_busy_unless_multi_queue(adapter):
    fd = tun.open_queue(adapter.kernel_name)  # as another process's session would
    try:
        with pytest.raises(Busy):
            adapter.start_session()
        with adapter.start_session(multi_queue=True) as s:
            assert s.multi_queue
            with adapter.start_session(multi_queue=True) as s2:
                assert s2.multi_queue
            with pytest.raises(Busy):
                adapter.start_session()
    finally:
        import os

        os.close(fd)
    with adapter.start_session() as s:
        assert not s.multi_queue


# ----------------------------------------------------------------------------- the session core


def test_plain_sessions_run_on_the_session_core(adapter):
    """A plain session's per-packet calls are its SessionCore's own methods (the C type when built, the
    Python twin with WIRETUN_NO_SPEEDUPS=1): one call each. Batch and per-packet calls share its state:
    packets received in a batch are released one by one, out of order, and the ring empties."""
    from wiretun.linux import engine

    with adapter.start_session(SMALL) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        core = s._backend._core
        assert type(core) is engine.SessionCore
        assert s.try_receive_packet == core.receive_packet
        assert s.release_receive_packet == core.release_receive_packet
        assert s.allocate_send_packet == core.allocate_send_packet
        assert s.send_packet == core.send_packet
        time.sleep(0.2)
        while (p := s.try_receive_packet()) is not None:  # link-up chatter
            s.release_receive_packet(p)
        for i in range(6):
            sock.sendto(struct.pack("!I", i) + bytes(60), (V4_PEER, 9))
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 6 and time.monotonic() < deadline:
            for p in s.receive_packets(64):
                if p[0] >> 4 == 4 and p[9] == 17:  # our UDP datagrams; anything else goes back at once
                    got.append(p)
                else:
                    s.release_receive_packet(p)
            s.wait(0.2)
        assert [struct.unpack_from("!I", p, 28)[0] for p in got] == list(range(6))
        ring = s._backend._rx
        for i in (3, 1, 5, 0, 2):
            s.release_receive_packet(got[i])
        assert ring.head != 0  # packet 4, still held, pins Head at its record
        s.release_receive_packet(got[4])
        assert ring.head == ring.tail == REWIND_OFFSET  # all back: the ring rewound
        with pytest.raises(InvalidParameter):
            s.release_receive_packet(got[4])
        assert core.received == 0
    with adapter.start_session(SMALL, offload=True) as s:
        assert s._backend._core is None
