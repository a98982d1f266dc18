"""Adapters: Wintun's WintunCreateAdapter / OpenAdapter / CloseAdapter / GetAdapterLUID, portable.

An adapter is a layer-3 TUN interface. :class:`Adapter` is the handle; the platform's backend
(:func:`wiretun._backend.platform`: :mod:`wiretun.linux`, or ``wiretun.windows``) does the work. On
Linux its identity lives in the kernel, so any process can read it while the interface exists (see
:mod:`wiretun.linux.names` for how names, GUID and tunnel type are kept).

Names are 1..127 characters whose UTF-8 encoding fits in 127 bytes (the Linux altname limit; spaces
are allowed, as in Wintun's "Data Center"), without ``/``, NUL, other whitespace or non-printable
characters. Tunnel types follow the same length rules and must be printable (spaces allowed).

Properties are cheap (no system call): ``name`` is the name as last read or set through this handle;
what asks the OS is a method (:meth:`Adapter.get_name`, :meth:`Adapter.get_mtu`, :meth:`Adapter.is_up_now`
...). The old property spellings ``mtu`` and ``is_up`` still work and warn (DeprecationWarning).
"""

from __future__ import annotations

import ipaddress
import threading
import uuid
import warnings
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _backend
from ._backend import AdapterBackend, IPInterface, LinkMonitor, Route
from .errors import Busy, InvalidParameter

if TYPE_CHECKING:
    import os

    from .session import Session

__all__ = ["Adapter", "Route", "get_running_driver_version", "delete_driver"]

