"""The Linux session backend: two rings of :mod:`wiretun.ring` over one TUN queue, with no threads.

``adapter.start_session(capacity)`` attaches a TUN queue of its own to the adapter and lays out two
rings of ``capacity`` bytes each in anonymous memory:

* the **receive ring** (Wintun's "Send" ring: kernel -> you). :meth:`Session.receive_packet` reads the
  next packet from the TUN queue straight into ring memory at Tail (``readv``: the 10-byte virtio-net
  header into a scratch buffer, the IP packet into the ring, which always has 0xFFFF bytes of room after
  Tail thanks to the trailing area), writes its Size, publishes Tail, and returns a ``memoryview`` of the
  packet in the ring: zero copy. A plain session reads ahead, as Wintun's driver fills its ring: a receive
  that finds no packet waiting in the ring reads what waits in the queue (up to 64 packets, while the ring
  has room for another) with the GIL released once, and later receives hand those out with no system
  call. Offload and capture sessions read on demand. Release packets in any order;
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

The read-wait handle (:meth:`Session.get_read_wait_event`) is an epoll fd holding the TUN queue, an
eventfd that :meth:`Session.end` sets and an eventfd set while packets read ahead wait in the ring: it is
readable when packets may be waiting or the session has ended, so it works with ``select``,
``selectors`` and ``asyncio``'s ``add_reader``. It stays valid (and, after the end, readable) until the
session object is garbage-collected, so a thread still sleeping on it is never left holding a closed or
recycled descriptor.

**Offloads** (``start_session(capacity, offload=True)``): the session sets ``TUNSETOFFLOAD`` to
checksum + TSO4 + TSO6, plus USO4 + USO6 where the kernel accepts them (Linux 6.2+; older kernels say
EINVAL and the session goes on without), see :attr:`Session.offloads`. The kernel then hands over
*super-packets*: one IP/TCP or IP/UDP header with up to 64 KiB of payload and a checksum that holds only
the pseudo-header sum, described by the packet's virtio-net header (:class:`wiretun.offload.VirtioNetHeader`:
GSO type, header length, segment size, checksum start and offset, flags). The receive ring of an
offload session stores each packet *with* its 10-byte header in front, exactly as the kernel's read
produced it (the ring is the session's own memory; its records' Size counts the header), so the header
costs no extra copy or allocation; ``receive_packet`` still returns a view of the IP packet alone, and
:meth:`Session.packet_header` or ``receive_packets(..., headers=list)`` give the header. Sends take a
header per packet (``send_packet(view, header=...)``, ``send_packets(packets, headers=...)``): a
super-packet written with its header is segmented by the kernel (or delivered whole to a local socket).
Between two offload sessions (a forwarder) a packet passes with its header unchanged; :mod:`wiretun.offload`
splits super-packets into wire packets and coalesces wire packets into super-packets. The largest IP
packet the kernel hands out is 65535 bytes (it segments GSO packets of ``gso_max_size``, 65536, or more in
software first), so Wintun's 0xFFFF packet limit still holds for the packet itself. Offloads belong to
the device, not to a queue: all sessions sharing a multi-queue adapter must agree on ``offload``, and a
session that disagrees with the queues already attached gets InvalidParameter.

**Capture** (``start_session(..., capture="file.pcap")``, a path or a binary file object): every packet
the session receives (as handed out) and sends (as written to the kernel) is recorded in a pcap file
with the raw-IP link type (:mod:`wiretun.capture`), offloaded super-packets whole, as they passed. The
file is flushed and closed when the session ends.

Performance: no threads, no per-packet allocation beyond the packet's own memoryview (and the slice the
kernel reads into), no exception per empty poll (after one EAGAIN the next call polls the queue first).
Rings that empty are rewound to offset 0 so the memory in use stays in cache.
"""


from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import select
import socket
import struct
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .. import log
from .._backend import Recorder
from ..errors import EndOfFile, InvalidData, InvalidParameter, WintunError
from ..offload import VirtioNetHeader
from ..ring import (
    DATA_WORD,
    HEAD_WORD,
    HEADER_SIZE,
    MAX_PACKET_SIZE,
    MAX_RECORD_SIZE,
    TAIL_WORD,
    Consumer,
    Producer,
    Ring,
    check_capacity,
    ring_size,
)
from . import tun
from .engine import PySessionCore, SessionCore
from .loops import _rx_frames, _rx_one, _rx_pull, _tx_direct, _tx_flush

if TYPE_CHECKING:
    from .adapter import LinuxAdapter


