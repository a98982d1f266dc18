"""MAC1/MAC2, cookie replies, and the per-source handshake rate limiter (denial-of-service defence).

* MAC1 = BLAKE2s-128 keyed by HASH("mac1----" || receiver's public key) over the message up to MAC1.
  Every handshake message carries it; it proves the sender knows whom it talks to.
* MAC2 = BLAKE2s-128 keyed by a *cookie* over the message up to MAC2.  It is only demanded under
  load.  The cookie is BLAKE2s-128 keyed by a random secret (replaced every 120 s) over the
  sender's address; it reaches the sender encrypted with XChaCha20-Poly1305 under
  HASH("cookie--" || public key), with the rejected message's MAC1 as associated data.
* Under load, handshakes that pass MAC2 are also rate limited per source IP: a token bucket of 20
  per second with a burst of 5, as wireguard-go's ratelimiter.

Everything takes ``now`` (monotonic seconds); nothing reads a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from typing import Callable, Hashable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from . import messages as m

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0  # seconds a cookie secret (and a received cookie) stays valid

# Rate limiter, as wireguard-go's: 20 handshakes a second per source, bursts of 5.
PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
# Tokens are nanoseconds of credit (integers, so the arithmetic is exact as in wireguard-go).
PACKET_COST = 1_000_000_000 // PACKETS_PER_SECOND
MAX_TOKENS = PACKET_COST * PACKETS_BURSTABLE
GARBAGE_COLLECT_TIME = 1.0  # an idle source is forgotten after this long
MAX_RATELIMIT_ENTRIES = 1 << 16  # past this many sources, new ones are refused until entries age out

_NEVER = -math.inf
_blake2s = hashlib.blake2s


def mac1_key(public_key: bytes) -> bytes:
    """HASH(LABEL_MAC1 || public key): the key of MAC1 for messages sent to that key's owner."""
    return _blake2s(LABEL_MAC1 + bytes(public_key)).digest()


def cookie_key(public_key: bytes) -> bytes:
    """HASH(LABEL_COOKIE || public key): the XChaCha20-Poly1305 key of cookie replies."""
    return _blake2s(LABEL_COOKIE + bytes(public_key)).digest()


def _mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    return _blake2s(data, digest_size=m.MAC_SIZE, key=key).digest()


class CookieChecker:
    """The receiving side: verifies MAC1/MAC2 of incoming handshakes and makes cookie replies."""

    __slots__ = ("_mac1_key", "_cookie_key", "_secret", "_secret_set", "_random")

    def __init__(self, public_key: bytes | None = None, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._random = random_bytes
        self._secret = b""
        self._secret_set = _NEVER
        self._mac1_key = b""
        self._cookie_key = b""
        self.reset(public_key)

    def reset(self, public_key: bytes | None) -> None:
        """Key the checker for a (new) local public key; ``None`` makes every MAC1 fail."""
        if public_key is None:
            self._mac1_key = b""
            self._cookie_key = b""
        else:
            self._mac1_key = mac1_key(public_key)
            self._cookie_key = cookie_key(public_key)
        self._secret_set = _NEVER

    def check_mac1(self, msg: bytes | bytearray | memoryview) -> bool:
        """True if the MAC1 field (32..16 bytes from the end) is right."""
        if not self._mac1_key:
            return False
        n = len(msg)
        expected = _mac(self._mac1_key, msg[: n - 32])
        return hmac.compare_digest(expected, msg[n - 32 : n - 16])

    def check_mac2(self, msg: bytes | bytearray | memoryview, source: bytes, now: float) -> bool:
        """True if the MAC2 field carries the cookie we would give ``source`` now."""
        if now - self._secret_set > COOKIE_REFRESH_TIME:
            return False
        cookie = _mac(self._secret, source)
        n = len(msg)
        expected = _mac(cookie, msg[: n - 16])
        return hmac.compare_digest(expected, msg[n - 16 :])

    def create_reply(self, msg: bytes | bytearray | memoryview, receiver: int, source: bytes, now: float) -> bytes:
        """A 64-byte cookie reply to ``msg`` (whose sender index is ``receiver``) from ``source``."""
        if now - self._secret_set > COOKIE_REFRESH_TIME:
            self._secret = self._random(32)
            self._secret_set = now
        cookie = _mac(self._secret, source)
        n = len(msg)
        nonce = self._random(m.COOKIE_NONCE_SIZE)
        mac1 = bytes(msg[n - 32 : n - 16])
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, self._cookie_key)
        return m.pack_cookie_reply(receiver, nonce, sealed)


class CookieGenerator:
    """The sending side, one per peer: adds MAC1 (and MAC2 once a cookie arrived) to our handshakes."""

    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_set", "_last_mac1")

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = mac1_key(peer_public_key)
        self._cookie_key = cookie_key(peer_public_key)
        self._cookie = b""
        self._cookie_set = _NEVER
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill MAC1, and MAC2 if we hold a fresh cookie, into the last 32 bytes of ``msg``."""
        n = len(msg)
        mac1 = _mac(self._mac1_key, memoryview(msg)[: n - 32])
        msg[n - 32 : n - 16] = mac1
        self._last_mac1 = mac1
        if now - self._cookie_set > COOKIE_REFRESH_TIME:
            msg[n - 16 :] = bytes(m.MAC_SIZE)
            return
        msg[n - 16 :] = _mac(self._cookie, memoryview(msg)[: n - 16])

    def consume_reply(self, reply: bytes | bytearray | memoryview, now: float) -> bool:
        """Take the cookie out of a 64-byte cookie reply; False if it does not decrypt."""
        if self._last_mac1 is None or len(reply) != m.COOKIE_REPLY_SIZE:
            return False
        data = bytes(reply)
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                data[32:64], self._last_mac1, data[8:32], self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_set = now
        return True

    @property
    def has_cookie(self) -> bool:
        return self._cookie_set != _NEVER


class RateLimiter:
    """Token bucket per source key (an IP address as bytes): ``allow(key, now)``."""

    __slots__ = ("_table", "_last_gc")

    def __init__(self) -> None:
        self._table: dict[Hashable, list[int]] = {}  # key -> [last_time_ns, tokens_ns]
        self._last_gc = _NEVER

    def allow(self, key: Hashable, now: float) -> bool:
        """True if ``key`` may have one more handshake processed at time ``now``."""
        if now - self._last_gc >= GARBAGE_COLLECT_TIME:
            self.collect(now)
        now_ns = round(now * 1e9)
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= MAX_RATELIMIT_ENTRIES:
                return False
            self._table[key] = [now_ns, MAX_TOKENS - PACKET_COST]
            return True
        tokens = entry[1] + max(0, now_ns - entry[0])
        entry[0] = now_ns
        if tokens > MAX_TOKENS:
            tokens = MAX_TOKENS
        if tokens > PACKET_COST:
            entry[1] = tokens - PACKET_COST
            return True
        entry[1] = tokens
        return False

    def collect(self, now: float) -> None:
        """Forget sources idle for more than a second."""
        self._last_gc = now
        limit = round((now - GARBAGE_COLLECT_TIME) * 1e9)
        stale = [key for key, entry in self._table.items() if entry[0] < limit]
        for key in stale:
            del self._table[key]

    def __len__(self) -> int:
        return len(self._table)
