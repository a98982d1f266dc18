"""Unit tests of the WireGuard core's parts: replay window, allowed IPs, cookies, rate limiter,
TAI64N, message layouts and key helpers.

The replay, allowed-IPs and rate-limiter sequences are the ones in wireguard-go (replay_test.go,
allowedips_test.go, ratelimiter_test.go), which port the kernel's selftests.
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from wiretun.errors import InvalidData, InvalidParameter
from wiretun.wireguard import keys, messages, tai64n
from wiretun.wireguard.allowedips import AllowedIPs, prefix_slot
from wiretun.wireguard.cookie import CookieChecker, CookieGenerator, RateLimiter
from wiretun.wireguard.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayFilter

# ----------------------------------------------------------------------------- replay


def test_replay_window_size_matches_kernel() -> None:
    assert WINDOW_SIZE == (128 - 1) * 64 == 8128
    assert REJECT_AFTER_MESSAGES == (1 << 64) - (1 << 13) - 1


def test_replay_sequence_from_wireguard_go() -> None:
    f = ReplayFilter()
    lim = WINDOW_SIZE + 1
    ram = REJECT_AFTER_MESSAGES
    sequence = [
        (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
        (lim, True), (lim - 1, True), (lim - 1, False), (lim - 2, True), (2, True), (2, False),
        (lim + 16, True), (3, False), (lim + 16, False), (lim * 4, True), (lim * 4 - (lim - 1), True),
        (10, False), (lim * 4 - lim, False), (lim * 4 - (lim + 1), False), (lim * 4 - (lim - 2), True),
        (lim * 4 + 1 - lim, False), (0, False), (ram, False), (ram - 1, True), (ram, False),
        (ram - 1, False), (ram - 2, True), (ram + 1, False), (ram + 2, False), (ram - 2, False),
        (ram - 3, True), (0, False),
    ]  # fmt: skip
    for number, (counter, expected) in enumerate(sequence, 1):
        assert f.validate(counter, REJECT_AFTER_MESSAGES) is expected, f"step {number}: {counter}"


def _bulk(f: ReplayFilter, counters, expected: bool = True) -> None:
    for c in counters:
        assert f.validate(c) is expected, c


def test_replay_bulk_sequences_from_wireguard_go() -> None:
    f = ReplayFilter()
    _bulk(f, range(1, WINDOW_SIZE + 1))
    assert f.validate(0) and not f.validate(0)

    f.reset()
    _bulk(f, range(2, WINDOW_SIZE + 2))
    assert f.validate(1) and not f.validate(0)

    f.reset()
    _bulk(f, range(WINDOW_SIZE + 1, 0, -1))

    f.reset()
    _bulk(f, range(WINDOW_SIZE + 2, 1, -1))
    assert not f.validate(0)

    f.reset()
    _bulk(f, range(WINDOW_SIZE, 0, -1))
    assert f.validate(WINDOW_SIZE + 1) and not f.validate(0)

    f.reset()
    _bulk(f, range(WINDOW_SIZE, 0, -1))
    assert f.validate(0) and f.validate(WINDOW_SIZE + 1)


def test_replay_out_of_order_within_window_and_big_jumps() -> None:
    f = ReplayFilter()
    assert f.validate(100)
    assert f.validate(50) and f.validate(99) and not f.validate(50)
    assert f.validate(100 + 3 * 8192)  # jump past the whole ring
    assert not f.validate(100)  # now far behind
    assert f.validate(100 + 3 * 8192 - WINDOW_SIZE)  # exactly at the window's edge
    assert not f.validate(100 + 3 * 8192 - WINDOW_SIZE - 1)


# ----------------------------------------------------------------------------- allowed IPs


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_allowedips_ipv4_kernel_selftest() -> None:
    a, b, c, d, e, g, h = (Owner(n) for n in "abcdegh")
    t: AllowedIPs[Owner] = AllowedIPs()

    def ins(peer, addr, cidr):
        t.insert((addr, cidr), peer)

    def rem(peer, addr, cidr):
        t.remove((addr, cidr), peer)

    ins(a, "192.168.4.0", 24)
    ins(b, "192.168.4.4", 32)
    ins(c, "192.168.0.0", 16)
    ins(d, "192.95.5.64", 27)
    ins(c, "192.95.5.65", 27)  # same prefix after masking: moves to c
    ins(e, "0.0.0.0", 0)
    ins(g, "64.15.112.0", 20)
    ins(h, "64.15.123.211", 25)
    ins(a, "10.0.0.0", 25)
    ins(b, "10.0.0.128", 25)
    ins(a, "10.1.0.0", 30)
    ins(b, "10.1.0.4", 30)
    ins(c, "10.1.0.8", 29)
    ins(d, "10.1.0.16", 29)
    assert t.lookup("192.168.4.20") is a
    assert t.lookup("192.168.4.0") is a
    assert t.lookup("192.168.4.4") is b
    assert t.lookup("192.168.200.182") is c
    assert t.lookup("192.95.5.68") is c
    assert t.lookup("192.95.5.96") is e
    assert t.lookup("64.15.116.26") is g
    assert t.lookup("64.15.127.3") is g
    for addr in ("1.0.0.0", "64.0.0.0", "128.0.0.0", "192.0.0.0", "255.0.0.0"):
        ins(a, addr, 32)
        assert t.lookup(addr) is a
    t.remove_by_peer(a)
    for addr in ("1.0.0.0", "64.0.0.0", "128.0.0.0", "192.0.0.0", "255.0.0.0"):
        assert t.lookup(addr) is not a
    for p in (a, b, c, d, e, g, h):
        t.remove_by_peer(p)
    assert len(t) == 0 and t.lookup("10.0.0.1") is None

    ins(a, "192.168.0.0", 16)
    ins(a, "192.168.0.0", 24)
    t.remove_by_peer(a)
    assert t.lookup("192.168.0.1") is not a
    ins(a, "1.0.0.0", 32)
    ins(a, "192.0.0.0", 24)
    assert t.lookup("1.0.0.0") is a
    assert t.lookup("192.0.0.1") is a
    rem(a, "192.0.0.0", 32)
    assert t.lookup("192.0.0.1") is a
    rem(None, "192.0.0.0", 24)
    assert t.lookup("192.0.0.1") is a
    rem(b, "192.0.0.0", 24)
    assert t.lookup("192.0.0.1") is a
    rem(a, "192.0.0.0", 24)
    assert t.lookup("192.0.0.1") is not a
    rem(a, "1.0.0.0", 32)
    assert t.lookup("1.0.0.0") is not a


def _v6(a: int, b: int, c: int, d: int) -> str:
    return str(ipaddress.IPv6Address((a << 96) | (b << 64) | (c << 32) | d))


def test_allowedips_ipv6_kernel_selftest() -> None:
    a, b, c, d, e, f, g, h = (Owner(n) for n in "abcdefgh")
    t: AllowedIPs[Owner] = AllowedIPs()

    def ins(peer, w, x, y, z, cidr):
        t.insert((_v6(w, x, y, z), cidr), peer)

    def rem(peer, w, x, y, z, cidr):
        t.remove((_v6(w, x, y, z), cidr), peer)

    def look(w, x, y, z):
        return t.lookup(_v6(w, x, y, z))

    ins(d, 0x26075300, 0x60006B00, 0, 0xC05F0543, 128)
    ins(c, 0x26075300, 0x60006B00, 0, 0, 64)
    ins(e, 0, 0, 0, 0, 0)
    ins(f, 0, 0, 0, 0, 0)
    ins(g, 0x24046800, 0, 0, 0, 32)
    ins(h, 0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 64)
    ins(a, 0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 128)
    ins(c, 0x24446800, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128)
    ins(b, 0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98)
    assert look(0x26075300, 0x60006B00, 0, 0xC05F0543) is d
    assert look(0x26075300, 0x60006B00, 0, 0xC02E01EE) is c
    assert look(0x26075300, 0x60006B01, 0, 0) is f
    assert look(0x24046800, 0x40040806, 0, 0x1006) is g
    assert look(0x24046800, 0x40040806, 0x1234, 0x5678) is g
    assert look(0x240467FF, 0x40040806, 0x1234, 0x5678) is f
    assert look(0x24046801, 0x40040806, 0x1234, 0x5678) is f
    assert look(0x24046800, 0x40040800, 0x1234, 0x5678) is h
    assert look(0x24046800, 0x40040800, 0, 0) is h
    assert look(0x24046800, 0x40040800, 0x10101010, 0x10101010) is h
    assert look(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF) is a
    ins(a, 0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128)
    ins(a, 0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98)
    assert look(0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF) is a
    assert look(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0x10101010) is a
    rem(a, 0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 96)
    assert look(0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF) is a
    rem(None, 0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128)
    assert look(0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF) is a
    rem(b, 0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128)
    assert look(0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF) is a
    rem(a, 0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF, 128)
    assert look(0x24446801, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF) is not a
    rem(b, 0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98)
    assert look(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0x10101010) is a
    rem(a, 0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98)
    assert look(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0x10101010) is not a


def test_allowedips_listing_and_cache_invalidation() -> None:
    a, b = Owner("a"), Owner("b")
    t: AllowedIPs[Owner] = AllowedIPs()
    assert t.insert("10.0.0.7/24", a) == ipaddress.ip_network("10.0.0.0/24")
    t.insert("fd00::1/64", a)
    t.insert("10.1.0.0/16", b)
    assert t.entries_for_peer(a) == [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")]
    assert t.lookup4(bytes([10, 0, 0, 9])) is a  # cached now
    t.insert("10.0.0.9/32", b)  # a more specific route must win despite the cache
    assert t.lookup4(bytes([10, 0, 0, 9])) is b
    assert t.remove("10.0.0.9/32", b)
    assert t.lookup4(bytes([10, 0, 0, 9])) is a
    assert t.lookup6(ipaddress.ip_address("fd00::5").packed) is a
    t.insert("fd00::/64", b)  # moves the prefix
    assert t.entries_for_peer(a) == [ipaddress.ip_network("10.0.0.0/24")]
    assert t.lookup6(ipaddress.ip_address("fd00::5").packed) is b
    assert t.lookup(memoryview(bytearray([10, 0, 0, 1]))) is a
    assert t.lookup("172.16.0.1") is None
    for bad in ("10.0.0.0/33", "not-an-ip", "fd00::/129", 42):
        with pytest.raises(InvalidParameter):
            t.insert(bad, a)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        t.lookup(b"\x01\x02\x03")


# ----------------------------------------------------------------------------- cookies


SRC = bytes([192, 168, 13, 37, 10, 10, 10])


def test_cookie_mac1_and_mac2_flow() -> None:
    # wireguard-go TestCookieMAC1: MAC1 always verifies, MAC2 only once a cookie was consumed.
    pk = keys.public_key(keys.generate_private_key())
    gen, chk = CookieGenerator(pk), CookieChecker(pk)
    now = 10.0
    for size in (148, 92, 64):
        msg = bytearray(os.urandom(size))
        gen.add_macs(msg, now)
        assert chk.check_mac1(msg)
        assert not chk.check_mac2(msg, SRC, now)

    msg = bytearray(os.urandom(128))
    gen.add_macs(msg, now)
    reply = chk.create_reply(msg, 1377, SRC, now)
    assert len(reply) == messages.COOKIE_REPLY_SIZE
    assert messages.parse_cookie_reply(reply).receiver == 1377
    assert gen.consume_reply(reply, now)

    for size in (64, 148, 256):
        msg = bytearray(os.urandom(size))
        gen.add_macs(msg, now + 1)
        assert chk.check_mac1(msg) and chk.check_mac2(msg, SRC, now + 1)
        msg[5] ^= 0x20
        assert not chk.check_mac1(msg) and not chk.check_mac2(msg, SRC, now + 1)
        msg[5] ^= 0x20
        assert not chk.check_mac2(msg, bytes([192, 168, 13, 37, 40, 1]), now + 1)
        assert not chk.check_mac2(msg, bytes([192, 168, 13, 38, 40, 1]), now + 1)

    # The cookie lapses after 120 s on both sides.
    msg = bytearray(os.urandom(148))
    gen.add_macs(msg, now + 121)
    assert msg[-16:] == bytes(16)
    assert not chk.check_mac2(msg, SRC, now + 121)


def test_cookie_reply_for_another_message_or_key_is_refused() -> None:
    pk = keys.public_key(keys.generate_private_key())
    gen, chk = CookieGenerator(pk), CookieChecker(pk)
    other = CookieChecker(keys.public_key(keys.generate_private_key()))
    msg = bytearray(148)
    assert not gen.consume_reply(chk.create_reply(msg, 1, SRC, 0.0), 0.0)  # we sent nothing yet
    gen.add_macs(msg, 0.0)
    assert not gen.consume_reply(other.create_reply(msg, 1, SRC, 0.0), 0.0)
    forged = bytearray(chk.create_reply(msg, 1, SRC, 0.0))
    forged[40] ^= 1
    assert not gen.consume_reply(bytes(forged), 0.0)
    assert not gen.consume_reply(b"\x03" + bytes(62), 0.0)
    reply_to_first = chk.create_reply(msg, 1, SRC, 0.0)
    newer = bytearray(b"\x01" * 148)
    gen.add_macs(newer, 0.0)  # a reply is bound to the MAC1 of the last message we sent
    assert newer[-32:-16] != msg[-32:-16]
    assert not gen.consume_reply(reply_to_first, 0.0)
    assert gen.consume_reply(chk.create_reply(newer, 1, SRC, 0.0), 0.0)


def test_cookie_checker_without_key_rejects_everything() -> None:
    chk = CookieChecker(None)
    assert not chk.check_mac1(bytes(148))


def test_ratelimiter_sequence_from_wireguard_go() -> None:
    rate = RateLimiter()
    ips = [
        ipaddress.ip_address(a).packed
        for a in (
            "127.0.0.1", "192.168.1.1", "172.167.2.3", "97.231.252.215", "248.97.91.167", "188.208.233.47",
            "104.2.183.179", "72.129.46.120", "2001:0db8:0a0b:12f0:0000:0000:0000:0001",
            "f5c2:818f:c052:655a:9860:b136:6894:25f0", "b2d7:15ab:48a7:b07c:a541:f144:a9fe:54fc",
            "a47b:786e:1671:a22b:d6f9:4ab0:abc7:c918", "ea1e:d155:7f7a:98fb:2bf5:9483:80f6:5445",
            "3f0e:54a2:f5b4:cd19:a21d:58e1:3746:84c4",
        )
    ]  # fmt: skip
    step = 1 / 20
    expected = [(True, 0.0)] * 5 + [
        (False, 0.0),  # after the burst
        (True, step),  # refilled one packet
        (False, 0.0),
        (True, 2 * step),  # refilled two
        (True, 0.0),
        (False, 0.0),
    ]
    now = 1000.0
    for number, (allowed, wait) in enumerate(expected):
        now += wait + 1e-9
        rate.collect(now)
        for ip in ips:
            assert rate.allow(ip, now) is allowed, (number, ip)
    now += 2.0
    rate.collect(now)
    assert len(rate) == 0


# ----------------------------------------------------------------------------- TAI64N


def test_tai64n_whitening_and_order() -> None:
    # wireguard-go TestMonotonic: whitening hides < ~16.8 ms, 20 ms is always visible.
    start = 0.123456789
    for delta, later in ((10e-9, False), (10e-6, False), (1e-3, False), (10e-3, False), (20e-3, True)):
        assert tai64n.after(tai64n.stamp(start + delta), tai64n.stamp(start)) is later, delta
    ts = tai64n.stamp(1_700_000_000.5)
    assert len(ts) == 12
    sec, nsec = tai64n.unpack(ts)
    assert sec == 1_700_000_000 and nsec == 500_000_000 & ~0xFFFFFF
    assert ts[:8] == (0x400000000000000A + 1_700_000_000).to_bytes(8, "big")
    with pytest.raises(ValueError):
        tai64n.stamp(float("nan"))


# ----------------------------------------------------------------------------- messages


def test_message_layouts_round_trip() -> None:
    init = messages.pack_initiation(0x01020304, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    assert len(init) == 148 and init[:8] == bytes([1, 0, 0, 0, 4, 3, 2, 1])
    parsed = messages.parse_initiation(init)
    assert parsed == (0x01020304, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    resp = messages.pack_response(7, 9, b"e" * 32, b"n" * 16)
    assert len(resp) == 92 and messages.parse_response(resp)[:4] == (7, 9, b"e" * 32, b"n" * 16)
    reply = messages.pack_cookie_reply(5, b"n" * 24, b"c" * 32)
    assert len(reply) == 64 and messages.parse_cookie_reply(reply) == (5, b"n" * 24, b"c" * 32)
    header = messages.pack_transport_header(3, 2**64 - 1)
    assert len(header) == 16 and messages.parse_transport_header(header + bytes(16)) == (3, 2**64 - 1)
    assert messages.message_type(header) == 4
    assert messages.message_type(b"\x04\x01\x00\x00") == 0  # reserved bytes set
    assert messages.message_type(b"\x05\x00\x00\x00") == 0
    assert messages.message_type(b"\x01") == 0


@pytest.mark.parametrize(
    "parse,data",
    [
        (messages.parse_initiation, bytes([1, 0, 0, 0]) + bytes(143)),
        (messages.parse_initiation, bytes([1, 0, 0, 0]) + bytes(145)),
        (messages.parse_initiation, bytes([2, 0, 0, 0]) + bytes(144)),
        (messages.parse_initiation, bytes([1, 0, 1, 0]) + bytes(144)),
        (messages.parse_response, bytes([2, 0, 0, 0]) + bytes(87)),
        (messages.parse_response, bytes([1, 0, 0, 0]) + bytes(88)),
        (messages.parse_cookie_reply, bytes([3, 0, 0, 0]) + bytes(61)),
        (messages.parse_cookie_reply, bytes([4, 0, 0, 0]) + bytes(60)),
        (messages.parse_transport_header, bytes([4, 0, 0, 0]) + bytes(27)),
        (messages.parse_transport_header, bytes([3, 0, 0, 0]) + bytes(60)),
    ],
)
def test_message_parse_rejects_wrong_size_or_type(parse, data: bytes) -> None:
    with pytest.raises(InvalidData) as info:
        parse(data)
    assert "bytes" in str(info.value) or "type" in str(info.value)


def test_message_pack_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        messages.pack_initiation(2**32, b"e" * 32, b"s" * 48, b"t" * 28)
    with pytest.raises(ValueError, match="ephemeral must be 32 bytes, got 31"):
        messages.pack_initiation(1, b"e" * 31, b"s" * 48, b"t" * 28)
    with pytest.raises(ValueError, match="64-bit"):
        messages.pack_transport_header(1, -1)


# ----------------------------------------------------------------------------- keys


def test_key_encodings() -> None:
    key = keys.generate_private_key()
    assert keys.from_base64(keys.to_base64(key)) == key
    assert keys.from_hex(keys.to_hex(key)) == key
    assert len(keys.to_base64(key)) == 44
    with pytest.raises(InvalidParameter, match="31 bytes"):
        keys.from_base64("A" * 40 + "AA==")
    with pytest.raises(InvalidParameter, match="base64"):
        keys.from_base64("not base64 !")
    with pytest.raises(InvalidParameter, match="64 hex digits"):
        keys.from_hex("00" * 31)
    with pytest.raises(InvalidParameter, match="non-hex"):
        keys.from_hex("zz" * 32)
    with pytest.raises(InvalidParameter, match="32 bytes, got 33"):
        keys.check_key(bytes(33))
    assert keys.clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert keys.is_zero(bytes(32)) and not keys.is_zero(key)


def test_key_errors_never_echo_the_key_and_hex_is_strict() -> None:
    key = keys.generate_private_key()
    b64 = keys.to_base64(key)
    with pytest.raises(InvalidParameter) as info:
        keys.from_base64(b64[:-2] + "!=")  # a typo in a private key
    assert b64[:20] not in str(info.value)
    spaced = keys.to_hex(key)[:62] + " 0"  # 64 characters, but bytes.fromhex would skip the space
    with pytest.raises(InvalidParameter, match="non-hex") as info:
        keys.from_hex(spaced)
    assert keys.to_hex(key)[:20] not in str(info.value)


# ----------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class BlockReplayModel:
    """RFC 6479 as the kernel and wireguard-go write it: 128 blocks of 64 bits."""

    def __init__(self) -> None:
        self.last = 0
        self.ring = [0] * 128

    def validate(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        if counter >= limit:
            return False
        index = counter >> 6
        if counter > self.last:
            current = self.last >> 6
            diff = min(index - current, 128)
            for i in range(current + 1, current + diff + 1):
                self.ring[i & 127] = 0
            self.last = counter
        elif self.last - counter > WINDOW_SIZE:
            return False
        old = self.ring[index & 127]
        self.ring[index & 127] = old | (1 << (counter & 63))
        return old != self.ring[index & 127]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 20000),
            st.integers(0, 2**64 - 1),
            st.integers(REJECT_AFTER_MESSAGES - 10000, REJECT_AFTER_MESSAGES + 3),
        ),
        max_size=200,
    )
)
def test_replay_filter_matches_block_model(counters: list[int]) -> None:
    mine, model = ReplayFilter(), BlockReplayModel()
    for counter in counters:
        assert mine.validate(counter) == model.validate(counter), counter


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 3), st.booleans()), max_size=40),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=30),
)
def test_allowedips_matches_brute_force(ops: list[tuple[int, int, int, bool]], probes: list[int]) -> None:
    owners = [Owner(str(i)) for i in range(4)]
    table: AllowedIPs[Owner] = AllowedIPs()
    model: dict[tuple[int, int], Owner] = {}
    for address, cidr, who, insert in ops:
        net = ipaddress.IPv4Network((address, cidr), strict=False)
        key = (int(net.network_address), cidr)
        if insert:
            table.insert(net, owners[who])
            model[key] = owners[who]
        else:
            removed = table.remove(net, owners[who])
            assert removed == (model.get(key) is owners[who])
            if removed:
                del model[key]
        for probe in probes:  # interleave lookups so the cache is exercised across changes
            best = None
            for (network, length), owner in model.items():
                if (probe >> (32 - length) if length else 0) == (network >> (32 - length) if length else 0):
                    if best is None or length > best[0]:
                        best = (length, owner)
            assert table.lookup4(probe.to_bytes(4, "big")) is (best[1] if best else None)
    for owner in owners:
        expected = [ipaddress.IPv4Network(k) for k, v in model.items() if v is owner]
        assert sorted(table.entries_for_peer(owner)) == sorted(expected)


def _contents(table: AllowedIPs[Owner], owners: list[Owner]) -> dict[str, list[str]]:
    return {o.name: [str(n) for n in table.entries_for_peer(o)] for o in owners}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 3), st.integers(0, 2)),
             max_size=30),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 3), st.integers(0, 2)),
             max_size=30),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_allowedips_copy_on_write_and_bulk_apply(first: list[tuple[int, int, int, int]],
                                                 second: list[tuple[int, int, int, int]], probes: list[int]) -> None:
    """A copy changed with apply() (slots) ends up as the same changes made one by one on a fresh
    table, and neither the copy nor the original sees the other's later changes."""
    owners = [Owner(str(i)) for i in range(4)]

    def one_by_one(table: AllowedIPs[Owner], ops: list[tuple[int, int, int, int]]) -> None:
        for address, cidr, who, op in ops:
            net = ipaddress.IPv4Network((address, cidr), strict=False)
            if op == 0:
                table.insert(net, owners[who])
            elif op == 1:
                table.remove(net, owners[who])
            else:
                table.remove_by_peer(owners[who])

    def in_bulk(table: AllowedIPs[Owner], ops: list[tuple[int, int, int, int]]) -> None:
        for address, cidr, who, op in ops:
            if op == 2:
                table.remove_by_peer(owners[who])
            else:
                table.apply(owners[who], [prefix_slot(4, cidr, address) << 1 | op])

    original: AllowedIPs[Owner] = AllowedIPs()
    one_by_one(original, first)
    before = _contents(original, owners)
    answers = [original.lookup4(p.to_bytes(4, "big")) for p in probes]
    copy = original.copy()
    in_bulk(copy, second)
    assert _contents(original, owners) == before  # the original is untouched
    assert [original.lookup4(p.to_bytes(4, "big")) for p in probes] == answers
    reference: AllowedIPs[Owner] = AllowedIPs()
    one_by_one(reference, first + second)
    assert _contents(copy, owners) == _contents(reference, owners)
    for p in probes:
        assert copy.lookup4(p.to_bytes(4, "big")) is reference.lookup4(p.to_bytes(4, "big"))
    # And the other way round: changing the original afterwards leaves the copy alone.
    after = _contents(copy, owners)
    one_by_one(original, second)
    assert _contents(copy, owners) == after
