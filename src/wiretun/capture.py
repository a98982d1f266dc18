"""Packet capture in the classic pcap format, with the raw-IP link type, for tcpdump and Wireshark.

A layer-3 adapter has no link-layer header, so every record is a bare IPv4 or IPv6 packet and the file
uses ``LINKTYPE_RAW`` (101): the link type whose number is the same on every platform (the older
``DLT_RAW`` is 12 on some systems and 14 on others). ``tcpdump -r`` and ``tshark -r`` read it.

:class:`PcapWriter` writes the file (used by ``start_session(..., capture=...)``: every packet the
session receives and sends, offloaded super-packets as the kernel passed them, up to 64 KiB each);
:func:`read_pcap` reads one back (tests, tools). Both are pure: no sockets, no kernel.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
from typing import BinaryIO, Iterator, NamedTuple

from .errors import InvalidData, InvalidParameter

Buffer = bytes | bytearray | memoryview

LINKTYPE_RAW = 101  # raw IPv4/IPv6, the version nibble says which
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229

MAGIC_MICROSECONDS = 0xA1B2C3D4
MAGIC_NANOSECONDS = 0xA1B23C4D
VERSION = (2, 4)
MAX_SNAPLEN = 0x40000  # 262144: libpcap's limit for ordinary link types
DEFAULT_SNAPLEN = MAX_SNAPLEN  # whole packets: a TSO/USO super-packet is at most 64 KiB

_FILE_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, linktype
_RECORD_HEADER = struct.Struct("<IIII")  # seconds, micro/nanoseconds, captured length, original length
FILE_HEADER_SIZE = _FILE_HEADER.size  # 24
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 16


class PcapWriter:
    """Append packets to a pcap file (thread-safe: a session's receive and send sides share one).

    ``file`` is a path (created or truncated) or a binary file object opened for writing (left open on
    :meth:`close` unless ``close_file``). Packets longer than ``snaplen`` are stored cut to ``snaplen``
    with their original length recorded, as pcap defines; the default keeps every packet whole.
    Timestamps default to the time of the :meth:`write` call.
    """

    def __init__(
        self,
        file: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_RAW,
        nanoseconds: bool = False,
        close_file: bool | None = None,
    ) -> None:
        if isinstance(snaplen, bool) or not isinstance(snaplen, int) or not 1 <= snaplen <= MAX_SNAPLEN:
            raise InvalidParameter(f"pcap snaplen {snaplen!r} is out of range 1..{MAX_SNAPLEN}")
        if isinstance(linktype, bool) or not isinstance(linktype, int) or not 0 <= linktype <= 0xFFFF:
            raise InvalidParameter(f"pcap link type {linktype!r} is out of range 0..65535")
        self.snaplen = snaplen
        self.linktype = linktype
        self.nanoseconds = bool(nanoseconds)
        self.packets = 0
        self._lock = threading.Lock()
        if isinstance(file, (str, os.PathLike)):
            try:
                self._file: BinaryIO = open(file, "wb", buffering=1 << 20)  # closed in close()
            except OSError as exc:
                raise InvalidParameter(f"cannot open capture file {os.fspath(file)!r}: {exc.strerror}") from None
            self._close_file = True if close_file is None else close_file
            self.path: str | None = os.fspath(file)
        else:
            if not hasattr(file, "write"):
                raise InvalidParameter(f"capture target must be a path or a binary file object, not {file!r}")
            if isinstance(file, io.TextIOBase):
                raise InvalidParameter("the capture file object must be opened in binary mode ('wb'), not text mode")
            self._file = file
            self._close_file = bool(close_file)
            self.path = getattr(file, "name", None) if isinstance(getattr(file, "name", None), str) else None
        self._closed = False
        magic = MAGIC_NANOSECONDS if self.nanoseconds else MAGIC_MICROSECONDS
        try:
            self._file.write(_FILE_HEADER.pack(magic, VERSION[0], VERSION[1], 0, 0, snaplen, linktype))
        except (TypeError, ValueError) as exc:  # a text-mode or closed file object
            if self._close_file:
                self._file.close()
            raise InvalidParameter(f"cannot write to the capture file: {exc}") from None
        self._header = bytearray(RECORD_HEADER_SIZE)

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, packet: Buffer, timestamp_ns: int | None = None) -> None:
        """Record one packet; ``timestamp_ns`` is nanoseconds since the epoch (default: now).

        Raises InvalidParameter for an empty or non-bytes-like packet, after :meth:`close`, or when the
        file object refuses bytes (closed under us); OSError from the file (disk full, ...) as it comes.
        """
        if type(packet) is not bytes and type(packet) is not bytearray:
            try:
                packet = memoryview(packet).cast("B")  # the length in bytes, whatever the item size
            except (TypeError, ValueError) as exc:
                raise InvalidParameter(f"cannot capture {type(packet).__name__}: {exc}") from None
        size = len(packet)
        if size == 0:
            raise InvalidParameter("cannot capture an empty packet")
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        seconds, fraction = divmod(timestamp_ns, 1_000_000_000)
        if not self.nanoseconds:
            fraction //= 1000
        kept = size if size <= self.snaplen else self.snaplen
        with self._lock:
            if self._closed:
                raise InvalidParameter("the capture file is closed")
            header = self._header
            _RECORD_HEADER.pack_into(header, 0, seconds & 0xFFFFFFFF, fraction, kept, size)
            write = self._file.write
            try:
                write(header)
                write(packet if kept == size else memoryview(packet)[:kept])
            except (TypeError, ValueError) as exc:  # the file object was closed or swapped under us
                raise InvalidParameter(f"cannot write to the capture file: {exc}") from None
            self.packets += 1

    def write_many(self, packets: list[Buffer] | tuple[Buffer, ...], timestamp_ns: int | None = None) -> None:
        """Record several packets with one timestamp (a batch that passed together)."""
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        for packet in packets:
            self.write(packet, timestamp_ns)

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        """Flush and, if this writer opened it, close the file. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._file.flush()
            except ValueError:
                pass  # closed already by its owner: nothing left to flush
            finally:
                if self._close_file:
                    self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or "stream"
        state = " closed" if self._closed else ""
        return f"<PcapWriter {where!r} linktype={self.linktype} packets={self.packets}{state}>"


class PcapRecord(NamedTuple):
    timestamp_ns: int
    original_length: int
    data: bytes


class PcapFile(NamedTuple):
    linktype: int
    snaplen: int
    nanoseconds: bool
    records: list[PcapRecord]


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes | None:
    data = f.read(n)
    if not data:
        return None
    if len(data) != n:
        raise InvalidData(f"pcap file ends inside {what}: {len(data)} of {n} bytes")
    return data


def iter_pcap(file: str | os.PathLike[str] | BinaryIO) -> Iterator[PcapFile | PcapRecord]:
    """Yield the file's header (a :class:`PcapFile` with no records) then each :class:`PcapRecord`."""
    f: BinaryIO
    if isinstance(file, (str, os.PathLike)):
        own, f = True, open(file, "rb")
    else:
        own, f = False, file
    try:
        head = _read_exact(f, FILE_HEADER_SIZE, "the file header")
        if head is None:
            raise InvalidData("empty pcap file")
        magic = struct.unpack_from("<I", head)[0]
        if magic in (MAGIC_MICROSECONDS, MAGIC_NANOSECONDS):
            order = "<"
        elif struct.unpack_from(">I", head)[0] in (MAGIC_MICROSECONDS, MAGIC_NANOSECONDS):
            order = ">"
            magic = struct.unpack_from(">I", head)[0]
        else:
            raise InvalidData(f"not a pcap file (magic {head[:4].hex()})")
        _, major, minor, _, _, snaplen, linktype = struct.unpack(order + "IHHiIII", head)
        if (major, minor) != VERSION:
            raise InvalidData(f"pcap version {major}.{minor} is not {VERSION[0]}.{VERSION[1]}")
        nanoseconds = magic == MAGIC_NANOSECONDS
        yield PcapFile(linktype & 0xFFFF, snaplen, nanoseconds, [])
        record = struct.Struct(order + "IIII")
        scale = 1 if nanoseconds else 1000
        while True:
            rh = _read_exact(f, RECORD_HEADER_SIZE, "a record header")
            if rh is None:
                return
            sec, frac, incl, orig = record.unpack(rh)
            if incl > max(snaplen, MAX_SNAPLEN) or incl > orig:
                raise InvalidData(f"pcap record claims {incl} captured of {orig} bytes (snaplen {snaplen})")
            data = _read_exact(f, incl, "a packet") if incl else b""
            yield PcapRecord(sec * 1_000_000_000 + frac * scale, orig, data or b"")
    finally:
        if own:
            f.close()


def read_pcap(file: str | os.PathLike[str] | BinaryIO | bytes) -> PcapFile:
    """Read a whole pcap file (path, binary file object or the bytes themselves)."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(bytes(file))
    it = iter_pcap(file)
    header = next(it)
    assert isinstance(header, PcapFile)
    records = [r for r in it if isinstance(r, PcapRecord)]
    return header._replace(records=records)
