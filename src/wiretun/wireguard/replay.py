"""Anti-replay sliding window (RFC 6479) with the kernel's and wireguard-go's size.

Both keep a ring of 128 blocks of 64 bits (8192 bits) and accept counters up to
(128 - 1) * 64 = 8128 behind the highest one seen.  Here the ring holds one byte per counter
instead of one bit: a byte is set and tested with a single index, which is faster in Python than
shifting and masking 64-bit words, and 8 KiB per keypair is cheap.  The accept/reject decisions
are the same as the block version's, so its published test sequence applies unchanged.
"""

from __future__ import annotations

RING_BITS = 8192  # 128 blocks * 64 bits, like the kernel's COUNTER_BITS_TOTAL
WINDOW_SIZE = RING_BITS - 64  # 8128: how far behind the newest counter a packet may arrive
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

_MASK = RING_BITS - 1
_ZEROS = bytes(RING_BITS)


class ReplayFilter:
    """Accepts each counter at most once, and none more than WINDOW_SIZE behind the newest."""

    __slots__ = ("last", "_ring")

    def __init__(self) -> None:
        self.last = 0
        self._ring = bytearray(RING_BITS)

    def reset(self) -> None:
        self.last = 0
        self._ring[:] = _ZEROS

    def validate(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        """True (and remember it) if ``counter`` is new, inside the window and below ``limit``."""
        if counter >= limit:
            return False
        ring = self._ring
        last = self.last
        if counter > last:
            gap = counter - last
            if gap > 1:
                # Forget the counters that fell out of the window as it moves forward.
                if gap >= RING_BITS:
                    ring[:] = _ZEROS
                else:
                    start = (last + 1) & _MASK
                    end = counter & _MASK  # the new counter's own slot is written just below
                    if start <= end:
                        ring[start:end] = _ZEROS[: end - start]
                    else:
                        ring[start:] = _ZEROS[: RING_BITS - start]
                        ring[:end] = _ZEROS[:end]
            self.last = counter
            ring[counter & _MASK] = 1
            return True
        if last - counter > WINDOW_SIZE:
            return False
        slot = counter & _MASK
        if ring[slot]:
            return False
        ring[slot] = 1
        return True
