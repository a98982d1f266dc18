"""Two processes exchange packets through rings in multiprocessing.shared_memory, waking each other
with the Alertable / TailMoved (eventfd) protocol, and the sleeping side burns no CPU while idle."""

from __future__ import annotations

import multiprocessing
import os
import resource
import struct
import time
from multiprocessing import shared_memory

import pytest

from wiretun.errors import EndOfFile
from wiretun.ring import MIN_CAPACITY, Consumer, Producer, Ring, TailMoved, ring_size

CAP = MIN_CAPACITY
SIZE = ring_size(CAP)
IDLE_SECONDS = 0.5


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _put(prod: Producer, ring: Ring, payload: bytes) -> None:
    off = prod.allocate(len(payload))
    ring.data[off : off + len(payload)] = payload
    prod.send(off)


def _take(cons: Consumer, ring: Ring, deadline: float) -> bytes:
    """Receive one packet, sleeping on TailMoved while the ring is empty (bounded by ``deadline``)."""
    while True:
        off = cons.poll()
        if off >= 0:
            data = bytes(ring.data[off : off + cons.size(off)])
            cons.release(off)
            return data
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet before the deadline")
        cons.wait(remaining)


def _echo_child(name: str, fd_a: int, fd_b: int) -> None:
    """Consumer of ring A, producer of ring B: echo every packet back reversed, report idle CPU time."""
    shm = shared_memory.SharedMemory(name=name)
    try:
        ring_a = Ring(shm.buf, CAP)
        ring_b = Ring(shm.buf, CAP, offset=SIZE)
        cons = Consumer(ring_a, TailMoved(fd_a))
        prod = Producer(ring_b, TailMoved(fd_b))
        deadline = time.monotonic() + 30
        while True:
            wall0, cpu0 = time.monotonic(), _cpu_seconds()
            try:
                data = _take(cons, ring_a, deadline)
            except EndOfFile:
                _put(prod, ring_b, b"eof")
                break
            wall, cpu = time.monotonic() - wall0, _cpu_seconds() - cpu0
            if data == b"report":
                # CPU spent in the wait that just ended (the parent slept before sending "report").
                _put(prod, ring_b, b"idle" + struct.pack("<dd", wall, cpu))
            else:
                _put(prod, ring_b, data[::-1])
        for ring in (ring_a, ring_b):
            ring.close()
    finally:
        shm.close()


@pytest.fixture
def shared_rings():
    shm = shared_memory.SharedMemory(create=True, size=2 * SIZE)
    try:
        Ring(shm.buf, CAP).reset()
        Ring(shm.buf, CAP, offset=SIZE).reset()
        yield shm
    finally:
        shm.close()
        shm.unlink()


def test_two_processes_exchange_packets_and_sleep_without_spinning(shared_rings):
    shm = shared_rings
    ev_a, ev_b = TailMoved(), TailMoved()
    ctx = multiprocessing.get_context("fork")  # the eventfds are inherited across fork
    child = ctx.Process(target=_echo_child, args=(shm.name, ev_a.fileno(), ev_b.fileno()), daemon=True)
    child.start()
    ring_a = Ring(shm.buf, CAP)
    ring_b = Ring(shm.buf, CAP, offset=SIZE)
    try:
        prod = Producer(ring_a, ev_a)
        cons = Consumer(ring_b, ev_b)
        deadline = time.monotonic() + 30
        sizes = [1, 2, 3, 4, 5, 60, 1400, 0xFFFF, 9000, 20] * 30  # wraps the 128 KiB ring many times
        for i, size in enumerate(sizes):
            payload = bytes((i + j) & 0xFF for j in range(size))
            _put(prod, ring_a, payload)
            assert _take(cons, ring_b, deadline) == payload[::-1]

        # A burst: many packets in flight before the echoes are read.
        burst = [bytes([i]) * (100 + i) for i in range(200)]
        for payload in burst:
            _put(prod, ring_a, payload)
        for payload in burst:
            assert _take(cons, ring_b, deadline) == payload[::-1]

        # Idle: the child sleeps on its TailMoved eventfd; its CPU time must stay near zero.
        time.sleep(IDLE_SECONDS)
        _put(prod, ring_a, b"report")
        reply = _take(cons, ring_b, deadline)
        assert reply[:4] == b"idle"
        waited, cpu = struct.unpack("<dd", reply[4:])
        assert waited >= IDLE_SECONDS * 0.8
        assert cpu < 0.05, f"the idle consumer used {cpu:.3f} s of CPU in {waited:.3f} s: a busy loop?"

        # Termination: Tail = 0xFFFFFFFF ends the child's receive with EndOfFile.
        prod.end()
        assert _take(cons, ring_b, deadline) == b"eof"
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        ring_a.close()
        ring_b.close()
        ev_a.close()
        ev_b.close()


def test_parent_sleeps_without_spinning_while_the_child_is_slow(shared_rings):
    """The waiting side here is this process: measure its own CPU while the producer takes its time."""
    shm = shared_rings
    ev = TailMoved()
    ctx = multiprocessing.get_context("fork")

    def late_producer(name: str, fd: int) -> None:
        s = shared_memory.SharedMemory(name=name)
        try:
            ring = Ring(s.buf, CAP)
            time.sleep(IDLE_SECONDS)
            _put(Producer(ring, TailMoved(fd)), ring, b"finally")
            ring.close()
        finally:
            s.close()

    child = ctx.Process(target=late_producer, args=(shm.name, ev.fileno()), daemon=True)
    ring = Ring(shm.buf, CAP)
    try:
        cons = Consumer(ring, ev)
        cpu0, wall0 = _cpu_seconds(), time.monotonic()
        child.start()
        assert _take(cons, ring, time.monotonic() + 10) == b"finally"
        wall, cpu = time.monotonic() - wall0, _cpu_seconds() - cpu0
        assert wall >= IDLE_SECONDS * 0.8
        assert cpu < 0.05 + 0.02 * wall, f"{cpu:.3f} s CPU while waiting {wall:.3f} s"
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        ring.close()
        ev.close()


def test_eventfd_inherited_fd_is_not_closed_by_wrapper():
    ev = TailMoved()
    wrapper = TailMoved(ev.fileno())
    wrapper.close()
    os.fstat(ev.fileno())  # still open: the wrapper does not own it
    ev.set()
    assert ev.wait(0) is True
    assert ev.wait(0) is False  # auto-reset
    ev.close()
