"""rtnetlink through pyroute2: links, alias, altnames, addresses, routes, MTU, up/down, rename, delete.

Every function here opens a short-lived ``IPRoute`` socket in the *calling thread's* network
namespace, does one job and closes it, and reports kernel failures as :class:`OSError` with the
kernel's errno. :class:`Namespace` runs such work in the namespace an adapter was created in, from any
thread (pyroute2 0.9 keeps one socket per thread, created in whatever namespace that thread is in, so a
long-lived ``IPRoute`` shared between threads could silently talk to the wrong namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .._backend import IPAddress, IPInterface, IPNetwork, Route

IFNAMSIZ = 16  # kernel names: at most 15 bytes
ALTIFNAMSIZ = 128  # altnames: at most 127 bytes
IFALIASZ = 256  # alias: at most 255 bytes
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTN_UNICAST = 1

_CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"

T = TypeVar("T")


@dataclass(frozen=True)
class TunInfo:
    """The ``IFLA_INFO_DATA`` of a TUN/TAP link."""

    persist: bool
    multi_queue: bool
    num_queues: int  # attached queues: a process is reading/writing it
    num_disabled_queues: int  # detached queues (wiretun's lifetime anchor is one)
    owner: int | None
    group: int | None


@dataclass(frozen=True)
class Link:
    """What the kernel says about one network interface."""

    index: int
    name: str
    altnames: tuple[str, ...]
    alias: str | None
    kind: str | None
    flags: int
    mtu: int
    tun: TunInfo | None

    @property
    def is_up(self) -> bool:
        return bool(self.flags & IFF_UP)


RouteEntry = Route


# --- namespaces ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"cannot enter the adapter's network namespace: {os.strerror(e)}")


def _thread_netns_id() -> tuple[int, int]:
    st = os.stat(_THREAD_NETNS)
    return st.st_dev, st.st_ino


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Namespace:
    """The network namespace the calling thread is in now, kept so work can be run there later.

    ``call(fn, ...)`` runs ``fn`` directly when the calling thread is in this namespace and has no
    running asyncio loop (pyroute2's synchronous API cannot run inside one); otherwise in a short-lived
    helper thread that first enters the namespace (that needs CAP_SYS_ADMIN, which a process running
    in a single namespace never has to have).
    """

    def __init__(self) -> None:
        self._fd: int | None = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._id = (st.st_dev, st.st_ino)

    @classmethod
    def adopt(cls, fd: int) -> Namespace:
        """A Namespace for a namespace descriptor (e.g. from ``TUNGETDEVNETNS``); it owns ``fd`` and
        closes it in :meth:`close`."""
        self = cls.__new__(cls)
        self._fd = fd
        st = os.fstat(fd)
        self._id = (st.st_dev, st.st_ino)
        return self

    @property
    def ident(self) -> tuple[int, int]:
        """(device, inode) of the namespace: equal for two handles of one namespace."""
        return self._id

    def fileno(self) -> int:
        fd = self._fd
        if fd is None:
            raise OSError(9, "network namespace handle is closed")
        return fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def is_current(self) -> bool:
        return _thread_netns_id() == self._id

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        fd = self._fd
        if fd is None:
            raise OSError(9, "network namespace handle is closed")
        here = self.is_current()
        if here and not _loop_running():
            return fn(*args, **kwargs)
        outcome: list[tuple[bool, Any]] = []

        def work() -> None:
            try:
                if not here:
                    _setns(fd)  # this helper thread only; it ends right after
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # handed back to the caller's thread
                outcome.append((False, exc))

        helper = threading.Thread(target=work, name="wiretun-netns", daemon=True)
        helper.start()
        helper.join()
        ok, value = outcome[0]
        if ok:
            result: T = value
            return result
        raise value

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- plumbing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rtnl() -> Iterator[IPRoute]:
    # groups=0: no multicast subscriptions, we only ask and read the answers.
    ip = IPRoute(groups=0)
    try:
        yield ip
    finally:
        ip.close()


def _oserror(exc: NetlinkError) -> OSError:
    code = abs(int(exc.code)) if exc.code else 0
    return OSError(code, os.strerror(code) if code else str(exc))


def _netlink_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except NetlinkError as exc:
            raise _oserror(exc) from exc

    return wrapper


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _parse_link(msg: Any) -> Link:
    altnames: tuple[str, ...] = ()
    props = msg.get("IFLA_PROP_LIST")
    if props is not None:
        altnames = tuple(_text(a) or "" for a in props.altnames())
    kind = None
    tun = None
    info = msg.get("IFLA_LINKINFO")
    if info is not None:
        kind = _text(info.get("IFLA_INFO_KIND"))
        data = info.get("IFLA_INFO_DATA")
        if kind == "tun" and data is not None and hasattr(data, "get"):
            owner = data.get("IFLA_TUN_OWNER")
            group = data.get("IFLA_TUN_GROUP")
            tun = TunInfo(
                persist=bool(data.get("IFLA_TUN_PERSIST") or 0),
                multi_queue=bool(data.get("IFLA_TUN_MULTI_QUEUE") or 0),
                num_queues=int(data.get("IFLA_TUN_NUM_QUEUES") or 0),
                num_disabled_queues=int(data.get("IFLA_TUN_NUM_DISABLED_QUEUES") or 0),
                owner=None if owner is None else int(owner),
                group=None if group is None else int(group),
            )
    return Link(
        index=int(msg["index"]),
        name=_text(msg.get("IFLA_IFNAME")) or "",
        altnames=altnames,
        alias=_text(msg.get("IFLA_IFALIAS")),
        kind=kind,
        flags=int(msg["flags"]),
        mtu=int(msg.get("IFLA_MTU") or 0),
        tun=tun,
    )


# --- links ----------------------------------------------------------------------------------------


@_netlink_errors
def get_link(*, index: int | None = None, name: str | None = None) -> Link | None:
    """The link with this ifindex, or with this kernel name or altname; None when there is none."""
    if (index is None) == (name is None):
        raise TypeError("give exactly one of index= or name=")
    if index is not None:
        query: dict[str, Any] = {"index": index}
    else:
        assert name is not None
        # IFLA_IFNAME lookups also match altnames, but the attribute is limited to 15 bytes.
        if len(name.encode()) < IFNAMSIZ:
            query = {"ifname": name}
        else:
            query = {"altname": name}
    with _rtnl() as ip:
        try:
            msgs = ip.link("get", **query)
        except NetlinkError as exc:
            if exc.code in (19, 2):  # ENODEV, ENOENT
                return None
            if name is not None and exc.code in (22, 34):  # EINVAL, ERANGE: no such name can exist
                return None
            raise
    for msg in msgs:
        return _parse_link(msg)
    return None


@_netlink_errors
def list_links() -> list[Link]:
    with _rtnl() as ip:
        return [_parse_link(msg) for msg in ip.get_links()]


@_netlink_errors
def set_alias(index: int, alias: str) -> None:
    with _rtnl() as ip:
        ip.link("set", index=index, ifalias=alias)


@_netlink_errors
def add_altname(index: int, altname: str) -> None:
    with _rtnl() as ip:
        ip.link("property_add", index=index, altname=altname)


@_netlink_errors
def del_altname(index: int, altname: str) -> None:
    with _rtnl() as ip:
        ip.link("property_del", index=index, altname=altname)


@_netlink_errors
def rename(index: int, new_name: str) -> None:
    """Change the kernel name. Kernels older than 6.x refuse while the link is up: bring it down,
    rename and bring it back up then."""
    with _rtnl() as ip:
        try:
            ip.link("set", index=index, ifname=new_name)
            return
        except NetlinkError as exc:
            if exc.code != 16:  # EBUSY: this kernel cannot rename a running link
                raise
        ip.link("set", index=index, state="down")
        try:
            ip.link("set", index=index, ifname=new_name)
        finally:
            ip.link("set", index=index, state="up")


@_netlink_errors
def set_up(index: int, up: bool) -> None:
    with _rtnl() as ip:
        ip.link("set", index=index, state="up" if up else "down")


@_netlink_errors
def set_mtu(index: int, mtu: int) -> None:
    with _rtnl() as ip:
        ip.link("set", index=index, mtu=mtu)


@_netlink_errors
def delete_link(index: int) -> None:
    with _rtnl() as ip:
        ip.link("del", index=index)


@_netlink_errors
def peer_nsid(fd: int) -> int:
    """The id the calling thread's namespace gives the namespace ``fd`` refers to (``ip netns
    list-id``); one is assigned if it has none. -1 for the calling thread's own namespace."""
    with _rtnl() as ip:
        reply = ip.get_netnsid(fd=fd)
        nsid = None if reply is None else reply.get("nsid")
        if nsid is None or nsid < 0 or nsid == 0xFFFFFFFF:
            if os.fstat(fd).st_ino == os.stat(_THREAD_NETNS).st_ino:
                return -1
            ip.set_netnsid(fd=fd)
            reply = ip.get_netnsid(fd=fd)
            nsid = None if reply is None else reply.get("nsid")
    if nsid is None or nsid < 0 or nsid == 0xFFFFFFFF:
        raise OSError(95, "the kernel assigned no id to the namespace")  # EOPNOTSUPP
    return int(nsid)


