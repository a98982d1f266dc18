"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, as WireGuard uses it, and the keypairs it yields.

Pattern (``<- s`` is known beforehand)::

    <- s
    ...
    -> e, es, s, ss, {timestamp}
    <- e, ee, se, psk, {}

Two layers:

* generic message functions (:func:`initiator_write`, :func:`responder_read_static`,
  :func:`responder_read_payload`, :func:`responder_write`, :func:`initiator_read`, :func:`split`)
  that take and return the chaining key and hash, with any payload.  They are exactly Noise, so the
  published Noise test vectors for this protocol name check them directly;
* WireGuard's handshake on top (:class:`Handshake`, :func:`create_initiation`,
  :func:`consume_initiation`, :func:`create_response`, :func:`consume_response`,
  :func:`derive_keypair`) with its construction and identifier strings, the 148/92-byte messages,
  TAI64N replay and flood checks, and :class:`Keypair` for the transport data.

HASH is BLAKE2s-256, HMAC is HMAC-BLAKE2s (RFC 2104 over BLAKE2s, *not* keyed BLAKE2s), KDF is
HKDF over that HMAC, AEAD is ChaCha20-Poly1305 with a 12-byte nonce of 4 zero bytes and a
little-endian 64-bit counter.
"""

from __future__ import annotations

import enum
import hashlib
import hmac as _hmac
import math
import struct
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import messages as m
from . import tai64n
from .replay import ReplayFilter

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # 20 ms: at most one initiation per peer per this long

NONCE = struct.Struct("<4xQ")  # 4 zero bytes, then the counter (little-endian)
ZERO_NONCE = bytes(12)
_EMPTY = b""

_blake2s = hashlib.blake2s
_hmac_new = _hmac.new
_NEVER = -math.inf


# --------------------------------------------------------------------------- primitives


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 of the concatenated parts."""
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mix_hash(h: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """h' = HASH(h || data)."""
    state = _blake2s(h)
    state.update(data)
    return state.digest()


def hmac_blake2s(key: bytes, *parts: bytes) -> bytes:
    """HMAC-BLAKE2s (RFC 2104 with BLAKE2s-256 and its 64-byte block)."""
    mac = _hmac_new(key, None, _blake2s)
    for part in parts:
        mac.update(part)
    return mac.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """HKDF with one 32-byte output."""
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """HKDF with two 32-byte outputs."""
    prk = hmac_blake2s(key, data)
    t0 = hmac_blake2s(prk, b"\x01")
    t1 = hmac_blake2s(prk, t0, b"\x02")
    return t0, t1


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF with three 32-byte outputs."""
    prk = hmac_blake2s(key, data)
    t0 = hmac_blake2s(prk, b"\x01")
    t1 = hmac_blake2s(prk, t0, b"\x02")
    t2 = hmac_blake2s(prk, t1, b"\x03")
    return t0, t1, t2


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 with WireGuard's nonce layout."""
    return ChaCha20Poly1305(key).encrypt(NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes | None:
    """ChaCha20-Poly1305 open; ``None`` if the tag is wrong."""
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE.pack(counter), ciphertext, ad)
    except InvalidTag:
        return None


def _dh(private: X25519PrivateKey, public: bytes | X25519PublicKey) -> bytes | None:
    """X25519, refusing all-zero results (and public keys that cannot be parsed)."""
    try:
        pub = public if isinstance(public, X25519PublicKey) else X25519PublicKey.from_public_bytes(bytes(public))
        secret = private.exchange(pub)
    except ValueError:
        return None
    if _hmac.compare_digest(secret, bytes(32)):
        return None
    return secret


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def _encrypt_and_hash(key: bytes, plaintext: bytes, h: bytes) -> tuple[bytes, bytes]:
    """Noise EncryptAndHash under a fresh key (nonce 0): (ciphertext, HASH(h || ciphertext))."""
    ciphertext = ChaCha20Poly1305(key).encrypt(ZERO_NONCE, plaintext, h)
    return ciphertext, mix_hash(h, ciphertext)


def _decrypt_and_hash(key: bytes, ciphertext: bytes, h: bytes) -> tuple[bytes, bytes] | None:
    """Noise DecryptAndHash under a fresh key (nonce 0): (plaintext, HASH(h || ciphertext)), None on a bad tag."""
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(ZERO_NONCE, ciphertext, h)
    except InvalidTag:
        return None
    return plaintext, mix_hash(h, ciphertext)


def initial_state(construction: bytes = CONSTRUCTION, prologue: bytes = IDENTIFIER) -> tuple[bytes, bytes]:
    """(chaining key, hash) after the protocol name and prologue: Ci = HASH(name), Hi = HASH(Ci || prologue).

    Noise pads names shorter than 32 bytes instead of hashing them; every name used here is longer.
    """
    if len(construction) <= 32:
        ck = construction.ljust(32, b"\x00")
    else:
        ck = hash_(construction)
    return ck, mix_hash(ck, prologue)


INITIAL_CHAIN_KEY, INITIAL_HASH = initial_state()


# --------------------------------------------------------------------------- generic Noise messages


def initiator_write(
    ck: bytes,
    h: bytes,
    remote_static: bytes,
    local_static_public: bytes,
    static_static: bytes,
    ephemeral: X25519PrivateKey,
    payload: bytes,
) -> tuple[bytes, bytes, bytes, bytes, bytes] | None:
    """``-> e, es, s, ss, {payload}`` from (ck, h) after the prologue.

    Returns (ephemeral public, encrypted static, encrypted payload, ck, h), or None if a DH is zero.
    ``static_static`` is DH(local static, remote static), which callers precompute per peer.
    """
    h = mix_hash(h, remote_static)  # pre-message "<- s"
    e_pub = _public(ephemeral)
    ck = kdf1(ck, e_pub)  # psk handshakes mix "e" into the key as well
    h = mix_hash(h, e_pub)
    es = _dh(ephemeral, remote_static)
    if es is None:
        return None
    ck, key = kdf2(ck, es)
    enc_static, h = _encrypt_and_hash(key, local_static_public, h)
    ck, key = kdf2(ck, static_static)
    enc_payload, h = _encrypt_and_hash(key, payload, h)
    return e_pub, enc_static, enc_payload, ck, h


def responder_read_static(
    ck: bytes,
    h: bytes,
    local_static: X25519PrivateKey,
    local_static_public: bytes,
    remote_ephemeral: bytes,
    encrypted_static: bytes,
) -> tuple[bytes, bytes, bytes] | None:
    """First half of reading ``-> e, es, s, ss, {payload}``: up to the initiator's static key.

    Returns (initiator static public key, ck, h) or None if it does not decrypt.  The caller looks
    the key up to find DH(local static, that key) for :func:`responder_read_payload`.
    """
    h = mix_hash(h, local_static_public)
    h = mix_hash(h, remote_ephemeral)
    ck = kdf1(ck, remote_ephemeral)
    es = _dh(local_static, remote_ephemeral)
    if es is None:
        return None
    ck, key = kdf2(ck, es)
    opened = _decrypt_and_hash(key, encrypted_static, h)
    if opened is None:
        return None
    static, h = opened
    return static, ck, h


def responder_read_payload(
    ck: bytes, h: bytes, static_static: bytes, encrypted_payload: bytes
) -> tuple[bytes, bytes, bytes] | None:
    """Second half: ``ss`` and the payload.  Returns (payload, ck, h) or None."""
    ck, key = kdf2(ck, static_static)
    opened = _decrypt_and_hash(key, encrypted_payload, h)
    if opened is None:
        return None
    payload, h = opened
    return payload, ck, h


_DHPair = tuple[X25519PrivateKey, bytes | X25519PublicKey]


def _mix_response(
    ck: bytes, h: bytes, e_pub: bytes, ee: _DHPair, se: _DHPair, preshared_key: bytes
) -> tuple[bytes, bytes, bytes] | None:
    """The key schedule both sides run for ``<- e, ee, se, psk``: returns (ck, h, payload key) or None.

    ``ee`` and ``se`` are the (private, public) halves of each DH as this side holds them; the
    second DH is only computed when the first is non-zero.
    """
    h = mix_hash(h, e_pub)
    ck = kdf1(ck, e_pub)
    for private, public in (ee, se):
        shared = _dh(private, public)
        if shared is None:
            return None
        ck = kdf1(ck, shared)
    ck, tau, key = kdf3(ck, preshared_key)
    return ck, mix_hash(h, tau), key


def responder_write(
    ck: bytes,
    h: bytes,
    ephemeral: X25519PrivateKey,
    remote_ephemeral: bytes,
    remote_static: bytes | X25519PublicKey,
    preshared_key: bytes,
    payload: bytes,
) -> tuple[bytes, bytes, bytes, bytes] | None:
    """``<- e, ee, se, psk, {payload}``.  Returns (ephemeral public, encrypted payload, ck, h) or None."""
    e_pub = _public(ephemeral)
    mixed = _mix_response(ck, h, e_pub, (ephemeral, remote_ephemeral), (ephemeral, remote_static), preshared_key)
    if mixed is None:
        return None
    ck, h, key = mixed
    enc, h = _encrypt_and_hash(key, payload, h)
    return e_pub, enc, ck, h


def initiator_read(
    ck: bytes,
    h: bytes,
    ephemeral: X25519PrivateKey,
    local_static: X25519PrivateKey,
    remote_ephemeral: bytes,
    preshared_key: bytes,
    encrypted_payload: bytes,
) -> tuple[bytes, bytes, bytes] | None:
    """Read ``<- e, ee, se, psk, {payload}``.  Returns (payload, ck, h) or None."""
    mixed = _mix_response(
        ck, h, remote_ephemeral, (ephemeral, remote_ephemeral), (local_static, remote_ephemeral), preshared_key
    )
    if mixed is None:
        return None
    ck, h, key = mixed
    opened = _decrypt_and_hash(key, encrypted_payload, h)
    if opened is None:
        return None
    payload, h = opened
    return payload, ck, h


def split(ck: bytes) -> tuple[bytes, bytes]:
    """(initiator-to-responder key, responder-to-initiator key)."""
    return kdf2(ck, _EMPTY)


# --------------------------------------------------------------------------- WireGuard handshake


class HandshakeState(enum.IntEnum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Identity:
    """The local static key pair (or none yet)."""

    __slots__ = ("private_key", "public_key", "private_object")

    def __init__(self, private_key: bytes | None = None) -> None:
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self.private_object: X25519PrivateKey | None = None
        if private_key is not None:
            self.private_object = X25519PrivateKey.from_private_bytes(private_key)
            self.private_key = bytes(private_key)
            self.public_key = _public(self.private_object)


class Handshake:
    """Per-peer handshake state (one handshake in flight at a time, as in wireguard-go)."""

    __slots__ = (
        "owner",
        "state",
        "hash",
        "chain_key",
        "local_ephemeral",
        "local_index",
        "remote_index",
        "remote_ephemeral",
        "remote_static",
        "remote_static_object",
        "static_static",
        "preshared_key",
        "last_timestamp",
        "last_initiation_consumption",
        "last_sent_handshake",
    )

    def __init__(self, owner: Any, remote_static: bytes) -> None:
        self.owner = owner
        self.remote_static = bytes(remote_static)
        self.remote_static_object = X25519PublicKey.from_public_bytes(self.remote_static)
        self.static_static: bytes | None = None  # DH(local static, remote static); None if zero
        self.preshared_key = bytes(32)
        self.last_timestamp = bytes(tai64n.TIMESTAMP_SIZE)
        self.last_initiation_consumption = _NEVER
        self.last_sent_handshake = _NEVER
        self.local_index = 0
        self.clear()

    def clear(self) -> None:
        """Forget the handshake in progress (ephemeral key, transcript)."""
        self.state = HandshakeState.ZEROED
        self.hash = _EMPTY
        self.chain_key = _EMPTY
        self.local_ephemeral: X25519PrivateKey | None = None
        self.remote_ephemeral = _EMPTY
        self.remote_index = 0
        self.local_index = 0

    def precompute(self, identity: Identity) -> None:
        """Recompute DH(local static, remote static) after the local key changed."""
        if identity.private_object is None:
            self.static_static = None
        else:
            self.static_static = _dh(identity.private_object, self.remote_static_object)


class ConsumeResult(enum.Enum):
    OK = "ok"
    NO_IDENTITY = "no_private_key"
    BAD = "bad_handshake"  # does not decrypt / authenticate
    UNKNOWN_PEER = "unknown_peer"
    REPLAY = "handshake_replay"  # timestamp not newer than the last one
    FLOOD = "handshake_flood"  # less than 20 ms after the last initiation
    WRONG_STATE = "wrong_state"


def create_initiation(
    identity: Identity,
    hs: Handshake,
    sender_index: int,
    timestamp: bytes,
    ephemeral: X25519PrivateKey | None = None,
) -> bytearray | None:
    """Start a handshake: a 148-byte initiation with zero MACs, or None (no local key / bad peer key)."""
    if identity.private_object is None or identity.public_key is None or hs.static_static is None:
        return None
    e = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    out = initiator_write(
        INITIAL_CHAIN_KEY, INITIAL_HASH, hs.remote_static, identity.public_key, hs.static_static, e, timestamp
    )
    if out is None:
        return None
    e_pub, enc_static, enc_ts, ck, h = out
    hs.chain_key = ck
    hs.hash = h
    hs.local_ephemeral = e
    hs.local_index = sender_index
    hs.remote_ephemeral = _EMPTY
    hs.state = HandshakeState.INITIATION_CREATED
    return m.pack_initiation(sender_index, e_pub, enc_static, enc_ts)


def consume_initiation(
    identity: Identity,
    msg: bytes | bytearray | memoryview,
    lookup: Callable[[bytes], Handshake | None],
    now: float,
) -> tuple[ConsumeResult, Handshake | None]:
    """Read a 148-byte initiation (MACs already checked).  ``lookup`` maps a static key to its Handshake.

    On success the handshake is in INITIATION_CONSUMED and the timestamp and time are remembered.
    """
    if identity.private_object is None or identity.public_key is None:
        return ConsumeResult.NO_IDENTITY, None
    b = bytes(msg)
    remote_e = b[m.INITIATION_EPHEMERAL : m.INITIATION_STATIC]
    first = responder_read_static(
        INITIAL_CHAIN_KEY,
        INITIAL_HASH,
        identity.private_object,
        identity.public_key,
        remote_e,
        b[m.INITIATION_STATIC : m.INITIATION_TIMESTAMP],
    )
    if first is None:
        return ConsumeResult.BAD, None
    static, ck, h = first
    hs = lookup(static)
    if hs is None:
        return ConsumeResult.UNKNOWN_PEER, None
    if hs.static_static is None:
        return ConsumeResult.BAD, hs
    second = responder_read_payload(ck, h, hs.static_static, b[m.INITIATION_TIMESTAMP : m.INITIATION_MAC1])
    if second is None:
        return ConsumeResult.BAD, hs
    timestamp, ck, h = second
    if not timestamp > hs.last_timestamp:
        return ConsumeResult.REPLAY, hs
    if now - hs.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE:
        return ConsumeResult.FLOOD, hs
    hs.hash = h
    hs.chain_key = ck
    hs.remote_index = struct.unpack_from("<I", b, 4)[0]
    hs.remote_ephemeral = remote_e
    hs.last_timestamp = timestamp
    if now > hs.last_initiation_consumption:
        hs.last_initiation_consumption = now
    hs.state = HandshakeState.INITIATION_CONSUMED
    return ConsumeResult.OK, hs


def create_response(
    hs: Handshake, sender_index: int, ephemeral: X25519PrivateKey | None = None
) -> bytearray | None:
    """Answer a consumed initiation: a 92-byte response with zero MACs, or None."""
    if hs.state != HandshakeState.INITIATION_CONSUMED:
        return None
    e = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    out = responder_write(
        hs.chain_key, hs.hash, e, hs.remote_ephemeral, hs.remote_static_object, hs.preshared_key, _EMPTY
    )
    if out is None:
        return None
    e_pub, enc, ck, h = out
    hs.chain_key = ck
    hs.hash = h
    hs.local_ephemeral = e
    hs.local_index = sender_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return m.pack_response(sender_index, hs.remote_index, e_pub, enc)


def consume_response(
    identity: Identity,
    msg: bytes | bytearray | memoryview,
    lookup: Callable[[int], Handshake | None],
) -> tuple[ConsumeResult, Handshake | None]:
    """Read a 92-byte response (MACs already checked).  ``lookup`` maps our index to the Handshake."""
    if identity.private_object is None:
        return ConsumeResult.NO_IDENTITY, None
    b = bytes(msg)
    sender, receiver = struct.unpack_from("<II", b, 4)
    hs = lookup(receiver)
    if hs is None:
        return ConsumeResult.UNKNOWN_PEER, None
    if hs.state != HandshakeState.INITIATION_CREATED or hs.local_ephemeral is None:
        return ConsumeResult.WRONG_STATE, hs
    out = initiator_read(
        hs.chain_key,
        hs.hash,
        hs.local_ephemeral,
        identity.private_object,
        b[m.RESPONSE_EPHEMERAL : m.RESPONSE_EMPTY],
        hs.preshared_key,
        b[m.RESPONSE_EMPTY : m.RESPONSE_MAC1],
    )
    if out is None:
        return ConsumeResult.BAD, hs
    _, ck, h = out
    hs.chain_key = ck
    hs.hash = h
    hs.remote_index = sender
    hs.state = HandshakeState.RESPONSE_CONSUMED
    return ConsumeResult.OK, hs


class Keypair:
    """Transport keys of one session, with their counters and replay window.

    ``send``/``receive`` are cached ChaCha20Poly1305 objects (``send_key``/``receive_key`` their keys);
    ``send_counter`` is the next nonce.
    """

    __slots__ = (
        "send",
        "receive",
        "send_key",
        "receive_key",
        "send_counter",
        "replay",
        "is_initiator",
        "created",
        "local_index",
        "remote_index",
        "peer",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        is_initiator: bool,
        created: float,
        local_index: int,
        remote_index: int,
        peer: Any = None,
    ) -> None:
        self.send = ChaCha20Poly1305(send_key)
        self.receive = ChaCha20Poly1305(receive_key)
        self.send_key = send_key  # raw keys, for the batch calls (wiretun.wireguard.batch)
        self.receive_key = receive_key
        self.send_counter = 0
        self.replay = ReplayFilter()
        self.is_initiator = is_initiator
        self.created = created
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer


def derive_keypair(hs: Handshake, now: float) -> Keypair | None:
    """Turn a finished handshake into a Keypair and zero the handshake.  None in any other state."""
    if hs.state == HandshakeState.RESPONSE_CONSUMED:
        send_key, receive_key = split(hs.chain_key)
        initiator = True
    elif hs.state == HandshakeState.RESPONSE_CREATED:
        receive_key, send_key = split(hs.chain_key)
        initiator = False
    else:
        return None
    kp = Keypair(send_key, receive_key, initiator, now, hs.local_index, hs.remote_index, hs.owner)
    # The local index now belongs to the keypair; the handshake keeps nothing secret.
    hs.state = HandshakeState.ZEROED
    hs.chain_key = _EMPTY
    hs.hash = _EMPTY
    hs.local_ephemeral = None
    hs.local_index = 0
    return kp
