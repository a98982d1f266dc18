"""Roaming and NAT: a client behind a masquerading router, on wiretun-wg and (so the test is known to
test something) on Debian's wireguard-go.

    client (C) --wire 1-- router (M: forwarding, iptables MASQUERADE, UDP conntrack timeouts of
                                  a few seconds) --wire 2-- server (S)

The server has no endpoint for the client: it learns the one the NAT gives (the router's address and
the mapped port), which ``wg show endpoints`` reports. The mapping expires when the tunnel is idle;
a persistent keepalive keeps it, so the server can reach the client at any time. A listen-port change
on the client, mid-tunnel, gives a new mapping that the server follows.
"""

from __future__ import annotations

import shutil
import time

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, nsx, ping, wait_for

pytestmark = pytest.mark.skipif(
    WIREGUARD_GO is None or any(shutil.which(t) is None for t in ("wg", "iptables")),
    reason="needs wireguard-go, wg and iptables",
)

CONNTRACK_TIMEOUT = 2  # seconds, for UDP mappings in the router's namespace


def endpoint_host(node: Node, other: Node) -> tuple[str, int]:
    host, _, port = node.peer(other).endpoint.rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("kind", ["daemon", "wggo"])
def test_endpoint_learnt_through_nat_and_kept_by_keepalive(lab: Lab, kind: str) -> None:
    c, m, s = lab.namespace(), lab.namespace(), lab.namespace()
    inside = lab.wire(c, m)  # client a4 / router b4
    outside = lab.wire(m, s)  # router a4 / server b4
    nsx(c, "ip", "route", "add", "default", "via", inside.b4)
    nsx(m, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    nsx(m, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", outside.a_if, "-j", "MASQUERADE")
    nsx(m, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={CONNTRACK_TIMEOUT}",
        f"net.netfilter.nf_conntrack_udp_timeout_stream={CONNTRACK_TIMEOUT}")

    client = lab.node(kind, c, 51041)
    server = lab.node(kind, s, 51042)
    client.add_peer(server, outside.b4)
    server.add_peer(client)  # learnt from the first authenticated packet

    # The server sees the router's address, never the client's own.
    assert ping(c, server.inner4, 3) == 3 and ping(s, client.inner4, 3) == 3
    host, port = endpoint_host(server, client)
    assert host == outside.a4, server.peer(client)
    assert 0 < port <= 0xFFFF
    assert endpoint_host(client, server) == (outside.b4, server.port)
    shown = nsx(s, "wg", "show", server.ifname, "endpoints").stdout
    assert f"{client.public}\t{outside.a4}:{port}" in shown, shown

    # Idle longer than the mapping lives: without a keepalive the server cannot reach the client.
    time.sleep(CONNTRACK_TIMEOUT + 2)
    assert ping(s, client.inner4, 2, wait=1) == 0

    # The client speaks again (new mapping), now with a keepalive every second: the mapping stays.
    client.set("peer", server.public, "persistent-keepalive", "1")
    assert ping(c, server.inner4, 2) == 2
    time.sleep(CONNTRACK_TIMEOUT + 2)
    assert ping(s, client.inner4, 3) == 3
    assert server.peer(client).rx > 0 and client.peer(server).keepalive == "1"

    # A listen-port change on the live client: its next packets leave from the new port, the router
    # maps them anew, and the server follows the new mapping.
    before = endpoint_host(server, client)
    client.set("listen-port", "51043")
    assert client.dump()[0][2] == "51043"
    assert ping(c, server.inner4, 3) == 3
    wait_for(lambda: endpoint_host(server, client) != before, 5, "the server to follow the new mapping")
    assert endpoint_host(server, client)[0] == outside.a4
    assert ping(s, client.inner4, 3) == 3
    time.sleep(CONNTRACK_TIMEOUT + 2)  # and the keepalive keeps the new mapping too
    assert ping(s, client.inner4, 3) == 3
