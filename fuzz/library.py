"""Library fuzzing: wiretun.ring, the offload helpers and a live session, with random and hostile
arguments, against oracles that can fail.

Run by ``fuzz/run.py`` once with the C loops and once with ``WIRETUN_NO_SPEEDUPS=1`` (each in its own
process, so a crash is a crash of that run only); it prints one JSON object on its last line:
``{"calls": n, "defects": [...], "transcript": sha256, "speedups": bool, ...}``. The transcript is a
hash of every call's outcome (return summary or exception class) in the seeded sequence: the C and the
pure-Python paths must produce the same one.

A defect is: an exception that is not a :class:`wiretun.WintunError` (bad input must get a clear
error, never ``struct.error``, ``IndexError``, ``OverflowError``...), an out-of-range argument accepted
(a negative offset that silently reads or writes elsewhere), or a wrong result (bytes that do not come
out of the ring as they went in, a checksum that does not verify, payload lost or reordered by
split/coalesce).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import wiretun
from wiretun import offload as O
from wiretun import packet as P
from wiretun.errors import WintunError
from wiretun.ring import MIN_CAPACITY, Consumer, Producer, Ring, ring_size

MAX_DEFECTS_KEPT = 40


class Fuzz:
    """Counts, the transcript and the defects of one run."""

    current: Fuzz  # the run in progress (one per process)

    def __init__(self, seed: int) -> None:
        Fuzz.current = self
        self.foreign = 0  # packets the kernel queued on its own (see _is_ours)
        self.rng = random.Random(seed)
        self.calls = 0
        self.by_area: dict[str, int] = {}
        self.defects: list[str] = []
        self.defect_count = 0
        self._transcript = hashlib.sha256()
        self.lines: list[str] | None = None  # the transcript itself, when asked for

    def record(self, area: str, what: str, outcome: str) -> None:
        self.calls += 1
        self.by_area[area] = self.by_area.get(area, 0) + 1
        line = f"{area}|{what}|{outcome}"
        self._transcript.update(line.encode() + b"\n")
        if self.lines is not None:
            self.lines.append(line)

    def defect(self, text: str) -> None:
        self.defect_count += 1
        if len(self.defects) < MAX_DEFECTS_KEPT:
            self.defects.append(text)

    def call(self, area: str, what: str, fn: Callable[[], Any], *, must_fail: bool = False,
             loose: bool = False) -> tuple[bool, Any]:
        """Run ``fn``; a non-WintunError exception is a defect (a TypeError is fine when ``loose``: an
        argument of the wrong type, which a type checker catches). Returns (ok, value or exception)."""
        try:
            value = fn()
        except WintunError as exc:
            self.record(area, what, type(exc).__name__)
            return False, exc
        except TypeError as exc:
            self.record(area, what, "TypeError")
            if not loose:
                self.defect(f"{area}: {what} raised TypeError: {exc}")
            return False, exc
        except Exception as exc:  # the defect this fuzzer looks for
            self.record(area, what, "raw:" + type(exc).__name__)
            self.defect(f"{area}: {what} raised {type(exc).__name__}: {exc}")
            return False, exc
        self.record(area, what, "ok:" + _summary(value))
        if must_fail:
            self.defect(f"{area}: {what} was accepted (returned {_summary(value)}); it must be refused")
        return True, value

    @property
    def transcript(self) -> str:
        return self._transcript.hexdigest()

    def weird_int(self) -> Any:
        rng = self.rng
        return rng.choice([
            -1, -2, -10, -12, -(2**31), 0, 1, 2, 3, 4, 9, 10, 11, 0xFFFF, 0x10000, 2**31, 2**32, 2**63, 2**64,
            2**70, True, False, None, 1.5, float("nan"), float("inf"), -float("inf"), "7", b"7",
            rng.randrange(-100, 100), rng.randrange(0, 70000),
        ])


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def wrong_type(*values: object) -> bool:
    """Whether an int parameter got something else (a bool counts: accepting True as 1 is no defect)."""
    return any(not isinstance(v, int) for v in values)


def _summary(value: Any) -> str:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{type(value).__name__}[{len(value)}]"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__}[{len(value)}]"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------- ring


def fuzz_ring(f: Fuzz, rounds: int) -> None:
    """Producer and Consumer on one ring: random sizes, sends and releases (in and out of order),
    bogus arguments, and a ring whose words another side corrupted. Bytes must come out as they went in."""
    rng = f.rng
    for _ in range(rounds):
        _ring_round(f, rng)
    # Construction with hostile buffers and capacities.
    for _ in range(rounds):
        cap = f.weird_int()
        size = rng.choice([0, 12, MIN_CAPACITY, ring_size(MIN_CAPACITY), ring_size(MIN_CAPACITY) + 4])
        f.call("ring", f"Ring(bytearray({size}), {cap!r})", partial(Ring, bytearray(size), cap),
               loose=wrong_type(cap))
        f.call("ring", "Ring(bytes)", partial(Ring, bytes(ring_size(MIN_CAPACITY))))
        off = f.weird_int()
        f.call("ring", f"Ring(offset={off!r})",
               partial(Ring, bytearray(ring_size(MIN_CAPACITY) + 64), MIN_CAPACITY, offset=off),
               loose=wrong_type(off))


def _ring_round(f: Fuzz, rng: random.Random) -> None:
    if True:
        buf = bytearray(ring_size(MIN_CAPACITY))
        ring = Ring(buf)
        prod, cons = Producer(ring), Consumer(ring)
        pending: list[tuple[int, bytes]] = []  # allocated, unsent
        order: list[bytes] = []  # every allocation's bytes, in allocation order: the order of receipt
        received = 0
        held: list[int] = []
        for _step in range(rng.randrange(20, 120)):
            op = rng.random()
            if op < 0.3:
                size = rng.choice([1, 20, 60, 1280, 1500, 0xFFFF, rng.randrange(1, 3000)])
                ok, off = f.call("ring", f"allocate({size})", partial(prod.try_allocate, size))
                if ok and off >= 0:
                    data = rng.randbytes(size)
                    ring.data[off : off + size] = data
                    pending.append((off, data))
                    order.append(data)
            elif op < 0.38:
                bad = f.weird_int()
                valid = isinstance(bad, int) and 0 < bad <= 0xFFFF
                ok, off = f.call("ring", f"allocate({bad!r})", partial(prod.try_allocate, bad),
                                 must_fail=not valid, loose=wrong_type(bad))
                if ok and isinstance(off, int) and off >= 0:
                    data = bytes(ring.data[off : off + int(bad)])
                    pending.append((off, data))
                    order.append(data)
            elif op < 0.55 and pending:
                i = rng.randrange(len(pending))
                off, _data = pending.pop(i)
                f.call("ring", "send", partial(prod.send, off))
            elif op < 0.6:
                bad = f.weird_int()
                unsent = [o for o, _ in pending]
                ok, _ = f.call("ring", f"send({bad!r})", partial(prod.send, bad),
                               must_fail=not (isinstance(bad, int) and bad in unsent), loose=wrong_type(bad))
                if ok and bad in unsent:
                    del pending[unsent.index(bad)]
            elif op < 0.78:
                ok, off = f.call("ring", "poll", cons.poll)
                if ok and off >= 0:
                    held.append(off)
                    got = bytes(ring.data[off : off + cons.size(off)])
                    if received >= len(order) or got != order[received] or any(off == o for o, _ in pending):
                        f.defect(f"ring: receipt {received} is not allocation {received} as sent "
                                 f"({len(got)} bytes)")
                    received += 1
            elif op < 0.9 and held:
                i = rng.randrange(len(held))
                off = held.pop(i)
                f.call("ring", "release", partial(cons.release, off))
            elif op < 0.95:
                bad = f.weird_int()
                f.call("ring", f"release({bad!r})", partial(cons.release, bad),
                       must_fail=not (isinstance(bad, int) and bad in held), loose=wrong_type(bad))
                if isinstance(bad, int) and bad in held:
                    held.remove(bad)
            else:
                f.call("ring", "free", prod.free)
        # A corrupted ring: another side wrote nonsense into Head, Tail or a Size.
        words = ring.words
        which = rng.choice(["head", "tail", "size"])
        value = rng.choice([1, 2, 3, MIN_CAPACITY, MIN_CAPACITY + 4, 0x7FFFFFFC, 0xFFFFFFFE, rng.getrandbits(32)])
        if which == "head":
            words[0] = value
        elif which == "tail":
            words[1] = value
        else:
            words[3 + (rng.randrange(0, MIN_CAPACITY) >> 2)] = value
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("poll", cons.poll), ("allocate(100)", partial(prod.try_allocate, 100)), ("free", prod.free),
            ("available", cons.available)]
        for name, fn in calls:
            f.call("ring-corrupt", f"{which}={value:#x} {name}", fn)
        f.call("ring", "Consumer(corrupt)", partial(Consumer, ring))
        f.call("ring", "Producer(corrupt)", partial(Producer, ring))


# ----------------------------------------------------------------------------------------- offload


def _ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _finished(packet: bytes, start: int, where: int) -> bytes:
    """What finishing a NEEDS_CSUM checksum must give (the kernel's skb_checksum_help), computed here
    independently: the field's partial sum plus the sum of the bytes from ``start`` with the field zeroed."""
    at = start + where
    out = bytearray(packet)
    initial = (out[at] << 8) | out[at + 1]
    out[at] = out[at + 1] = 0
    total = _ones(bytes(out[start:])) + initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    value = ~total & 0xFFFF
    struct.pack_into("!H", out, at, value or 0xFFFF)
    return bytes(out)


def _tcp_or_udp(rng: random.Random, v6: bool, tcp: bool, payload: bytes, seq: int = 1000) -> bytes:
    if v6:
        a, b = "fd00::1", "fd00::2"
        return P.ipv6_tcp(a, b, 40000, 80, seq=seq, flags=P.TCP_ACK, payload=payload) if tcp else \
            P.ipv6_udp(a, b, 40000, 53, payload)
    a, b = "10.0.0.1", "10.0.0.2"
    return P.ipv4_tcp(a, b, 40000, 80, seq=seq, flags=P.TCP_ACK, payload=payload) if tcp else \
        P.ipv4_udp(a, b, 40000, 53, payload)


def _flow_payloads(packets: list[bytes]) -> dict[tuple[Any, ...], bytes]:
    out: dict[tuple[Any, ...], bytes] = {}
    for pkt in packets:
        info = P.parse(pkt)
        key = (info.src, info.dst, info.protocol, info.src_port, info.dst_port)
        out[key] = out.get(key, b"") + bytes(pkt[info.payload_offset :])
    return out


def fuzz_offload(f: Fuzz, rounds: int) -> None:
    rng = f.rng
    for _ in range(rounds):
        # VirtioNetHeader.unpack_from: only 0 <= offset <= len - 10 may read.
        buf = rng.randbytes(rng.randrange(0, 40))
        off = rng.choice([f.weird_int(), rng.randrange(-12, 40)])
        good = is_int(off) and 0 <= off <= len(buf) - 10
        ok, hdr = f.call("offload", f"unpack_from([{len(buf)}], {off!r})",
                         partial(O.VirtioNetHeader.unpack_from, buf, off),
                         must_fail=not good and not isinstance(off, bool), loose=wrong_type(off))
        if ok and good and hdr != O.VirtioNetHeader._make(struct.unpack_from("=BBHHHH", buf, off)):
            f.defect(f"offload: unpack_from([{len(buf)}], {off}) read the wrong bytes")
        # pack / pack_into with fields out of range.
        fields = [rng.choice([0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, -1, rng.getrandbits(17)]) for _ in range(6)]
        in_range = all(0 <= v <= (0xFF if i < 2 else 0xFFFF) for i, v in enumerate(fields))
        f.call("offload", f"VirtioNetHeader{tuple(fields)}.pack()",
               O.VirtioNetHeader(*fields).pack, must_fail=not in_range)
        dst = bytearray(rng.randrange(0, 24))
        off = rng.choice([f.weird_int(), rng.randrange(-12, 24)])
        good = is_int(off) and 0 <= off <= len(dst) - 10
        f.call("offload", f"pack_into([{len(dst)}], {off!r})",
               partial(O.VirtioNetHeader(1, 0, 0, 0, 0, 0).pack_into, dst, off),
               must_fail=not good and not isinstance(off, bool), loose=wrong_type(off))
        # finish_checksum: the field must lie inside the packet; the result must verify.
        pkt = bytearray(rng.randbytes(rng.randrange(0, 80)))
        start = rng.choice([f.weird_int(), rng.randrange(-12, 80)])
        where = rng.choice([f.weird_int(), rng.randrange(-12, 20), 6, 16])
        sane = is_int(start) and is_int(where)
        good = sane and 0 <= start and 0 <= where and start + where + 2 <= len(pkt)
        before = bytes(pkt)
        ok, _ = f.call("offload", f"finish_checksum([{len(pkt)}], {start!r}, {where!r})",
                       partial(O.finish_checksum, pkt, start, where),
                       must_fail=not good and not (isinstance(start, bool) or isinstance(where, bool)),
                       loose=wrong_type(start, where))
        if not ok and bytes(pkt) != before:
            f.defect(f"offload: a refused finish_checksum([{len(before)}], {start!r}, {where!r}) changed the packet")
        if ok and good and bytes(pkt) != _finished(before, start, where):
            f.defect(f"offload: finish_checksum([{len(pkt)}], {start}, {where}) wrote the wrong checksum")
        # split: a genuine super-packet must split into segments carrying the payload in order; a
        # mangled header or packet may be refused (WintunError) but not crash or overrun.
        v6, tcp = rng.random() < 0.5, rng.random() < 0.6
        payload = rng.randbytes(rng.randrange(1, 9000))
        sp = bytearray(_tcp_or_udp(rng, v6, tcp, payload))
        ip_len = 40 if v6 else 20
        l4 = 20 if tcp else 8
        gso = rng.choice([1, 7, 100, 536, 1448, rng.randrange(1, 2000)])
        gso_type = (O.GSO_TCPV6 if v6 else O.GSO_TCPV4) if tcp else O.GSO_UDP_L4
        hdr = O.VirtioNetHeader(O.F_NEEDS_CSUM, gso_type, ip_len + l4, gso, ip_len, 16 if tcp else 6)
        mangled = rng.random() < 0.5
        if mangled:
            choice = rng.randrange(4)
            if choice == 0:
                hdr = hdr._replace(**{rng.choice(["hdr_len", "gso_size", "csum_start", "csum_offset"]):
                                      rng.choice([0, 1, 0xFFFF, rng.randrange(0, 200)])})
            elif choice == 1:
                hdr = hdr._replace(gso_type=rng.choice([0, 1, 3, 4, 5, 0x80, 0x85, 0xFF]))
            elif choice == 2:
                for _k in range(rng.randrange(1, 4)):
                    sp[rng.randrange(0, ip_len + l4)] ^= 1 << rng.randrange(8)
            else:
                del sp[rng.randrange(0, len(sp)):]
        nbuf = rng.choice([0, 1, 8, 64, 200])
        out = [bytearray(rng.choice([0, 40, 1500, 2100])) for _ in range(nbuf)]
        sizes = [0] * nbuf
        offset = rng.choice([0, 0, 16, f.weird_int()])
        ok, count = f.call("offload", f"split({tuple(hdr)}, [{len(sp)}], {nbuf} bufs, off={offset!r})",
                           partial(O.split, hdr, sp, out, sizes, offset), loose=wrong_type(offset))
        if ok and not mangled and isinstance(offset, int) and offset >= 0:
            segs = [bytes(out[i][offset : offset + sizes[i]]) for i in range(count)]
            got = b"".join(s[ip_len + l4 :] for s in segs)
            if got != payload or not all(P.verify_checksums(s) for s in segs):
                f.defect(f"offload: split of a genuine {'v6' if v6 else 'v4'} {'TCP' if tcp else 'UDP'} "
                         f"super-packet (gso {gso}) lost payload or left a bad checksum")
        if ok and isinstance(offset, int) and offset < 0:
            f.defect(f"offload: split accepted the negative offset {offset}")
        # coalesce: what goes in comes out (per flow, payload in order), merged or not.
        n = rng.randrange(1, 40)
        batch: list[bytes] = []
        seqs = {False: 1000, True: 1000}
        for _k in range(n):
            v6 = rng.random() < 0.3
            tcp = rng.random() < 0.7
            size = rng.choice([1000, 1000, 1000, rng.randrange(0, 1400)])
            data = rng.randbytes(size)
            pkt = bytearray(_tcp_or_udp(rng, v6, tcp, data, seq=seqs[v6]))
            if tcp:
                seqs[v6] += size
            if rng.random() < 0.05:  # a corrupt one: must be left alone or dropped whole, never merged wrongly
                pkt[rng.randrange(len(pkt))] ^= 0x40
            batch.append(bytes(pkt))
        udp = rng.random() < 0.5
        ok, frames = f.call("offload", f"coalesce({n} packets, udp={udp})", partial(O.coalesce, batch, udp=udp))
        if ok:
            back: list[bytes] = []
            total = 0
            for frame in frames:
                total += frame.count
                header = O.VirtioNetHeader.unpack_from(frame.header)
                if frame.header == O.ZERO_HEADER:
                    back.append(bytes(frame.packet))
                else:
                    ok2, parts = f.call("offload", "split_packets(coalesced)",
                                        partial(O.split_packets, header, frame.packet))
                    if ok2:
                        back.extend(parts)
            if total != n:
                f.defect(f"offload: coalesce of {n} packets accounted for {total}")
            try:
                same = _flow_payloads([p for p in batch if P.verify_checksums(p)]) == \
                    _flow_payloads([p for p in back if P.verify_checksums(p)])
            except WintunError:
                same = True  # a corrupt header in the input: parse refuses it on both sides alike
            if not same:
                f.defect(f"offload: coalesce of {n} packets (udp={udp}) changed a flow's payload or its order")


# ----------------------------------------------------------------------------------------- session


def fuzz_session(f: Fuzz, rounds: int) -> None:
    """A live session on a real TUN device in a namespace of its own: hostile arguments for every call,
    packets sent through the kernel and read back (deterministic: the kernel answers nothing else)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository root: tests.netns
    from tests import netns

    rng = f.rng
    ns = netns.create_up("wtfzl")
    try:
        with netns.entered(ns):
            _session_rounds(f, rng, rounds)
    finally:
        netns.remove(ns)


def _session_rounds(f: Fuzz, rng: random.Random, rounds: int) -> None:
    if True:
        for r in range(rounds):
            offload = r % 2 == 1
            with wiretun.Adapter.create(f"fzl{os.getpid() % 100000}", "Fuzz") as adapter:
                adapter.add_address("10.91.0.1/24")
                adapter.up()
                # No qdisc: a datagram sent to the adapter is in its queue when sendto returns (a qdisc
                # may hand it over later, from another CPU), so both runs see the same queue.
                subprocess.run(["tc", "qdisc", "replace", "dev", adapter.kernel_name, "root", "noqueue"],
                               check=False, capture_output=True)
                with adapter.start_session(0x20000, offload=offload) as s, \
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    # Bound to where the fuzzer's valid packets go (port 9), so the kernel never answers
                    # them with a port unreachable: rate-limited ICMP would make the queue timing-dependent.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                    sock.bind(("10.91.0.1", 9))
                    _session_round(f, rng, s, sock, offload)
                    f.call("session", "end", s.end)
                    f.call("session", "receive_packet(after end)", s.receive_packet)
                    f.call("session", "wait(0) after end", partial(s.wait, 0))


def _session_round(f: Fuzz, rng: random.Random, s: Any, sock: socket.socket, offload: bool) -> None:
    held: list[memoryview] = []
    allocated: list[memoryview] = []
    released: list[memoryview] = []
    queued = 0
    for _step in range(rng.randrange(40, 160)):
        op = rng.randrange(16)
        if op == 0:  # the kernel sends k datagrams into the adapter: they are queued when sendto returns
            k = rng.randrange(1, 20)
            for i in range(k):
                sock.sendto(rng.randbytes(rng.choice([0, 1, 100, 1400])), ("10.91.0.2", 9000 + i))
            queued += k
        elif op == 1:
            ok, v = f.call("session", "try_receive_packet()", partial(_try_one, f, s))
            if ok and v is not None:
                held.append(v)
        elif op == 2:
            n = rng.choice([1, 8, 64, f.weird_int()])
            ok, views = f.call("session", f"receive_packets({n!r})", partial(_many, f, s, n),
                               loose=wrong_type(n))
            if ok:
                held.extend(views)
        elif op == 3:
            t = rng.choice([0, 0.0, 0.001, f.weird_int()])
            if t is None or (isinstance(t, int | float) and not isinstance(t, bool) and t > 0.01 and t == t):
                continue  # a real wait on an empty queue: the time it takes is not this fuzzer's business
            f.call("session", f"wait({t!r})", partial(s.wait, t), loose=not isinstance(t, int | float))
        elif op == 4:
            t = rng.choice([0, 0.001, -1, float("nan"), "1", 2**70])
            if t == 2**70:  # no limit: it returns when a packet comes, so one is sent first
                sock.sendto(b"wake", ("10.91.0.2", 9999))
                queued += 1
            f.call("session", f"wait_receive_packet({t!r})",
                   partial(_wait_one, f, s, t), loose=not isinstance(t, int | float))
        elif op == 5 and held:
            v = held.pop(rng.randrange(len(held)))
            f.call("session", "release_receive_packet", partial(s.release_receive_packet, v))
            released.append(v)
        elif op == 6:
            bogus = rng.choice([b"x", bytearray(4), memoryview(b"abc"), None, 7] +
                               ([released[-1]] if released else []) + ([allocated[-1]] if allocated else []))
            f.call("session", f"release_receive_packet({type(bogus).__name__})",
                   partial(s.release_receive_packet, bogus), must_fail=True, loose=True)
        elif op == 7 and held:
            k = rng.randrange(1, len(held) + 1)
            batch = held[:k]
            del held[:k]
            if rng.random() < 0.3:
                batch = batch + batch[:1]  # listed twice: refused whole
                ok, _ = f.call("session", "release_receive_packets(dup)",
                               partial(s.release_receive_packets, batch), must_fail=True)
                if not ok:
                    f.call("session", "release_receive_packets", partial(s.release_receive_packets, batch[:-1]))
            else:
                f.call("session", "release_receive_packets", partial(s.release_receive_packets, batch))
            released.extend(batch)
        elif op == 8:
            size = rng.choice([20, 28, 1500, f.weird_int()])
            good = isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 0xFFFF
            ok, v = f.call("session", f"allocate_send_packet({size!r})", partial(s.allocate_send_packet, size),
                           must_fail=not good and not isinstance(size, bool), loose=wrong_type(size))
            if ok:
                allocated.append(v)
        elif op == 9 and allocated:
            v = allocated.pop(rng.randrange(len(allocated)))
            v[:] = rng.randbytes(len(v))  # garbage: the kernel drops it (no answer comes)
            header = rng.choice([None, None, b"\0" * 10, b"\x01" * 10, O.VirtioNetHeader(1, 0, 0, 0, 20, 6),
                                 b"short", 42])
            f.call("session", f"send_packet(header={type(header).__name__})",
                   partial(s.send_packet, v, header), loose=isinstance(header, int))
        elif op == 10:
            bogus = rng.choice([memoryview(bytearray(20)), b"\x45" * 20, None, 3] +
                               ([released[-1]] if released else []))
            f.call("session", f"send_packet({type(bogus).__name__})", partial(s.send_packet, bogus),
                   must_fail=True, loose=not isinstance(bogus, memoryview))
        elif op == 11:
            dead = memoryview(bytearray(40))
            dead.release()
            items = rng.choice([
                [b""], [b"\x45" * 0x10000], [dead], [None], "abc", 5, [memoryview(b"ab").cast("c")],
                [rng.randbytes(rng.randrange(20, 200)) for _ in range(rng.randrange(1, 6))],
                [bytes(P.ipv4_udp("10.91.0.2", "10.91.0.1", 1, 9, b"fz"))] * rng.randrange(1, 5),
            ])
            f.call("session", f"send_packets({_summary(items)})", partial(s.send_packets, items),
                   loose=not isinstance(items, list) or None in items)
        elif op == 12 and held:
            v = rng.choice(held)
            ok, hdr = f.call("session", "packet_header", partial(s.packet_header, v))
            if ok and not offload and hdr != O.VirtioNetHeader():
                f.defect("session: a non-offload session reported a non-zero header")
        elif op == 13:
            bogus = rng.choice([memoryview(b"x"), None, 5] + ([released[-1]] if released else []))
            f.call("session", f"packet_header({type(bogus).__name__})", partial(s.packet_header, bogus),
                   must_fail=True, loose=True)
        elif op == 14:
            n = rng.choice([2**63, 2**64, -1, 0, 1.0, "3", None, True])
            f.call("session", f"receive_packets({n!r})", partial(s.receive_packets, n),
                   must_fail=not (isinstance(n, int) and 0 < n) and not isinstance(n, bool), loose=wrong_type(n))
        else:
            t = rng.choice([float("inf"), 1e300, 2**64])
            # An infinite or huge timeout on a queue with packets waiting returns at once.
            if held or queued:
                sock.sendto(b"wake", ("10.91.0.2", 9999))
                queued += 1
                f.call("session", f"wait_receive_packet({t!r})",
                       partial(_receive_into, held, s, t))
    # Drain and check what the kernel queued: every datagram sent arrives, none twice.
    got = 0
    for _ in range(200):
        ok, views = f.call("session", "receive_packets(64) drain", partial(_many, f, s, 64))
        if not ok or not views:
            break
        got += len(views)
        f.call("session", "release_receive_packets", partial(s.release_receive_packets, views))
    for v in held:
        f.call("session", "release_receive_packet(held)", partial(s.release_receive_packet, v))


# The kernel may put packets of its own into the queue at any moment (an ICMP error, rate-limited, so
# timing decides whether it is sent): they are released and counted, not fuzzed, so that the C and the
# pure-Python runs see the same queue. The fuzzer's own packets are UDP to 10.91.0.2, ports 9000-9999.
def _is_ours(view: memoryview) -> bool:
    pkt = bytes(view[:24])
    return len(pkt) >= 24 and pkt[0] == 0x45 and pkt[9] == 17 and pkt[16:20] == bytes([10, 91, 0, 2]) and \
        9000 <= int.from_bytes(pkt[22:24], "big") <= 9999


def _keep_ours(f: Fuzz, s: Any, views: list[memoryview]) -> list[memoryview]:
    ours = [v for v in views if _is_ours(v)]
    for v in views:
        if not _is_ours(v):
            f.foreign += 1
            s.release_receive_packet(v)
    return ours


def _try_one(f: Fuzz, s: Any) -> memoryview | None:
    for _ in range(100):
        view: memoryview | None = s.try_receive_packet()
        if view is None or _is_ours(view):
            return view
        f.foreign += 1
        s.release_receive_packet(view)
    return None


def _many(f: Fuzz, s: Any, n: Any) -> list[memoryview]:
    return _keep_ours(f, s, s.receive_packets(n))


def _wait_one(f: Fuzz, s: Any, timeout: Any) -> memoryview | None:
    view: memoryview | None = s.wait_receive_packet(timeout)
    if view is None or _is_ours(view):
        return view
    f.foreign += 1
    s.release_receive_packet(view)
    return _try_one(f, s)


def _receive_into(held: list[memoryview], s: Any, timeout: float) -> memoryview | None:
    view = _wait_one(Fuzz.current, s, timeout)
    if view is not None:
        held.append(view)
    return view


# ------------------------------------------------------------------------------------------- main


def _speedups_in_use() -> bool:
    """Whether the session's per-packet work runs in C in this process."""
    import importlib

    for module in ("wiretun.linux.engine", "wiretun.linux.loops", "wiretun.session"):
        try:
            return bool(importlib.import_module(module).SPEEDUPS)
        except (ImportError, AttributeError):
            continue
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wiretun library fuzzing (one path: C or pure Python)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200, help="rounds per area (default 200)")
    parser.add_argument("--no-session", action="store_true", help="skip the live session (needs root)")
    parser.add_argument("--transcript", metavar="FILE", help="write every call's outcome, one a line")
    args = parser.parse_args(argv)
    f = Fuzz(args.seed)
    if args.transcript:
        f.lines = []
    started = time.monotonic()
    timings: dict[str, float] = {}
    areas: list[tuple[str, Callable[[Fuzz, int], None], int]] = [
        ("ring", fuzz_ring, max(1, args.rounds // 4)),
        ("offload", fuzz_offload, args.rounds * 4),
    ]
    if not args.no_session:
        areas.append(("session", fuzz_session, max(2, args.rounds // 10)))
    for name, fn, rounds in areas:
        t0 = time.monotonic()
        try:
            fn(f, rounds)
        except Exception as exc:  # a raw exception escaping the harness's own guards: also a defect
            f.defect(f"{name}: harness stopped by {type(exc).__name__}: {exc}")
        timings[name] = round(time.monotonic() - t0, 2)
    if args.transcript and f.lines is not None:
        with open(args.transcript, "w") as out:
            out.write("\n".join(f.lines) + "\n")
    print(json.dumps({
        "speedups": _speedups_in_use(),
        "calls": f.calls,
        "foreign": f.foreign,
        "by_area": f.by_area,
        "defect_count": f.defect_count,
        "defects": f.defects,
        "transcript": f.transcript,
        "seconds": round(time.monotonic() - started, 2),
        "timings": timings,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
