"""An adapter's IP configuration by LUID: the IP Helper API (iphlpapi.dll) on Windows.

wintun.dll 0.14 makes and removes adapters; everything else about one (addresses, routes, MTU, state,
name, GUID) is Windows' own IP Helper API, keyed by the adapter's NET_LUID, as Wintun's example.c does
with ``CreateUnicastIpAddressEntry``. :class:`IpHelper` is a small ctypes binding of the calls used:

* ``CreateUnicastIpAddressEntry`` / ``DeleteUnicastIpAddressEntry`` / ``GetUnicastIpAddressTable``
* ``CreateIpForwardEntry2`` / ``DeleteIpForwardEntry2`` / ``GetIpForwardTable2``
* ``GetIpInterfaceEntry`` / ``SetIpInterfaceEntry`` (``NlMtu``), ``GetIfEntry2`` (MTU, oper status,
  description = Wintun's tunnel type), ``ConvertInterfaceLuidToAlias`` / ``ConvertInterfaceLuidToGuid``.

It is not run by wiretun's tests (they run on Linux, over a stand-in wintun.dll whose adapters are
configured with Linux's ``ip``): it is kept small and type-checked with ``mypy --platform win32``.
Elsewhere :func:`default` is :class:`Unavailable`, which raises NotSupported; a test may install its own
:class:`IpConfig` with :func:`install`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
import uuid
from typing import Protocol

from .._backend import IPAddress, IPInterface, IPNetwork, Route
from ..errors import NotSupported
from .wintun_dll import GUID, error_for

__all__ = ["IpConfig", "IpHelper", "Unavailable", "current", "default", "install"]


class IpConfig(Protocol):
    """What the Windows adapter backend asks of the OS about an adapter, by LUID."""

    def alias(self, luid: int) -> str: ...

    def guid(self, luid: int) -> uuid.UUID: ...

    def description(self, luid: int) -> str: ...

    def mtu(self, luid: int) -> int: ...

    def set_mtu(self, luid: int, value: int) -> None: ...

    def is_up(self, luid: int) -> bool: ...

    def add_address(self, luid: int, iface: IPInterface) -> None: ...

    def remove_address(self, luid: int, iface: IPInterface) -> None: ...

    def addresses(self, luid: int) -> list[IPInterface]: ...

    def add_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None: ...

    def remove_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None: ...

    def routes(self, luid: int) -> list[Route]: ...


class Unavailable:
    """No IP Helper API here (the Linux stand-in): every call is NotSupported, naming what to use."""

    def _no(self, what: str) -> NotSupported:
        return NotSupported(
            f"{what} goes through Windows' IP Helper API (iphlpapi.dll), which this platform "
            f"({sys.platform}) lacks; configure the stand-in's adapter with the OS's own tools"
        )

    def alias(self, luid: int) -> str:
        raise self._no("reading the adapter name")

    def guid(self, luid: int) -> uuid.UUID:
        raise self._no("reading the adapter GUID")

    def description(self, luid: int) -> str:
        raise self._no("reading the tunnel type")

    def mtu(self, luid: int) -> int:
        raise self._no("reading the MTU")

    def set_mtu(self, luid: int, value: int) -> None:
        raise self._no("setting the MTU")

    def is_up(self, luid: int) -> bool:
        raise self._no("reading the interface state")

    def add_address(self, luid: int, iface: IPInterface) -> None:
        raise self._no("adding an address")

    def remove_address(self, luid: int, iface: IPInterface) -> None:
        raise self._no("removing an address")

    def addresses(self, luid: int) -> list[IPInterface]:
        raise self._no("listing addresses")

    def add_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        raise self._no("adding a route")

    def remove_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        raise self._no("removing a route")

    def routes(self, luid: int) -> list[Route]:
        raise self._no("listing routes")


# --- the IP Helper structures (netioapi.h); natural alignment, as ctypes lays them out on Windows ---------

AF_INET = 2
AF_INET6 = 23  # Windows' value (Linux's is 10)
ERROR_OBJECT_ALREADY_EXISTS = 5010


class _SockaddrInet(ctypes.Structure):
    """SOCKADDR_INET: the 28-byte union of SOCKADDR_IN and SOCKADDR_IN6, as raw bytes."""

    # 4-aligned, as the union's SOCKADDR_IN6 member (ULONG fields) makes it: IP_ADDRESS_PREFIX depends on it.
    _fields_ = [("family", ctypes.c_uint16), ("port", ctypes.c_uint16), ("rest", ctypes.c_uint32 * 6)]

    @classmethod
    def of(cls, address: IPAddress | None, version: int) -> _SockaddrInet:
        sa = cls()
        if version == 4:
            sa.family = AF_INET
            if address is not None:
                ctypes.memmove(ctypes.addressof(sa) + 4, address.packed, 4)  # sin_port, then sin_addr
        else:
            sa.family = AF_INET6
            if address is not None:
                ctypes.memmove(ctypes.addressof(sa) + 8, address.packed, 16)  # port, flowinfo, sin6_addr
        return sa

    def address(self) -> IPAddress:
        raw = bytes(self)
        if self.family == AF_INET:
            return ipaddress.IPv4Address(raw[4:8])
        return ipaddress.IPv6Address(raw[8:24])


class _UnicastRow(ctypes.Structure):
    """MIB_UNICASTIPADDRESS_ROW (80 bytes)."""

    _fields_ = [
        ("Address", _SockaddrInet),
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("PrefixOrigin", ctypes.c_int32),
        ("SuffixOrigin", ctypes.c_int32),
        ("ValidLifetime", ctypes.c_uint32),
        ("PreferredLifetime", ctypes.c_uint32),
        ("OnLinkPrefixLength", ctypes.c_uint8),
        ("SkipAsSource", ctypes.c_uint8),
        ("DadState", ctypes.c_int32),
        ("ScopeId", ctypes.c_uint32),
        ("CreationTimeStamp", ctypes.c_int64),
    ]


class _Prefix(ctypes.Structure):
    """IP_ADDRESS_PREFIX."""

    _fields_ = [("Prefix", _SockaddrInet), ("PrefixLength", ctypes.c_uint8)]


class _ForwardRow(ctypes.Structure):
    """MIB_IPFORWARD_ROW2 (104 bytes)."""

    _fields_ = [
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("DestinationPrefix", _Prefix),
        ("NextHop", _SockaddrInet),
        ("SitePrefixLength", ctypes.c_uint8),
        ("ValidLifetime", ctypes.c_uint32),
        ("PreferredLifetime", ctypes.c_uint32),
        ("Metric", ctypes.c_uint32),
        ("Protocol", ctypes.c_int32),
        ("Loopback", ctypes.c_uint8),
        ("AutoconfigureAddress", ctypes.c_uint8),
        ("Publish", ctypes.c_uint8),
        ("Immortal", ctypes.c_uint8),
        ("Age", ctypes.c_uint32),
        ("Origin", ctypes.c_int32),
    ]


class _IpInterfaceRow(ctypes.Structure):
    """MIB_IPINTERFACE_ROW."""

    _fields_ = [
        ("Family", ctypes.c_uint16),
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("MaxReassemblySize", ctypes.c_uint32),
        ("InterfaceIdentifier", ctypes.c_uint64),
        ("MinRouterAdvertisementInterval", ctypes.c_uint32),
        ("MaxRouterAdvertisementInterval", ctypes.c_uint32),
        ("Flags", ctypes.c_uint8 * 9),  # AdvertisingEnabled .. AdvertiseDefaultRoute (BOOLEANs)
        ("RouterDiscoveryBehavior", ctypes.c_int32),
        ("DadTransmits", ctypes.c_uint32),
        ("BaseReachableTime", ctypes.c_uint32),
        ("RetransmitTime", ctypes.c_uint32),
        ("PathMtuDiscoveryTimeout", ctypes.c_uint32),
        ("LinkLocalAddressBehavior", ctypes.c_int32),
        ("LinkLocalAddressTimeout", ctypes.c_uint32),
        ("ZoneIndices", ctypes.c_uint32 * 16),
        ("SitePrefixLength", ctypes.c_uint32),
        ("Metric", ctypes.c_uint32),
        ("NlMtu", ctypes.c_uint32),
        ("Connected", ctypes.c_uint8),
        ("SupportsWakeUpPatterns", ctypes.c_uint8),
        ("SupportsNeighborDiscovery", ctypes.c_uint8),
        ("SupportsRouterDiscovery", ctypes.c_uint8),
        ("ReachableTime", ctypes.c_uint32),
        ("TransmitOffload", ctypes.c_uint8),
        ("ReceiveOffload", ctypes.c_uint8),
        ("DisableDefaultRoutes", ctypes.c_uint8),
    ]


class _IfRow2(ctypes.Structure):
    """MIB_IF_ROW2 (1352 bytes); the statistics at its end are kept as one block."""

    _fields_ = [
        ("InterfaceLuid", ctypes.c_uint64),
        ("InterfaceIndex", ctypes.c_uint32),
        ("InterfaceGuid", GUID),
        ("Alias", ctypes.c_uint16 * 257),
        ("Description", ctypes.c_uint16 * 257),
        ("PhysicalAddressLength", ctypes.c_uint32),
        ("PhysicalAddress", ctypes.c_uint8 * 32),
        ("PermanentPhysicalAddress", ctypes.c_uint8 * 32),
        ("Mtu", ctypes.c_uint32),
        ("Type", ctypes.c_uint32),
        ("TunnelType", ctypes.c_int32),
        ("MediaType", ctypes.c_int32),
        ("PhysicalMediumType", ctypes.c_int32),
        ("AccessType", ctypes.c_int32),
        ("DirectionType", ctypes.c_int32),
        ("InterfaceAndOperStatusFlags", ctypes.c_uint8),
        ("OperStatus", ctypes.c_int32),
        ("AdminStatus", ctypes.c_int32),
        ("MediaConnectState", ctypes.c_int32),
        ("NetworkGuid", GUID),
        ("ConnectionType", ctypes.c_int32),
        ("Statistics", ctypes.c_uint64 * 20),
    ]


_IF_OPER_STATUS_UP = 1


def _text(units: ctypes.Array[ctypes.c_uint16]) -> str:
    raw = bytes(units)
    end = next((i for i in range(0, len(raw), 2) if raw[i : i + 2] == b"\0\0"), len(raw))
    return raw[:end].decode("utf-16-le", "replace")


if sys.platform == "win32":

    class IpHelper:
        """The IP Helper API (iphlpapi.dll) by LUID. Not run by wiretun's tests."""

        def __init__(self) -> None:
            lib = ctypes.WinDLL("iphlpapi")
            self._lib = lib
            p = ctypes.POINTER
            for name, args in {
                "InitializeUnicastIpAddressEntry": [p(_UnicastRow)],
                "CreateUnicastIpAddressEntry": [p(_UnicastRow)],
                "DeleteUnicastIpAddressEntry": [p(_UnicastRow)],
                "InitializeIpForwardEntry": [p(_ForwardRow)],
                "CreateIpForwardEntry2": [p(_ForwardRow)],
                "DeleteIpForwardEntry2": [p(_ForwardRow)],
                "InitializeIpInterfaceEntry": [p(_IpInterfaceRow)],
                "GetIpInterfaceEntry": [p(_IpInterfaceRow)],
                "SetIpInterfaceEntry": [p(_IpInterfaceRow)],
                "GetIfEntry2": [p(_IfRow2)],
                "GetUnicastIpAddressTable": [ctypes.c_uint16, p(ctypes.c_void_p)],
                "GetIpForwardTable2": [ctypes.c_uint16, p(ctypes.c_void_p)],
                "FreeMibTable": [ctypes.c_void_p],
                "ConvertInterfaceLuidToAlias": [p(ctypes.c_uint64), p(ctypes.c_uint16), ctypes.c_size_t],
                "ConvertInterfaceLuidToGuid": [p(ctypes.c_uint64), p(GUID)],
            }.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = None if name.startswith("Initialize") or name == "FreeMibTable" else ctypes.c_uint32

        def _check(self, status: int, what: str, *, ok: tuple[int, ...] = ()) -> None:
            if status and status not in ok:
                raise error_for(status, what)

        def alias(self, luid: int) -> str:
            buf = (ctypes.c_uint16 * 257)()
            self._check(self._lib.ConvertInterfaceLuidToAlias(ctypes.byref(ctypes.c_uint64(luid)), buf, 257),
                        "cannot read the adapter name")
            return _text(buf)

        def guid(self, luid: int) -> uuid.UUID:
            out = GUID()
            self._check(self._lib.ConvertInterfaceLuidToGuid(ctypes.byref(ctypes.c_uint64(luid)), ctypes.byref(out)),
                        "cannot read the adapter GUID")
            return out.to_uuid()

        def _if_row(self, luid: int) -> _IfRow2:
            row = _IfRow2()
            row.InterfaceLuid = luid
            self._check(self._lib.GetIfEntry2(ctypes.byref(row)), "cannot read the interface")
            return row

        def description(self, luid: int) -> str:
            return _text(self._if_row(luid).Description)

        def mtu(self, luid: int) -> int:
            return int(self._if_row(luid).Mtu)

        def is_up(self, luid: int) -> bool:
            return bool(self._if_row(luid).OperStatus == _IF_OPER_STATUS_UP)

        def set_mtu(self, luid: int, value: int) -> None:
            for family in (AF_INET, AF_INET6):
                row = _IpInterfaceRow()
                self._lib.InitializeIpInterfaceEntry(ctypes.byref(row))
                row.Family = family
                row.InterfaceLuid = luid
                version = 4 if family == AF_INET else 6
                self._check(self._lib.GetIpInterfaceEntry(ctypes.byref(row)), f"cannot read IPv{version} settings")
                row.NlMtu = value
                row.SitePrefixLength = 0  # SetIpInterfaceEntry refuses the value Get returns for IPv4
                self._check(self._lib.SetIpInterfaceEntry(ctypes.byref(row)), f"cannot set MTU {value}")

        def _unicast_row(self, luid: int, iface: IPInterface) -> _UnicastRow:
            row = _UnicastRow()
            self._lib.InitializeUnicastIpAddressEntry(ctypes.byref(row))
            row.InterfaceLuid = luid
            row.Address = _SockaddrInet.of(iface.ip, iface.version)
            row.OnLinkPrefixLength = iface.network.prefixlen
            return row

        def add_address(self, luid: int, iface: IPInterface) -> None:
            row = self._unicast_row(luid, iface)
            self._check(self._lib.CreateUnicastIpAddressEntry(ctypes.byref(row)), f"cannot add address {iface}")

        def remove_address(self, luid: int, iface: IPInterface) -> None:
            row = self._unicast_row(luid, iface)
            self._check(self._lib.DeleteUnicastIpAddressEntry(ctypes.byref(row)), f"cannot remove address {iface}")

        def _table(self, getter: str, row_type: type[ctypes.Structure]) -> list[ctypes.Structure]:
            table = ctypes.c_void_p()
            self._check(getattr(self._lib, getter)(0, ctypes.byref(table)), "cannot read the table")  # AF_UNSPEC
            try:
                count = ctypes.c_uint32.from_address(table.value or 0).value
                # MIB_*_TABLE: ULONG NumEntries, then the rows at their own alignment (8).
                first = (table.value or 0) + ctypes.alignment(row_type)
                size = ctypes.sizeof(row_type)
                return [row_type.from_buffer_copy(ctypes.string_at(first + i * size, size)) for i in range(count)]
            finally:
                self._lib.FreeMibTable(table)

        def addresses(self, luid: int) -> list[IPInterface]:
            found: list[IPInterface] = []
            for row in self._table("GetUnicastIpAddressTable", _UnicastRow):
                assert isinstance(row, _UnicastRow)
                if row.InterfaceLuid == luid:
                    found.append(ipaddress.ip_interface(f"{row.Address.address()}/{row.OnLinkPrefixLength}"))
            return found

        def _forward_row(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> _ForwardRow:
            row = _ForwardRow()
            self._lib.InitializeIpForwardEntry(ctypes.byref(row))
            row.InterfaceLuid = luid
            row.DestinationPrefix.Prefix = _SockaddrInet.of(net.network_address, net.version)
            row.DestinationPrefix.PrefixLength = net.prefixlen
            row.NextHop = _SockaddrInet.of(gateway, net.version)
            if metric is not None:
                row.Metric = metric
            return row

        def add_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
            row = self._forward_row(luid, net, gateway, metric)
            self._check(self._lib.CreateIpForwardEntry2(ctypes.byref(row)), f"cannot add route {net}")

        def remove_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
            row = self._forward_row(luid, net, gateway, metric)
            self._check(self._lib.DeleteIpForwardEntry2(ctypes.byref(row)), f"cannot remove route {net}")

        def routes(self, luid: int) -> list[Route]:
            found: list[Route] = []
            for row in self._table("GetIpForwardTable2", _ForwardRow):
                assert isinstance(row, _ForwardRow)
                if row.InterfaceLuid != luid:
                    continue
                dest = row.DestinationPrefix
                net = ipaddress.ip_network(f"{dest.Prefix.address()}/{dest.PrefixLength}", strict=False)
                hop = row.NextHop.address()
                found.append(Route(net, None if hop.is_unspecified else hop, int(row.Metric)))
            return found

    def default() -> IpConfig:
        return IpHelper()

else:

    def default() -> IpConfig:
        return Unavailable()


_current: IpConfig | None = None


def current() -> IpConfig:
    """The IP configuration in use: the IP Helper API on Windows, :class:`Unavailable` elsewhere, or what
    :func:`install` set."""
    global _current
    if _current is None:
        _current = default()
    return _current


def install(config: IpConfig | None) -> None:
    """Use ``config`` for every adapter from now on (None: back to :func:`default`). For the tests over
    the Linux stand-in, which configure its adapters with Linux's own tools."""
    global _current
    _current = config

