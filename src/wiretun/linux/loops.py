"""The Linux session's per-packet loops over a TUN queue: C (``wiretun._speedups``) or pure-Python twins.

They run in C (``wiretun._speedups``, built by setup.py when a compiler is there) unless the module is
missing or ``WIRETUN_NO_SPEEDUPS=1`` is set; otherwise in the pure-Python twins here, which take the same
arguments and give the same results, byte for byte (tests/unit/test_speedups.py runs both on the same
input). Each works on a ring as ``words`` (Ring.words: the whole ring) and ``data`` (its Data array on,
as a byte memoryview that packet views are slices of), returns what the session needs to bookkeep and
reports a failed system call as its errno, so that the session (:mod:`wiretun.linux.session`) does the
rest (consumer, counters, capture, exceptions) in one place for both.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ..ring import DATA_WORD, HEAD_WORD, HEADER_SIZE, MAX_PACKET_SIZE, MAX_RECORD_SIZE, TAIL_WORD, TRAILING_SIZE
from .tun import VNET_HDR_SIZE

_HDR = VNET_HDR_SIZE
READ_SPAN = MAX_PACKET_SIZE  # bytes offered to each read: the largest IP packet
_READ_SPAN = READ_SPAN
# An offload session's receive ring holds frames: virtio-net header + IP packet. A read is offered one
# byte more than the largest frame so that a longer one (which the kernel would cut) is seen and dropped.
FRAME_MAX = _HDR + MAX_PACKET_SIZE
FRAME_SPAN = FRAME_MAX + 1
FRAME_RECORD = (4 + FRAME_SPAN + 3) & ~3
_FRAME_MAX, _FRAME_SPAN, _FRAME_RECORD = FRAME_MAX, FRAME_SPAN, FRAME_RECORD


def _py_rx_pull(fd: int, words: Any, data: memoryview, max_count: int, hdr: Any, hdr_stride: int,
                scratch: Any, views: list[memoryview], offsets: list[int] | None) -> tuple[int, int, int, int]:
    """Read up to ``max_count`` packets from ``fd`` into the ring at Tail; returns (count, tail, status,
    dropped). Each packet goes to Tail + 4 with a blind read of 0xFFFF bytes where that can neither overrun
    Head nor need wrapping (the trailing area takes what runs past the end), its 10-byte virtio-net header
    to ``hdr[k * hdr_stride:]`` (k counts this call's packets; 0: one scratch header); elsewhere through
    ``scratch`` and copied in if it fits, else dropped (as Wintun's driver drops when the ring is full).
    Writes each Size, appends views and data offsets, publishes Tail if a packet came. ``status``: 0 when
    ``max_count`` was reached, the errno that ended the loop (EAGAIN: queue empty), -1 for a read shorter
    than the header. Works in linear offsets with one bound check per packet: ``stop`` is the last data
    offset from which a blind read fits."""
    cap = len(words) * 4 - HEADER_SIZE - TRAILING_SIZE
    r = words[TAIL_WORD]
    head = words[HEAD_WORD]
    end = head - 4 if head > r else head - 4 + cap  # free space is [r, end) in linear offsets
    hdr_mv = memoryview(hdr)
    iov: list[Any] = [hdr_mv[:_HDR], None]
    scratch_mv = memoryview(scratch)[:_READ_SPAN]
    scratch_iov: list[Any] = [iov[0], scratch_mv]
    readv = os.readv
    if offsets is None:
        offsets = []
    add_view = views.append
    add_offset = offsets.append
    span, hdr_size = _READ_SPAN, _HDR
    left = max_count
    count = dropped = status = 0
    d = r + 4  # data offset of the packet being read
    try:
        while left > 0 and not status:
            if d - 4 >= cap:  # wrapped past the end: back to the start of Data
                d -= cap
                end -= cap
            stop = min(end - MAX_RECORD_SIZE, cap - 1) + 4
            if d <= stop:
                for _ in range(left):
                    if hdr_stride:
                        iov[0] = hdr_mv[count * hdr_stride : count * hdr_stride + hdr_size]
                    iov[1] = data[d : d + span]
                    n = readv(fd, iov) - hdr_size
                    if n < 0:
                        status = -1
                        break
                    words[DATA_WORD + ((d - 4) >> 2)] = n
                    add_view(data[d : d + n])
                    add_offset(d)
                    count += 1
                    d += (n + 7) & ~3
                    if d > stop:
                        break
                left = max_count - count
            else:
                left -= 1
                if hdr_stride:
                    scratch_iov[0] = hdr_mv[count * hdr_stride : count * hdr_stride + hdr_size]
                n = readv(fd, scratch_iov) - hdr_size
                if n < 0:
                    status = -1
                    break
                if (n + 7) & ~3 > end - (d - 4):
                    dropped += 1
                    continue
                data[d : d + n] = scratch_mv[:n]
                words[DATA_WORD + ((d - 4) >> 2)] = n
                add_view(data[d : d + n])
                add_offset(d)
                count += 1
                d += (n + 7) & ~3
    except OSError as e:
        status = e.errno or errno.EIO
    return count, _pulled_to(words, d, cap, r, count), status, dropped


def _pulled_to(words: Any, d: int, cap: int, r: int, count: int) -> int:
    """The end of a pull whose next record would have its data at offset ``d`` (its Size at ``d - 4``, which
    may lie past the end of Data): the new Tail, written to the ring when ``count`` records came in, else
    Tail as it was (``r``)."""
    tail = d - 4
    if tail >= cap:
        tail -= cap
    if count:
        words[TAIL_WORD] = tail
        return tail
    return r


def _py_rx_frames(fd: int, words: Any, data: memoryview, max_count: int, scratch: Any,
                  views: list[memoryview], offsets: list[int] | None,
                  headers: list[Any] | None) -> tuple[int, int, int, int]:
    """:func:`_py_rx_pull` for an offload session, whose ring stores frames: each read lands whole, header
    and packet, in one record (Size counts the header) when there is room for the largest frame, else in
    ``scratch`` and then in the ring if it fits. A read of 10 bytes or less (no packet), longer than the
    largest frame (cut by the kernel) or without room is dropped. Views cover the packet after the
    header; ``headers`` gets each header as bytes. ``data`` runs at least _FRAME_SPAN bytes past the
    capacity. Returns (count, tail, status, dropped) as :func:`_py_rx_pull` does."""
    cap = len(words) * 4 - HEADER_SIZE - TRAILING_SIZE
    r = words[TAIL_WORD]
    head = words[HEAD_WORD]
    end = head - 4 if head > r else head - 4 + cap
    scratch_mv = memoryview(scratch)[:_FRAME_SPAN]
    readv = os.readv
    if offsets is None:
        offsets = []
    add_view = views.append
    add_offset = offsets.append
    add_header = None if headers is None else headers.append
    span, hdr_size, frame_max, frame_record = _FRAME_SPAN, _HDR, _FRAME_MAX, _FRAME_RECORD
    count = dropped = status = 0
    d = r + 4  # data offset of the frame being read
    try:
        for _ in range(max_count):
            if d - 4 >= cap:  # wrapped past the end: back to the start of Data
                d -= cap
                end -= cap
            if d - 4 + frame_record <= end:  # room for the largest frame: read straight into the ring
                n = readv(fd, [data[d : d + span]])
                if n <= hdr_size or n > frame_max:
                    dropped += 1  # cut (longer than any IP packet may be) or headerless
                    continue
            else:
                n = readv(fd, [scratch_mv])
                if n <= hdr_size or n > frame_max or (n + 7) & ~3 > end - (d - 4):
                    dropped += 1  # no room (too many packets held), or not a frame we can keep
                    continue
                data[d : d + n] = scratch_mv[:n]
            words[DATA_WORD + ((d - 4) >> 2)] = n
            add_view(data[d + hdr_size : d + n])
            add_offset(d)
            if add_header is not None:
                add_header(bytes(data[d : d + hdr_size]))
            count += 1
            d += (n + 7) & ~3
    except OSError as e:
        status = e.errno or errno.EIO
    return count, _pulled_to(words, d, cap, r, count), status, dropped


def _py_rx_one(fd: int, words: Any, data: memoryview, hdr: Any, scratch: Any) -> memoryview | int:
    """One packet into the ring at Tail, as :func:`_py_rx_pull` reads them: its view (Size written, Tail
    published), or -1 when the queue is empty, -2 when the packet was dropped for lack of room, -3 for a
    read shorter than the header. Raises OSError for any other failed read; then the ring is unchanged."""
    mask = len(words) * 4 - HEADER_SIZE - TRAILING_SIZE - 1
    r = words[TAIL_WORD]
    free = (words[HEAD_WORD] - r - 4) & mask
    hdr10 = hdr if len(hdr) == _HDR else memoryview(hdr)[:_HDR]
    try:
        if free >= MAX_RECORD_SIZE:
            n = os.readv(fd, [hdr10, data[r + 4 : r + 4 + _READ_SPAN]]) - _HDR
        else:
            n = os.readv(fd, [hdr10, memoryview(scratch)[:_READ_SPAN]]) - _HDR
    except BlockingIOError:
        return -1
    if n < 0:
        return -3
    if free < MAX_RECORD_SIZE:
        if (n + 7) & ~3 > free:
            return -2
        data[r + 4 : r + 4 + n] = memoryview(scratch)[:n]
    words[DATA_WORD + (r >> 2)] = n
    view = data[r + 4 : r + 4 + n]
    words[TAIL_WORD] = (r + ((n + 7) & ~3)) & mask
    return view


def _py_tx_flush(fd: int, words: Any, data: memoryview, hdr: Any) -> int:
    """Write every packet between Head and Tail to ``fd`` (``hdr`` in front of each), in order, and move
    Head past those written. Returns 0 when Head reached Tail, the errno of a failed write (Head is then
    on that packet), or -1 when the Size at Head is impossible (Head stays on it)."""
    mask = len(words) * 4 - HEADER_SIZE - TRAILING_SIZE - 1
    head = words[HEAD_WORD]
    tail = words[TAIL_WORD]
    if head == tail:
        return 0
    iov: list[Any] = [hdr if len(hdr) == _HDR else memoryview(hdr)[:_HDR], None]
    writev = os.writev
    status = 0
    try:
        while head != tail:
            size = words[DATA_WORD + (head >> 2)]
            if size > MAX_PACKET_SIZE or ((size + 7) & ~3) > ((tail - head) & mask):
                status = -1
                break
            iov[1] = data[head + 4 : head + 4 + size]
            try:
                writev(fd, iov)
            except OSError as e:
                status = e.errno or errno.EIO
                break
            head = (head + ((size + 7) & ~3)) & mask
    finally:
        words[HEAD_WORD] = head
    return status


def _py_tx_direct(fd: int, hdr: Any, packets: list[Any] | tuple[Any, ...], start: int,
                  headers: list[Any] | tuple[Any, ...] | None) -> tuple[int, int]:
    """Write ``packets[start:]`` to ``fd`` straight from the caller's buffers, each with ``hdr`` (or its
    own ``headers[i]``) in front. Returns (index, status): (len(packets), 0) when all went, else the index
    of the item that stopped it, not written, and its errno, or -1 for an item left to the caller (not
    bytes, bytearray or a 1-D byte memoryview, not 1..0xFFFF bytes, or a header not 10 bytes of type
    bytes)."""
    iov: list[Any] = [hdr if len(hdr) == _HDR else memoryview(hdr)[:_HDR], None]
    writev = os.writev
    i = start
    while i < len(packets):
        if headers is not None:
            if i >= len(headers):
                return i, -1
            h = headers[i]
            if h.__class__ is not bytes or len(h) != _HDR:
                return i, -1
            iov[0] = h
        pkt = packets[i]
        cls = pkt.__class__
        if cls is bytes or cls is bytearray:
            n = len(pkt)
        elif cls is memoryview:
            try:
                if pkt.ndim != 1 or pkt.itemsize != 1:
                    return i, -1
                n = pkt.nbytes
            except ValueError:  # released
                return i, -1
        else:
            return i, -1
        if not 0 < n <= MAX_PACKET_SIZE:
            return i, -1
        iov[1] = pkt
        try:
            writev(fd, iov)
        except OSError as e:
            return i, e.errno or errno.EIO
        i += 1
    return i, 0


def _load_speedups() -> Any:
    if os.environ.get("WIRETUN_NO_SPEEDUPS") == "1":
        return None
    try:
        from .. import _speedups
    except ImportError:
        return None
    return _speedups


_speedups = _load_speedups()
SPEEDUPS: bool = _speedups is not None
"""Whether sessions run their per-packet loops in C (``wiretun._speedups``) rather than pure Python."""
if _speedups is not None:
    _rx_pull = _speedups.rx_pull
    _rx_frames = _speedups.rx_frames
    _rx_one = _speedups.rx_one
    _tx_flush = _speedups.tx_flush
    _tx_direct = _speedups.tx_direct
else:
    _rx_pull = _py_rx_pull
    _rx_frames = _py_rx_frames
    _rx_one = _py_rx_one
    _tx_flush = _py_tx_flush
    _tx_direct = _py_tx_direct
