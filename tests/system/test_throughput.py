"""Offload sessions, batches, multi-queue, asyncio and capture on real TUN adapters; a benchmark smoke run.

Each test runs in its own network namespace (``netns``, entered by the test thread; ``make_netns`` for a
second one). The namespace's kernel is the far side: its sockets send through the adapter (addresses in
198.18.0.0/15, the benchmarking range, and fd00:18::/64) and receive what the session sends. Every check
is on exact bytes, header fields, addresses or counts, and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests import netns as _netns
from wiretun import offload as O
from wiretun import packet as P
from wiretun.adapter import Adapter
from wiretun.capture import LINKTYPE_RAW, read_pcap
from wiretun.errors import BufferOverflow, EndOfFile, InvalidParameter
from wiretun.linux import tun
from wiretun.session import Session

LOCAL4, PEER4 = "198.18.0.1", "198.18.0.2"
LOCAL6, PEER6 = "fd00:18::1", "fd00:18::2"
CAP = 0x400000
ROOT = Path(__file__).resolve().parents[2]
UDP_SEGMENT = 103  # socket option (linux/udp.h)
BASE_OFFLOADS = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6
USO = tun.TUN_F_USO4 | tun.TUN_F_USO6


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def make_adapter(name: str = "wtp0") -> Adapter:
    a = Adapter.create(name, "Throughput")
    try:
        a.add_address(f"{LOCAL4}/24")
        a.add_address(f"{LOCAL6}/64")
        a.up()
    except BaseException:
        a.close()
        raise
    return a


@pytest.fixture
def adapter(netns):
    a = make_adapter()
    try:
        yield a
    finally:
        a.close()


def drain(session: Session, want, *, timeout: float = 3.0, limit: int = 2000, headers: bool = False):
    """Receive until ``want(collected)`` is true (or ``timeout``); returns copies (with headers)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < limit and not want(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        hdrs: list[bytes] = []
        batch = session.receive_packets(64, block=True, timeout=min(left, 0.2), headers=hdrs)
        for i, view in enumerate(batch):
            item = bytes(view)
            if _is_noise(item):
                continue
            got.append((item, O.VirtioNetHeader.unpack_from(hdrs[i])) if headers else item)
        session.release_receive_packets(batch)
    return got


def _is_noise(pkt: bytes) -> bool:
    """IPv6 router solicitations and MLD reports the kernel sends on its own."""
    return pkt[0] >> 4 == 6 and pkt[6] in (58, 0)


def payload(pkt, info: P.PacketInfo) -> bytes:
    return bytes(pkt[info.payload_offset : info.total_length])


def udp_payloads(pkts: list[bytes]) -> list[bytes]:
    out = []
    for p in pkts:
        info = P.parse(p)
        if info.protocol == P.PROTO_UDP:
            out.append(payload(p, info))
    return out


# --------------------------------------------------------------------------------------------------
# offload sessions


def test_offload_session_negotiates_offloads(adapter):
    with adapter.start_session(CAP, offload=True) as s:
        assert s.offload is True
        assert s.offloads & BASE_OFFLOADS == BASE_OFFLOADS
        if _kernel_at_least(6, 2):
            assert s.offloads & USO == USO  # this kernel takes UDP segmentation offload too
    with adapter.start_session(CAP) as s:
        assert s.offload is False and s.offloads == 0


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_uso_super_packet_arrives_whole_with_its_header(adapter, v6):
    if not _kernel_at_least(6, 2):
        pytest.skip("USO needs Linux 6.2")
    data = bytes(range(256)) * 39 + b"tail"  # 9988 bytes: 9 segments of 1100 and one of 88
    with adapter.start_session(CAP, offload=True) as s:
        fam, dst = (socket.AF_INET6, PEER6) if v6 else (socket.AF_INET, PEER4)
        with socket.socket(fam, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1100)
            sock.sendto(data, (dst, 4242))
            sport = sock.getsockname()[1]
        (pkt, hdr), = drain(s, lambda g: len(g) >= 1, headers=True)
        ip_len = 40 if v6 else 20
        assert len(pkt) == ip_len + 8 + len(data)  # one read, bigger than the MTU
        assert hdr.gso_type == O.GSO_UDP_L4 and hdr.gso_size == 1100
        assert hdr.flags & O.F_NEEDS_CSUM and (hdr.csum_start, hdr.csum_offset) == (ip_len, 6)
        parts = O.split_packets(hdr, pkt)
        assert len(parts) == 10
        assert all(P.verify_checksums(p) for p in parts)
        infos = [P.parse(p) for p in parts]
        assert {(i.src_port, i.dst_port) for i in infos} == {(sport, 4242)}
        assert b"".join(payload(p, i) for p, i in zip(parts, infos)) == data


def test_packet_header_for_single_receive(adapter):
    if not _kernel_at_least(6, 2):
        pytest.skip("USO needs Linux 6.2")
    with adapter.start_session(CAP, offload=True) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 500)
        sock.sendto(b"q" * 1500, (PEER4, 9))
        deadline = time.monotonic() + 10  # early exit: generous for a loaded machine
        while time.monotonic() < deadline:
            view = s.wait_receive_packet(0.5)
            if view is None or _is_noise(bytes(view[:8])):
                if view is not None:
                    s.release_receive_packet(view)
                continue
            hdr = s.packet_header(view)
            assert (hdr.gso_type, hdr.gso_size, len(view)) == (O.GSO_UDP_L4, 500, 1528)
            s.release_receive_packet(view)
            with pytest.raises(InvalidParameter):
                s.packet_header(view)  # released: no longer a packet of this session
            break
        else:
            pytest.fail("no packet")


