"""The session core (wiretun.linux.engine): the C type against its pure-Python twin, on the same sequences.

The "TUN queue" is a non-blocking AF_UNIX datagram socketpair: the core reads and writes one end, the
test plays the kernel on the other (one datagram = virtio-net header + packet, EAGAIN when empty, EAGAIN
when its buffer is full). Each sequence of Wintun calls runs on a C core and on a Python core from the
same start, and after every step everything observable must match: the call's result (packet bytes, or
the exception's class), both rings byte for byte, what the kernel got, the counters.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wiretun import errors
from wiretun.errors import BufferOverflow, EndOfFile, InvalidData, InvalidParameter
from wiretun.linux import engine
from wiretun.linux.engine import REWIND_OFFSET, PySessionCore, Status
from wiretun.offload import VirtioNetHeader
from wiretun.ring import DATA_WORD, HEAD_WORD, MIN_CAPACITY, RELEASE_BIT, TAIL_WORD, Ring

HDR = 10

try:
    from wiretun import _speedups
except ImportError:  # the extension is not built: only the twin's own behaviour is checked
    _speedups = None  # type: ignore[assignment]

CoreType = Any
KINDS: list[Any] = [PySessionCore] + ([_speedups.SessionCore] if _speedups is not None else [])
needs_c = pytest.mark.skipif(_speedups is None, reason="wiretun._speedups is not built")


def convert_header(header: object) -> bytes:
    if isinstance(header, VirtioNetHeader):
        return header.pack()
    raise InvalidParameter(f"header must be a VirtioNetHeader or 10 bytes, not {type(header).__name__}")


@dataclass
class Rig:
    """One core on its own queue and rings, and the kernel's end of the queue."""

    core: Any
    kernel: socket.socket
    queue: socket.socket
    rx: Ring
    tx: Ring
    errors: list[int] = field(default_factory=list)
    rejected: list[tuple[int, int]] = field(default_factory=list)
    rx_held: list[Any] = field(default_factory=list)
    tx_held: list[Any] = field(default_factory=list)

    def close(self) -> None:
        self.core.end()
        for sock in (self.kernel, self.queue):
            sock.close()
        for ring in (self.rx, self.tx):
            ring.close()


def rig(kind: Any, capacity: int = MIN_CAPACITY, sndbuf: int = 1 << 20, ready_fd: int = -1) -> Rig:
    queue, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (queue, kernel):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    rx, tx = Ring.allocate(capacity), Ring.allocate(capacity)
    r = Rig(None, kernel, queue, rx, tx)

    def io_error(code: int) -> BaseException:
        r.errors.append(code)
        if code in (errno.EBADF, errno.EBADFD, errno.ENODEV, errno.ENXIO):
            return EndOfFile(f"the queue is gone ({os.strerror(code)})")
        return errors.WintunError(f"reading the queue failed ({os.strerror(code)})")

    def rejected(code: int, size: int) -> None:
        r.rejected.append((code, size))

    r.core = kind(queue.fileno(), rx, tx, io_error, rejected, convert_header, ready_fd=ready_fd)
    return r


def pattern(i: int, size: int) -> bytes:
    return bytes((i * 31 + k * 7 + 3) & 0xFF for k in range(size))


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(0x20000))
        except BlockingIOError:
            return out


Step = tuple[Any, ...]


def apply(r: Rig, step: Step) -> Any:
    """Run one step on a rig; returns what is observable of the call (bytes, None, count, error class)."""
    op = step[0]
    core = r.core
    try:
        if op == "inject":  # the kernel queues a datagram (header + packet)
            r.kernel.send(step[1])
            return None
        if op == "recv":
            view = core.receive_packet()
            if view is None:
                return None
            r.rx_held.append(view)
            return bytes(view)
        if op == "recv_many":
            headers: list[bytes] = []
            views = core.receive_packets(step[1], headers)
            r.rx_held.extend(views)
            assert headers == [bytes(HDR)] * len(views)
            return [bytes(v) for v in views]
        if op == "release":
            if not r.rx_held:
                return "nothing held"
            core.release_receive_packet(r.rx_held[step[1] % len(r.rx_held)])
            return None
        if op == "release_many":
            if not r.rx_held:
                return "nothing held"
            core.release_receive_packets([r.rx_held[i % len(r.rx_held)] for i in step[1]])
            return None
        if op == "alloc":
            view = core.allocate_send_packet(step[1])
            view[:] = pattern(len(r.tx_held), step[1])
            r.tx_held.append(view)
            return len(view)
        if op == "send":
            if not r.tx_held:
                return "nothing held"
            view = r.tx_held[step[1] % len(r.tx_held)]
            if len(step) > 2:
                core.send_packet(view, step[2])
            else:
                core.send_packet(view)
            return None
        if op == "send_many":
            return core.send_packets(step[1], step[2] if len(step) > 2 else None)
        if op == "kernel_read":  # the kernel takes what was written
            return drain(r.kernel)
        if op == "flush":
            core.flush()
            return None
        if op == "poke":  # another party scribbles on a ring word
            ring = r.rx if step[1] == "rx" else r.tx
            ring.words[step[2]] = step[3]
            return None
        if op == "close_queue":
            r.queue.close()
            return None
        if op == "end":
            core.end()
            return None
        raise AssertionError(f"unknown step {step!r}")
    except (errors.WintunError, OSError) as exc:
        return type(exc).__name__


