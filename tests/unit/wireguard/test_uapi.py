"""The UAPI text protocol (parse_set / format_get) and the socket server, without root.

Expected texts and errno values are wireguard-go's (device/uapi.go, ipc/uapi_unix.go).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretun.errors import AlreadyExists, InvalidParameter
from wiretun.wireguard.allowedips import network_slot, slot_network
from wiretun.wireguard.config import AllowedIPList, DeviceSet, DeviceState, PeerSet, PeerState, UAPIError
from wiretun.wireguard.uapi import (
    MAX_LINE_LENGTH,
    UAPIServer,
    format_errno,
    format_get,
    format_ip,
    format_slot,
    parse_prefix,
    parse_prefix_change,
    parse_set,
    socket_path,
)

from ...uapi_client import connect, exchange, read_reply

PRIV_HEX = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a"
PUB1_HEX = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33"
PUB2_HEX = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376"
PSK_HEX = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52"
ZERO_HEX = "0" * 64


def body(text: str) -> list[str]:
    return text.strip("\n").split("\n")


def errno_of(text: str) -> int:
    with pytest.raises(UAPIError) as info:
        parse_set(body(text))
    return info.value.errno


# --------------------------------------------------------------------------------------- parse_set


def test_parse_every_device_key():
    req = parse_set(body(f"private_key={PRIV_HEX}\nlisten_port=51820\nfwmark=4294967295\nreplace_peers=true"))
    assert req.private_key == bytes.fromhex(PRIV_HEX)  # already clamped: unchanged
    assert req.listen_port == 51820
    assert req.fwmark == 0xFFFFFFFF
    assert req.replace_peers is True
    assert req.peers == []


def test_parse_nothing_is_an_empty_request():
    assert parse_set([]) == DeviceSet()
    assert parse_set(["", "listen_port=1"]) == DeviceSet()  # the blank line ends the request


def test_private_key_is_clamped_like_wireguard_go():
    req = parse_set([f"private_key={'ff' * 32}"])
    assert req.private_key == bytes([0xF8]) + b"\xff" * 30 + bytes([0x7F])
    assert parse_set([f"private_key={ZERO_HEX}"]).private_key == bytes(32)  # zero = clear, not clamped


def test_uppercase_hex_keys():
    req = parse_set([f"public_key={PUB1_HEX.upper()}", f"preshared_key={PSK_HEX.upper()}"])
    assert req.peers[0].public_key == bytes.fromhex(PUB1_HEX)
    assert req.peers[0].preshared_key == bytes.fromhex(PSK_HEX)


def test_parse_every_peer_key():
    req = parse_set(body(f"""
