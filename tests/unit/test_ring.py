"""wiretun.ring: Wintun's TUN_RING layout and both sides of its protocol, on plain buffers."""

from __future__ import annotations

import mmap
import struct
from multiprocessing import shared_memory

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from wiretun.errors import BufferOverflow, EndOfFile, InvalidData, InvalidParameter, NoMoreItems
from wiretun.ring import (
    MAX_CAPACITY,
    MIN_CAPACITY,
    RELEASE_BIT,
    TERMINATED,
    Consumer,
    Producer,
    Ring,
    TailMoved,
    capacity_for_size,
    check_capacity,
    record_size,
    ring_size,
)

CAP = MIN_CAPACITY
U32 = struct.Struct("<I")


def raw(buf, offset: int) -> int:
    """A little-endian uint32 straight from the buffer, independent of the Ring class."""
    return U32.unpack_from(buf, offset)[0]


def size_word(buf, data_offset: int) -> int:
    """The stored Size of the packet whose data starts at data_offset (12-byte ring header first)."""
    return raw(buf, 12 + data_offset - 4)


def pattern(tag: int, size: int) -> bytes:
    return bytes((tag * 31 + i) & 0xFF for i in range(size))


def new_pair(buf=None, capacity: int = CAP):
    buf = bytearray(ring_size(capacity)) if buf is None else buf
    ring = Ring(buf, capacity)
    return buf, ring, Producer(ring), Consumer(ring)


def send(prod: Producer, ring: Ring, payload: bytes) -> int:
    off = prod.allocate(len(payload))
    ring.data[off : off + len(payload)] = payload
    prod.send(off)
    return off


# ----------------------------------------------------------------------------- layout


def test_sizes_are_wintuns():
    assert ring_size(0x20000) == 12 + 0x20000 + 0x10000
    assert ring_size(0x4000000) == 12 + 0x4000000 + 0x10000
    assert capacity_for_size(12 + 0x400000 + 0x10000) == 0x400000
    assert record_size(1) == 8 and record_size(4) == 8 and record_size(5) == 12
    assert record_size(0xFFFF) == 0x10004


@pytest.mark.parametrize("bad", [0, 1, 0x1FFFF, 0x10000, 0x30000, 0x8000000, 0x4000001, -0x20000])
def test_capacity_out_of_range_or_not_power_of_two(bad):
    with pytest.raises(InvalidParameter) as e:
        check_capacity(bad)
    assert f"{bad:#x}" in str(e.value)
    assert "0x20000" in str(e.value) and "0x4000000" in str(e.value)
    assert e.value.code == 87


@pytest.mark.parametrize("bad", ["0x20000", 0x20000 * 1.0, None, True])
def test_capacity_must_be_int(bad):
    with pytest.raises(InvalidParameter):
        check_capacity(bad)


def test_capacity_bounds_are_valid():
    assert check_capacity(MIN_CAPACITY) == MIN_CAPACITY
    assert check_capacity(MAX_CAPACITY) == MAX_CAPACITY


def test_buffer_checks():
    with pytest.raises(InvalidParameter, match="too small"):
        Ring(bytearray(1000), CAP)
    with pytest.raises(InvalidParameter, match="writable"):
        Ring(bytes(ring_size(CAP)), CAP)
    with pytest.raises(InvalidParameter, match="not a ring"):
        Ring(bytearray(ring_size(CAP) + 4))  # capacity cannot be inferred


def test_layout_little_endian_head_tail_size():
    buf, ring, prod, cons = new_pair()
    off = send(prod, ring, b"\x45" + bytes(19))
    assert off == 4
    assert raw(buf, 0) == 0  # Head
    assert raw(buf, 4) == 24  # Tail: 4 (Size) + 20, aligned
    assert raw(buf, 8) == 0  # Alertable
    assert size_word(buf, off) == 20
    assert buf[12 + 4 : 12 + 24] == b"\x45" + bytes(19)
    assert cons.receive() == off
    cons.release(off)
    assert raw(buf, 0) == 24


