"""Micro benchmark of the session core (wiretun.linux.engine) next to plain os.read / os.writev.

Run:  .venv/bin/python bench/engine.py [--packets N] [--rounds R]

No TUN device: the "queue" is a non-blocking AF_UNIX datagram socketpair, which, like a TUN queue, hands
out one datagram per read. Run as root, the benchmark moves itself into a network namespace of its own
(unshare) and raises net.unix.max_dgram_qlen there to N, so that a whole measurement is queued at once;
otherwise the queue holds the host's max_dgram_qlen datagrams at a time (often 10: noisier figures).
Each round fills the queue with N datagrams (10-byte header + packet), then times draining it:

* ``plain``       ``os.read(fd, 0x10009)`` until EAGAIN; sending: ``os.writev(fd, [header, packet])``
* ``C core``      ``receive_packet()`` (None when empty) + ``release_receive_packet``; sending: ``allocate_send_packet``
                  + copy + ``send_packet`` (wiretun._speedups.SessionCore)
* ``Python core`` the same calls on the pure-Python twin (what WIRETUN_NO_SPEEDUPS=1 runs)

A socketpair's syscalls are cheaper than a TUN queue's, so the ratios here are harsher on the per-call
overhead than bench/session.py's. Median of the rounds; in each round the plain loops run before and
after the cores, and "vs plain" is the median of the per-round ratios to their mean.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _loops import HDR, drain_plain, drain_single, send_plain, send_single, timed
from wiretun.errors import EndOfFile
from wiretun.linux.engine import PySessionCore
from wiretun.ring import Ring

try:
    from wiretun._speedups import SessionCore as CSessionCore
except ImportError:
    CSessionCore = None


def _io_error(code: int) -> BaseException:
    return EndOfFile(os.strerror(code))


def _rejected(code: int, size: int) -> None:
    pass


def _convert(header: object) -> bytes:
    raise TypeError("no headers here")


def make_core(kind: Any, fd: int) -> tuple[Any, Ring, Ring]:
    rx, tx = Ring.allocate(0x400000), Ring.allocate(0x400000)
    return kind(fd, rx, tx, _io_error, _rejected, _convert), rx, tx


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        for option, forced in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE as root
            try:
                s.setsockopt(socket.SOL_SOCKET, forced, 256 << 20)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, option, 256 << 20)
    return a, b


def fill(sock: socket.socket, datagram: bytes, count: int) -> int:
    """Queue up to ``count`` datagrams (an AF_UNIX queue holds net.unix.max_dgram_qlen); how many."""
    send = sock.send
    for i in range(count):
        try:
            send(datagram)
        except BlockingIOError:
            return i
    return count


def timed_drain(kernel: socket.socket, datagram: bytes, count: int, drain: Callable[[], int]) -> tuple[int, float]:
    """Drain ``count`` datagrams, queued a queue-full at a time; only the draining is timed."""
    total, elapsed = 0, 0.0
    while total < count:
        fill(kernel, datagram, count - total)
        n, dt = timed(drain)
        total += n
        elapsed += dt
    return total, elapsed


def timed_send(kernel: socket.socket, count: int, send: Callable[[int], int]) -> tuple[int, float]:
    """Send ``count`` packets a queue-full at a time (the kernel side drained between, untimed)."""
    total, elapsed = 0, 0.0
    while total < count:
        n, dt = timed(functools.partial(send, count - total))
        total += n
        elapsed += dt
        assert drain_sock(kernel) == n
    return total, elapsed


def drain_sock(sock: socket.socket) -> int:
    n = 0
    recv = sock.recv
    while True:
        try:
            recv(0x10009)
        except BlockingIOError:
            return n
        n += 1


def plain_pair(kernel: socket.socket, fd: int, datagram: bytes, pkt: bytes, count: int) -> tuple[float, float]:
    """Packets/s of the plain receive loop and the plain send loop."""
    n, dt = timed_drain(kernel, datagram, count, functools.partial(drain_plain, fd))
    rx = n / dt
    n, dt = timed_send(kernel, count, functools.partial(send_plain, fd, pkt))
    return rx, n / dt


def private_namespace(qlen: int) -> bool:
    """As root: a network namespace of this process' own, with room for ``qlen`` queued datagrams."""
    if os.geteuid() != 0:
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        return False
    Path("/proc/sys/net/unix/max_dgram_qlen").write_text(str(qlen))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    count, rounds = max(1000, min(args.packets, 200_000)), max(1, min(args.rounds, 50))
    private = private_namespace(count + 16)
    kinds: list[tuple[str, Any]] = [("Python core", PySessionCore)]
    if CSessionCore is not None:
        kinds.insert(0, ("C core", CSessionCore))
    results: dict[tuple[str, int, str], list[float]] = {}
    ratios: dict[tuple[str, int, str], list[float]] = {}
    for size in (64, 1400):
        datagram = HDR + bytes(size)
        pkt = bytes(size)
        for _ in range(rounds):
            queue, kernel = pair()
            try:
                fd = queue.fileno()

                # The plain loops run before and after the cores: their mean is the round's baseline.
                before = plain_pair(kernel, fd, datagram, pkt, count)
                measured: dict[str, tuple[float, float]] = {}
                for name, kind in kinds:
                    core, rx_ring, tx_ring = make_core(kind, fd)
                    drain = functools.partial(drain_single, core.receive_packet, core.release_receive_packet)
                    n, dt = timed_drain(kernel, datagram, count, drain)
                    rx = n / dt
                    n, dt = timed_send(kernel, count, functools.partial(send_single, core, pkt))
                    measured[name] = (rx, n / dt)
                    core.end()
                    rx_ring.close()
                    tx_ring.close()
                after = plain_pair(kernel, fd, datagram, pkt, count)
                base = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
                measured = {"plain os.read / os.writev": base, **measured}
                for name, (rx, tx) in measured.items():
                    for direction, value, plain_value in (("receive", rx, base[0]), ("send", tx, base[1])):
                        results.setdefault((direction, size, name), []).append(value)
                        ratios.setdefault((direction, size, name), []).append(value / plain_value)
            finally:
                queue.close()
                kernel.close()
    qlen = Path("/proc/sys/net/unix/max_dgram_qlen").read_text().strip()
    print(f"{count} packets per measurement over an AF_UNIX socketpair (queue of {qlen}"
          f"{', private namespace' if private else ''}), median of {rounds} rounds; vs plain: the median of "
          f"each round's ratio to the plain loops run before and after\n")
    print(f"{'direction':<9} {'size':>5}  {'method':<26} {'packets/s':>12}  {'vs plain':>8}")
    for key, values in sorted(results.items(), key=lambda kv: (kv[0][0] != "receive", kv[0][1])):
        direction, size, name = key
        print(f"{direction:<9} {size:>5}  {name:<26} {statistics.median(values):>12,.0f}  "
              f"{statistics.median(ratios[key]):>7.0%}")

if __name__ == "__main__":
    main()