public_key={PUB1_HEX}
update_only=true
preshared_key={PSK_HEX}
endpoint=[abcd:23::33%2]:51820
persistent_keepalive_interval=25
replace_allowed_ips=true
allowed_ip=192.168.4.4/32
allowed_ip=-10.0.0.0/8
allowed_ip=fd00::1/64
protocol_version=1
public_key={PUB2_HEX}
remove=true
"""))
    p1, p2 = req.peers
    assert p1 == PeerSet(
        public_key=bytes.fromhex(PUB1_HEX),
        update_only=True,
        preshared_key=bytes.fromhex(PSK_HEX),
        endpoint=("abcd:23::33%2", 51820),
        persistent_keepalive_interval=25,
        replace_allowed_ips=True,
        allowed_ips=[
            (ipaddress.ip_network("192.168.4.4/32"), False),
            (ipaddress.ip_network("10.0.0.0/8"), True),
            (ipaddress.ip_network("fd00::/64"), False),  # host bits cleared, as wireguard-go stores it
        ],
        protocol_version=1,
    )
    assert p2 == PeerSet(public_key=bytes.fromhex(PUB2_HEX), remove=True)


def test_replace_allowed_ips_drops_prefixes_given_before_it():
    # wireguard-go applies lines in order: replace_allowed_ips removes what earlier lines added.
    req = parse_set([f"public_key={PUB1_HEX}", "allowed_ip=10.0.0.1/32", "replace_allowed_ips=true",
                     "allowed_ip=10.0.0.2/32"])
    assert req.peers[0].allowed_ips == [(ipaddress.ip_network("10.0.0.2/32"), False)]


def test_zero_preshared_key_and_lines_with_crlf():
    req = parse_set([f"public_key={PUB1_HEX}\r\n", f"preshared_key={ZERO_HEX}\n", "endpoint=1.2.3.4:5\r"])
    assert req.peers[0].preshared_key == bytes(32)
    assert req.peers[0].endpoint == ("1.2.3.4", 5)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:51821", ("127.0.0.1", 51821)),
        ("[::1]:0", ("::1", 0)),
        ("[2001:DB8:0:0::1]:65535", ("2001:db8::1", 65535)),
        ("[::ffff:1.2.3.4]:80", ("::ffff:1.2.3.4", 80)),
        ("[fe80::1%eth0]:51820", ("fe80::1%eth0", 51820)),
        ("10.0.0.1:000443", ("10.0.0.1", 443)),
    ],
)
def test_endpoints(value, expected):
    assert parse_set([f"public_key={PUB1_HEX}", f"endpoint={value}"]).peers[0].endpoint == expected


@pytest.mark.parametrize(
    "value",
    [
        "", "1.2.3.4", "1.2.3.4:", ":51820", "1.2.3.4:65536", "1.2.3.4:-1", "1.2.3.4:+1", "1.2.3.4: 1",
        "1.2.3.4:1_0", "1.2.3.4:０", "::1:51820", "[1.2.3.4]:1", "[::1:1", "[::1]", "example.com:51820",
        "localhost:1", "01.2.3.4:1", "1.2.3.4%eth0:1", "256.1.1.1:1", "1.2.3.4:" + "0" * 6000 + "1x",
        "1.2.3.4:" + "0" * 6000 + "65536",
    ],
)
def test_bad_endpoint_is_einval(value):
    assert errno_of(f"public_key={PUB1_HEX}\nendpoint={value}") == errno.EINVAL


@pytest.mark.parametrize(
    "line",
    [
        f"private_key={PRIV_HEX[:-1]}", f"private_key={PRIV_HEX}0", f"private_key={PRIV_HEX[:-1]}g",
        f"private_key= {PRIV_HEX[:-1]}", "private_key=", f"public_key={PUB1_HEX[:-2]}",
        f"public_key={PUB1_HEX[:-2]}zz",
    ],
)
def test_bad_hex_is_einval(line):
    assert errno_of(line) == errno.EINVAL


def test_bad_hex_message_does_not_contain_the_key():
    secret = PRIV_HEX[:-1] + "x"
    with pytest.raises(UAPIError) as info:
        parse_set([f"private_key={secret}"])
    assert secret[:20] not in str(info.value)
    assert "64 hex digits" in str(info.value)


@pytest.mark.parametrize(
    "line",
    [
        "listen_port=65536", "listen_port=-1", "listen_port=", "listen_port= 1", "listen_port=0x10",
        "fwmark=4294967296", "fwmark=1.0", "replace_peers=false", "replace_peers=TRUE", "replace_peers=1",
        "listen_port=" + "9" * 5000,
    ],
)
def test_bad_device_values_are_einval(line):
    assert errno_of(line) == errno.EINVAL


@pytest.mark.parametrize(
    "line",
    [
        "update_only=false", "remove=yes", "replace_allowed_ips=", "persistent_keepalive_interval=65536",
        "persistent_keepalive_interval=-1", "allowed_ip=10.0.0.1", "allowed_ip=10.0.0.0/33",
        "allowed_ip=::/129", "allowed_ip=10.0.0.0/08", "allowed_ip=10.0.0.0/255.0.0.0",
        "allowed_ip=fe80::1%eth0/64", "allowed_ip=--10.0.0.0/8", "allowed_ip=10.0.0.0/", "allowed_ip=/8",
        "allowed_ip=10.0.0.0/+8", f"preshared_key={PSK_HEX[:10]}",
    ],
)
def test_bad_peer_values_are_einval(line):
    assert errno_of(f"public_key={PUB1_HEX}\n{line}") == errno.EINVAL


@pytest.mark.parametrize("value", ["0", "2", "01", "", "1 "])
def test_bad_protocol_version_is_einval(value):
    assert errno_of(f"public_key={PUB1_HEX}\nprotocol_version={value}") == errno.EINVAL


@pytest.mark.parametrize("line", ["bogus=1", "=1", "last_handshake_time_sec=0", "tx_bytes=0", "errno=0"])
def test_unknown_device_key_is_einval(line):
    assert errno_of(line) == errno.EINVAL


def test_unknown_peer_key_and_device_key_in_peer_section_are_einval():
    assert errno_of(f"public_key={PUB1_HEX}\nbogus=1") == errno.EINVAL
    assert errno_of(f"public_key={PUB1_HEX}\nlisten_port=1") == errno.EINVAL
    assert errno_of(f"public_key={PUB1_HEX}\nprivate_key={PRIV_HEX}") == errno.EINVAL


@pytest.mark.parametrize(
    "line",
    ["allowed_ip=10.0.0.0/8", "endpoint=1.2.3.4:5", f"preshared_key={PSK_HEX}", "remove=true",
     "update_only=true", "persistent_keepalive_interval=5", "replace_allowed_ips=true", "protocol_version=1"],
)
def test_peer_key_before_any_public_key_is_einval(line):
    assert errno_of(line) == errno.EINVAL


def test_line_without_equals_is_eproto():
    assert errno_of("listen_port") == errno.EPROTO
    assert errno_of(f"public_key={PUB1_HEX}\nremove") == errno.EPROTO


def test_overlong_line_is_eio():
    assert errno_of("listen_port=" + "1" * MAX_LINE_LENGTH) == errno.EIO


def test_first_error_wins():
    assert errno_of("listen_port=x\nnoequals") == errno.EINVAL
    assert errno_of("noequals\nlisten_port=x") == errno.EPROTO


# -------------------------------------------------------------------------------------- format_get

EXPECTED_GET = f"""private_key={PRIV_HEX}
listen_port=12912
fwmark=3
public_key={PUB1_HEX}
preshared_key={PSK_HEX}
protocol_version=1
endpoint=[abcd:23::33%2]:51820
last_handshake_time_sec=1700000000
last_handshake_time_nsec=123456789
tx_bytes=38333
rx_bytes=2224
persistent_keepalive_interval=25
allowed_ip=192.168.4.4/32
allowed_ip=::ffff:10.0.0.0/104
allowed_ip=fd00::/64
public_key={PUB2_HEX}
preshared_key={ZERO_HEX}
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0