def test_ring_at_offset_in_larger_buffer():
    buf = bytearray(64 + ring_size(CAP))
    ring = Ring(buf, CAP, offset=64)
    prod, cons = Producer(ring), Consumer(ring)
    send(prod, ring, b"abc")
    assert raw(buf, 64 + 4) == 8
    assert bytes(ring.data[cons.receive() :][:3]) == b"abc"


# ----------------------------------------------------------------------------- protocol


def test_packets_are_contiguous_across_the_end_of_the_ring():
    buf, ring, prod, cons = new_pair()
    # Move Head/Tail near the end with an empty ring.
    ring.head = ring.tail = CAP - 8
    prod, cons = Producer(ring), Consumer(ring)
    payload = pattern(7, 1000)
    off = send(prod, ring, payload)
    assert off == CAP - 4  # starts 4 bytes before the end, runs on into the trailing area
    assert raw(buf, 4) == (CAP - 8 + record_size(1000)) & (CAP - 1)  # Tail wrapped
    got = cons.receive()
    assert bytes(ring.data[got : got + 1000]) == payload
    assert buf[12 + CAP - 4 : 12 + CAP - 4 + 1000] == payload
    cons.release(got)
    off2 = send(prod, ring, b"next")
    assert off2 == raw(buf, 0) + 4  # right after, at the wrapped offset


def test_full_ring_gives_buffer_overflow_and_holds_capacity_minus_4():
    _, ring, prod, cons = new_pair()
    size = 0x1000 - 4  # record of exactly 0x1000 bytes
    count = 0
    while True:
        try:
            send(prod, ring, bytes(size))
        except BufferOverflow as e:
            assert e.code == 111
            break
        count += 1
    # 32 records of 0x1000 would need all 0x20000 bytes; one must stay free: 31 fit.
    assert count == CAP // 0x1000 - 1
    assert ring.free() == 0x1000 - 4
    small = prod.allocate(0x1000 - 8)  # exactly the free space
    prod.send(small)
    with pytest.raises(BufferOverflow):
        prod.allocate(1)
    cons.release(cons.receive())
    prod.send(prod.allocate(100))  # room again


def test_out_of_order_release_sets_release_bit_and_head_moves_only_over_the_released_prefix():
    buf, ring, prod, cons = new_pair()
    offs = [send(prod, ring, pattern(i, 100 + i)) for i in range(4)]
    got = [cons.receive() for _ in range(4)]
    assert got == offs
    cons.release(offs[2])
    assert size_word(buf, offs[2]) == RELEASE_BIT | 102
    assert raw(buf, 0) == 0  # nothing before it is released: Head stays
    cons.release(offs[1])
    assert raw(buf, 0) == 0
    cons.release(offs[0])
    assert raw(buf, 0) == offs[3] - 4  # jumps over 0, 1 and the already released 2
    cons.release(offs[3])
    assert raw(buf, 0) == raw(buf, 4)  # empty


def test_release_twice_or_foreign_offset_is_invalid_parameter():
    _, ring, prod, cons = new_pair()
    a = send(prod, ring, b"aaaa")
    b = send(prod, ring, b"bbbb")
    cons.receive()
    cons.receive()
    cons.release(b)
    for bad in (b, a + 4, 12345, -4):
        with pytest.raises(InvalidParameter):
            cons.release(bad)
    with pytest.raises(InvalidParameter):
        cons.release_many([a, a])
    cons.release(a)
    with pytest.raises(InvalidParameter):
        cons.release(a)


def test_many_outstanding_released_one_by_one():
    """Long runs exercise the consumer's bookkeeping (its list of outstanding packets is compacted)."""
    _, ring, prod, cons = new_pair()
    offs = [send(prod, ring, pattern(i, 40 + i % 7)) for i in range(300)]
    tags = [object() for _ in offs]
    for t in tags:
        cons.receive(t)
    cons.release_tag(tags[250])  # one out of order, far ahead
    for i in range(250):
        if i % 2:
            cons.release_tag(tags[i])
        else:
            cons.release(offs[i])
        # Head moves to the oldest unreleased packet; past 249 that skips the early-released 250.
        assert ring.head == offs[i + 1 if i < 249 else 251] - 4
    assert ring.stored_size(offs[250] - 4) & RELEASE_BIT
    cons.release_many(offs[252:])
    assert ring.head == offs[251] - 4
    cons.release_tag(tags[251])
    assert ring.head == ring.tail and cons.outstanding == 0


