"""Adapter names on Linux: Wintun names, kernel names and altnames, and the identity alias (pure).

* **Name.** Wintun names may hold up to 127 characters; Linux kernel names only 15 bytes. A name that
  is a valid kernel name (printable ASCII, at most 15 bytes, no space, ``:``, ``/`` or ``%``, not ``.``
  or ``..``) *is* the kernel name. Any other valid name becomes an *altname* of the interface (the
  kernel keeps up to 127 bytes there, spaces included) and the kernel name is derived from it: ``wt`` +
  13 hex digits of a SHA-256 of the name. ``Adapter.open`` finds an adapter by either name.
* **Tunnel type and GUID** are recorded in the interface alias (``IFLA_IFALIAS``) as
  ``wiretun/1 <guid> <tunnel type>``: the marker ``wiretun/1``, one space, the GUID in canonical
  lowercase form, one space, then the tunnel type verbatim (it may contain spaces). An interface whose
  alias does not have this form was not created by wiretun and cannot be opened as an adapter.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import TYPE_CHECKING

from ..errors import InvalidData, InvalidParameter

if TYPE_CHECKING:
    from .netlink import Link

IFNAMSIZ = 16  # kernel names: at most 15 bytes
ALTIFNAMSIZ = 128  # altnames: at most 127 bytes

MAX_NAME_CHARS = 127  # Wintun: MAX_ADAPTER_NAME - 1
MAX_NAME_BYTES = ALTIFNAMSIZ - 1  # UTF-8 bytes an altname can hold
MAX_KERNEL_NAME_BYTES = IFNAMSIZ - 1
MAX_TUNNEL_TYPE_CHARS = 127
MAX_TUNNEL_TYPE_BYTES = 127  # keeps the whole alias far below IFALIASZ
ALIAS_MARKER = "wiretun/1"
DERIVED_PREFIX = "wt"
_DERIVE_ATTEMPTS = 16
MIN_MTU = 68  # the TUN driver's limits
MAX_MTU = 65535


# --- names, tunnel types, alias, version: pure -------------------------------------------------


def _show(value: str, limit: int = 40) -> str:
    """repr() of a possibly long user string, shortened for messages."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def _check_text(kind: str, value: object, max_chars: int, max_bytes: int, *, allow_slash: bool) -> str:
    if not isinstance(value, str):
        raise InvalidParameter(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidParameter(f"{kind} must not be empty")
    if len(value) > max_chars:
        raise InvalidParameter(f"{kind} {_show(value)} is {len(value)} characters long; the limit is {max_chars}")
    for ch in value:
        if ch == "\0":
            raise InvalidParameter(f"{kind} {_show(value)} contains a NUL character")
        if ch == "/" and not allow_slash:
            raise InvalidParameter(f"{kind} {_show(value)} contains '/'")
        if ch.isspace() and ch != " ":
            raise InvalidParameter(f"{kind} {_show(value)} contains whitespace (U+{ord(ch):04X})")
        if not ch.isprintable():
            raise InvalidParameter(f"{kind} {_show(value)} contains a non-printable character (U+{ord(ch):04X})")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidParameter(f"{kind} {_show(value)} is {size} bytes in UTF-8; the limit is {max_bytes} bytes")
    return value


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name, else raise InvalidParameter saying why.

    Spaces are allowed, as in Wintun ("Data Center"): such a name is an altname of the interface (the
    kernel keeps spaces there; Debian's ``ip`` lists them though it refuses to set them) and the kernel
    name is derived. The limit is the altname's: 127 bytes of UTF-8."""
    return _check_text("adapter name", name, MAX_NAME_CHARS, MAX_NAME_BYTES, allow_slash=False)


def validate_tunnel_type(tunnel_type: object) -> str:
    """Return ``tunnel_type`` if valid (1..127 printable characters, at most 127 UTF-8 bytes)."""
    return _check_text("tunnel type", tunnel_type, MAX_TUNNEL_TYPE_CHARS, MAX_TUNNEL_TYPE_BYTES, allow_slash=True)


def is_kernel_name(name: str) -> bool:
    """Whether a (valid) adapter name can be used as the kernel interface name as is."""
    return (
        name.isascii()
        and 0 < len(name) <= MAX_KERNEL_NAME_BYTES
        and name not in (".", "..")
        and ":" not in name  # the kernel reserves ':' (old-style address labels)
        and "%" not in name  # the kernel would expand "%d" into a number of its choosing
        and all(ch.isprintable() and not ch.isspace() and ch != "/" for ch in name)
    )


def derived_kernel_name(name: str, attempt: int = 0) -> str:
    """The kernel name wiretun uses for a name that cannot be one: ``wt`` + 13 hex digits.

    ``attempt`` > 0 gives the alternatives tried when the first is taken.
    """
    seed = name.encode("utf-8") if attempt == 0 else f"{attempt}\0{name}".encode()
    return DERIVED_PREFIX + hashlib.sha256(seed).hexdigest()[: MAX_KERNEL_NAME_BYTES - len(DERIVED_PREFIX)]


def is_derived_kernel_name(kernel_name: str, name: str) -> bool:
    return any(derived_kernel_name(name, i) == kernel_name for i in range(_DERIVE_ATTEMPTS))


def encode_alias(guid: uuid.UUID, tunnel_type: str) -> str:
    """The interface alias recording an adapter's identity: ``wiretun/1 <guid> <tunnel type>``."""
    return f"{ALIAS_MARKER} {guid} {validate_tunnel_type(tunnel_type)}"


def decode_alias(alias: str | None) -> tuple[uuid.UUID, str] | None:
    """(GUID, tunnel type) from an alias written by :func:`encode_alias`; None for any other alias."""
    if not alias:
        return None
    parts = alias.split(" ", 2)
    if len(parts) != 3 or parts[0] != ALIAS_MARKER:
        return None
    try:
        guid = uuid.UUID(parts[1])
        validate_tunnel_type(parts[2])
    except (ValueError, InvalidParameter):
        return None
    if str(guid) != parts[1]:
        return None
    return guid, parts[2]


def wintun_name(link: Link) -> str:
    """The adapter name of a link: the altname its derived kernel name came from, else the kernel name."""
    if link.altnames and link.name.startswith(DERIVED_PREFIX):
        for alt in link.altnames:
            if is_derived_kernel_name(link.name, alt):
                return alt
    return link.name


_VERSION = re.compile(r"(\d+)\.(\d+)(?:[.\-+~ ].*)?")


def parse_driver_version(text: str) -> int:
    """``"1.6"`` -> ``0x10006``: Wintun's (major << 16) | minor from an ethtool version string."""
    m = _VERSION.fullmatch(text.strip())
    if m is None:
        raise InvalidData(f"driver version {text!r} is not of the form MAJOR.MINOR")
    major, minor = int(m.group(1)), int(m.group(2))
    if major > 0xFFFF or minor > 0xFFFF:
        raise InvalidData(f"driver version {text!r} does not fit 16 bits per part")
    return (major << 16) | minor
