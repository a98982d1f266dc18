"""The session system tests, a second time: wiretun.Adapter / Session on the Windows backend, through the
wintun.dll binding and its shim, over the Linux stand-in (tests/windows/standin/wintun_standin.c).

The backend is selected as on Windows (``wiretun._backend``'s platform is ``wiretun.windows``); the
stand-in's adapters are TUN devices in the test's own namespace, configured by LUID through an IpConfig
that runs Linux's ``ip`` (linux_ip.py) where Windows would use the IP Helper API. Every check is on exact
bytes, addresses and counts; the ring semantics (release in any order, the full ring) are the DLL's,
seen through what arrives.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
import subprocess
import threading
import time
from typing import Any

import pytest

import wiretun
from wiretun import _backend, packet
from wiretun.adapter import Adapter
from wiretun.errors import BufferOverflow, Busy, EndOfFile, InvalidParameter, NoMoreItems, NotSupported
from wiretun.ring import RELEASE_BIT, record_size
from wiretun.session import Session
from wiretun.windows import wintun_dll
from wiretun.windows.session import WintunSession

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

SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h (Python's socket module lacks them)


@pytest.fixture
def adapter(netns, windows_backend):
    yield from make_adapter()


# ----------------------------------------------------------------------------- the backend in use


def test_the_windows_backend_and_the_standin_are_in_use(adapter, standin_path):
    assert _backend.platform() is __import__("wiretun.windows").windows
    assert wintun_dll.load().path == str(standin_path)
    assert adapter.luid == socket.if_nametoindex("wts0")
    assert adapter.get_name() == "wts0" and adapter.kernel_name == "wts0"
    assert wiretun.get_running_driver_version() == 14  # 0.14
    with adapter.start_session() as s:
        assert isinstance(s._backend, WintunSession)
        assert adapter.is_up_now()  # up while the session runs, as Wintun's media state
    assert not adapter.is_up_now()


# ----------------------------------------------------------------------------- kernel <-> session


def test_kernel_echo_reply_arrives_with_exact_bytes(adapter):
    with adapter.start_session(0x400000) as s:
        request = packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, ident=0x1234, seq=7, payload=b"wiretun ping", ttl=64)
        send(s, request)
        reply = receive_matching(s, is_v4(packet.PROTO_ICMP, V4_PEER))
        icmp = packet.ipv4_icmp_echo(V4_LOCAL, V4_PEER, 0x1234, 7, b"wiretun ping", request=False)[20:]
        assert reply == v4_expected(reply, icmp, V4_LOCAL, V4_PEER, packet.PROTO_ICMP)
        assert packet.verify_checksums(reply)


def test_kernel_icmpv6_echo_reply_arrives_with_exact_bytes(adapter):
    with adapter.start_session() as s:
        request = packet.ipv6_icmp_echo(V6_PEER, V6_LOCAL, ident=0x77, seq=3, payload=b"v6 ping")
        # The link came up with the session a moment ago; IPv6 brings its address into use from a work
        # queue, so the first requests may be dropped: send again until a reply comes (at most 6 times).
        for _ in range(6):
            send(s, request)
            try:
                reply = receive_matching(s, is_v6(packet.PROTO_ICMPV6, packet.ICMPV6_ECHO_REPLY), 0.5)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("no ICMPv6 echo reply to six requests")
        icmp = packet.ipv6_icmp_echo(V6_LOCAL, V6_PEER, 0x77, 3, b"v6 ping", request=False)[40:]
        assert reply == v6_expected(reply, icmp, V6_LOCAL, V6_PEER, packet.PROTO_ICMPV6)


def test_udp_both_ways_byte_for_byte(adapter):
    payload = bytes(range(256)) * 3
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6000))
        sock.settimeout(3)
        sock.sendto(payload, (V4_PEER, 5000))
        got = receive_matching(s, is_v4(packet.PROTO_UDP, V4_PEER))
        udp = packet.ipv4_udp(V4_LOCAL, V4_PEER, 6000, 5000, payload)
        assert got == v4_expected(got, udp[20:], V4_LOCAL, V4_PEER, packet.PROTO_UDP)
        send(s, packet.ipv4_udp(V4_PEER, V4_LOCAL, 5000, 6000, payload[::-1]))
        assert sock.recvfrom(2000) == (payload[::-1], (V4_PEER, 5000))


def test_batch_forms_and_iterator(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((V4_LOCAL, 6100))
        sock.settimeout(3)
        datagrams = [packet.ipv4_udp(V4_PEER, V4_LOCAL, 7100 + i, 6100, b"batch %d" % i) for i in range(10)]
        assert s.send_packets([bytearray(d) for d in datagrams[:5]] + [memoryview(d) for d in datagrams[5:]]) == 10
        assert sorted(sock.recvfrom(100) for _ in range(10)) == sorted(
            (b"batch %d" % i, (V4_PEER, 7100 + i)) for i in range(10)
        )
        for i in range(10):
            sock.sendto(b"out %d" % i, (V4_PEER, 5000 + i))
        got: list[bytes] = []
        headers: list[Any] = []
        deadline = time.monotonic() + 3
        while len(got) < 10 and time.monotonic() < deadline:
            s.wait(0.5)
            batch = s.receive_packets(64, headers=headers) if _takes_headers(s) else s.receive_packets(64)
            got += [bytes(p) for p in batch if is_v4(packet.PROTO_UDP, V4_PEER)(p)]
            s.release_receive_packets(batch)
        assert [p[28:] for p in got] == [b"out %d" % i for i in range(10)]
        assert all(h == bytes(10) for h in headers)
        iterator_ends_with_the_session(s, sock)


def _takes_headers(s: Session) -> bool:
    import inspect

    return "headers" in inspect.signature(s.receive_packets).parameters


def test_empty_polls(adapter):
    with adapter.start_session() as s:
        drain(s)
        with pytest.raises(NoMoreItems) as e:
            s.receive_packet()
        assert e.value.code == 259
        assert s.try_receive_packet() is None
        assert s.receive_packets(64) == []
        t0 = time.monotonic()
        assert s.wait_receive_packet(0.2) is None
        assert 0.15 < time.monotonic() - t0 < 10.0  # never early; the upper bound only catches a hang


# ----------------------------------------------------------------------------- ring semantics (the DLL's)


def test_out_of_order_release_frees_space_only_from_head(adapter):
    """A 128 KiB receive ring holds 93 records of 1400-byte packets; the stand-in's driver drops what does
    not fit. Releasing a packet in the middle frees nothing; releasing the first frees it and the one after."""
    rec = record_size(1400)
    fit = (SMALL - 4) // rec
    assert fit == 93
    with adapter.start_session(SMALL) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        drain(s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

        def blast(first: int, count: int) -> None:
            for i in range(first, first + count):
                sock.sendto(struct.pack("!I", i) + bytes(1368), (V4_PEER, 9))

        def seqs(pkts: list[memoryview]) -> list[int]:
            return [struct.unpack_from("!I", p, 28)[0] for p in pkts]

        def settle() -> None:
            time.sleep(0.3)  # the stand-in's driver thread has taken (or dropped) every datagram by then

        blast(0, fit + 7)
        settle()
        held = s.receive_packets(fit + 7)
        assert len(held) == fit and all(len(p) == 1400 for p in held)
        assert seqs(held) == list(range(fit))  # the 7 that did not fit were dropped
        # Zero copy: the views are the DLL's ring itself, one TUN_PACKET record after another, each
        # behind its 4-byte Size.
        where = [address_of(p) for p in held]
        assert all(b - a == rec for a, b in zip(where, where[1:]))
        assert ctypes.c_uint32.from_address(where[0] - 4).value == 1400

        s.release_receive_packet(held[1])  # out of order: marked released, Head stays
        assert ctypes.c_uint32.from_address(where[1] - 4).value == RELEASE_BIT | 1400
        blast(1000, 1)
        settle()
        assert s.receive_packets(10) == []  # its space is not usable yet: dropped

        s.release_receive_packet(held[0])  # now Head moves over both
        blast(2000, 3)
        settle()
        more = s.receive_packets(10)
        assert seqs(more) == [2000, 2001]  # two records' worth came back; the third did not fit
        for p, seq in zip(more, (2000, 2001)):  # the first runs into the trailing bytes, the second wraps
            udp = packet.ipv4_udp(V4_LOCAL, V4_PEER, sock.getsockname()[1], 9, struct.pack("!I", seq) + bytes(1368))
            assert bytes(p) == v4_expected(bytes(p), udp[20:], V4_LOCAL, V4_PEER, packet.PROTO_UDP)
        s.release_receive_packets(held[2:])
        s.release_receive_packets(more)
        blast(3000, fit)
        settle()
        assert seqs(s.receive_packets(fit + 1)) == list(range(3000, 3000 + fit))  # all space is back


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_full_send_ring_is_buffer_overflow_and_nothing_else_breaks(adapter):
    full_send_ring(adapter, quiet=0.3, dropped=None)


def test_threads_receive_release_and_send_at_once(adapter):
    """Two receiving threads (releasing out of order, in batches) and two sending threads on one session:
    every datagram arrives exactly once each way; nothing is lost in a ring big enough for all of them."""
    count = 1500
    with adapter.start_session(0x400000) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inbound:
        drain(s)
        inbound.bind((V4_LOCAL, 6400))
        inbound.settimeout(5)
        # Room for every datagram at once, so that nothing but the session could lose one: the socket's
        # buffer (forced past rmem_max: the tests run as root) and the TUN device's queue.
        inbound.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        out.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
        subprocess.run(["ip", "link", "set", "dev", "wts0", "txqueuelen", str(4 * count)], check=True)
        seen: list[list[int]] = [[], []]
        errors: list[BaseException] = []

        def receiver(k: int) -> None:
            try:
                deadline = time.monotonic() + 10
                while len(seen[0]) + len(seen[1]) < count and time.monotonic() < deadline:
                    batch = s.receive_packets(16)
                    if not batch:
                        s.wait(0.1)
                        continue
                    for p in batch:
                        if is_v4(packet.PROTO_UDP, V4_PEER)(p):
                            seen[k].append(struct.unpack_from("!I", p, 28)[0])
                    s.release_receive_packets(batch[::-1])  # newest first: out of order
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def sender(k: int) -> None:
            try:
                for i in range(k, count, 2):
                    dgram = packet.ipv4_udp(V4_PEER, V4_LOCAL, 7400, 6400, struct.pack("!I", i) + bytes(60))
                    while True:
                        try:
                            buf = s.allocate_send_packet(len(dgram))
                            break
                        except BufferOverflow:
                            time.sleep(0.001)
                    buf[:] = dgram
                    s.send_packet(buf)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=receiver, args=(k,)) for k in (0, 1)]
        threads += [threading.Thread(target=sender, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for i in range(count):
            out.sendto(struct.pack("!I", i) + bytes(60), (V4_PEER, 9))
            if i % 100 == 99:
                time.sleep(0.005)  # let the receivers keep up with the kernel's queue
        got_in = sorted(struct.unpack_from("!I", inbound.recvfrom(2000)[0])[0] for _ in range(count))
        for t in threads:
            t.join(15)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert got_in == list(range(count))
        assert sorted(seen[0] + seen[1]) == list(range(count))


def test_bad_arguments_and_linux_only_options_are_clear_errors(adapter):
    for bad in (0x1000, 0x20001, 0x30000, 0x8000000, 0):
        with pytest.raises(InvalidParameter):
            adapter.start_session(bad)
    for option in ("multi_queue", "offload"):
        with pytest.raises(NotSupported) as e:
            adapter.start_session(**{option: True})
        assert option in str(e.value) and "Linux" in str(e.value)
    with pytest.raises(NotSupported):
        adapter.down()
    with pytest.raises(NotSupported):
        adapter.rename("other0")
    with adapter.start_session() as s:
        bad_session_arguments(s)
        buf = s.allocate_send_packet(28)
        buf[:] = packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 9, 9)
        with pytest.raises(NotSupported):
            s.send_packet(buf, header=b"\x01" + bytes(9))  # offload header: refused, still allocated
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


def test_linux_only_adapter_options_and_missing_calls(netns, windows_backend):
    for kwargs in ({"persistent": True}, {"owner": 0}, {"group": 0}):
        with pytest.raises(NotSupported) as e:
            Adapter.create("wts9", "SessionTest", **kwargs)
        assert "Linux" in str(e.value)
    with pytest.raises(NotSupported) as e2:
        Adapter.enumerate("SessionTest")
    assert "WintunEnumAdapters" in str(e2.value)


def test_packet_from_another_session_is_refused(adapter):
    with Adapter.create("wts1", "SessionTest") as other:
        other.add_address("10.9.9.1/24")
        with adapter.start_session() as s1, other.start_session() as s2:
            drain(s2)
            send(s2, packet.ipv4_icmp_echo("10.9.9.2", "10.9.9.1", 1, 1, b"other"))
            foreign = receive_matching_view(s2, is_v4(packet.PROTO_ICMP))
            with pytest.raises(InvalidParameter):
                s1.release_receive_packet(foreign)
            with pytest.raises(InvalidParameter):
                s1.release_receive_packets([foreign])
            with pytest.raises(InvalidParameter):
                s2.release_receive_packets([foreign, foreign])  # twice in one batch: none released
            assert bytes(foreign).endswith(b"other")
            s2.release_receive_packet(foreign)  # still releasable by its own session
            buf = s2.allocate_send_packet(20)
            with pytest.raises(InvalidParameter):
                s1.send_packet(buf)


def receive_matching_view(session: Session, match: Any, timeout: float = 3.0) -> memoryview:
    """As receive_matching, but the matching packet is returned unreleased."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pkt = session.wait_receive_packet(max(0.0, deadline - time.monotonic()))
        if pkt is None:
            continue
        if match(bytes(pkt)):
            return pkt
        session.release_receive_packet(pkt)
    raise AssertionError("no matching packet arrived")


