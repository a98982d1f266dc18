"""The Linux backend's link monitor (wiretun.linux.links): the events of one TUN device, exactly and in
order, wherever it goes: up/down and MTU at home, a move (never a deletion), events in the new
namespace, a move on to a third one and back, deletion there, and the namespace deleted around it."""

from __future__ import annotations

import select
import subprocess
import time

import wiretun
from tests import netns as _netns
from wiretun._backend import LinkEvent, LinkEventKind

from .wgutil import nsx

UP, DOWN, MTU, MOVED, DELETED = (LinkEventKind.UP, LinkEventKind.DOWN, LinkEventKind.MTU, LinkEventKind.MOVED,
                                 LinkEventKind.DELETED)


def events_after(monitor: object, *argv: str, want: int = 1, timeout: float = 5.0) -> list[LinkEvent]:
    """Run a command, then collect the monitor's events until ``want`` of them came (or ``timeout``),
    plus whatever follows within a short quiet period."""
    subprocess.run(argv, check=True, capture_output=True)
    got: list[LinkEvent] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([monitor], [], [], 0.1)  # type: ignore[list-item]
        if ready:
            got += monitor.read_events()  # type: ignore[attr-defined]
        if len(got) >= want:
            quiet_until = quiet_until or time.monotonic() + 0.3
            if time.monotonic() >= quiet_until:
                break
    return got


def test_link_events_follow_the_interface(make_netns) -> None:
    a, b, c = make_netns("wtla"), make_netns("wtlb"), make_netns("wtlc")
    with _netns.entered(a):
        adapter = wiretun.Adapter.create("wtlinks", "Links")
    try:
        monitor = adapter.link_monitor()
        try:
            assert monitor.state.up is False and monitor.state.index == adapter.luid
            ip_a = ("ip", "-n", a)
            assert events_after(monitor, *ip_a, "link", "set", "wtlinks", "up") == [LinkEvent(UP)]
            assert events_after(monitor, *ip_a, "link", "set", "wtlinks", "mtu", "1400") == [LinkEvent(MTU, 1400)]
            # Moved (the kernel takes it down first): never DELETED.
            got = events_after(monitor, *ip_a, "link", "set", "wtlinks", "netns", b, want=2)
            assert got == [LinkEvent(DOWN), LinkEvent(MOVED)], got
            # Events made in B arrive.
            got = events_after(monitor, "ip", "-n", b, "link", "set", "wtlinks", "mtu", "9000", "up", want=2)
            assert sorted(e.kind.value for e in got) == ["mtu", "up"] and LinkEvent(MTU, 9000) in got, got
            assert monitor.state.index == int(nsx(b, "cat", "/sys/class/net/wtlinks/ifindex").stdout)
            # On to C (down on the way), then back home.
            got = events_after(monitor, "ip", "-n", b, "link", "set", "wtlinks", "netns", c, want=2)
            assert got == [LinkEvent(DOWN), LinkEvent(MOVED)], got
            assert events_after(monitor, "ip", "-n", c, "link", "set", "wtlinks", "mtu", "1280") == \
                [LinkEvent(MTU, 1280)]
            assert events_after(monitor, "ip", "-n", c, "link", "set", "wtlinks", "netns", a) == [LinkEvent(MOVED)]
            assert events_after(monitor, *ip_a, "link", "set", "wtlinks", "up") == [LinkEvent(UP)]
            # Away to B once more, and B is deleted around it: the kernel removes the interface.
            got = events_after(monitor, *ip_a, "link", "set", "wtlinks", "netns", b, want=2)
            assert got == [LinkEvent(DOWN), LinkEvent(MOVED)], got
            got = events_after(monitor, "ip", "netns", "del", b, timeout=10)
            assert got == [LinkEvent(DELETED)], got
            assert monitor.read_events() == []
        finally:
            monitor.close()
    finally:
        adapter.close()


def test_deleted_in_place_is_deleted(make_netns) -> None:
    a = make_netns("wtla")
    with _netns.entered(a):
        adapter = wiretun.Adapter.create("wtlinks", "Links")
    try:
        monitor = adapter.link_monitor()
        try:
            got = events_after(monitor, "ip", "-n", a, "link", "del", "wtlinks")
            assert got == [LinkEvent(DELETED)], got
        finally:
            monitor.close()
    finally:
        adapter.close()

