"""The per-packet core of a Linux session: both rings' state and Wintun's calls on them, one call each.

A :class:`SessionCore` holds what a session needs per packet, for its two rings and its TUN queue:

* the **receive ring** (kernel -> caller): :meth:`~SessionCore.receive_packet` hands out the next packet
  read ahead; when none is, it reads what waits in the queue straight into the ring from Tail on (up to
  64 packets, while the ring has room for another; the C type releases the GIL once for all of them),
  publishes Tail and returns a memoryview of the first, as Wintun's driver fills its ring ahead of the
  caller. The ``ready_fd`` eventfd is set while read-ahead packets wait, so a read-wait handle holding it
  stays readable. When the ring is short of room, one packet is read through a scratch buffer and
  dropped if it does not fit, as Wintun's driver drops when the ring is full.
  :meth:`~SessionCore.release_receive_packet` takes a packet back in any order: the oldest moves Head,
  a later one gets Wintun's release bit in its stored Size and is passed over when Head gets there.
  When every packet is released (and none waits read ahead) the ring rewinds to offset 8 (its memory
  stays in cache, and the C type reads and writes the virtio-net header in the 6 free bytes before the
  first Size word).
* the **send ring** (caller -> kernel): :meth:`~SessionCore.allocate_send_packet` carves a packet at the
  allocation cursor (its Size carries the release bit: not sent yet), :meth:`~SessionCore.send_packet`
  clears the bit, moves Tail over the run of sent packets at the front (allocation order is send order)
  and writes every packet between Head and Tail to the queue with the zero virtio-net header (or the
  packet's own). EAGAIN/ENOBUFS/ENOMEM leave the rest queued (:attr:`~SessionCore.stalled`; the next send,
  receive or :meth:`~SessionCore.flush` retries); a packet the kernel rejects is dropped and counted.

Packets are recognised on release and send by identity: the core keeps each packet it handed out with
its offset, in ring order, and finds it at the front (the usual case) or by binary search on its offset.

Two implementations with the same signatures and results, byte for byte: the C type
``wiretun._speedups.SessionCore`` and :class:`PySessionCore` here (used when the extension is not built
or ``WIRETUN_NO_SPEEDUPS=1``); tests/unit/test_engine.py runs both on the same sequences. Errors are
WintunError subclasses chosen by :class:`Status` (Wintun's error codes, the same numbers in C).

Threads: every call is safe from any thread. The receive side and the send side each have a lock, so a
receiving thread and a sending thread run at the same time; the C type releases the GIL around its
system calls. A receive that finds the send side stalled retries it only if the send lock is free.
"""

from __future__ import annotations

import errno
import operator
import os
import threading
from enum import IntEnum
from typing import Callable, Iterable, Protocol, Sequence

from ..errors import (
    ERROR_BUFFER_OVERFLOW,
    ERROR_HANDLE_EOF,
    ERROR_INVALID_DATA,
    ERROR_INVALID_PARAMETER,
    ERROR_NO_MORE_ITEMS,
    BufferOverflow,
    EndOfFile,
    InvalidData,
    InvalidParameter,
    NoMoreItems,
    WintunError,
)
from ..ring import DATA_WORD, HEAD_WORD, MAX_PACKET_SIZE, MAX_RECORD_SIZE, TAIL_WORD, TRAILING_SIZE

__all__ = ["Status", "SessionCore", "PySessionCore", "SPEEDUPS", "Buffer", "Words", "error_for"]

VNET_HDR_SIZE = 10
ZERO_HEADER = bytes(VNET_HDR_SIZE)
RELEASE_BIT = 0x80000000
_READ_SPAN = MAX_PACKET_SIZE
_CHUNK = 64  # packets a receive reads ahead at most (CHUNK in C: one GIL release)
_NO_ROOM = -3
# Where an emptied ring starts again (REWIND_OFFSET in C): not 0, so that the bytes before the first
# record are ring memory the C type can put the virtio-net header in.
REWIND_OFFSET = 8
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.EBADF, errno.ENODEV, errno.ENXIO})
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM})
_COMPACT_AT = 64  # entries released at the front before the tracking list is compacted


class Status(IntEnum):
    """What a core call can fail with: Wintun's (Win32) error codes; the C type uses the same numbers."""

    OK = 0
    INVALID_DATA = ERROR_INVALID_DATA
    HANDLE_EOF = ERROR_HANDLE_EOF
    INVALID_PARAMETER = ERROR_INVALID_PARAMETER
    BUFFER_OVERFLOW = ERROR_BUFFER_OVERFLOW
    NO_MORE_ITEMS = ERROR_NO_MORE_ITEMS


