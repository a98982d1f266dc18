"""Link events of one TUN device, followed into whichever network namespace it is in now.

    monitor = LinkMonitor(tun_fd, index, home)   # home: the namespace the device was created in
    poller.register(monitor.fileno(), select.EPOLLIN)
    for event in monitor.read_events():          # LinkEvent(UP | DOWN | MTU | MOVED | DELETED)
        ...
    monitor.close()

``ip link set X netns B`` moves an interface; the kernel's rtnetlink then says RTM_DELLINK in the old
namespace, exactly as for a deletion. The two are told apart with ``TUNGETDEVNETNS`` on the device's
TUN descriptor: it answers the namespace the device is in now, or EBADFD once the device is gone.

The monitor listens from the *home* namespace with ``NETLINK_LISTEN_ALL_NSID``: the kernel also
delivers the events of every namespace that has an id there, marked with that id. A move gives the
target namespace an id in the old one; where the home namespace has none for it yet, the monitor
assigns one. It never opens a socket in (or keeps a descriptor of) the namespace the device moved
to: a socket there would keep that namespace alive after ``ip netns del``, and with it the device
that the kernel would otherwise remove. The messages are decoded by pyroute2.

Not thread-safe: one reader (the device's event loop).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass

from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from .._backend import LinkEvent, LinkEventKind
from . import netlink, tun

__all__ = ["LinkEvent", "LinkEventKind", "LinkMonitor", "LinkState"]

_RTMGRP_LINK = 1
_RTMGRP_NSID = 1 << (28 - 1)  # RTNLGRP_NSID: namespace ids assigned and removed
_RTM_DELNSID = 89
_SOL_NETLINK = 270
_NETLINK_LISTEN_ALL_NSID = 8
_RECV_BUFFER = 1 << 20
_CMSG_SPACE = socket.CMSG_SPACE(4)
_LOCATE_ATTEMPTS = 5  # the device may move again while it is being looked up
_DISMANTLE_POLL = 0.05  # seconds between looks at a device whose namespace is being removed
_DISMANTLE_WAIT = 60.0  # the kernel removes it well within this


@dataclass(frozen=True)
class LinkState:
    """Where the device is and what it looks like there."""

    netns: tuple[int, int]  # (st_dev, st_ino) of its namespace
    nsid: int  # that namespace's id as seen from the home namespace; -1: the home namespace itself
    index: int
    name: str
    up: bool
    mtu: int


def _listen_socket() -> socket.socket:
    """A non-blocking rtnetlink socket on the link group, hearing every namespace with an id here."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                         socket.NETLINK_ROUTE)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUFFER)
        except OSError:
            pass  # the default buffer; an overflow means a resync, not a lost event
        try:
            sock.setsockopt(_SOL_NETLINK, _NETLINK_LISTEN_ALL_NSID, 1)
        except PermissionError:
            pass  # without CAP_NET_BROADCAST: events of the home namespace only
        sock.bind((0, _RTMGRP_LINK | _RTMGRP_NSID))
    except BaseException:
        sock.close()
        raise
    return sock


def _nsid(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == _SOL_NETLINK and kind == _NETLINK_LISTEN_ALL_NSID and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder, signed=True)
    return -1  # no id attached: the socket's own namespace