def observe(r: Rig) -> tuple[Any, ...]:
    rings = tuple(bytes(ring._mv) if not r.core.ended or True else b"" for ring in (r.rx, r.tx))
    return (
        rings,
        r.core.receive_dropped,
        r.core.send_dropped,
        r.core.stalled,
        r.core.ended,
        r.errors,
        r.rejected,
    )


def run_both(steps: list[Step], **kw: Any) -> list[Any]:
    """Run ``steps`` on a C core and a Python core; assert they match after each step; the results."""
    if _speedups is None:
        r = rig(PySessionCore, **kw)
        try:
            return [apply(r, s) for s in steps]
        finally:
            r.close()
    c, p = rig(_speedups.SessionCore, **kw), rig(PySessionCore, **kw)
    results = []
    try:
        for i, step in enumerate(steps):
            got_c, got_p = apply(c, step), apply(p, step)
            assert got_c == got_p, f"step {i} {step[:2]!r}: C {got_c!r} != Python {got_p!r}"
            if step[0] not in ("end",):
                assert observe(c) == observe(p), f"state differs after step {i} {step[:2]!r}"
            results.append(got_c)
    finally:
        c.close()
        p.close()
    return results


def dgram(i: int, size: int, hdr: bytes = bytes(HDR)) -> bytes:
    return hdr + pattern(i, size)


# ------------------------------------------------------------------------------------------------
# Status codes, one IntEnum for C and Python


def test_status_codes_are_wintuns_error_codes_and_match_the_c_constants() -> None:
    assert Status.INVALID_DATA == errors.InvalidData.code
    assert Status.HANDLE_EOF == errors.EndOfFile.code
    assert Status.INVALID_PARAMETER == errors.InvalidParameter.code
    assert Status.BUFFER_OVERFLOW == errors.BufferOverflow.code
    assert Status.NO_MORE_ITEMS == errors.NoMoreItems.code
    for status in Status:
        if status:
            assert engine.error_for(status, "x").code == status
    if _speedups is not None:
        for status in Status:
            if status:
                assert getattr(_speedups, f"STATUS_{status.name}") == status


def test_the_c_type_is_chosen_when_built() -> None:
    if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1" or _speedups is None:
        assert engine.SessionCore is PySessionCore and not engine.SPEEDUPS
    else:
        assert engine.SessionCore is _speedups.SessionCore and engine.SPEEDUPS


# ------------------------------------------------------------------------------------------------
# Receive


@pytest.mark.parametrize("kind", KINDS)
def test_receive_reads_into_the_ring_and_release_in_order_rewinds(kind: Any) -> None:
    r = rig(kind)
    try:
        for i in range(3):
            r.kernel.send(dgram(i, 40 + i))
        views = [r.core.receive_packet() for _ in range(3)]
        assert [bytes(v) for v in views] == [pattern(i, 40 + i) for i in range(3)]
        words = r.rx.words
        assert words[DATA_WORD] == 40 and words[TAIL_WORD] == 44 + 48 + 48
        assert r.core.receive_packet() is None
        assert r.core.received == 3
        r.core.release_receive_packet(views[0])
        assert words[HEAD_WORD] == 44  # the next packet's record
        with pytest.raises(ValueError):
            bytes(views[0])  # released
        r.core.release_receive_packet(views[1])
        r.core.release_receive_packet(views[2])
        assert words[HEAD_WORD] == REWIND_OFFSET and words[TAIL_WORD] == REWIND_OFFSET  # all released: rewound
        assert r.core.received == 0
    finally:
        r.close()


