"""Wintun's ring, exactly as the driver shares it, over any writable buffer.

Layout (little-endian, every field 4-byte aligned)::

    TUN_RING   { uint32 Head; uint32 Tail; int32 Alertable; uint8 Data[capacity + 0x10000]; }
    TUN_PACKET { uint32 Size; uint8 Data[Size]; }      padded to a multiple of 4

``capacity`` is a power of two from 0x20000 (128 KiB) to 0x4000000 (64 MiB). ``Head`` is the offset
(into ``Data``) of the first packet the consumer has not released, ``Tail`` the offset where the
producer writes next; both are multiples of 4 below ``capacity``. ``Head == Tail`` means empty, and the
producer always leaves 4 bytes free, so a full ring never looks empty. A packet starting near the end
runs on into the 0x10000 trailing bytes instead of wrapping, so every packet is contiguous in memory;
the next one starts at the wrapped offset. ``Alertable`` is non-zero while the consumer sleeps on the
producer's *TailMoved* event (on Linux an eventfd, :class:`TailMoved`): the producer moves ``Tail``
and sets the event only if ``Alertable`` is set; the consumer sets ``Alertable``, looks at ``Tail``
once more, and only then sleeps. A side that ends writes 0xFFFFFFFF into its index (the producer into
``Tail``, the consumer into ``Head``); the other side then gets :class:`~wiretun.errors.EndOfFile`.

The two client-side halves Wintun's ``session.c`` implements are here:

* :class:`Consumer` (WintunReceivePacket / WintunReleaseReceivePacket): packets are received in ring
  order and may be released in any order. A released packet gets bit 31 set in its stored ``Size``
  (``RELEASE_BIT``); ``Head`` only moves over the unbroken run of released packets at its front, so the
  space of a packet released early is freed when every packet before it is released too.
* :class:`Producer` (WintunAllocateSendPacket / WintunSendPacket): allocation order is send order.
  An allocated packet carries ``RELEASE_BIT`` (meaning "not sent yet") until it is sent; ``Tail`` only
  moves over the unbroken run of sent packets, so a packet sent early waits for every earlier
  allocation. The consumer never sees the bit: it never reads past ``Tail``.

A Head, Tail or Size the other side could not have written (misaligned, beyond the capacity, a size
over 0xFFFF or running past ``Tail``) raises :class:`~wiretun.errors.InvalidData`; nothing past it is
read. Offsets handed out and taken back by both classes are offsets of packet *data* in ``Data``
(record offset + 4), so ``ring.data[offset:offset + size]`` is the packet.

Memory ordering: the wake-up handshake (store Tail, load Alertable / store Alertable, load Tail) needs a
full barrier on each side. :func:`fence` is ``__atomic_thread_fence(__ATOMIC_SEQ_CST)`` in the C
extension (``wiretun._speedups``: a full barrier on every CPU, ``dmb ish`` on aarch64). Without the
extension (not built, or ``WIRETUN_NO_SPEEDUPS=1``) it takes and drops a lock, a locked
read-modify-write: a full barrier on x86-64 only; on weakly ordered CPUs (aarch64, POWER) the
cross-process wake-up is then not guaranteed. Plain 4-byte aligned stores are atomic and, on x86-64
(TSO), seen in program order, so packet bytes are visible before the Tail that publishes them; on
aarch64 that ordering of the Python code's stores is likewise not guaranteed. Only x86-64 was run here:
nothing of this was tested on aarch64.
"""

from __future__ import annotations

import importlib
import itertools
import mmap
import operator
import os
import select
import struct
import sys
import threading
from typing import Any, Callable, Protocol

from .errors import BufferOverflow, EndOfFile, InvalidData, InvalidParameter, NoMoreItems

HEADER_SIZE = 12  # Head, Tail, Alertable
ALIGNMENT = 4
MIN_CAPACITY = 0x20000
MAX_CAPACITY = 0x4000000
MAX_PACKET_SIZE = 0xFFFF
MAX_RECORD_SIZE = (4 + MAX_PACKET_SIZE + 3) & ~3  # 0x10004: Size + the largest packet, aligned
TRAILING_SIZE = MAX_RECORD_SIZE - ALIGNMENT  # 0x10000 bytes after Data[capacity - 1]
RELEASE_BIT = 0x80000000
TERMINATED = 0xFFFFFFFF

