"""The seam between wiretun's portable layer and an operating system: what every backend implements.

The portable modules (:mod:`wiretun.adapter`, :mod:`wiretun.session`, :mod:`wiretun.aio`,
:mod:`wiretun.capture`) know nothing of any platform. They talk to a backend through the three
interfaces below, shaped at the level of Wintun's own calls so that both backends fit:

* on Linux (:mod:`wiretun.linux`) the session backend drives two rings of :mod:`wiretun.ring` over a TUN
  queue of its own (readv/writev, an epoll descriptor as the wait handle);
* on Windows (``wiretun.windows``) wintun.dll owns the rings and the per-packet state; the session
  backend is a thin binding of WintunReceivePacket / ReleaseReceivePacket / AllocateSendPacket /
  SendPacket and the read-wait event HANDLE.

The backend is chosen at one point, :func:`platform`, by ``sys.platform``. docs/architecture.md spells
the interface out.
"""

from __future__ import annotations

import enum
import importlib
import ipaddress
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from .errors import NotSupported

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

Recorder = Callable[[Sequence[Any]], None]
"""What a session backend calls with the packets it hands out (received) and writes (sent), in order,
when the session records a capture file; None when it does not."""


@dataclass(frozen=True)
class Route:
    """A unicast route through an adapter (main table)."""

    destination: IPNetwork
    gateway: IPAddress | None
    metric: int


class LinkEventKind(enum.Enum):
    UP = "up"  # administratively up
    DOWN = "down"
    MTU = "mtu"  # the MTU changed (``LinkEvent.mtu``)
    DELETED = "deleted"  # the interface is gone
    MOVED = "moved"  # moved to another network namespace (not a deletion: it lives on elsewhere)


@dataclass(frozen=True)
class LinkEvent:
    kind: LinkEventKind
    mtu: int | None = None


class LinkStatus(Protocol):
    """What a link monitor last knew of its interface (no I/O)."""

    @property
    def index(self) -> int:
        """The interface index (it may change when the interface moves to another namespace)."""
        ...

    @property
    def name(self) -> str:
        """The OS's interface name."""
        ...

    @property
    def up(self) -> bool: ...

    @property
    def mtu(self) -> int: ...


class LinkMonitor(Protocol):
    """Link events of one adapter, from the backend (Linux: rtnetlink; Windows: NotifyIpInterfaceChange)."""

    @property
    def state(self) -> LinkStatus:
        """The interface's state as of the last event (read when the monitor was made, then updated)."""
        ...

    def fileno(self) -> int:
        """A descriptor readable when events may be waiting (for select/epoll/``loop.add_reader``)."""
        ...

    def read_events(self) -> list[LinkEvent]:
        """The events that arrived, oldest first, without blocking (an empty list when none). When the
        backend lost events (a full socket buffer), it reads the link's state and reports that instead."""
        ...

    def close(self) -> None: ...


class SessionBackend(Protocol):
    """One session's per-packet engine: Wintun's session calls, none of which blocks.

    Thread-safe. After :meth:`end` (or when the adapter went away) receive and allocate raise EndOfFile,
    release and send do nothing (the packet is discarded, as WintunSendPacket after the end), the wait
    handles stay valid and readable until the object is garbage-collected."""

    @property
    def ended(self) -> bool: ...

    @property
    def offloads(self) -> int:
        """Offload flags in effect (Linux ``TUN_F_*``; 0 without offloads or on Windows)."""
        ...

    selectable: bool
    """Whether the wait handles can go into ``select`` / ``loop.add_reader`` (Linux: descriptors). False for
    Windows' event HANDLEs: asyncio then waits on :meth:`wait` in a worker thread."""

    receive_dropped: int  # packets the backend dropped because the receive ring was full
    send_dropped: int  # packets the kernel rejected

    def receive_packet(self) -> memoryview | None:
        """WintunReceivePacket: the next packet (a view into the ring, valid until released) or None
        when none is waiting."""
        ...

    def receive_packets(self, max_count: int, headers: list[Any] | None = None) -> list[memoryview]:
        """Up to ``max_count`` packets (``max_count`` >= 1, checked by the caller); with a list for
        ``headers``, one 10-byte virtio-net header per packet is appended."""
        ...

    def release_receive_packet(self, packet: memoryview) -> None:
        """WintunReleaseReceivePacket, in any order; the view is released."""
        ...

    def release_receive_packets(self, packets: list[memoryview]) -> None: ...

    def packet_header(self, packet: memoryview) -> Any:
        """The virtio-net header of a received, unreleased packet (:class:`wiretun.offload.VirtioNetHeader`)."""
        ...

    def allocate_send_packet(self, size: int) -> memoryview:
        """WintunAllocateSendPacket: a writable view of ``size`` bytes; BufferOverflow when full."""
        ...

    def send_packet(self, packet: memoryview, header: Any = None) -> None:
        """WintunSendPacket: the allocated packet leaves after every earlier allocation."""
        ...

    def send_packets(self, packets: Sequence[Any], headers: Sequence[Any] | None = None) -> int:
        """Allocate + copy + send for each packet in order; returns how many were taken."""
        ...

    def read_wait_handle(self) -> int:
        """WintunGetReadWaitEvent: signalled (readable) when packets may be waiting or the session ended."""
        ...

    def wait(self, timeout: float | None) -> bool:
        """Sleep on the read-wait handle; False after ``timeout`` seconds (None: no limit)."""
        ...

    @property
    def send_stalled(self) -> bool:
        """Packets are queued because the OS refused writes for now (Linux: EAGAIN/ENOBUFS); always False
        where the driver drains the ring itself (Windows)."""
        ...

    def write_wait_handle(self) -> int | None:
        """A descriptor writable when the OS takes writes again (None where :attr:`send_stalled` is never
        True)."""
        ...

    def end_wait_handle(self) -> int:
        """A descriptor that becomes readable, and stays so, when the session ends."""
        ...

    def end(self) -> None:
        """WintunEndSession: wake every waiter, free the rings; idempotent."""
        ...


