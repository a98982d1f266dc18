"""TAI64N timestamps as WireGuard puts them in handshake initiations.

12 bytes, big-endian: seconds + 2**62 + 10 (the TAI64 label), then nanoseconds.  The low 24 bits of
the nanoseconds are cleared ("whitened", as wireguard-go does) so the timestamp does not leak a
fine-grained clock; what remains still increases every ~16.8 ms, below the 20 ms initiation limit.
"""

from __future__ import annotations

import math
import struct
import time

TIMESTAMP_SIZE = 12
BASE = 0x400000000000000A
WHITENER_MASK = 0xFFFFFF  # low bits of the nanoseconds that are cleared

_STAMP = struct.Struct(">QI")


def stamp(wall_seconds: float) -> bytes:
    """The whitened TAI64N timestamp of a Unix time in seconds."""
    if not math.isfinite(wall_seconds) or wall_seconds < 0:
        raise ValueError(f"wall time must be a finite number of seconds >= 0, got {wall_seconds!r}")
    secs = int(wall_seconds)
    nanos = int((wall_seconds - secs) * 1e9)
    if nanos > 999_999_999:
        nanos = 999_999_999
    return _STAMP.pack(BASE + secs, nanos & ~WHITENER_MASK)


def now() -> bytes:
    """The timestamp of the current wall-clock time."""
    return stamp(time.time())


def after(t1: bytes, t2: bytes) -> bool:
    """True if ``t1`` is strictly later than ``t2`` (big-endian, so a byte comparison is enough)."""
    return bytes(t1) > bytes(t2)


def unpack(timestamp: bytes) -> tuple[int, int]:
    """``(unix_seconds, nanoseconds)`` of a timestamp."""
    if len(timestamp) != TIMESTAMP_SIZE:
        raise ValueError(f"TAI64N timestamp must be {TIMESTAMP_SIZE} bytes, got {len(timestamp)}")
    secs, nanos = _STAMP.unpack(timestamp)
    return secs - BASE, nanos