# Word indices into the ring seen as uint32[]: Size of the packet at data offset d is word 3 + (d >> 2)
# for a record offset d (the Data array starts at byte 12, itself 4-aligned).
HEAD_WORD = 0
TAIL_WORD = 1
ALERTABLE_WORD = 2
DATA_WORD = 3


def align(size: int) -> int:
    """``size`` rounded up to the ring's 4-byte alignment."""
    return (size + 3) & ~3


def record_size(packet_size: int) -> int:
    """Bytes a packet of ``packet_size`` occupies in the ring: Size field + data, aligned."""
    return (packet_size + 7) & ~3


def check_capacity(capacity: object) -> int:
    """Return ``capacity`` if it is a valid ring capacity, else raise InvalidParameter naming it."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise InvalidParameter(
            f"ring capacity must be an int, not {type(capacity).__name__} ({capacity!r})"
        )
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        raise InvalidParameter(
            f"ring capacity {capacity:#x} ({capacity}) must be a power of two from "
            f"{MIN_CAPACITY:#x} (128 KiB) to {MAX_CAPACITY:#x} (64 MiB)"
        )
    return capacity


def check_packet_size(size: object) -> int:
    """Return ``size`` if it is a valid packet size (1..0xFFFF), else raise InvalidParameter."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidParameter(f"packet size must be an int, not {type(size).__name__} ({size!r})")
    if not 0 < size <= MAX_PACKET_SIZE:
        raise InvalidParameter(f"packet size {size} is out of range: must be 1..{MAX_PACKET_SIZE} (0xFFFF)")
    return size


def ring_size(capacity: int) -> int:
    """Total bytes of a ring of ``capacity``: 12 + capacity + 0x10000."""
    return HEADER_SIZE + check_capacity(capacity) + TRAILING_SIZE


def capacity_for_size(size: int) -> int:
    """The capacity of a ring occupying exactly ``size`` bytes (the inverse of :func:`ring_size`)."""
    capacity = size - HEADER_SIZE - TRAILING_SIZE
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise InvalidParameter(
            f"a buffer of {size} bytes is not a ring: it must be 12 + capacity + 0x10000 bytes with a "
            f"power-of-two capacity from {MIN_CAPACITY:#x} to {MAX_CAPACITY:#x}"
        )
    return capacity


_fence_lock = threading.Lock()


def _lock_fence() -> None:
    """A full barrier on x86-64 only: a lock's acquire and release (a locked read-modify-write)."""
    _fence_lock.acquire()
    _fence_lock.release()


def _c_fence() -> Callable[[], None] | None:
    if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1":
        return None
    try:
        speedups: Any = importlib.import_module("wiretun._speedups")
    except ImportError:
        return None
    c_fence: Callable[[], None] = speedups.fence
    return c_fence


fence: Callable[[], None] = _c_fence() or _lock_fence
"""A full memory barrier: the C extension's ``__atomic_thread_fence(__ATOMIC_SEQ_CST)`` when built, else a
lock acquire/release (a full barrier on x86-64 only; see the module docstring)."""


class _Words(Protocol):
    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...


class _LittleEndianWords:
    """uint32 little-endian view for big-endian hosts (``memoryview.cast`` is native order)."""

    __slots__ = ("_mv",)
    _U32 = struct.Struct("<I")

    def __init__(self, mv: memoryview) -> None:
        self._mv = mv

    def __getitem__(self, index: int) -> int:
        return int(self._U32.unpack_from(self._mv, index * 4)[0])

    def __setitem__(self, index: int, value: int) -> None:
        self._U32.pack_into(self._mv, index * 4, value)

    def __len__(self) -> int:  # words in the ring, as len() of the native cast gives
        return self._mv.nbytes // 4

    def release(self) -> None:
        self._mv.release()


