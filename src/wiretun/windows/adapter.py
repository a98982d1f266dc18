"""An adapter over wintun.dll 0.14, and the module-level calls of the Windows backend.

What 0.14 and the IP Helper API offer, and what is NotSupported (each error names the reason):

============================  ==========================================================================
create / open / close / LUID  WintunCreateAdapter / OpenAdapter / CloseAdapter / GetAdapterLUID
driver version, delete        WintunGetRunningDriverVersion, WintunDeleteDriver
name, kernel name             ConvertInterfaceLuidToAlias (the two are the same on Windows)
GUID                          the requested GUID; for an opened adapter ConvertInterfaceLuidToGuid
tunnel type                   as created; for an opened adapter the interface description (GetIfEntry2),
                              which Wintun sets to the tunnel type
MTU, state, addresses, routes GetIfEntry2 / SetIpInterfaceEntry, Create/DeleteUnicastIpAddressEntry,
                              Create/DeleteIpForwardEntry2 and their tables, by LUID
up                            nothing to do: a Wintun adapter's link is up while a session runs
down                          NotSupported (Wintun has no administrative down; end the session)
rename                        NotSupported (0.14 has no rename, and the IP Helper API cannot rename)
enumerate                     NotSupported (0.14 dropped WintunEnumAdapters, and the tunnel type of an
                              adapter this process did not create is not a property Windows lists)
persistent, owner, group      NotSupported (Linux TUN features; a Wintun adapter lives while its
multi_queue, offload          creating handle does, one session at a time, no offloads)
link events                   NotSupported (NotifyIpInterfaceChange is not bound yet)
============================  ==========================================================================
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Sequence

from .. import log
from .._backend import IPAddress, IPInterface, IPNetwork, LinkMonitor, Recorder, Route
from ..errors import AccessDenied, InvalidParameter, NotSupported
from . import ipconfig, wintun_dll
from .session import WintunSession

__all__ = [
    "WintunAdapter",
    "create_adapter",
    "delete_driver",
    "enumerate_adapters",
    "get_running_driver_version",
    "open_adapter",
]

_NIL = uuid.UUID(int=0)


def _check_wintun_name(kind: str, value: str) -> None:
    """Wintun's limit: MAX_ADAPTER_NAME - 1 = 127 UTF-16 code units (a character beyond U+FFFF takes two)."""
    units = len(value.encode("utf-16-le")) // 2
    if units > wintun_dll.MAX_ADAPTER_NAME - 1:
        raise InvalidParameter(
            f"{kind} {value[:40]!r}... is {units} UTF-16 code units; Wintun takes at most "
            f"{wintun_dll.MAX_ADAPTER_NAME - 1}"
        )


def _linux_only(option: str, why: str) -> NotSupported:
    return NotSupported(f"{option} is a Linux TUN feature; on Windows {why}")


