"""A WireGuard interface moved into another network namespace (the container pattern), on wiretun
(in-process and the ``wiretun-wg`` daemon) and on wireguard-go, so the test is known to test something.

The interface is born in namespace A, where its UDP sockets stay; ``ip link set X netns B`` moves the
interface (before configuration, after configuration, or up with traffic). From B: addresses, up,
traffic v4/v6 both ways, MTU and up/down; then on to C; then ``ip link del`` in C ends the daemon.
A move is never taken for a deletion.
"""

from __future__ import annotations

import shutil
import time

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, nsx, ping, wait_for

pytestmark = pytest.mark.skipif(
    WIREGUARD_GO is None or any(shutil.which(t) is None for t in ("wg", "ss")),
    reason="needs wireguard-go, wg and ss",
)


def addresses_up(ns: str, node: Node) -> None:
    """The node's inner addresses on its interface in ``ns`` (a move or a down drops them), and up."""
    nsx(ns, "ip", "addr", "replace", f"{node.inner4}/24", "dev", node.ifname)
    nsx(ns, "ip", "link", "set", node.ifname, "up")
    nsx(ns, "ip", "addr", "replace", f"{node.inner6}/64", "dev", node.ifname, "nodad")


def move(node: Node, src: str, dst: str) -> None:
    nsx(src, "ip", "link", "set", node.ifname, "netns", dst)
    assert nsx(dst, "ip", "link", "show", node.ifname, check=False).returncode == 0
    assert nsx(src, "ip", "link", "show", node.ifname, check=False).returncode != 0


def traffic(ns: str, node: Node, peer: Node, count: int = 3) -> list[int]:
    """Replies to ``count`` pings each: node (in ``ns``) -> peer v4, v6; peer -> node v4, v6."""
    return [
        ping(ns, peer.inner4, count),
        ping(ns, peer.inner6, count),
        ping(peer.ns, node.inner4, count),
        ping(peer.ns, node.inner6, count),
    ]


def udp_ports(ns: str, port: int) -> int:
    """How many UDP sockets are bound to ``port`` in ``ns``."""
    return len(nsx(ns, "ss", "-Hlun", f"sport = :{port}").stdout.splitlines())


def alive(node: Node) -> bool:
    if node.proc is not None:
        return node.proc.poll() is None and node.socket_path.exists()
    return not node.device.closed.is_set()


@pytest.mark.parametrize("stage", ["unconfigured", "configured", "up"])
@pytest.mark.parametrize("kind", ["inproc", "daemon", "wggo"])
def test_interface_moved_to_another_namespace(lab: Lab, kind: str, stage: str) -> None:
    a, r, b = lab.namespace(), lab.namespace(), lab.namespace()
    wire = lab.wire(a, r)
    node = lab.node(kind, a, 51011, configure=stage != "unconfigured")
    peer = lab.node("wggo", r, 51012)
    peer.add_peer(node, wire.a4)
    if stage == "up":
        node.add_peer(peer, wire.b4)
        assert traffic(a, node, peer) == [3, 3, 3, 3]
    elif stage == "configured":
        nsx(a, "ip", "link", "set", node.ifname, "down")

    move(node, a, b)
    time.sleep(0.5)
    assert alive(node), f"{node} took the move for a deletion"
    if stage == "unconfigured":
        node.set("private-key", node.key_file(node.private), "listen-port", str(node.port))
    if stage != "up":
        node.add_peer(peer, wire.b4)
    addresses_up(b, node)
    assert traffic(b, node, peer) == [3, 3, 3, 3]
    # The sockets stayed where the interface was born.
    assert udp_ports(a, node.port) == 2 and udp_ports(b, node.port) == 0
    if node.device is not None:
        wait_for(lambda: node.device.is_up, 5, "the device to follow up in B")
        assert node.device.interface_deleted is False

    if stage != "up":
        return  # the rest once, from the fullest start

    # MTU from B: the device pads to it; big pings fit and pass both ways.
    nsx(b, "ip", "link", "set", node.ifname, "mtu", "1280")
    nsx(r, "ip", "link", "set", peer.ifname, "mtu", "1280")
    if node.device is not None:
        wait_for(lambda: node.device.mtu == 1280, 5, "the device to follow the MTU set in B")
    assert ping(b, peer.inner4, 2, size=1200) == 2 and ping(r, node.inner4, 2, size=1200) == 2
    nsx(b, "ip", "link", "set", node.ifname, "mtu", "1420")
    nsx(r, "ip", "link", "set", peer.ifname, "mtu", "1420")
    if node.device is not None:
        wait_for(lambda: node.device.mtu == 1420, 5, "the device to follow the MTU set back in B")
    assert ping(b, peer.inner4, 2, size=1380) == 2

    # Down in B: nothing passes; up again: traffic again.
    nsx(b, "ip", "link", "set", node.ifname, "down")
    if node.device is not None:
        wait_for(lambda: not node.device.is_up, 5, "the device to follow down in B")
        assert ping(r, node.inner4, 2, wait=1) == 0
    addresses_up(b, node)
    assert traffic(b, node, peer) == [3, 3, 3, 3]

    # On to C, and traffic again.
    c = lab.namespace()
    move(node, b, c)
    time.sleep(0.5)
    assert alive(node), f"{node} took the second move for a deletion"
    addresses_up(c, node)
    assert traffic(c, node, peer) == [3, 3, 3, 3]
    assert udp_ports(a, node.port) == 2

    # Deleted in C: the daemon ends cleanly and removes its socket.
    nsx(c, "ip", "link", "del", node.ifname)
    if node.proc is not None:
        assert node.proc.wait(15) == 0
        wait_for(lambda: not node.socket_path.exists(), 5, "the UAPI socket to be removed")
    else:
        wait_for(node.device.closed.is_set, 10, "the device to close")
        assert node.device.interface_deleted
    wait_for(lambda: udp_ports(a, node.port) == 0, 10, "the UDP sockets to close")