_ERROR_CLASSES: dict[Status, type[WintunError]] = {
    Status.INVALID_DATA: InvalidData,
    Status.HANDLE_EOF: EndOfFile,
    Status.INVALID_PARAMETER: InvalidParameter,
    Status.BUFFER_OVERFLOW: BufferOverflow,
    Status.NO_MORE_ITEMS: NoMoreItems,
}


def error_for(status: int, message: str) -> WintunError:
    """The WintunError subclass for a :class:`Status`, with ``message``."""
    return _ERROR_CLASSES[Status(status)](message)


class Words(Protocol):
    """A ring as little-endian uint32 words (``wiretun.ring.Ring.words``)."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...


class Buffer(Protocol):
    """What the core needs of a ring: ``wiretun.ring.Ring``'s ``capacity``, ``words`` and ``data``."""

    @property
    def capacity(self) -> int: ...
    @property
    def words(self) -> Words: ...
    @property
    def data(self) -> memoryview: ...


IOErrorCallback = Callable[[int], BaseException]
"""Called with the errno of a failed read, or of a read or write whose queue is gone (EBADFD, EBADF,
ENODEV, ENXIO: the adapter was deleted; then the core does no more I/O); returns the exception to raise."""
RejectedCallback = Callable[[int, int], None]
"""Called with the errno and the packet size when the kernel rejects a packet (it is dropped and counted)."""
HeaderConverter = Callable[[object], bytes]
"""Turns a ``header`` argument into 10 bytes; raises InvalidParameter for a bad one."""


def _fail(status: Status, message: str) -> WintunError:
    return _ERROR_CLASSES[status](message)


def _bad_index(which: str, what: str, value: int, cap: int) -> WintunError:
    """A ring word that is no 4-aligned offset below the capacity (check_ring_index in C)."""
    return _fail(
        Status.INVALID_DATA, f"{which} ring {what} {value:#x} is not a 4-aligned offset below capacity {cap:#x}"
    )


def _short_read() -> WintunError:
    return _fail(
        Status.INVALID_DATA, f"the TUN queue returned a read shorter than the {VNET_HDR_SIZE}-byte virtio-net header"
    )


def _not_received(packet: object) -> InvalidParameter:
    return InvalidParameter(
        f"{type(packet).__name__} at {id(packet):#x} is not a received, unreleased packet of this session "
        f"(released twice, never received, or from another session?)"
    )


def _not_allocated(packet: object) -> InvalidParameter:
    return InvalidParameter(
        f"{type(packet).__name__} at {id(packet):#x} is not a packet allocated by this session and not yet "
        f"sent (sent twice, or from another session?)"
    )


def _batch_item(
    packets: Sequence[bytes | bytearray | memoryview], headers: Sequence[bytes] | None, i: int
) -> tuple[bytes | bytearray | memoryview, bytes | None]:
    """Packet ``i`` of a batch as a byte buffer and its header (None: the zero header), checked in the
    C type's order (buffer, header, size); InvalidParameter for a bad one."""
    item = packets[i]
    try:
        src = item if item.__class__ is bytes or item.__class__ is bytearray else memoryview(item).cast("B")
    except (TypeError, ValueError):
        raise InvalidParameter(f"packet {i} is not a contiguous bytes-like object") from None
    hdr: bytes | None = None
    if headers is not None:
        h = headers[i]
        if h.__class__ is not bytes or len(h) != VNET_HDR_SIZE:
            raise InvalidParameter(f"header {i} must be {VNET_HDR_SIZE} bytes")
        if h != ZERO_HEADER:
            hdr = h
    if not 0 < len(src) <= MAX_PACKET_SIZE:
        raise InvalidParameter(f"packet {i} is {len(src)} bytes; a packet must be 1..{MAX_PACKET_SIZE} bytes")
    return src, hdr


