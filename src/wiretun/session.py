"""A Wintun session: Wintun's per-packet calls, their batch forms and blocking conveniences, portable.

``adapter.start_session(capacity)`` starts one. The platform's session backend does the packet work
(:class:`wiretun._backend.SessionBackend`; on Linux :mod:`wiretun.linux.session`: two rings of
:mod:`wiretun.ring` over a TUN queue of its own); this layer adds what is the same everywhere:
argument checks, the blocking and timed forms, the capture file and asyncio (:mod:`wiretun.aio`).

The calls named after Wintun's keep Wintun's meaning:

* :meth:`Session.receive_packet` returns the next packet or raises NoMoreItems (WintunReceivePacket);
  :meth:`Session.try_receive_packet` returns None instead (no exception per empty poll) and
  :meth:`Session.wait_receive_packet` sleeps until a packet comes (None after a timeout).
* :meth:`Session.send_packet` and :meth:`Session.send_packets` after the session ended discard the
  packets silently (WintunSendPacket returns nothing); allocate and receive raise EndOfFile.

The old ``receive_packet(block=False|True, timeout=...)`` spelling still works and warns
(DeprecationWarning). Timeouts are seconds >= 0 (``float("inf")`` or None: no limit).

**Capture** (``start_session(..., capture="file.pcap")``, a path or a binary file object): every packet
the session receives (as handed out) and sends (as written to the kernel) is recorded in a pcap file
with the raw-IP link type (:mod:`wiretun.capture`), offloaded super-packets whole, as they passed. The
file is opened last, after everything else of the start succeeded, and flushed and closed when the
session ends; a path that a live session of this process already writes is refused (InvalidParameter).
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Sequence, TypeAlias

from . import log
from .aio import AsyncSessionMethods
from .capture import PcapWriter
from .errors import EndOfFile, InvalidParameter, NoMoreItems, WintunError
from .offload import HeaderLike, VirtioNetHeader
from .ring import check_capacity

if TYPE_CHECKING:
    from ._backend import SessionBackend
    from .adapter import Adapter

Packet: TypeAlias = memoryview
"""A packet is a ``memoryview`` of its bytes inside a session's ring (zero copy)."""

DEFAULT_CAPACITY = 0x400000
DEFAULT_BATCH = 64

_monotonic = time.monotonic

# Capture files written by live sessions of this process (real path, and (st_dev, st_ino) once made),
# so that a second session cannot truncate a first one's file.
_captures_lock = threading.Lock()
_capture_paths: set[str] = set()
_capture_inodes: set[tuple[int, int]] = set()


_FOREVER = 0x7FFFFFFF / 1000  # seconds: the longest sleep the OS takes in one call (24.8 days); longer is no limit