# --- addresses ------------------------------------------------------------------------------------


@_netlink_errors
def addresses(index: int) -> list[IPInterface]:
    out: list[IPInterface] = []
    with _rtnl() as ip:
        for msg in ip.get_addr(index=index):
            if msg["index"] != index:
                continue
            # On point-to-point links IFA_ADDRESS may be the peer; IFA_LOCAL is ours (IPv4 only).
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if addr is None:
                continue
            out.append(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))
    return out


IFA_F_NODAD = 0x02


@_netlink_errors
def add_address(index: int, iface: IPInterface) -> None:
    with _rtnl() as ip:
        if iface.version == 6:
            # A TUN link has no neighbours to collide with: no DAD, so the address is usable (bind)
            # at once instead of after the tentative period that follows the link coming up.
            ip.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                    IFA_FLAGS=IFA_F_NODAD)
        else:
            ip.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


@_netlink_errors
def del_address(index: int, iface: IPInterface) -> None:
    with _rtnl() as ip:
        ip.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


# --- routes ---------------------------------------------------------------------------------------


def _route_spec(index: int, destination: IPNetwork, gateway: IPAddress | None, metric: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dst": str(destination),
        "oif": index,
        "family": socket.AF_INET if destination.version == 4 else socket.AF_INET6,
        "table": RT_TABLE_MAIN,
    }
    if gateway is not None:
        spec["gateway"] = str(gateway)
    if metric is not None:
        spec["priority"] = metric
    return spec


