"""Adapters: Wintun's WintunCreateAdapter / OpenAdapter / CloseAdapter / GetAdapterLUID on Linux.

An adapter is a layer-3 TUN interface. Its identity lives in the kernel, so any process can read it
while the interface exists:

* **Name.** Wintun names may hold up to 127 characters; Linux kernel names only 15 bytes. A name that
  is a valid kernel name (printable ASCII, at most 15 bytes, no ``:``, not ``.`` or ``..``) *is* the
  kernel name. Any other valid name becomes an *altname* of the interface (the kernel keeps up to 127
  bytes there) and the kernel name is derived from it: ``wt`` + 13 hex digits of a SHA-256 of the
  name. ``Adapter.open`` finds an adapter by either name.
* **Tunnel type and GUID** are recorded in the interface alias (``IFLA_IFALIAS``) as
  ``wiretun/1 <guid> <tunnel type>``: the marker ``wiretun/1``, one space, the GUID in canonical
  lowercase form, one space, then the tunnel type verbatim (it may contain spaces). An interface whose
  alias does not have this form was not created by wiretun and cannot be opened as an adapter.
* **LUID** is the interface index.

Names must be 1..127 characters whose UTF-8 encoding fits in 127 bytes (the altname limit), and may
not contain ``/``, NUL, whitespace or other non-printable characters. Tunnel types follow the same
length rules and must be printable (spaces allowed).

The adapter keeps one detached TUN queue open as the device's lifetime anchor: the kernel removes a
non-persistent device when its last queue closes, so an adapter disappears when the handle that created
it is closed and also when the creating process dies, even by SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from . import log
from .errors import (
    AccessDenied,
    AlreadyExists,
    Busy,
    EndOfFile,
    InvalidData,
    InvalidParameter,
    NotFound,
    NotSupported,
    WintunError,
)
from .linux import netlink, tun
from .linux.links import LinkMonitor

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Adapter", "Route", "get_running_driver_version", "delete_driver"]

MAX_NAME_CHARS = 127  # Wintun: MAX_ADAPTER_NAME - 1
MAX_NAME_BYTES = netlink.ALTIFNAMSIZ - 1  # UTF-8 bytes an altname can hold
MAX_KERNEL_NAME_BYTES = netlink.IFNAMSIZ - 1
MAX_TUNNEL_TYPE_CHARS = 127
MAX_TUNNEL_TYPE_BYTES = 127  # keeps the whole alias far below IFALIASZ
ALIAS_MARKER = "wiretun/1"
DERIVED_PREFIX = "wt"
_DERIVE_ATTEMPTS = 16
MIN_MTU = 68  # the TUN driver's limits
MAX_MTU = 65535
_MAX_U32 = 0xFFFFFFFF

Route = netlink.RouteEntry
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

T = TypeVar("T")


# --- names, tunnel types, alias, version: pure -------------------------------------------------


def _show(value: str, limit: int = 40) -> str:
    """repr() of a possibly long user string, shortened for messages."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