def queued(sock: socket.socket) -> bool:
    """Whether a datagram waits on ``sock`` (the core's queue end), without taking it."""
    return bool(select.select([sock], [], [], 0)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_a_receive_reads_ahead_what_waits_and_hands_it_out_one_by_one(kind: Any) -> None:
    """As Wintun's driver fills its ring: the first receive reads every waiting packet into the ring (Tail
    past them all), the next ones take no read; Head follows releases up to the read-ahead packets."""
    ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r = rig(kind, ready_fd=ready)
    try:
        sizes = [40, 1400, 1, 300, 64]
        for i, n in enumerate(sizes):
            r.kernel.send(dgram(i, n))
        first = r.core.receive_packet()
        assert first is not None and bytes(first) == pattern(0, 40)
        assert not queued(r.queue)  # all five read
        words = r.rx.words
        records = [(n + 7) & ~3 for n in sizes]
        assert words[TAIL_WORD] == sum(records) and r.core.received == 1
        assert queued(ready)  # the read-wait handle must wake while four wait in the ring
        r.core.release_receive_packet(first)
        assert words[HEAD_WORD] == records[0]  # up to the read-ahead ones, not rewound
        views = [r.core.receive_packet() for _ in sizes[1:]]
        assert [bytes(v) for v in views if v is not None] == [pattern(i, n) for i, n in enumerate(sizes)][1:]
        assert r.core.receive_packet() is None
        assert not queued(ready)  # cleared when the queue was found empty
        r.core.release_receive_packets(views)
        assert words[HEAD_WORD] == words[TAIL_WORD] == REWIND_OFFSET
    finally:
        r.close()
        os.close(ready)


@pytest.mark.parametrize("kind", KINDS)
def test_the_ready_eventfd_is_set_exactly_while_packets_wait_read_ahead(kind: Any) -> None:
    """Found in review: with every packet held the ring runs short of room and receives go through the
    scratch path, which never reads ahead; had the eventfd stayed set from the last read-ahead, a
    waiting loop would spin on a readable handle with nothing to receive."""
    ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r = rig(kind, ready_fd=ready)
    try:
        for i in range(100):  # 140 KB: more than the 128 KiB ring holds
            r.kernel.send(dgram(i, 1400))
        held, end, waited = [], r.rx.words[HEAD_WORD], 0
        for _ in range(100):
            view = r.core.receive_packet()
            if view is None:
                break
            held.append(view)
            end = (end + ((len(view) + 7) & ~3)) % MIN_CAPACITY  # where the packets handed out end
            read_ahead = r.rx.words[TAIL_WORD] != end
            assert queued(ready) == read_ahead
            waited += read_ahead
        assert waited and len(held) < 100 and r.core.receive_dropped  # read ahead; then the ring filled up
        assert not queued(ready)
    finally:
        r.close()
        os.close(ready)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_receive_reads_only_what_it_asks_for(kind: Any) -> None:
    ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r = rig(kind, ready_fd=ready)
    try:
        for i in range(5):
            r.kernel.send(dgram(i, 100 + i))
        views = r.core.receive_packets(2)
        assert [bytes(v) for v in views] == [pattern(0, 100), pattern(1, 101)]
        assert queued(r.queue) and not queued(ready)  # three still in the queue, none in the ring
        r.core.release_receive_packets(views)
        one = r.core.receive_packet()  # reads the other three ahead
        rest = r.core.receive_packets(10)  # the two read ahead, then the queue is empty
        assert one is not None and [bytes(v) for v in [one, *rest]] == [pattern(i, 100 + i) for i in (2, 3, 4)]
        assert r.core.receive_packets(10) == []
    finally:
        r.close()
        os.close(ready)


@pytest.mark.parametrize("kind", KINDS)
def test_an_error_after_read_ahead_packets_comes_after_them(kind: Any) -> None:
    """A bad read in the middle of a read-ahead: the packets before it are handed out, then the error,
    then the packets after it."""
    r = rig(kind)
    try:
        r.kernel.send(dgram(0, 50))
        r.kernel.send(dgram(1, 60))
        r.kernel.send(b"short")  # shorter than the virtio-net header
        r.kernel.send(dgram(2, 70))
        got = [r.core.receive_packet(), r.core.receive_packet()]
        assert [bytes(v) for v in got if v is not None] == [pattern(0, 50), pattern(1, 60)]
        with pytest.raises(InvalidData):
            r.core.receive_packet()
        last = r.core.receive_packet()
        assert last is not None and bytes(last) == pattern(2, 70)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_read_ahead_packets_come_out_before_a_lost_queue_is_noticed(kind: Any) -> None:
    r = rig(kind)
    try:
        for i in range(3):
            r.kernel.send(dgram(i, 90))
        views = [r.core.receive_packet()]
        r.queue.close()  # the adapter went away: the next read fails
        views += [r.core.receive_packet(), r.core.receive_packet()]
        assert [bytes(v) for v in views if v is not None] == [pattern(i, 90) for i in range(3)]
        for _ in range(2):
            with pytest.raises(EndOfFile):
                r.core.receive_packets(4)
        assert r.core.ended and r.errors == [errno.EBADF]
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_scribbled_send_head_is_invalid_data_not_a_crash(kind: Any) -> None:
    r = rig(kind)
    try:
        out = r.core.allocate_send_packet(100)
        r.tx.words[HEAD_WORD] = 0x40000000  # another party wrote nonsense
        with pytest.raises(InvalidData, match="send ring Head 0x40000000"):
            r.core.send_packet(out)
        assert drain(r.kernel) == []
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_packet_can_be_released_out_of_order(kind: Any) -> None:
    r = rig(kind)
    try:
        for i, n in enumerate((20, 0, 30)):
            r.kernel.send(dgram(i, n))
        views = [r.core.receive_packet() for _ in range(3)]
        assert [len(v) for v in views if v is not None] == [20, 0, 30]
        r.core.release_receive_packet(views[1])  # no address to find it by in Python: found by identity
        r.core.release_receive_packets([views[2], views[0]])
        assert r.core.received == 0 and r.rx.words[HEAD_WORD] == REWIND_OFFSET
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_read_ahead_packets_go_with_the_end(kind: Any) -> None:
    r = rig(kind)
    try:
        for i in range(3):
            r.kernel.send(dgram(i, 80))
        assert r.core.receive_packet() is not None
        r.core.end()
        assert r.core.received == 0
        with pytest.raises(EndOfFile):
            r.core.receive_packet()
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_emptied_ring_reads_and_writes_in_place_and_keeps_the_bytes_before(kind: Any) -> None:
    """After a rewind the next packet is read with its header in the 6 free bytes before its Size word and
    written with its header taken from there (the C type; the twin gets the same ring): those bytes are
    put back, the packet and the header the kernel sees are exact."""
    r = rig(kind)
    try:
        marker = bytes(range(0xA0, 0xA8))
        r.kernel.send(dgram(0, 60))
        r.core.release_receive_packet(r.core.receive_packet())
        assert r.rx.words[TAIL_WORD] == REWIND_OFFSET
        r.rx.data[:REWIND_OFFSET] = marker
        header = bytes(range(1, 11))  # the kernel's header is dropped; the packet must start after it
        r.kernel.send(header + pattern(1, 1400))
        view = r.core.receive_packet()
        assert view is not None and bytes(view) == pattern(1, 1400)
        assert r.rx.words[DATA_WORD + REWIND_OFFSET // 4] == 1400
        assert bytes(r.rx.data[:REWIND_OFFSET]) == marker
        assert r.rx.words[TAIL_WORD] == REWIND_OFFSET + 1404
        r.core.release_receive_packet(view)

        out = r.core.allocate_send_packet(1400)  # a fresh send ring starts at the rewind offset too
        out[:] = pattern(2, 1400)
        r.tx.data[:REWIND_OFFSET] = marker
        r.core.send_packet(out)
        assert drain(r.kernel) == [bytes(HDR) + pattern(2, 1400)]
        assert bytes(r.tx.data[:REWIND_OFFSET]) == marker
        assert r.tx.words[DATA_WORD + REWIND_OFFSET // 4] == 1400  # Size back, release bit cleared
        assert bytes(r.tx.data[REWIND_OFFSET + 4 : REWIND_OFFSET + 4 + 1400]) == pattern(2, 1400)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_nearly_full_send_ring_writes_every_packet_exactly(kind: Any) -> None:
    """Allocated until full (the last allocation ends 4 bytes before Head, where no header fits), then
    sent: every packet reaches the kernel whole, with the zero header, in order."""
    r = rig(kind)
    try:
        # From the rewind offset round to 4 bytes before it: 130 records of 1004 bytes and one of 548.
        assert (MIN_CAPACITY - 4) == 130 * 1004 + 548
        views = [r.core.allocate_send_packet(1000) for _ in range(130)] + [r.core.allocate_send_packet(544)]
        with pytest.raises(BufferOverflow):
            r.core.allocate_send_packet(1)
        for i, v in enumerate(views):
            v[:] = pattern(i, len(v))
        expected = [bytes(HDR) + pattern(i, len(v)) for i, v in enumerate(views)]
        got: list[bytes] = []
        for v in views:
            r.core.send_packet(v)
            got += drain(r.kernel)
        assert got == expected
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_order_release_sets_the_release_bit_and_head_waits(kind: Any) -> None:
    r = rig(kind)
    try:
        for i in range(4):
            r.kernel.send(dgram(i, 100))
        views = [r.core.receive_packet() for _ in range(4)]
        words = r.rx.words
        r.core.release_receive_packet(views[2])
        assert words[DATA_WORD + 2 * 104 // 4] == 100 | RELEASE_BIT
        assert words[HEAD_WORD] == 0
        r.core.release_receive_packet(views[1])
        r.core.release_receive_packet(views[0])
        assert words[HEAD_WORD] == 3 * 104  # passed over the released ones
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packet(views[2])  # twice
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packet(memoryview(bytearray(100)))  # not ours
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packet(views[3][1:])  # a slice of ours is not the packet
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packet(b"x")  # type: ignore[arg-type]
        assert r.core.holds(views[3]) and not r.core.holds(views[0])
        r.core.release_receive_packet(views[3])
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_release_many_is_all_or_nothing(kind: Any) -> None:
    r = rig(kind)
    try:
        for i in range(5):
            r.kernel.send(dgram(i, 60))
        views = r.core.receive_packets(64)
        assert len(views) == 5
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packets([views[0], views[1], views[1]])
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packets([views[0], memoryview(bytearray(3))])
        assert r.core.received == 5 and bytes(views[0]) == pattern(0, 60)
        r.core.release_receive_packets([views[3], views[1]])
        r.core.release_receive_packets(views[0:1] + views[2:3] + views[4:])
        assert r.rx.words[HEAD_WORD] == REWIND_OFFSET and r.core.received == 0
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_full_receive_ring_drops_and_counts(kind: Any) -> None:
    r = rig(kind)
    try:
        held = []
        # 0x20000 bytes of ring: 1400-byte packets take 1408 each; hold them all until it is full
        for i in range(200):
            r.kernel.send(dgram(i, 1400))
            view = r.core.receive_packet()
            if view is None:
                break
            held.append(view)
        assert r.core.receive_dropped == 1
        assert len(held) == (MIN_CAPACITY - 4) // 1408
        r.core.release_receive_packets(held)
        r.kernel.send(dgram(7, 1400))
        assert bytes(r.core.receive_packet()) == pattern(7, 1400)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_bogus_receive_ring_is_invalid_data(kind: Any) -> None:
    r = rig(kind)
    try:
        r.kernel.send(dgram(0, 20))
        r.rx.words[TAIL_WORD] = 6
        with pytest.raises(InvalidData):
            r.core.receive_packet()
        with pytest.raises(InvalidData):
            r.core.receive_packets(4)
        r.rx.words[TAIL_WORD] = 0
        r.rx.words[HEAD_WORD] = MIN_CAPACITY
        with pytest.raises(InvalidData):
            r.core.receive_packet()
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_short_read_is_invalid_data_and_lost_queue_ends(kind: Any) -> None:
    r = rig(kind)
    try:
        r.kernel.send(b"abc")
        with pytest.raises(InvalidData):
            r.core.receive_packet()
        r.queue.close()
        with pytest.raises(EndOfFile):
            r.core.receive_packet()
        assert r.errors == [errno.EBADF] and r.core.ended
        with pytest.raises(EndOfFile):
            r.core.receive_packet()
        with pytest.raises(EndOfFile):
            r.core.allocate_send_packet(10)
    finally:
        r.core.end()
        r.kernel.close()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_hands_out_packets_before_an_error_and_raises_it_next(kind: Any) -> None:
    r = rig(kind)
    try:
        r.kernel.send(dgram(0, 30))
        r.kernel.send(dgram(1, 31))
        r.kernel.send(b"short")
        r.kernel.send(dgram(2, 32))
        views = r.core.receive_packets(8)
        assert [bytes(v) for v in views] == [pattern(0, 30), pattern(1, 31)]
        with pytest.raises(InvalidData):
            r.core.receive_packet()
        assert bytes(r.core.receive_packet()) == pattern(2, 32)
        with pytest.raises(InvalidParameter):
            r.core.receive_packets(0)
        with pytest.raises(InvalidParameter):
            r.core.receive_packets(2, ())
        with pytest.raises(InvalidParameter):
            r.core.release_receive_packets(5)
    finally:
        r.close()


# ------------------------------------------------------------------------------------------------
# Send


@pytest.mark.parametrize("kind", KINDS)
def test_allocate_send_in_order_and_out_of_order(kind: Any) -> None:
    r = rig(kind)
    try:
        a = r.core.allocate_send_packet(20)
        b = r.core.allocate_send_packet(30)
        c = r.core.allocate_send_packet(40)
        for i, v in enumerate((a, b, c)):
            v[:] = pattern(i, len(v))
        words = r.tx.words
        first = DATA_WORD + REWIND_OFFSET // 4  # a fresh ring starts at the rewind offset
        assert words[first] == 20 | RELEASE_BIT
        r.core.send_packet(b)  # waits for a
        assert drain(r.kernel) == [] and words[TAIL_WORD] == REWIND_OFFSET and r.core.allocated == 2
        r.core.send_packet(a)
        assert drain(r.kernel) == [bytes(HDR) + pattern(0, 20), bytes(HDR) + pattern(1, 30)]
        with pytest.raises(InvalidParameter):
            r.core.send_packet(a)  # twice
        with pytest.raises(InvalidParameter):
            r.core.send_packet(memoryview(bytearray(40)))
        hdr = VirtioNetHeader(flags=1, gso_type=0, hdr_len=0, gso_size=0, csum_start=20, csum_offset=6)
        r.core.send_packet(c, header=hdr)
        assert drain(r.kernel) == [hdr.pack() + pattern(2, 40)]
        with pytest.raises(ValueError):
            bytes(c)
        d = r.core.allocate_send_packet(8)
        with pytest.raises(InvalidParameter):
            r.core.send_packet(d, header="nonsense")  # dropped, counted, and said so
        assert drain(r.kernel) == [] and r.core.send_dropped == 1 and r.core.allocated == 0
        for bad in (0, 0x10000, -1, True, 1.5, "3"):
            with pytest.raises(InvalidParameter):
                r.core.allocate_send_packet(bad)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_full_send_ring_is_buffer_overflow_and_stall_retries(kind: Any) -> None:
    r = rig(kind, sndbuf=4096)
    try:
        sent = 0
        with pytest.raises(BufferOverflow):
            for _ in range(1000):
                v = r.core.allocate_send_packet(1400)
                v[:] = pattern(sent, 1400)
                r.core.send_packet(v)
                sent += 1
        assert r.core.stalled
        got = drain(r.kernel)
        r.core.flush()
        while r.core.stalled:
            got += drain(r.kernel)
            r.core.flush()
        got += drain(r.kernel)
        assert got == [bytes(HDR) + pattern(i, 1400) for i in range(sent)]
        assert r.tx.words[HEAD_WORD] == r.tx.words[TAIL_WORD]
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_send_packets_copies_and_sends_after_earlier_allocations(kind: Any) -> None:
    r = rig(kind)
    try:
        early = r.core.allocate_send_packet(5)
        early[:] = b"early"
        hdr = bytes(range(1, 11))
        items = [b"one", bytearray(b"two"), memoryview(b"three")]
        assert r.core.send_packets(items, [bytes(HDR), hdr, bytes(HDR)]) == 3
        assert drain(r.kernel) == []
        r.core.send_packet(early)
        assert drain(r.kernel) == [bytes(HDR) + b"early", bytes(HDR) + b"one", hdr + b"two", bytes(HDR) + b"three"]
        with pytest.raises(InvalidParameter):
            r.core.send_packets([b"x"], [b"short"])
        with pytest.raises(InvalidParameter):
            r.core.send_packets([b""])
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_bogus_send_ring_is_invalid_data(kind: Any) -> None:
    r = rig(kind)
    try:
        r.tx.words[HEAD_WORD] = 3
        with pytest.raises(InvalidData):
            r.core.allocate_send_packet(10)
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_packet_is_dropped_and_reported(kind: Any) -> None:
    r = rig(kind)
    try:
        r.kernel.close()  # a datagram socket whose peer is gone: ECONNREFUSED on write
        v = r.core.allocate_send_packet(10)
        r.core.send_packet(v)
        assert r.core.send_dropped == 1 and r.rejected and r.rejected[0][1] == 10
    finally:
        r.core.end()
        r.queue.close()


@pytest.mark.parametrize("kind", KINDS)
def test_end_forgets_packets_and_later_calls(kind: Any) -> None:
    r = rig(kind)
    try:
        r.kernel.send(dgram(0, 10))
        view = r.core.receive_packet()
        out = r.core.allocate_send_packet(10)
        r.core.end()
        assert r.core.ended
        assert bytes(view) == pattern(0, 10)  # still readable
        r.core.release_receive_packet(view)  # nothing
        r.core.send_packet(out)  # nothing
        with pytest.raises(EndOfFile):
            r.core.receive_packet()
        with pytest.raises(EndOfFile):
            r.core.receive_packets(3)
        with pytest.raises(EndOfFile):
            r.core.allocate_send_packet(10)
        assert r.core.send_packets([b"x", b"y"]) == 2  # discarded, as send_packet after the end
        r.core.end()  # again: nothing
        assert drain(r.kernel) == []
    finally:
        r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_receive_and_send_from_two_threads(kind: Any) -> None:
    """A thread per direction, as a forwarder runs: nothing lost, reordered or duplicated."""
    r = rig(kind)
    count = 3000
    received: list[bytes] = []
    failures: list[BaseException] = []

    def receiver() -> None:
        try:
            deadline = time.monotonic() + 20
            while len(received) < count and time.monotonic() < deadline:
                view = r.core.receive_packet()
                if view is None:
                    select.select([r.queue], [], [], 0.5)
                    continue
                received.append(bytes(view))
                r.core.release_receive_packet(view)
        except BaseException as exc:
            failures.append(exc)

    def sender() -> None:
        try:
            for i in range(count):
                while True:
                    try:
                        v = r.core.allocate_send_packet(64)
                        break
                    except BufferOverflow:
                        time.sleep(0.001)
                        r.core.flush()
                v[:] = pattern(i, 64)
                r.core.send_packet(v)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=receiver), threading.Thread(target=sender)]
    try:
        for t in threads:
            t.start()
        # the "kernel" loops everything the core sends back into its queue
        echoed = 0
        deadline = time.monotonic() + 20
        while echoed < count and time.monotonic() < deadline:
            for d in drain(r.kernel):
                while True:
                    try:
                        r.kernel.send(d)
                        break
                    except BlockingIOError:
                        time.sleep(0.001)
                echoed += 1
            r.core.flush()
            time.sleep(0.0005)
        for t in threads:
            t.join(30)
        assert not failures, failures
        assert received == [pattern(i, 64) for i in range(count)]
    finally:
        r.close()


# ------------------------------------------------------------------------------------------------
# C against Python, step by step


@needs_c
def test_scripted_sequence_matches() -> None:
    hdr = VirtioNetHeader(flags=1, gso_type=0, hdr_len=0, gso_size=0, csum_start=20, csum_offset=6)
    steps: list[Step] = [("inject", dgram(i, 50 + 13 * i)) for i in range(6)]
    steps += [("recv",), ("recv",), ("recv_many", 3), ("recv",), ("recv",)]
    steps += [("release", 2), ("release", 2), ("release", 0), ("release_many", [1, 3]), ("release", 4)]
    steps += [("alloc", 100), ("alloc", 7), ("alloc", 1), ("send", 1), ("send", 1), ("send", 2, hdr),
              ("send", 0), ("kernel_read",), ("send_many", [b"abc", b"defgh"]), ("kernel_read",),
              ("alloc", 9), ("send", 3, "bad header"), ("kernel_read",)]
    steps += [("poke", "tx", HEAD_WORD, 5), ("alloc", 10), ("poke", "tx", HEAD_WORD, 0)]
    steps += [("inject", dgram(9, 3)), ("poke", "rx", TAIL_WORD, MIN_CAPACITY + 4), ("recv",),
              ("poke", "rx", TAIL_WORD, 0), ("recv",), ("inject", b"short"), ("recv",)]
    steps += [("inject", dgram(10, 40)), ("inject", b"tiny"), ("inject", dgram(11, 41)), ("recv_many", 5),
              ("recv",), ("recv",), ("recv_many", 5)]
    steps += [("end",), ("recv",), ("release", 0), ("alloc", 3), ("send", 0), ("send_many", [b"x"])]
    run_both(steps)


@needs_c
def test_wrap_around_matches() -> None:
    """Packets of many sizes round and round a small ring, some held across the wrap, released out of
    order; the send ring wraps too."""
    steps: list[Step] = []
    for i in range(400):
        size = 200 + (i * 397) % 1300
        steps += [("inject", dgram(i, size)), ("recv",)]
        if i % 3 == 2:
            steps += [("release", 1), ("release", 0)]
        if i % 7 == 6:
            steps += [("release_many", [0, 1])] if i % 2 else [("release", 0)]
        steps += [("alloc", size), ("alloc", 1 + i % 50), ("send", 1), ("send", 0)]
        if i % 5 == 4:
            steps += [("kernel_read",)]
    steps += [("kernel_read",)]
    run_both(steps)


@needs_c
def test_full_send_ring_and_stall_match() -> None:
    """The kernel stops taking writes (a small socket buffer): sent packets stay queued (stalled), the
    ring fills, allocation says BufferOverflow; the kernel drains, a flush and later sends catch up."""
    steps: list[Step] = []
    for _ in range(120):
        steps += [("alloc", 1400), ("send", -1)]  # the latest allocation
    steps += [("kernel_read",), ("flush",), ("alloc", 1000), ("kernel_read",), ("flush",), ("send", -1),
              ("kernel_read",), ("flush",), ("kernel_read",), ("send_many", [b"a" * 1400] * 100), ("kernel_read",),
              ("flush",), ("kernel_read",)]
    results = run_both(steps, sndbuf=4096)
    assert "BufferOverflow" in results


@needs_c
def test_lost_queue_matches() -> None:
    steps: list[Step] = [("inject", dgram(0, 20)), ("recv",), ("alloc", 5), ("close_queue",), ("recv",),
                         ("release", 0), ("send", 0), ("alloc", 3), ("recv",)]
    run_both(steps)


_step = st.one_of(
    st.tuples(st.just("inject"), st.integers(0, 2000).map(lambda n: dgram(n, n % 1500 + 1))),
    st.tuples(st.just("recv")),
    st.tuples(st.just("recv_many"), st.integers(1, 8)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("release_many"), st.lists(st.integers(0, 50), max_size=4)),
    st.tuples(st.just("alloc"), st.integers(1, 3000)),
    st.tuples(st.just("send"), st.integers(0, 50)),
    st.tuples(st.just("send_many"), st.lists(st.binary(min_size=1, max_size=1500), max_size=5)),
    st.tuples(st.just("kernel_read")),
    st.tuples(st.just("flush")),
)


def test_short_reads_in_a_read_ahead_leave_the_same_ring() -> None:
    """Reads shorter than the header, first in a read-ahead on an emptied ring and after a packet in one:
    the C type reads in place, the twin with readv; the rings must match byte for byte."""
    run_both([
        ("inject", dgram(0, 50)), ("recv",), ("release", 0),
        ("inject", b"\x01\x02\x03\x04\x05\x06\x07\x08"), ("inject", dgram(1, 60)), ("recv",), ("recv",),
        ("inject", dgram(2, 40)), ("inject", b"\x11\x12\x13\x14\x15\x16\x17\x18\x19"), ("inject", dgram(3, 30)),
        ("release_many", [0, 1]), ("recv",), ("recv",), ("recv",), ("recv",),
    ])


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, max_size=120))
def test_random_sequences_match(steps: list[Step]) -> None:
    run_both(steps, sndbuf=8192)


def test_the_twin_is_chosen_without_the_extension() -> None:
    """WIRETUN_NO_SPEEDUPS=1 gives PySessionCore (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = "import wiretun.linux.engine as e; print(e.SPEEDUPS, e.SessionCore is e.PySessionCore)"
    env = dict(os.environ, WIRETUN_NO_SPEEDUPS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