def test_release_by_tag_is_identity():
    _, ring, prod, cons = new_pair()
    for i in range(3):
        send(prod, ring, bytes([i]) * 8)
    tags = [bytearray(b"same"), bytearray(b"same"), bytearray(b"same")]  # equal, not identical
    for t in tags:
        cons.receive(t)
    with pytest.raises(InvalidParameter):
        cons.release_tag(bytearray(b"same"))
    cons.release_tag(tags[1])
    with pytest.raises(InvalidParameter):
        cons.release_tag(tags[1])
    with pytest.raises(InvalidParameter):
        cons.release_tags([tags[0], tags[0]])
    assert cons.outstanding == 2  # the failed batch released nothing
    cons.release_tags([tags[0], tags[2]])
    assert cons.outstanding == 0 and ring.head == ring.tail


def test_ordered_send_allocation_order_is_send_order():
    buf, ring, prod, cons = new_pair()
    a = prod.allocate(10)
    b = prod.allocate(20)
    c = prod.allocate(30)
    for off, tag in ((a, 1), (b, 2), (c, 3)):
        n = {a: 10, b: 20, c: 30}[off]
        ring.data[off : off + n] = pattern(tag, n)
    assert size_word(buf, a) == RELEASE_BIT | 10  # "allocated, not sent"
    prod.send(c)
    prod.send(b)
    assert raw(buf, 4) == 0  # nothing published: a is not sent
    assert cons.poll() == -1
    prod.send(a)
    assert raw(buf, 4) == record_size(10) + record_size(20) + record_size(30)
    assert [cons.receive(), cons.receive(), cons.receive()] == [a, b, c]
    assert [cons.size(o) for o in (a, b, c)] == [10, 20, 30]
    assert bytes(ring.data[b : b + 20]) == pattern(2, 20)
    with pytest.raises(NoMoreItems) as e:
        cons.receive()
    assert e.value.code == 259


def test_send_twice_or_unknown_is_invalid_parameter():
    _, ring, prod, _ = new_pair()
    a = prod.allocate(8)
    prod.send(a)
    with pytest.raises(InvalidParameter):
        prod.send(a)
    with pytest.raises(InvalidParameter):
        prod.send(a + 100)
    with pytest.raises(InvalidParameter):
        prod.send("4")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -1, 0x10000, 0x7FFFFFFF])
def test_packet_size_out_of_range(size):
    _, _, prod, _ = new_pair()
    with pytest.raises(InvalidParameter) as e:
        prod.allocate(size)
    assert str(size) in str(e.value) and "65535" in str(e.value)


def test_unallocate_only_the_latest():
    _, ring, prod, cons = new_pair()
    a = prod.allocate(8)
    b = prod.allocate(8)
    with pytest.raises(InvalidParameter):
        prod.unallocate(a)
    prod.unallocate(b)
    prod.send(a)
    assert cons.receive() == a and cons.poll() == -1
    assert prod.allocate(8) == b  # the same place again


# ----------------------------------------------------------------------------- termination


def test_producer_end_gives_consumer_end_of_file():
    buf, ring, prod, cons = new_pair()
    send(prod, ring, b"last")
    prod.end()
    assert raw(buf, 4) == TERMINATED
    with pytest.raises(EndOfFile) as e:
        cons.poll()
    assert e.value.code == 38
    with pytest.raises(EndOfFile):
        prod.allocate(8)


def test_consumer_end_gives_producer_end_of_file():
    buf, ring, prod, cons = new_pair()
    cons.end()
    assert raw(buf, 0) == TERMINATED
    with pytest.raises(EndOfFile):
        prod.allocate(8)
    with pytest.raises(EndOfFile):
        cons.poll()


