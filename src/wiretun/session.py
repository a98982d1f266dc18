"""A Wintun session on Linux: two rings of :mod:`wiretun.ring` and one TUN queue, with no threads.

``adapter.start_session(capacity)`` attaches a TUN queue of its own to the adapter and lays out two
rings of ``capacity`` bytes each in anonymous memory:

* the **receive ring** (Wintun's "Send" ring: kernel -> you). :meth:`Session.receive_packet` reads the
  next packet from the TUN queue straight into ring memory at Tail (``readv``: the 10-byte virtio-net
  header into a scratch buffer, the IP packet into the ring, which always has 0xFFFF bytes of room after
  Tail thanks to the trailing area), writes its Size, publishes Tail, and returns a ``memoryview`` of the
  packet in the ring: zero copy. Packets are read on demand, so the ring never holds packets nobody has
  asked for and the TUN queue's own readiness says whether more are waiting. Release them in any order;
  the space comes back as Wintun's release bit says (:class:`wiretun.ring.Consumer`). When a packet does
  not fit in the free space (you hold too many), it is read and dropped, as Wintun's driver drops when the
  ring is full (counted in :attr:`Session.receive_dropped`), so the queue never backs up into a busy loop.
* the **send ring** (Wintun's "Receive" ring: you -> kernel). :meth:`Session.allocate_send_packet` carves
  a packet out at Tail (:class:`wiretun.ring.Producer`), :meth:`Session.send_packet` marks it sent, and
  every packet at the front that is sent (allocation order) is written to the queue right away
  (``writev`` with a zero header) and its space freed. If the kernel says EAGAIN/ENOBUFS/ENOMEM the
  packets stay in the ring and go out with the next send (or receive) call; a packet the kernel rejects
  (EINVAL: not IPv4/IPv6; EIO: the adapter is down) is dropped, counted in :attr:`Session.send_dropped`
  and logged once per kind of error.

The read-wait handle (:meth:`Session.get_read_wait_event`) is an epoll fd holding the TUN queue and an
eventfd that :meth:`Session.end` sets: it is readable when packets may be waiting or the session has
ended, so it works with ``select``, ``selectors`` and ``asyncio``'s ``add_reader``. It stays valid (and,
after the end, readable) until the session object is garbage-collected, so a thread still sleeping on it
is never left holding a closed or recycled descriptor.

Offload seam: the virtio-net header of each received packet lands in ``_rx_iov[0]``, a scratch buffer,
and is discarded (TUNSETOFFLOAD is 0, so it is all zero). An offload-enabled session (a later task) copies
it out per packet in the read loops of :meth:`Session._pull` / :meth:`Session._pull_one` (e.g. into a
list parallel to the views, or keyed by the packet's data offset, which the consumer already records)
and hands it out with the packet; sends put the caller's header where ``ZERO_HEADER`` goes in
``_tx_iov`` / ``_tx_direct_iov`` (and, for packets that wait in the send ring, keep it beside them).

Performance: no threads, no per-packet allocation beyond the packet's own memoryview (and the slice the
kernel reads into), no exception per empty poll (after one EAGAIN the next call polls the queue first).
Rings that empty are rewound to offset 0 so the memory in use stays in cache.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeAlias

from . import log
from .errors import Busy, EndOfFile, InvalidData, InvalidParameter, NoMoreItems
from .linux import tun
from .ring import (
    DATA_WORD,
    HEAD_WORD,
    MAX_PACKET_SIZE,
    MAX_RECORD_SIZE,
    TAIL_WORD,
    Consumer,
    Producer,
    Ring,
    check_capacity,
    check_packet_size,
)

if TYPE_CHECKING:
    from .adapter import Adapter

Packet: TypeAlias = memoryview
"""A packet is a ``memoryview`` of its bytes inside a session's ring (zero copy)."""

DEFAULT_CAPACITY = 0x400000
DEFAULT_BATCH = 64
ZERO_HEADER = bytes(tun.VNET_HDR_SIZE)
_HDR = tun.VNET_HDR_SIZE
_READ_SPAN = MAX_PACKET_SIZE  # bytes offered to each read: the largest IP packet
# The queue's device is gone (deleted: the kernel answers EBADFD) or the fd was closed under us. Not
# EIO: that is a write while the adapter is down, which drops the packet (as Wintun does) and goes on.
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.EBADF, errno.ENODEV, errno.ENXIO})
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM})