def test_namespace_deleted_with_the_interface_inside(lab: Lab) -> None:
    """``ip netns del`` of the namespace the interface moved to removes the interface (the kernel
    removes virtual devices with their namespace); the daemon notices and stops cleanly. Nothing of
    the daemon may keep that namespace alive."""
    a, r = lab.namespace(), lab.namespace()
    b = lab._make_netns("wtgone")  # removed by hand below; the fixture's removal then finds nothing
    wire = lab.wire(a, r)
    node = lab.node("daemon", a, 51021)
    peer = lab.node("wggo", r, 51022)
    peer.add_peer(node, wire.a4)
    node.add_peer(peer, wire.b4)
    move(node, a, b)
    addresses_up(b, node)
    assert ping(b, peer.inner4, 2) == 2
    nsx(a, "true")
    from tests import netns as _netns

    _netns.remove(b)
    assert node.proc is not None
    assert node.proc.wait(20) == 0
    wait_for(lambda: not node.socket_path.exists(), 5, "the UAPI socket to be removed")


def test_adapter_follows_its_interface_to_another_namespace(lab: Lab) -> None:
    """The Adapter that created an interface acts on it where it is now: its index (LUID) there, MTU,
    up/down, addresses, and close() removing it from the namespace it moved to."""
    import json

    import wiretun
    from tests import netns as _netns

    a, b = lab.namespace(), lab.namespace()
    # Two interfaces in B take the indexes the adapter has in A: the move must give it another one.
    nsx(b, "ip", "link", "add", "wtfill0", "type", "veth", "peer", "name", "wtfill1")

    def index_in(ns: str, name: str) -> int:
        return int(json.loads(nsx(ns, "ip", "-j", "link", "show", name).stdout)[0]["ifindex"])

    with _netns.entered(a):
        adapter = wiretun.Adapter.create("wtfollow", "Follow")
    try:
        home_index = adapter.luid
        assert home_index == index_in(a, "wtfollow")
        nsx(a, "ip", "link", "set", "wtfollow", "netns", b)
        assert adapter.luid == index_in(b, "wtfollow") != home_index
        adapter.set_mtu(1300)
        adapter.up()
        adapter.add_address("10.9.0.1/24")
        shown = json.loads(nsx(b, "ip", "-j", "addr", "show", "wtfollow").stdout)[0]
        assert shown["mtu"] == 1300 and "UP" in shown["flags"]
        assert "10.9.0.1" in [x["local"] for x in shown["addr_info"]]
        assert adapter.get_mtu() == 1300 and adapter.is_up_now()
        assert "10.9.0.1/24" in [str(x) for x in adapter.addresses()]
        adapter.down()
        assert not adapter.is_up_now()
        # Back home, then away again: it keeps following.
        nsx(b, "ip", "link", "set", "wtfollow", "netns", a)
        assert adapter.luid == index_in(a, "wtfollow")
        adapter.set_mtu(1280)
        assert json.loads(nsx(a, "ip", "-j", "link", "show", "wtfollow").stdout)[0]["mtu"] == 1280
        nsx(a, "ip", "link", "set", "wtfollow", "netns", b)
        assert adapter.get_mtu() == 1280
    finally:
        adapter.close()
    assert nsx(b, "ip", "link", "show", "wtfollow", check=False).returncode != 0
    assert nsx(a, "ip", "link", "show", "wtfollow", check=False).returncode != 0
