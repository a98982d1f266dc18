"""The Linux adapter backend: TUN devices through /dev/net/tun ioctls and rtnetlink.

Implements :class:`wiretun._backend.AdapterBackend` and the platform functions of
:class:`wiretun._backend.Platform`. Names, alias and GUID coding: :mod:`wiretun.linux.names`. The LUID
is the interface index.

The adapter keeps one detached TUN queue open as the device's lifetime anchor: the kernel removes a
non-persistent device when its last queue closes, so an adapter disappears when the handle that created
it is closed and also when the creating process dies, even by SIGKILL.

**One session per adapter, across processes.** A session takes an ``flock`` on
``/run/wiretun/<netns inode>-<ifindex>.lock`` (shared for ``multi_queue=True``, exclusive otherwise,
never waiting): a second session is Busy whichever side comes second unless both asked to share. The
kernel drops the lock when the holder's descriptor closes, also on kill -9, so no stale marker can
block a later session. The last session to end removes the file (after SIGKILL the empty file stays
until the adapter's next session, as a UAPI socket file does). Programs other than wiretun that attach
queues to the device do not take the lock and are outside this rule (an exclusive session still refuses
to start while any queue is attached). Where the directory cannot be made (no permission), only that
queue check remains.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
import weakref
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .. import log
from .._backend import IPAddress, IPInterface, IPNetwork, LinkMonitor, Recorder, Route
from ..errors import AlreadyExists, Busy, EndOfFile, InvalidParameter, NotFound
from . import links, netlink, tun
from .errors import os_error
from .names import (
    _DERIVE_ATTEMPTS,
    ALIAS_MARKER,
    MAX_MTU,
    MIN_MTU,
    _show,
    decode_alias,
    derived_kernel_name,
    encode_alias,
    is_derived_kernel_name,
    is_kernel_name,
    parse_driver_version,
    validate_name,
    validate_tunnel_type,
    wintun_name,
)
from .session import LinuxSession

T = TypeVar("T")

LOCK_DIRECTORY = "/run/wiretun"
_THREAD_NETNS = "/proc/thread-self/ns/net"


def _require_tun_device() -> None:
    if not os.path.exists(tun.CLONE_DEVICE):
        raise NotFound(f"{tun.CLONE_DEVICE} is missing: the TUN driver is not loaded")


class SessionClaim:
    """A session's hold on its adapter across processes: an flock on the adapter's lock file.

    The last holder removes the file as it lets go (so sessions leave nothing behind; only a process
    killed by SIGKILL leaves its file, which the next session of that adapter reuses). A claimer checks
    after locking that the path still names the file it locked, so a removal racing with it is harmless.
    """

    __slots__ = ("_fd", "_path")

    def __init__(self, fd: int, path: str = "") -> None:
        self._fd = fd
        self._path = path

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if self._path:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no other session shares it
                except OSError:
                    pass
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(self._path)
        finally:
            os.close(fd)  # drops the lock


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


class LinuxAdapter:
    """One adapter handle's view of a TUN device (see :class:`wiretun._backend.AdapterBackend`)."""

    def __init__(self, ns: netlink.Namespace, index: int, guid: uuid.UUID, tunnel_type: str, name: str,
                 anchor: int | None = None, persistent: bool = False) -> None:
        self._res = _Resources(ns, anchor)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._index = index
        self.guid = guid
        self.tunnel_type = tunnel_type
        self.last_name = name
        self._owned = anchor is not None  # this handle created the adapter
        self._moved = False  # seen in another namespace than the one it was created in
        self._keep = persistent

    # -- identity --

    @property
    def luid(self) -> int:
        """The interface index where the device is now (it may change when it moves to another
        namespace: one ioctl to check, a lookup only after a move)."""
        ns, _, temporary = self._where()
        if temporary:
            ns.close()
        return self._index

    def name(self) -> str:
        self.last_name = wintun_name(self._link())
        return self.last_name

    def kernel_name(self) -> str:
        return self._link().name

    def rename(self, new_name: str) -> None:
        validate_name(new_name)
        old = self.name()
        if new_name == old:
            return
        self.on_link(_rename_link, f"cannot rename adapter {old} to {_show(new_name)}", old, new_name)
        self.last_name = new_name
        log.info(f"Renamed adapter {old} to {new_name}")

    def persistent(self) -> bool:
        info = self._link().tun
        return bool(info and info.persist)

    # -- configuration --

    def mtu(self) -> int:
        return self._link().mtu

    def set_mtu(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not MIN_MTU <= value <= MAX_MTU:
            raise InvalidParameter(f"MTU {value!r} is out of range {MIN_MTU}..{MAX_MTU}")
        self.on_link(netlink.set_mtu, f"cannot set MTU {value} on adapter {self.last_name}", value)

    def is_up(self) -> bool:
        return self._link().is_up

    def set_up(self, up: bool) -> None:
        what = f"cannot bring adapter {self.last_name} {'up' if up else 'down'}"
        self.on_link(netlink.set_up, what, up)

    def add_address(self, iface: IPInterface) -> None:
        self.on_link(netlink.add_address, f"cannot add address {iface} to adapter {self.last_name}", iface)

    def remove_address(self, iface: IPInterface) -> None:
        self.on_link(netlink.del_address, f"cannot remove address {iface} from adapter {self.last_name}", iface)

    def addresses(self) -> list[IPInterface]:
        return self.on_link(netlink.addresses, f"cannot read addresses of adapter {self.last_name}")

    def add_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        self.on_link(netlink.add_route, f"cannot add route {net} via adapter {self.last_name}", net, gateway, metric)

    def remove_route(self, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        self.on_link(netlink.del_route, f"cannot remove route {net} via adapter {self.last_name}",
                     net, gateway, metric)

    def routes(self) -> list[Route]:
        return self.on_link(netlink.routes, f"cannot read routes of adapter {self.last_name}")

    # -- link events --

    def link_monitor(self) -> LinkMonitor:
        """Link events of this adapter (:class:`wiretun.linux.links.LinkMonitor`): up/down, MTU, deleted,
        and moved to another namespace, told apart from deletion with the device's TUN descriptor."""
        fd = self._res.anchor
        opened = None
        if fd is None:  # a handle that did not create the adapter: a detached queue of its own
            fd = opened = self.open_queue()
        try:
            if opened is not None:
                tun.detach_queue(opened)
            return links.LinkMonitor(fd, self._index, self._res.ns)
        except OSError as exc:
            raise os_error(exc, f"cannot watch link events of adapter {self.last_name}") from None
        finally:
            if opened is not None:
                os.close(opened)

    # -- sessions --

    def start_session(self, capacity: int, *, multi_queue: bool, offload: bool,
                      record: Recorder | None) -> LinuxSession:
        return LinuxSession(self, capacity, multi_queue=multi_queue, offload=offload, record=record)

    def claim_session(self, multi_queue: bool) -> SessionClaim:
        """Take the adapter for a session, across processes (see the module docstring); Busy if taken."""
        name = self.last_name
        for _attempt in range(8):
            fd, path = self.on_link(_open_lock_file, f"cannot read the network namespace of adapter {name}")
            if fd < 0:
                break
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if multi_queue else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Busy(
                    f"adapter {name!r} already has a session (in this or another process); start every "
                    f"session with multi_queue=True to share it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(path).st_ino
            except OSError:
                current = -1
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the last holder removed the file between our open and our lock: again
        else:
            fd, path = -1, ""
        claim = SessionClaim(fd, path)
        try:
            if not multi_queue:
                attached = self.attached_queues()
                if attached:
                    raise Busy(
                        f"adapter {name!r} already has {attached} attached queue(s) (a session in another "
                        f"process?); start every session with multi_queue=True to share it"
                    )
        except BaseException:
            claim.release()
            raise
        return claim

    def attached_queues(self) -> int:
        """How many TUN queues are attached now, by any process (IFLA_TUN_NUM_QUEUES)."""
        info = self._link().tun
        return info.num_queues if info else 0

    def open_queue(self, *, nonblock: bool = True) -> int:
        """Attach a new TUN queue to this adapter and return its fd, in the adapter's network namespace
        whichever thread calls (the kernel resolves the name in the opening thread's namespace)."""

        def attach(index: int) -> int:
            link = netlink.get_link(index=index)
            if link is None:
                raise OSError(errno.ENODEV, "the adapter no longer exists")
            return tun.open_queue(link.name, nonblock=nonblock)

        return self.on_link(attach, f"cannot attach a queue to adapter {self.last_name}")

    # -- lifetime --

    def close(self) -> None:
        """Release the handle; an adapter it created is removed unless persistent."""
        res = self._res
        try:
            if self._owned and not self._keep:
                # Where it is now (it may have moved to another namespace), asked before the anchor goes.
                try:
                    ns, index, temporary = self._where()
                except OSError:
                    ns, index, temporary = res.ns, self._index, False
                res.close_anchor()  # the kernel removes the device when its last queue closes
                try:
                    link = ns.call(netlink.get_link, index=index)
                    if link is not None and self._is_ours(link):
                        # Other processes still hold queues: remove it anyway, as Wintun does.
                        ns.call(netlink.delete_link, index)
                except OSError as exc:
                    if exc.errno != errno.ENODEV:
                        log.warn(f"Removing adapter {self.last_name} failed: {exc.strerror or exc}")
                finally:
                    if temporary:
                        ns.close()
                log.info(f"Removed adapter {self.last_name}")
            elif self._owned:
                log.info(f"Closed adapter {self.last_name} (kept: persistent)")
            else:
                log.info(f"Closed adapter {self.last_name}")
        finally:
            self._finalizer()

    # -- helpers --

    def call(self, fn: Callable[..., T], what: str, *args: Any) -> T:
        """Run ``fn(*args)`` in the adapter's network namespace; an OSError becomes a WintunError."""
        try:
            return self._res.ns.call(fn, *args)
        except OSError as exc:
            raise os_error(exc, what) from None

    def on_link(self, fn: Callable[..., T], what: str, *args: Any) -> T:
        """Run ``fn(index, *args)`` in the namespace the device is in now, with its index there; an
        OSError becomes a WintunError."""
        try:
            ns, index, temporary = self._where()
        except OSError as exc:
            raise os_error(exc, what) from None
        try:
            return ns.call(fn, index, *args)
        except OSError as exc:
            raise os_error(exc, what) from None
        finally:
            if temporary:
                ns.close()

    def _where(self) -> tuple[netlink.Namespace, int, bool]:
        """(namespace, index, temporary) of the device now. A handle that created the adapter asks its
        TUN descriptor (TUNGETDEVNETNS), so it follows ``ip link set X netns B``; ``temporary``: the
        caller closes that namespace handle (none is kept: a handle would keep the namespace, and with
        it the device, alive after ``ip netns del``). Other handles stay in their namespace."""
        res = self._res
        anchor = res.anchor
        if anchor is None:
            return res.ns, self._index, False
        try:
            fd = tun.device_netns(anchor)
        except OSError as exc:
            if exc.errno in (errno.EBADFD, errno.ENODEV):
                return res.ns, self._index, False  # gone: the calls say so
            raise
        ns = netlink.Namespace.adopt(fd)
        if ns.ident == res.ns.ident:
            ns.close()
            if not self._moved:
                return res.ns, self._index, False  # the common case: one ioctl
            ns, temporary = res.ns, False
            self._moved = False  # back home: look the index up once more
        else:
            temporary = True
            self._moved = True
        try:
            name = tun.attached_name(anchor)
            link = ns.call(netlink.get_link, index=self._index)
            if link is None or link.name != name:
                link = ns.call(netlink.get_link, name=name)
        except BaseException:
            if temporary:
                ns.close()
            raise
        if link is not None and link.index != self._index:
            log.info(f"Adapter {self.last_name}: index {self._index} is now {link.index} (moved to another "
                     "network namespace)")
            self._index = link.index
        return ns, self._index, temporary

    def _link(self) -> netlink.Link:
        link = self.on_link(_get_by_index, f"cannot read adapter {self.last_name}")
        if link is None or not self._is_ours(link):
            raise EndOfFile(f"adapter {self.last_name} no longer exists")
        return link

    def _is_ours(self, link: netlink.Link) -> bool:
        ident = decode_alias(link.alias) if link.kind == "tun" else None
        return ident is not None and ident[0] == self.guid


# --- the platform functions ----------------------------------------------------------------------------


def create_adapter(name: str, tunnel_type: str, guid: uuid.UUID, *, persistent: bool, owner: int | None,
                   group: int | None) -> LinuxAdapter:
    """Create a TUN device in the calling thread's network namespace (WintunCreateAdapter)."""
    validate_name(name)
    validate_tunnel_type(tunnel_type)
    if owner is None and group is None:
        owner = os.geteuid()
    _require_tun_device()
    ns = netlink.Namespace()
    try:
        index, kernel_name, anchor = ns.call(_create_link, name, guid, tunnel_type, persistent, owner, group)
    except BaseException:
        ns.close()
        raise
    adapter = LinuxAdapter(ns, index, guid, tunnel_type, name, anchor, persistent)
    extra = f", kernel name {kernel_name}" if kernel_name != name else ""
    extra += ", persistent" if persistent else ""
    log.info(f"Created adapter {name} (tunnel type {tunnel_type}, GUID {guid}, index {index}{extra})")
    return adapter


def open_adapter(name: str) -> LinuxAdapter:
    """Open a wiretun adapter by name or kernel name in the calling thread's network namespace."""
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
    adapter = LinuxAdapter(ns, link.index, ident[0], ident[1], wintun_name(link))
    log.info(f"Opened adapter {adapter.last_name} (tunnel type {ident[1]}, index {link.index})")
    return adapter


def enumerate_adapters(tunnel_type: str) -> list[LinuxAdapter]:
    """Handles to every wiretun adapter of this tunnel type in the calling thread's namespace."""
    validate_tunnel_type(tunnel_type)
    ns = netlink.Namespace()
    try:
        links = ns.call(netlink.list_links)
    except OSError as exc:
        raise os_error(exc, "cannot list interfaces") from None
    finally:
        ns.close()
    found = []
    for link in links:
        ident = decode_alias(link.alias) if link.kind == "tun" else None
        if ident is not None and ident[1] == tunnel_type:
            found.append(LinuxAdapter(netlink.Namespace(), link.index, ident[0], ident[1], wintun_name(link)))
    return found


# --- work done inside the adapter's namespace ----------------------------------------------------------


def _open_lock_file(index: int) -> tuple[int, str]:
    """The lock file of adapter ``index`` in this thread's namespace, opened, and its path; (-1, "") when
    it cannot be made."""
    ns_inode = os.stat(_THREAD_NETNS).st_ino
    path = os.path.join(LOCK_DIRECTORY, f"{ns_inode}-{index}.lock")
    try:
        os.makedirs(LOCK_DIRECTORY, mode=0o755, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644), path
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
            try:  # made by someone else (root): reading is enough for a lock
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), path
            except OSError:
                # without a lock file only the attached-queue check remains
                return -1, ""
        raise


def _get_by_index(index: int) -> netlink.Link | None:
    return netlink.get_link(index=index)


def _lookup(name: str) -> netlink.Link | None:
    try:
        return netlink.get_link(name=name)
    except OSError as exc:
        raise os_error(exc, f"cannot look up {_show(name)}") from None


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
            raise os_error(exc, f"cannot create adapter {_show(name)}") from None
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
            raise os_error(exc, f"cannot create adapter {_show(name)}") from None
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
        free = next(iter(_free_kernel_name(new)), None)
        if free is None:
            raise AlreadyExists(f"no free kernel name for {_show(new)}")
        target = free
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
    """The TUN driver's version as ``(major << 16) | minor``, from a TUN device's ethtool driver info."""
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
        raise os_error(exc, "cannot list interfaces") from None
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
        raise os_error(exc, "no TUN device to ask for the driver version, and cannot create one") from None
    try:
        return tun.driver_info(probe)[1]
    except OSError as exc:
        raise os_error(exc, "cannot read the TUN driver version") from None
    finally:
        os.close(fd)  # not persistent: the probe device goes with its only queue


def delete_driver() -> int:
    """Remove wiretun's persistent adapters that no process has attached, in this thread's namespace."""
    ns = netlink.Namespace()
    try:
        return ns.call(_delete_idle_persistent)
    finally:
        ns.close()


def _delete_idle_persistent() -> int:
    try:
        links = netlink.list_links()
    except OSError as exc:
        raise os_error(exc, "cannot list interfaces") from None
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
            raise os_error(exc, f"cannot remove adapter {wintun_name(link)}") from None
        removed += 1
        log.info(f"Removed persistent adapter {wintun_name(link)}")
    return removed


__all__: Sequence[str] = [
    "LinuxAdapter", "create_adapter", "open_adapter", "enumerate_adapters", "get_running_driver_version",
    "delete_driver",
]