def test_offload_ring_full_drops_and_recovers(adapter):
    """Super-packets held unreleased fill a small ring: later ones are dropped whole and counted, the
    ones kept stay intact, and releasing makes room again."""
    if not _kernel_at_least(6, 2):
        pytest.skip("USO needs Linux 6.2")
    with adapter.start_session(0x20000, offload=True) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1000)
        for i in range(8):
            sock.sendto(bytes([65 + i]) * 30000, (PEER4, 6400))
        held: list[memoryview] = []
        hdrs: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(held) + s.receive_dropped < 8:
            held += s.receive_packets(64, block=True, timeout=0.2, headers=hdrs)
        udp = [(v, h) for v, h in zip(held, hdrs) if not _is_noise(bytes(v[:8]))]
        assert 0 < len(udp) < 8 and s.receive_dropped >= 8 - len(udp)  # 30 KB each, 128 KiB ring
        for i, (view, header) in enumerate(udp):
            assert len(view) == 30028 and bytes(view[28:]) == bytes([65 + i]) * 30000
            assert O.VirtioNetHeader.unpack_from(header).gso_size == 1000
        s.release_receive_packets(held)
        sock.sendto(b"Z" * 30000, (PEER4, 6400))
        (again,) = [p for p in drain(s, lambda g: len(g) >= 1) if len(p) == 30028]
        assert again[28:] == b"Z" * 30000


def test_sessions_sharing_an_adapter_must_agree_on_offload(adapter):
    """TUNSETOFFLOAD acts on the device: a queue that disagrees with those attached is refused, cleanly."""
    with adapter.start_session(CAP, multi_queue=True, offload=True) as off:
        with pytest.raises(InvalidParameter, match="offload=True"):
            adapter.start_session(CAP, multi_queue=True)
        assert adapter._backend.attached_queues() == 1  # the refused session left no queue behind
        with adapter.start_session(CAP, multi_queue=True, offload=True) as off2:
            assert off2.offloads == off.offloads
            assert adapter._backend.attached_queues() == 2
    with adapter.start_session(CAP, multi_queue=True) as plain:
        with pytest.raises(InvalidParameter, match="offload=False"):
            adapter.start_session(CAP, multi_queue=True, offload=True)
        assert plain.offloads == 0 and adapter._backend.attached_queues() == 1
    with adapter.start_session(CAP, offload=True) as alone:  # alone it may choose again
        assert alone.offloads & BASE_OFFLOADS == BASE_OFFLOADS


def test_send_coalesced_udp_with_header(adapter):
    with adapter.start_session(CAP, offload=True) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL4, 6000))
        sock.settimeout(3)
        datagrams = [P.ipv4_udp(PEER4, LOCAL4, 7000, 6000, bytes([i]) * 700) for i in range(8)]
        frames = O.coalesce(datagrams, udp=True)
        assert len(frames) == 1 and frames[0].count == 8
        assert s.send_packets([frames[0].packet], headers=[frames[0].header]) == 1
        received = [sock.recv(2000) for _ in range(8)]
        assert received == [bytes([i]) * 700 for i in range(8)]


