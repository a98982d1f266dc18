"""Session rules on real TUN adapters: arguments at their limits, errors of the kernel side, the capture
file, and one session per adapter across processes. Each test in its own network namespace.

Under ``WIRETUN_NO_SPEEDUPS=1`` the same tests run the pure-Python loops (``make test`` does both).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest

from wiretun import packet
from wiretun.adapter import Adapter
from wiretun.capture import read_pcap
from wiretun.errors import Busy, EndOfFile, InvalidData, InvalidParameter, WintunError

V4_LOCAL, V4_PEER = "10.0.0.1", "10.0.0.2"


@pytest.fixture
def adapter(netns):
    a = Adapter.create("wtr0", "RulesTest")
    try:
        # No IPv6: no router solicitations or MLD reports arriving at random times during the tests.
        subprocess.run(["sysctl", "-qw", "net.ipv6.conf.wtr0.disable_ipv6=1"], check=True)
        a.add_address(f"{V4_LOCAL}/24")
        a.up()
        yield a
    finally:
        a.close()


def udp_to_peer(count: int, size: int = 20) -> None:
    """``count`` UDP datagrams from this namespace to the far side: the kernel routes them into the adapter."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(bytes([i]) * size, (V4_PEER, 9000))


def drain(session) -> None:
    while (p := session.try_receive_packet()) is not None:  # link-up chatter
        session.release_receive_packet(p)


def end_later(session, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), session.end()), daemon=True)
    t.start()
    return t


# ----------------------------------------------------------------------------- arguments at the limits


def until_end(call) -> None:
    """Call ``call`` (a receive form) until the session ends; packets that come meanwhile are released.
    A None or [] would mean the form gave up before the end: a failure."""
    session_ended = False
    while not session_ended:
        try:
            got = call()
        except EndOfFile:
            session_ended = True
            continue
        assert got, f"returned {got!r} before the end"


@pytest.mark.parametrize("form", ["wait", "wait_receive_packet", "receive_packets", "deprecated"])
@pytest.mark.parametrize("limit", [float("inf"), 1e300])
def test_infinite_and_huge_timeouts_wait_until_the_end(adapter, form, limit):
    s = adapter.start_session()
    drain(s)

    def wait() -> bool:
        if s.ended:
            raise EndOfFile("ended")
        woke = s.wait(limit)
        drain(s) if not s.ended else None
        return woke

    def one() -> object:
        p = s.wait_receive_packet(limit)
        if p is not None:
            s.release_receive_packet(p)
        return p

    def batch() -> object:
        got = s.receive_packets(8, block=True, timeout=limit)
        s.release_receive_packets(got)
        return got

    def deprecated() -> object:
        with pytest.warns(DeprecationWarning):
            p = s.receive_packet(block=True, timeout=limit)
        if p is not None:
            s.release_receive_packet(p)
        return p

    t0 = time.monotonic()  # before the ender starts its 0.3 s sleep, so the bound below cannot fire early
    ender = end_later(s, 0.3)
    until_end({"wait": wait, "wait_receive_packet": one, "receive_packets": batch, "deprecated": deprecated}[form])
    assert time.monotonic() - t0 >= 0.25  # it waited for the end, not returned at once
    ender.join(5)


def test_huge_max_count(adapter):
    with adapter.start_session() as s:
        drain(s)
        assert s.receive_packets(2**63) == []
        assert s.receive_packets(2**200, block=True, timeout=0.05) == []
        udp_to_peer(3)
        got = s.receive_packets(2**63, block=True, timeout=3)
        deadline = time.monotonic() + 3
        while len(got) < 3 and time.monotonic() < deadline:
            got += s.receive_packets(2**63, block=True, timeout=0.5)
        udp = [bytes(p) for p in got if p[9] == 17]
        assert [p[28:] for p in udp] == [bytes([i]) * 20 for i in range(3)]
        s.release_receive_packets(got)


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_bad_timeouts_are_invalid_parameter(adapter, bad):
    with adapter.start_session() as s:
        for call in (lambda: s.wait(bad), lambda: s.wait_receive_packet(bad),
                     lambda: s.receive_packets(4, block=True, timeout=bad)):
            with pytest.raises(InvalidParameter):
                call()


def test_send_packets_refuses_a_released_view_and_sends_nothing(adapter):
    with adapter.start_session() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((V4_LOCAL, 9100))
        sink.settimeout(0.3)
        good = packet.ipv4_udp(V4_PEER, V4_LOCAL, 5000, 9100, b"first")
        released = memoryview(bytearray(good))
        released.release()
        with pytest.raises(InvalidParameter, match="packet 1 is a released memoryview"):
            s.send_packets([good, released])
        with pytest.raises(TimeoutError):
            sink.recv(100)  # nothing of the batch went out
        assert s.send_packets([good]) == 1
        assert sink.recv(100) == b"first"


