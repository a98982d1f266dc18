"""wiretun._speedups (the optional C loops) against the pure-Python loops, on the same input.

The "TUN queue" here is a non-blocking AF_UNIX datagram socketpair: like a TUN queue it hands out one
datagram (virtio-net header + packet) per read, says EAGAIN when empty and takes one datagram per write.
Each case runs twice from identical starting states (ring bytes, Head, Tail, queued datagrams), once with
the C function and once with its Python twin, and everything observable must match byte for byte: the
whole ring, the headers, the views, the offsets, the return values, what the kernel got.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wiretun
from wiretun.ring import (
    DATA_WORD,
    HEAD_WORD,
    MAX_PACKET_SIZE,
    MAX_RECORD_SIZE,
    MIN_CAPACITY,
    TAIL_WORD,
    Ring,
    ring_size,
)

HDR = 10
SPAN = MAX_PACKET_SIZE
SO_SNDBUFFORCE = 32

if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1":
    pytest.skip("WIRETUN_NO_SPEEDUPS=1: the C accelerator is switched off for this run", allow_module_level=True)

from wiretun import _speedups as C  # noqa: E402  (after the skip: a missing module must fail, not skip)

# The pure-Python twins are the session's fallback loops themselves.
from wiretun.linux import loops  # noqa: E402
from wiretun.linux.loops import _py_rx_frames as py_rx_frames  # noqa: E402
from wiretun.linux.loops import _py_rx_one as py_rx_one  # noqa: E402
from wiretun.linux.loops import _py_rx_pull as py_rx_pull  # noqa: E402
from wiretun.linux.loops import _py_tx_direct as py_tx_direct  # noqa: E402
from wiretun.linux.loops import _py_tx_flush as py_tx_flush  # noqa: E402

FRAME_SPAN = C.FRAME_SPAN
FRAME_RECORD = (4 + FRAME_SPAN + 3) & ~3


# ------------------------------------------------------------------------------------------------
# Helpers


def queue_pair(sndbuf: int = 1 << 20):
    """(reader, writer): a non-blocking datagram socketpair standing in for a TUN queue."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    writer.setblocking(False)
    for sock in (reader, writer):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return reader, writer


def header(i: int) -> bytes:
    return bytes((i * 7 + k + 1) & 0xFF for k in range(HDR))


def pattern(i: int, size: int) -> bytes:
    return bytes((i * 31 + k * 3 + 5) & 0xFF for k in range(size))


def new_ring(capacity: int = MIN_CAPACITY, *, head: int = 0, tail: int = 0, fill: int = 0xA5) -> tuple[bytearray, Ring]:
    buf = bytearray([fill]) * ring_size(capacity)
    ring = Ring(buf, capacity)
    ring.words[HEAD_WORD] = head
    ring.words[TAIL_WORD] = tail
    ring.words[2] = 0
    return buf, ring


FRAME_SLACK = FRAME_RECORD - MAX_RECORD_SIZE + 16  # as an offload session allocates it


def new_frame_ring(capacity: int = MIN_CAPACITY, *, head: int = 0, tail: int = 0, fill: int = 0xA5):
    """A ring with room for frames past the trailing area: (buffer, Ring, data view to the buffer's end)."""
    buf = bytearray([fill]) * (ring_size(capacity) + FRAME_SLACK)
    ring = Ring(buf, capacity)
    ring.words[HEAD_WORD] = head
    ring.words[TAIL_WORD] = tail
    ring.words[2] = 0
    return buf, ring, memoryview(buf)[12:]


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(0x20000))
        except BlockingIOError:
            return out


class Side:
    """One run: a ring and a queue with the given datagrams waiting."""

    def __init__(self, datagrams, *, capacity=MIN_CAPACITY, head=0, tail=0, hdr_size=HDR):
        self.buf, self.ring = new_ring(capacity, head=head, tail=tail)
        self.reader, self.writer = queue_pair()
        for dg in datagrams:
            self.writer.send(dg)
        self.hdr = bytearray(hdr_size)
        self.scratch = bytearray(SPAN)

    def close(self):
        self.reader.close()
        self.writer.close()


def both(datagrams, **kw):
    sides = Side(datagrams, **kw), Side(datagrams, **kw)
    return sides


# ------------------------------------------------------------------------------------------------
# The extension is there and in use