def _check_text(kind: str, value: object, max_chars: int, max_bytes: int, *, allow_space: bool) -> str:
    if not isinstance(value, str):
        raise InvalidParameter(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidParameter(f"{kind} must not be empty")
    if len(value) > max_chars:
        raise InvalidParameter(f"{kind} {_show(value)} is {len(value)} characters long; the limit is {max_chars}")
    for ch in value:
        if ch == "\0":
            raise InvalidParameter(f"{kind} {_show(value)} contains a NUL character")
        if ch == "/" and not allow_space:
            raise InvalidParameter(f"{kind} {_show(value)} contains '/'")
        if ch.isspace() and not (allow_space and ch == " "):
            raise InvalidParameter(f"{kind} {_show(value)} contains whitespace (U+{ord(ch):04X})")
        if not ch.isprintable():
            raise InvalidParameter(f"{kind} {_show(value)} contains a non-printable character (U+{ord(ch):04X})")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidParameter(f"{kind} {_show(value)} is {size} bytes in UTF-8; the limit is {max_bytes} bytes")
    return value


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name, else raise InvalidParameter saying why."""
    return _check_text("adapter name", name, MAX_NAME_CHARS, MAX_NAME_BYTES, allow_space=False)


def validate_tunnel_type(tunnel_type: object) -> str:
    """Return ``tunnel_type`` if valid (1..127 printable characters, at most 127 UTF-8 bytes)."""
    return _check_text("tunnel type", tunnel_type, MAX_TUNNEL_TYPE_CHARS, MAX_TUNNEL_TYPE_BYTES, allow_space=True)


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


def wintun_name(link: netlink.Link) -> str:
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


# --- errors ----------------------------------------------------------------------------------------


def _error(exc: OSError, what: str) -> WintunError:
    """Map a kernel errno to the WintunError a Wintun caller would switch on."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code == errno.EACCES and exc.filename == tun.CLONE_DEVICE:  # the node's mode, not the adapter's owner
        return AccessDenied(f"{what}: {tun.clone_device_refusal()}")
    if code == errno.EACCES and exc.filename == tun.CLONE_DEVICE:  # the node's mode, not the adapter's owner
        return AccessDenied(f"{what}: {tun.clone_device_refusal()}")
    if code in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{what}: {reason} (needs CAP_NET_ADMIN, or to be the adapter's owner)")
    if code in (errno.EEXIST, errno.EBUSY):
        return AlreadyExists(f"{what}: {reason}")
    if code in (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENXIO):
        return NotFound(f"{what}: {reason}")
    if code in (errno.EINVAL, errno.ERANGE, errno.EAFNOSUPPORT, errno.ENETUNREACH):
        return InvalidParameter(f"{what}: {reason}")
    if code == errno.ENETDOWN:
        return InvalidParameter(f"{what}: the adapter is down; bring it up first")
    if code in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
        return NotSupported(f"{what}: {reason}")
    return WintunError(f"{what}: {reason} (errno {code})")


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
        gw = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidParameter(f"invalid gateway {value!r}: {exc}") from None
    if gw.version != version:
        raise InvalidParameter(f"gateway {gw} is IPv{gw.version} but the destination is IPv{version}")
    return gw


def _metric(value: object) -> int | None:
    return None if value is None else _uint32("route metric", value)


def _require_tun_device() -> None:
    if not os.path.exists(tun.CLONE_DEVICE):
        raise NotFound(f"{tun.CLONE_DEVICE} is missing: the TUN driver is not loaded")


# --- the adapter -------------------------------------------------------------------------------------


class _Resources:
    """The file descriptors an adapter handle holds; released by close() or by garbage collection."""

    def __init__(self, ns: netlink.Namespace, anchor: int | None) -> None:
        self.ns = ns
        self.anchor = anchor

    def close_anchor(self) -> None:
        fd, self.anchor = self.anchor, None
        if fd is not None:
            os.close(fd)

    def release(self) -> None:
        self.close_anchor()
        self.ns.close()


class Adapter:
    """A wiretun adapter handle (WINTUN_ADAPTER_HANDLE). Get one from :meth:`create`, :meth:`open`
    or :meth:`enumerate`; release it with :meth:`close` or a ``with`` block."""

    def __init__(
        self,
        *,
        _ns: netlink.Namespace,
        _index: int,
        _guid: uuid.UUID,
        _tunnel_type: str,
        _name: str,
        _anchor: int | None = None,
        _persistent: bool = False,
    ) -> None:
        self._res = _Resources(_ns, _anchor)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._index = _index
        self._guid = _guid
        self._tunnel_type = _tunnel_type
        self._last_name = _name
        self._owned = _anchor is not None  # this handle created the adapter
        self._keep = _persistent
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
        receives a share of the adapter's packets.
        Raises InvalidParameter for a bad name or tunnel type, AlreadyExists when the name is taken,
        AccessDenied without CAP_NET_ADMIN, NotFound when /dev/net/tun is missing.
        """
        validate_name(name)
        validate_tunnel_type(tunnel_type)
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
        if owner is None and group is None:
            owner = os.geteuid()
        _require_tun_device()
        ns = netlink.Namespace()
        try:
            index, kernel_name, anchor = ns.call(
                _create_link, name, guid, tunnel_type, bool(persistent), owner, group
            )
        except BaseException:
            ns.close()
            raise
        adapter = cls(
            _ns=ns,
            _index=index,
            _guid=guid,
            _tunnel_type=tunnel_type,
            _name=name,
            _anchor=anchor,
            _persistent=bool(persistent),
        )
        extra = f", kernel name {kernel_name}" if kernel_name != name else ""
        extra += ", persistent" if persistent else ""
        log.info(f"Created adapter {name} (tunnel type {tunnel_type}, GUID {guid}, index {index}{extra})")
        return adapter

    @classmethod
    def open(cls, name: str) -> Adapter:
        """Open an adapter created by wiretun, in this or another process, by name or kernel name.

        Raises NotFound when no interface has that name in the calling thread's network namespace, or
        when the interface there was not created by wiretun.
        """
        validate_name(name)
        ns = netlink.Namespace()
        try:
            link = ns.call(_lookup, name)
            if link is None:
                raise NotFound(f"no adapter named {_show(name)} in this network namespace")
            ident = decode_alias(link.alias) if link.kind == "tun" else None
            if ident is None:
                raise NotFound(
                    f"interface {_show(name)} exists but is not a wiretun adapter "
                    f"(kind {link.kind or 'unknown'}, alias {link.alias!r} lacks the {ALIAS_MARKER!r} marker)"
                )
        except BaseException:
            ns.close()
            raise
        adapter = cls(_ns=ns, _index=link.index, _guid=ident[0], _tunnel_type=ident[1], _name=wintun_name(link))
        log.info(f"Opened adapter {adapter._last_name} (tunnel type {ident[1]}, index {link.index})")
        return adapter

    @classmethod
    def enumerate(cls, tunnel_type: str) -> list[Adapter]:
        """Handles to every wiretun adapter of this tunnel type in the calling thread's namespace.

        The handles do not own the adapters: closing them leaves the adapters in place.
        """
        validate_tunnel_type(tunnel_type)
        ns = netlink.Namespace()
        try:
            links = ns.call(netlink.list_links)
        except OSError as exc:
            raise _error(exc, "cannot list interfaces") from None
        finally:
            ns.close()
        found = []
        for link in links:
            ident = decode_alias(link.alias) if link.kind == "tun" else None
            if ident is not None and ident[1] == tunnel_type:
                found.append(
                    cls(_ns=netlink.Namespace(), _index=link.index, _guid=ident[0], _tunnel_type=ident[1],
                        _name=wintun_name(link))
                )
        return found

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
                log.warn(f"Ending a session of adapter {self._last_name} failed: {exc}")
        with self._lock:
            self._sessions.clear()
            self._exclusive.clear()
        res = self._res
        try:
            if self._owned and not self._keep:
                res.close_anchor()  # the kernel removes the device when its last queue closes
                try:
                    link = res.ns.call(netlink.get_link, index=self._index)
                    if link is not None and self._is_ours(link):
                        # Other processes still hold queues: remove it anyway, as Wintun does.
                        res.ns.call(netlink.delete_link, self._index)
                except OSError as exc:
                    if exc.errno != errno.ENODEV:
                        log.warn(f"Removing adapter {self._last_name} failed: {exc.strerror or exc}")
                log.info(f"Removed adapter {self._last_name}")
            elif self._owned:
                log.info(f"Closed adapter {self._last_name} (kept: persistent)")
            else:
                log.info(f"Closed adapter {self._last_name}")
        finally:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"index={self._index}"
        return f"<wiretun.Adapter {self._last_name!r} type={self._tunnel_type!r} guid={self._guid} {state}>"

    # -- identity --

    @property
    def guid(self) -> uuid.UUID:
        return self._guid

    @property
    def tunnel_type(self) -> str:
        return self._tunnel_type

    @property
    def luid(self) -> int:
        """The adapter's LUID (WintunGetAdapterLUID): on Linux, the interface index."""
        return self._index

    @property
    def name(self) -> str:
        """The adapter name (up to 127 characters). Assigning renames the adapter."""
        self._last_name = wintun_name(self._link())
        return self._last_name

    @name.setter
    def name(self, new_name: str) -> None:
        validate_name(new_name)
        with self._lock:
            self._check_open()
            old = self.name
            if new_name == old:
                return
            self._call(_rename_link, f"cannot rename adapter {old} to {_show(new_name)}", self._index, old, new_name)
            self._last_name = new_name
        log.info(f"Renamed adapter {old} to {new_name}")

    @property
    def kernel_name(self) -> str:
        """The kernel's interface name (at most 15 bytes; what ``ip link`` shows first)."""
        return self._link().name

    @property
    def persistent(self) -> bool:
        """Whether the adapter outlives its handles and processes (TUNSETPERSIST)."""
        info = self._link().tun
        return bool(info and info.persist)

    # -- configuration --

    @property
    def mtu(self) -> int:
        return self._link().mtu

    @mtu.setter
    def mtu(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not MIN_MTU <= value <= MAX_MTU:
            raise InvalidParameter(f"MTU {value!r} is out of range {MIN_MTU}..{MAX_MTU}")
        self._call(netlink.set_mtu, f"cannot set MTU {value} on adapter {self._last_name}", self._index, value)

    @property
    def is_up(self) -> bool:
        """Whether the interface is administratively up."""
        return self._link().is_up

    def up(self) -> None:
        self._call(netlink.set_up, f"cannot bring adapter {self._last_name} up", self._index, True)

    def down(self) -> None:
        self._call(netlink.set_up, f"cannot bring adapter {self._last_name} down", self._index, False)

    def add_address(self, address: str | IPInterface) -> None:
        """Add an IPv4 or IPv6 address with prefix, e.g. ``"10.6.7.7/24"`` (no prefix: a host address)."""
        iface = _interface(address)
        self._call(netlink.add_address, f"cannot add address {iface} to adapter {self._last_name}", self._index, iface)

    def remove_address(self, address: str | IPInterface) -> None:
        iface = _interface(address)
        self._call(
            netlink.del_address, f"cannot remove address {iface} from adapter {self._last_name}", self._index, iface
        )

    def addresses(self) -> list[IPInterface]:
        """The adapter's IPv4 and IPv6 addresses with their prefixes (including IPv6 link-local)."""
        return self._call(netlink.addresses, f"cannot read addresses of adapter {self._last_name}", self._index)

    def add_route(self, destination: str | ipaddress.IPv4Network | ipaddress.IPv6Network, metric: int | None = None,
                  *, gateway: str | None = None) -> None:
        """Route ``destination`` (e.g. ``"10.0.0.0/8"``) through this adapter; IPv4 routes need it up."""
        net = _network(destination)
        gw = _gateway(gateway, net.version)
        self._call(
            netlink.add_route, f"cannot add route {net} via adapter {self._last_name}",
            self._index, net, gw, _metric(metric),
        )

    def remove_route(self, destination: str | ipaddress.IPv4Network | ipaddress.IPv6Network,
                     metric: int | None = None, *, gateway: str | None = None) -> None:
        net = _network(destination)
        gw = _gateway(gateway, net.version)
        self._call(
            netlink.del_route, f"cannot remove route {net} via adapter {self._last_name}",
            self._index, net, gw, _metric(metric),
        )

    def routes(self) -> list[Route]:
        """Main-table unicast routes through this adapter: ``Route(destination, gateway, metric)``."""
        return self._call(netlink.routes, f"cannot read routes of adapter {self._last_name}", self._index)

    # -- link events --

    def link_monitor(self) -> LinkMonitor:
        """Link events of this adapter (up/down, MTU, deleted, moved to another namespace): a
        :class:`wiretun.linux.links.LinkMonitor` with a descriptor to wait on. Close it when done."""
        self._check_open()
        fd = self._res.anchor
        opened = None
        if fd is None:  # a handle that did not create the adapter: a detached queue of its own
            fd = opened = self._open_queue()
        try:
            if opened is not None:
                tun.detach_queue(opened)
            return LinkMonitor(fd, self._index, self._res.ns)
        except OSError as exc:
            raise _error(exc, f"cannot watch link events of adapter {self._last_name}") from None
        finally:
            if opened is not None:
                os.close(opened)

    # -- sessions --

    def start_session(self, capacity: int = 0x400000, **options: Any) -> Session:
        """Start a session with a ring of ``capacity`` bytes (WintunStartSession)."""
        from .session import Session

        return Session(self, capacity, **options)

    def _register_session(self, session: Any, multi_queue: bool | None = None) -> None:
        """Called by Session. Busy when this handle already has a session and either side wants the
        adapter to itself (Wintun allows one session per adapter; multi-queue is wiretun's extension)."""
        if multi_queue is None:
            multi_queue = bool(getattr(session, "multi_queue", False))
        with self._lock:
            self._check_open()
            if self._sessions and (not multi_queue or self._exclusive):
                raise Busy(f"adapter {self._last_name} already has a session")
            self._sessions.add(session)
            if not multi_queue:
                self._exclusive.add(session)

    def _unregister_session(self, session: Any) -> None:
        with self._lock:
            self._sessions.discard(session)
            self._exclusive.discard(session)

    def _attached_queues(self) -> int:
        """How many TUN queues are attached now, by any process (IFLA_TUN_NUM_QUEUES)."""
        info = self._link().tun
        return info.num_queues if info else 0

    def _open_queue(self, *, nonblock: bool = True) -> int:
        """Attach a new TUN queue to this adapter and return its fd, in the adapter's network namespace
        whichever thread calls (the kernel resolves the name in the opening thread's namespace)."""
        self._check_open()

        def attach() -> int:
            link = netlink.get_link(index=self._index)
            if link is None:
                raise OSError(errno.ENODEV, "the adapter no longer exists")
            return tun.open_queue(link.name, nonblock=nonblock)

        return self._call(attach, f"cannot attach a queue to adapter {self._last_name}")

    # -- helpers --

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidParameter(f"adapter handle {self._last_name!r} is closed")

    def _call(self, fn: Callable[..., T], what: str, *args: Any) -> T:
        self._check_open()
        try:
            return self._res.ns.call(fn, *args)
        except OSError as exc:
            raise _error(exc, what) from None

    def _link(self) -> netlink.Link:
        link = self._call(_get_by_index, f"cannot read adapter {self._last_name}", self._index)
        if link is None or not self._is_ours(link):
            raise EndOfFile(f"adapter {self._last_name} no longer exists")
        return link

    def _is_ours(self, link: netlink.Link) -> bool:
        ident = decode_alias(link.alias) if link.kind == "tun" else None
        return ident is not None and ident[0] == self._guid


# --- work done inside the adapter's namespace ----------------------------------------------------------


def _get_by_index(index: int) -> netlink.Link | None:
    return netlink.get_link(index=index)


def _lookup(name: str) -> netlink.Link | None:
    try:
        return netlink.get_link(name=name)
    except OSError as exc:
        raise _error(exc, f"cannot look up {_show(name)}") from None


def _free_kernel_name(name: str) -> Iterable[str]:
    if is_kernel_name(name):
        yield name
        return
    for attempt in range(_DERIVE_ATTEMPTS):
        candidate = derived_kernel_name(name, attempt)
        if netlink.get_link(name=candidate) is None:
            yield candidate


def _create_link(
    name: str, guid: uuid.UUID, tunnel_type: str, persistent: bool, owner: int | None, group: int | None
) -> tuple[int, str, int]:
    """Create the device; returns (ifindex, kernel name, detached anchor fd)."""
    if _lookup(name) is not None:
        raise AlreadyExists(f"the name {_show(name)} is already taken by an interface in this network namespace")
    fd = None
    kernel_name = None
    for candidate in _free_kernel_name(name):
        try:
            fd = tun.open_queue(candidate, create=True)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                if candidate != name:
                    continue  # taken meanwhile: try the next derived name
                raise AlreadyExists(f"the name {_show(name)} is already taken in this network namespace") from None
            raise _error(exc, f"cannot create adapter {_show(name)}") from None
        kernel_name = candidate
        break
    if fd is None or kernel_name is None:
        raise AlreadyExists(f"no free kernel name for adapter {_show(name)} after {_DERIVE_ATTEMPTS} attempts")
    index = None
    try:
        link = netlink.get_link(name=kernel_name)
        if link is None:
            raise OSError(errno.ENODEV, "the new device vanished")
        index = link.index
        if owner is not None:
            tun.set_owner(fd, owner)
        if group is not None:
            tun.set_group(fd, group)
        netlink.set_alias(index, encode_alias(guid, tunnel_type))
        if kernel_name != name:
            netlink.add_altname(index, name)
        if persistent:
            tun.set_persist(fd, True)
        # A detached queue gets no packets but keeps a non-persistent device alive while open.
        tun.detach_queue(fd)
    except BaseException as exc:
        os.close(fd)  # removes the device unless it was made persistent
        if persistent and index is not None:
            try:
                netlink.delete_link(index)
            except OSError:
                pass
        if isinstance(exc, OSError):
            if exc.errno == errno.EEXIST:
                raise AlreadyExists(f"the name {_show(name)} is already taken in this network namespace") from None
            raise _error(exc, f"cannot create adapter {_show(name)}") from None
        raise
    return index, kernel_name, fd


def _rename_link(index: int, old: str, new: str) -> None:
    """Give the adapter ``index`` the name ``new``: kernel name and altname as the name rules say."""
    other = netlink.get_link(name=new)
    if other is not None and other.index != index:
        raise AlreadyExists(f"the name {_show(new)} is already taken by interface {other.name}")
    link = netlink.get_link(index=index)
    if link is None:
        raise OSError(errno.ENODEV, "the adapter no longer exists")
    if is_kernel_name(new):
        target = new
    elif is_derived_kernel_name(link.name, new):
        target = link.name
    else:
        target = next(iter(_free_kernel_name(new)), None)
        if target is None:
            raise AlreadyExists(f"no free kernel name for {_show(new)}")
    old_alt = old if old != link.name and old in link.altnames else None
    undo: list[Callable[[], None]] = []
    try:
        if old_alt is not None:
            netlink.del_altname(index, old_alt)
            undo.append(lambda: netlink.add_altname(index, old_alt))
        if target != link.name:
            netlink.rename(index, target)
            undo.append(lambda: netlink.rename(index, link.name))
        if target != new:
            netlink.add_altname(index, new)
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except OSError:
                pass
        raise


# --- driver-level calls ------------------------------------------------------------------------------


def get_running_driver_version() -> int:
    """The TUN driver's version as Wintun encodes it, ``(major << 16) | minor`` (WintunGetRunningDriverVersion).

    Read with the ethtool driver-info ioctl from a TUN device in the calling thread's network
    namespace; when there is none, a short-lived one is created for the question and removed at once.
    Raises NotFound when /dev/net/tun is missing.
    """
    _require_tun_device()
    ns = netlink.Namespace()
    try:
        version = ns.call(_driver_version_here)
    finally:
        ns.close()
    return parse_driver_version(version)


def _driver_version_here() -> str:
    try:
        links = netlink.list_links()
    except OSError as exc:
        raise _error(exc, "cannot list interfaces") from None
    for link in links:
        if link.kind != "tun":
            continue
        try:
            driver, version = tun.driver_info(link.name)
        except OSError:
            continue  # it went away meanwhile
        if driver == "tun":
            return version
    probe = f"wtver{os.urandom(4).hex()}"
    try:
        fd = tun.open_queue(probe, create=True)
    except OSError as exc:
        raise _error(exc, "no TUN device to ask for the driver version, and cannot create one") from None
    try:
        return tun.driver_info(probe)[1]
    except OSError as exc:
        raise _error(exc, "cannot read the TUN driver version") from None
    finally:
        os.close(fd)  # not persistent: the probe device goes with its only queue


def delete_driver() -> int:
    """Remove wiretun's persistent adapters that no process has attached (WintunDeleteDriver).

    Linux has no driver to unload, so this removes, in the calling thread's network namespace, every
    TUN interface whose alias carries wiretun's marker, that is persistent, and that has no queue open
    in any process (neither attached nor detached). Adapters in use and interfaces not created by
    wiretun are left alone. Returns how many adapters were removed; raises AccessDenied without
    CAP_NET_ADMIN.
    """
    ns = netlink.Namespace()
    try:
        return ns.call(_delete_idle_persistent)
    finally:
        ns.close()


def _delete_idle_persistent() -> int:
    try:
        links = netlink.list_links()
    except OSError as exc:
        raise _error(exc, "cannot list interfaces") from None
    removed = 0
    for link in links:
        info = link.tun
        if link.kind != "tun" or info is None or decode_alias(link.alias) is None:
            continue
        if not info.persist or info.num_queues or info.num_disabled_queues:
            continue
        try:
            netlink.delete_link(link.index)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                continue  # someone else removed it meanwhile
            raise _error(exc, f"cannot remove adapter {wintun_name(link)}") from None
        removed += 1
        log.info(f"Removed persistent adapter {wintun_name(link)}")
    return removed
