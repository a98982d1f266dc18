"""The configuration vocabulary shared by the UAPI, the device and the Python API.

A ``set=1`` UAPI request parses into one :class:`DeviceSet`; the device applies it. ``get=1`` is
answered from a :class:`DeviceState` snapshot. Neither side knows the other: uapi.py speaks text,
device.py speaks the protocol core.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# An endpoint is (host, port) with host a literal IPv4 or IPv6 address string (no brackets).
Endpoint = tuple[str, int]

KEY_SIZE = 32


class UAPIError(Exception):
    """A failed request; ``errno`` is what the UAPI replies (wireguard-go's values)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


# wireguard-go's ipc error codes, as the UAPI reports them in ``errno=``.
EINVAL = _errno.EINVAL
EIO = _errno.EIO
EPROTO = _errno.EPROTO
EADDRINUSE = _errno.EADDRINUSE
ENOENT = _errno.ENOENT


@dataclasses.dataclass
class PeerSet:
    """One ``public_key=`` section of a set request. ``None`` means "leave unchanged"."""

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = dataclasses.field(default=None, repr=False)  # 32 zero bytes clears it
    endpoint: Endpoint | None = None
    persistent_keepalive_interval: int | None = None  # seconds, 0 disables
    replace_allowed_ips: bool = False
    # In request order: (network, remove). Applied after replace_allowed_ips cleared the list.
    allowed_ips: list[tuple[IPNetwork, bool]] = dataclasses.field(default_factory=list)
    protocol_version: int | None = None


@dataclasses.dataclass
class DeviceSet:
    private_key: bytes | None = dataclasses.field(default=None, repr=False)  # 32 zero bytes clears it
    listen_port: int | None = None
    fwmark: int | None = None  # 0 clears it
    replace_peers: bool = False
    peers: list[PeerSet] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PeerState:
    public_key: bytes
    preshared_key: bytes = dataclasses.field(default=bytes(KEY_SIZE), repr=False)
    endpoint: Endpoint | None = None
    persistent_keepalive_interval: int = 0
    last_handshake_time_sec: int = 0
    last_handshake_time_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    allowed_ips: list[IPNetwork] = dataclasses.field(default_factory=list)
    protocol_version: int = 1


@dataclasses.dataclass
class DeviceState:
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerState] = dataclasses.field(default_factory=list)
