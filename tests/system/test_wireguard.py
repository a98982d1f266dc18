"""The WireGuard device against real wireguard-go (and itself), over veth pairs between namespaces.

Every side is configured with the real ``wg`` tool through its UAPI socket, whatever runs it:

* ``inproc``: a :class:`~wiretun.wireguard.device.Device` in this process, created in a thread that
  entered the node's namespace, with a :class:`~wiretun.wireguard.uapi.UAPIServer` in front;
* ``daemon``: ``wiretun-wg -f`` as a subprocess under ``ip netns exec``;
* ``wggo``: ``wireguard-go -f`` under ``ip netns exec``.

wg finds userspace sockets only in /var/run/wireguard, so interface names are unique and every
socket is removed at the end. Traffic is ping and iperf3 (always time-bounded), inside namespaces
the tests create. Assertions are on reply counts, iperf3's byte counts, ``wg show dump``
handshakes and transfer counters, captured packets and the device's drop counters.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import ipaddress
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

import wiretun
from tests import netns as _netns

from .wgutil import WIREGUARD_GO, Node, bracket, genkey, iperf, nsx, pair, ping, unique, wait_for

TOOLS = ("wg", "iperf3", "ss")

pytestmark = pytest.mark.skipif(
    WIREGUARD_GO is None or any(shutil.which(t) is None for t in TOOLS),
    reason=f"needs wireguard-go and {', '.join(TOOLS)}",
)


# ---------------------------------------------------------------------------------------- helpers


def assert_handshaken(a: Node, b: Node) -> None:
    """Both sides report a recent handshake with each other and bytes both ways."""
    now = time.time()
    for x, y in ((a, b), (b, a)):
        p = x.peer(y)
        assert now - 120 < p.latest_handshake <= now + 5, (x, p)
        assert p.rx > 0 and p.tx > 0, (x, p)


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "left_kind, outer, initiator",
    [("inproc", 4, "wiretun"), ("daemon", 6, "wireguard-go")],
    ids=["inproc-outer4-wiretun-initiates", "daemon-outer6-wireguard-go-initiates"],
)
def test_traffic_with_wireguard_go(lab, left_kind, outer, initiator):
    left, right, wire = pair(lab, left_kind, "wggo", outer)
    assert left.peer(right).latest_handshake == 0 and right.peer(left).latest_handshake == 0
    first, second = (left, right) if initiator == "wiretun" else (right, left)
    # The initiator's first packet waits in its queue for the handshake, so nothing is lost.
    assert ping(first.ns, second.inner4, 3) == 3
    assert first.dump()[1][second.public].tx >= 148 + 32  # initiation, then data
    assert ping(second.ns, first.inner4, 3) == 3
    assert ping(left.ns, right.inner6, 3) == 3
    assert ping(right.ns, left.inner6, 3) == 3
    assert_handshaken(left, right)
    expected = f"{bracket(wire.b4 if outer == 4 else wire.b6)}:{right.port}"
    assert left.peer(right).endpoint == expected
    assert right.peer(left).endpoint == f"{bracket(wire.a4 if outer == 4 else wire.a6)}:{left.port}"

    before = left.peer(right)
    moved = {}
    for address in (right.inner4, right.inner6):
        moved[(address, "to wggo")] = iperf(right, left, address)  # wiretun sends
        moved[(address, "from wggo")] = iperf(right, left, address, reverse=True)  # wiretun receives
    assert all(n > 1_000_000 for n in moved.values()), moved
    after = left.peer(right)
    assert after.tx - before.tx > moved[(right.inner4, "to wggo")]
    assert after.rx - before.rx > moved[(right.inner4, "from wggo")]
    if left.device is not None:
        stats = left.stats()
        assert stats["rx_bad_tag"] == stats["rx_replay"] == stats["rx_disallowed_source"] == 0, stats
        assert stats["udp_tx_trains"] > 0  # bulk sends went out as UDP GSO trains
        assert stats["udp_tx_errors"] == stats["tun_tx_dropped"] == 0, stats


def test_small_outer_mtu_falls_back_from_udp_gso(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    # 1452-byte datagrams no longer fit the wire: the kernel fragments single sends but refuses
    # GSO trains (EMSGSIZE); the device notices and sends one by one.
    nsx(left.ns, "ip", "link", "set", wire.a_if, "mtu", "1280")
    nsx(right.ns, "ip", "link", "set", wire.b_if, "mtu", "1280")
    assert ping(left.ns, right.inner4, 2, size=1300) == 2
    assert iperf(right, left, right.inner4) > 1_000_000
    stats = left.stats()
    assert stats["udp_gso_refused"] > 0  # (trains of small datagrams may have gone out before)
    assert stats["udp_tx_errors"] == 0, stats


def test_private_key_changes_on_either_side(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    assert ping(left.ns, right.inner4, 2) == 2
    first = left.peer(right).latest_handshake

    # New key on the wiretun side; the wireguard-go side replaces the peer.
    old_public = left.public
    left.private, left.public = genkey()
    left.set("private-key", left.key_file(left.private))
    assert left.wg("show", left.ifname, "public-key").stdout.strip() == left.public
    right.set("peer", old_public, "remove")
    right.add_peer(left, wire.a4)
    time.sleep(1.05)  # handshake times have one-second resolution in wg show
    assert ping(left.ns, right.inner4, 3) == 3
    assert right.peer(left).latest_handshake > 0
    assert left.peer(right).latest_handshake > first
    assert old_public not in right.dump()[1]

    # New key on the wireguard-go side; the wiretun side replaces the peer; wireguard-go initiates.
    old_public = right.public
    right.private, right.public = genkey()
    right.set("private-key", right.key_file(right.private))
    left.set("peer", old_public, "remove")
    left.add_peer(right, wire.b4)
    assert left.peer(right).latest_handshake == 0
    assert ping(right.ns, left.inner4, 3) == 3
    assert_handshaken(left, right)
    assert [p.public_key for p in left.device.state().peers] == [base64.b64decode(right.public)]


def test_roaming_when_wiretun_changes_listen_port(lab):
    left, right, wire = pair(lab, "daemon", "wggo")
    assert ping(left.ns, right.inner4, 2) == 2
    left.set("listen-port", "51999")  # through the UAPI: the daemon rebinds
    assert left.wg("show", left.ifname, "listen-port").stdout.strip() == "51999"
    udp = nsx(left.ns, "ss", "-Hulpn").stdout
    assert ":51999 " in udp and ":51001 " not in udp
    # wireguard-go still has :51001; our next packets come from :51999 and it follows them.
    assert ping(left.ns, right.inner4, 3) == 3
    assert right.peer(left).endpoint == f"{wire.a4}:51999"
    assert ping(right.ns, left.inner4, 3) == 3


def test_roaming_when_wireguard_go_changes_address_and_port(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    assert ping(right.ns, left.inner4, 2) == 2
    assert left.peer(right).endpoint == f"{wire.b4}:{right.port}"
    # Move the wireguard-go side to another address and port. (The new port also makes wireguard-go
    # forget the source address it had cached; it does not retry a vanished source by itself.)
    nsx(right.ns, "ip", "addr", "del", f"{wire.b4}/24", "dev", wire.b_if)
    nsx(right.ns, "ip", "addr", "add", "192.168.1.77/24", "dev", wire.b_if)
    right.set("listen-port", "51333")
    assert ping(right.ns, left.inner4, 3) == 3
    assert left.peer(right).endpoint == "192.168.1.77:51333"  # learned from authenticated packets
    assert ping(left.ns, right.inner4, 3) == 3  # and we answer at the new place
    assert ping(left.ns, right.inner6, 3) == 3
    assert left.stats()["udp_tx_errors"] == 0


def test_cryptokey_routing_filters_both_ways(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    assert ping(left.ns, right.inner4, 2) == 2
    # wireguard-go sends from 10.9.9.9, which our peer entry does not allow: decrypted, then dropped.
    nsx(right.ns, "ip", "addr", "add", "10.9.9.9/32", "dev", right.ifname)
    before = left.stats()
    assert ping(right.ns, left.inner4, 3, source="10.9.9.9", wait=1) == 0
    after = left.stats()
    assert after["rx_disallowed_source"] - before["rx_disallowed_source"] == 3
    assert after["rx_data_packets"] == before["rx_data_packets"]
    # Allow it (and route the replies to it into the tunnel), and the same pings pass.
    left.add_peer(right, None, allowed=f"{right.inner4}/32,{right.inner6}/128,10.9.9.9/32")
    nsx(left.ns, "ip", "route", "add", "10.9.9.9/32", "dev", left.ifname)
    assert ping(right.ns, left.inner4, 3, source="10.9.9.9") == 3
    # Outbound: a destination no peer's allowed IPs cover is not sent anywhere.
    nsx(left.ns, "ip", "route", "add", "10.8.8.8/32", "dev", left.ifname)
    before = left.stats()
    assert ping(left.ns, "10.8.8.8", 2, wait=1) == 0
    assert left.stats()["tx_no_route"] - before["tx_no_route"] >= 2
    assert ping(left.ns, right.inner4, 2) == 2


def test_persistent_keepalive_on_the_wire(lab):
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    left, right, wire = pair(lab, "inproc", "wggo")
    # Turning keepalive on sends one at once: that alone makes the handshake happen.
    left.add_peer(right, wire.b4, "persistent-keepalive", "1")
    wait_for(lambda: left.peer(right).latest_handshake, 10, "the handshake the keepalive started")
    rx_before = right.peer(left).rx
    # Keepalives are transport messages with no content: 32 bytes of UDP payload, type 4.
    capture = subprocess.Popen(
        ["ip", "netns", "exec", left.ns, "tcpdump", "-i", wire.a_if, "-nn", "-l", "-q", "--immediate-mode",
         "-Q", "out", f"udp and src port {left.port} and udp[4:2] = 40 and udp[8] = 4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5):
            if "listening on" in capture.stderr.readline():
                break
        else:
            raise AssertionError("tcpdump did not start")
        time.sleep(3.4)
    finally:
        capture.send_signal(signal.SIGINT)
        out, _ = capture.communicate(timeout=10)
    keepalives = [line for line in out.splitlines() if "UDP, length 32" in line]
    assert 3 <= len(keepalives) <= 5, out
    assert right.peer(left).rx - rx_before >= 32 * 3
    assert left.peer(right).keepalive == "1"


def test_two_wiretun_devices(lab):
    left, right, wire = pair(lab, "inproc", "daemon", outer=6)
    assert ping(left.ns, right.inner4, 3) == 3
    assert ping(right.ns, left.inner6, 3) == 3
    assert iperf(right, left, right.inner4) > 1_000_000
    assert iperf(right, left, right.inner6, reverse=True) > 1_000_000
    stats = left.stats()
    # The daemon sent UDP GSO trains; over veth they arrive whole, and are cut up here (UDP GRO).
    assert stats["udp_tx_trains"] > 0 and stats["udp_rx_trains"] > 0, stats
    assert stats["rx_bad_tag"] == stats["rx_replay"] == stats["udp_rx_errors"] == 0, stats
    assert_handshaken(left, right)
    assert left.peer(right).endpoint == f"[{wire.b6}]:{right.port}"


def test_hub_with_three_spokes(lab):
    hub_ns = lab.namespace()
    spokes_ns = [lab.namespace() for _ in range(3)]
    wires = [lab.wire(hub_ns, ns) for ns in spokes_ns]
    nsx(hub_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    hub = lab.node("inproc", hub_ns, 51000)
    spokes = [lab.node(kind, ns, 51001 + i) for i, (kind, ns) in enumerate(zip(("wggo", "daemon", "wggo"), spokes_ns))]
    for spoke, wire in zip(spokes, wires):
        hub.add_peer(spoke, wire.b4)
        # Each spoke reaches the whole tunnel subnet through the hub.
        spoke.add_peer(hub, wire.a4, allowed="10.77.0.0/24")
    for spoke in spokes:
        assert ping(spoke.ns, hub.inner4, 2) == 2, spoke
    # Spoke to spoke, forwarded by the hub's kernel back into the hub device.
    assert ping(spokes[0].ns, spokes[2].inner4, 3) == 3
    assert ping(spokes[2].ns, spokes[1].inner4, 3) == 3
    _, peers = hub.dump()
    assert len(peers) == 3
    for spoke, wire in zip(spokes, wires):
        p = peers[spoke.public]
        assert p.latest_handshake > 0 and p.rx > 0 and p.tx > 0
        assert p.endpoint == f"{wire.b4}:{spoke.port}"


def garbage_datagrams(rng: random.Random) -> Iterator[bytes]:
    """Every kind of bad datagram, each kind many times."""
    for _ in range(100):
        yield b""
        yield rng.randbytes(rng.randint(1, 31))  # shorter than any message
        yield bytes([1, 0, 0, 0]) + rng.randbytes(rng.choice((40, 143, 145, 200)))  # initiation, bad size
        yield bytes([1, 0, 0, 0]) + rng.randbytes(144)  # right size, random: bad MAC1
        yield bytes([2, 0, 0, 0]) + rng.randbytes(88)  # response, bad MAC1
        yield bytes([2, 0, 0, 0]) + rng.randbytes(50)  # response, bad size
        yield bytes([3, 0, 0, 0]) + rng.randbytes(60)  # cookie reply for no one
        yield bytes([4, 0, 0, 0]) + rng.randbytes(rng.randint(28, 1400))  # transport, unknown index
        yield bytes([rng.randint(5, 255)]) + rng.randbytes(rng.randint(31, 1400))  # no such type
        yield bytes([1, 1, 0, 0]) + rng.randbytes(144)  # reserved bytes set
    yield rng.randbytes(65000)


def test_garbage_does_not_disturb_an_established_tunnel(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    assert ping(right.ns, left.inner4, 2) == 2
    handshake = left.peer(right).latest_handshake
    before = left.stats()
    replies: list[int] = []
    pinger = threading.Thread(target=lambda: replies.append(ping(right.ns, left.inner4, 30, interval=0.05)))
    pinger.start()
    rng = random.Random(5)
    sent = 0
    with _netns.entered(right.ns):
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)]
    try:
        for i, data in enumerate(garbage_datagrams(rng)):
            if i % 2:
                senders[0].sendto(data, (wire.a4, left.port))
            else:
                senders[1].sendto(data, (wire.a6, left.port))
            sent += 1
            if i % 50 == 0:
                time.sleep(0.01)  # spread over the pings
    finally:
        for s in senders:
            s.close()
        pinger.join(30)  # ping() is bounded: 30 sends, then at most 2 s
    assert replies == [30]
    after = left.stats()
    delta = {k: after[k] - before[k] for k in after}
    for reason in ("rx_bad_size", "rx_bad_type", "rx_bad_mac1", "rx_unknown_index"):
        assert delta[reason] >= 100, (reason, delta)
    assert delta["udp_rx"] >= sent  # every datagram was read ...
    garbage_drops = sum(delta[k] for k in ("rx_bad_size", "rx_bad_type", "rx_bad_mac1", "rx_unknown_index"))
    assert garbage_drops == sent  # ... and each dropped for exactly one reason
    # The tunnel is untouched: same session, same endpoint, no handshake needed.
    p = left.peer(right)
    assert p.latest_handshake == handshake
    assert p.endpoint == f"{wire.b4}:{right.port}"
    assert ping(left.ns, right.inner6, 3) == 3


# ------------------------------------------------------------------ the device itself (in-process)


def make_inproc(ns: str, name: str | None = None):
    from wiretun.wireguard.device import Device

    with _netns.entered(ns):
        adapter = wiretun.Adapter.create(name or unique("wtp"), "WireGuard")
        try:
            device = Device(adapter)
        except BaseException:
            adapter.close()
            raise
    return adapter, device


@contextlib.contextmanager
def inproc_devices(*namespaces: str) -> Iterator[list[tuple[Any, Any]]]:
    made: list[tuple[Any, Any]] = []
    try:
        for ns in namespaces:
            made.append(make_inproc(ns))
        yield made
    finally:
        for adapter, device in made:
            device.close()
            adapter.close()


def test_python_api_two_devices(lab):
    from wiretun.wireguard import keys

    a_ns, b_ns = lab.namespace(), lab.namespace()
    wire = lab.wire(a_ns, b_ns)
    with inproc_devices(a_ns, b_ns) as [(ad_a, dev_a), (ad_b, dev_b)]:
        assert ad_a.get_mtu() == 1420 and dev_a.mtu == 1420  # wireguard-go's default, set on the TUN
        assert dev_a.listen_port != 0 and dev_a.public_key is None
        key_a, key_b = keys.generate_private_key(), keys.generate_private_key()
        psk = keys.generate_preshared_key()
        dev_a.configure(private_key=key_a, listen_port=51820)
        dev_b.configure(private_key=keys.to_base64(key_b), listen_port=51821)  # base64 works too
        assert dev_a.public_key == keys.public_key(key_a)
        dev_a.add_peer(keys.public_key(key_b), preshared_key=psk, endpoint=f"[{wire.b6}]:51821",
                       allowed_ips=["10.66.0.2/32"])
        # b knows no endpoint: its keepalive (sent when its interface comes up) has nowhere to go.
        dev_b.add_peer(keys.to_base64(keys.public_key(key_a)), preshared_key=keys.to_base64(psk),
                       allowed_ips=["10.66.0.1/32"], persistent_keepalive=25)
        assert not dev_b.is_up  # the interface is down: nothing is sent yet
        for adapter, device, address in ((ad_b, dev_b, "10.66.0.2/24"), (ad_a, dev_a, "10.66.0.1/24")):
            device.start()
            adapter.add_address(address)
            adapter.up()
            wait_for(lambda device=device: device.is_up, 5, "the device to follow its interface up")
        assert dev_b.stats["tx_no_endpoint"] >= 1
        assert ping(a_ns, "10.66.0.2", 3) == 3
        state = dev_a.state()
        assert state.listen_port == 51820 and state.private_key == key_a
        [peer] = state.peers
        assert peer.public_key == keys.public_key(key_b) and peer.preshared_key == psk
        assert peer.endpoint == (wire.b6, 51821)
        assert abs(peer.last_handshake_time_sec - time.time()) < 30
        assert peer.rx_bytes > 0 and peer.tx_bytes > 0
        assert [str(n) for n in peer.allowed_ips] == ["10.66.0.2/32"]
        b_peer = dev_b.peer(keys.public_key(key_a))
        assert b_peer is not None and b_peer.persistent_keepalive_interval == 25
        assert b_peer.endpoint == (wire.a6, 51820)  # learned from a's packets
        # Re-adding replaces the configuration; removing ends the traffic.
        dev_a.add_peer(keys.public_key(key_b), allowed_ips=["10.66.0.0/30"])
        assert [str(n) for n in dev_a.peer(keys.public_key(key_b)).allowed_ips] == ["10.66.0.0/30"]
        assert dev_a.peer(keys.public_key(key_b)).preshared_key == bytes(32)
        assert dev_a.remove_peer(keys.public_key(key_b)) is True
        assert dev_a.remove_peer(keys.public_key(key_b)) is False
        assert ping(a_ns, "10.66.0.2", 2, wait=0.5) == 0
        assert dev_a.stats["tx_no_route"] >= 2
        # Bad values are refused with the value and the limit named (never a key's text).
        with pytest.raises(wiretun.InvalidParameter, match="65535"):
            dev_a.configure(listen_port=70000)
        with pytest.raises(wiretun.InvalidParameter, match="own public key"):
            dev_a.add_peer(keys.public_key(key_a))
        with pytest.raises(wiretun.InvalidParameter, match="base64"):
            dev_a.configure(private_key="not a key")
        with pytest.raises(wiretun.InvalidParameter, match="prefix"):
            dev_a.add_peer(keys.public_key(key_b), allowed_ips=["10.0.0.300/32"])
        with pytest.raises(wiretun.InvalidParameter, match="port"):
            dev_a.add_peer(keys.public_key(key_b), endpoint="10.0.0.1:0")


def test_apply_semantics_follow_wireguard_go(lab):
    from wiretun.wireguard import keys
    from wiretun.wireguard.config import DeviceSet, PeerSet, UAPIError

    ns = lab.namespace()
    with inproc_devices(ns) as [(_adapter, device)]:
        own = keys.generate_private_key()
        p1, p2, p3 = (keys.public_key(keys.generate_private_key()) for _ in range(3))
        net = ipaddress.ip_network
        device.apply(DeviceSet(private_key=own, peers=[
            PeerSet(public_key=keys.public_key(own), endpoint=("10.0.0.9", 9)),  # our own key: ignored
            PeerSet(public_key=p1, allowed_ips=[(net("10.1.0.0/16"), False), (net("10.2.0.0/16"), False)]),
            PeerSet(public_key=p2, update_only=True),  # does not exist: not created
            PeerSet(public_key=p3, endpoint=("::ffff:192.0.2.7", 7)),  # IPv4-mapped: sent over IPv4
        ]))
        state = device.state()
        assert [p.public_key for p in state.peers] == [p1, p3]
        assert state.peers[1].endpoint == ("192.0.2.7", 7)
        # allowed_ip removal takes exactly that prefix from that peer; an IP moves between peers.
        device.apply(DeviceSet(peers=[
            PeerSet(public_key=p1, allowed_ips=[(net("10.2.0.0/16"), True)]),
            PeerSet(public_key=p3, update_only=True, allowed_ips=[(net("10.1.0.0/16"), False)]),
        ]))
        state = device.state()
        assert state.peers[0].allowed_ips == [] and state.peers[1].allowed_ips == [net("10.1.0.0/16")]
        # A port in use: EADDRINUSE, and the device keeps its sockets and port.
        port = device.listen_port
        with _netns.entered(ns):
            squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            squatter.bind(("0.0.0.0", 0))
            with pytest.raises(UAPIError) as info:
                device.apply(DeviceSet(listen_port=squatter.getsockname()[1], private_key=bytes(32)))
            assert info.value.errno == errno.EADDRINUSE
            assert device.listen_port == port and device.public_key == keys.public_key(own)
        finally:
            squatter.close()
        # fwmark reaches both sockets; 0 clears it.
        device.apply(DeviceSet(fwmark=0x51))
        assert device.state().fwmark == 0x51
        socks = (device._conn.sock4, device._conn.sock6)
        assert {s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) for s in socks} == {0x51}
        device.apply(DeviceSet(fwmark=0, listen_port=0))
        assert device._conn.sock4.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        assert device.listen_port not in (0, port)
        assert device._conn.sock6.getsockname()[1] == device.listen_port
        # A private key equal to a peer's public key removes that peer; replace_peers removes all.
        k3 = keys.generate_private_key()
        device.apply(DeviceSet(peers=[PeerSet(public_key=keys.public_key(k3))]))
        device.apply(DeviceSet(private_key=k3))
        assert keys.public_key(k3) not in [p.public_key for p in device.state().peers]
        device.apply(DeviceSet(replace_peers=True, peers=[PeerSet(public_key=p2)]))
        assert [p.public_key for p in device.state().peers] == [p2]
        device.apply(DeviceSet(private_key=bytes(32)))
        assert device.state().private_key is None


def test_device_follows_link_state_and_mtu(lab):
    left, right, wire = pair(lab, "inproc", "wggo")
    assert ping(left.ns, right.inner4, 2) == 2
    first = left.peer(right).latest_handshake
    nsx(left.ns, "ip", "link", "set", left.ifname, "mtu", "1380")
    wait_for(lambda: left.device.mtu == 1380, 5, "the device to see the new MTU")
    nsx(left.ns, "ip", "link", "set", left.ifname, "down")
    wait_for(lambda: not left.device.is_up, 5, "the device to go down with its interface")
    nsx(left.ns, "ip", "link", "set", left.ifname, "up")
    wait_for(lambda: left.device.is_up, 5, "the device to come up again")
    nsx(left.ns, "ip", "route", "replace", "10.77.0.0/24", "dev", left.ifname)  # set down dropped it
    time.sleep(1.05)
    # Going down dropped the session: the next packet needs (and gets) a new handshake.
    assert ping(left.ns, right.inner4, 3) == 3
    assert left.peer(right).latest_handshake > first


def test_adapter_deleted_closes_device(lab):
    ns = lab.namespace()
    adapter, device = make_inproc(ns)
    try:
        device.start()
        assert not device.closed.is_set()
        nsx(ns, "ip", "link", "del", adapter.kernel_name)
        assert device.closed.wait(5)
        device.close()  # idempotent, also after the loop closed it
        device.close()
    finally:
        adapter.close()


def test_close_before_start_and_twice(lab):
    ns = lab.namespace()
    adapter, device = make_inproc(ns)
    try:
        port = device.listen_port
        device.close()
        device.close()
        assert device.closed.is_set()
        with pytest.raises(wiretun.InvalidParameter):
            device.start()
        from wiretun.wireguard.config import DeviceSet, UAPIError
        with pytest.raises(UAPIError):
            device.apply(DeviceSet(listen_port=1))
        # The port is free again, and a new device can take the adapter.
        with _netns.entered(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.close()
        from wiretun.wireguard.device import Device
        Device(adapter).close()
    finally:
        adapter.close()