"""


def sample_state() -> DeviceState:
    return DeviceState(
        private_key=bytes.fromhex(PRIV_HEX),
        listen_port=12912,
        fwmark=3,
        peers=[
            PeerState(
                public_key=bytes.fromhex(PUB1_HEX),
                preshared_key=bytes.fromhex(PSK_HEX),
                endpoint=("abcd:23::33%2", 51820),
                persistent_keepalive_interval=25,
                last_handshake_time_sec=1700000000,
                last_handshake_time_nsec=123456789,
                rx_bytes=2224,
                tx_bytes=38333,
                allowed_ips=[
                    ipaddress.ip_network("192.168.4.4/32"),
                    ipaddress.ip_network("::ffff:10.0.0.0/104"),
                    ipaddress.ip_network("fd00::/64"),
                ],
            ),
            PeerState(public_key=bytes.fromhex(PUB2_HEX)),
        ],
    )


def test_format_get_order_and_values_byte_for_byte():
    assert format_get(sample_state()) == EXPECTED_GET


def test_format_get_omits_zero_device_values():
    assert format_get(DeviceState()) == "errno=0\n\n"
    assert format_get(DeviceState(private_key=bytes(32), listen_port=0, fwmark=0)) == "errno=0\n\n"
    assert format_get(DeviceState(listen_port=1)) == "listen_port=1\nerrno=0\n\n"


def test_format_get_endpoints():
    def endpoint_line(host: str, port: int) -> str:
        text = format_get(DeviceState(peers=[PeerState(public_key=bytes(32), endpoint=(host, port))]))
        return next(line for line in text.splitlines() if line.startswith("endpoint="))

    assert endpoint_line("10.1.2.3", 1) == "endpoint=10.1.2.3:1"
    assert endpoint_line("::1", 51820) == "endpoint=[::1]:51820"
    assert endpoint_line("2001:0db8::0001", 2) == "endpoint=[2001:db8::1]:2"
    assert endpoint_line("::ffff:1.2.3.4", 3) == "endpoint=[::ffff:1.2.3.4]:3"


def test_format_get_rejects_a_short_key():
    with pytest.raises(InvalidParameter, match="32 bytes"):
        format_get(DeviceState(private_key=b"\x01" * 31))


def test_format_errno_is_negated_like_wireguard_go():
    assert format_errno(0) == "errno=0\n\n"
    assert format_errno(errno.EINVAL) == "errno=-22\n\n"
    assert format_errno(-errno.EADDRINUSE) == "errno=-98\n\n"


# ---------------------------------------------------------------------------------- round trips


def parse_get(text: str) -> DeviceState:
    """Read a get reply the way wg's userspace_get_device does (a test-side reader)."""
    assert text.endswith("errno=0\n\n")
    state = DeviceState()
    peer: PeerState | None = None
    for line in text[: -len("errno=0\n\n")].splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = PeerState(public_key=bytes.fromhex(value))
            state.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                state.private_key = bytes.fromhex(value)
            else:
                setattr(state, key, int(value))
        elif key == "preshared_key":
            peer.preshared_key = bytes.fromhex(value)
        elif key == "endpoint":
            host, _, port = value.rpartition(":")
            peer.endpoint = (host.strip("[]"), int(port))
        elif key == "allowed_ip":
            peer.allowed_ips.append(ipaddress.ip_network(value))
        else:
            setattr(peer, key, int(value))
    return state


