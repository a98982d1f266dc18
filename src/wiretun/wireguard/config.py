"""The configuration vocabulary shared by the UAPI, the device and the Python API.

A ``set=1`` UAPI request parses into one :class:`DeviceSet`; the device applies it. ``get=1`` is
answered from a :class:`DeviceState` snapshot. Neither side knows the other: uapi.py speaks text,
device.py speaks the protocol core.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from .allowedips import network_slot, slot_network

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


class AllowedIPChanges(Sequence[tuple[IPNetwork, bool]]):
    """A peer's ``allowed_ip`` lines in request order, as ``(network, remove)`` pairs.

    Stored as one int per line (:attr:`changes`: the prefix's slot, see
    :func:`wiretun.wireguard.allowedips.prefix_slot`, shifted left once, plus 1 for a removal), so a
    request with a million prefixes costs tens of megabytes, not hundreds, and is applied without
    making an ``ip_network`` per line. Compares equal to a list of the same pairs.
    """

    __slots__ = ("changes",)

    def __init__(self, items: Iterable[tuple[IPNetwork, bool]] = ()) -> None:
        self.changes: list[int] = [network_slot(net) << 1 | bool(remove) for net, remove in items]

    def append(self, item: tuple[IPNetwork, bool]) -> None:
        net, remove = item
        self.changes.append(network_slot(net) << 1 | bool(remove))

    def clear(self) -> None:
        self.changes.clear()

    def __len__(self) -> int:
        return len(self.changes)

    @overload
    def __getitem__(self, index: int) -> tuple[IPNetwork, bool]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[IPNetwork, bool]]: ...

    def __getitem__(self, index: int | slice) -> tuple[IPNetwork, bool] | list[tuple[IPNetwork, bool]]:
        if isinstance(index, slice):
            return [(slot_network(c >> 1), bool(c & 1)) for c in self.changes[index]]
        c = self.changes[index]
        return (slot_network(c >> 1), bool(c & 1))

    def __iter__(self) -> Iterator[tuple[IPNetwork, bool]]:
        for c in self.changes:
            yield (slot_network(c >> 1), bool(c & 1))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AllowedIPChanges):
            return self.changes == other.changes
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{'-' if remove else ''}{net}" for net, remove in self[:8])
        more = f", ... ({len(self)} in all)" if len(self) > 8 else ""
        return f"AllowedIPChanges([{shown}{more}])"


class AllowedIPList(Sequence[IPNetwork]):
    """A peer's allowed IPs in a :class:`PeerState`, kept as slots
    (:func:`wiretun.wireguard.allowedips.prefix_slot`) so a state with a million of them is cheap to
    take and to format; reads as a sequence of ``ip_network`` and compares equal to a list of them."""

    __slots__ = ("slots",)

    def __init__(self, slots: Iterable[int] = ()) -> None:
        self.slots: list[int] = list(slots)

    def __len__(self) -> int:
        return len(self.slots)

    @overload
    def __getitem__(self, index: int) -> IPNetwork: ...

    @overload
    def __getitem__(self, index: slice) -> list[IPNetwork]: ...

    def __getitem__(self, index: int | slice) -> IPNetwork | list[IPNetwork]:
        if isinstance(index, slice):
            return [slot_network(slot) for slot in self.slots[index]]
        return slot_network(self.slots[index])

    def __iter__(self) -> Iterator[IPNetwork]:
        for slot in self.slots:
            yield slot_network(slot)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AllowedIPList):
            return self.slots == other.slots
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(str(net) for net in self[:8])
        more = f", ... ({len(self)} in all)" if len(self) > 8 else ""
        return f"AllowedIPList([{shown}{more}])"


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
    allowed_ips: AllowedIPChanges = dataclasses.field(default_factory=AllowedIPChanges)
    protocol_version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.allowed_ips, AllowedIPChanges):  # a plain list of (network, remove)
            self.allowed_ips = AllowedIPChanges(self.allowed_ips)


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
    # A list, or an AllowedIPList (what Device.state() gives: the same networks, kept compact).
    allowed_ips: list[IPNetwork] | AllowedIPList = dataclasses.field(default_factory=list)
    protocol_version: int = 1


@dataclasses.dataclass
class DeviceState:
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerState] = dataclasses.field(default_factory=list)
