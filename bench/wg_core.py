"""Micro-benchmark of the WireGuard core's transport path: encrypt + decrypt of 1400-byte packets.

Two cores complete a handshake in memory, then A encrypts N IPv4 packets (send_packet) and B
decrypts them (receive_datagram).  Prints packets/s and Mbit/s for each direction alone and for the
round trip, for the single-packet and batch calls.  No sockets, no TUN.

    .venv/bin/python bench/wg_core.py [--packets N] [--size BYTES] [--batch N]
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import time

from wiretun.wireguard import keys
from wiretun.wireguard.core import WireGuard


def ipv4_packet(src: str, dst: str, size: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        size,
        0,
        0,
        64,
        17,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return header + bytes(size - len(header))


def pair() -> tuple[WireGuard, WireGuard]:
    ka, kb = keys.generate_private_key(), keys.generate_private_key()
    a, b = WireGuard(ka), WireGuard(kb)
    pb = a.add_peer(keys.public_key(kb))
    pb.endpoint = ("192.0.2.2", 51820)
    pb.add_allowed_ip("10.0.0.2/32")
    pa = b.add_peer(keys.public_key(ka))
    pa.endpoint = ("192.0.2.1", 51820)
    pa.add_allowed_ip("10.0.0.1/32")
    now = 100.0
    a.send_packet(ipv4_packet("10.0.0.1", "10.0.0.2", 100), now)
    for _ in range(4):  # initiation, response, keepalive + first packet
        for src, dst, addr in ((a, b, ("192.0.2.1", 51820)), (b, a, ("192.0.2.2", 51820))):
            for data, _ep in src.take_datagrams():
                dst.receive_datagram(data, addr, now)
    a.take_packets()
    b.take_packets()
    assert pb.has_session and pa.has_session, "handshake did not complete"
    return a, b


def run(count: int, size: int, batch: int) -> None:
    a, b = pair()
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", size)
    source = ("192.0.2.1", 51820)
    now = 101.0
    rounds = count // batch
    clock = time.perf_counter

    # One call per packet, in rounds of `batch` so the buffers stay in cache (as in a device loop).
    encrypt_s = decrypt_s = 0.0
    send, receive = a.send_packet, b.receive_datagram
    for _ in range(rounds):
        t0 = clock()
        for _ in range(batch):
            send(packet, now)
        t1 = clock()
        datagrams = a.take_datagrams()
        t2 = clock()
        for data, _ep in datagrams:
            receive(data, source, now)
        t3 = clock()
        encrypt_s += t1 - t0
        decrypt_s += t3 - t2
        delivered = b.take_packets()
        assert len(delivered) == batch, (len(delivered), b.stats.as_dict())

    # The batch calls.
    packets = [packet] * batch
    both_s = 0.0
    for _ in range(rounds):
        t0 = clock()
        a.send_packets(packets, now)
        b.receive_datagrams([(data, source) for data, _ep in a.take_datagrams()], now)
        both_s += clock() - t0
        assert len(b.take_packets()) == batch

    total = rounds * batch
    rows = [
        ("encrypt (send_packet)", total / encrypt_s),
        ("decrypt (receive_datagram)", total / decrypt_s),
        ("encrypt+decrypt", total / (encrypt_s + decrypt_s)),
        (f"encrypt+decrypt, batch calls of {batch}", total / both_s),
    ]
    print(f"WireGuard core, {size}-byte IPv4 packets, {total} packets per row")
    print(f"{'path':38} {'packets/s':>12} {'Mbit/s':>10}")
    for name, rate in rows:
        print(f"{name:38} {rate:12,.0f} {rate * size * 8 / 1e6:10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not 20 <= args.size <= 65535:
        parser.error(f"--size must be 20..65535, got {args.size}")
    if not 1 <= args.batch <= args.packets:
        parser.error(f"--batch must be 1..--packets, got {args.batch}")
    run(args.packets, args.size, args.batch)


if __name__ == "__main__":
    main()
