"""The offload data path of the WireGuard device, end to end: super-packets read from the TUN are split,
sealed and sent as UDP trains; trains are opened and coalesced back into super-packets. These tests prove
it is correct, not only fast: every byte of TCP streams (sha256 end to end) and every UDP datagram
(content checked, none twice) over IPv4 and IPv6 inner traffic, mixed MTUs, against Debian's
wireguard-go (no offloads) and wiretun itself, and through a relay of the test's own that reorders,
duplicates and drops datagrams. Memory stays bounded under a flood.

``WIREGUARD_GO_UPSTREAM=/path/to/wireguard-go`` adds current upstream wireguard-go (TUN offloads, UDP
GSO/GRO) as a peer kind for the same checks by hand; ``make test`` has Debian's only.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests import netns as _netns

from .wgutil import WIREGUARD_GO, Lab, Node, Wire, nsx, pair, ping, stream_tcp, wait_for

UPSTREAM = os.environ.get("WIREGUARD_GO_UPSTREAM", "")
PEERS = ["inproc", "wggo"] + (["upstream"] if UPSTREAM else [])
_UDP_SEGMENT = 103


def _need(kind: str) -> None:
    if kind == "wggo" and WIREGUARD_GO is None:
        pytest.skip("wireguard-go is not installed")


def start_pair(lab: Lab, left_kind: str, right_kind: str, *, outer: int = 4) -> tuple[Node, Node, Wire]:
    for kind in (left_kind, right_kind):
        _need(kind)
    left, right, wire = pair(lab, _kind(left_kind), _kind(right_kind), outer)
    for node, kind in ((left, left_kind), (right, right_kind)):
        if kind == "upstream":
            node.kind = "upstream"
    # Handshake first: what is sent before it waits in a queue of 128 packets (the rest is dropped).
    assert ping(left.ns, right.inner4, 2) >= 1
    return left, right, wire


def _kind(kind: str) -> str:
    return "wggo" if kind == "upstream" else kind


@pytest.fixture(autouse=True)
def _upstream_binary(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Parameters naming ``upstream`` run wireguard-go from WIREGUARD_GO_UPSTREAM instead of Debian's."""
    if "upstream" in request.node.name:
        from . import wgutil

        monkeypatch.setattr(wgutil, "WIREGUARD_GO", UPSTREAM)
    yield


# ------------------------------------------------------------------------------------------ traffic


def tcp_transfer(src_ns: str, dst_ns: str, address: str, data: bytes, timeout: float = 90) -> tuple[int, str]:
    """Send ``data`` over one TCP connection from ``src_ns`` to ``address`` in ``dst_ns``; returns the bytes
    and sha256 that arrived."""
    return stream_tcp(src_ns, dst_ns, address, [data], timeout)


def _datagram(seq: int, size: int) -> bytes:
    head = struct.pack("!I", seq)
    return head + hashlib.shake_128(head).digest(size - 4)


