"""A session over wintun.dll: Wintun's per-packet calls through the binding, zero copy.

wintun.dll owns the rings and their bookkeeping; this backend adds what a Python caller needs:

* **Views.** A received packet is a ``memoryview`` straight over the DLL's ring (no copy), valid until it
  is released; releasing it (in any order, WintunReleaseReceivePacket) also releases the view, so a
  released packet cannot be read by mistake. Allocated send packets are views too, released by
  :meth:`send_packet`. Each view is checked to be this session's own, unreleased one.
* **Ending.** WintunEndSession frees the rings, so the views still held are released first (they cannot
  outlive the memory), and the per-packet calls take a lock that ``end`` takes too: no call runs in the
  DLL while it frees. After the end, receive and allocate raise EndOfFile; release and send do nothing.
* **Waiting.** :meth:`read_wait_handle` is a duplicate of the DLL's read-wait event HANDLE (the same
  auto-reset event; this duplicate stays valid, and is set once more, after the end, until the session
  object is garbage-collected), :meth:`end_wait_handle` an event of our own that is set when the session
  ends. Waits go through the platform shim (WaitForSingleObject; on the Linux stand-in, poll on an
  eventfd), in slices so that Ctrl-C is seen.

Windows has no offloads and no multi-queue: the header of every received packet is all zero, and
a send with a non-zero virtio-net header is refused (NotSupported; the packet stays allocated, unsent).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any, Sequence

from .. import log
from .._backend import Recorder
from ..errors import BufferOverflow, EndOfFile, InvalidParameter, NotSupported
from ..offload import VirtioNetHeader
from ..ring import MAX_PACKET_SIZE, check_packet_size
from . import _platform
from .wintun_dll import WintunDLL

__all__ = ["WintunSession"]

_ZERO_HEADER = bytes(10)
_NO_HEADER = VirtioNetHeader()
_SLICE_MS = 250  # a long wait sleeps in slices of this, so that signals (Ctrl-C) are handled meanwhile
_MAX_WAIT_MS = 0xFFFFFFFE  # the largest finite timeout WaitForSingleObject takes


def _packet_view(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


class _Handles:
    """The session's own HANDLEs, closed when the session object goes (not at the end: a thread may
    still be waiting on them then); a session dropped without end() is ended then."""

    def __init__(self, dll: WintunDLL, session: int, read_wait: int, end: int) -> None:
        self.dll = dll
        self.session = session  # 0 once WintunEndSession ran
        self.read_wait = read_wait
        self.end = end

    def close(self) -> None:
        session, self.session = self.session, 0
        if session:
            self.dll.end_session(session)
        for handle in (self.read_wait, self.end):
            try:
                _platform.close(handle)
            except OSError:
                pass


class WintunSession:
    """One WINTUN_SESSION_HANDLE, implementing :class:`wiretun._backend.SessionBackend`."""

    offloads = 0
    selectable = False  # event HANDLEs (WaitForSingleObject), not descriptors; asyncio waits in a thread
    send_stalled = False  # the driver drains the send ring itself: a send never waits for the OS

    def __init__(self, dll: WintunDLL, adapter: int, capacity: int, name: str, record: Recorder | None) -> None:
        self._dll = dll
        self._name = name
        self._record = record
        handle = dll.start_session(adapter, capacity)
        try:
            read_wait = _platform.duplicate(dll.get_read_wait_event(handle))
            try:
                end = _platform.create_event()
            except BaseException:
                _platform.close(read_wait)
                raise
        except BaseException:
            dll.end_session(handle)
            raise
        self._handle = handle
        self._handles = _Handles(dll, handle, read_wait, end)
        self._finalizer = weakref.finalize(self, self._handles.close)
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._end_lock = threading.Lock()
        self._ended = False  # end() was called
        self._lost = False  # the DLL said ERROR_HANDLE_EOF: the adapter went away
        self._size = ctypes.c_uint32()
        # id(view) -> (view, address): the views handed out and not yet released / sent.
        self._rx_views: dict[int, tuple[memoryview, int]] = {}
        self._tx_views: dict[int, tuple[memoryview, int]] = {}
        self.receive_dropped = 0  # wintun.dll counts its drops internally and does not tell
        self.send_dropped = 0

    # ------------------------------------------------------------------ state

    @property
    def ended(self) -> bool:
        return self._ended or self._lost

    def _eof(self) -> EndOfFile:
        if self._lost and not self._ended:
            return EndOfFile(f"adapter {self._name} is gone; the session has ended")
        return EndOfFile(f"the session on {self._name} has ended")

    # ------------------------------------------------------------------ receive (driver -> caller)

    def _receive_locked(self) -> memoryview | None:
        if self._ended:
            raise self._eof()
        try:
            address = self._dll.receive_packet(self._handle, self._size)
        except EndOfFile:
            self._lost = True
            raise self._eof() from None
        if not address:
            return None
        view = _packet_view(address, self._size.value)
        self._rx_views[id(view)] = (view, address)
        return view

    def receive_packet(self) -> memoryview | None:
        """WintunReceivePacket: the next packet as a view into the ring, or None when none is waiting."""
        if self._ended:  # without the lock: a reader woken by end() must not wait for the DLL to free
            raise self._eof()
        with self._rx_lock:
            view = self._receive_locked()
        if view is not None and self._record is not None:
            self._record((view,))
        return view

    def receive_packets(self, max_count: int, headers: list[Any] | None = None) -> list[memoryview]:
        out: list[memoryview] = []
        if self._ended:
            raise self._eof()
        with self._rx_lock:
            for _ in range(max_count):
                try:
                    view = self._receive_locked()
                except EndOfFile:
                    if out:
                        break  # hand out what came; the next call says EndOfFile
                    raise
                if view is None:
                    break
                out.append(view)
        if headers is not None:
            headers.extend([_ZERO_HEADER] * len(out))
        if out and self._record is not None:
            self._record(out)
        return out

    def _take_rx(self, packet: object) -> int:
        entry = self._rx_views.pop(id(packet), None)
        if entry is None or entry[0] is not packet:
            if entry is not None:
                self._rx_views[id(packet)] = entry
            raise InvalidParameter(
                f"{type(packet).__name__} at {id(packet):#x} is not a packet received by this session and "
                f"not yet released (released twice, or from another session?)"
            )
        return entry[1]

    def release_receive_packet(self, packet: memoryview) -> None:
        """WintunReleaseReceivePacket, in any order; the view is released too."""
        with self._rx_lock:
            if self._ended:
                return
            address = self._take_rx(packet)
            self._dll.release_receive_packet(self._handle, address)
        _release_view(packet)

    def release_receive_packets(self, packets: list[memoryview]) -> None:
        with self._rx_lock:
            if self._ended:
                return
            for packet in packets:  # all checked first: a bad one releases none
                entry = self._rx_views.get(id(packet))
                if entry is None or entry[0] is not packet:
                    self._take_rx(packet)  # raises with the reason
            if len({id(p) for p in packets}) != len(packets):
                raise InvalidParameter("the same packet appears twice in the batch to release")
            for packet in packets:
                self._dll.release_receive_packet(self._handle, self._take_rx(packet))
        for packet in packets:
            _release_view(packet)

    def packet_header(self, packet: memoryview) -> VirtioNetHeader:
        """Windows has no offloads: a received packet's header is all zero."""
        with self._rx_lock:
            entry = self._rx_views.get(id(packet))
        if entry is None or entry[0] is not packet:
            raise InvalidParameter("not a packet received by this session and not yet released")
        return _NO_HEADER

    # ------------------------------------------------------------------ send (caller -> driver)

    def allocate_send_packet(self, size: int) -> memoryview:
        """WintunAllocateSendPacket: a writable view of ``size`` bytes; BufferOverflow when the ring is full."""
        check_packet_size(size)
        if self._ended:
            raise self._eof()
        with self._tx_lock:
            if self._ended:
                raise self._eof()
            try:
                address = self._dll.allocate_send_packet(self._handle, size)
            except EndOfFile:
                self._lost = True
                raise self._eof() from None
            view = _packet_view(address, size)
            self._tx_views[id(view)] = (view, address)
        return view

    def send_packet(self, packet: memoryview, header: Any = None) -> None:
        """WintunSendPacket: the packet leaves after every earlier allocation; the view is released.

        A non-zero virtio-net header (offloads are Linux's) is refused with NotSupported before anything
        happens: the packet stays allocated, to be sent without a header (Wintun cannot cancel an
        allocation, and every later packet waits behind it)."""
        if header is not None and _header_bytes(header) != _ZERO_HEADER:
            raise NotSupported(
                "virtio-net headers (offloads) are Linux's; on Windows send the packet without one "
                "(it is still allocated)"
            )
        with self._tx_lock:
            if self._ended:
                return
            entry = self._tx_views.pop(id(packet), None)
            if entry is None or entry[0] is not packet:
                if entry is not None:
                    self._tx_views[id(packet)] = entry
                raise InvalidParameter(
                    f"{type(packet).__name__} at {id(packet):#x} is not a packet allocated by this session and "
                    f"not yet sent (sent twice, or from another session?)"
                )
            if self._record is not None:
                self._record((packet,))  # before the driver may take it and the slot be reused
            self._dll.send_packet(self._handle, entry[1])
        _release_view(packet)

    def send_packets(self, packets: Sequence[Any], headers: Sequence[Any] | None = None) -> int:
        """Allocate + copy + send each packet in order; returns how many were taken (the rest: the ring
        is full, the caller drops them). Every item is checked before any is sent."""
        sizes = _check_batch(packets, headers)
        count = 0
        with self._tx_lock:
            if self._ended:
                return len(sizes)  # discarded, as WintunSendPacket after the end
            dll, handle = self._dll, self._handle
            for item, size in zip(packets, sizes):
                try:
                    address = dll.allocate_send_packet(handle, size)
                except EndOfFile:
                    self._lost = True
                    if count:
                        break
                    raise self._eof() from None
                except BufferOverflow:
                    break  # full: the caller drops the rest
                ctypes.memmove(address, _address_source(item, size), size)
                dll.send_packet(handle, address)
                count += 1
        if count and self._record is not None:
            self._record(list(packets[:count]))
        return count

    # ------------------------------------------------------------------ waiting and ending

    def read_wait_handle(self) -> int:
        """The read-wait event (a duplicate HANDLE of WintunGetReadWaitEvent's; on the stand-in an eventfd)."""
        return self._handles.read_wait

    def write_wait_handle(self) -> int | None:
        return None  # sends never wait for the OS here

    def end_wait_handle(self) -> int:
        return self._handles.end

    def wait(self, timeout: float | None) -> bool:
        """Sleep on the read-wait event until it is set or the session ends; False after ``timeout``."""
        if self.ended:
            return True
        left = _MAX_WAIT_MS if timeout is None else min(_MAX_WAIT_MS, max(0, int(timeout * 1000 + 0.999)))
        handle = self._handles.read_wait
        while True:
            step = min(left, _SLICE_MS)
            woke = _platform.wait(handle, step)
            if self._ended:
                _platform.signal(handle)  # auto-reset: pass the wake-up on to the next waiter
                return True
            if woke:
                return True
            if timeout is not None:
                left -= step
                if left <= 0:
                    return False

    def end(self) -> None:
        """WintunEndSession: wake every waiter, release the views still held, free the rings. Idempotent."""
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
            handles = self._handles
            _platform.signal(handles.end)
            _platform.signal(handles.read_wait)
            with self._rx_lock, self._tx_lock:
                held = [v for v, _ in self._rx_views.values()] + [v for v, _ in self._tx_views.values()]
                self._rx_views.clear()
                self._tx_views.clear()
                unreleasable = sum(not _release_view(v) for v in held)
                handles.session = 0
                self._dll.end_session(self._handle)
        if unreleasable:
            log.warn(
                f"Session on {self._name}: {unreleasable} packet view(s) still exported (e.g. a numpy array "
                f"or a cast of the view) at the end: the ring under them is gone, do not use them"
            )