def test_end_cannot_be_undone_by_release_or_send():
    buf, ring, prod, cons = new_pair()
    send(prod, ring, b"one")
    off = cons.receive()
    held = prod.allocate(8)
    cons.end()
    cons.release(off)  # releasing after the end must leave Head terminated
    assert raw(buf, 0) == TERMINATED
    with pytest.raises(EndOfFile):
        prod.allocate(8)
    prod.end()
    with pytest.raises(EndOfFile):
        prod.send(held)
    assert raw(buf, 4) == TERMINATED


@pytest.mark.parametrize("offset", [0, 2, CAP + 4, CAP + 0x14, 0x30004, 2**40, -4])
def test_offsets_outside_the_ring_are_invalid_parameter(offset):
    buf, ring, prod, cons = new_pair()
    before = bytes(buf)
    with pytest.raises(InvalidParameter):
        prod.send(offset)
    with pytest.raises(InvalidParameter):
        cons.size(offset)
    assert bytes(buf) == before


# ----------------------------------------------------------------------------- bogus indices and sizes


def test_bogus_tail_is_invalid_data():
    buf, ring, prod, cons = new_pair()
    for bogus in (2, CAP, CAP + 4, 0xFFFFFFF0):
        struct.pack_into("<I", buf, 4, bogus)
        with pytest.raises(InvalidData) as e:
            cons.poll()
        assert e.value.code == 13


def test_bogus_head_is_invalid_data():
    buf, ring, prod, cons = new_pair()
    for bogus in (6, CAP, 0x80000000):
        struct.pack_into("<I", buf, 0, bogus)
        with pytest.raises(InvalidData):
            prod.allocate(8)
    with pytest.raises(InvalidData):
        Consumer(ring)
    struct.pack_into("<I", buf, 0, 0)
    struct.pack_into("<I", buf, 4, 3)
    with pytest.raises(InvalidData):
        Producer(ring)


def test_bogus_size_is_invalid_data_and_nothing_past_it_is_read():
    buf, ring, prod, cons = new_pair()
    send(prod, ring, bytes(16))
    struct.pack_into("<I", buf, 12, 0x10000)  # Size above 0xFFFF
    with pytest.raises(InvalidData, match="0x10000"):
        cons.poll()
    struct.pack_into("<I", buf, 12, 17)  # aligned record of 24 bytes > 20 in use
    with pytest.raises(InvalidData, match="past Tail"):
        cons.poll()
    struct.pack_into("<I", buf, 12, RELEASE_BIT | 16)  # an unsent mark never crosses Tail
    with pytest.raises(InvalidData):
        cons.poll()
    assert cons.outstanding == 0  # the read position did not move
    struct.pack_into("<I", buf, 12, 16)
    assert cons.poll() == 4


def test_size_running_past_tail_across_the_wrap_is_invalid_data():
    buf, ring, prod, cons = new_pair()
    ring.head = ring.tail = CAP - 8
    prod, cons = Producer(ring), Consumer(ring)
    send(prod, ring, bytes(8))  # record [CAP-8, CAP+4): Tail wraps to 4
    assert raw(buf, 4) == 4
    struct.pack_into("<I", buf, 12 + CAP - 8, 9)  # a 9-byte packet would need 16 bytes, 12 in use
    with pytest.raises(InvalidData):
        cons.poll()
    struct.pack_into("<I", buf, 12 + CAP - 8, 8)
    assert cons.poll() == CAP - 4


# ----------------------------------------------------------------------------- other buffers


@pytest.mark.parametrize("kind", ["bytearray", "mmap", "shared_memory"])
def test_works_on_any_writable_buffer(kind):
    size = ring_size(CAP)
    shm = None
    if kind == "bytearray":
        buf = bytearray(size)
    elif kind == "mmap":
        buf = mmap.mmap(-1, size)
    else:
        shm = shared_memory.SharedMemory(create=True, size=size)
        buf = shm.buf
    try:
        ring = Ring(buf, CAP)
        ring.reset()
        prod, cons = Producer(ring), Consumer(ring)
        for i in range(50):
            send(prod, ring, pattern(i, 700 + i))
        for i in range(50):
            off = cons.receive()
            assert bytes(ring.data[off : off + cons.size(off)]) == pattern(i, 700 + i)
            cons.release(off)
        ring.close()
    finally:
        if shm is not None:
            del buf
            shm.close()
            shm.unlink()