def format_set(request: DeviceSet) -> str:
    """A set body as wg's userspace_set_device writes it (a test-side writer)."""
    lines = []
    if request.private_key is not None:
        lines.append(f"private_key={request.private_key.hex()}")
    if request.listen_port is not None:
        lines.append(f"listen_port={request.listen_port}")
    if request.fwmark is not None:
        lines.append(f"fwmark={request.fwmark}")
    if request.replace_peers:
        lines.append("replace_peers=true")
    for p in request.peers:
        lines.append(f"public_key={p.public_key.hex()}")
        if p.remove:
            lines.append("remove=true")
        if p.update_only:
            lines.append("update_only=true")
        if p.preshared_key is not None:
            lines.append(f"preshared_key={p.preshared_key.hex()}")
        if p.endpoint is not None:
            host = f"[{p.endpoint[0]}]" if ":" in p.endpoint[0] else p.endpoint[0]
            lines.append(f"endpoint={host}:{p.endpoint[1]}")
        if p.persistent_keepalive_interval is not None:
            lines.append(f"persistent_keepalive_interval={p.persistent_keepalive_interval}")
        if p.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        for net, remove in p.allowed_ips:
            lines.append(f"allowed_ip={'-' if remove else ''}{net}")
        if p.protocol_version is not None:
            lines.append(f"protocol_version={p.protocol_version}")
    return "\n".join(lines) + "\n\n"


def test_round_trip_of_the_sample():
    assert parse_get(format_get(sample_state())) == sample_state()
    assert format_get(parse_get(EXPECTED_GET)) == EXPECTED_GET