class _Resources:
    """What must be closed when the session goes away; held by the finalizer, not by the session."""

    __slots__ = ("queue_fd", "event_fd", "epoll")

    def __init__(self) -> None:
        self.queue_fd = -1
        self.event_fd = -1
        self.epoll: select.epoll | None = None

    def close_queue(self) -> None:
        fd, self.queue_fd = self.queue_fd, -1
        if fd >= 0:
            if self.epoll is not None:
                try:
                    self.epoll.unregister(fd)  # explicit: a forked child may share the queue's file
                except (OSError, ValueError):
                    pass
            os.close(fd)

    def close_all(self) -> None:
        self.close_queue()
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None
        fd, self.event_fd = self.event_fd, -1
        if fd >= 0:
            os.close(fd)


def _release_views(views: Iterable[memoryview]) -> None:
    for view in views:
        try:
            view.release()
        except BufferError:
            pass  # the caller exported it (e.g. numpy): it keeps the memory alive; nothing to do


class Session:
    """A session on an adapter (WintunStartSession). Use ``adapter.start_session(capacity)``.

    All packet calls are thread-safe (one lock per ring). ``multi_queue=True`` lets several sessions
    (in this or other processes) share the adapter, each with its own TUN queue; the kernel spreads
    flows across the queues.
    """

    def __init__(self, adapter: Adapter, capacity: int = DEFAULT_CAPACITY, *, multi_queue: bool = False) -> None:
        check_capacity(capacity)
        self._adapter = adapter
        self._capacity = capacity
        self._multi_queue = bool(multi_queue)
        self._ended = True  # until started: end() and the finalizer have nothing to undo
        self._torn_down = True
        self._end_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self.receive_dropped = 0
        self.send_dropped = 0
        self._send_errors_logged: set[int] = set()
        res = self._res = _Resources()
        self._name = "?"
        adapter._register_session(self)
        try:
            self._name = adapter.kernel_name  # kept for messages: asking the adapter later may fail
            if not self._multi_queue:
                attached = adapter._attached_queues()
                if attached:
                    raise Busy(
                        f"adapter {self._name!r} already has {attached} attached queue(s) (a session "
                        f"in another process?); start every session with multi_queue=True to share it"
                    )
            res.queue_fd = adapter._open_queue()
            tun.set_offload(res.queue_fd, 0)
            res.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            res.epoll = select.epoll(2)
            res.epoll.register(res.queue_fd, select.EPOLLIN)
            res.epoll.register(res.event_fd, select.EPOLLIN)
            self._rx = Ring.allocate(capacity)
            self._tx = Ring.allocate(capacity)
        except BaseException:
            res.close_all()
            adapter._unregister_session(self)
            raise
        self._finalizer = weakref.finalize(self, res.close_all)
        self._fd = res.queue_fd
        self._mask = capacity - 1

        # Receive ring (kernel -> caller). The pump below is its producer; Consumer does the releases.
        self._rx_cons = Consumer(self._rx, rewind_when_empty=True)
        self._rx_words = self._rx.words
        self._rx_data = self._rx.data
        self._rx_dwords = self._rx.data.cast("I")  # Size of the record at r is _rx_dwords[r >> 2]
        self._rx_iov: list[Any] = [bytearray(_HDR), None]  # [virtio-net header scratch, ring slice]
        self._rx_scratch = bytearray(_READ_SPAN)  # used only when the ring is too full for a blind read
        self._rx_scratch_iov: list[Any] = [self._rx_iov[0], self._rx_scratch]
        self._rx_idle = False  # the last read found the queue empty: poll before the next one
        self._rx_poll = select.poll()
        self._rx_poll.register(self._fd, select.POLLIN)

        # Send ring (caller -> kernel). Producer does allocate/send; _flush is its consumer.
        self._tx_prod = Producer(self._tx)
        self._tx_words = self._tx.words
        self._tx_data = self._tx.data
        self._tx_iov: list[Any] = [ZERO_HEADER, None]
        self._tx_direct_iov: list[Any] = [ZERO_HEADER, None]
        self._tx_track: dict[int, tuple[memoryview, int]] = {}  # id(view) -> (view, data offset)
        self._tx_stalled = False

        self._ended = False
        self._torn_down = False

    # ------------------------------------------------------------------ identity and lifetime

    @property
    def adapter(self) -> Adapter:
        return self._adapter

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def multi_queue(self) -> bool:
        return self._multi_queue

    @property
    def ended(self) -> bool:
        return self._ended

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running"
        return f"<Session on {self._name!r} capacity={self._capacity:#x} {state}>"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def end(self) -> None:
        """End the session (WintunEndSession): wake every waiter, detach the queue, free the rings.

        A thread sleeping on the read-wait handle wakes at once and its next receive raises EndOfFile.
        Views of packets still held stay readable (the memory lives as long as they do) but belong to no
        ring any more; releasing or sending them does nothing. Calling ``end`` again does nothing.
        """
        with self._end_lock:
            if self._torn_down:
                return
            self._torn_down = True
            self._ended = True
        res = self._res
        try:
            os.eventfd_write(res.event_fd, 1)  # stays set: the handle is readable from now on
        except OSError:
            pass
        with self._rx_lock, self._tx_lock:
            res.close_queue()
            self._tx_track.clear()
            self._rx_cons.forget()
            self._rx_iov[1] = None
            self._tx_iov[1] = None
            self._rx_dwords.release()
            self._rx.close()
            self._tx.close()
        self._adapter._unregister_session(self)

    def _lost(self, exc: OSError) -> EndOfFile:
        """The queue failed for good (adapter deleted): end I/O, wake waiters; resources go with end()."""
        if not self._ended:
            self._ended = True
            log.warn(f"Session on {self._name} lost its queue: {exc.strerror or exc}")
            try:
                os.eventfd_write(self._res.event_fd, 1)
            except OSError:
                pass
        return EndOfFile(f"the adapter's queue is gone ({exc.strerror or exc})")

    def _eof(self) -> EndOfFile:
        return EndOfFile("the session has ended")

    # ------------------------------------------------------------------ waiting

    def get_read_wait_event(self) -> int:
        """A file descriptor that is readable when packets may be waiting or the session has ended.

        Hand it to ``select``, ``selectors`` or ``loop.add_reader``; do not read or close it.
        """
        epoll = self._res.epoll
        if epoll is None:
            raise self._eof()
        return epoll.fileno()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until packets may be waiting or the session has ended; False after ``timeout`` seconds."""
        epoll = self._res.epoll
        if epoll is None or self._ended:
            return True
        return bool(epoll.poll(-1 if timeout is None else timeout, 1))

    # ------------------------------------------------------------------ receive (kernel -> caller)

    def _read_error(self, exc: OSError) -> None:
        if exc.errno in _GONE_ERRNOS:
            raise self._lost(exc) from exc
        raise exc

    def _pull_slow(self, r: int, free: int) -> int:
        """Read one packet when the ring has less than a maximum packet's room at record ``r``.

        Returns its size if it was copied into the ring at ``r``, -1 if the queue is empty, -2 if the
        packet did not fit and was dropped (as Wintun's driver drops when the ring is full)."""
        try:
            n = os.readv(self._fd, self._rx_scratch_iov) - _HDR
        except BlockingIOError:
            self._rx_idle = True
            return -1
        except OSError as e:
            self._read_error(e)
        if (n + 7) & ~3 > free:
            self.receive_dropped += 1
            return -2
        self._rx_data[r + 4 : r + 4 + n] = memoryview(self._rx_scratch)[:n]
        return n

    def _pull(self, max_count: int) -> list[memoryview]:
        """Read up to ``max_count`` packets from the queue into the receive ring and return their views.

        This is the kernel side of the receive ring, run inline: each packet is read straight into the
        ring at Tail, its Size written, Tail published, and the packets handed to the consumer (which is
        always caught up: packets are read on demand). The loop is the hot path, so it works in linear
        offsets with a single bound check per packet: ``stop`` is the last data offset from which a blind
        read of 0xFFFF bytes can neither overrun Head nor need wrapping.
        """
        words = self._rx_words
        data = self._rx_data
        dwords = self._rx_dwords
        iov = self._rx_iov
        readv = os.readv
        fd = self._fd
        cap = self._capacity
        r = words[TAIL_WORD]
        head = words[HEAD_WORD]
        end = head - 4 if head > r else head - 4 + cap  # free space is [r, end) in linear offsets
        views: list[memoryview] = []
        offsets: list[int] = []
        add_view = views.append
        add_offset = offsets.append
        if self._rx_idle:
            if not self._rx_poll.poll(0):
                return views
            self._rx_idle = False
        left = max_count
        span, hdr = _READ_SPAN, _HDR
        d = r + 4  # data offset of the packet being read
        try:
            while left > 0:
                if d - 4 >= cap:  # wrapped past the end: back to the start of Data
                    d -= cap
                    end -= cap
                stop = min(end - MAX_RECORD_SIZE, cap - 1) + 4
                if d <= stop:
                    for _ in range(left):
                        iov[1] = data[d : d + span]
                        n = readv(fd, iov) - hdr
                        dwords[(d >> 2) - 1] = n
                        add_view(data[d : d + n])
                        add_offset(d)
                        d += (n + 7) & ~3
                        if d > stop:
                            break
                    left = max_count - len(views)
                else:
                    left -= 1
                    n = self._pull_slow(d - 4, end - (d - 4))
                    if n == -1:
                        break
                    if n >= 0:
                        dwords[(d >> 2) - 1] = n
                        add_view(data[d : d + n])
                        add_offset(d)
                        d += (n + 7) & ~3
        except BlockingIOError:
            self._rx_idle = True
        except OSError as e:
            if views:
                self._publish(d - 4, offsets, views)
            self._read_error(e)
        if views:
            self._publish(d - 4, offsets, views)
        return views

    def _publish(self, r: int, offsets: list[int], views: list[memoryview]) -> None:
        if r >= self._capacity:
            r -= self._capacity
        self._rx_words[TAIL_WORD] = r
        self._rx_cons.accept(offsets, r, views)

    def _pull_one(self) -> memoryview | None:
        """One packet from the queue into the ring: :meth:`_pull` for a single packet, without lists."""
        if self._rx_idle and not self._rx_poll.poll(0):
            return None  # still empty: a poll costs less than a failed read's exception
        words = self._rx_words
        r = words[TAIL_WORD]
        free = (words[HEAD_WORD] - r - 4) & self._mask
        if free >= MAX_RECORD_SIZE:
            iov = self._rx_iov
            iov[1] = self._rx_data[r + 4 : r + 4 + _READ_SPAN]
            try:
                n = os.readv(self._fd, iov) - _HDR
            except BlockingIOError:
                self._rx_idle = True
                return None
            except OSError as e:
                self._read_error(e)
        else:
            n = self._pull_slow(r, free)
            if n < 0:
                return None  # empty, or the one packet waiting was dropped for lack of room
        self._rx_idle = False
        self._rx_dwords[r >> 2] = n
        view = self._rx_data[r + 4 : r + 4 + n]
        tail = (r + ((n + 7) & ~3)) & self._mask
        words[TAIL_WORD] = tail
        self._rx_cons.accept_one(r + 4, tail, view)
        return view

    def receive_packet(self, block: bool | None = None, timeout: float | None = None) -> memoryview | None:
        """The next packet from the kernel, a memoryview into the receive ring (WintunReceivePacket).

        With ``block`` left at None this is Wintun's call: NoMoreItems when nothing is waiting. With
        ``block=False`` an empty queue returns None instead (no exception per empty poll); with
        ``block=True`` it sleeps on the read-wait handle until a packet comes (None after ``timeout``
        seconds). EndOfFile once the session or adapter has ended. Release every packet with
        :meth:`release_receive_packet`.
        """
        with self._rx_lock:
            if self._ended:
                raise self._eof()
            if self._tx_stalled:
                self._retry_send()
            view = self._pull_one()
        if view is not None:
            return view
        if block is None:
            raise NoMoreItems("no packet is waiting")
        if not block:
            return None
        return self._receive_blocking(timeout)

    def _receive_blocking(self, timeout: float | None) -> memoryview | None:
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            if not self.wait(remaining) and deadline is not None and _monotonic() >= deadline:
                return None
            with self._rx_lock:
                if self._ended:
                    raise self._eof()
                view = self._pull_one()
            if view is not None:
                return view
            if deadline is not None and _monotonic() >= deadline:
                return None

    def receive_packets(
        self, max_count: int = DEFAULT_BATCH, *, block: bool = False, timeout: float | None = None
    ) -> list[memoryview]:
        """Up to ``max_count`` packets at once (an empty list when none is waiting, never NoMoreItems).

        With ``block=True`` it first sleeps until at least one packet comes (or ``timeout`` passes).
        """
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise InvalidParameter(f"max_count {max_count!r} must be an int >= 1")
        with self._rx_lock:
            if self._ended:
                raise self._eof()
            if self._tx_stalled:
                self._retry_send()
            out = self._pull(max_count)
        if out or not block:
            return out
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            self.wait(remaining)
            with self._rx_lock:
                if self._ended:
                    raise self._eof()
                out = self._pull(max_count)
            if out or (deadline is not None and _monotonic() >= deadline):
                return out

    def __iter__(self) -> Iterator[memoryview]:
        """Received packets, sleeping while none is waiting, until the session ends. Release each one."""
        while True:
            try:
                view = self.receive_packet(block=True)
            except EndOfFile:
                return
            if view is not None:
                yield view

    def release_receive_packet(self, packet: memoryview) -> None:
        """Give a received packet's space back (WintunReleaseReceivePacket); any order is fine.

        The view is released: using it afterwards raises ValueError. InvalidParameter for a packet
        released twice or not received from this session. After the session ended this does nothing.
        """
        with self._rx_lock:
            if self._torn_down:
                return
            self._rx_cons.release_tag(packet)
        try:
            packet.release()
        except BufferError:
            pass  # the caller exported it (e.g. to numpy): it keeps the memory alive

    def release_receive_packets(self, packets: list[memoryview]) -> None:
        """Release several received packets; fastest when they are the oldest ones, in order (as
        :meth:`receive_packets` returned them). All or nothing: one bad packet releases none."""
        with self._rx_lock:
            if self._torn_down:
                return
            self._rx_cons.release_tags(packets)
        try:
            deque(map(memoryview.release, packets), maxlen=0)
        except BufferError:
            _release_views(packets)

    # ------------------------------------------------------------------ asyncio (see wiretun.aio)

    def packets(self, batch: int = DEFAULT_BATCH) -> Any:
        """``async for packet in session.packets()``: every packet until the session ends (release each)."""
        from . import aio

        return aio.packets(self, batch)

    async def receive(self) -> memoryview:
        """The next packet, awaiting without blocking the event loop; EndOfFile once ended."""
        from . import aio

        return await aio.receive(self)

    async def send(self, packet: bytes | bytearray | memoryview) -> None:
        """Send one packet (copied), awaiting while the send ring is full; EndOfFile once ended."""
        from . import aio

        await aio.send(self, packet)

    def _queue_fileno(self) -> int:
        """The TUN queue's descriptor (for waiting until it accepts writes); EndOfFile once ended."""
        fd = self._res.queue_fd
        if fd < 0 or self._ended:
            raise self._eof()
        return fd

    # ------------------------------------------------------------------ send (caller -> kernel)

    def _flush(self) -> None:
        """The kernel side of the send ring, inline: write every published packet to the queue in order."""
        words = self._tx_words
        head = words[HEAD_WORD]
        tail = words[TAIL_WORD]
        if head == tail:
            self._tx_stalled = False
            return
        data = self._tx_data
        mask = self._mask
        iov = self._tx_iov
        writev = os.writev
        fd = self._fd
        try:
            while head != tail:
                size = words[DATA_WORD + (head >> 2)]
                if size > MAX_PACKET_SIZE or ((size + 7) & ~3) > ((tail - head) & mask):
                    raise InvalidData(f"send ring packet at {head:#x} claims {size:#x} bytes")
                iov[1] = data[head + 4 : head + 4 + size]
                try:
                    writev(fd, iov)
                except OSError as e:
                    if e.errno in _RETRY_ERRNOS:
                        self._tx_stalled = True
                        return  # stays in the ring; the next send or receive call retries
                    if e.errno in _GONE_ERRNOS:
                        raise self._lost(e) from e
                    self._send_rejected(e, size)
                head = (head + ((size + 7) & ~3)) & mask
            self._tx_stalled = False
        finally:
            iov[1] = None
            words[HEAD_WORD] = head

    def _send_rejected(self, exc: OSError, size: int) -> None:
        self.send_dropped += 1
        code = exc.errno or 0
        if code not in self._send_errors_logged:
            self._send_errors_logged.add(code)
            log.warn(
                f"Session on {self._name}: kernel rejected a {size}-byte packet "
                f"({exc.strerror}); dropping such packets (logged once)"
            )

    def _retry_send(self) -> None:
        with self._tx_lock:
            if not self._ended:
                self._flush()

    def _send_odd(self, pkt: Any, index: int) -> bool:
        """send_packets for an item that is not a flat byte buffer (e.g. a memoryview of another format)."""
        try:
            flat = memoryview(pkt).cast("B")
        except TypeError as e:
            raise InvalidParameter(f"packet {index} is not a bytes-like object ({type(pkt).__name__})") from e
        n = check_packet_size(flat.nbytes)
        offset = self._tx_prod.try_allocate(n)
        if offset < 0:
            return False
        self._tx_data[offset : offset + n] = flat
        self._tx_prod.send(offset)
        return True

    def allocate_send_packet(self, size: int) -> memoryview:
        """A writable memoryview of ``size`` bytes in the send ring (WintunAllocateSendPacket).

        Fill it, then :meth:`send_packet` it. Allocation order is send order. BufferOverflow when the
        ring is full (drop the packet); EndOfFile once the session or adapter has ended.
        """
        with self._tx_lock:
            if self._ended:
                raise self._eof()
            prod = self._tx_prod
            if not prod._unsent and self._tx_words[TAIL_WORD] and not self._tx_stalled:
                prod.rewind()  # empty: reuse the start of the ring, still in cache
            offset = prod.allocate(size)
            view = self._tx_data[offset : offset + size]
            self._tx_track[id(view)] = (view, offset)  # holding the view keeps its id from being reused
        return view

    def send_packet(self, packet: memoryview) -> None:
        """Send an allocated packet (WintunSendPacket); it leaves after every earlier allocation.

        The view is released. After the session ended this does nothing (the packet is discarded).
        """
        with self._tx_lock:
            if self._ended:
                return
            entry = self._tx_track.pop(id(packet), None)
            if entry is None or entry[0] is not packet:
                if entry is not None:
                    self._tx_track[id(packet)] = entry
                raise InvalidParameter(
                    f"{type(packet).__name__} at {id(packet):#x} is not a packet allocated by this session and "
                    f"not yet sent (sent twice, or from another session?)"
                )
            self._tx_prod.send(entry[1])
            self._flush()
        try:
            packet.release()
        except BufferError:
            pass

    def send_packets(self, packets: Iterable[bytes | bytearray | memoryview]) -> int:
        """Send many packets in order, as allocate + copy + send would; returns how many were taken.

        Each item is a bytes-like IP packet of 1..0xFFFF bytes. Packets go out in order after everything
        allocated before. When nothing is queued ahead of them they are written to the kernel straight
        from the caller's buffers: copying them into the ring first would only be undone at once. What
        the kernel cannot take right now (EAGAIN) is copied into the ring; when the ring is full the
        count stops there and the caller drops the rest (Wintun's BufferOverflow). EndOfFile once the
        session has ended.
        """
        count = 0
        with self._tx_lock:
            if self._ended:
                raise self._eof()
            prod = self._tx_prod
            words = self._tx_words
            if self._tx_stalled:
                self._flush()
            it = iter(packets)
            if not prod._unsent and words[HEAD_WORD] == words[TAIL_WORD]:
                count, rest = self._send_direct(it)
                if rest is None:
                    return count
                it = itertools.chain((rest,), it)
            data = self._tx_data
            try:
                for pkt in it:
                    try:
                        n = len(pkt)
                    except TypeError:
                        raise InvalidParameter(
                            f"packet {count} is not a bytes-like object ({type(pkt).__name__})"
                        ) from None
                    if not 0 < n <= MAX_PACKET_SIZE:
                        check_packet_size(n)
                    offset = prod.try_allocate(n)
                    if offset < 0:
                        self._flush()  # make room: everything allocated so far is sent already
                        offset = prod.try_allocate(n)
                        if offset < 0:
                            break
                    try:
                        data[offset : offset + n] = pkt
                    except (TypeError, ValueError):
                        prod.unallocate(offset)
                        if not self._send_odd(pkt, count):
                            break
                        count += 1
                        continue
                    prod.send(offset)
                    count += 1
            finally:
                self._flush()
        return count

    def _send_direct(self, it: Iterator[Any]) -> tuple[int, Any]:
        """Write packets from the caller's buffers while the send ring is empty. Returns (count taken,
        the packet the kernel refused with EAGAIN or None); the caller queues that one and the rest."""
        iov = self._tx_direct_iov
        writev = os.writev
        fd = self._fd
        count = 0
        try:
            for pkt in it:
                n = len(pkt)
                if not 0 < n <= MAX_PACKET_SIZE:
                    check_packet_size(n)
                iov[1] = pkt
                try:
                    writev(fd, iov)
                except OSError as e:
                    if e.errno in _RETRY_ERRNOS:
                        self._tx_stalled = True
                        return count, pkt
                    if e.errno in _GONE_ERRNOS:
                        raise self._lost(e) from e
                    self._send_rejected(e, n)
                count += 1
        except TypeError as e:
            raise InvalidParameter(f"packet {count} is not a bytes-like object: {e}") from None
        finally:
            iov[1] = None
        return count, None


_monotonic = time.monotonic
