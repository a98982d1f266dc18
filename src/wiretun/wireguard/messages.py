"""WireGuard's four message layouts, byte for byte, with packing and checked parsing.

Every field is little-endian; the 1-byte type is followed by 3 reserved zero bytes, so the first 4
bytes read as a little-endian ``uint32`` equal to the type.

=============  ====  =============================================================================
message        size  layout
=============  ====  =============================================================================
initiation     148   type(4)=1 sender(4) ephemeral(32) static(32+16) timestamp(12+16) mac1 mac2
response        92   type(4)=2 sender(4) receiver(4) ephemeral(32) empty(0+16) mac1(16) mac2(16)
cookie reply    64   type(4)=3 receiver(4) nonce(24) cookie(16+16)
transport     >=32   type(4)=4 receiver(4) counter(8) then ciphertext of the padded packet + tag
=============  ====  =============================================================================

The parse functions are for tests, tools and the device; the core's hot path checks sizes inline.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import InvalidData

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

TAG_SIZE = 16  # Poly1305
MAC_SIZE = 16  # keyed BLAKE2s-128
KEY_SIZE = 32
TIMESTAMP_SIZE = 12
COOKIE_NONCE_SIZE = 24  # XChaCha20
COOKIE_SIZE = 16

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # 32: a transport message with no content
MIN_MESSAGE_SIZE = KEEPALIVE_SIZE
MAX_MESSAGE_SIZE = 65535  # the largest UDP payload
MAX_CONTENT_SIZE = MAX_MESSAGE_SIZE - KEEPALIVE_SIZE

# Field offsets.
INITIATION_EPHEMERAL = 8
INITIATION_STATIC = 40
INITIATION_TIMESTAMP = 88
INITIATION_MAC1 = 116
INITIATION_MAC2 = 132
RESPONSE_EPHEMERAL = 12
RESPONSE_EMPTY = 44
RESPONSE_MAC1 = 60
RESPONSE_MAC2 = 76
TRANSPORT_RECEIVER = 4
TRANSPORT_COUNTER = 8
TRANSPORT_CONTENT = 16

_U32 = struct.Struct("<I")
_INIT_HEAD = struct.Struct("<II")
_RESP_HEAD = struct.Struct("<III")
_COOKIE_HEAD = struct.Struct("<II")
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver, counter


class MessageError(InvalidData):
    """A datagram that is not a well-formed WireGuard message."""


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


class TransportHeader(NamedTuple):
    receiver: int
    counter: int


def message_type(data: bytes | bytearray | memoryview) -> int:
    """The message type (1..4), or 0 when the datagram is too short or its reserved bytes are set."""
    if len(data) < 4:
        return 0
    value = _U32.unpack_from(data, 0)[0]
    return value if MESSAGE_INITIATION <= value <= MESSAGE_TRANSPORT else 0


def _check(data: bytes | bytearray | memoryview, kind: int, size: int | None, name: str) -> None:
    n = len(data)
    if size is not None and n != size:
        raise MessageError(f"{name} must be {size} bytes, got {n}")
    if size is None and n < MIN_MESSAGE_SIZE:
        raise MessageError(f"{name} must be at least {MIN_MESSAGE_SIZE} bytes, got {n}")
    value = _U32.unpack_from(data, 0)[0]
    if value != kind:
        raise MessageError(f"{name} must start with type {kind} and 3 zero bytes, got 0x{value:08x}")


def _check_u32(value: int, name: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be a 32-bit unsigned integer, got {value}")


def _check_len(value: bytes, size: int, name: str) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def pack_initiation(
    sender: int,
    ephemeral: bytes,
    encrypted_static: bytes,
    encrypted_timestamp: bytes,
    mac1: bytes = bytes(MAC_SIZE),
    mac2: bytes = bytes(MAC_SIZE),
) -> bytearray:
    """A 148-byte initiation (a bytearray so the MACs can be filled in place)."""
    _check_u32(sender, "sender index")
    _check_len(ephemeral, KEY_SIZE, "ephemeral")
    _check_len(encrypted_static, KEY_SIZE + TAG_SIZE, "encrypted static")
    _check_len(encrypted_timestamp, TIMESTAMP_SIZE + TAG_SIZE, "encrypted timestamp")
    _check_len(mac1, MAC_SIZE, "mac1")
    _check_len(mac2, MAC_SIZE, "mac2")
    out = bytearray(INITIATION_SIZE)
    _INIT_HEAD.pack_into(out, 0, MESSAGE_INITIATION, sender)
    out[INITIATION_EPHEMERAL:INITIATION_STATIC] = ephemeral
    out[INITIATION_STATIC:INITIATION_TIMESTAMP] = encrypted_static
    out[INITIATION_TIMESTAMP:INITIATION_MAC1] = encrypted_timestamp
    out[INITIATION_MAC1:INITIATION_MAC2] = mac1
    out[INITIATION_MAC2:] = mac2
    return out


def parse_initiation(data: bytes | bytearray | memoryview) -> Initiation:
    """Split a 148-byte initiation into its fields; MessageError if size or type is wrong."""
    _check(data, MESSAGE_INITIATION, INITIATION_SIZE, "handshake initiation")
    b = bytes(data)
    return Initiation(
        _U32.unpack_from(b, 4)[0],
        b[INITIATION_EPHEMERAL:INITIATION_STATIC],
        b[INITIATION_STATIC:INITIATION_TIMESTAMP],
        b[INITIATION_TIMESTAMP:INITIATION_MAC1],
        b[INITIATION_MAC1:INITIATION_MAC2],
        b[INITIATION_MAC2:],
    )


def pack_response(
    sender: int,
    receiver: int,
    ephemeral: bytes,
    encrypted_nothing: bytes,
    mac1: bytes = bytes(MAC_SIZE),
    mac2: bytes = bytes(MAC_SIZE),
) -> bytearray:
    """A 92-byte response (a bytearray so the MACs can be filled in place)."""
    _check_u32(sender, "sender index")
    _check_u32(receiver, "receiver index")
    _check_len(ephemeral, KEY_SIZE, "ephemeral")
    _check_len(encrypted_nothing, TAG_SIZE, "encrypted nothing")
    _check_len(mac1, MAC_SIZE, "mac1")
    _check_len(mac2, MAC_SIZE, "mac2")
    out = bytearray(RESPONSE_SIZE)
    _RESP_HEAD.pack_into(out, 0, MESSAGE_RESPONSE, sender, receiver)
    out[RESPONSE_EPHEMERAL:RESPONSE_EMPTY] = ephemeral
    out[RESPONSE_EMPTY:RESPONSE_MAC1] = encrypted_nothing
    out[RESPONSE_MAC1:RESPONSE_MAC2] = mac1
    out[RESPONSE_MAC2:] = mac2
    return out


def parse_response(data: bytes | bytearray | memoryview) -> Response:
    """Split a 92-byte response into its fields; MessageError if size or type is wrong."""
    _check(data, MESSAGE_RESPONSE, RESPONSE_SIZE, "handshake response")
    b = bytes(data)
    sender, receiver = struct.unpack_from("<II", b, 4)
    return Response(
        sender,
        receiver,
        b[RESPONSE_EPHEMERAL:RESPONSE_EMPTY],
        b[RESPONSE_EMPTY:RESPONSE_MAC1],
        b[RESPONSE_MAC1:RESPONSE_MAC2],
        b[RESPONSE_MAC2:],
    )


def pack_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    """A 64-byte cookie reply."""
    _check_u32(receiver, "receiver index")
    _check_len(nonce, COOKIE_NONCE_SIZE, "cookie nonce")
    _check_len(encrypted_cookie, COOKIE_SIZE + TAG_SIZE, "encrypted cookie")
    return _COOKIE_HEAD.pack(MESSAGE_COOKIE_REPLY, receiver) + nonce + encrypted_cookie


def parse_cookie_reply(data: bytes | bytearray | memoryview) -> CookieReply:
    """Split a 64-byte cookie reply into its fields; MessageError if size or type is wrong."""
    _check(data, MESSAGE_COOKIE_REPLY, COOKIE_REPLY_SIZE, "cookie reply")
    b = bytes(data)
    return CookieReply(_U32.unpack_from(b, 4)[0], b[8:32], b[32:64])


def pack_transport_header(receiver: int, counter: int) -> bytes:
    """The 16-byte transport header."""
    _check_u32(receiver, "receiver index")
    if not 0 <= counter < 1 << 64:
        raise ValueError(f"counter must be a 64-bit unsigned integer, got {counter}")
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter)


def parse_transport_header(data: bytes | bytearray | memoryview) -> TransportHeader:
    """Receiver index and counter of a transport message (at least 32 bytes)."""
    _check(data, MESSAGE_TRANSPORT, None, "transport message")
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(data, 0)
    return TransportHeader(receiver, counter)
