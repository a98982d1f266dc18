"""The fuzzers' own oracles can fail: a duplicate or forged delivery is counted, mutations change bytes,
the independent MAC1 matches wiretun's check, the checksum oracle agrees with wiretun's."""

from __future__ import annotations

import base64
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import library
import net
from wiretun import offload as O
from wiretun import packet as P
from wiretun.wireguard.cookie import CookieChecker
from wiretun.wireguard.keys import generate_private_key, public_key


def probe_packet(body: bytes) -> bytes:
    return P.ipv4_udp(net.PI4, net.TI4, 40000, net.PROBE_PORT, body)


def test_probes_count_duplicates_and_forgeries() -> None:
    probes = net.Probes()
    seq, body = probes.make(200)
    probes.check(probe_packet(body))
    assert probes.delivered == {seq} and probes.duplicates == 0
    probes.check(probe_packet(body))
    assert probes.duplicates == 1
    forged = bytearray(body)
    forged[13] ^= 1  # another sequence number, the tag no longer matches
    probes.check(probe_packet(bytes(forged)))
    probes.check(P.ipv4_udp(net.PI4, net.TI4, 40000, 53, b"hello"))
    assert probes.unexpected == 2 and probes.delivered == {seq}


def test_mutations_change_the_bytes() -> None:
    rng = random.Random(3)
    data = bytes(range(148))
    assert all(net.mutate(rng, data) != data for _ in range(200))


def test_mac1_matches_wiretuns_checker() -> None:
    public = public_key(generate_private_key())
    pub_b64 = base64.b64encode(bytes(public)).decode()
    msg = bytearray(random.randbytes(148))
    msg[0:4] = b"\x01\0\0\0"
    net.mac1(pub_b64, msg)
    assert CookieChecker(bytes(public)).check_mac1(msg)
    msg[5] ^= 1
    assert not CookieChecker(bytes(public)).check_mac1(msg)


def test_checksum_oracle_agrees_with_finish_checksum() -> None:
    rng = random.Random(5)
    for _ in range(200):
        pkt = bytearray(rng.randbytes(rng.randrange(4, 80)))
        start = rng.randrange(0, len(pkt) - 2)
        where = rng.randrange(0, len(pkt) - start - 1)
        want = library._finished(bytes(pkt), start, where)
        O.finish_checksum(pkt, start, where)
        assert bytes(pkt) == want