@_netlink_errors
def routes(index: int) -> list[RouteEntry]:
    """Unicast routes of the main table that leave through this link (IPv4 and IPv6)."""
    out: list[RouteEntry] = []
    with _rtnl() as ip:
        for msg in ip.get_routes(table=RT_TABLE_MAIN):
            if msg.get("RTA_OIF") != index or msg["type"] != RTN_UNICAST:
                continue
            table = msg.get("RTA_TABLE") or msg["table"]
            if table != RT_TABLE_MAIN:
                continue
            family = msg["family"]
            dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
            gw = msg.get("RTA_GATEWAY")
            out.append(
                RouteEntry(
                    destination=ipaddress.ip_network(f"{dst}/{msg['dst_len']}"),
                    gateway=None if gw is None else ipaddress.ip_address(gw),
                    metric=int(msg.get("RTA_PRIORITY") or 0),
                )
            )
    return out


@_netlink_errors
def add_route(index: int, destination: IPNetwork, gateway: IPAddress | None = None, metric: int | None = None) -> None:
    """Add a main-table route that leaves through this link."""
    with _rtnl() as ip:
        ip.route("add", **_route_spec(index, destination, gateway, metric))


@_netlink_errors
def del_route(index: int, destination: IPNetwork, gateway: IPAddress | None = None, metric: int | None = None) -> None:
    """Remove a main-table route that leaves through this link."""
    with _rtnl() as ip:
        ip.route("del", **_route_spec(index, destination, gateway, metric))