def test_allocate_owns_its_memory():
    ring = Ring.allocate(CAP)
    prod, cons = Producer(ring), Consumer(ring)
    send(prod, ring, b"x" * 9)
    off = cons.receive()
    view = ring.data[off : off + 9]
    ring.close()  # a view is still held: the mapping stays until it goes
    assert bytes(view) == b"x" * 9


def test_consumer_wait_with_alertable_handshake():
    _, ring, prod, cons = new_pair()
    with TailMoved() as ev:
        prod.tail_moved = ev
        cons.tail_moved = ev
        assert cons.wait(0.01) is False
        assert ring.alertable is False  # cleared after the wait
        ring.alertable = True  # as if the consumer slept: the producer must set the event
        send(prod, ring, b"wake")
        assert cons.wait(0) is True
        assert cons.receive() == 4


def test_consumer_that_rewinds_when_emptied():
    _, ring, prod, _ = new_pair()
    cons = Consumer(ring, rewind_when_empty=True)
    a = send(prod, ring, b"one.")
    b = send(prod, ring, b"two.")
    cons.receive()
    cons.release(a)
    assert ring.head == b - 4  # b is unread: no rewind
    cons.receive()
    cons.release(b)
    assert ring.head == ring.tail == 0  # emptied: both back to 0


def test_rewind_only_when_empty():
    _, ring, prod, cons = new_pair()
    a = send(prod, ring, b"12345678")
    assert cons.rewind() is False  # unread
    cons.receive()
    assert cons.rewind() is False  # unreleased
    cons.release(a)
    assert cons.rewind() is True and ring.head == ring.tail == 0
    prod, cons = Producer(ring), Consumer(ring)
    b = prod.allocate(8)
    assert prod.rewind() is False  # allocated, not sent
    prod.send(b)
    assert prod.rewind() is False  # sent, not consumed
    cons.release(cons.receive())
    assert ring.head == ring.tail == 12
    assert prod.rewind() is True and ring.head == ring.tail == 0


# ----------------------------------------------------------------------------- property test