def _check_timeout(timeout: object) -> float | None:
    """A timeout argument as seconds, or None for no limit (None, infinity, or 24.8 days and more);
    InvalidParameter else."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidParameter(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
    if math.isinf(timeout) or timeout >= _FOREVER:
        return None
    return float(timeout)


_MAX_BATCH = 1 << 24  # more packets than any ring holds (each takes at least 8 bytes of at most 64 MiB)


def _check_count(max_count: object) -> int:
    """A batch size: an int >= 1; any larger than a ring can hold means "as many as there are"."""
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise InvalidParameter(f"max_count {max_count!r} must be an int >= 1")
    return min(max_count, _MAX_BATCH)


class _Capture:
    """A session's capture file: its registration in this process, the writer, failure handling.

    Made (the path checked and claimed) before the session starts; :meth:`open` creates the file last."""

    def __init__(self, target: str | os.PathLike[str] | BinaryIO, name: str) -> None:
        self.target = target
        self.name = name
        self.writer: PcapWriter | None = None
        self.path: str | None = None
        self.inode: tuple[int, int] | None = None
        if isinstance(target, (str, os.PathLike)):
            path = os.path.realpath(os.fspath(target))
            with _captures_lock:
                inode = _inode(path)
                if path in _capture_paths or (inode is not None and inode in _capture_inodes):
                    raise InvalidParameter(
                        f"capture: {os.fspath(target)!r} is already written by a live session of this process"
                    )
                _capture_paths.add(path)
                self.path = path

    def open(self) -> None:
        try:
            self.writer = PcapWriter(self.target)
        except (InvalidParameter, OSError) as exc:
            self.close()
            raise InvalidParameter(f"capture: {exc}") from None
        if self.path is not None:
            with _captures_lock:
                self.inode = _inode(self.path)
                if self.inode is not None:
                    _capture_inodes.add(self.inode)

    def record(self, packets: Sequence[Any]) -> None:
        """Write packets to the file. A failing file (disk full ...) must not stop the packets: it is
        closed, capture stops, and the reason is logged once."""
        writer = self.writer
        if writer is None:
            return
        try:
            writer.write_many(packets if isinstance(packets, (list, tuple)) else list(packets))
        except Exception as exc:  # whatever the file object does, packets keep flowing
            log.warn(f"Session on {self.name}: capture stopped: {exc}")
            self.close()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception as exc:  # ending must go on regardless
            log.warn(f"Session on {self.name}: closing the capture file failed: {exc}")
        finally:
            with _captures_lock:
                if self.path is not None:
                    _capture_paths.discard(self.path)
                if self.inode is not None:
                    _capture_inodes.discard(self.inode)
            self.path = self.inode = None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Session(AsyncSessionMethods):
    """A session on an adapter (WintunStartSession). Use ``adapter.start_session(capacity)``.

    All packet calls are thread-safe. ``multi_queue=True`` (Linux) lets several sessions (in this or
    other processes) share the adapter, each with its own TUN queue; the kernel spreads flows across
    the queues. Without it a second session on the adapter, in any process, is Busy.
    """

    def __init__(
        self,
        adapter: Adapter,
        capacity: int = DEFAULT_CAPACITY,
        *,
        multi_queue: bool = False,
        offload: bool = False,
        capture: str | os.PathLike[str] | BinaryIO | None = None,
    ) -> None:
        check_capacity(capacity)
        if not isinstance(offload, bool):
            raise InvalidParameter(f"offload must be True or False, not {offload!r}")
        if not isinstance(multi_queue, bool):
            raise InvalidParameter(f"multi_queue must be True or False, not {multi_queue!r}")
        if isinstance(capture, PcapWriter):
            raise InvalidParameter("capture takes a path or a binary file object, not a PcapWriter")
        self._adapter = adapter
        self._capacity = capacity
        self._multi_queue = multi_queue
        self._offload = offload
        self._name = adapter.name
        self._capture: _Capture | None = None
        self._end_lock = threading.Lock()
        self._ended_here = False
        capture_file = None if capture is None else _Capture(capture, self._name)  # path claimed, not opened
        try:
            adapter._register_session(self, multi_queue)
            try:
                self._backend: SessionBackend = adapter._backend.start_session(
                    capacity, multi_queue=multi_queue, offload=offload,
                    record=None if capture_file is None else capture_file.record,
                )
            except BaseException:
                adapter._unregister_session(self)
                raise
            if capture_file is not None:
                # Last: a start that failed (Busy ...) must not have truncated anybody's file.
                try:
                    capture_file.open()
                except BaseException:
                    self._backend.end()
                    adapter._unregister_session(self)
                    raise
        except BaseException:
            if capture_file is not None:
                capture_file.close()
            raise
        self._capture = capture_file
        backend = self._backend
        # The per-packet calls go straight to the backend: no layer in between on the hot path.
        self.try_receive_packet = backend.receive_packet  # type: ignore[method-assign]
        self.release_receive_packet = backend.release_receive_packet  # type: ignore[method-assign]
        self.release_receive_packets = backend.release_receive_packets  # type: ignore[method-assign]
        self.allocate_send_packet = backend.allocate_send_packet  # type: ignore[method-assign]
        self.send_packet = backend.send_packet  # type: ignore[method-assign]

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
        return self._backend.ended

    @property
    def offload(self) -> bool:
        """Whether the session was started with ``offload=True`` (packets carry virtio-net headers)."""
        return self._offload

    @property
    def offloads(self) -> int:
        """The ``TUN_F_*`` offload flags in effect (see :mod:`wiretun.linux.session`; 0 without)."""
        return self._backend.offloads

    @property
    def capture(self) -> PcapWriter | None:
        """The pcap writer recording this session's packets, if it was started with ``capture``."""
        return None if self._capture is None else self._capture.writer

    @property
    def receive_dropped(self) -> int:
        """Packets dropped because the receive ring was full (too many held), as Wintun's driver drops."""
        return self._backend.receive_dropped

    @property
    def send_dropped(self) -> int:
        """Packets the kernel rejected (not IPv4/IPv6, the adapter down ...); each kind logged once."""
        return self._backend.send_dropped

    @property
    def send_stalled(self) -> bool:
        """The kernel refused writes for now (EAGAIN/ENOBUFS): sent packets wait in the send ring and go
        out with the next call; :meth:`get_write_wait_event` says when to retry."""
        return self._backend.send_stalled

    def __repr__(self) -> str:
        state = "ended" if self.ended else "running"
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
            if self._ended_here:
                return
            self._ended_here = True
        try:
            self._backend.end()
        finally:
            if self._capture is not None:
                self._capture.close()
            self._adapter._unregister_session(self)

    # ------------------------------------------------------------------ waiting

    @property
    def read_wait_selectable(self) -> bool:
        """Whether :meth:`get_read_wait_event` (and :meth:`get_end_event`) can be given to ``select``,
        ``selectors`` or ``loop.add_reader``: True on Linux (descriptors); False on Windows, where they are
        event HANDLEs for ``WaitForSingleObject`` (or :meth:`wait`; asyncio waits in a worker thread)."""
        return self._backend.selectable

    def get_read_wait_event(self) -> int:
        """A descriptor that is readable when packets may be waiting or the session has ended
        (WintunGetReadWaitEvent). Hand it to ``select``, ``selectors`` or ``loop.add_reader``; do not
        read or close it. On Windows it is an event HANDLE (:attr:`read_wait_selectable` is False): wait
        on it with ``WaitForSingleObject``, or use :meth:`wait`."""
        return self._backend.read_wait_handle()

    def get_write_wait_event(self) -> int | None:
        """A descriptor that is writable when the kernel takes writes again after :attr:`send_stalled`
        (None where sends never stall); EndOfFile once ended. Do not read, write or close it."""
        return self._backend.write_wait_handle()

    def get_end_event(self) -> int:
        """A descriptor that becomes readable, and stays so, when the session ends (on Windows a
        manual-reset event HANDLE that becomes signalled)."""
        return self._backend.end_wait_handle()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until packets may be waiting or the session has ended; False after ``timeout`` seconds
        (None or infinity: no limit)."""
        return self._backend.wait(_check_timeout(timeout))

    # ------------------------------------------------------------------ receive (kernel -> caller)

    def try_receive_packet(self) -> memoryview | None:
        """The next packet (a memoryview into the receive ring), or None when none is waiting: Wintun's
        receive without an exception per empty poll. EndOfFile once the session or adapter has ended."""
        return self._backend.receive_packet()  # replaced by the backend's own method in __init__

    def receive_packet(self, block: bool | None = None, timeout: float | None = None) -> memoryview | None:
        """The next packet from the kernel, a memoryview into the receive ring (WintunReceivePacket).

        NoMoreItems when nothing is waiting; EndOfFile once the session or adapter has ended. Release
        every packet with :meth:`release_receive_packet`. (Deprecated: ``block=False`` is
        :meth:`try_receive_packet`, ``block=True`` is :meth:`wait_receive_packet`.)
        """
        if block is None and timeout is None:
            view = self._backend.receive_packet()
            if view is None:
                raise NoMoreItems("no packet is waiting")
            return view
        if block is None:
            raise InvalidParameter("timeout is for a blocking receive: use wait_receive_packet(timeout)")
        if block:
            warnings.warn("receive_packet(block=True) is deprecated; use wait_receive_packet(timeout)",
                          DeprecationWarning, stacklevel=2)
            return self.wait_receive_packet(timeout)
        warnings.warn("receive_packet(block=False) is deprecated; use try_receive_packet()",
                      DeprecationWarning, stacklevel=2)
        _check_timeout(timeout)
        return self._backend.receive_packet()

    def wait_receive_packet(self, timeout: float | None = None) -> memoryview | None:
        """The next packet, sleeping on the read-wait handle until one comes; None after ``timeout``
        seconds (None or infinity: no limit). EndOfFile once the session or adapter has ended."""
        limit = _check_timeout(timeout)
        receive = self._backend.receive_packet
        view = receive()
        if view is not None:
            return view
        deadline = None if limit is None else _monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            self._backend.wait(remaining)
            view = receive()
            if view is not None:
                return view
            if deadline is not None and _monotonic() >= deadline:
                return None

    def receive_packets(
        self,
        max_count: int = DEFAULT_BATCH,
        *,
        block: bool = False,
        timeout: float | None = None,
        headers: list[bytes] | None = None,
    ) -> list[memoryview]:
        """Up to ``max_count`` packets at once (an empty list when none is waiting, never NoMoreItems).

        With ``block=True`` it first sleeps until at least one packet comes (or ``timeout`` passes).
        With a list for ``headers``, the 10-byte virtio-net header of each packet is appended to it, in
        order (all zero without offloads): the pair to hand to ``send_packets(..., headers=...)``.
        """
        max_count = _check_count(max_count)
        if headers is not None and not isinstance(headers, list):
            raise InvalidParameter(f"headers must be a list to append to, not {type(headers).__name__}")
        limit = _check_timeout(timeout)
        receive = self._backend.receive_packets
        out = receive(max_count, headers)
        if out or not block:
            return out
        deadline = None if limit is None else _monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            self._backend.wait(remaining)
            out = receive(max_count, headers)
            if out or (deadline is not None and _monotonic() >= deadline):
                return out

    def __iter__(self) -> Iterator[memoryview]:
        """Received packets, sleeping while none is waiting, until the session ends. Release each one."""
        while True:
            try:
                view = self.wait_receive_packet()
            except EndOfFile:
                return
            if view is not None:
                yield view

    def packet_header(self, packet: memoryview) -> VirtioNetHeader:
        """The virtio-net header that came with a received, not yet released packet.

        On an offload session it describes a super-packet (``gso_type``, ``gso_size``, ``hdr_len``) and a
        checksum left to finish (``flags & F_NEEDS_CSUM``, ``csum_start``, ``csum_offset``); see
        :func:`wiretun.offload.split`. Without offloads the kernel finishes every packet and the header is
        all zero. InvalidParameter for a packet that is not a received, unreleased packet of this session.
        """
        header: VirtioNetHeader = self._backend.packet_header(packet)
        return header

    def release_receive_packet(self, packet: memoryview) -> None:
        """Give a received packet's space back (WintunReleaseReceivePacket); any order is fine.

        The view is released: using it afterwards raises ValueError. InvalidParameter for a packet
        released twice or not received from this session. After the session ended this does nothing.
        """
        self._backend.release_receive_packet(packet)  # replaced by the backend's own method in __init__

    def release_receive_packets(self, packets: list[memoryview]) -> None:
        """Release several received packets; fastest when they are the oldest ones, in order (as
        :meth:`receive_packets` returned them). All or nothing: one bad packet releases none."""
        self._backend.release_receive_packets(packets)  # replaced in __init__

    # ------------------------------------------------------------------ send (caller -> kernel)

    def allocate_send_packet(self, size: int) -> memoryview:
        """A writable memoryview of ``size`` bytes in the send ring (WintunAllocateSendPacket).

        Fill it, then :meth:`send_packet` it. Allocation order is send order. BufferOverflow when the
        ring is full (drop the packet); EndOfFile once the session or adapter has ended.
        """
        return self._backend.allocate_send_packet(size)  # replaced in __init__

    def send_packet(self, packet: memoryview, header: HeaderLike | None = None) -> None:
        """Send an allocated packet (WintunSendPacket); it leaves after every earlier allocation.

        ``header`` is the packet's virtio-net header (a :class:`~wiretun.offload.VirtioNetHeader` or its
        10 bytes), e.g. to send a TCP/UDP super-packet the kernel segments (GSO) or a packet whose
        checksum it completes (``F_NEEDS_CSUM``); None sends the all-zero header (a finished packet).
        The view is released. After the session ended this does nothing (the packet is discarded).
        """
        self._backend.send_packet(packet, header)  # replaced in __init__

    def send_packets(
        self, packets: Iterable[bytes | bytearray | memoryview], headers: Sequence[HeaderLike | None] | None = None
    ) -> int:
        """Send many packets in order, as allocate + copy + send would; returns how many were taken.

        Each item is a bytes-like IP packet of 1..0xFFFF bytes. ``headers``, if given, holds one
        virtio-net header per packet (as :meth:`send_packet` takes them, None for none;
        ``receive_packets(..., headers=list)`` fills such a list), so packets received from one offload
        session can be passed to another unchanged. Every item and header is checked before anything is
        sent: a bad one (a released view included) raises InvalidParameter and nothing of the batch goes
        out. When the send ring is full the count stops there and the caller drops the rest (Wintun's
        BufferOverflow). After the session ended the packets are discarded and all counted as taken, as
        :meth:`send_packet` discards.
        """
        items = packets if type(packets) is list or type(packets) is tuple else _as_list(packets)
        return self._backend.send_packets(items, headers)


def _as_list(packets: Iterable[Any]) -> list[Any]:
    try:
        return list(packets)
    except TypeError:
        raise InvalidParameter(
            f"packets must be an iterable of bytes-like objects, not {type(packets).__name__}"
        ) from None
    except WintunError:
        raise