class Ring:
    """A TUN_RING laid over ``buffer`` (bytearray, mmap, shared memory ...) at byte ``offset``.

    ``capacity`` defaults to what the buffer's length implies. The ring does not initialise the
    memory: a fresh zeroed buffer is an empty ring (Head = Tail = 0); :meth:`reset` makes it one.
    """

    __slots__ = ("capacity", "mask", "size", "data", "words", "_mv", "_owned")

    def __init__(self, buffer: Any, capacity: int | None = None, *, offset: int = 0) -> None:
        mv = memoryview(buffer)
        if mv.readonly:
            raise InvalidParameter("a ring needs a writable buffer")
        if not mv.c_contiguous:
            raise InvalidParameter("a ring needs a contiguous buffer")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if offset < 0 or offset & 3:
            raise InvalidParameter(f"ring offset {offset} must be a non-negative multiple of 4")
        if capacity is None:
            capacity = capacity_for_size(mv.nbytes - offset)
        size = ring_size(capacity)
        if offset + size > mv.nbytes:
            raise InvalidParameter(
                f"buffer of {mv.nbytes} bytes is too small for a ring of capacity {capacity:#x} at offset "
                f"{offset}: it needs {offset + size} bytes"
            )
        self._mv = mv[offset : offset + size]
        self._owned: mmap.mmap | None = None
        self.capacity = capacity
        self.mask = capacity - 1
        self.size = size
        self.data = self._mv[HEADER_SIZE:]
        self.words: _Words = self._mv.cast("I") if sys.byteorder == "little" else _LittleEndianWords(self._mv)

    @classmethod
    def allocate(cls, capacity: int) -> Ring:
        """A new, empty ring in private anonymous memory."""
        # Populated up front, as Wintun commits (and its driver locks) ring memory: no page faults later.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        memory = mmap.mmap(-1, ring_size(capacity), flags=flags)
        ring = cls(memory, capacity)
        ring._owned = memory
        return ring

    def reset(self) -> None:
        """Make the ring empty: Head = Tail = 0, not alertable."""
        w = self.words
        w[HEAD_WORD] = 0
        w[TAIL_WORD] = 0
        w[ALERTABLE_WORD] = 0

    @property
    def head(self) -> int:
        return self.words[HEAD_WORD]

    @head.setter
    def head(self, value: int) -> None:
        self.words[HEAD_WORD] = value

    @property
    def tail(self) -> int:
        return self.words[TAIL_WORD]

    @tail.setter
    def tail(self, value: int) -> None:
        self.words[TAIL_WORD] = value

    @property
    def alertable(self) -> bool:
        return self.words[ALERTABLE_WORD] != 0

    @alertable.setter
    def alertable(self, value: bool) -> None:
        self.words[ALERTABLE_WORD] = 1 if value else 0

    def stored_size(self, record: int) -> int:
        """The raw Size word (release bit included) of the record at ``record``."""
        return self.words[DATA_WORD + (record >> 2)]

    def used(self) -> int:
        """Bytes between Head and Tail (both must be valid)."""
        return (self.words[TAIL_WORD] - self.words[HEAD_WORD]) & self.mask

    def free(self) -> int:
        """Bytes a producer may still fill: capacity - used - 4."""
        return (self.words[HEAD_WORD] - self.words[TAIL_WORD] - ALIGNMENT) & self.mask

    def close(self) -> None:
        """Drop this object's views of the buffer (and the memory, if :meth:`allocate` made it).

        Packet views a caller still holds keep anonymous memory alive; closing never invalidates them.
        """
        words = self.words
        if isinstance(words, memoryview):
            words.release()
        else:
            words.release()  # type: ignore[attr-defined]
        self.data.release()
        self._mv.release()
        if self._owned is not None:
            try:
                self._owned.close()
            except BufferError:
                pass  # someone holds a packet view: the mapping goes when the last view does
            self._owned = None