class AdapterBackend(Protocol):
    """One adapter handle (WINTUN_ADAPTER_HANDLE) on a platform. Methods that ask the OS are methods,
    not properties; failures are WintunError subclasses."""

    guid: uuid.UUID
    tunnel_type: str
    last_name: str  # the name as last read or set through this handle (no I/O)

    @property
    def luid(self) -> int:
        """WintunGetAdapterLUID (Linux: the interface index)."""
        ...

    def name(self) -> str: ...

    def kernel_name(self) -> str:
        """The OS's own interface name (Linux: at most 15 bytes; Windows: the adapter name)."""
        ...

    def rename(self, new_name: str) -> None: ...

    def persistent(self) -> bool: ...

    def mtu(self) -> int: ...

    def set_mtu(self, value: int) -> None: ...

    def is_up(self) -> bool: ...

    def set_up(self, up: bool) -> None: ...

    def add_address(self, iface: IPInterface) -> None: ...

    def remove_address(self, iface: IPInterface) -> None: ...

    def addresses(self) -> list[IPInterface]: ...

    def add_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None: ...

    def remove_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None: ...

    def routes(self) -> list[Route]: ...

    def link_monitor(self) -> LinkMonitor:
        """Link events of this adapter (up/down, MTU, deleted, moved to another namespace)."""
        ...

    def start_session(self, capacity: int, *, multi_queue: bool, offload: bool,
                      record: Recorder | None) -> SessionBackend:
        """WintunStartSession. Busy when the adapter has a session (in any process) and not both sides
        asked for ``multi_queue``; NotSupported for options the platform lacks."""
        ...

    def close(self) -> None:
        """WintunCloseAdapter: an adapter this handle created goes away (unless persistent)."""
        ...


class Platform(Protocol):
    """The module-level calls of a backend package (``wiretun.linux``, ``wiretun.windows``)."""

    def create_adapter(self, name: str, tunnel_type: str, guid: uuid.UUID, *, persistent: bool,
                       owner: int | None, group: int | None) -> AdapterBackend: ...

    def open_adapter(self, name: str) -> AdapterBackend: ...

    def enumerate_adapters(self, tunnel_type: str) -> Sequence[AdapterBackend]: ...

    def get_running_driver_version(self) -> int: ...

    def delete_driver(self) -> int: ...


BACKENDS = {"linux": "wiretun.linux", "win32": "wiretun.windows"}
"""``sys.platform`` -> the backend package that implements :class:`Platform` there."""

_platform: Platform | None = None


def platform() -> Platform:
    """The backend of this platform, imported on first use; NotSupported where there is none."""
    global _platform
    if _platform is None:
        module = BACKENDS.get(sys.platform)
        if module is None:
            raise NotSupported(f"wiretun has no backend for this platform ({sys.platform}); it runs on "
                               f"{' and '.join(sorted(BACKENDS))}")
        try:
            loaded: Any = importlib.import_module(module)
        except ImportError as exc:
            raise NotSupported(f"the {sys.platform} backend ({module}) cannot be loaded: {exc}") from exc
        _platform = loaded
    return _platform