def _release_view(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        pass  # the caller exported it (e.g. to numpy): it keeps the memory alive


class _Tracked:
    """Packets handed out and not yet taken back, in ring order: views and data offsets (a released
    one out of order leaves None in its place until the front passes it)."""

    __slots__ = ("views", "offsets", "first")

    def __init__(self) -> None:
        self.views: list[memoryview | None] = []
        self.offsets: list[int] = []
        self.first = 0

    def find(self, packet: object, data: memoryview, mask: int) -> int:
        """The index of ``packet`` (identity), or -1: the front, else a binary search on its offset."""
        views = self.views
        first = self.first
        n = len(views)
        if first >= n:
            return -1
        if views[first] is packet:
            return first
        if packet.__class__ is not memoryview:
            return -1
        try:
            offset = _address(packet) - _address(data)
        except ValueError:  # empty or released: no address to search by (C keeps one), so look it up
            for i in range(first, n):
                if views[i] is packet:
                    return i
            return -1
        offsets = self.offsets
        base = offsets[first]
        key = (offset - base) & mask
        lo, hi = first, n
        while lo < hi:
            mid = (lo + hi) >> 1
            if ((offsets[mid] - base) & mask) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < n and views[lo] is packet:
            return lo
        return -1

    def drop_front(self) -> None:
        """Pass the front entry and every taken-back entry after it."""
        views = self.views
        first = self.first + 1
        n = len(views)
        while first < n and views[first] is None:
            first += 1
        if first >= n:
            views.clear()
            self.offsets.clear()
            first = 0
        elif first > _COMPACT_AT and first * 2 > n:
            del views[:first]
            del self.offsets[:first]
            first = 0
        self.first = first

    def clear(self) -> None:
        self.views.clear()
        self.offsets.clear()
        self.first = 0

    def __len__(self) -> int:
        return sum(1 for v in self.views[self.first :] if v is not None)


def _address(view: memoryview) -> int:
    """The address of a byte memoryview's first byte (ValueError for a released view)."""
    import ctypes

    if view.readonly:
        raise ValueError("read-only")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class PySessionCore:
    """The pure-Python :class:`SessionCore` (see the module docstring); same calls, same results.

    ``fd`` is the TUN queue (non-blocking, with a virtio-net header on every packet), ``rx`` and ``tx``
    the two rings (empty). ``io_error``, ``rejected`` and ``convert_header``: see
    :data:`IOErrorCallback`, :data:`RejectedCallback`, :data:`HeaderConverter`. Nothing here blocks:
    the caller sleeps on its own wait handle.
    """

    def __init__(
        self,
        fd: int,
        rx: Buffer,
        tx: Buffer,
        io_error: IOErrorCallback,
        rejected: RejectedCallback,
        convert_header: HeaderConverter,
        *,
        ready_fd: int = -1,
    ) -> None:
        self._fd = fd
        self._ready_fd = ready_fd  # an eventfd set while read-ahead packets wait (or -1)
        self._ready_set = False
        self._rx_pending = 0  # packets read ahead (Tail is past them), not handed out yet
        self._rx_next = 0  # the record of the first of them
        self._rx_empty = False  # the last fill stopped because the queue was empty
        self._rx_words = rx.words
        self._rx_data = rx.data
        self._tx_words = tx.words
        self._tx_data = tx.data
        if rx.capacity != tx.capacity:
            raise InvalidParameter("the two rings must have the same capacity")
        self._cap = rx.capacity
        self._mask = self._cap - 1
        self._io_error = io_error
        self._rx_error: BaseException | None = None  # raised by the next receive (packets came before it)
        self._rejected_cb = rejected
        self._convert = convert_header
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._state = 0  # 0 live, 1 queue lost (no I/O; bookkeeping goes on), 2 ended (nothing)
        self._rx_out = _Tracked()
        self._tx_out = _Tracked()
        self._tx_alloc = 0  # next allocation (record offset)
        self._tx_release = 0  # first unsent record: the Tail the core publishes
        self._tx_unsent = 0
        self._tx_headers: dict[int, bytes | None] = {}  # record -> header (None: drop the packet)
        self._stalled = False
        self._hdr = bytearray(VNET_HDR_SIZE)
        self._scratch = bytearray(_READ_SPAN)
        self.receive_dropped = 0
        self.send_dropped = 0

    # ------------------------------------------------------------------ state

    @property
    def stalled(self) -> bool:
        """The kernel refused a write for now (EAGAIN/ENOBUFS/ENOMEM): packets wait in the send ring."""
        return self._stalled

    @property
    def ended(self) -> bool:
        """The session ended or its queue was lost: no more I/O."""
        return self._state != 0

    @property
    def received(self) -> int:
        """Packets received and not yet released."""
        return len(self._rx_out)

    @property
    def allocated(self) -> int:
        """Packets allocated and not yet sent."""
        return len(self._tx_out)

    def _lost(self, code: int) -> BaseException:
        """The exception for a failed read, or an I/O whose queue is gone (then no more I/O)."""
        if code in _GONE_ERRNOS and self._state == 0:
            self._state = 1
        return self._io_error(code)

    # ------------------------------------------------------------------ receive

    def _ring_indices(self) -> tuple[int, int]:
        words = self._rx_words
        tail = words[TAIL_WORD]
        head = words[HEAD_WORD]
        cap = self._cap
        if tail >= cap or tail & 3:
            raise _bad_index("receive", "Tail", tail, cap)
        if head >= cap or head & 3:
            raise _bad_index("receive", "Head", head, cap)
        return tail, head

    def _read_scratch(self) -> memoryview | None:
        """One packet through the scratch buffer when the ring lacks room for a read straight into it (rx
        lock held): its view, or None (the queue is empty, or the packet did not fit: dropped, as Wintun's
        driver drops when its ring is full)."""
        r, head = self._ring_indices()
        free = (head - r - 4) & self._mask
        try:
            n = os.readv(self._fd, [self._hdr, self._scratch])
        except OSError as e:
            code = e.errno or errno.EIO
            if code == errno.EAGAIN:
                return None
            raise self._lost(code) from e
        n -= VNET_HDR_SIZE
        if n < 0:
            raise _short_read()
        rec = (n + 7) & ~3
        if rec > free:
            self.receive_dropped += 1
            return None
        data = self._rx_data
        data[r + 4 : r + 4 + n] = memoryview(self._scratch)[:n]
        self._rx_words[DATA_WORD + (r >> 2)] = n
        view = data[r + 4 : r + 4 + n]
        out = self._rx_out
        out.views.append(view)
        out.offsets.append(r + 4)
        self._rx_words[TAIL_WORD] = (r + rec) & self._mask
        return view

    def _signal_ready(self, ready: bool) -> None:
        """Set or clear the ready eventfd: read-ahead packets wait (or no longer do)."""
        if self._ready_fd < 0 or ready == self._ready_set or self._state == 2:
            return  # after the end the session may have closed the eventfd
        try:
            if ready:
                os.eventfd_write(self._ready_fd, 1)
            else:
                os.eventfd_read(self._ready_fd)
        except OSError:
            pass  # EAGAIN: already clear
        self._ready_set = ready

    def _fill(self, want: int, keep: int) -> int:
        """Read up to ``want`` packets into the ring from Tail on (rx lock held, nothing read ahead): how
        many (they wait from _rx_next on), 0 for none, or _NO_ROOM when the ring lacks room for a read
        straight into it. An error after some packets is kept for the receive after them. ``keep`` are
        handed out at once: the ready eventfd is set if more wait."""
        r, head = self._ring_indices()
        mask = self._mask
        if (head - r - 4) & mask < MAX_RECORD_SIZE:
            return _NO_ROOM
        data, words, fd, hdr = self._rx_data, self._rx_words, self._fd, self._hdr
        last = self._cap + TRAILING_SIZE - 4 - VNET_HDR_SIZE - _READ_SPAN  # the last Tail a whole read fits at
        first = r
        count = 0
        error: BaseException | None = None
        empty = False
        while count < want:
            free = (head - r - 4) & mask
            if free < MAX_RECORD_SIZE:
                break
            d = r + 4
            try:
                if r >= REWIND_OFFSET and (count or r == head):
                    # The C type reads in place (the header in the 6 bytes before the Size word, put
                    # back after): the ring ends up as after readv(header, packet), but for a short
                    # read, whose header bytes past the sixth stay in the Size word.
                    n = os.readv(fd, [hdr, data[d : d + _READ_SPAN]])
                    if 6 < n < VNET_HDR_SIZE:
                        data[r : r + n - 6] = hdr[6:n]
                elif free >= MAX_RECORD_SIZE + 12 and r <= last:
                    n = os.readv(fd, [data[d : d + VNET_HDR_SIZE + _READ_SPAN]])
                    if n >= VNET_HDR_SIZE:
                        hdr[:] = data[d : d + VNET_HDR_SIZE]
                        data[d : d + n - VNET_HDR_SIZE] = data[d + VNET_HDR_SIZE : d + n]
                else:
                    n = os.readv(fd, [hdr, data[d : d + _READ_SPAN]])
            except OSError as e:
                code = e.errno or errno.EIO
                if code == errno.EAGAIN:
                    empty = True
                else:
                    error = self._lost(code)
                break
            except BaseException as e:  # a signal handler raised: after packets, the next receive raises it
                error = e
                break
            if n < VNET_HDR_SIZE:
                error = _short_read()
                break
            n -= VNET_HDR_SIZE
            words[DATA_WORD + (r >> 2)] = n
            r = (r + ((n + 7) & ~3)) & mask
            count += 1
        self._signal_ready(count > keep)
        self._rx_empty = empty
        if count:
            words[TAIL_WORD] = r
            self._rx_pending = count
            self._rx_next = first
        if error is not None:
            if not count:
                raise error
            self._rx_error = error
        return count

    def _take(self) -> memoryview:
        """Hand out the next read-ahead packet (rx lock held, some wait)."""
        record = self._rx_next
        size = self._rx_words[DATA_WORD + (record >> 2)]
        if size > MAX_PACKET_SIZE:  # scribbled on: what was read ahead is lost
            self._rx_pending = 0
            self._signal_ready(False)
            raise _fail(Status.INVALID_DATA, f"receive ring packet at {record:#x} claims {size:#x} bytes")
        view = self._rx_data[record + 4 : record + 4 + size]
        out = self._rx_out
        out.views.append(view)
        out.offsets.append(record + 4)
        self._rx_next = (record + ((size + 7) & ~3)) & self._mask
        self._rx_pending -= 1
        if not self._rx_pending:
            self._signal_ready(False)  # set exactly while packets wait read ahead
        return view

    def _next(self, want: int, keep: int) -> memoryview | None:
        """The next packet (rx lock held): one read ahead (even when the queue was lost after reading it),
        else EndOfFile after the end, else the error kept for after them, else up to ``want`` read from the
        queue at once; None when none is waiting (or one was dropped)."""
        if self._rx_pending:
            return self._take()
        if self._state:
            raise _fail(Status.HANDLE_EOF, "the session has ended")
        if self._rx_error is not None:
            self._raise_pending()
        if self._stalled:
            self._retry_send()
        got = self._fill(want, keep)
        if got == _NO_ROOM:
            return self._read_scratch()
        return self._take() if got else None

    def _retry_send(self) -> None:
        lock = self._tx_lock
        if lock.acquire(False):  # busy: the thread holding it flushes anyway
            try:
                if self._state == 0:
                    self._flush()
            finally:
                lock.release()

    def _raise_pending(self) -> None:
        exc, self._rx_error = self._rx_error, None
        if exc is not None:
            raise exc

    def receive_packet(self) -> memoryview | None:
        """The next packet (WintunReceivePacket), or None when none is waiting; EndOfFile after the end."""
        lock = self._rx_lock
        lock.acquire()  # not a with-block: half the cost, paid per packet
        try:
            if self._rx_pending:
                return self._take()
            return self._next(_CHUNK, 1)
        finally:
            lock.release()

    def receive_packets(self, max_count: int, headers: list[bytes] | None = None) -> list[memoryview]:
        """Up to ``max_count`` packets (an empty list when none is waiting); a packet dropped for lack of
        room counts toward ``max_count``. A list for ``headers`` gets a zero 10-byte header per packet. An
        error after some packets were read is raised by the next receive, those packets handed out first."""
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise InvalidParameter(f"max_count {max_count!r} must be an int >= 1")
        if headers is not None and not isinstance(headers, list):
            raise InvalidParameter(f"headers must be a list to append to, not {type(headers).__name__}")
        out: list[memoryview] = []
        with self._rx_lock:
            try:
                if self._state and not self._rx_pending:
                    raise _fail(Status.HANDLE_EOF, "the session has ended")
                self._rx_empty = False
                # What was read ahead first, then reads of as many as are still wanted (a dropped packet
                # counts toward max_count, as in C).
                i = 0
                take = self._take
                while i < max_count:
                    dropped = self.receive_dropped
                    try:
                        if self._rx_pending:
                            for _ in range(min(self._rx_pending, max_count - i)):
                                out.append(take())
                                i += 1
                            continue
                        if i and self._rx_empty:
                            break  # the queue was empty a moment ago: no read to find it so again
                        want = min(max_count - i, _CHUNK)
                        got = self._next(want, want)
                    except Exception as exc:  # after packets, the next receive raises it
                        if not out:
                            raise
                        self._rx_error = exc
                        break
                    i += 1
                    if got is None:
                        if self.receive_dropped == dropped:
                            break
                        continue  # dropped for lack of room: the queue may hold more
                    out.append(got)
            finally:
                self._signal_ready(self._rx_pending > 0)  # a loop cut short leaves some waiting: say so
        if headers is not None:
            headers.extend([ZERO_HEADER] * len(out))
        return out

    def _release_locked(self, packet: object) -> bool:
        out = self._rx_out
        index = out.find(packet, self._rx_data, self._mask)
        if index < 0:
            return False
        if index == out.first:
            out.drop_front()
            words = self._rx_words
            if not out.views and self._rx_pending:
                words[HEAD_WORD] = self._rx_next  # up to what was read ahead
            elif not out.views:  # everything released: rewind so the ring keeps reusing cached memory
                words[TAIL_WORD] = REWIND_OFFSET
                words[HEAD_WORD] = REWIND_OFFSET
            else:
                words[HEAD_WORD] = out.offsets[out.first] - 4
        else:
            out.views[index] = None
            record = out.offsets[index] - 4
            self._rx_words[DATA_WORD + (record >> 2)] |= RELEASE_BIT  # Wintun's out-of-order release mark
        return True

    def release_receive_packet(self, packet: memoryview) -> None:
        """Give a received packet's space back (WintunReleaseReceivePacket), in any order; the view is
        released. InvalidParameter for one not received or released twice; nothing after the end."""
        lock = self._rx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
            if self._state == 2:
                return
            out = self._rx_out
            views = out.views
            if len(views) == 1 and views[0] is packet and not self._rx_pending:  # all back: rewind
                views.clear()
                out.offsets.clear()
                out.first = 0
                words = self._rx_words
                words[TAIL_WORD] = REWIND_OFFSET
                words[HEAD_WORD] = REWIND_OFFSET
            elif not self._release_locked(packet):
                raise _not_received(packet)
        finally:
            lock.release()
        try:
            packet.release()
        except (BufferError, AttributeError):
            pass

    def release_receive_packets(self, packets: Iterable[memoryview]) -> None:
        """Release several packets: all or nothing (one bad or repeated packet releases none)."""
        if not isinstance(packets, (list, tuple)):
            try:
                packets = list(packets)
            except TypeError:
                raise InvalidParameter(
                    f"packets must be a list of received packets, not {type(packets).__name__}"
                ) from None
        with self._rx_lock:
            if self._state == 2:
                return
            out = self._rx_out
            first, k = out.first, len(packets)
            oldest = out.views[first : first + k]
            if not (k and len(oldest) == k and all(map(operator.is_, oldest, packets))):
                seen: set[int] = set()  # not simply the oldest, in order: check each one
                for packet in packets:
                    index = out.find(packet, self._rx_data, self._mask)
                    if index < 0 or index in seen:
                        raise _not_received(packet)
                    seen.add(index)
            for packet in packets:
                self._release_locked(packet)
        for packet in packets:
            _release_view(packet)

    def holds(self, packet: object) -> bool:
        """Whether ``packet`` is a received packet of this core not yet released."""
        with self._rx_lock:
            return self._state != 2 and self._rx_out.find(packet, self._rx_data, self._mask) >= 0

    # ------------------------------------------------------------------ send

    def _allocate_locked(self, size: int) -> int:
        """A record for ``size`` bytes (tx lock held): its record offset, or -1 when the ring is full."""
        words = self._tx_words
        if not self._tx_unsent and not self._stalled and self._tx_release == self._tx_alloc:
            head = words[HEAD_WORD]
            if head == self._tx_release and self._tx_alloc != REWIND_OFFSET:  # all written: rewind
                words[HEAD_WORD] = REWIND_OFFSET
                words[TAIL_WORD] = REWIND_OFFSET
                self._tx_alloc = self._tx_release = REWIND_OFFSET
        head = words[HEAD_WORD]
        if head >= self._cap or head & 3:
            raise _bad_index("send", "Head", head, self._cap)
        tail = self._tx_alloc
        rec = (size + 7) & ~3
        if rec > ((head - tail - 4) & self._mask):
            return -1
        words[DATA_WORD + (tail >> 2)] = size | RELEASE_BIT
        self._tx_alloc = (tail + rec) & self._mask
        self._tx_unsent += 1
        return tail

    def allocate_send_packet(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes in the send ring (WintunAllocateSendPacket); BufferOverflow
        when the ring is full, EndOfFile after the end."""
        if size.__class__ is not int or not 0 < size <= MAX_PACKET_SIZE:
            if isinstance(size, bool) or not isinstance(size, int):
                raise InvalidParameter(f"packet size must be an int, not {type(size).__name__} ({size!r})")
            raise InvalidParameter(f"packet size {size} is out of range: must be 1..{MAX_PACKET_SIZE} (0xFFFF)")
        lock = self._tx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
            if self._state:
                raise _fail(Status.HANDLE_EOF, "the session has ended")
            record = self._allocate_locked(size)
            if record < 0:
                free = (self._tx_words[HEAD_WORD] - self._tx_alloc - 4) & self._mask
                raise _fail(
                    Status.BUFFER_OVERFLOW,
                    f"send ring full: a {size}-byte packet needs {(size + 7) & ~3} bytes, {free} free",
                )
            view = self._tx_data[record + 4 : record + 4 + size]
            out = self._tx_out
            out.views.append(view)
            out.offsets.append(record + 4)
        finally:
            lock.release()
        return view

    def _mark_sent(self, record: int) -> None:
        """Clear a record's release bit and move Tail over the sent run at the front (Producer.send)."""
        words = self._tx_words
        words[DATA_WORD + (record >> 2)] &= ~RELEASE_BIT
        if record != self._tx_release:
            return  # an earlier allocation is still unsent: this one waits for it
        tr = record
        if self._tx_unsent == 1:
            self._tx_unsent = 0
            tr = self._tx_alloc
        else:
            mask = self._mask
            while self._tx_unsent:
                size = words[DATA_WORD + (tr >> 2)]
                if size & RELEASE_BIT:
                    break
                tr = (tr + ((size + 7) & ~3)) & mask
                self._tx_unsent -= 1
        self._tx_release = tr
        words[TAIL_WORD] = tr

    def send_packet(self, packet: memoryview, header: object = None) -> None:
        """Send an allocated packet (WintunSendPacket) after every earlier allocation; the view is
        released. ``header``: None (the zero virtio-net header) or what ``convert_header`` takes; a bad one
        drops the packet and raises InvalidParameter. Nothing after the end."""
        hdr: bytes | None = None
        bad: InvalidParameter | None = None
        if header is not None:
            try:
                hdr = bytes(self._convert(header))
            except InvalidParameter as exc:
                bad = exc
        lock = self._tx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
            if self._state:
                return
            out = self._tx_out
            views = out.views
            if len(views) == 1 and views[0] is packet:  # the only one out (the usual case)
                record = out.offsets[0] - 4
                views.clear()
                out.offsets.clear()
                out.first = 0
            else:
                index = out.find(packet, self._tx_data, self._mask)
                if index < 0:
                    raise _not_allocated(packet)
                record = out.offsets[index] - 4
                if index == out.first:
                    out.drop_front()
                else:
                    views[index] = None
            if bad is not None:
                self._tx_headers[record] = None
            elif hdr is not None and hdr != ZERO_HEADER:
                self._tx_headers[record] = hdr
            self._mark_sent(record)
            self._flush()
        finally:
            lock.release()
        try:
            packet.release()
        except (BufferError, AttributeError):
            pass
        if bad is not None:
            raise InvalidParameter(f"{bad} (the packet was dropped)") from None

    def send_packets(
        self, packets: Sequence[bytes | bytearray | memoryview], headers: Sequence[bytes] | None = None
    ) -> int:
        """Send packets in order, after every earlier allocation; returns how many were taken. When nothing
        is queued ahead they are written straight from the caller's buffers (copying them into the ring
        would only be undone at once); from the first the kernel refuses for now (EAGAIN) on, and whenever
        something is queued, they are copied into the send ring and sent from there. The count stops where
        the ring is full even after writing what it holds. Items are contiguous buffers of 1..0xFFFF
        bytes, ``headers`` one 10-byte ``bytes`` per packet."""
        if headers is not None and len(headers) != len(packets):
            raise InvalidParameter(f"headers holds {len(headers)} item(s) for {len(packets)} packet(s)")
        count = 0
        with self._tx_lock:
            if self._state:
                return len(packets)  # as send_packet after the end: discarded (WintunSendPacket)
            data = self._tx_data
            words = self._tx_words
            total = len(packets)
            i = 0
            try:
                if self._stalled:
                    self._flush()
                if not self._stalled and not self._tx_unsent and words[HEAD_WORD] == words[TAIL_WORD]:
                    writev = os.writev
                    while i < total:
                        src, hdr = _batch_item(packets, headers, i)
                        try:
                            writev(self._fd, [hdr or ZERO_HEADER, src])
                        except OSError as e:
                            code = e.errno or errno.EIO
                            if code in _RETRY_ERRNOS:
                                self._stalled = True
                                break  # this one and the rest go through the ring
                            if code in _GONE_ERRNOS:
                                raise self._lost(code) from e
                            self.send_dropped += 1
                            self._rejected_cb(code, len(src))
                        count += 1
                        i += 1
                while i < total:
                    src, hdr = _batch_item(packets, headers, i)
                    n = len(src)
                    record = self._allocate_locked(n)
                    if record < 0:
                        self._flush()  # make room: everything queued so far goes first
                        record = self._allocate_locked(n)
                        if record < 0:
                            break
                    data[record + 4 : record + 4 + n] = src
                    if hdr is not None:
                        self._tx_headers[record] = hdr
                    self._mark_sent(record)
                    count += 1
                    i += 1
            finally:
                if self._state == 0:
                    self._flush()
        return count

    def flush(self) -> None:
        """Write what waits in the send ring (after a stall); EndOfFile once the queue is lost."""
        with self._tx_lock:
            if self._state == 0:
                self._flush()

    def _flush(self) -> None:
        """Write every packet between Head and Tail to the queue, in order (tx lock held)."""
        words = self._tx_words
        head = words[HEAD_WORD]
        tail = words[TAIL_WORD]
        cap = self._cap
        if head >= cap or head & 3:  # scribbled on by another party: read nothing there
            raise _bad_index("send", "Head", head, cap)
        if tail >= cap or tail & 3:
            raise _bad_index("send", "Tail", tail, cap)
        if head == tail:
            self._stalled = False
            return
        mask = self._mask
        data = self._tx_data
        headers = self._tx_headers
        iov: list[bytes | memoryview] = [ZERO_HEADER, ZERO_HEADER]
        try:
            while head != tail:
                size = words[DATA_WORD + (head >> 2)]
                rec = (size + 7) & ~3
                if size > MAX_PACKET_SIZE or rec > ((tail - head) & mask):
                    raise _fail(Status.INVALID_DATA, f"send ring packet at {head:#x} claims {size:#x} bytes")
                hdr = ZERO_HEADER
                if headers:
                    own = headers.pop(head, ZERO_HEADER)
                    if own is None:  # sent with a bad header: dropped, never written
                        self.send_dropped += 1
                        head = (head + rec) & mask
                        continue
                    hdr = own
                iov[0] = hdr
                iov[1] = data[head + 4 : head + 4 + size]
                try:
                    os.writev(self._fd, iov)
                except OSError as e:
                    code = e.errno or errno.EIO
                    if code in _RETRY_ERRNOS:
                        if hdr is not ZERO_HEADER:
                            headers[head] = hdr
                        self._stalled = True
                        return  # stays in the ring; the next send or receive retries
                    if code in _GONE_ERRNOS:
                        raise self._lost(code) from e
                    self.send_dropped += 1
                    self._rejected_cb(code, size)
                head = (head + rec) & mask
            self._stalled = False
        finally:
            words[HEAD_WORD] = head

    # ------------------------------------------------------------------ end

    def end(self) -> None:
        """Stop: forget every packet handed out (their views stay readable); later calls raise EndOfFile
        (receive, allocate, send_packets) or do nothing (release, send). Waits for running calls."""
        with self._rx_lock, self._tx_lock:
            self._state = 2
            self._rx_pending = 0  # what was read ahead goes with the session
            self._rx_out.clear()
            self._tx_out.clear()
            self._tx_headers.clear()


def _load() -> type[PySessionCore]:
    if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1":
        return PySessionCore
    try:
        from .. import _speedups
    except ImportError:
        return PySessionCore
    core: type[PySessionCore] | None = getattr(_speedups, "SessionCore", None)
    return PySessionCore if core is None else core


SessionCore: type[PySessionCore] = _load()
"""The C type when ``wiretun._speedups`` is built (and WIRETUN_NO_SPEEDUPS is not 1), else the twin."""
SPEEDUPS: bool = SessionCore is not PySessionCore
