"""The control side of wiretun-wg as WireGuard users meet it (issue 9 item 5): every fwmark value, UAPI
clients that stay connected, many clients, running out of file descriptors, and very large ``set``
requests. Each runs against the wiretun-wg daemon (or an in-process device) in namespaces this test
makes, with the real ``wg``; where marked, the same test runs against Debian's wireguard-go so it is
known to test something real.
"""

from __future__ import annotations

import re

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, nsx

KINDS = ["daemon", pytest.param("wggo", marks=pytest.mark.skipif(WIREGUARD_GO is None,
                                                                 reason="wireguard-go is not installed"))]

FWMARKS = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1234]


def socket_marks(node: Node) -> list[int]:
    """SO_MARK of each UDP socket bound to the node's port, as the kernel reports it (``ss -e``)."""
    out = nsx(node.ns, "ss", "-Huanpe", f"sport = :{node.port}").stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"no UDP socket on port {node.port} in {node.ns}"
    marks = []
    for line in lines:
        found = re.search(r"fwmark:0x([0-9a-f]+)", line)
        marks.append(int(found.group(1), 16) if found else 0)
    return marks


def shown_fwmark(node: Node) -> int:
    text = node.wg("show", node.ifname, "fwmark").stdout.strip()
    return 0 if text == "off" else int(text, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_every_fwmark_from_wg(lab: Lab, kind: str) -> None:
    node = lab.node(kind, lab.namespace(), 51820)
    for mark in FWMARKS:
        node.set("fwmark", hex(mark))
        assert shown_fwmark(node) == mark, hex(mark)
        assert socket_marks(node) == [mark, mark], hex(mark)
    # A mark survives a listen-port change (new sockets get it) and goes with the rest of a set.
    node.set("fwmark", "0xfffffffe", "listen-port", "51821")
    node.port = 51821
    assert shown_fwmark(node) == 0xFFFFFFFE
    assert socket_marks(node) == [0xFFFFFFFE, 0xFFFFFFFE]


def test_every_fwmark_from_python(lab: Lab) -> None:
    node = lab.node("inproc", lab.namespace(), 51820)
    for mark in FWMARKS:
        node.device.configure(fwmark=mark)
        assert node.device.fwmark == mark
        assert shown_fwmark(node) == mark, hex(mark)
        assert socket_marks(node) == [mark, mark], hex(mark)
    node.device.configure(fwmark=0x80000001, listen_port=51822)
    node.port = 51822
    assert socket_marks(node) == [0x80000001, 0x80000001]
    assert shown_fwmark(node) == 0x80000001