def test_send_packet_with_header_object(adapter):
    with adapter.start_session(CAP, offload=True) as s, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL6, 6001))
        sock.settimeout(3)
        datagrams = [P.ipv6_udp(PEER6, LOCAL6, 7001, 6001, bytes([65 + i]) * 1000) for i in range(3)]
        (frame,) = O.coalesce(datagrams, udp=True)
        view = s.allocate_send_packet(len(frame.packet))
        view[:] = frame.packet
        s.send_packet(view, header=O.VirtioNetHeader.unpack_from(frame.header))
        assert [sock.recv(2000) for _ in range(3)] == [bytes([65 + i]) * 1000 for i in range(3)]


def test_queued_packets_keep_their_headers(adapter, tmp_path):
    """Packets that wait in the send ring (behind an earlier allocation) go out with their own headers."""
    path = tmp_path / "queued.pcap"
    with adapter.start_session(CAP, offload=True, capture=path) as s, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL4, 6002))
        sock.settimeout(3)
        first = P.ipv4_udp(PEER4, LOCAL4, 7002, 6002, b"first")
        view = s.allocate_send_packet(len(first))
        view[:] = first
        (frame,) = O.coalesce([P.ipv4_udp(PEER4, LOCAL4, 7002, 6002, bytes([48 + i]) * 900) for i in range(4)],
                              udp=True)
        plain = P.ipv4_udp(PEER4, LOCAL4, 7002, 6002, b"last")
        assert s.send_packets([frame.packet, plain], headers=[frame.header, None]) == 2  # queued
        with pytest.raises(TimeoutError):
            sock.settimeout(0.1)
            sock.recv(100)  # nothing leaves before the earlier allocation is sent
        sock.settimeout(3)
        s.send_packet(view)
        got = [sock.recv(2000) for _ in range(6)]
        assert got == [b"first"] + [bytes([48 + i]) * 900 for i in range(4)] + [b"last"]
    assert [len(r.data) for r in read_pcap(path).records] == [len(first), len(frame.packet), len(plain)]


def test_header_arguments_are_checked(adapter):
    with adapter.start_session(CAP, offload=True) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL4, 6003))
        sock.settimeout(3)
        pkt = P.ipv4_udp(PEER4, LOCAL4, 1, 6003, b"x")
        with pytest.raises(InvalidParameter, match="10"):
            s.send_packets([pkt], headers=[b"\0" * 9])
        with pytest.raises(InvalidParameter, match="headers"):
            s.send_packets([pkt, pkt], headers=[bytes(10)])
        with pytest.raises(InvalidParameter, match="gso_size 70000 is out of range 0..65535"):
            s.send_packets([pkt], headers=[O.VirtioNetHeader(gso_size=70000)])
        # A bad header on an allocated packet drops that packet: nothing waits behind it for ever.
        view = s.allocate_send_packet(len(pkt))
        view[:] = pkt
        with pytest.raises(InvalidParameter, match="dropped"):
            s.send_packet(view, header=b"short")
        assert s.send_dropped == 1
        s.send_packets([P.ipv4_udp(PEER4, LOCAL4, 1, 6003, b"after")])
        assert sock.recv(100) == b"after"
    with pytest.raises(InvalidParameter, match="offload"):
        adapter.start_session(CAP, offload="yes")


def test_timeouts_and_release_arguments_are_checked(adapter):
    with adapter.start_session(CAP) as s:
        for bad in ("1", -1, float("nan"), True):
            with pytest.raises(InvalidParameter, match="timeout"):
                s.wait(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidParameter, match="timeout"):
                s.wait_receive_packet(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidParameter, match="timeout"):
                s.receive_packets(block=True, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidParameter, match="list of received packets"):
            s.release_receive_packets(42)  # type: ignore[arg-type]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"r", (PEER4, 9))
        got: list[memoryview] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = s.receive_packets(8, block=True, timeout=0.2)
        s.release_receive_packets(iter(got))  # any iterable of them
        assert s._backend._rx.head == s._backend._rx.tail