ZERO_HEADER = bytes(tun.VNET_HDR_SIZE)
_HDR = tun.VNET_HDR_SIZE
_READ_SPAN = MAX_PACKET_SIZE  # bytes offered to each read: the largest IP packet
# The queue's device is gone (deleted: the kernel answers EBADFD) or the fd was closed under us. Not
# EIO: that is a write while the adapter is down, which drops the packet (as Wintun does) and goes on.
# getattr: these names exist on Linux, the only platform that imports this module; kept tolerant anyway.
_GONE_ERRNOS = frozenset(getattr(errno, n) for n in ("EBADFD", "EBADF", "ENODEV", "ENXIO") if hasattr(errno, n))
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM})

OFFLOADS = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_USO4 | tun.TUN_F_USO6
"""What ``offload=True`` asks the kernel for; :data:`BASE_OFFLOADS` where USO is unknown (before 6.2)."""
BASE_OFFLOADS = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6
# An offload session's receive ring holds frames: virtio-net header + IP packet. A read is offered one
# byte more than the largest frame so that a longer one (which the kernel would cut) is seen and dropped.
_FRAME_MAX = _HDR + MAX_PACKET_SIZE
_FRAME_SPAN = _FRAME_MAX + 1
_FRAME_RECORD = (4 + _FRAME_SPAN + 3) & ~3
_FRAME_SLACK = _FRAME_RECORD - MAX_RECORD_SIZE + 16  # beyond Wintun's trailing area, for the longer records
_HEADER_LIMITS = (0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF)  # flags, gso_type, hdr_len, gso_size, csum_*
_DROP = object()  # in _tx_headers: a queued packet that must not be written (sent with a bad header)
_SIOCETHTOOL = 0x8946
_ETHTOOL_GTXCSUM = 0x00000016


def _tx_checksum_offloaded(kernel_name: str) -> bool:
    """Whether the device has checksum offload on now (ETHTOOL_GTXCSUM), i.e. some queue's session asked
    for offloads. Run it in the adapter's namespace (``adapter._call``)."""
    value = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_GTXCSUM, 0), 8)
    req = struct.pack("16sP16x", kernel_name.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, req)
    enabled: int = struct.unpack_from("II", value.raw)[1]
    return enabled != 0


def _header_bytes(header: Any, where: str) -> Any:
    """A header argument as 10 bytes: a VirtioNetHeader is packed, a bytes-like must be 10 bytes long."""
    if header is None:
        return ZERO_HEADER
    if isinstance(header, VirtioNetHeader):
        for name, value, limit in zip(header._fields, header, _HEADER_LIMITS):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise InvalidParameter(f"{where}: {name} {value!r} is out of range 0..{limit}")
        return header.pack()
    try:
        size = memoryview(header).nbytes
    except TypeError:
        raise InvalidParameter(
            f"{where} must be a VirtioNetHeader or 10 bytes, not {type(header).__name__}"
        ) from None
    if size != _HDR:
        raise InvalidParameter(f"{where} is {size} bytes; a virtio-net header is {_HDR} bytes")
    return header


class _Resources:
    """What must be closed when the session goes away; held by the finalizer, not by the session."""

    __slots__ = ("queue_fd", "event_fd", "ready_fd", "epoll")

    def __init__(self) -> None:
        self.queue_fd = -1
        self.event_fd = -1
        self.ready_fd = -1  # set by the session core while packets it read ahead wait in the ring
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

    def close_all_and_release(self, claim: Any) -> None:
        self.close_all()
        claim.release()

    def close_all(self) -> None:
        self.close_queue()
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None
        for name in ("event_fd", "ready_fd"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)


def _release_views(views: Iterable[memoryview]) -> None:
    for view in views:
        try:
            view.release()
        except BufferError:
            pass  # the caller exported it (e.g. numpy): it keeps the memory alive; nothing to do


