"""Session throughput next to a plain os.read / os.writev loop on the same TUN device, in one run.

Run as root:  .venv/bin/python bench/session.py [--packets N] [--rounds R]

Everything happens in a network namespace this script creates and removes. The adapter gets
10.77.0.1/24; 10.77.0.2 is "the far side", routed through the adapter.

* receive: N UDP datagrams are first queued in the TUN queue by a socket in the namespace (the kernel
  holds them: txqueuelen is raised above N), and only then is the drain timed, so the sender is never the
  bottleneck. Plain: ``os.read(fd, 0x10009)`` until EAGAIN (and, for reference, the same loop also
  dropping the 10-byte virtio-net header every queue carries, to get the IP packet). Session per-packet:
  ``try_receive_packet()`` + ``release_receive_packet``. Session batch: ``receive_packets(64)`` +
  ``release_receive_packets``. Every method must drain exactly N packets.
* send: N IPv4/UDP packets from 10.77.0.2 to a socket on 10.77.0.1 (which never reads: the kernel drops
  them once its buffer is full, the same cost for every method). Plain: ``os.writev(fd, [header,
  packet])``. Session per-packet: ``allocate_send_packet`` + copy + ``send_packet``. Session batch:
  ``send_packets`` of 64 at a time.

Methods are interleaved round by round (the plain loops before and after the session's in each round);
the table shows the median of the rounds, and "vs plain" the median of the per-round ratios to the
plain loop (the mean of its two runs in that round), which a machine whose load changes from round to
round distorts far less than a ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
from functools import partial

from _loops import drain_plain, drain_single, send_plain, send_single, timed
from wiretun import packet
from wiretun.adapter import Adapter
from wiretun.linux import tun

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests import netns

ADAPTER_ADDR = "10.77.0.1"
PEER_ADDR = "10.77.0.2"
SINK_PORT = 9000
BATCH = 64


def machine() -> str:
    from _machine import machine_line

    return machine_line(platform.python_implementation())


def prefill(sock: socket.socket, payload: bytes, count: int) -> None:
    dest = (PEER_ADDR, SINK_PORT)
    send = sock.sendto
    for _ in range(count):
        send(payload, dest)


def drain_plain_strip(fd: int) -> int:
    """The plain loop doing what a program needs to get the IP packet: drop the 10-byte header."""
    read = os.read
    n = 0
    while True:
        try:
            read(fd, 0x10009)[10:]
        except BlockingIOError:
            return n
        n += 1


def drain_session_batch(session) -> int:
    receive = session.receive_packets
    release = session.release_receive_packets
    n = 0
    while True:
        pkts = receive(BATCH)
        if not pkts:
            return n
        n += len(pkts)
        release(pkts)


def send_session_batch(session, pkt: bytes, count: int) -> int:
    batch = [pkt] * BATCH
    send = session.send_packets
    sent = 0
    while sent < count:
        sent += send(batch if count - sent >= BATCH else batch[: count - sent])
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=20000, help="packets per measurement (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per method (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/session.py needs root (it creates a namespace and a TUN adapter)")
    count = max(1000, min(args.packets, 200_000))
    rounds = max(1, min(args.rounds, 50))
    results: dict[tuple[str, int, str], list[float]] = {}

    with netns.temporary("wtbench"):
        # No IPv6 on the adapter: its link-up chatter would add packets to the counts.
        subprocess.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        adapter = Adapter.create("wtbench0", "Bench")
        try:
            adapter.add_address(f"{ADAPTER_ADDR}/24")
            adapter.up()
            subprocess.run(
                ["ip", "link", "set", "dev", adapter.kernel_name, "txqueuelen", str(count + 1000)], check=True
            )
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sink.bind((ADAPTER_ADDR, SINK_PORT))

            for size in (64, 1400):
                payload = bytes(size - 28)
                out_pkt = packet.ipv4_udp(PEER_ADDR, ADAPTER_ADDR, 40000, SINK_PORT, bytes(size - 28))
                for r in range(rounds):
                    # The plain loops run before and after the session's (their mean is the round's
                    # baseline), so that load changing during the round hits both sides alike.
                    plain_round(adapter, sender, payload, out_pkt, count, size, results, r)
                    with adapter.start_session(0x400000) as session:
                        prefill(sender, payload, count)
                        n, dt = timed(partial(drain_single, session.try_receive_packet, session.release_receive_packet))
                        _record(results, ("receive", size, "session per-packet"), n, count, dt)
                        prefill(sender, payload, count)
                        n, dt = timed(partial(drain_session_batch, session))
                        _record(results, ("receive", size, f"session batch ({BATCH})"), n, count, dt)
                        n, dt = timed(partial(send_single, session, out_pkt, count))
                        _record(results, ("send", size, "session per-packet"), n, count, dt)
                        n, dt = timed(partial(send_session_batch, session, out_pkt, count))
                        _record(results, ("send", size, f"session batch ({BATCH})"), n, count, dt)
                    plain_round(adapter, sender, payload, out_pkt, count, size, results, r)
            sender.close()
            sink.close()
        finally:
            adapter.close()

    print(f"machine: {machine()}")
    print(f"{count} packets per measurement, median of {rounds} rounds; vs plain: the median of each "
          f"round's ratio to the plain loop run just before and just after it\n")
    print(f"{'direction':<9} {'size':>5}  {'method':<24} {'packets/s':>12}  {'vs plain':>8}")
    for direction in ("receive", "send"):
        for size in (64, 1400):
            rows = [(k[2], v) for k, v in results.items() if k[0] == direction and k[1] == size]
            base = rows[0][1]  # the plain loop: two measurements per round
            for name, values in rows:
                per_round = [statistics.mean(v) for v in values]
                ratios = [p / statistics.mean(b) for p, b in zip(per_round, base)]
                print(f"{direction:<9} {size:>5}  {name:<24} {statistics.median(per_round):>12,.0f}  "
                      f"{statistics.median(ratios):>7.0%}")


def plain_round(adapter: Adapter, sender: socket.socket, payload: bytes, out_pkt: bytes, count: int, size: int,
                results: dict, r: int) -> None:
    """The plain loops, on a queue of their own (no session attached meanwhile)."""
    fd = tun.open_queue(adapter.kernel_name)
    try:
        tun.set_offload(fd, 0)
        prefill(sender, payload, count)
        n, dt = timed(lambda: drain_plain(fd))
        _record(results, ("receive", size, "plain os.read loop"), n, count, dt, r)
        prefill(sender, payload, count)
        n, dt = timed(lambda: drain_plain_strip(fd))
        _record(results, ("receive", size, "plain read + strip hdr"), n, count, dt, r)
        n, dt = timed(lambda: send_plain(fd, out_pkt, count))
        _record(results, ("send", size, "plain os.writev loop"), n, count, dt, r)
    finally:
        os.close(fd)


def _record(results: dict, key: tuple[str, int, str], n: int, expected: int, dt: float, r: int = -1) -> None:
    """Packets/s of one measurement, kept per round (a round may measure a method more than once)."""
    if n != expected:
        raise SystemExit(f"{key}: moved {n} packets, expected {expected} (the queue dropped some?)")
    per_round = results.setdefault(key, [])
    if r < 0 or r >= len(per_round):
        per_round.append([])
    per_round[-1].append(n / dt)


if __name__ == "__main__":
    main()