def _release_view(view: memoryview) -> bool:
    try:
        view.release()
        return True
    except BufferError:
        return False


def _header_bytes(header: Any) -> bytes:
    if isinstance(header, VirtioNetHeader):
        return header.pack()
    try:
        return bytes(memoryview(header))
    except TypeError:
        raise InvalidParameter(f"header must be a VirtioNetHeader or 10 bytes, not {type(header).__name__}") from None


def _check_batch(packets: Sequence[Any], headers: Sequence[Any] | None) -> list[int]:
    """Each packet's size in bytes, all checked before any is sent (InvalidParameter names the first bad one)."""
    sizes: list[int] = []
    for i, pkt in enumerate(packets):
        try:
            view = pkt if type(pkt) is memoryview else memoryview(pkt)
        except TypeError:
            raise InvalidParameter(f"packet {i} is not a bytes-like object ({type(pkt).__name__})") from None
        if not view.c_contiguous:
            raise InvalidParameter(f"packet {i} is not a contiguous buffer")
        n = view.nbytes
        if not 0 < n <= MAX_PACKET_SIZE:
            raise InvalidParameter(f"packet {i} is {n} bytes; a packet must be 1..{MAX_PACKET_SIZE} (0xFFFF) bytes")
        sizes.append(n)
    if headers is not None:
        if len(headers) != len(sizes):
            raise InvalidParameter(f"headers holds {len(headers)} item(s) for {len(sizes)} packet(s)")
        for i, h in enumerate(headers):
            if h is not None and _header_bytes(h) != _ZERO_HEADER:
                raise NotSupported(
                    f"header {i}: virtio-net headers (offloads) are Linux's; on Windows packets go out as they are"
                )
    return sizes


def _address_source(item: Any, size: int) -> Any:
    """Something ctypes.memmove can read ``size`` bytes from: bytes as is, else a ctypes view of the buffer."""
    if type(item) is bytes:
        return item
    view = memoryview(item).cast("B")
    if view.readonly:
        return view.tobytes()
    return (ctypes.c_ubyte * size).from_buffer(view)