class RingModel(RuleBasedStateMachine):
    """Random allocate / send / receive / release against a plain model of Wintun's rules."""

    allocated = Bundle("allocated")
    received = Bundle("received")

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray(ring_size(CAP))
        self.ring = Ring(self.buf, CAP)
        self.prod = Producer(self.ring)
        self.cons = Consumer(self.ring)
        self.records: list[dict] = []  # every live record in ring order: offset, size, tag, state
        self.alloc_pos = 0  # model allocation cursor (record offset)
        self.next_tag = 0

    # --- model helpers
    def model_head(self) -> int:
        for rec in self.records:
            if rec["state"] != "released":
                return rec["offset"] - 4
        return self.alloc_pos

    def model_tail(self) -> int:
        for rec in self.records:
            if rec["state"] == "allocated":
                return rec["offset"] - 4
        return self.alloc_pos

    def drop_freed(self) -> None:
        while self.records and self.records[0]["state"] == "released":
            self.records.pop(0)

    @rule(
        target=allocated,
        size=st.one_of(st.integers(1, 64), st.integers(1, 0xFFFF), st.sampled_from([1, 4, 5, 0xFFFF])),
    )
    def allocate(self, size):
        free = (self.model_head() - self.alloc_pos - 4) % CAP
        if record_size(size) > free:
            with pytest.raises(BufferOverflow):
                self.prod.allocate(size)
            return None
        off = self.prod.allocate(size)
        assert off == self.alloc_pos + 4
        tag = self.next_tag
        self.next_tag += 1
        self.ring.data[off : off + size] = pattern(tag, size)
        rec = {"offset": off, "size": size, "tag": tag, "state": "allocated"}
        self.records.append(rec)
        self.alloc_pos = (self.alloc_pos + record_size(size)) % CAP
        return rec

    @rule(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8))
    def burst(self, sizes):
        """Allocate and send several small packets in order (they reach the consumer once every earlier
        allocation is sent)."""
        for size in sizes:
            rec = self.allocate(size)
            if rec is None:
                return
            self.send(rec)

    @rule(rec=consumes(allocated))
    def send(self, rec):
        if rec is None:
            return
        self.prod.send(rec["offset"])
        rec["state"] = "sent"

    @rule(target=received)
    def receive(self):
        expected = None
        for r in self.records:
            if r["state"] == "allocated":
                break
            if r["state"] == "sent":
                expected = r
                break
        tag = object()
        got = self.cons.poll(tag)
        if expected is None:
            assert got == -1
            return None
        assert got == expected["offset"]
        assert self.cons.size(got) == expected["size"]
        assert bytes(self.ring.data[got : got + expected["size"]]) == pattern(expected["tag"], expected["size"])
        expected["state"] = "received"
        expected["tag"] = tag
        return expected

    @rule(target=received, count=st.integers(2, 6))
    def receive_several(self, count):
        from hypothesis.stateful import multiple

        got = [self.receive() for _ in range(count)]
        return multiple(*[g for g in got if g is not None])

    @rule(rec=consumes(received), by_tag=st.booleans())
    def release(self, rec, by_tag):
        if rec is None:
            return
        if by_tag:
            self.cons.release_tag(rec["tag"])
        else:
            self.cons.release(rec["offset"])
        rec["state"] = "released"
        with pytest.raises(InvalidParameter):
            self.cons.release(rec["offset"])
        with pytest.raises(InvalidParameter):
            self.cons.release_tag(rec["tag"])
        self.drop_freed()

    def has_received(self) -> bool:
        return any(r["state"] == "received" for r in self.records)

    @precondition(has_received)
    @rule(recs=st.lists(consumes(received), max_size=5), by_tag=st.booleans())
    def release_batch(self, recs, by_tag):
        recs = [r for r in recs if r is not None]
        if by_tag:
            self.cons.release_tags([r["tag"] for r in recs])
        else:
            self.cons.release_many([r["offset"] for r in recs])
        for r in recs:
            r["state"] = "released"
        self.drop_freed()

    @precondition(has_received)
    @rule(recs=st.lists(consumes(received), min_size=1, max_size=3))
    def release_batch_with_a_duplicate_fails_whole(self, recs):
        recs = [r for r in recs if r is not None]
        if not recs:
            return
        before = (self.ring.head, self.cons.outstanding)
        with pytest.raises(InvalidParameter):
            self.cons.release_tags([r["tag"] for r in recs] + [recs[0]["tag"]])
        assert (self.ring.head, self.cons.outstanding) == before
        self.cons.release_tags([r["tag"] for r in recs])  # then fine
        for r in recs:
            r["state"] = "released"
        self.drop_freed()

    @precondition(lambda self: any(r["state"] == "sent" for r in self.records))
    @rule()
    def send_twice_is_refused(self):
        rec = next(r for r in self.records if r["state"] == "sent")
        with pytest.raises(InvalidParameter):
            self.prod.send(rec["offset"])

    @invariant()
    def indices_match_the_model(self):
        assert self.ring.head == self.model_head()
        assert self.ring.tail == self.model_tail()
        assert self.cons.outstanding == sum(r["state"] == "received" for r in self.records)


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(
    max_examples=150,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_send_refuses_an_offset_inside_a_packets_data_that_looks_like_a_header():
    """Found by fuzz/library.py: an offset into an allocated packet's data whose word has bit 31 set
    passed for an unsent packet; sending it cleared that bit in the caller's bytes."""
    ring = Ring(bytearray(ring_size(MIN_CAPACITY)))
    prod, cons = Producer(ring), Consumer(ring)
    off = prod.allocate(1000)
    data = bytes([0xFF]) * 1000  # every word has bit 31 set
    ring.data[off : off + 1000] = data
    for inside in (off + 4, off + 8, off + 500, off + 996):
        with pytest.raises(InvalidParameter):
            prod.send(inside)
        with pytest.raises(InvalidParameter):
            prod.unallocate(inside)
    assert bytes(ring.data[off : off + 1000]) == data
    prod.send(off)
    got = cons.receive()
    assert got == off and bytes(ring.data[got : got + cons.size(got)]) == data