class WintunAdapter:
    """One WINTUN_ADAPTER_HANDLE, implementing :class:`wiretun._backend.AdapterBackend`."""

    def __init__(self, dll: wintun_dll.WintunDLL, handle: int, name: str, guid: uuid.UUID, tunnel_type: str,
                 created: bool) -> None:
        self._dll = dll
        self._handle = handle
        self._created = created
        self._closed = False
        self._lock = threading.Lock()
        self.guid = guid
        self.tunnel_type = tunnel_type
        self.last_name = name
        self._luid = dll.get_adapter_luid(handle)
        # A handle dropped without close() is closed when the object goes, as WintunCloseAdapter would.
        self._finalizer = weakref.finalize(self, dll.close_adapter, handle)

    @property
    def luid(self) -> int:
        """WintunGetAdapterLUID (read once: a LUID never changes while the adapter exists)."""
        return self._luid

    def _ip(self) -> ipconfig.IpConfig:
        return ipconfig.current()

    def name(self) -> str:
        self.last_name = self._ip().alias(self._luid)
        return self.last_name

    def kernel_name(self) -> str:
        return self.name()

    def rename(self, new_name: str) -> None:
        raise NotSupported("wintun.dll 0.14 has no call to rename an adapter, and the IP Helper API has none either")

    def persistent(self) -> bool:
        return False  # a Wintun adapter goes with the handle that created it

    def mtu(self) -> int:
        return self._ip().mtu(self._luid)

    def set_mtu(self, value: int) -> None:
        self._ip().set_mtu(self._luid, value)

    def is_up(self) -> bool:
        return self._ip().is_up(self._luid)

    def set_up(self, up: bool) -> None:
        if not up:
            raise NotSupported("a Wintun adapter has no administrative down state; end its session instead")
        # Up: nothing to do; Wintun reports the link connected while a session runs.

    def add_address(self, iface: IPInterface) -> None:
        self._ip().add_address(self._luid, iface)

    def remove_address(self, iface: IPInterface) -> None:
        self._ip().remove_address(self._luid, iface)

    def addresses(self) -> list[IPInterface]:
        return self._ip().addresses(self._luid)

    def add_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        self._ip().add_route(self._luid, net, gateway, metric)

    def remove_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        self._ip().remove_route(self._luid, net, gateway, metric)

    def routes(self) -> list[Route]:
        return self._ip().routes(self._luid)

    def link_monitor(self) -> LinkMonitor:
        raise NotSupported("link events on Windows (NotifyIpInterfaceChange) are not implemented by wiretun yet")

    def start_session(self, capacity: int, *, multi_queue: bool, offload: bool,
                      record: Recorder | None) -> WintunSession:
        if multi_queue:
            raise _linux_only("multi_queue", "an adapter has one session at a time")
        if offload:
            raise _linux_only("offload", "Wintun hands over finished IP packets only")
        with self._lock:
            if self._closed:
                raise InvalidParameter(f"adapter handle {self.last_name!r} is closed")
            return WintunSession(self._dll, self._handle, capacity, self.last_name, record)

    def close(self) -> None:
        """WintunCloseAdapter: an adapter this handle created is removed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()
        log.info(f"{'Removed' if self._created else 'Closed'} adapter {self.last_name}")


# --- the module-level calls (wiretun._backend.Platform) ------------------------------------------------


def create_adapter(name: str, tunnel_type: str, guid: uuid.UUID, *, persistent: bool,
                   owner: int | None, group: int | None) -> WintunAdapter:
    """WintunCreateAdapter. AccessDenied, saying so, when the process is not elevated."""
    if persistent:
        raise _linux_only("persistent", "an adapter lives as long as the handle that created it")
    if owner is not None or group is not None:
        raise _linux_only("owner/group", "who may use an adapter is decided by Windows' own access control")
    _check_wintun_name("adapter name", name)
    _check_wintun_name("tunnel type", tunnel_type)
    dll = wintun_dll.load()
    if not wintun_dll.is_elevated():
        raise AccessDenied(
            f"cannot create adapter {name!r}: Wintun needs an elevated process (Run as administrator)"
        )
    handle = dll.create_adapter(name, tunnel_type, guid)
    try:
        adapter = WintunAdapter(dll, handle, name, guid, tunnel_type, created=True)
    except BaseException:
        dll.close_adapter(handle)
        raise
    log.info(f"Created adapter {name} (tunnel type {tunnel_type}, GUID {guid}, LUID {adapter.luid:#x})")
    return adapter


def open_adapter(name: str) -> WintunAdapter:
    """WintunOpenAdapter. GUID and tunnel type are read through the IP Helper API where it is there
    (else: the nil GUID and an empty tunnel type, meaning unknown)."""
    _check_wintun_name("adapter name", name)
    dll = wintun_dll.load()
    handle = dll.open_adapter(name)
    try:
        adapter = WintunAdapter(dll, handle, name, _NIL, "", created=False)
    except BaseException:
        dll.close_adapter(handle)
        raise
    try:
        ip = ipconfig.current()
        try:
            adapter.guid = ip.guid(adapter.luid)
            adapter.tunnel_type = ip.description(adapter.luid)
        except NotSupported:
            pass
    except BaseException:
        adapter.close()
        raise
    log.info(f"Opened adapter {name} (LUID {adapter.luid:#x})")
    return adapter


def enumerate_adapters(tunnel_type: str) -> Sequence[WintunAdapter]:
    raise NotSupported(
        "wintun.dll 0.14 has no WintunEnumAdapters (earlier versions had it), and Windows does not list "
        "adapters by Wintun tunnel type; open adapters by name instead"
    )


def get_running_driver_version() -> int:
    """WintunGetRunningDriverVersion: ``(major << 16) | minor``; NotFound when the driver is not loaded
    (no adapter has been created since boot)."""
    return wintun_dll.load().get_running_driver_version()


def delete_driver() -> int:
    """WintunDeleteDriver: removes the Wintun driver if no adapter uses it. Removes no adapters: returns 0."""
    wintun_dll.load().delete_driver()
    return 0



if TYPE_CHECKING:  # the classes implement the seam's protocols (checked by mypy, on both platforms)
    from .._backend import AdapterBackend, SessionBackend

    def _conforms(adapter: WintunAdapter, session: WintunSession) -> tuple[AdapterBackend, SessionBackend]:
        return adapter, session
