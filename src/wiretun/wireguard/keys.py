"""Curve25519 keys for WireGuard: generation, X25519, and the base64/hex forms ``wg`` and UAPI use.

Keys are plain 32-byte ``bytes``.  Private keys are clamped the way ``wg genkey`` and wireguard-go
clamp them, so reading one back gives what the other implementations would show.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import InvalidParameter

KEY_SIZE = 32
ZERO_KEY = bytes(KEY_SIZE)

__all__ = [
    "KEY_SIZE",
    "ZERO_KEY",
    "clamp",
    "generate_private_key",
    "generate_preshared_key",
    "public_key",
    "private_key_object",
    "public_key_object",
    "shared_secret",
    "check_key",
    "is_zero",
    "keys_equal",
    "from_base64",
    "to_base64",
    "from_hex",
    "to_hex",
]


def check_key(key: object, name: str = "key") -> bytes:
    """Return ``key`` as ``bytes`` if it is a 32-byte bytes-like object, else raise InvalidParameter."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) == KEY_SIZE:
            return raw
        raise InvalidParameter(f"{name} must be {KEY_SIZE} bytes, got {len(raw)}")
    raise InvalidParameter(f"{name} must be {KEY_SIZE} bytes, not {type(key).__name__}")


def clamp(private_key: bytes) -> bytes:
    """Clamp a Curve25519 scalar (clear the 3 low bits, clear bit 255, set bit 254)."""
    raw = bytearray(check_key(private_key, "private key"))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def generate_private_key() -> bytes:
    """A fresh random, clamped private key."""
    return clamp(os.urandom(KEY_SIZE))


def generate_preshared_key() -> bytes:
    """A fresh random 32-byte preshared key."""
    return os.urandom(KEY_SIZE)


def private_key_object(private_key: bytes) -> X25519PrivateKey:
    """The ``cryptography`` object for a raw private key (cache it: building it costs a little)."""
    return X25519PrivateKey.from_private_bytes(check_key(private_key, "private key"))


def public_key_object(public_key: bytes) -> X25519PublicKey:
    """The ``cryptography`` object for a raw public key."""
    return X25519PublicKey.from_public_bytes(check_key(public_key, "public key"))


def public_key(private_key: bytes) -> bytes:
    """The public key of a raw private key."""
    return private_key_object(private_key).public_key().public_bytes_raw()


def shared_secret(
    private_key: bytes | X25519PrivateKey, public_key: bytes | X25519PublicKey
) -> bytes | None:
    """X25519(private, public), or ``None`` when the result is all zeros (a low-order public key).

    WireGuard must refuse such a result: it would let anyone who knows nothing compute the secret.
    """
    priv = private_key if isinstance(private_key, X25519PrivateKey) else private_key_object(private_key)
    pub = public_key if isinstance(public_key, X25519PublicKey) else public_key_object(public_key)
    try:
        secret = priv.exchange(pub)
    except ValueError:
        # OpenSSL refuses an all-zero output itself; treat it the same as our own check below.
        return None
    if is_zero(secret):
        return None
    return secret


def is_zero(value: bytes) -> bool:
    """True if every byte is zero; compares in constant time."""
    return hmac.compare_digest(value, bytes(len(value)))


def keys_equal(a: bytes, b: bytes) -> bool:
    """Constant-time key comparison."""
    return hmac.compare_digest(a, b)


def from_base64(text: str | bytes) -> bytes:
    """Decode a base64 key as ``wg`` prints it (44 characters, one ``=``)."""
    if isinstance(text, str):
        text = text.strip().encode("ascii", "replace")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # Never echo the text: it may be a private key with a typo.
        raise InvalidParameter(f"key of {len(text)} characters is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise InvalidParameter(f"key decodes to {len(raw)} bytes, expected {KEY_SIZE}")
    return raw


def to_base64(key: bytes) -> str:
    """Encode a key as base64, the form ``wg`` shows."""
    return base64.b64encode(check_key(key)).decode("ascii")


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def from_hex(text: str) -> bytes:
    """Decode a 64-digit hex key, the form the UAPI protocol uses."""
    if not isinstance(text, str) or len(text) != 2 * KEY_SIZE:
        got = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
        raise InvalidParameter(f"hex key must be {2 * KEY_SIZE} hex digits, got {got}")
    if not all(c in _HEX_DIGITS for c in text):  # bytes.fromhex would skip whitespace
        raise InvalidParameter("hex key has a non-hex character")
    return bytes.fromhex(text)


def to_hex(key: bytes) -> str:
    """Encode a key as 64 lowercase hex digits (UAPI form)."""
    return check_key(key).hex()