def test_a_bad_item_stops_the_whole_batch(adapter):
    """send_packets checks every item first: nothing of a batch with a bad item goes out."""
    import array

    with adapter.start_session(CAP) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL4, 6004))
        sock.settimeout(0.3)
        good = [P.ipv4_udp(PEER4, LOCAL4, 1, 6004, b"p%d" % i) for i in range(3)]  # 30 bytes each
        with pytest.raises(InvalidParameter, match="packet 2 is 0 bytes"):
            s.send_packets([good[0], good[1], b"", good[2]])
        with pytest.raises(InvalidParameter, match="packet 1 is 80000 bytes"):
            s.send_packets([good[0], array.array("H", bytes(80000))])  # 40000 items, 80000 bytes
        with pytest.raises(InvalidParameter, match="packet 0 is not a bytes-like object"):
            s.send_packets([42])
        with pytest.raises(InvalidParameter, match="iterable"):
            s.send_packets(None)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            sock.recv(100)  # none of those batches sent anything
        wide = memoryview(bytearray(good[1])).cast("H")  # 15 items of 2 bytes
        assert s.send_packets(iter([good[0], wide])) == 2  # any iterable; wider items counted in bytes
        sock.settimeout(3)
        assert [sock.recv(100), sock.recv(100)] == [b"p0", b"p1"]


def _forward(src: Session, dst: Session, stop: threading.Event, seen: list[int]) -> None:
    hdrs: list[bytes] = []
    try:
        while not stop.is_set():
            pkts = src.receive_packets(64, block=True, timeout=0.1, headers=hdrs)
            if pkts:
                for h in hdrs:
                    if h[1]:
                        seen.append(h[1])
                dst.send_packets(pkts, headers=hdrs)
                src.release_receive_packets(pkts)
                hdrs.clear()
    except EndOfFile:
        pass


def test_offload_forwarding_carries_tcp_between_namespaces(netns, make_netns):
    """The benchmark's shape: TSO super-packets pass from one adapter to the other, header and all."""
    other = make_netns()
    a = Adapter.create("fwa", "Throughput")
    with _netns.entered(other):
        b = Adapter.create("fwb", "Throughput")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        for ad, addr in ((a, LOCAL4), (b, PEER4)):
            ad.add_address(f"{addr}/24")
            ad.up()
        sa, sb = a.start_session(0x2000000, offload=True), b.start_session(0x2000000, offload=True)
        seen_ab: list[int] = []
        seen_ba: list[int] = []
        threads = [threading.Thread(target=_forward, args=(sa, sb, stop, seen_ab)),
                   threading.Thread(target=_forward, args=(sb, sa, stop, seen_ba))]
        for t in threads:
            t.start()
        with _netns.entered(other):
            server = socket.create_server((PEER4, 7100))
        server.settimeout(5)
        data = os.urandom(1 << 21)
        result: dict = {}

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                h = hashlib.sha256()
                total = 0
                while total < len(data):
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    h.update(chunk)
                    total += len(chunk)
                result["digest"], result["total"] = h.hexdigest(), total

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection((PEER4, 7100), timeout=5) as c:
            c.sendall(data)
        t.join(10)
        server.close()
        assert result == {"digest": hashlib.sha256(data).hexdigest(), "total": len(data)}
        assert O.GSO_TCPV4 in seen_ab, "no TSO super-packet crossed from A to B"
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------------
# multi-queue


def _flows(count: int, per_flow: int, dst: str = PEER4, port: int = 5555) -> dict[int, int]:
    """``count`` UDP flows (source ports) of ``per_flow`` datagrams each; returns {source port: count}."""
    sent: dict[int, int] = {}
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind((LOCAL4, 0))
            for i in range(per_flow):
                sock.sendto(b"flow%d" % i, (dst, port))
            sent[sock.getsockname()[1]] = per_flow
    finally:
        for sock in socks:
            sock.close()
    return sent


def _sources(pkts: list[bytes], port: int = 5555) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in pkts:
        info = P.parse(p)
        if info.protocol == P.PROTO_UDP and info.dst_port == port:
            out[info.src_port] = out.get(info.src_port, 0) + 1
    return out


def test_two_queues_both_carry_traffic(adapter):
    s1 = adapter.start_session(CAP, multi_queue=True)
    s2 = adapter.start_session(CAP, multi_queue=True)
    try:
        assert adapter._backend.attached_queues() == 2
        sent = _flows(64, 4)
        want = sum(sent.values())
        got1: list[bytes] = []
        got2: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(_flatten(got1, got2)) < want and time.monotonic() < deadline:
            got1 += drain(s1, lambda g: False, timeout=0.05)
            got2 += drain(s2, lambda g: False, timeout=0.05)
        q1, q2 = _sources(got1), _sources(got2)
        assert q1 and q2, f"one queue got everything: {len(q1)} and {len(q2)} flows"
        assert not set(q1) & set(q2), "a flow was split across queues"
        assert {**q1, **q2} == sent  # every datagram of every flow, exactly once
    finally:
        s1.end()
        s2.end()