keys = st.binary(min_size=32, max_size=32)
clamped_keys = keys.map(lambda k: bytes([k[0] & 248]) + k[1:31] + bytes([(k[31] & 127) | 64]))
v4_nets = st.builds(lambda a, n: ipaddress.ip_network((ipaddress.IPv4Address(a), n), strict=False),
                    st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_nets = st.builds(lambda a, n: ipaddress.ip_network((ipaddress.IPv6Address(a), n), strict=False),
                    st.integers(0, 2**128 - 1), st.integers(0, 128))
endpoints = st.one_of(
    st.builds(lambda a, p: (str(ipaddress.IPv4Address(a)), p), st.integers(0, 2**32 - 1), st.integers(0, 65535)),
    st.builds(lambda a, p: (str(ipaddress.IPv6Address(a)), p),
              st.integers(0, 2**128 - 1).filter(lambda a: a >> 32 != 0xFFFF), st.integers(0, 65535)),
)
peer_states = st.builds(
    PeerState,
    public_key=keys,
    preshared_key=keys,
    endpoint=st.none() | endpoints,
    persistent_keepalive_interval=st.integers(0, 65535),
    last_handshake_time_sec=st.integers(0, 2**63 - 1),
    last_handshake_time_nsec=st.integers(0, 999_999_999),
    rx_bytes=st.integers(0, 2**64 - 1),
    tx_bytes=st.integers(0, 2**64 - 1),
    allowed_ips=st.lists(v4_nets | v6_nets, max_size=5),
)
device_states = st.builds(
    DeviceState,
    private_key=st.none() | clamped_keys.filter(any),
    listen_port=st.integers(0, 65535),
    fwmark=st.integers(0, 2**32 - 1),
    peers=st.lists(peer_states, max_size=4),
)
peer_sets = st.builds(
    PeerSet,
    public_key=keys,
    remove=st.booleans(),
    update_only=st.booleans(),
    preshared_key=st.none() | keys,
    endpoint=st.none() | endpoints,
    persistent_keepalive_interval=st.none() | st.integers(0, 65535),
    replace_allowed_ips=st.booleans(),
    allowed_ips=st.lists(st.tuples(v4_nets | v6_nets, st.booleans()), max_size=5),
    protocol_version=st.none() | st.just(1),
)
device_sets = st.builds(
    DeviceSet,
    private_key=st.none() | clamped_keys,
    listen_port=st.none() | st.integers(0, 65535),
    fwmark=st.none() | st.integers(0, 2**32 - 1),
    replace_peers=st.booleans(),
    peers=st.lists(peer_sets, max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(device_states)
def test_round_trip_get(state):
    state = DeviceState(  # what get can express: None and zero private keys both read back as absent
        private_key=state.private_key, listen_port=state.listen_port, fwmark=state.fwmark, peers=state.peers)
    assert parse_get(format_get(state)) == state


@settings(max_examples=200, deadline=None)
@given(device_sets)
def test_round_trip_set(request):
    assert parse_set(format_set(request).splitlines(keepends=True)) == request


# ------------------------------------------------------------------------------------------ server


class RecordingDevice:
    """A device that records requests and answers get from a fixed state (protocol tests only)."""

    def __init__(self, state: DeviceState | None = None, fail: Exception | None = None) -> None:
        self.requests: list[DeviceSet] = []
        self.fixed_state = state or DeviceState()
        self.fail = fail

    def apply(self, request: DeviceSet) -> None:
        if self.fail is not None:
            raise self.fail
        self.requests.append(request)

    def state(self) -> DeviceState:
        return self.fixed_state


@pytest.fixture
def server(tmp_path):
    device = RecordingDevice(sample_state())
    srv = UAPIServer("wgtest0", device, directory=str(tmp_path / "wireguard"), timeout=2.0)
    srv.device = device  # type: ignore[attr-defined]
    yield srv
    srv.close()


def test_socket_path_and_modes(server, tmp_path):
    assert server.path == str(tmp_path / "wireguard" / "wgtest0.sock")
    assert stat.S_IMODE(os.stat(tmp_path / "wireguard").st_mode) == 0o755
    st_sock = os.stat(server.path)
    assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o700


def test_get_and_set_over_the_socket(server):
    assert exchange(server.path, "get=1\n\n") == EXPECTED_GET
    assert exchange(server.path, f"set=1\nlisten_port=7\npublic_key={PUB1_HEX}\nallowed_ip=-10.0.0.0/8\n\n") \
        == "errno=0\n\n"
    assert server.device.requests == [DeviceSet(listen_port=7, peers=[PeerSet(
        public_key=bytes.fromhex(PUB1_HEX), allowed_ips=[(ipaddress.ip_network("10.0.0.0/8"), True)])])]


def test_several_operations_per_connection(server):
    with connect(server.path) as s:
        for port in (1, 2, 3):
            s.sendall(b"get=1\n\n")
            assert read_reply(s) == EXPECTED_GET
            s.sendall(f"set=1\nlisten_port={port}\n\n".encode())
            assert read_reply(s) == "errno=0\n\n"
        # Pipelined: two requests in one write.
        s.sendall(b"set=1\nfwmark=9\n\nget=1\n\n")
        expected = ("errno=0\n\n" + EXPECTED_GET).encode()
        data = b""
        while len(data) < len(expected):
            data += s.recv(65536)
        assert data == expected
    assert [r.listen_port for r in server.device.requests] == [1, 2, 3, None]
    assert server.device.requests[-1].fwmark == 9


@pytest.mark.parametrize(
    "request_text, reply",
    [
        ("set=1\nbogus=1\n\n", "errno=-22\n\n"),
        ("set=1\nlisten_port=99999\n\n", "errno=-22\n\n"),
        (f"set=1\nprivate_key={PRIV_HEX[:-1]}q\n\n", "errno=-22\n\n"),
        (f"set=1\npublic_key={PUB1_HEX}\nendpoint=host.example:1\n\n", "errno=-22\n\n"),
        (f"set=1\npublic_key={PUB1_HEX}\nprotocol_version=2\n\n", "errno=-22\n\n"),
        ("set=1\nallowed_ip=10.0.0.0/8\n\n", "errno=-22\n\n"),
        ("set=1\nnoequals\n\n", "errno=-71\n\n"),
        ("get=1\nx\n", "errno=-22\n\n"),
    ],
)
def test_errors_reply_errno_and_change_nothing(server, request_text, reply):
    with connect(server.path) as s:
        s.sendall((request_text.replace("\n\n", "\nlisten_port=5\n\n") if "set" in request_text
                   else request_text).encode())
        assert read_reply(s) == reply
        # The connection is still in step: the next operation works.
        s.sendall(b"get=1\n\n")
        assert read_reply(s) == EXPECTED_GET
    assert server.device.requests == []


def test_apply_errors_are_passed_through(tmp_path):
    with UAPIServer("wgt1", RecordingDevice(fail=UAPIError(errno.EADDRINUSE, "port taken")),
                    directory=str(tmp_path)) as srv:
        assert exchange(srv.path, "set=1\nlisten_port=1\n\n") == "errno=-98\n\n"
    with UAPIServer("wgt2", RecordingDevice(fail=RuntimeError("bug")), directory=str(tmp_path)) as srv:
        assert exchange(srv.path, "set=1\nlisten_port=1\n\n") == "errno=-55\n\n"  # IpcErrorUnknown


def test_unknown_operation_closes_the_connection(server):
    with connect(server.path) as s:
        s.sendall(b"frobnicate=1\n\n")
        assert s.recv(100) == b""
    assert exchange(server.path, "get=1\n\n") == EXPECTED_GET


def test_overlong_line_gets_eio_and_is_disconnected(server):
    with connect(server.path) as s:
        s.sendall(b"set=1\nlisten_port=" + b"1" * (MAX_LINE_LENGTH + 10) + b"\n\n")
        assert read_reply(s) == "errno=-5\n\n"
        assert s.recv(100) == b""
    with connect(server.path) as s:  # an overlong operation line: hung up without a reply
        try:
            s.sendall(b"g" * (MAX_LINE_LENGTH + 100))
            assert s.recv(100) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed with our bytes unread: the kernel resets the connection
    assert exchange(server.path, "get=1\n\n") == EXPECTED_GET
    assert server.device.requests == []


def test_set_ended_by_eof_is_applied_and_answered(server):
    with connect(server.path) as s:
        s.sendall(b"set=1\nlisten_port=4")  # no newline on the last line: dropped, like Go's ReadString
        s.shutdown(socket.SHUT_WR)
        assert read_reply(s) == "errno=0\n\n"
    with connect(server.path) as s:
        s.sendall(b"set=1\nlisten_port=4\n")
        s.shutdown(socket.SHUT_WR)
        assert read_reply(s) == "errno=0\n\n"
    assert [r.listen_port for r in server.device.requests] == [None, 4]


def test_stuck_client_does_not_block_others_and_is_timed_out(server):
    stuck = connect(server.path)
    stuck.sendall(b"set=1\nlisten_port=1\n")  # never finishes
    half = connect(server.path)
    half.sendall(b"ge")
    try:
        t0 = time.monotonic()
        assert exchange(server.path, "get=1\n\n") == EXPECTED_GET
        # Served while the stuck client is still connected, i.e. without waiting for its timeout
        # (an ordering, which load cannot upset the way a bound in seconds can).
        stuck.setblocking(False)
        with pytest.raises(BlockingIOError):
            stuck.recv(100)
        stuck.settimeout(20)
        assert stuck.recv(100) == b""  # disconnected after the server's 2 s timeout
        assert 1.5 < time.monotonic() - t0 < 20
    finally:
        stuck.close()
        half.close()
    assert server.device.requests == []


def test_idle_client_between_requests_is_never_cut_off(server):
    with connect(server.path) as s:
        assert read_reply_of(s, b"get=1\n\n") == EXPECTED_GET
        time.sleep(2.6)  # longer than the server's 2 s timeout, idle between requests
        assert read_reply_of(s, b"get=1\n\n") == EXPECTED_GET
        s.sendall(b"set=1\n")  # a request begun, then idle inside it: that one is cut off
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert 1.5 < time.monotonic() - t0 < 10.0  # the 2 s timeout; the upper bound only catches "never"
    assert server.device.requests == []


def read_reply_of(s: socket.socket, request: bytes) -> str:
    s.sendall(request)
    return read_reply(s)


def test_one_thread_serves_every_client(server):
    before = threading.active_count()
    socks = [connect(server.path) for _ in range(100)]
    try:
        for s in socks[::10]:
            assert read_reply_of(s, b"get=1\n\n") == EXPECTED_GET
        assert threading.active_count() == before
    finally:
        for s in socks:
            s.close()


def test_client_that_does_not_read_its_reply_is_cut_off(tmp_path):
    big = DeviceState(peers=[PeerState(public_key=bytes.fromhex(PUB1_HEX),
                                       allowed_ips=[ipaddress.ip_network((i << 8, 24)) for i in range(60000)])])
    with UAPIServer("wgslow", RecordingDevice(big), directory=str(tmp_path), timeout=1.5) as srv:
        slow = connect(srv.path)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            slow.sendall(b"get=1\n\n")  # a 1.6 MB reply, never read
            time.sleep(0.2)
            t0 = time.monotonic()
            with connect(srv.path) as other:  # others are served meanwhile
                assert read_reply_of(other, b"set=1\nlisten_port=3\n\n") == "errno=0\n\n"
            assert time.monotonic() - t0 < 1.0
            time.sleep(2.5)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while True:
                    chunk = slow.recv(1 << 20)
                    if not chunk:
                        break
                    received += chunk
            assert 0 < len(received) < len(format_get(big))  # cut off part way
        finally:
            slow.close()


def test_garbage_never_kills_the_server(server):
    for junk in [b"\x00\xff\xfe\n\n", b"set=1\n\xff\xfe=\x80\n\n", b"\n\n\n", b"set=1\r\n\r\n", b"get=1\r\n"]:
        with connect(server.path) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    assert exchange(server.path, "get=1\n\n") == EXPECTED_GET


def test_many_concurrent_clients(server):
    results: list[str] = []

    def client() -> None:
        results.append(exchange(server.path, "get=1\n\n"))

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [EXPECTED_GET] * 20


def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "wgstale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves behind
    with UAPIServer("wgstale", RecordingDevice(), directory=str(tmp_path)) as srv:
        assert exchange(srv.path, "get=1\n\n") == "errno=0\n\n"
    assert not os.path.exists(path)


def test_live_socket_is_refused(tmp_path):
    with UAPIServer("wglive", RecordingDevice(), directory=str(tmp_path)) as first:
        with pytest.raises(AlreadyExists, match="wglive.sock.*in use"):
            UAPIServer("wglive", RecordingDevice(), directory=str(tmp_path))
        assert exchange(first.path, "get=1\n\n") == "errno=0\n\n"  # the first one is untouched


def test_non_socket_file_is_not_replaced(tmp_path):
    (tmp_path / "wgfile.sock").write_text("precious")
    with pytest.raises(AlreadyExists, match="not a socket"):
        UAPIServer("wgfile", RecordingDevice(), directory=str(tmp_path))
    assert (tmp_path / "wgfile.sock").read_text() == "precious"


def test_close_removes_only_its_own_socket(tmp_path):
    srv = UAPIServer("wgown", RecordingDevice(), directory=str(tmp_path))
    assert srv.socket_intact
    os.unlink(srv.path)
    assert not srv.socket_intact
    other = socket.socket(socket.AF_UNIX)
    other.bind(srv.path)  # someone else's socket now
    try:
        srv.close()
        srv.close()  # idempotent
        assert os.path.exists(srv.path)
        assert srv.closed
    finally:
        other.close()


def test_close_disconnects_clients(tmp_path):
    srv = UAPIServer("wgcl", RecordingDevice(), directory=str(tmp_path), timeout=30)
    s = connect(srv.path)
    s.sendall(b"set=1\n")
    time.sleep(0.1)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 10  # not the clients' 30 s timeout
    assert s.recv(100) == b""
    s.close()
    assert not os.path.exists(srv.path)


@pytest.mark.parametrize("name", ["", "a/b", "x\0y", "n" * 200])
def test_bad_interface_names(tmp_path, name):
    with pytest.raises(InvalidParameter):
        socket_path(name, str(tmp_path))


_PREFIX_PIECES = ["1", "01", "0", "00", "10", "255", "256", "ffff", "FFFF", "0001", "12345", ":", "::", ".", "/",
                  "%", "%eth0", "-", "a", "g", " ", "\t", "1.2.3.4", "::ffff:", "0x1", "+1", "32", "33", "128",
                  "129", "64", "é", "\x00", "[", "]"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PREFIX_PIECES), min_size=1, max_size=9))
def test_fast_prefix_parser_agrees_with_the_exact_one(pieces: list[str]) -> None:
    """parse_prefix_change's inet_pton path accepts exactly what parse_prefix (ipaddress, checked
    against wireguard-go) accepts, with the same network."""
    value = "".join(pieces)
    for text in (value, "-" + value):
        remove = text.startswith("-")
        try:
            expected: int | None = network_slot(parse_prefix(text[1:] if remove else text)) << 1 | remove
        except UAPIError:
            expected = None
        try:
            got: int | None = parse_prefix_change(text)
        except UAPIError:
            got = None
        assert got == expected, text


@pytest.mark.parametrize("value, network, remove", [
    ("10.1.2.3/8", "10.0.0.0/8", False),
    ("-10.1.2.3/8", "10.0.0.0/8", True),
    ("0.0.0.0/0", "0.0.0.0/0", False),
    ("2001:DB8::1/32", "2001:db8::/32", False),
    ("-::/0", "::/0", True),
    ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104", False),
])
def test_prefix_changes(value: str, network: str, remove: bool) -> None:
    change = parse_prefix_change(value)
    assert (slot_network(change >> 1), bool(change & 1)) == (ipaddress.ip_network(network), remove)


@pytest.mark.parametrize("value", ["10.0.0.0/08", "010.0.0.0/8", "10.0.0.0/33", "fe80::1%eth0/64", "::/129",
                                   "10.0.0.0", "--10.0.0.0/8", "10.0.0.0/+8", " 10.0.0.0/8", "10.0.0.0/8 ",
                                   "[::1]/128", "::1/0128"])
def test_prefixes_wireguard_go_refuses(value: str) -> None:
    with pytest.raises(UAPIError) as info:
        parse_prefix_change(value)
    assert info.value.errno == errno.EINVAL


_GROUPS = st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xFFFE, 0x2001, 0xDB8, 0x10, 0xABCD])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_GROUPS, min_size=8, max_size=8), st.integers(0, 128), st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_format_slot_prints_what_format_ip_prints(groups: list[int], length: int, v4: int, length4: int) -> None:
    address = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
    for net in (ipaddress.IPv6Network((address, length), strict=False),
                ipaddress.IPv4Network((v4, length4), strict=False),
                ipaddress.IPv6Network((address & (2**32 - 1), length), strict=False),
                ipaddress.IPv6Network(((0xFFFF << 32) | (address & (2**32 - 1)), length), strict=False)):
        assert format_slot(network_slot(net)) == f"{format_ip(net.network_address)}/{net.prefixlen}"


def test_state_with_slots_formats_like_a_list() -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "::ffff:10.0.0.0/104", "fd00::/64", "::102:304/128")]
    listed = DeviceState(peers=[PeerState(public_key=bytes(32), allowed_ips=list(nets))])
    slotted = DeviceState(peers=[PeerState(public_key=bytes(32),
                                           allowed_ips=AllowedIPList(network_slot(n) for n in nets))])
    assert format_get(slotted) == format_get(listed)
    assert slotted.peers[0].allowed_ips == nets