def test_send_after_end_is_discarded_by_both_forms(adapter):
    s = adapter.start_session()
    buf = s.allocate_send_packet(28)
    s.end()
    s.send_packet(buf)  # WintunSendPacket after the end: discarded, no error
    assert s.send_packets([packet.ipv4_udp(V4_PEER, V4_LOCAL, 1, 2, b"x")] * 3) == 3  # discarded too
    with pytest.raises(EndOfFile):
        s.allocate_send_packet(28)
    with pytest.raises(EndOfFile):
        s.receive_packet()


def test_deprecated_receive_spellings_still_work(adapter):
    with adapter.start_session() as s:
        drain(s)
        with pytest.warns(DeprecationWarning, match="try_receive_packet"):
            assert s.receive_packet(block=False) is None
        with pytest.warns(DeprecationWarning, match="wait_receive_packet"):
            assert s.receive_packet(block=True, timeout=0.05) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert s.try_receive_packet() is None  # the new names do not warn


# ----------------------------------------------------------------------------- the kernel side's errors


def test_unexpected_read_errno_is_a_wintun_error(adapter):
    """The queue's descriptor is made a directory (dup2): the kernel answers EISDIR, which no TUN read
    should; the session reports it as a WintunError naming the errno, not a bare OSError."""
    s = adapter.start_session()
    drain(s)
    queue_fd = s.get_write_wait_event()
    assert queue_fd is not None
    d = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.dup2(d, queue_fd)
    finally:
        os.close(d)
    with pytest.raises(WintunError, match="EISDIR|Is a directory") as e:
        s.receive_packets(8)
    assert not isinstance(e.value, OSError)
    s.end()


def test_packets_read_before_an_error_are_handed_out_then_the_error(adapter):
    """A batch read gets 3 packets, then a read shorter than the virtio-net header: the 3 are handed out
    (their ring space comes back when released) and the next call raises. The queue's descriptor is
    replaced (dup2) by a SOCK_SEQPACKET socket that delivers exactly that."""
    s = adapter.start_session()
    drain(s)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    frames = [packet.ipv4_udp(V4_PEER, V4_LOCAL, 1000 + i, 9000, bytes([i]) * 10) for i in range(3)]
    for f in frames:
        theirs.send(bytes(10) + f)  # zero virtio-net header + the packet
    theirs.shutdown(socket.SHUT_WR)  # then reads return 0 bytes: shorter than the header
    queue_fd = s.get_write_wait_event()
    assert queue_fd is not None
    os.dup2(ours.fileno(), queue_fd)
    got = s.receive_packets(64)
    assert [bytes(p) for p in got] == frames
    s.release_receive_packets(got)
    with pytest.raises(InvalidData, match="shorter"):
        s.receive_packets(64)
    ring = s._backend._rx  # type: ignore[attr-defined]
    assert ring.head == ring.tail  # nothing held: the space of the 3 came back
    s.end()
    ours.close()
    theirs.close()


# ----------------------------------------------------------------------------- the capture file


def test_a_busy_start_leaves_the_capture_file_alone(adapter, tmp_path):
    live = tmp_path / "live.pcap"
    other = tmp_path / "other.pcap"
    other.write_bytes(b"precious")
    with adapter.start_session(capture=live) as s:
        udp_to_peer(2)
        deadline = time.monotonic() + 3
        seen = 0
        while seen < 2 and time.monotonic() < deadline:
            for p in s.receive_packets(8, block=True, timeout=0.5):
                seen += p[9] == 17
                s.release_receive_packet(p)
        with pytest.raises(Busy):
            adapter.start_session(capture=other)
        assert other.read_bytes() == b"precious"
        with Adapter.open("wtr0") as other_handle, pytest.raises(InvalidParameter, match="already written"):
            other_handle.start_session(multi_queue=True, capture=live)
        link = tmp_path / "link.pcap"
        link.symlink_to(live)
        with pytest.raises(InvalidParameter, match="already written by a live session"):
            adapter.start_session(capture=str(link))
    records = read_pcap(live).records
    assert sum(r.data[9] == 17 for r in records) == 2  # the live file was not truncated
    with adapter.start_session(capture=live):  # free again once its session ended
        pass


# ----------------------------------------------------------------------------- one session per adapter

CHILD = r"""
import sys, time
from wiretun.adapter import Adapter
a = Adapter.open(sys.argv[1])
s = a.start_session(multi_queue=sys.argv[2] == "multi")
print("started", flush=True)
time.sleep(60)
"""


def _child(name: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, name, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "started", line
    return proc


@pytest.mark.parametrize(("theirs", "ours", "busy"), [
    ("exclusive", True, True),
    ("multi", False, True),
    ("multi", True, False),
])
def test_one_session_per_adapter_across_processes(adapter, theirs, ours, busy):
    proc = _child("wtr0", theirs)
    try:
        if busy:
            with pytest.raises(Busy):
                adapter.start_session(multi_queue=ours)
        else:
            with adapter.start_session(multi_queue=ours):
                pass
    finally:
        proc.kill()
        proc.wait(10)


def test_the_claim_survives_no_kill_9(adapter):
    proc = _child("wtr0", "multi")
    with pytest.raises(Busy):
        adapter.start_session()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 5
    while True:  # the kernel detaches the dead process's queue as it closes its descriptors
        try:
            with adapter.start_session():
                break
        except Busy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