class LinuxSession:
    """The session backend on Linux (see :class:`wiretun._backend.SessionBackend`): started by
    :meth:`wiretun.linux.adapter.LinuxAdapter.start_session`, used by :class:`wiretun.session.Session`.

    Per-packet calls are thread-safe (one lock per ring) and never block; the portable session sleeps on
    :meth:`wait` for the blocking forms.
    """

    selectable = True  # the wait handles are descriptors (epoll, eventfd): select and asyncio take them

    def __init__(
        self,
        adapter: LinuxAdapter,
        capacity: int,
        *,
        multi_queue: bool = False,
        offload: bool = False,
        record: Recorder | None = None,
    ) -> None:
        check_capacity(capacity)
        if not isinstance(offload, bool):
            raise InvalidParameter(f"offload must be True or False, not {offload!r}")
        self._adapter = adapter
        self._capacity = capacity
        self._multi_queue = bool(multi_queue)
        self._offload = offload
        self._offloads = 0
        self._ended = True  # until started: end() and the finalizer have nothing to undo
        self._torn_down = True
        self._end_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._receive_dropped = 0
        self._send_dropped = 0
        self._core: PySessionCore | None = None
        self._send_errors_logged: set[int] = set()
        self._capture: Recorder | None = record
        self._rx_error: WintunError | None = None  # raised by the next receive (packets came before it)
        res = self._res = _Resources()
        self._name = adapter.kernel_name()  # kept for messages: asking the adapter later may fail
        self._rx_memory: mmap.mmap | None = None
        self._claim = adapter.claim_session(self._multi_queue)  # Busy when another session has it
        plain = not offload and record is None  # runs on a SessionCore (below)
        try:
            res.queue_fd = adapter.open_queue()
            self._offloads = self._negotiate_offloads(res.queue_fd)
            res.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            res.epoll = select.epoll(3)
            res.epoll.register(res.queue_fd, select.EPOLLIN)
            res.epoll.register(res.event_fd, select.EPOLLIN)
            if plain:  # only the core reads ahead
                res.ready_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                res.epoll.register(res.ready_fd, select.EPOLLIN)
            if offload:
                # Frames (header + packet) up to 10 bytes longer than Wintun's records: a little more room
                # after the trailing area, in memory of our own (Ring.allocate sizes it for packets only).
                self._rx_memory = mmap.mmap(-1, ring_size(capacity) + _FRAME_SLACK,
                                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._rx = Ring(self._rx_memory, capacity)
            else:
                self._rx = Ring.allocate(capacity)
            self._tx = Ring.allocate(capacity)
        except BaseException:
            res.close_all()
            if self._rx_memory is not None:
                self._rx_memory.close()
            self._claim.release()
            raise
        self._finalizer = weakref.finalize(self, _Resources.close_all_and_release, res, self._claim)
        self._fd = res.queue_fd
        self._mask = capacity - 1

        # Receive ring (kernel -> caller). The pump below is its producer; Consumer does the releases.
        self._rx_cons = Consumer(self._rx, rewind_when_empty=True)
        self._rx_words = self._rx.words
        self._rx_data = self._rx.data
        if self._rx_memory is not None:  # Data plus the slack beyond the trailing area
            self._rx_data = memoryview(self._rx_memory)[HEADER_SIZE:]
        self._rx_hdr = bytearray(_HDR)  # the virtio-net header of each packet read (all zero: no offloads)
        # Reads go here only when the ring is too full for a blind read at Tail (then copied, or dropped).
        self._rx_scratch = bytearray(_FRAME_SPAN if offload else _READ_SPAN)
        self._rx_idle = False  # the last read found the queue empty: poll before the next one
        self._rx_poll = select.poll()
        self._rx_poll.register(self._fd, select.POLLIN)

        # Send ring (caller -> kernel). Producer does allocate/send; _flush is its consumer.
        self._tx_prod = Producer(self._tx)
        self._tx_words = self._tx.words
        self._tx_data = self._tx.data
        self._tx_iov: list[Any] = [ZERO_HEADER, None]
        self._tx_track: dict[int, tuple[memoryview, int]] = {}  # id(view) -> (view, data offset)
        self._tx_headers: dict[int, Any] = {}  # data offset -> header, for queued packets sent with one
        self._tx_stalled = False

        if plain:
            # A plain session keeps its per-packet state in one SessionCore (C when built): Wintun's
            # per-packet calls are the core's own methods, one call each (the portable Session binds
            # these attributes in turn). Offload and capture sessions run the loops below.
            core = self._core = _make_core(self)
            self.receive_packet = core.receive_packet  # type: ignore[method-assign]
            self.receive_packets = core.receive_packets  # type: ignore[method-assign]
            self.release_receive_packet = core.release_receive_packet  # type: ignore[method-assign]
            self.release_receive_packets = core.release_receive_packets  # type: ignore[method-assign]
            self.allocate_send_packet = core.allocate_send_packet  # type: ignore[method-assign]
            self.send_packet = core.send_packet  # type: ignore[method-assign]
        self._ended = False
        self._torn_down = False

    # ------------------------------------------------------------------ state

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def offloads(self) -> int:
        """The ``TUN_F_*`` offload flags in effect (:data:`OFFLOADS` or :data:`BASE_OFFLOADS`; 0 without)."""
        return self._offloads

    @property
    def send_stalled(self) -> bool:
        """The kernel refused writes (EAGAIN/ENOBUFS): sent packets wait in the send ring for the queue."""
        core = self._core
        return core.stalled if core is not None else self._tx_stalled

    @property
    def receive_dropped(self) -> int:
        """Packets read and dropped because the receive ring had no room (too many held)."""
        core = self._core
        return self._receive_dropped + (core.receive_dropped if core is not None else 0)

    @property
    def send_dropped(self) -> int:
        """Packets the kernel rejected (or sent with a bad header), dropped."""
        core = self._core
        return self._send_dropped + (core.send_dropped if core is not None else 0)

    def _record(self, packets: Sequence[Any]) -> None:
        capture = self._capture
        if capture is not None:
            capture(packets)

    def _negotiate_offloads(self, fd: int) -> int:
        """Set the device's offloads for this session's ``offload`` choice; returns the flags in effect.

        TUNSETOFFLOAD acts on the whole device, so a session that shares it with queues already attached
        (multi-queue) must want what they have: otherwise InvalidParameter, and nothing is changed."""
        adapter = self._adapter
        if self._multi_queue and adapter.attached_queues() > 1:
            have = adapter.call(_tx_checksum_offloaded, f"cannot read the offloads of adapter {self._name}",
                                self._name)
            if have != self._offload:
                raise InvalidParameter(
                    f"adapter {self._name!r} is shared with queues that use offload={have}; offloads belong "
                    f"to the device, so start this session with offload={have} too"
                )
            if not self._offload:
                return 0
        if not self._offload:
            tun.set_offload(fd, 0)
            return 0
        for flags in (OFFLOADS, BASE_OFFLOADS):
            try:
                tun.set_offload(fd, flags)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue  # this kernel does not know a flag (USO before Linux 6.2): ask for less
                raise
            if flags != OFFLOADS:
                log.info(f"Session on {self._name}: the kernel has no UDP segmentation offload; using "
                         f"checksum and TCP segmentation offload only")
            return flags
        raise InvalidParameter(f"the kernel refuses TUN offloads on adapter {self._name!r} (TUNSETOFFLOAD)")

    def end(self) -> None:
        """End the session (WintunEndSession): wake every waiter, detach the queue, free the rings.

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
        if self._core is not None:
            self._core.end()  # waits for calls in flight; later ones raise EndOfFile or do nothing
        with self._rx_lock, self._tx_lock:
            res.close_queue()
            self._claim.release()
            self._tx_track.clear()
            self._tx_headers.clear()
            self._rx_cons.forget()
            self._tx_iov[1] = None
            self._rx.close()
            self._tx.close()
            if self._rx_memory is not None:
                self._rx_data.release()
                try:
                    self._rx_memory.close()
                except BufferError:
                    pass  # a caller holds a packet view: the mapping goes with the last view
            self._capture = None

    def _lost(self, exc: OSError) -> EndOfFile:
        """The queue failed for good (adapter deleted): end I/O, wake waiters; resources go with end()."""
        if not self._ended:
            self._ended = True
            # The adapter was deleted (EBADFD, ENODEV, ENXIO): the normal end of a session whose interface
            # someone removed (`ip link del`, wg-quick down). Only a closed fd (EBADF) is a surprise.
            report = log.warn if exc.errno == errno.EBADF else log.info
            report(f"Session on {self._name} ends: its queue is gone ({exc.strerror or exc})")
            try:
                os.eventfd_write(self._res.event_fd, 1)
            except OSError:
                pass
        return EndOfFile(f"the adapter's queue is gone ({exc.strerror or exc})")

    def _eof(self) -> EndOfFile:
        return EndOfFile("the session has ended")

    # ------------------------------------------------------------------ waiting

    def read_wait_handle(self) -> int:
        """An epoll descriptor readable when packets may be waiting or the session has ended."""
        epoll = self._res.epoll
        if epoll is None:
            raise self._eof()
        return epoll.fileno()

    def end_wait_handle(self) -> int:
        """An eventfd that becomes readable (and stays so) when the session ends."""
        fd = self._res.event_fd
        if fd < 0:
            raise self._eof()
        return fd

    def write_wait_handle(self) -> int | None:
        """The TUN queue's descriptor: writable when the kernel takes writes again; EndOfFile once ended."""
        fd = self._res.queue_fd
        if fd < 0 or self._ended:
            raise self._eof()
        return fd

    def wait(self, timeout: float | None) -> bool:
        """Sleep until packets may be waiting or the session has ended; False after ``timeout`` seconds
        (None: no limit; checked by the caller)."""
        epoll = self._res.epoll
        if epoll is None or self._ended:
            return True
        return bool(epoll.poll(-1 if timeout is None else timeout, 1))

    # ------------------------------------------------------------------ receive (kernel -> caller)

    def _read_error(self, exc: OSError) -> WintunError:
        if exc.errno in _GONE_ERRNOS:
            return self._lost(exc)
        return WintunError(
            f"Session on {self._name}: reading the TUN queue failed: {exc.strerror or exc} (errno {exc.errno})"
        )

    def _read_status(self, status: int, count: int) -> None:
        """After a read loop stopped on ``status`` (an errno, or -1 for a short read): an empty queue makes
        the next call poll first; anything else raises, as the read itself would have, unless ``count``
        packets came before it: those are handed out and the next call raises (their ring space must not
        be held by views nobody got)."""
        if status == errno.EAGAIN:
            self._rx_idle = True
            return
        if status < 0:
            exc: WintunError = InvalidData(
                f"the TUN queue returned a read shorter than the {_HDR}-byte virtio-net header")
        else:
            exc = self._read_error(OSError(status, os.strerror(status)))
        if count:
            self._rx_error = exc
            return
        raise exc

    def _raise_pending(self) -> None:
        exc, self._rx_error = self._rx_error, None
        if exc is not None:
            raise exc

    def _pull(self, max_count: int) -> list[memoryview]:
        """Read up to ``max_count`` packets from the queue into the receive ring and return their views.

        This is the kernel side of the receive ring, run inline (:func:`_rx_pull`): each packet is read
        straight into the ring at Tail, its Size written, Tail published, and the packets handed to the
        consumer (which is always caught up: packets are read on demand). Packets read before a failing
        read are handed out; the error is raised by the next call.
        """
        if self._rx_idle:
            if not self._rx_poll.poll(0):
                return []
            self._rx_idle = False
        views: list[memoryview] = []
        offsets: list[int] = []
        count, tail, status, dropped = _rx_pull(
            self._fd, self._rx_words, self._rx_data, max_count, self._rx_hdr, 0, self._rx_scratch, views, offsets
        )
        return self._pulled(views, offsets, count, tail, status, dropped)

    def _pulled(self, views: list[memoryview], offsets: list[int], count: int, tail: int, status: int,
                dropped: int) -> list[memoryview]:
        """What :meth:`_pull` and :meth:`_pull_frames` do with a read's outcome: count the drops, hand the
        ring's new records to the consumer, report the read's status, capture; returns ``views``."""
        if dropped:
            self._receive_dropped += dropped
        if count:
            self._rx_cons.accept(offsets, tail, views)
        if status:
            self._read_status(status, count)
        if count and self._capture is not None:
            self._record(views)
        return views

    def _pull_one(self) -> memoryview | None:
        """One packet from the queue into the ring: :meth:`_pull` for a single packet, without lists."""
        if self._rx_idle and not self._rx_poll.poll(0):
            return None  # still empty: a poll costs less than a failed read's exception
        words = self._rx_words
        r = words[TAIL_WORD]
        try:
            view = _rx_one(self._fd, words, self._rx_data, self._rx_hdr, self._rx_scratch)
        except OSError as e:
            raise self._read_error(e) from e
        if not isinstance(view, memoryview):
            if view == -2:
                self._receive_dropped += 1  # no room for it (too many packets held), as Wintun drops
            else:
                self._read_status(errno.EAGAIN if view == -1 else -1, 0)
            return None
        self._rx_idle = False
        self._rx_cons.accept_one(r + 4, words[TAIL_WORD], view)
        if self._capture is not None:
            self._record((view,))
        return view

    # An offload session's receive ring holds frames: the kernel's read, header and packet, in one record.

    def _pull_frames(self, max_count: int, headers: list[Any] | None) -> list[memoryview]:
        """:meth:`_pull` for an offload session (:func:`_rx_frames`): each read lands whole (header +
        packet) in the ring; the view handed out starts after the header."""
        if self._rx_idle:
            if not self._rx_poll.poll(0):
                return []
            self._rx_idle = False
        views: list[memoryview] = []
        offsets: list[int] = []
        count, tail, status, dropped = _rx_frames(
            self._fd, self._rx_words, self._rx_data, max_count, self._rx_scratch, views, offsets, headers
        )
        return self._pulled(views, offsets, count, tail, status, dropped)

    def _pull_frame_one(self) -> memoryview | None:
        if self._rx_idle and not self._rx_poll.poll(0):
            return None
        views = self._pull_frames(1, None)
        return views[0] if views else None

    def packet_header(self, packet: memoryview) -> VirtioNetHeader:
        """The virtio-net header that came with a received, not yet released packet (all zero without
        offloads). InvalidParameter for a packet that is not a received, unreleased packet of this session."""
        if self._core is not None:
            if self._torn_down:
                raise self._eof()
            if not self._core.holds(packet):
                raise InvalidParameter(
                    f"{type(packet).__name__} at {id(packet):#x} is not a received, unreleased packet of this "
                    f"session (released twice, never received, or from another session?)"
                )
            return VirtioNetHeader()
        with self._rx_lock:
            if self._torn_down:
                raise self._eof()
            cons = self._rx_cons
            index = cons._index_of_tag(packet)
            if not self._offload:
                return VirtioNetHeader()
            d = cons._taken[index]
            return VirtioNetHeader.unpack_from(self._rx_data, d)

    def receive_packet(self) -> memoryview | None:
        """The next packet, a memoryview into the receive ring, or None when none is waiting (never
        blocks). EndOfFile once the session or adapter has ended."""
        lock = self._rx_lock
        lock.acquire()  # not a with-block: half the cost, paid per packet
        try:
            if self._ended:
                raise self._eof()
            if self._rx_error is not None:
                self._raise_pending()
            if self._tx_stalled:
                self._retry_send()
            return self._pull_frame_one() if self._offload else self._pull_one()
        finally:
            lock.release()

    def receive_packets(self, max_count: int, headers: list[Any] | None = None) -> list[memoryview]:
        """Up to ``max_count`` (checked by the caller) packets, an empty list when none is waiting; with a
        list for ``headers``, each packet's 10-byte virtio-net header is appended to it."""
        with self._rx_lock:
            if self._ended:
                raise self._eof()
            if self._rx_error is not None:
                self._raise_pending()
            if self._tx_stalled:
                self._retry_send()
            if self._offload:
                return self._pull_frames(max_count, headers)
            out = self._pull(max_count)
        if headers is not None:
            headers.extend(itertools.repeat(ZERO_HEADER, len(out)))
        return out

    def release_receive_packet(self, packet: memoryview) -> None:
        """WintunReleaseReceivePacket; see :meth:`wiretun.session.Session.release_receive_packet`."""
        lock = self._rx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
            if self._torn_down:
                return
            self._rx_cons.release_tag(packet)
        finally:
            lock.release()
        try:
            packet.release()
        except BufferError:
            pass  # the caller exported it (e.g. to numpy): it keeps the memory alive

    def release_receive_packets(self, packets: list[memoryview]) -> None:
        """Release several packets, all or nothing; see :class:`wiretun.session.Session`."""
        if type(packets) is not list:
            try:
                packets = list(packets)
            except TypeError:
                raise InvalidParameter(
                    f"packets must be a list of received packets, not {type(packets).__name__}"
                ) from None
        with self._rx_lock:
            if self._torn_down:
                return
            self._rx_cons.release_tags(packets)
        try:
            deque(map(memoryview.release, packets), maxlen=0)
        except BufferError:
            _release_views(packets)

    # ------------------------------------------------------------------ send (caller -> kernel)

    def _flush(self) -> None:
        """The kernel side of the send ring, inline: write every published packet to the queue in order.

        The loop is :func:`_tx_flush`; packets queued with a header (offloads: ``_tx_headers``, keyed by
        data offset) or a capture file to record them in take :meth:`_flush_each`."""
        if self._tx_headers or self._capture is not None:
            self._flush_each()
            return
        words = self._tx_words
        while True:
            status = _tx_flush(self._fd, words, self._tx_data, ZERO_HEADER)
            if not status:
                self._tx_stalled = False
                return
            head = words[HEAD_WORD]
            size = words[DATA_WORD + (head >> 2)]
            if status < 0:
                raise InvalidData(f"send ring packet at {head:#x} claims {size:#x} bytes")
            if status in _RETRY_ERRNOS:
                self._tx_stalled = True
                return  # stays in the ring; the next send or receive call retries
            exc = OSError(status, os.strerror(status))
            if status in _GONE_ERRNOS:
                raise self._lost(exc) from exc
            self._send_rejected(exc, size)
            words[HEAD_WORD] = (head + ((size + 7) & ~3)) & self._mask

    def _flush_each(self) -> None:
        """:meth:`_flush` packet by packet, for a queued packet's own header and the capture file."""
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
        headers = self._tx_headers
        capture = self._capture
        try:
            while head != tail:
                size = words[DATA_WORD + (head >> 2)]
                if size > MAX_PACKET_SIZE or ((size + 7) & ~3) > ((tail - head) & mask):
                    raise InvalidData(f"send ring packet at {head:#x} claims {size:#x} bytes")
                iov[1] = data[head + 4 : head + 4 + size]
                if headers:
                    iov[0] = headers.get(head + 4, ZERO_HEADER)
                    if iov[0] is _DROP:
                        self._send_dropped += 1
                        headers.pop(head + 4, None)
                        iov[0] = ZERO_HEADER
                        head = (head + ((size + 7) & ~3)) & mask
                        continue
                try:
                    writev(fd, iov)
                except OSError as e:
                    if e.errno in _RETRY_ERRNOS:
                        self._tx_stalled = True
                        return  # stays in the ring; the next send or receive call retries
                    if e.errno in _GONE_ERRNOS:
                        raise self._lost(e) from e
                    self._send_rejected(e, size)
                else:
                    if capture is not None:
                        self._record((iov[1],))
                if headers:
                    headers.pop(head + 4, None)
                    iov[0] = ZERO_HEADER
                head = (head + ((size + 7) & ~3)) & mask
            self._tx_stalled = False
        finally:
            iov[1] = None
            iov[0] = ZERO_HEADER
            words[HEAD_WORD] = head

    def _send_rejected(self, exc: OSError, size: int) -> None:
        self._send_dropped += 1
        self._log_rejected(exc, size)

    def _log_rejected(self, exc: OSError, size: int) -> None:
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

    def allocate_send_packet(self, size: int) -> memoryview:
        """WintunAllocateSendPacket; see :meth:`wiretun.session.Session.allocate_send_packet`."""
        lock = self._tx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
            if self._ended:
                raise self._eof()
            prod = self._tx_prod
            if not prod._unsent and self._tx_words[TAIL_WORD] and not self._tx_stalled:
                prod.rewind()  # empty: reuse the start of the ring, still in cache
            offset = prod.allocate(size)
            view = self._tx_data[offset : offset + size]
            self._tx_track[id(view)] = (view, offset)  # holding the view keeps its id from being reused
        finally:
            lock.release()
        return view

    def send_packet(self, packet: memoryview, header: Any = None) -> None:
        """WintunSendPacket; see :meth:`wiretun.session.Session.send_packet`."""
        bad: InvalidParameter | None = None
        try:
            hdr = ZERO_HEADER if header is None else _header_bytes(header, "header")
        except InvalidParameter as exc:
            hdr, bad = _DROP, exc
        lock = self._tx_lock
        lock.acquire()  # not a with-block: see receive_packet
        try:
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
            if hdr is not ZERO_HEADER:
                # A bad header drops the packet rather than leave it unsent at the front of the ring,
                # where every later packet would wait behind it.
                self._tx_headers[entry[1]] = hdr if hdr is _DROP else bytes(hdr)
            self._tx_prod.send(entry[1])
            self._flush()
        finally:
            lock.release()
        try:
            packet.release()
        except BufferError:
            pass
        if bad is not None:
            raise InvalidParameter(f"{bad} (the packet was dropped)") from None

    def send_packets(
        self, packets: Iterable[bytes | bytearray | memoryview], headers: Sequence[Any] | None = None
    ) -> int:
        """Send many packets in order, as allocate + copy + send would; returns how many were taken.

        Each item is a bytes-like IP packet of 1..0xFFFF bytes. ``headers``, if given, holds one
        virtio-net header per packet (as :meth:`send_packet` takes them, None for none;
        ``receive_packets(..., headers=list)`` fills such a list), so packets received from one offload
        session can be passed to another unchanged. Every item and header is checked before anything is
        sent: a bad one raises InvalidParameter and nothing of the batch goes out. Packets go out in order
        after everything allocated before. When nothing is queued ahead of them they are written to the
        kernel straight from the caller's buffers: copying them into the ring first would only be undone
        at once. What the kernel cannot take right now (EAGAIN) is copied into the ring; when the ring is
        full the count stops there and the caller drops the rest (Wintun's BufferOverflow). After the
        session ended the packets are discarded and all counted as taken, as :meth:`send_packet` does.
        """
        items, sizes, hdrs = _check_batch(packets, headers)
        if self._core is not None:
            if hdrs is not None:
                hdrs = [h if h.__class__ is bytes else bytes(h) for h in hdrs]
            return self._core.send_packets(items, hdrs)
        count = 0
        with self._tx_lock:
            if self._ended:
                return len(items)  # as send_packet: discarded (WintunSendPacket after the end)
            prod = self._tx_prod
            words = self._tx_words
            if self._tx_stalled:
                self._flush()
            if not prod._unsent and words[HEAD_WORD] == words[TAIL_WORD]:
                count = self._send_direct(items, sizes, hdrs)
                if count == len(items):
                    return count
            data = self._tx_data
            tx_headers = self._tx_headers
            try:
                for i in range(count, len(items)):
                    pkt, n = items[i], sizes[i]
                    offset = prod.try_allocate(n)
                    if offset < 0:
                        self._flush()  # make room: everything allocated so far is sent already
                        offset = prod.try_allocate(n)
                        if offset < 0:
                            break
                    try:
                        data[offset : offset + n] = pkt
                    except (TypeError, ValueError):  # not a flat byte buffer (a view of 'H' items, say)
                        data[offset : offset + n] = memoryview(pkt).cast("B")
                    if hdrs is not None and hdrs[i] is not ZERO_HEADER:
                        tx_headers[offset] = bytes(hdrs[i])  # the caller's buffer may change meanwhile
                    prod.send(offset)
                    count += 1
            finally:
                self._flush()
        return count

    def _send_direct(self, items: Sequence[Any], sizes: list[int], hdrs: list[Any] | None) -> int:
        """Write checked packets from the caller's buffers while the send ring is empty; returns how
        many were taken (written, or dropped because the kernel rejected them). The first one the
        kernel refused with EAGAIN, and the rest, are left for the caller to queue. ``hdrs`` gives one
        header per packet (offloads), else the zero header goes with each; a capture file records each
        packet written. The writes run in :func:`_tx_direct`; an item it leaves (a buffer of another
        kind, e.g. an ``array('H')``, or a header that is not ``bytes``) is written here."""
        fd = self._fd
        i = 0
        while True:
            start = i
            i, status = _tx_direct(fd, ZERO_HEADER, items, i, hdrs)
            i = int(i)
            if i > start and self._capture is not None:
                self._record(items[start:i])
            if not status:
                return i
            if status < 0:
                try:
                    os.writev(fd, [ZERO_HEADER if hdrs is None else hdrs[i], items[i]])
                    status = 0
                except OSError as e:
                    status = e.errno or errno.EIO
            if not status:
                if self._capture is not None:
                    self._record((items[i],))
                i += 1
                continue
            if status in _RETRY_ERRNOS:
                self._tx_stalled = True
                return i
            exc = OSError(status, os.strerror(status))
            if status in _GONE_ERRNOS:
                raise self._lost(exc) from exc
            self._send_rejected(exc, sizes[i])
            i += 1

def _make_core(session: LinuxSession) -> PySessionCore:
    """A SessionCore on the session's queue and rings. Its callbacks hold the session weakly, so the
    session's finalizer still runs when the last reference goes (no cycle through the core)."""
    ref = weakref.ref(session)
    name = session._name

    def io_error(code: int) -> BaseException:
        exc = OSError(code, os.strerror(code))
        owner = ref()
        if owner is None:
            return EndOfFile(f"Session on {name}: the TUN queue failed ({exc.strerror})")
        return owner._read_error(exc)  # EndOfFile when the queue is gone, else a WintunError

    def rejected(code: int, size: int) -> None:
        owner = ref()
        if owner is not None:
            owner._log_rejected(OSError(code, os.strerror(code)), size)

    def convert_header(header: object) -> bytes:
        return bytes(_header_bytes(header, "header"))

    return SessionCore(session._fd, session._rx, session._tx, io_error, rejected, convert_header,
                       ready_fd=session._res.ready_fd)


def _check_batch(packets: Any, headers: Any) -> tuple[Sequence[Any], list[int], list[Any] | None]:
    """Check a send batch before any of it goes out: (packets as a sequence, their sizes in bytes, their
    headers as 10-byte buffers or None). InvalidParameter names the first bad item and why."""
    if type(packets) is list or type(packets) is tuple:
        items: Sequence[Any] = packets
    else:
        try:
            items = list(packets)
        except TypeError:
            raise InvalidParameter(
                f"packets must be an iterable of bytes-like objects, not {type(packets).__name__}"
            ) from None
    sizes: list[int] = []
    add = sizes.append
    limit = MAX_PACKET_SIZE
    for i, pkt in enumerate(items):
        kind = type(pkt)
        if kind is bytes or kind is bytearray:
            n = len(pkt)
        else:
            try:
                view = pkt if kind is memoryview else memoryview(pkt)
                contiguous = view.c_contiguous
                n = view.nbytes  # bytes, whatever the item size (len() of an array('H') counts items)
            except TypeError:
                raise InvalidParameter(f"packet {i} is not a bytes-like object ({kind.__name__})") from None
            except ValueError:  # a released memoryview
                raise InvalidParameter(f"packet {i} is a released memoryview") from None
            if not contiguous:
                raise InvalidParameter(f"packet {i} is not a contiguous buffer")
        if not 0 < n <= limit:
            raise InvalidParameter(f"packet {i} is {n} bytes; a packet must be 1..{limit} (0xFFFF) bytes")
        add(n)
    if headers is None:
        return items, sizes, None
    try:
        n_headers = len(headers)
    except TypeError:
        raise InvalidParameter(f"headers must be a sequence, not {type(headers).__name__}") from None
    if n_headers != len(items):
        raise InvalidParameter(f"headers holds {n_headers} item(s) for {len(items)} packet(s)")
    hdrs = [h if type(h) is bytes and len(h) == _HDR else _header_bytes(h, f"header {i}")
            for i, h in enumerate(headers)]
    return items, sizes, hdrs