class TailMoved:
    """Wintun's auto-reset *TailMoved* event, on Linux an eventfd (non-blocking, close-on-exec).

    Pass ``fd`` to wrap an eventfd inherited from another process; otherwise a new one is made.
    """

    __slots__ = ("_fd", "_own", "_poll")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._own = True
        else:
            self._own = False
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        os.eventfd_write(self._fd, 1)

    def reset(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the event is set (then reset it) or ``timeout`` seconds pass (False)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if not self._poll.poll(ms):
            return False
        self.reset()  # auto-reset; a second waiter woken by the same set finds it clear: harmless
        return True

    def close(self) -> None:
        if self._own and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> TailMoved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Consumer:
    """The reading side of a ring: receive in ring order, release in any order (Wintun's client receive).

    Each received packet may carry a *tag*, any object the caller uses to name it (the session tags each
    packet with the memoryview it hands out), so that releasing by tag is an identity check, not a lookup.
    Not thread-safe by itself; callers that share a consumer between threads hold a lock around each call
    (the session does). ``tail_moved`` is the producer's event, needed only by :meth:`wait`.
    """

    __slots__ = ("ring", "tail_moved", "_head", "_taken", "_tags", "_first", "_ended", "_rewinds")

    def __init__(self, ring: Ring, tail_moved: TailMoved | None = None, *, rewind_when_empty: bool = False) -> None:
        head = ring.head
        if head >= ring.capacity or head & 3:
            raise InvalidData(f"ring Head {head:#x} is not a 4-aligned offset below capacity {ring.capacity:#x}")
        self.ring = ring
        self.tail_moved = tail_moved
        self._head = head  # next packet to receive
        # Received, unreleased packets in ring order: data offsets and tags, live from index _first on.
        # The ring's Head is always the record of the first of them (or _head when there is none): the
        # packets between are all released. A moving start index makes "release the oldest k" a slice
        # compare rather than k Python steps.
        self._taken: list[int] = []
        self._tags: list[Any] = []
        self._first = 0
        self._ended = False
        # Only for a caller that is also the producer, under one lock (the session's receive ring):
        # when the last packet is released and nothing is unread, Head and Tail go back to 0 so that a
        # ring that keeps emptying keeps reusing the same, cached memory.
        self._rewinds = rewind_when_empty

    @property
    def outstanding(self) -> int:
        """Packets received and not yet released."""
        return len(self._taken) - self._first

    def _check_tail(self, tail: int) -> None:
        if tail == TERMINATED:
            raise EndOfFile("the producer ended the ring (Tail = 0xFFFFFFFF)")
        raise InvalidData(
            f"ring Tail {tail:#x} is not a 4-aligned offset below capacity {self.ring.capacity:#x}"
        )

    def poll(self, tag: Any = None) -> int:
        """Receive the next packet: its data offset, or -1 if none is waiting (no exception)."""
        if self._ended:
            raise EndOfFile("the consumer has ended")
        ring = self.ring
        words = ring.words
        tail = words[TAIL_WORD]
        if tail >= ring.capacity or tail & 3:
            self._check_tail(tail)
        head = self._head
        if head == tail:
            return -1
        content = (tail - head) & ring.mask
        if content < 4:
            raise InvalidData(f"ring holds {content} bytes between Head {head:#x} and Tail {tail:#x}")
        size = words[DATA_WORD + (head >> 2)]
        if size > MAX_PACKET_SIZE:
            raise InvalidData(f"packet at {head:#x} claims {size:#x} bytes, more than {MAX_PACKET_SIZE:#x}")
        rec = (size + 7) & ~3
        if rec > content:
            raise InvalidData(
                f"packet at {head:#x} of {size} bytes runs past Tail {tail:#x} ({content} bytes in use)"
            )
        self._head = (head + rec) & ring.mask
        offset = head + 4
        self._taken.append(offset)
        self._tags.append(tag)
        return offset

    def receive(self, tag: Any = None) -> int:
        """Receive the next packet's data offset; NoMoreItems when the ring is empty."""
        offset = self.poll(tag)
        if offset < 0:
            raise NoMoreItems("the ring is empty")
        return offset

    def size(self, offset: int) -> int:
        """The size of the received packet at data ``offset``."""
        if not isinstance(offset, int) or not 4 <= offset <= self.ring.capacity:
            raise InvalidParameter(f"offset {offset!r} is outside this ring's data (4..{self.ring.capacity})")
        return self.ring.words[DATA_WORD + ((offset - 4) >> 2)] & ~RELEASE_BIT

    def available(self) -> bool:
        """True if a packet (or the producer's end) is waiting."""
        return self._ended or self.ring.words[TAIL_WORD] != self._head

    def accept(self, offsets: list[int], tail: int, tags: list[Any]) -> None:
        """Take packets the caller itself just wrote as the producer as received, without re-reading.

        For a producer and consumer under one lock (the session's receive ring, whose kernel side runs
        inline): ``offsets`` are the data offsets written since the last receive, in order, ``tags`` their
        tags, and ``tail`` the Tail just published. The consumer must have been caught up.
        """
        self._taken.extend(offsets)
        self._tags.extend(tags)
        self._head = tail

    def accept_one(self, offset: int, tail: int, tag: Any) -> None:
        """:meth:`accept` for a single packet."""
        self._taken.append(offset)
        self._tags.append(tag)
        self._head = tail

    def rewind(self) -> bool:
        """For a caller that is also the ring's producer: if nothing is unread or unreleased, move Head,
        Tail and the read position back to 0, so a ring that keeps emptying keeps reusing the same (cached)
        memory. Returns True if it did."""
        words = self.ring.words
        if self._first != len(self._taken) or words[TAIL_WORD] != self._head or self._ended:
            return False
        self._head = 0
        words[HEAD_WORD] = 0
        words[TAIL_WORD] = 0
        return True

    def _bad_release(self, what: object) -> InvalidParameter:
        return InvalidParameter(
            f"{what} is not a received, unreleased packet of this ring (released twice, never received, "
            f"or from another ring)"
        )

    def _index_of_offset(self, offset: int) -> int:
        try:
            return self._taken.index(offset, self._first)
        except (ValueError, TypeError):
            raise self._bad_release(f"offset {offset!r}") from None

    def _index_of_tag(self, tag: Any) -> int:
        first = self._first
        try:
            return first + list(map(operator.is_, self._tags[first:], itertools.repeat(tag))).index(True)
        except ValueError:
            raise self._bad_release(f"{type(tag).__name__} at {id(tag):#x}") from None

    def release(self, offset: int) -> None:
        """Release one received packet; its space is freed once every earlier packet is released too."""
        self._release_at(self._index_of_offset(offset))

    def release_tag(self, tag: Any) -> None:
        """Release the received packet tagged ``tag`` (identity)."""
        tags = self._tags
        first = self._first
        if first < len(tags) and tags[first] is tag:  # the oldest: the usual case, kept short
            first += 1
            if first == len(tags):
                self._emptied()
            else:
                self._first = first
                self._move_head()
            return
        self._release_at(self._index_of_tag(tag))

    def _release_at(self, index: int) -> None:
        taken = self._taken
        if index == self._first:
            self._first = index + 1
            self._move_head()
            return
        offset = taken[index]
        del taken[index]
        del self._tags[index]
        words = self.ring.words
        words[DATA_WORD + ((offset - 4) >> 2)] |= RELEASE_BIT  # Wintun's out-of-order release mark

    def release_many(self, offsets: list[int]) -> None:
        """Release several packets at once (fast when they are the oldest ones, in order).

        All or nothing: if any offset is not releasable, nothing is released.
        """
        k = len(offsets)
        first = self._first
        if k and self._taken[first : first + k] == offsets:
            self._first = first + k
            self._move_head()
            return
        self._release_indices([self._index_of_offset(o) for o in offsets], offsets)

    def release_tags(self, tags: list[Any]) -> None:
        """Release several packets by tag (fast when they are the oldest ones, in order). All or nothing."""
        k = len(tags)
        first = self._first
        if k and first + k <= len(self._tags) and all(map(operator.is_, self._tags[first : first + k], tags)):
            self._first = first + k
            self._move_head()
            return
        self._release_indices([self._index_of_tag(t) for t in tags], tags)

    def _release_indices(self, indices: list[int], what: list[Any]) -> None:
        if len(set(indices)) != len(indices):
            seen: set[int] = set()
            for index, item in zip(indices, what):
                if index in seen:
                    raise self._bad_release(f"{item!r} (listed twice)")
                seen.add(index)
        first = self._first
        for index in sorted(indices, reverse=True):  # from the back: earlier indices stay valid
            if index != first:
                self._release_at(index)
        if first in indices:
            self._release_at(first)

    def _move_head(self) -> None:
        """Head = the record of the oldest unreleased packet, or the read position when none is left."""
        if self._ended:
            return  # Head stays 0xFFFFFFFF: a release after end() must not revive the ring
        first = self._first
        taken = self._taken
        if first >= len(taken):
            self._emptied()
            return
        if first > 64 and first * 2 > len(taken):
            del taken[:first]
            del self._tags[:first]
            self._first = first = 0
        self.ring.words[HEAD_WORD] = taken[first] - 4

    def forget(self) -> None:
        """Drop every record of received packets and their tags (the ring is going away)."""
        self._taken.clear()
        self._tags.clear()
        self._first = 0

    def _emptied(self) -> None:
        """Every received packet is released: Head moves to the read position (or, rewinding, all to 0)."""
        self._taken.clear()
        self._tags.clear()
        self._first = 0
        if self._ended:
            return
        words = self.ring.words
        if self._rewinds and words[TAIL_WORD] == self._head:
            self._head = 0
            words[TAIL_WORD] = 0
            words[HEAD_WORD] = 0
        else:
            words[HEAD_WORD] = self._head

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep on TailMoved with the Alertable handshake until a packet (or the end) may be waiting.

        Returns False on timeout. Needs ``tail_moved``.
        """
        if self.available():
            return True
        event = self.tail_moved
        if event is None:
            raise InvalidParameter("this consumer has no TailMoved event to wait on")
        words = self.ring.words
        words[ALERTABLE_WORD] = 1
        fence()
        if self.available():
            words[ALERTABLE_WORD] = 0
            event.reset()
            return True
        event.wait(timeout)
        words[ALERTABLE_WORD] = 0
        return self.available()

    def end(self) -> None:
        """Stop consuming: Head = 0xFFFFFFFF, so the producer's next allocation gets EndOfFile."""
        self._ended = True
        self.ring.words[HEAD_WORD] = TERMINATED


class Producer:
    """The writing side of a ring: allocate in order, send in any order (Wintun's client send).

    Packets reach the consumer in allocation order. With ``tail_moved`` the producer wakes an alertable
    consumer each time Tail moves. Not thread-safe by itself (the session holds a lock).
    """

    __slots__ = ("ring", "tail_moved", "_tail", "_tail_release", "_unsent", "_allocated", "_ended")

    def __init__(self, ring: Ring, tail_moved: TailMoved | None = None) -> None:
        tail = ring.tail
        if tail >= ring.capacity or tail & 3:
            raise InvalidData(f"ring Tail {tail:#x} is not a 4-aligned offset below capacity {ring.capacity:#x}")
        self.ring = ring
        self.tail_moved = tail_moved
        self._tail = tail  # next allocation
        self._tail_release = tail  # == ring Tail: first packet not sent
        self._unsent = 0
        # Record offsets of the allocated, unsent packets: an offset into a packet's *data* whose word
        # happens to have bit 31 set must not pass for a packet (sending it would rewrite those bytes).
        self._allocated: set[int] = set()
        self._ended = False

    @property
    def unsent(self) -> int:
        """Packets allocated and not yet sent."""
        return self._unsent

    def _check_head(self, head: int) -> None:
        if head == TERMINATED:
            raise EndOfFile("the consumer ended the ring (Head = 0xFFFFFFFF)")
        raise InvalidData(
            f"ring Head {head:#x} is not a 4-aligned offset below capacity {self.ring.capacity:#x}"
        )

    def try_allocate(self, size: int) -> int:
        """Allocate a packet of ``size`` bytes: its data offset, or -1 when the ring is full."""
        if self._ended:
            raise EndOfFile("the producer has ended")
        if size.__class__ is not int or not 0 < size <= MAX_PACKET_SIZE:
            check_packet_size(size)
        ring = self.ring
        words = ring.words
        head = words[HEAD_WORD]
        if head >= ring.capacity or head & 3:
            self._check_head(head)
        tail = self._tail
        rec = (size + 7) & ~3
        if rec > ((head - tail - 4) & ring.mask):
            return -1
        words[DATA_WORD + (tail >> 2)] = size | RELEASE_BIT
        self._tail = (tail + rec) & ring.mask
        self._unsent += 1
        self._allocated.add(tail)
        return tail + 4

    def allocate(self, size: int) -> int:
        """Allocate a packet of ``size`` bytes; BufferOverflow when the ring is full (drop the packet)."""
        offset = self.try_allocate(size)
        if offset < 0:
            raise BufferOverflow(
                f"ring full: a {size}-byte packet needs {record_size(size)} bytes, "
                f"{(self.ring.words[HEAD_WORD] - self._tail - 4) & self.ring.mask} free"
            )
        return offset

    def send(self, offset: int) -> None:
        """Mark an allocated packet sent; Tail moves over every sent packet at its front."""
        if not isinstance(offset, int):
            raise InvalidParameter(f"a packet offset is an int, not {type(offset).__name__}")
        if self._ended:
            raise EndOfFile("the ring has ended")
        ring = self.ring
        words = ring.words
        mask = ring.mask
        if not 4 <= offset <= ring.capacity:  # the checks below work modulo the capacity
            raise InvalidParameter(f"offset {offset!r} is outside this ring's data (4..{ring.capacity})")
        rec = (offset - 4) & mask
        tr = self._tail_release
        if rec not in self._allocated or not words[DATA_WORD + (rec >> 2)] & RELEASE_BIT:
            raise InvalidParameter(
                f"offset {offset!r} is not an allocated, unsent packet of this ring (sent twice, never "
                f"allocated, or from another ring)"
            )
        self._allocated.discard(rec)
        words[DATA_WORD + (rec >> 2)] &= ~RELEASE_BIT
        if rec != tr:
            return  # an earlier allocation is still unsent: this one waits for it
        if self._unsent == 1:  # the only one outstanding: Tail moves to the allocation cursor
            self._unsent = 0
            tr = self._tail
        else:
            while self._unsent:
                size = words[DATA_WORD + (tr >> 2)]
                if size & RELEASE_BIT:
                    break
                tr = (tr + ((size + 7) & ~3)) & mask
                self._unsent -= 1
        self._tail_release = tr
        words[TAIL_WORD] = tr
        event = self.tail_moved
        if event is not None:
            fence()
            if words[ALERTABLE_WORD]:
                event.set()

    def rewind(self) -> bool:
        """For a caller that is also the ring's consumer: if the ring is empty and nothing is allocated,
        move Head and Tail back to 0 (see :meth:`Consumer.rewind`). Returns True if it did."""
        words = self.ring.words
        if self._unsent or self._ended or words[HEAD_WORD] != self._tail_release:
            return False
        self._tail = self._tail_release = 0
        words[HEAD_WORD] = 0
        words[TAIL_WORD] = 0
        return True

    def unallocate(self, offset: int) -> None:
        """Take back the most recent allocation (for a caller that failed to fill it)."""
        rec = offset - 4
        words = self.ring.words
        size = words[DATA_WORD + (rec >> 2)] if 0 <= rec < self.ring.capacity and not rec & 3 else 0
        if not (
            self._unsent
            and rec in self._allocated
            and size & RELEASE_BIT
            and ((rec + ((size & ~RELEASE_BIT) + 7 & ~3)) & self.ring.mask) == self._tail
        ):
            raise InvalidParameter(f"offset {offset!r} is not the latest unsent allocation")
        self._allocated.discard(rec)
        self._tail = rec
        self._unsent -= 1

    def free(self) -> int:
        """Bytes still free for allocations (a packet of n bytes needs record_size(n))."""
        head = self.ring.words[HEAD_WORD]
        if head >= self.ring.capacity:
            return 0
        return (head - self._tail - 4) & self.ring.mask

    def end(self) -> None:
        """Stop producing: Tail = 0xFFFFFFFF and wake the consumer, whose next receive gets EndOfFile."""
        self._ended = True
        self.ring.words[TAIL_WORD] = TERMINATED
        if self.tail_moved is not None:
            self.tail_moved.set()
