"""The measured loops bench/session.py and bench/engine.py share (imported by the bench scripts): the
plain os.read / os.writev loops on a queue, and the per-packet receive and send loops over any object with
Wintun's calls. Each binds what it calls to locals first, so that the loop itself is all that is timed."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

HDR = bytes(10)  # the virtio-net header (no offload) before each packet on the queue


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def drain_plain(fd: int) -> int:
    """``os.read(fd, 0x10009)`` until EAGAIN; returns how many reads returned a datagram."""
    read = os.read
    n = 0
    while True:
        try:
            read(fd, 0x10009)
        except BlockingIOError:
            return n
        n += 1


def drain_single(receive: Callable[[], Any], release: Callable[[Any], object]) -> int:
    """``receive()`` (None when empty) and ``release(packet)`` until empty; returns how many packets."""
    n = 0
    while True:
        pkt = receive()
        if pkt is None:
            return n
        release(pkt)
        n += 1


def send_plain(fd: int, pkt: bytes, count: int) -> int:
    """``count`` times ``os.writev(fd, [header, pkt])``."""
    writev = os.writev
    iov = [HDR, pkt]
    for _ in range(count):
        writev(fd, iov)
    return count


def send_single(sender: Any, pkt: bytes, count: int) -> int:
    """``count`` times ``allocate_send_packet`` + copy + ``send_packet`` on ``sender``."""
    allocate = sender.allocate_send_packet
    send = sender.send_packet
    size = len(pkt)
    for _ in range(count):
        buf = allocate(size)
        buf[:] = pkt
        send(buf)
    return count