def test_second_session_is_busy(adapter):
    s = adapter.start_session()
    with pytest.raises(Busy) as e:
        adapter.start_session()
    assert e.value.code == 170
    with Adapter.open("wts0") as other:  # another handle: the DLL says ERROR_ALREADY_INITIALIZED
        with pytest.raises(Busy):
            other.start_session()
    s.end()
    with adapter.start_session() as again:
        send(again, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 6, 6, b"again"))
        assert receive_matching(again, is_v4(packet.PROTO_ICMP)).endswith(b"again")


# ----------------------------------------------------------------------------- waiting and ending


def test_read_wait_event_with_select_and_asyncio(adapter):
    with adapter.start_session() as s:
        handle = s.get_read_wait_event()
        assert isinstance(handle, int)
        drain(s)
        s.wait(0)  # an auto-reset event may still hold a wake-up from before the drain: take it
        assert s.wait(0.05) is False
        send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 2, 2, b"waited"))
        assert s.wait(3)
        assert receive_matching(s, is_v4(packet.PROTO_ICMP)).endswith(b"waited")

        async def via_asyncio() -> bytes:
            send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 3, 3, b"asyncio"))
            while True:
                pkt = await asyncio.wait_for(s.receive(), 3)
                data = bytes(pkt)
                s.release_receive_packet(pkt)
                if is_v4(packet.PROTO_ICMP)(data):
                    return data

        assert not s.read_wait_selectable  # a Windows event HANDLE: asyncio waits in a worker thread
        assert asyncio.run(via_asyncio()).endswith(b"asyncio")

        async def async_send() -> None:
            await s.send(packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 4, 4, b"async send"))

        asyncio.run(async_send())
        assert receive_matching(s, is_v4(packet.PROTO_ICMP)).endswith(b"async send")


