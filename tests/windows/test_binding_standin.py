"""The wintun.dll binding, run for real: every export called through the shim on the Linux stand-in.

Each test runs in its own network namespace; the stand-in's adapters are TUN devices there, configured
with Linux's ``ip`` (the IP Helper API is Windows'). Assertions are on exact bytes, codes and counts.
"""

from __future__ import annotations

import ctypes
import socket
import threading
import time

import pytest

from wiretun import errors, log, packet
from wiretun.windows import _platform

from .conftest import ip


@pytest.fixture
def adapter(netns, standin):
    handle = standin.create_adapter("wtb0", "BindingTest", None)
    try:
        ip("addr", "add", "10.0.0.1/24", "dev", "wtb0")
        ip("link", "set", "wtb0", "up")
        yield handle
    finally:
        standin.close_adapter(handle)


def test_shim_is_the_standin_branch_here():
    assert _platform.NAME == "standin"
    assert _platform.FUNCTYPE is ctypes.CFUNCTYPE


def test_identity_calls_and_logger(netns, standin):
    got: list[tuple[int, int, str]] = []
    standin.set_logger(lambda level, ts, msg: got.append((level, ts, msg)))
    assert standin.get_running_driver_version() == (0 << 16) | 14
    handle = standin.create_adapter("wtb1", "Types ü", None)
    try:
        index = socket.if_nametoindex("wtb1")
        assert standin.get_adapter_luid(handle) == index  # the stand-in's LUID is the ifindex
        opened = standin.open_adapter("wtb1")
        assert standin.get_adapter_luid(opened) == index
        standin.close_adapter(opened)  # an opened handle does not remove the adapter
        assert socket.if_nametoindex("wtb1") == index
    finally:
        standin.close_adapter(handle)
    with pytest.raises(OSError):
        socket.if_nametoindex("wtb1")  # the creating handle's close removed it
    standin.delete_driver()
    # The stand-in writes non-ASCII bytes as '?': "ü" is two UTF-8 bytes.
    assert [m for _, _, m in got] == [f"Created adapter wtb1 (tunnel type Types ??, index {index})",
                                      "Removed adapter wtb1"]
    level, ts, _ = got[0]
    assert level == log.LogLevel.INFO
    assert abs(log.filetime_to_unix(ts) - time.time()) < 60


def test_failures_map_to_wintun_errors(netns, standin, adapter):
    with pytest.raises(errors.AlreadyExists) as e1:
        standin.create_adapter("wtb0", "BindingTest", None)
    assert e1.value.code == errors.ERROR_ALREADY_EXISTS
    with pytest.raises(errors.NotFound) as e2:
        standin.open_adapter("absent0")
    assert e2.value.code == errors.ERROR_FILE_NOT_FOUND and "1168" in str(e2.value)
    with pytest.raises(errors.NotFound):
        standin.open_adapter("lo")  # not a TUN: not an adapter
    with pytest.raises(errors.InvalidParameter) as e3:
        standin.create_adapter("Data Center", "BindingTest", None)  # the stand-in's own name limit
    assert "123" in str(e3.value)
    for bad in (0x1000, 0x30000, 0x8000000):
        with pytest.raises(errors.InvalidParameter):
            standin.start_session(adapter, bad)
    session = standin.start_session(adapter, 0x20000)
    try:
        with pytest.raises(errors.Busy) as e4:
            standin.start_session(adapter, 0x20000)
        assert e4.value.code == errors.ERROR_BUSY and "1247" in str(e4.value)
        with pytest.raises(errors.InvalidParameter):
            standin.allocate_send_packet(session, 0x10000)
    finally:
        standin.end_session(session)


def test_packets_both_ways_with_exact_bytes(netns, standin, adapter):
    session = standin.start_session(adapter, 0x20000)
    event = standin.get_read_wait_event(session)
    size = ctypes.c_uint32()
    try:
        request = packet.ipv4_icmp_echo("10.0.0.2", "10.0.0.1", ident=0x4242, seq=9, payload=b"binding", ttl=64)
        address = standin.allocate_send_packet(session, len(request))
        ctypes.memmove(address, request, len(request))
        standin.send_packet(session, address)
        deadline = time.monotonic() + 3
        reply = b""
        while time.monotonic() < deadline:
            p = standin.receive_packet(session, size)
            if not p:
                _platform.wait(event, 200)
                continue
            data = ctypes.string_at(p, size.value)
            standin.release_receive_packet(session, p)
            if data[9] == packet.PROTO_ICMP:
                reply = data
                break
        expected = packet.ipv4_icmp_echo("10.0.0.1", "10.0.0.2", 0x4242, 9, b"binding", request=False)
        assert reply[20:] == expected[20:] and reply[12:20] == expected[12:20]
        assert packet.verify_checksums(reply)
        # Empty: no exception, 0; the event wakes a waiter when the kernel sends something.
        while standin.receive_packet(session, size):
            pass
        woke: list[bool] = []
        t = threading.Thread(target=lambda: woke.append(_platform.wait(event, 3000)))
        t.start()
        time.sleep(0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"wake", ("10.0.0.2", 9))
        t.join(5)
        assert woke == [True]
    finally:
        standin.end_session(session)