_MAX_U32 = 0xFFFFFFFF


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _uint32(kind: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_U32:
        raise InvalidParameter(f"{kind} must be an int in 0..{_MAX_U32 - 1}, not {value!r}")
    return value


def _interface(value: object) -> IPInterface:
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise InvalidParameter(f"address must be a str like '10.6.7.7/24' or an ipaddress object, not {value!r}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        raise InvalidParameter(f"invalid IP address {value!r}: {exc}") from None


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if not isinstance(value, str):
        raise InvalidParameter(f"route destination must be a str like '10.0.0.0/8' or an ip_network, not {value!r}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise InvalidParameter(f"invalid route destination {value!r}: {exc}") from None


def _gateway(value: object, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if value is None:
        return None
    if not isinstance(value, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        # ip_address() would take an int (5 -> 0.0.0.5): accept only what reads as an address.
        raise InvalidParameter(f"invalid gateway {value!r}: give an address string such as '10.0.0.1'")
    try:
        gw = ipaddress.ip_address(value)
    except ValueError as exc:
        raise InvalidParameter(f"invalid gateway {value!r}: {exc}") from None
    if gw.version != version:
        raise InvalidParameter(f"gateway {gw} is IPv{gw.version} but the destination is IPv{version}")
    return gw


def _metric(value: object) -> int | None:
    return None if value is None else _uint32("route metric", value)


# --- the adapter -------------------------------------------------------------------------------------


class Adapter:
    """A wiretun adapter handle (WINTUN_ADAPTER_HANDLE). Get one from :meth:`create`, :meth:`open`
    or :meth:`enumerate`; release it with :meth:`close` or a ``with`` block."""

    def __init__(self, backend: AdapterBackend) -> None:
        self._backend = backend
        self._closed = False
        self._lock = threading.RLock()
        self._sessions: set[Any] = set()
        self._exclusive: set[Any] = set()  # sessions that did not ask for multi-queue

    # -- construction --

    @classmethod
    def create(
        cls,
        name: str,
        tunnel_type: str,
        requested_guid: uuid.UUID | None = None,
        *,
        persistent: bool = False,
        owner: int | None = None,
        group: int | None = None,
    ) -> Adapter:
        """Create a layer-3 TUN adapter in the calling thread's network namespace (WintunCreateAdapter).

        ``requested_guid`` defaults to a random UUID. With ``persistent`` the adapter outlives this
        handle and this process (TUNSETPERSIST) until :func:`delete_driver` or ``ip link del``;
        ``owner``/``group`` (uid/gid) let that user or group attach sessions without CAP_NET_ADMIN.
        When both are omitted the owner is the calling process's effective uid: the kernel lets
        *anyone* attach a queue to a TUN device with neither owner nor group, and every attached queue
        receives a share of the adapter's packets. (``persistent``, ``owner`` and ``group`` are Linux's.)
        Raises InvalidParameter for a bad name or tunnel type, AlreadyExists when the name is taken,
        AccessDenied without CAP_NET_ADMIN, NotFound when /dev/net/tun is missing.
        """
        if requested_guid is None:
            guid = uuid.uuid4()
        elif isinstance(requested_guid, uuid.UUID):
            guid = requested_guid
        else:
            raise InvalidParameter(f"requested_guid must be a uuid.UUID or None, not {requested_guid!r}")
        if owner is not None:
            _uint32("owner uid", owner)
        if group is not None:
            _uint32("group gid", group)
        backend = _backend.platform().create_adapter(
            name, tunnel_type, guid, persistent=bool(persistent), owner=owner, group=group
        )
        return cls(backend)

    @classmethod
    def open(cls, name: str) -> Adapter:
        """Open an adapter created by wiretun, in this or another process, by name or kernel name.

        Raises NotFound when no interface has that name in the calling thread's network namespace, or
        when the interface there was not created by wiretun.
        """
        return cls(_backend.platform().open_adapter(name))

    @classmethod
    def enumerate(cls, tunnel_type: str) -> list[Adapter]:
        """Handles to every wiretun adapter of this tunnel type in the calling thread's namespace.

        The handles do not own the adapters: closing them leaves the adapters in place.
        """
        return [cls(b) for b in _backend.platform().enumerate_adapters(tunnel_type)]

    # -- lifetime --

    def close(self) -> None:
        """Release this handle (WintunCloseAdapter). Ends this handle's sessions first. An adapter this
        handle created is removed, unless it was created persistent. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        for session in sessions:
            try:
                session.end()
            except Exception as exc:  # closing must go on; report it
                from . import log

                log.warn(f"Ending a session of adapter {self._backend.last_name} failed: {exc}")
        with self._lock:
            self._sessions.clear()
            self._exclusive.clear()
        self._backend.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        b = self._backend
        state = "closed" if self._closed else f"luid={b.luid}"
        return f"<wiretun.Adapter {b.last_name!r} type={b.tunnel_type!r} guid={b.guid} {state}>"

    # -- identity (no I/O) --

    @property
    def guid(self) -> uuid.UUID:
        return self._backend.guid

    @property
    def tunnel_type(self) -> str:
        return self._backend.tunnel_type

    @property
    def luid(self) -> int:
        """The adapter's LUID (WintunGetAdapterLUID): on Linux, the interface index."""
        return self._backend.luid

    @property
    def name(self) -> str:
        """The adapter name (up to 127 characters) as created, opened, or last read or set through this
        handle (no system call; :meth:`get_name` asks the OS). Assigning renames (deprecated: :meth:`rename`)."""
        return self._backend.last_name

    @name.setter
    def name(self, new_name: str) -> None:
        _deprecated("assigning Adapter.name", "Adapter.rename(new_name)")
        self.rename(new_name)

    def get_name(self) -> str:
        """The adapter's current name, read from the OS (another process may have renamed it)."""
        self._check_open()
        return self._backend.name()

    def rename(self, new_name: str) -> None:
        """Rename the adapter (Linux: kernel name and altname as the name rules say)."""
        with self._lock:
            self._check_open()
            self._backend.rename(new_name)

    @property
    def kernel_name(self) -> str:
        """The OS's interface name (Linux: at most 15 bytes; what ``ip link`` shows first). Asks the OS."""
        self._check_open()
        return self._backend.kernel_name()

    @property
    def persistent(self) -> bool:
        """Whether the adapter outlives its handles and processes (TUNSETPERSIST). Asks the OS."""
        self._check_open()
        return self._backend.persistent()

    # -- configuration (each asks the OS) --

    def get_mtu(self) -> int:
        self._check_open()
        return self._backend.mtu()

    def set_mtu(self, value: int) -> None:
        self._check_open()
        self._backend.set_mtu(value)

    @property
    def mtu(self) -> int:
        """Deprecated: :meth:`get_mtu` / :meth:`set_mtu` (a property should not do I/O)."""
        _deprecated("Adapter.mtu", "Adapter.get_mtu()")
        return self.get_mtu()

    @mtu.setter
    def mtu(self, value: int) -> None:
        _deprecated("assigning Adapter.mtu", "Adapter.set_mtu(value)")
        self.set_mtu(value)

    def is_up_now(self) -> bool:
        """Whether the interface is administratively up, read from the OS."""
        self._check_open()
        return self._backend.is_up()

    @property
    def is_up(self) -> bool:
        """Deprecated: :meth:`is_up_now` (a property should not do I/O)."""
        _deprecated("Adapter.is_up", "Adapter.is_up_now()")
        return self.is_up_now()

    def up(self) -> None:
        self._check_open()
        self._backend.set_up(True)

    def down(self) -> None:
        self._check_open()
        self._backend.set_up(False)

    def add_address(self, address: str | IPInterface) -> None:
        """Add an IPv4 or IPv6 address with prefix, e.g. ``"10.6.7.7/24"`` (no prefix: a host address)."""
        iface = _interface(address)
        self._check_open()
        self._backend.add_address(iface)

    def remove_address(self, address: str | IPInterface) -> None:
        iface = _interface(address)
        self._check_open()
        self._backend.remove_address(iface)

    def addresses(self) -> list[IPInterface]:
        """The adapter's IPv4 and IPv6 addresses with their prefixes (including IPv6 link-local)."""
        self._check_open()
        return self._backend.addresses()

    def add_route(self, destination: str | ipaddress.IPv4Network | ipaddress.IPv6Network, metric: int | None = None,
                  *, gateway: str | None = None) -> None:
        """Route ``destination`` (e.g. ``"10.0.0.0/8"``) through this adapter; IPv4 routes need it up."""
        net = _network(destination)
        gw = _gateway(gateway, net.version)
        m = _metric(metric)
        self._check_open()
        self._backend.add_route(net, gw, m)

    def remove_route(self, destination: str | ipaddress.IPv4Network | ipaddress.IPv6Network,
                     metric: int | None = None, *, gateway: str | None = None) -> None:
        net = _network(destination)
        gw = _gateway(gateway, net.version)
        m = _metric(metric)
        self._check_open()
        self._backend.remove_route(net, gw, m)

    def routes(self) -> list[Route]:
        """Main-table unicast routes through this adapter: ``Route(destination, gateway, metric)``."""
        self._check_open()
        return self._backend.routes()

    def link_monitor(self) -> LinkMonitor:
        """Link events of this adapter (up/down, MTU, deleted, moved to another namespace): a
        :class:`wiretun._backend.LinkMonitor` with a descriptor to wait on. Close it when done."""
        self._check_open()
        return self._backend.link_monitor()

    # -- sessions --

    def start_session(
        self,
        capacity: int = 0x400000,
        *,
        multi_queue: bool = False,
        offload: bool = False,
        capture: str | os.PathLike[str] | BinaryIO | None = None,
    ) -> Session:
        """Start a session with a ring of ``capacity`` bytes (WintunStartSession); see :class:`Session`."""
        from .session import Session

        return Session(self, capacity, multi_queue=multi_queue, offload=offload, capture=capture)

    def _register_session(self, session: Any, multi_queue: bool) -> None:
        """Called by Session. Busy when this handle already has a session and either side wants the
        adapter to itself (Wintun allows one session per adapter; multi-queue is wiretun's extension)."""
        with self._lock:
            self._check_open()
            if self._sessions and (not multi_queue or self._exclusive):
                raise Busy(f"adapter {self._backend.last_name} already has a session")
            self._sessions.add(session)
            if not multi_queue:
                self._exclusive.add(session)

    def _unregister_session(self, session: Any) -> None:
        with self._lock:
            self._sessions.discard(session)
            self._exclusive.discard(session)

    # -- helpers --

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidParameter(f"adapter handle {self._backend.last_name!r} is closed")


# --- driver-level calls ------------------------------------------------------------------------------


def get_running_driver_version() -> int:
    """The driver's version as Wintun encodes it, ``(major << 16) | minor`` (WintunGetRunningDriverVersion).

    On Linux: the TUN driver's, read with the ethtool driver-info ioctl from a TUN device in the calling
    thread's network namespace (when there is none, a short-lived one is made for the question). Raises
    NotFound when /dev/net/tun is missing.
    """
    return _backend.platform().get_running_driver_version()


def delete_driver() -> int:
    """Remove wiretun's persistent adapters that no process has attached (WintunDeleteDriver).

    Linux has no driver to unload, so this removes, in the calling thread's network namespace, every
    TUN interface whose alias carries wiretun's marker, that is persistent, and that has no queue open
    in any process (neither attached nor detached). Adapters in use and interfaces not created by
    wiretun are left alone. Returns how many adapters were removed; raises AccessDenied without
    CAP_NET_ADMIN.
    """
    return _backend.platform().delete_driver()