def _flatten(*lists: list[bytes]) -> list[bytes]:
    return [p for lst in lists for p in lst if P.parse(p).protocol == P.PROTO_UDP]


CHILD = r"""
import sys, time
from wiretun import packet as P
from wiretun.adapter import Adapter
a = Adapter.open(sys.argv[1])
s = a.start_session(0x400000, multi_queue=True)
print("ready", flush=True)
sources = {}
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    for v in s.receive_packets(64, block=True, timeout=0.1):
        info = P.parse(bytes(v))
        if info.protocol == P.PROTO_UDP and info.dst_port == 5555:
            sources[info.src_port] = sources.get(info.src_port, 0) + 1
        s.release_receive_packet(v)
    if sum(sources.values()) and sys.stdin in __import__("select").select([sys.stdin], [], [], 0)[0]:
        break
print(" ".join(f"{k}:{v}" for k, v in sources.items()), flush=True)
s.end()
a.close()
"""


def test_a_queue_in_another_process(adapter, netns):
    """A second process opens the adapter by name and owns its own queue; flows spread over both."""
    child = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CHILD, adapter.name, "8"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    s = None
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        s = adapter.start_session(CAP, multi_queue=True)
        sent = _flows(64, 3)
        # Ours arrive within the drain; the child reads its share meanwhile and reports on "stop".
        mine = drain(s, lambda g: False, timeout=1.0)
        out, err = child.communicate("stop\n", timeout=15)
        theirs = {int(k): int(v) for k, v in (kv.split(":") for kv in out.split())}
        ours = _sources(mine)
        assert ours and theirs, f"ours={len(ours)} flows, theirs={len(theirs)} flows; {err}"
        assert not set(ours) & set(theirs)
        assert {**ours, **theirs} == sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        if s is not None:
            s.end()


# --------------------------------------------------------------------------------------------------
# asyncio


def test_async_for_and_awaitable_send_echo(adapter):
    """An echo server in asyncio: ``async for`` over received datagrams, ``await send`` of replies."""
    threads_before = threading.active_count()

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        s = adapter.start_session(CAP)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCAL4, 0))
        sock.setblocking(False)
        port = sock.getsockname()[1]

        async def echo() -> int:
            n = 0
            async for pkt in s.packets():
                info = P.parse(pkt)
                if info.protocol == P.PROTO_UDP and info.dst_port == 7:
                    reply = P.ipv4_udp(PEER4, LOCAL4, 7, info.src_port, payload(pkt, info).upper())
                    await s.send(reply)
                    n += 1
                s.release_receive_packet(pkt)
            return n

        task = asyncio.create_task(echo())
        await asyncio.sleep(0.1)  # the echo task is now asleep on the read-wait handle
        assert threading.active_count() == threads_before
        replies = []
        for i in range(20):
            await loop.sock_sendto(sock, b"ping %d" % i, (PEER4, 7))
            replies.append(await asyncio.wait_for(loop.sock_recv(sock, 100), 3))
        s.end()  # ends the async for
        assert await asyncio.wait_for(task, 3) == 20
        sock.close()
        assert port
        return replies

    replies = asyncio.run(main())
    assert replies == [b"PING %d" % i for i in range(20)]


def test_async_receive_waiters_and_cancellation(adapter):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = adapter.start_session(CAP)
        fd = s.get_read_wait_event()
        # A cancelled waiter leaves nothing registered with the loop.
        waiter = asyncio.create_task(s.receive())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert loop.remove_reader(fd) is False
        # Two concurrent receivers both wake and between them get both datagrams.
        r1 = asyncio.create_task(_receive_udp(s))
        r2 = asyncio.create_task(_receive_udp(s))
        await asyncio.sleep(0.05)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"one", (PEER4, 9))
            sock.sendto(b"two", (PEER4, 9))
        got = await asyncio.wait_for(asyncio.gather(r1, r2), 3)
        assert sorted(got) == [b"one", b"two"]
        # Ending the session wakes a sleeping receiver with EndOfFile.
        r3 = asyncio.create_task(s.receive())
        await asyncio.sleep(0.05)
        s.end()
        with pytest.raises(EndOfFile):
            await asyncio.wait_for(r3, 1)

    asyncio.run(main())