class _Dismantling(OSError):
    """The device's namespace is being removed (``ip netns del``): the device goes with it."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL, "the interface's network namespace is being removed")


class LinkMonitor:
    """Up/down, MTU, moves and the deletion of the TUN device behind ``tun_fd`` (any queue of it,
    attached or detached; the monitor keeps a duplicate). ``index`` is its interface index in ``home``,
    the namespace it was created in and where the monitor listens. Raises OSError when the device is
    already gone or netlink refuses."""

    def __init__(self, tun_fd: int, index: int, home: netlink.Namespace) -> None:
        self._tun = fcntl.fcntl(tun_fd, fcntl.F_DUPFD_CLOEXEC, 0)
        self._home: netlink.Namespace | None = None
        self._sock: socket.socket | None = None
        self._marshal = MarshalRtnl()
        self._deleted = False
        self._watching = False
        # One descriptor to wait on: the netlink socket, and an eventfd for what netlink cannot say.
        self._poller = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._home = home.call(netlink.Namespace)  # our own handle of it
            self._sock = self._home.call(_listen_socket)
            self._poller.register(self._sock.fileno(), select.EPOLLIN)
            self._poller.register(self._wake, select.EPOLLIN)
            # Subscribed first, then read: a change in between arrives as an event too.
            state = self._locate(index)
            if state is None:
                raise OSError(errno.ENODEV, "the interface no longer exists")
            self._state = state
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the LinkMonitor interface

    def fileno(self) -> int:
        if self._sock is None:
            raise OSError(errno.EBADF, "the link monitor is closed")
        return self._poller.fileno()

    @property
    def state(self) -> LinkState:
        """What the monitor last knew: namespace, index, name, up, MTU (no I/O)."""
        return self._state

    @property
    def deleted(self) -> bool:
        return self._deleted

    def read_events(self) -> list[LinkEvent]:
        """The events that arrived, oldest first, without blocking. After DELETED, nothing more."""
        sock = self._sock
        if sock is None or self._deleted:
            return []
        events: list[LinkEvent] = []
        recheck = False
        try:
            os.eventfd_read(self._wake)
            recheck = True  # the dismantling watcher saw the device go (or stay)
        except BlockingIOError:
            pass
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(65536, _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    recheck = True  # events were lost: read the state instead
                    continue
                raise
            if not data:
                break
            nsid = _nsid(ancillary)
            for msg in self._marshal.parse(data):
                state = self._state
                if msg["header"]["type"] == _RTM_DELNSID:
                    # The namespace the device is in may be going away (ip netns del): when it
                    # does, the device goes with it, and its last events come without an id.
                    recheck = recheck or state.nsid != -1
                    continue
                if msg.get("index") != state.index:
                    continue
                event = msg.get("event")
                if event == "RTM_DELLINK":
                    recheck = True  # deleted, or moved away: TUNGETDEVNETNS tells
                elif event == "RTM_NEWLINK" and not recheck and nsid == state.nsid:
                    flags = msg.get("flags")
                    mtu = msg.get_attr("IFLA_MTU")
                    name = msg.get_attr("IFLA_IFNAME")
                    self._update(events, state.netns, state.nsid, state.index,
                                 state.name if name is None else str(name),
                                 state.up if flags is None else bool(flags & netlink.IFF_UP),
                                 state.mtu if mtu is None else int(mtu))
        if recheck:
            self._recheck(events)
        return events

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if not self._poller.closed:
            self._poller.close()
        wake, self._wake = self._wake, -1
        if wake >= 0:
            os.close(wake)
        home, self._home = self._home, None
        if home is not None:
            home.close()
        fd, self._tun = self._tun, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ following the device

    def _update(self, events: list[LinkEvent], netns: tuple[int, int], nsid: int, index: int, name: str,
                up: bool, mtu: int) -> None:
        old = self._state
        self._state = LinkState(netns, nsid, index, name, up, mtu)
        if netns != old.netns:
            events.append(LinkEvent(LinkEventKind.MOVED))
        if mtu != old.mtu:
            events.append(LinkEvent(LinkEventKind.MTU, mtu))
        if up != old.up:
            events.append(LinkEvent(LinkEventKind.UP if up else LinkEventKind.DOWN))

    def _recheck(self, events: list[LinkEvent]) -> None:
        try:
            state = self._locate(self._state.index)
        except _Dismantling:
            # Its namespace is being removed, and the device with it. That namespace has lost its id
            # here already, so its RTM_DELLINK never reaches this socket: watch the device instead.
            self._watch_dismantling()
            return
        if state is None:
            self._deleted = True
            events.append(LinkEvent(LinkEventKind.DELETED))
            return
        self._update(events, state.netns, state.nsid, state.index, state.name, state.up, state.mtu)

    def _watch_dismantling(self) -> None:
        if self._watching:
            return
        self._watching = True
        tun_fd = fcntl.fcntl(self._tun, fcntl.F_DUPFD_CLOEXEC, 0)
        wake = fcntl.fcntl(self._wake, fcntl.F_DUPFD_CLOEXEC, 0)

        def watch() -> None:
            try:
                deadline = time.monotonic() + _DISMANTLE_WAIT
                while time.monotonic() < deadline:
                    time.sleep(_DISMANTLE_POLL)
                    try:
                        os.close(tun.device_netns(tun_fd))
                    except OSError as e:
                        if e.errno == errno.EINVAL:
                            continue  # still dying
                    break  # gone (EBADFD) or settled: let read_events look
                self._watching = False
                os.eventfd_write(wake, 1)
            finally:
                os.close(tun_fd)
                os.close(wake)

        threading.Thread(target=watch, name="wiretun-link-dismantle", daemon=True).start()

    def _locate(self, index: int) -> LinkState | None:
        """Where the device is now and its state there; None once it is gone (EBADFD)."""
        home = self._home
        if home is None:
            return None
        for _ in range(_LOCATE_ATTEMPTS):
            try:
                fd = tun.device_netns(self._tun)
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.ENODEV):
                    return None
                if e.errno == errno.EINVAL:
                    raise _Dismantling() from None  # the namespace is dying: no handle can be had
                if e.errno == errno.EPERM:
                    # Without CAP_NET_ADMIN where the device is, only the home namespace can be seen.
                    link = home.call(netlink.get_link, index=index)
                    if link is not None and link.kind == "tun":
                        return LinkState(home.ident, -1, link.index, link.name, link.is_up, link.mtu)
                raise

            with netlink.Namespace.adopt(fd) as ns:
                if ns.ident == home.ident:
                    nsid = -1
                    link = home.call(netlink.get_link, index=index)
                    name = tun.attached_name(self._tun)
                    if link is None or link.name != name:
                        link = home.call(netlink.get_link, name=name)
                else:
                    nsid = home.call(netlink.peer_nsid, fd)
                    # Moves keep the index where it is free; the name (unique in its namespace) says.
                    name = tun.attached_name(self._tun)
                    link = ns.call(netlink.get_link, name=name)
                netns = ns.ident
            if link is not None and link.kind == "tun":
                return LinkState(netns, nsid, link.index, link.name, link.is_up, link.mtu)
            # Moved or renamed again in between: look again.
        raise OSError(errno.EAGAIN, "the interface keeps moving; cannot locate it")