def test_extension_is_built_and_used_by_sessions():
    """CI must notice a silent fallback: this environment has to have the compiled module, and sessions
    must run their loops in it (WIRETUN_NO_SPEEDUPS=1 skips this module instead)."""
    path = Path(C.__file__)
    assert path.suffix == ".so", f"wiretun._speedups loaded from {path}, not a compiled extension"
    assert path.parent == Path(wiretun.__file__).parent
    assert loops.SPEEDUPS is True
    for name in ("rx_pull", "rx_frames", "rx_one", "tx_flush", "tx_direct"):
        assert getattr(loops, "_" + name) is getattr(C, name)


def test_python_loops_are_chosen_without_the_extension():
    """WIRETUN_NO_SPEEDUPS=1 gives the pure-Python twins (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import wiretun.linux.loops as s; "
        "print(s.SPEEDUPS, *(getattr(s, '_' + n) is getattr(s, '_py_' + n) "
        "for n in ('rx_pull', 'rx_frames', 'rx_one', 'tx_flush', 'tx_direct')))"
    )
    env = dict(os.environ, WIRETUN_NO_SPEEDUPS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] + ["True"] * 5


# ------------------------------------------------------------------------------------------------
# rx_pull


def run_rx_pull(datagrams, *, max_count, capacity=MIN_CAPACITY, head=0, tail=0, stride=0, offsets=True):
    a, b = both(datagrams, capacity=capacity, head=head, tail=tail, hdr_size=max(HDR, stride * max_count))
    try:
        va, vb = [], []
        oa, ob = ([], []) if offsets else (None, None)
        ra = C.rx_pull(a.reader.fileno(), a.ring.words, a.ring.data, max_count, a.hdr, stride, a.scratch, va, oa)
        rb = py_rx_pull(b.reader.fileno(), b.ring.words, b.ring.data, max_count, b.hdr, stride, b.scratch, vb, ob)
        assert ra == rb
        assert a.buf == b.buf  # the whole ring: Head, Tail, Size words, packet bytes, untouched bytes
        assert a.hdr == b.hdr
        assert oa == ob
        assert [bytes(v) for v in va] == [bytes(v) for v in vb]
        # views are windows into the ring where the offsets say
        for view, off in zip(va, oa if offsets else [None] * len(va)):
            assert view.obj is a.ring.data.obj
            if off is not None:
                assert bytes(view) == bytes(a.ring.data[off : off + len(view)])
        assert drain(a.reader) == drain(b.reader)  # the same packets were left in the queue
        return ra, va, a
    finally:
        a.close()
        b.close()


def test_rx_pull_reads_packets_into_ring_at_tail():
    pkts = [pattern(i, s) for i, s in enumerate([20, 1, 60, 1500, 0xFFFF, 3])]
    (count, tail, status, dropped), views, side = run_rx_pull(
        [header(i) + p for i, p in enumerate(pkts)], max_count=64
    )
    assert (count, status, dropped) == (6, errno.EAGAIN, 0)
    assert [bytes(v) for v in views] == pkts
    expected_tail = sum((len(p) + 7) & ~3 for p in pkts)
    assert tail == expected_tail == side.ring.words[TAIL_WORD]
    off = 0
    for p in pkts:
        assert struct.unpack_from("<I", side.buf, 12 + off)[0] == len(p)
        off += (len(p) + 7) & ~3


def test_rx_pull_stops_at_max_count_and_leaves_the_rest_queued():
    dgs = [header(i) + pattern(i, 40 + i) for i in range(10)]
    (count, tail, status, dropped), views, _ = run_rx_pull(dgs, max_count=4)
    assert (count, status, dropped) == (4, 0, 0)


def test_rx_pull_more_than_a_chunk():
    dgs = [header(i) + pattern(i, 28 + i % 50) for i in range(3 * C.CHUNK + 5)]
    (count, _, status, _), views, _ = run_rx_pull(dgs, max_count=1000)
    assert (count, status) == (len(dgs), errno.EAGAIN)


def test_rx_pull_empty_queue_and_zero_max_count():
    (count, tail, status, dropped), views, side = run_rx_pull([], max_count=8, head=0x100, tail=0x100)
    assert (count, tail, status, dropped, views) == (0, 0x100, errno.EAGAIN, 0, [])
    (count, tail, status, dropped), views, _ = run_rx_pull([header(0) + b"x"], max_count=0)
    assert (count, tail, status, dropped, views) == (0, 0, 0, 0, [])


def test_rx_pull_per_packet_headers_with_stride():
    dgs = [header(i) + pattern(i, 30) for i in range(5)]
    (count, *_), _, side = run_rx_pull(dgs, max_count=5, stride=16)
    assert count == 5
    for i in range(5):
        assert side.hdr[i * 16 : i * 16 + HDR] == header(i)


def test_rx_pull_wraps_into_the_trailing_area_and_back():
    cap = MIN_CAPACITY
    # Tail near the end of Data: the first packets run into the trailing area, then the next one starts
    # at the wrapped offset.
    start = cap - 0x40
    dgs = [header(i) + pattern(i, s) for i, s in enumerate([100, 200, 50])]
    (count, tail, status, dropped), views, side = run_rx_pull(dgs, max_count=8, head=start, tail=start)
    assert (count, status, dropped) == (3, errno.EAGAIN, 0)


def test_rx_pull_slow_path_copies_when_room_is_short_and_drops_what_does_not_fit():
    # Head 0x800 bytes ahead of Tail: less than a maximum record free, so reads go through scratch.
    tail = 0x1000
    head = tail + 0x800
    dgs = [header(0) + pattern(0, 100), header(1) + pattern(1, 0x900), header(2) + pattern(2, 0x200)]
    (count, new_tail, status, dropped), views, side = run_rx_pull(dgs, max_count=8, head=head, tail=tail)
    assert (count, status, dropped) == (2, errno.EAGAIN, 1)
    assert [bytes(v) for v in views] == [pattern(0, 100), pattern(2, 0x200)]


def test_rx_pull_full_ring_drops_everything():
    dgs = [header(i) + pattern(i, 8) for i in range(3)]
    (count, tail, status, dropped), views, _ = run_rx_pull(dgs, max_count=8, head=0x104, tail=0x100)
    assert (count, tail, status, dropped) == (0, 0x100, errno.EAGAIN, 3)


def test_rx_pull_short_read_ends_the_batch_after_publishing():
    dgs = [header(0) + pattern(0, 50), header(1) + pattern(1, 60), b"\x01\x02\x03", header(3) + b"zz"]
    (count, tail, status, dropped), views, side = run_rx_pull(dgs, max_count=8)
    assert (count, status) == (2, C.SHORT_READ)
    assert side.ring.words[TAIL_WORD] == tail == 56 + 64


def test_rx_pull_zero_length_packet():
    (count, tail, status, _), views, _ = run_rx_pull([header(0), header(1) + b"abc"], max_count=4)
    assert (count, tail, status) == (2, 4 + 8, errno.EAGAIN)
    assert [bytes(v) for v in views] == [b"", b"abc"]


def test_rx_pull_errno_is_returned():
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        buf, ring = new_ring()
        views: list = []
        assert C.rx_pull(fd, ring.words, ring.data, 4, bytearray(HDR), 0, bytearray(SPAN), views, []) == (
            0, 0, errno.EBADF, 0
        )
        assert views == []
        assert py_rx_pull(fd, ring.words, ring.data, 4, bytearray(HDR), 0, bytearray(SPAN), [], []) == (
            0, 0, errno.EBADF, 0
        )
    finally:
        os.close(fd)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 200), st.integers(1000, 3000), st.sampled_from([0xFFFF, 0xFFFE, 0x8000])),
        max_size=40,
    ).filter(lambda s: sum(s) <= 150_000),
    head=st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4),
    gap=st.one_of(st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4), st.sampled_from([0, 4, 8, 0x10004])),
    max_count=st.integers(0, 45),
    stride=st.sampled_from([0, 10, 12]),
    offsets=st.booleans(),
)
def test_rx_pull_matches_python(sizes, head, gap, max_count, stride, offsets):
    """Any queue content, any Head/Tail (any free space, wrap or not), any max_count: same result."""
    tail = (head + gap) % MIN_CAPACITY  # used = gap bytes between Head and Tail
    dgs = [header(i) + pattern(i, s) for i, s in enumerate(sizes)]
    run_rx_pull(dgs, max_count=max_count, head=head, tail=tail, stride=stride, offsets=offsets)


# ------------------------------------------------------------------------------------------------
# rx_frames (offload sessions: header and packet in one record)


def run_rx_frames(datagrams, *, max_count, head=0, tail=0, offsets=True, headers=True):
    runs = []
    for fn in (C.rx_frames, py_rx_frames):
        buf, ring, data = new_frame_ring(head=head, tail=tail)
        reader, writer = queue_pair()
        try:
            for dg in datagrams:
                writer.send(dg)
            views, offs, hdrs = [], [] if offsets else None, [] if headers else None
            result = fn(reader.fileno(), ring.words, data, max_count, bytearray(FRAME_SPAN), views, offs, hdrs)
            for view in views:
                assert view.obj is data.obj and view.format == "B" and not view.readonly
            runs.append((result, bytes(buf), [bytes(v) for v in views], offs, hdrs, drain(reader)))
        finally:
            reader.close()
            writer.close()
    assert runs[0] == runs[1]
    return runs[0]


def test_rx_frames_keeps_header_and_packet_in_one_record():
    pkts = [pattern(i, s) for i, s in enumerate([20, 1, 1500, 0xFFFF, 3])]
    (count, tail, status, dropped), buf, views, offs, hdrs, rest = run_rx_frames(
        [header(i) + p for i, p in enumerate(pkts)], max_count=64
    )
    assert (count, status, dropped) == (5, errno.EAGAIN, 0)
    assert views == pkts
    assert hdrs == [header(i) for i in range(5)]
    d = 4
    for i, p in enumerate(pkts):
        assert offs[i] == d
        assert struct.unpack_from("<I", buf, 12 + d - 4)[0] == HDR + len(p)  # Size counts the header
        assert buf[12 + d : 12 + d + HDR] == header(i)
        d += (HDR + len(p) + 7) & ~3
    assert tail == d - 4


def test_rx_frames_drops_headerless_and_overlong_reads_and_counts_them_in_max_count():
    dgs = [header(0) + b"a", header(1), b"\x01" * 5, header(3) + pattern(3, 0x10000), header(4) + b"e", b""]
    (count, tail, status, dropped), _, views, _, hdrs, rest = run_rx_frames(dgs, max_count=5)
    assert (count, status, dropped) == (2, 0, 3)
    assert views == [b"a", b"e"] and hdrs == [header(0), header(4)]
    assert rest == [b""]


def test_rx_frames_slow_path_and_wrap():
    # little room: through scratch, the frame that does not fit is dropped
    (count, _, status, dropped), _, views, _, _, _ = run_rx_frames(
        [header(0) + pattern(0, 100), header(1) + pattern(1, 0x900), header(2) + pattern(2, 8)],
        max_count=8, tail=0x1000, head=0x1800,
    )
    assert (count, status, dropped) == (2, errno.EAGAIN, 1)
    # near the end of Data: into the trailing area and its slack, then wrapped
    start = MIN_CAPACITY - 0x20
    (count, tail, status, dropped), _, views, _, _, _ = run_rx_frames(
        [header(i) + pattern(i, s) for i, s in enumerate([0xFFFF, 30])], max_count=8, head=start, tail=start
    )
    assert (count, status, dropped) == (2, errno.EAGAIN, 0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(
        st.one_of(st.integers(-10, 200), st.integers(1000, 3000), st.sampled_from([0xFFFF, 0xFFFE, 0x10000])),
        max_size=40,
    ).filter(lambda s: sum(map(abs, s)) <= 150_000),
    head=st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4),
    gap=st.one_of(st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4), st.sampled_from([0, 4, 8, 0x10010])),
    max_count=st.integers(0, 45),
    offsets=st.booleans(),
    headers=st.booleans(),
)
def test_rx_frames_matches_python(sizes, head, gap, max_count, offsets, headers):
    tail = (head + gap) % MIN_CAPACITY
    dgs = [(header(i) + pattern(i, s)) if s >= 0 else header(i)[: HDR + s] for i, s in enumerate(sizes)]
    run_rx_frames(dgs, max_count=max_count, head=head, tail=tail, offsets=offsets, headers=headers)


def test_rx_frames_errno_is_returned():
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        buf, ring, data = new_frame_ring()
        assert C.rx_frames(fd, ring.words, data, 4, bytearray(FRAME_SPAN), [], [], []) == (0, 0, errno.EBADF, 0)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# rx_one


def run_rx_one(datagrams, *, head=0, tail=0, calls=1):
    a, b = both(datagrams, head=head, tail=tail)
    try:
        results = []
        for _ in range(calls):
            ra = C.rx_one(a.reader.fileno(), a.ring.words, a.ring.data, a.hdr, a.scratch)
            rb = py_rx_one(b.reader.fileno(), b.ring.words, b.ring.data, b.hdr, b.scratch)
            if isinstance(rb, int):
                assert ra == rb and isinstance(ra, int)
            else:
                assert isinstance(ra, memoryview) and bytes(ra) == bytes(rb)
                assert ra.obj is a.ring.data.obj and not ra.readonly and ra.format == "B"
            assert a.buf == b.buf
            assert a.hdr == b.hdr
            results.append(ra)
        assert drain(a.reader) == drain(b.reader)
        return results, a
    finally:
        a.close()
        b.close()


def test_rx_one_reads_each_packet_and_says_when_empty():
    pkts = [pattern(i, s) for i, s in enumerate([40, 0xFFFF, 1])]
    results, side = run_rx_one([header(i) + p for i, p in enumerate(pkts)], calls=4)
    assert [bytes(v) for v in results[:3]] == pkts
    assert results[3] == -1


def test_rx_one_slow_path_and_drop():
    tail, head = 0x2000, 0x2200  # 0x1FC bytes free
    results, side = run_rx_one(
        [header(0) + pattern(0, 0x100), header(1) + pattern(1, 0x100), header(2) + pattern(2, 8)],
        head=head, tail=tail, calls=4,
    )
    assert bytes(results[0]) == pattern(0, 0x100)
    assert results[1] == -2  # 0x104 bytes needed, 0xF8 left
    assert bytes(results[2]) == pattern(2, 8)
    assert results[3] == -1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.one_of(st.integers(-10, 300), st.sampled_from([0xFFFF, 0x4000])), max_size=12),
    head=st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4),
    gap=st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4),
)
def test_rx_one_matches_python(sizes, head, gap):
    """Any queue content (short reads too), any Head/Tail: the same view or status, the same ring."""
    tail = (head + gap) % MIN_CAPACITY
    dgs = [(header(i) + pattern(i, s)) if s >= 0 else header(i)[: HDR + s] for i, s in enumerate(sizes)]
    run_rx_one(dgs, head=head, tail=tail, calls=len(sizes) + 1)


def test_rx_one_errors():
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        buf, ring = new_ring()
        with pytest.raises(OSError) as e:
            C.rx_one(fd, ring.words, ring.data, bytearray(HDR), bytearray(SPAN))
        assert e.value.errno == errno.EBADF
        assert ring.words[TAIL_WORD] == 0
    finally:
        os.close(fd)
    a, b = queue_pair()
    try:
        b.send(b"\x00" * 4)
        assert C.rx_one(a.fileno(), ring.words, ring.data, bytearray(HDR), bytearray(SPAN)) == -3
        assert ring.words[TAIL_WORD] == 0
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------------
# tx_flush


def fill_send_ring(ring: Ring, start: int, sizes: list[int]) -> int:
    """Write packets as a producer would, from record ``start``; returns the new Tail."""
    mask = ring.capacity - 1
    t = start
    for i, s in enumerate(sizes):
        ring.words[DATA_WORD + (t >> 2)] = s
        ring.data[t + 4 : t + 4 + s] = pattern(i, s)
        t = (t + ((s + 7) & ~3)) & mask
    ring.words[HEAD_WORD] = start
    ring.words[TAIL_WORD] = t
    return t


def run_tx_flush(sizes, *, start=0, sndbuf=1 << 20, corrupt=None, hdr=b"HDRHDRHDR!"):
    results = []
    sides = []
    for fn in (C.tx_flush, py_tx_flush):
        buf, ring = new_ring()
        fill_send_ring(ring, start, sizes)
        if corrupt is not None:
            ring.words[DATA_WORD + (corrupt[0] >> 2)] = corrupt[1]
        reader, writer = queue_pair(sndbuf)
        try:
            status = fn(writer.fileno(), ring.words, ring.data, hdr)
            results.append((status, ring.words[HEAD_WORD], bytes(buf), drain(reader)))
        finally:
            reader.close()
            writer.close()
        sides.append(ring)
    assert results[0] == results[1]
    return results[0]


def test_tx_flush_writes_every_packet_in_order():
    sizes = [20, 1, 1500, 0xFFFF, 7]
    status, head, _, got = run_tx_flush(sizes, start=MIN_CAPACITY - 0x100)  # wraps through the trailing area
    assert status == 0
    assert got == [b"HDRHDRHDR!" + pattern(i, s) for i, s in enumerate(sizes)]
    assert head == (MIN_CAPACITY - 0x100 + sum((s + 7) & ~3 for s in sizes)) % MIN_CAPACITY


def test_tx_flush_empty_ring():
    assert run_tx_flush([])[:2] == (0, 0)


def test_tx_flush_stops_at_a_failed_write_with_head_on_it():
    # A datagram larger than the socket's send buffer fails with EMSGSIZE: Head stays on that packet.
    status, head, _, got = run_tx_flush([100, 200, 60000, 50], sndbuf=4096)
    assert status == errno.EMSGSIZE
    assert head == 104 + 204
    assert len(got) == 2


def test_tx_flush_stops_when_the_queue_is_full():
    status, head, _, got = run_tx_flush([3000] * 40, sndbuf=8192)
    assert status == errno.EAGAIN
    assert 0 < len(got) < 40 and head == len(got) * 3004


def test_tx_flush_bad_size_word():
    status, head, _, got = run_tx_flush([10, 20, 30], corrupt=(16, 0x10000))
    assert (status, head, len(got)) == (-1, 16, 1)
    status, head, _, got = run_tx_flush([10, 20, 30], corrupt=(16, 200))  # runs past Tail
    assert (status, head, len(got)) == (-1, 16, 1)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(1, 400), st.integers(4000, 9000)), max_size=30),
    start=st.integers(0, MIN_CAPACITY // 4 - 1).map(lambda x: x * 4),
    sndbuf=st.sampled_from([4096, 16384, 1 << 20]),
)
def test_tx_flush_matches_python(sizes, start, sndbuf):
    run_tx_flush(sizes, start=start, sndbuf=sndbuf)


# ------------------------------------------------------------------------------------------------
# tx_direct


def run_tx_direct(packets, start=0, sndbuf=1 << 20, seq=list, headers=None):
    results = []
    for fn in (C.tx_direct, py_tx_direct):
        reader, writer = queue_pair(sndbuf)
        try:
            r = fn(writer.fileno(), b"0123456789", seq(packets), start, headers)
            results.append((r, drain(reader)))
        finally:
            reader.close()
            writer.close()
    assert results[0] == results[1]
    return results[0]


def test_tx_direct_writes_bytes_bytearray_and_memoryviews():
    big = bytearray(pattern(9, 3000))
    pkts = [b"abc", bytearray(b"defg"), memoryview(big)[100:200], pattern(1, 0xFFFF)] * 30
    for seq in (list, tuple):
        (index, status), got = run_tx_direct(pkts, seq=seq)
        assert (index, status) == (len(pkts), 0)
        assert got == [b"0123456789" + bytes(p) for p in pkts]
    (index, status), got = run_tx_direct(pkts, start=117)
    assert (index, status, len(got)) == (120, 0, 3)


@pytest.mark.parametrize(
    "odd",
    [
        b"",
        bytes(0x10000),
        "text",
        12,
        None,
        array.array("B", b"xyz"),
        memoryview(b"abcdefgh").cast("I"),
        memoryview(bytes(16)).cast("B", (4, 4)),
        type("B", (bytes,), {})(b"subclass"),
    ],
)
def test_tx_direct_leaves_odd_items_to_python(odd):
    pkts = [b"one", b"two", odd, b"four"]
    (index, status), got = run_tx_direct(pkts)
    assert (index, status) == (2, C.NOT_SIMPLE)
    assert got == [b"0123456789one", b"0123456789two"]


def test_tx_direct_released_view_is_left_to_python():
    mv = memoryview(b"released")
    mv.release()
    (index, status), _ = run_tx_direct([b"a", mv])
    assert (index, status) == (1, C.NOT_SIMPLE)


def test_tx_direct_errors():
    (index, status), got = run_tx_direct([b"a" * 100, b"b" * 60000, b"c"], sndbuf=4096)
    assert (index, status, len(got)) == (1, errno.EMSGSIZE, 1)
    (index, status), got = run_tx_direct([bytes(3000)] * 100, sndbuf=8192)
    assert status == errno.EAGAIN and index == len(got) and 0 < index < 100


# ------------------------------------------------------------------------------------------------
# Views keep the ring alive; bad arguments


def test_views_share_the_rings_memory_and_keep_it_alive():
    memory = mmap.mmap(-1, ring_size(MIN_CAPACITY))
    ring = Ring(memory)
    a, b = queue_pair()
    try:
        b.send(header(0) + b"hello")
        view = C.rx_one(a.fileno(), ring.words, ring.data, bytearray(HDR), bytearray(SPAN))
        assert bytes(view) == b"hello"
        view[0:1] = b"J"  # writable, and it is the ring's memory
        assert bytes(ring.data[4:9]) == b"Jello"
        assert (view.nbytes, view.ndim, view.shape, view.strides, view.itemsize) == (5, 1, (5,), (1,), 1)
        assert view.c_contiguous and view.contiguous and view.obj is memory
        assert view.tobytes() == b"Jello" and view[1:3].tobytes() == b"el" and view[-1] == ord("o")
        ring.close()
        with pytest.raises(BufferError):
            memory.close()  # the packet view still exports the mapping
        assert bytes(view) == b"Jello"
        view.release()
        memory.close()
    finally:
        a.close()
        b.close()


def test_bad_arguments_raise_and_touch_nothing():
    buf, ring = new_ring()
    w, d = ring.words, ring.data
    hdr, scratch = bytearray(HDR), bytearray(SPAN)
    a, b = queue_pair()
    fd = a.fileno()
    try:
        b.send(header(0) + b"data")
        with pytest.raises(TypeError, match="9 arguments"):
            C.rx_pull(fd, w, d)
        with pytest.raises(TypeError, match="fd must be an int"):
            C.rx_pull("3", w, d, 1, hdr, 0, scratch, [], [])
        with pytest.raises(ValueError, match="fd -1 is out of range"):
            C.rx_one(-1, w, d, hdr, scratch)
        with pytest.raises(ValueError, match="max_count -1 is out of range"):
            C.rx_pull(fd, w, d, -1, hdr, 0, scratch, [], [])
        with pytest.raises(ValueError, match="fd .* is out of range"):
            C.rx_pull(1 << 70, w, d, 1, hdr, 0, scratch, [], [])
        with pytest.raises(ValueError, match="hdr_stride 5 must be 0 or at least 10"):
            C.rx_pull(fd, w, d, 1, hdr, 5, scratch, [], [])
        with pytest.raises(ValueError, match="hdr has 10 bytes, needs at least 30"):
            C.rx_pull(fd, w, d, 3, hdr, 10, scratch, [], [])
        with pytest.raises(ValueError, match="hdr has 9 bytes, needs at least 10"):
            C.rx_one(fd, w, d, bytearray(9), scratch)
        with pytest.raises(TypeError, match="hdr must be a writable"):
            C.rx_one(fd, w, d, bytes(HDR), scratch)
        with pytest.raises(ValueError, match="scratch has 100 bytes, needs at least 65535"):
            C.rx_one(fd, w, d, hdr, bytearray(100))
        with pytest.raises(TypeError, match="views must be a list"):
            C.rx_pull(fd, w, d, 1, hdr, 0, scratch, (), [])
        with pytest.raises(TypeError, match="offsets must be a list or None"):
            C.rx_pull(fd, w, d, 1, hdr, 0, scratch, [], {})
        with pytest.raises(TypeError, match="data must be a memoryview"):
            C.rx_one(fd, w, buf, hdr, scratch)
        with pytest.raises(ValueError, match="format 'B'"):
            C.rx_one(fd, w, d.cast("I"), hdr, scratch)
        with pytest.raises(ValueError, match="not views of one ring"):
            C.rx_one(fd, w, d[4:], hdr, scratch)
        other_buf, other = new_ring()
        with pytest.raises(ValueError, match="not views of one ring"):
            C.tx_flush(fd, w, other.data, b"0123456789")
        with pytest.raises(TypeError, match="words must be a writable"):
            C.tx_flush(fd, bytes(w), d, b"0123456789")
        with pytest.raises(ValueError, match="hdr has 3 bytes"):
            C.tx_flush(fd, w, d, b"abc")
        odd = bytearray(12 + 0x30000 + 0x10000)
        mv = memoryview(odd)
        with pytest.raises(ValueError, match="words is not a ring: .* power-of-two capacity"):
            C.rx_one(fd, mv, mv[12:], hdr, scratch)
        with pytest.raises(ValueError, match="run at least to the ring's end"):
            C.rx_one(fd, w, d[:-1], hdr, scratch)
        with pytest.raises(ValueError, match="frames need capacity"):
            C.rx_frames(fd, w, d, 1, bytearray(FRAME_SPAN), [], [], [])
        _, fring, fdata = new_frame_ring()
        with pytest.raises(ValueError, match="scratch has 65535 bytes, needs at least 65546"):
            C.rx_frames(fd, fring.words, fdata, 1, bytearray(SPAN), [], [], [])
        with pytest.raises(TypeError, match="headers must be a list or None"):
            C.rx_frames(fd, fring.words, fdata, 1, bytearray(FRAME_SPAN), [], [], ())
        with pytest.raises(TypeError, match="8 arguments"):
            C.rx_frames(fd, fring.words, fdata, 1, bytearray(FRAME_SPAN), [], [])
        mv = memoryview(bytearray(4 + ring_size(MIN_CAPACITY)))[1 : 1 + ring_size(MIN_CAPACITY)]
        with pytest.raises(ValueError, match="not 4-byte aligned"):
            C.rx_one(fd, mv, mv[12:], hdr, scratch)
        released = ring.data[:]
        released.release()
        with pytest.raises(ValueError):
            C.rx_one(fd, w, released, hdr, scratch)
        with pytest.raises(TypeError, match="packets must be a list or tuple"):
            C.tx_direct(fd, b"0123456789", iter([b"x"]), 0, None)
        with pytest.raises(ValueError, match="start -1"):
            C.tx_direct(fd, b"0123456789", [b"x"], -1, None)
        with pytest.raises(TypeError, match="headers must be a list, a tuple or None"):
            C.tx_direct(fd, b"0123456789", [b"x"], 0, iter([b"0123456789"]))
        with pytest.raises(TypeError, match="5 arguments"):
            C.tx_direct(fd, b"0123456789", [b"x"], 0)
        # A Head or Tail the session could not have written
        for word, value in ((TAIL_WORD, 0x3), (TAIL_WORD, MIN_CAPACITY), (HEAD_WORD, 0xFFFFFFFF)):
            saved = w[word]
            w[word] = value
            with pytest.raises(ValueError, match="is not a 4-aligned offset below capacity 0x20000"):
                C.rx_pull(fd, w, d, 1, hdr, 0, scratch, [], [])
            with pytest.raises(ValueError, match="is not a 4-aligned offset below capacity 0x20000"):
                C.tx_flush(fd, w, d, b"0123456789")
            w[word] = saved
        assert drain(a) == [header(0) + b"data"]  # nothing was read by any of the failed calls
        assert bytes(buf[12:]) == bytes([0xA5]) * (len(buf) - 12)
    finally:
        a.close()
        b.close()


def test_tx_direct_per_packet_headers():
    pkts = [b"p%d" % i for i in range(100)]
    hdrs = [bytes([i]) * HDR for i in range(100)]
    (index, status), got = run_tx_direct(pkts, headers=hdrs)
    assert (index, status) == (100, 0)
    assert got == [h + p for h, p in zip(hdrs, pkts)]
    for odd in (bytearray(HDR), b"short", None, "0123456789"):
        bad = list(hdrs)
        bad[70] = odd
        (index, status), got = run_tx_direct(pkts, headers=tuple(bad))
        assert (index, status, len(got)) == (70, C.NOT_SIMPLE, 70)
    (index, status), got = run_tx_direct(pkts, headers=hdrs[:10])  # fewer headers than packets
    assert (index, status, len(got)) == (10, C.NOT_SIMPLE, 10)


def test_views_handed_out_never_change_while_later_calls_read():
    """rx_pull may read a packet in one piece over the 6 bytes before its Size word and put them back,
    but only over records the same call wrote: a packet handed out by an earlier call (which others may be
    reading meanwhile) never changes, not even for a moment. A second process spins on the bytes just
    before the published Tail (the end of the last packet handed out) while this one reads on."""
    cap = 0x100000
    memory = mmap.mmap(-1, ring_size(cap), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    flag = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    ring = Ring(memory, cap)
    payload = b"\x5a" * 64  # a multiple of 4: no padding, the 6 bytes before Tail are payload
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher: looks at the 6 bytes before Tail as fast as it can, until told to stop
        bad = looks = 0
        unpack = struct.Struct("<I").unpack_from
        six = b"\x5a" * 6
        try:
            while flag[0] == 0:
                t = unpack(memory, 4)[0]
                if t >= 8:
                    looks += 1
                    if memory[12 + t - 6 : 12 + t] != six:
                        bad += 1
            os.write(wfd, f"{bad} {looks}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    reader, writer = queue_pair(4 << 20)
    try:
        hdr, scratch = bytearray(HDR), bytearray(SPAN)
        total = 0
        while total + 20 <= (cap - 0x20000) // 68:
            for i in range(20):
                writer.send(header(total + i) + payload)
            total += 20
            while True:
                views: list = []
                count, tail, status, dropped = C.rx_pull(
                    reader.fileno(), ring.words, ring.data, 5, hdr, 0, scratch, views, None
                )
                assert all(bytes(v) == payload for v in views)
                if status:
                    break
        assert ring.words[TAIL_WORD] == total * 68
    finally:
        flag[0] = 1
        _, wait_status = os.waitpid(pid, 0)
        result = os.read(rfd, 100).decode()
        os.close(rfd)
        reader.close()
        writer.close()
        ring.close()
    bad, looks = map(int, result.split())
    assert looks > 1000 and bad == 0, f"the watcher saw a handed-out packet change {bad} times in {looks} looks"


def test_ring_fence_is_the_c_barrier():
    """ring.fence is the extension's __atomic_thread_fence(__ATOMIC_SEQ_CST) when it is built."""
    from wiretun import ring

    assert ring.fence is C.fence
    assert C.fence() is None