async def _receive_udp(s: Session) -> bytes:
    for _ in range(50):
        pkt = await s.receive()
        data = bytes(pkt)
        s.release_receive_packet(pkt)
        info = P.parse(data)
        if info.protocol == P.PROTO_UDP:
            return payload(data, info)
    raise AssertionError("no UDP datagram among 50 packets")


def test_async_for_break_releases_the_rest_of_the_batch(adapter):
    async def main() -> None:
        s = adapter.start_session(0x20000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(10):
                sock.sendto(b"%d" % i, (PEER4, 9))
        await asyncio.sleep(0.05)
        async with _aclosing(s.packets(batch=64)) as it:
            async for pkt in it:
                s.release_receive_packet(pkt)
                break
        # Everything taken in that batch was released: the ring is empty again.
        assert s._backend._rx.head == s._backend._rx.tail
        s.end()

    asyncio.run(main())


def test_async_send_on_a_ring_full_of_allocations_is_buffer_overflow(adapter):
    """Nothing to wait for when the ring holds only packets their owner has not sent: fail, do not spin."""
    async def main() -> None:
        s = adapter.start_session(0x20000)
        held = []
        with pytest.raises(BufferOverflow):
            for _ in range(200):
                held.append(s.allocate_send_packet(1400))
        pkt = P.ipv4_udp(PEER4, LOCAL4, 1, 9, bytes(1372))  # 1400 bytes: no room left for it
        with pytest.raises(BufferOverflow, match="allocated"):
            await asyncio.wait_for(s.send(pkt), 1)
        s.end()
        with pytest.raises(EndOfFile):
            await s.send(pkt)

    asyncio.run(main())


class _aclosing:
    def __init__(self, agen) -> None:
        self.agen = agen

    async def __aenter__(self):
        return self.agen

    async def __aexit__(self, *exc) -> None:
        await self.agen.aclose()


# --------------------------------------------------------------------------------------------------
# capture


def _tcpdump(path: Path) -> list[str]:
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "link-type RAW" in out.stderr
    return out.stdout.splitlines()


def _tshark(path: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("tcpdump") is None or shutil.which("tshark") is None,
                    reason="needs tcpdump and tshark")
def test_capture_records_received_and_sent_packets(adapter, tmp_path):
    path = tmp_path / "session.pcap"
    s = adapter.start_session(CAP, capture=path)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOCAL4, 6100))
            sock.settimeout(3)
            for i in range(3):
                sock.sendto(b"in%d" % i, (PEER4, 6200))
            got = drain(s, lambda g: len(udp_payloads(g)) >= 3)
            assert udp_payloads(got) == [b"in0", b"in1", b"in2"]
            s.send_packets([P.ipv4_udp(PEER4, LOCAL4, 6200, 6100, b"out%d" % i) for i in range(2)])
            assert [sock.recv(100) for _ in range(2)] == [b"out0", b"out1"]
    finally:
        s.end()  # flushes and closes the file
    pcap = read_pcap(path)
    assert pcap.linktype == LINKTYPE_RAW
    udp_lines = [line for line in _tcpdump(path) if "UDP" in line]
    assert len(udp_lines) == 5
    assert sum(f"{LOCAL4}.6100 > {PEER4}.6200" in line for line in udp_lines) == 3
    assert sum(f"{PEER4}.6200 > {LOCAL4}.6100" in line for line in udp_lines) == 2
    rows = [r for r in _tshark(path, "ip.src", "ip.dst", "udp.srcport", "data.data") if r[2]]
    assert rows == [
        [LOCAL4, PEER4, "6100", b"in0".hex()], [LOCAL4, PEER4, "6100", b"in1".hex()],
        [LOCAL4, PEER4, "6100", b"in2".hex()],
        [PEER4, LOCAL4, "6200", b"out0".hex()], [PEER4, LOCAL4, "6200", b"out1".hex()],
    ]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_capture_keeps_super_packets_whole(adapter, tmp_path):
    if not _kernel_at_least(6, 2):
        pytest.skip("USO needs Linux 6.2")
    path = tmp_path / "offload.pcap"
    with adapter.start_session(CAP, offload=True, capture=str(path)) as s:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1200)
            sock.sendto(b"S" * 30000, (PEER4, 6300))
        got = drain(s, lambda g: len(g) >= 1)
        assert [len(p) for p in got] == [30028]
        (frame,) = O.coalesce([P.ipv4_udp(PEER4, LOCAL4, 6300, 6301, b"T" * 1000) for _ in range(5)], udp=True)
        s.send_packets([frame.packet], headers=[frame.header])
    rows = [r for r in _tshark(path, "frame.len", "frame.cap_len", "ip.src") if r[2]]
    assert rows == [["30028", "30028", LOCAL4], ["5028", "5028", PEER4]]