def test_ending_wakes_an_async_receiver(adapter):
    s = adapter.start_session()
    drain(s)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, s.end)
        async for p in s.packets():  # the iteration ends with the session
            s.release_receive_packet(p)
        return loop.time()

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 0.3 + 0.45  # woken by the end, not by the half-second slice


@pytest.mark.parametrize("how", ["receive", "select"])
@pytest.mark.parametrize("ender", ["end", "adapter.close"])
def test_ending_wakes_a_blocked_reader_at_once(adapter, how, ender):
    ending_wakes_a_blocked_reader(adapter, how, ender, "try_receive_packet")


def test_closing_the_adapter_ends_the_session_and_releases_held_views(adapter):
    s = adapter.start_session()
    send(s, packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 5, 5, b"held"))
    held = s.wait_receive_packet(3)
    assert held is not None
    buf = s.allocate_send_packet(100)
    adapter.close()
    assert s.ended
    # The DLL freed the ring: the views are released, not left pointing at freed memory.
    with pytest.raises(ValueError):
        bytes(held)
    with pytest.raises(ValueError):
        buf[0] = 1
    s.release_receive_packet(held)  # after the end: nothing happens
    s.send_packet(buf)
    r = subprocess.run(["ip", "link", "show", "dev", "wts0"], capture_output=True)
    assert r.returncode != 0  # the adapter is gone
    with pytest.raises(EndOfFile):
        s.try_receive_packet()


def test_deleting_the_device_underneath_gives_end_of_file(adapter):
    s = adapter.start_session()
    subprocess.run(["ip", "link", "del", "dev", "wts0"], check=True)
    assert s.wait(2)  # the stand-in's driver terminated the rings and set the event
    with pytest.raises(EndOfFile):
        while True:
            p = s.try_receive_packet()
            if p is not None:
                s.release_receive_packet(p)
    assert s.ended
    with pytest.raises(EndOfFile):
        s.allocate_send_packet(20)
    s.end()


def test_capture_records_both_directions(adapter, tmp_path):
    from wiretun.capture import read_pcap

    path = tmp_path / "wintun.pcap"
    with adapter.start_session(capture=str(path)) as s:
        drain(s)
        request = packet.ipv4_icmp_echo(V4_PEER, V4_LOCAL, 8, 8, b"captured")
        send(s, request)
        reply = receive_matching(s, is_v4(packet.PROTO_ICMP))
    records = [r.data for r in read_pcap(path).records]
    assert request in records and reply in records
    assert records.index(request) < records.index(reply)