def udp_transfer(src_ns: str, dst_ns: str, address: str, count: int, size: int, *, gso: bool,
                 timeout: float = 20, pause: float = 0.002) -> tuple[set[int], int, int]:
    """Send ``count`` numbered datagrams of ``size`` bytes (``gso``: 16 at a time in one UDP_SEGMENT send, so
    the TUN sees UDP super-packets). Returns (sequence numbers that arrived intact, duplicates, corrupt)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with _netns.entered(dst_ns):
        rx = socket.socket(family, socket.SOCK_DGRAM)
    with _netns.entered(src_ns):
        tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: the reader is Python on a busy machine
        rx.bind((address, 0))
        target = (address, rx.getsockname()[1])
        if gso:
            tx.setsockopt(socket.SOL_UDP, _UDP_SEGMENT, size)
        seen: set[int] = set()
        dups = corrupt = 0
        step = 16 if gso else 1
        for start in range(0, count, step):
            tx.sendto(b"".join(_datagram(s, size) for s in range(start, min(count, start + step))), target)
            if start % 64 == 0:
                time.sleep(pause)  # a pace the receiving socket keeps up with on a loaded machine
        deadline = time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([rx], [], [], 1.0)
            if not ready:
                if seen:
                    break  # quiet for a second after traffic: nothing more is coming
                continue
            data = rx.recv(65535)
            seq = struct.unpack_from("!I", data)[0] if len(data) >= 4 else -1
            if len(data) != size or data != _datagram(seq, size):
                corrupt += 1
            elif seq in seen:
                dups += 1
            else:
                seen.add(seq)
        return seen, dups, corrupt
    finally:
        rx.close()
        tx.close()


PAYLOAD = os.urandom(8 << 20)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _offload_counters(node: Node) -> dict[str, int]:
    return node.stats() if node.kind == "inproc" else {}


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("inner", [4, 6])
@pytest.mark.parametrize("kinds", [("inproc", "inproc")] + [(p, "inproc") for p in PEERS[1:]]
                         + [("inproc", p) for p in PEERS[1:]], ids=lambda k: "->".join(k))
def test_tcp_stream_is_byte_exact(lab: Lab, kinds: tuple[str, str], inner: int) -> None:
    left, right, _ = start_pair(lab, *kinds)
    address = right.inner4 if inner == 4 else right.inner6
    count, digest = tcp_transfer(left.ns, right.ns, address, PAYLOAD)
    assert (count, digest) == (len(PAYLOAD), PAYLOAD_SHA)
    # And back the other way over the same tunnel.
    back = left.inner4 if inner == 4 else left.inner6
    count, digest = tcp_transfer(right.ns, left.ns, back, PAYLOAD[: 2 << 20])
    assert (count, digest) == (2 << 20, hashlib.sha256(PAYLOAD[: 2 << 20]).hexdigest())
    for node in (left, right):
        if node.kind == "inproc":
            assert node.device.offload
    if left.kind == "inproc":
        sent = left.stats()
        # Super-packets were read and split: more wire packets left than reads came from the TUN.
        assert sent["tx_data_packets"] > sent["tun_rx"] and sent["udp_tx_trains"] > 0, sent
        assert sent["tx_bad_packet"] == 0
    if right.kind == "inproc":
        got = right.stats()
        if left.kind != "wggo":  # Debian's sends datagrams one by one: no trains to coalesce
            # ... and coalesced on the way in: fewer writes to the TUN than packets that arrived.
            assert got["rx_data_packets"] > got["tun_tx"], got
        assert got["rx_bad_tag"] == got["rx_replay"] == got["rx_bad_ip"] == got["rx_disallowed_source"] == 0


@pytest.mark.parametrize("inner", [4, 6])
@pytest.mark.parametrize("kinds", [("inproc", "inproc")] + [("inproc", p) for p in PEERS[1:]]
                         + [(p, "inproc") for p in PEERS[1:]], ids=lambda k: "->".join(k))
def test_udp_datagrams_are_exact_and_never_twice(lab: Lab, kinds: tuple[str, str], inner: int) -> None:
    left, right, _ = start_pair(lab, *kinds)
    address = right.inner4 if inner == 4 else right.inner6
    size = 1200 if inner == 4 else 1180
    for gso in (True, False):
        # Paced for the slowest receiver here (Debian's wireguard-go, one datagram per read).
        seen, dups, corrupt = udp_transfer(left.ns, right.ns, address, 2000, size, gso=gso, pause=0.005)
        assert dups == 0 and corrupt == 0
        counters = {n.kind: {k: v for k, v in n.stats().items() if v and ("drop" in k or "err" in k)}
                    for n in (left, right) if n.kind == "inproc"}
        # UDP may lose a little on a loaded machine (wireguard-go reads one datagram at a time); what
        # arrives must be exact and once.
        assert len(seen) >= 1800, f"only {len(seen)} of 2000 datagrams arrived (gso={gso}); {counters}"
    if left.kind == "inproc":
        assert left.stats()["tx_data_packets"] > left.stats()["tun_rx"]  # UDP super-packets were split


@pytest.mark.parametrize("env", [{"WIRETUN_WG_THREADS": "1"}, {"WIRETUN_WG_OFFLOAD": "0"}],
                         ids=["two-threads", "no-offload"])
def test_other_data_paths(lab: Lab, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The same stream with TUN -> UDP on a second thread (WIRETUN_WG_THREADS=1), and packet by packet
    without offloads (what a kernel without them gets)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    left, right, _ = start_pair(lab, "inproc", "inproc")
    assert left.device.offload == ("WIRETUN_WG_OFFLOAD" not in env)
    for inner in (4, 6):
        address = right.inner4 if inner == 4 else right.inner6
        count, digest = tcp_transfer(left.ns, right.ns, address, PAYLOAD[: 4 << 20])
        assert (count, digest) == (4 << 20, hashlib.sha256(PAYLOAD[: 4 << 20]).hexdigest())
    if not left.device.offload:
        assert left.stats()["tx_data_packets"] <= left.stats()["tun_rx"]  # one wire packet per read


@pytest.mark.parametrize("mtus", [(1420, 1280), (1280, 1420), (1500, 1380)], ids=lambda m: f"{m[0]}-{m[1]}")
def test_mixed_mtus(lab: Lab, mtus: tuple[int, int]) -> None:
    left, right, _ = start_pair(lab, "inproc", "inproc")
    for node, mtu in ((left, mtus[0]), (right, mtus[1])):
        nsx(node.ns, "ip", "link", "set", node.ifname, "mtu", str(mtu))
    wait_for(lambda: left.device.mtu == mtus[0] and right.device.mtu == mtus[1], 10, "the devices to see the MTUs")
    for inner in (4, 6):
        for src, dst in ((left, right), (right, left)):
            address = dst.inner4 if inner == 4 else dst.inner6
            count, digest = tcp_transfer(src.ns, dst.ns, address, PAYLOAD[: 4 << 20])
            assert (count, digest) == (4 << 20, hashlib.sha256(PAYLOAD[: 4 << 20]).hexdigest())


# ------------------------------------------------------------------------------------------ relay


class Relay:
    """A UDP relay between two WireGuard peers that reorders, duplicates and drops, bounded in what it
    holds (``HOLD`` datagrams) and in time (it stops when the test ends, at the latest after ``limit`` s).

    The left peer's endpoint is ``(host, port)`` of the outer socket; datagrams from there go to the
    right peer from an inner socket, and the right peer's replies (to the inner socket) go back to
    wherever the left peer last sent from."""

    HOLD = 64

    def __init__(self, ns: str, outer_host: str, right: tuple[str, int], *, seed: int, drop: float, dup: float,
                 reorder: float, limit: float = 120.0) -> None:
        family = socket.AF_INET6 if ":" in outer_host else socket.AF_INET
        with _netns.entered(ns):
            self.outer = socket.socket(family, socket.SOCK_DGRAM)
            self.inner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (self.outer, self.inner):
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.outer.bind((outer_host, 0))
        self.inner.bind(("127.0.0.1", 0))
        self.port = self.outer.getsockname()[1]
        self.right = right
        self.left: tuple[str, int] | None = None
        self.rng = random.Random(seed)
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self.limit = limit
        self.counts = {"forwarded": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "send_failed": 0}
        self._held: list[tuple[bytes, socket.socket, tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _emit(self, data: bytes, sock: socket.socket, to: tuple[str, int]) -> None:
        try:
            sock.sendto(data, to)
            self.counts["forwarded"] += 1
        except OSError:
            self.counts["send_failed"] += 1  # a full socket buffer: lost like a drop

    def _handle(self, data: bytes, sock: socket.socket, to: tuple[str, int]) -> None:
        r = self.rng.random()
        if r < self.drop:
            self.counts["dropped"] += 1
            return
        if r < self.drop + self.dup:
            self.counts["duplicated"] += 1
            self._emit(data, sock, to)
        if r > 1 - self.reorder and len(self._held) < self.HOLD:
            self.counts["reordered"] += 1
            self._held.append((data, sock, to))  # goes out after later datagrams
            return
        self._emit(data, sock, to)
        if self._held and self.rng.random() < 0.5:
            held = self._held.pop(self.rng.randrange(len(self._held)))
            self._emit(*held)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.outer, self.inner], [], [], 0.05)
            if not ready:
                while self._held:  # quiet: let the held ones go
                    self._emit(*self._held.pop())
                continue
            for sock in ready:
                for _ in range(64):
                    try:
                        data, source = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if sock is self.outer:
                        self.left = source
                        self._handle(data, self.inner, self.right)
                    elif self.left is not None:
                        self._handle(data, self.outer, self.left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.outer.close()
        self.inner.close()


@pytest.mark.parametrize("right_kind", ["inproc"] + PEERS[1:])
def test_reordered_duplicated_lost_datagrams(lab: Lab, right_kind: str) -> None:
    _need(right_kind)
    left_ns, right_ns = lab.namespace(), lab.namespace()
    wire = lab.wire(left_ns, right_ns)
    left = lab.node("inproc", left_ns, 51001)
    right = lab.node(_kind(right_kind), right_ns, 51002)
    relay = Relay(right_ns, wire.b4, ("127.0.0.1", right.port), seed=7, drop=0.02, dup=0.03, reorder=0.05)
    try:
        left.set("peer", right.public, "allowed-ips", f"{right.inner4}/32,{right.inner6}/128",
                 "endpoint", f"{wire.b4}:{relay.port}")
        right.add_peer(left, None)  # learns the relay's inner socket as the endpoint
        for src, dst in ((left, right), (right, left)):
            count, digest = tcp_transfer(src.ns, dst.ns, dst.inner4, PAYLOAD[: 3 << 20])
            assert (count, digest) == (3 << 20, hashlib.sha256(PAYLOAD[: 3 << 20]).hexdigest())
        before = dict(relay.counts)
        seen, dups, corrupt = udp_transfer(left.ns, right.ns, right.inner6, 1500, 1000, gso=True, pause=0.01)
        assert dups == 0 and corrupt == 0  # duplicates stop at the replay window, never reach the TUN
        lost = sum(relay.counts[k] - before[k] for k in ("dropped", "send_failed"))
        # What the relay lost, and little else (a loaded machine may lose a few more, see above).
        assert len(seen) >= (1500 - lost) * 0.9, (len(seen), relay.counts)
        assert relay.counts["duplicated"] > 20 and relay.counts["reordered"] > 20 and relay.counts["dropped"] > 20
        stats = left.stats()
        assert stats["rx_replay"] > 0  # the duplicates the relay made of the right side's datagrams
    finally:
        relay.close()


# ------------------------------------------------------------------------------------------ memory

RSS_BOUND = 96 << 20
"""What one ``wiretun-wg`` process may hold under any flood: the interpreter and modules (about 40 MiB),
the session's two rings of 8 MiB each, the core's queues (at most 128 staged packets per peer of at most
the MTU each), one 64 KiB receive and one decrypt buffer, and the allocator's slack (61 MiB measured)."""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_memory_bounded_under_flood(lab: Lab) -> None:
    left, right, wire = start_pair(lab, "daemon", "daemon")
    assert left.proc is not None and right.proc is not None
    count, _ = tcp_transfer(left.ns, right.ns, right.inner4, PAYLOAD[: 1 << 20])
    assert count == 1 << 20
    floods: list[subprocess.Popen[bytes]] = []
    try:
        # Inner UDP at full speed both ways (the tunnel) and raw garbage at the sockets (the UDP side),
        # all bounded in time.
        for src, dst in ((left, right), (right, left)):
            floods.append(subprocess.Popen(
                ["ip", "netns", "exec", src.ns, "python3", "-c", _FLOOD, dst.inner4, "6"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        floods.append(subprocess.Popen(
            ["ip", "netns", "exec", left.ns, "python3", "-c", _GARBAGE, wire.b4, str(right.port), "6"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        peak = 0
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            peak = max(peak, _rss(left.proc.pid), _rss(right.proc.pid))
            time.sleep(0.1)
    finally:
        for p in floods:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    assert left.proc.poll() is None and right.proc.poll() is None
    print(f"peak RSS of the two wiretun-wg processes under the flood: {peak / 2**20:.1f} MiB")
    assert peak < RSS_BOUND, f"peak RSS {peak >> 20} MiB is over the {RSS_BOUND >> 20} MiB bound"
    # The tunnel still works after the flood.
    count, digest = tcp_transfer(left.ns, right.ns, right.inner4, PAYLOAD[: 1 << 20])
    assert (count, digest) == (1 << 20, hashlib.sha256(PAYLOAD[: 1 << 20]).hexdigest())


# Full-speed UDP for argv[2] seconds: 64 KiB GSO sends of 1200-byte datagrams and single 100-byte ones.
_FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
s.setsockopt(socket.SOL_UDP, 103, 1200)
big, small = bytes(1200 * 50), bytes(100)
t = time.monotonic() + float(sys.argv[2])
while time.monotonic() < t:
    for data in (big, small):
        try:
            s.sendto(data, (sys.argv[1], 9))
        except OSError:
            pass
"""
# Garbage at the peer's WireGuard port: transport messages for unknown indexes and random bytes.
_GARBAGE = """
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
t = time.monotonic() + float(sys.argv[3])
while time.monotonic() < t:
    for data in (b"\\x04\\0\\0\\0" + os.urandom(1400), os.urandom(200)):
        try:
            s.sendto(data, (sys.argv[1], int(sys.argv[2])))
        except OSError:
            pass
"""