class _FullDisk(io.RawIOBase):
    """A file that takes the pcap file header and then fails like a full disk."""

    def __init__(self) -> None:
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)


def test_failing_capture_file_stops_capture_not_packets(adapter):
    with adapter.start_session(CAP, capture=_FullDisk()) as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(3):
            sock.sendto(b"c%d" % i, (PEER4, 6500))
        got = drain(s, lambda g: len(udp_payloads(g)) >= 3)
        assert udp_payloads(got) == [b"c0", b"c1", b"c2"]
        assert s.capture is None  # stopped (and logged) at the first failed write


def test_capture_argument_is_checked(adapter, tmp_path):
    with pytest.raises(InvalidParameter, match="capture"):
        adapter.start_session(CAP, capture=tmp_path / "no-such-dir" / "x.pcap")
    with pytest.raises(InvalidParameter, match="capture"):
        adapter.start_session(CAP, capture=42)
    # The failed starts left no session behind.
    with adapter.start_session(CAP) as s:
        assert not s.ended


# --------------------------------------------------------------------------------------------------
# the benchmark runs


def test_forwarding_benchmark_smoke(tmp_path):
    """bench/forward.py for one second per run: every forwarder starts, moves TCP, and cleans up."""
    if shutil.which("iperf3") is None or shutil.which("gcc") is None:
        pytest.skip("needs iperf3 and gcc")
    kinds = ["wiretun plain", "wiretun per-packet", "wiretun offload", "C plain", "C offload"]
    if subprocess.run([sys.executable, "-c", "import pytun"], capture_output=True).returncode == 0:
        kinds.insert(0, "python-pytun")
    tag = uuid.uuid4().hex[:6]  # this run's namespaces (others may run benchmarks meanwhile)
    report = tmp_path / "forward.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "forward.py"), "--seconds", "1", "--no-udp", "--rounds", "1",
         "--only", ",".join(kinds), "--json", str(report)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "WIRETUN_NETNS_TAG": tag},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {kind: line[len(kind):].split() for line in out.stdout.splitlines() for kind in kinds
            if line.startswith(kind + " ")}
    assert set(rows) == set(kinds), out.stdout
    for kind, cells in rows.items():
        assert float(cells[0]) > 0, f"{kind} moved nothing: {out.stdout}"
    # No throughput target here (benchmarks are not timed tests), but the report must be true to itself
    # and the forwarders must have run as labelled.
    results = {r["kind"]: r for r in json.loads(report.read_text())}
    assert set(results) == set(kinds)
    for kind in ("wiretun offload", "C offload"):
        flags = int(results[kind]["offloads"], 16)
        assert flags & 0x03 == 0x03, f"{kind} did not negotiate checksum + TSO4: {results[kind]['offloads']}"
        assert results[kind]["tcp_read_avg"] > 1500, f"{kind} read no super-packets: {results[kind]}"
    for kind in ("wiretun plain", "wiretun per-packet", "C plain"):
        assert int(results[kind]["offloads"], 16) == 0, results[kind]
        assert results[kind]["tcp_read_avg"] <= 1500 + 10, f"{kind} read more than an MTU: {results[kind]}"
    ratio = results["wiretun offload"]["tcp_bps"] / results["C offload"]["tcp_bps"]
    line = re.search(r"^target wiretun offload >= 0\.8x C offload \(TCP\): ([\d.]+)x (met|NOT met)$",
                     out.stdout, re.M)
    assert line, out.stdout
    assert line.group(1) == f"{ratio:.2f}" and (line.group(2) == "met") == (ratio >= 0.8), (line.group(0), ratio)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [n for n in after if f"{tag}-" in n], "benchmark namespaces left behind"
