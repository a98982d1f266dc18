"""The pcap writer: exact bytes, reading back, snaplen, errors, and tcpdump/tshark reading our files."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import threading

import pytest

from wiretun.capture import (
    FILE_HEADER_SIZE,
    LINKTYPE_RAW,
    MAX_SNAPLEN,
    RECORD_HEADER_SIZE,
    PcapWriter,
    read_pcap,
)
from wiretun.errors import InvalidData, InvalidParameter
from wiretun.packet import ipv4_tcp, ipv4_udp, ipv6_udp, parse

UDP4 = ipv4_udp("192.0.2.1", "192.0.2.2", 4000, 53, b"hello")
UDP6 = ipv6_udp("2001:db8::1", "2001:db8::2", 4001, 5353, b"world!")
TS = 1_700_000_000_123_456_789


def test_file_header_is_pcap_2_4_little_endian_raw_ip(tmp_path):
    path = tmp_path / "a.pcap"
    with PcapWriter(path):
        pass
    data = path.read_bytes()
    assert len(data) == FILE_HEADER_SIZE == 24
    assert data == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, MAX_SNAPLEN, 101)
    assert LINKTYPE_RAW == 101


def test_records_exact_bytes_and_read_back(tmp_path):
    path = tmp_path / "b.pcap"
    with PcapWriter(path) as w:
        w.write(UDP4, TS)
        w.write(memoryview(UDP6), TS + 1000)
        assert w.packets == 2
    data = path.read_bytes()
    first = data[FILE_HEADER_SIZE : FILE_HEADER_SIZE + RECORD_HEADER_SIZE]
    assert struct.unpack("<IIII", first) == (1_700_000_000, 123_456, len(UDP4), len(UDP4))
    assert data[FILE_HEADER_SIZE + RECORD_HEADER_SIZE :][: len(UDP4)] == UDP4
    assert len(data) == FILE_HEADER_SIZE + 2 * RECORD_HEADER_SIZE + len(UDP4) + len(UDP6)
    pcap = read_pcap(path)
    assert pcap.linktype == LINKTYPE_RAW and not pcap.nanoseconds
    assert [r.data for r in pcap.records] == [UDP4, UDP6]
    assert [r.original_length for r in pcap.records] == [len(UDP4), len(UDP6)]
    assert pcap.records[0].timestamp_ns == 1_700_000_000_123_456_000  # microsecond resolution
    assert pcap.records[1].timestamp_ns == 1_700_000_000_123_457_000


def test_nanosecond_timestamps(tmp_path):
    path = tmp_path / "ns.pcap"
    with PcapWriter(path, nanoseconds=True) as w:
        w.write(UDP4, TS)
    assert path.read_bytes()[:4] == struct.pack("<I", 0xA1B23C4D)
    assert read_pcap(path).records[0].timestamp_ns == TS


def test_super_packet_is_kept_whole():
    big = ipv4_tcp("192.0.2.1", "192.0.2.2", 1, 2, payload=bytes(range(256)) * 255 + b"x" * 215)
    assert len(big) == 65535
    stream = io.BytesIO()
    w = PcapWriter(stream)
    w.write(big, TS)
    w.close()
    assert not stream.closed  # a caller's file object stays open
    (rec,) = read_pcap(stream.getvalue()).records
    assert rec.data == big and rec.original_length == 65535


def test_snaplen_cuts_and_records_original_length():
    stream = io.BytesIO()
    with PcapWriter(stream, snaplen=20) as w:
        w.write(UDP4, TS)
    pcap = read_pcap(stream.getvalue())
    assert pcap.snaplen == 20
    assert pcap.records[0].data == UDP4[:20]
    assert pcap.records[0].original_length == len(UDP4)


def test_write_many_and_threads():
    stream = io.BytesIO()
    w = PcapWriter(stream)

    def worker(pkt: bytes) -> None:
        for _ in range(200):
            w.write_many([pkt, pkt])

    threads = [threading.Thread(target=worker, args=(p,)) for p in (UDP4, UDP6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    records = read_pcap(stream.getvalue()).records
    assert len(records) == 800
    assert sorted(r.data for r in records) == sorted([UDP4] * 400 + [UDP6] * 400)  # no interleaving


@pytest.mark.parametrize("snaplen", [0, -1, MAX_SNAPLEN + 1, True, "65535"])
def test_bad_snaplen(snaplen):
    with pytest.raises(InvalidParameter, match="snaplen"):
        PcapWriter(io.BytesIO(), snaplen=snaplen)


def test_bad_inputs(tmp_path):
    w = PcapWriter(io.BytesIO())
    with pytest.raises(InvalidParameter, match="empty packet"):
        w.write(b"")
    w.close()
    w.close()  # again: nothing
    with pytest.raises(InvalidParameter, match="closed"):
        w.write(UDP4)
    with pytest.raises(InvalidParameter, match="cannot open capture file"):
        PcapWriter(tmp_path / "missing-dir" / "x.pcap")
    with pytest.raises(InvalidParameter, match="link type"):
        PcapWriter(io.BytesIO(), linktype=70000)
    with pytest.raises(InvalidParameter, match="path or a binary file"):
        PcapWriter(42)  # type: ignore[arg-type]


def test_packets_are_counted_in_bytes_whatever_their_item_size():
    import array

    stream = io.BytesIO()
    with PcapWriter(stream) as w:
        w.write(array.array("H", UDP4[:32]), TS)  # 16 items of 2 bytes
        w.write(memoryview(bytearray(UDP4[:32])).cast("I"), TS)
    records = read_pcap(stream.getvalue()).records
    assert [(r.original_length, r.data) for r in records] == [(32, UDP4[:32])] * 2


def test_text_mode_and_closed_files_are_clear_errors(tmp_path):
    with open(tmp_path / "t.pcap", "w") as text, pytest.raises(InvalidParameter, match="binary mode"):
        PcapWriter(text)  # type: ignore[arg-type]
    raw = open(tmp_path / "c.pcap", "wb")
    w = PcapWriter(raw)
    raw.close()
    with pytest.raises(InvalidParameter, match="cannot write"):
        w.write(UDP4)
    w.close()  # nothing left to flush: no error
    with pytest.raises(InvalidParameter, match="cannot capture int"):
        PcapWriter(io.BytesIO()).write(7)  # type: ignore[arg-type]


def test_reader_rejects_garbage():
    with pytest.raises(InvalidData, match="empty"):
        read_pcap(b"")
    with pytest.raises(InvalidData, match="not a pcap file"):
        read_pcap(b"\x00" * 24)
    stream = io.BytesIO()
    with PcapWriter(stream) as w:
        w.write(UDP4, TS)
    with pytest.raises(InvalidData, match="ends inside a packet"):
        read_pcap(stream.getvalue()[:-3])


def test_reader_accepts_big_endian_files():
    head = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    rec = struct.pack(">IIII", 5, 6, len(UDP4), len(UDP4)) + UDP4
    pcap = read_pcap(head + rec)
    assert pcap.linktype == 101 and pcap.records[0].data == UDP4
    assert pcap.records[0].timestamp_ns == 5_000_006_000


def _sample(tmp_path):
    path = tmp_path / "tools.pcap"
    with PcapWriter(path) as w:
        w.write(UDP4, TS)
        w.write(UDP6, TS)
        w.write(ipv4_tcp("198.51.100.7", "203.0.113.9", 443, 50000, payload=b"z" * 3000), TS)
    assert parse(UDP4).protocol == 17
    return path


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_reads_it(tmp_path):
    path = _sample(tmp_path)
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "link-type RAW" in out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert "192.0.2.1.4000 > 192.0.2.2.53" in lines[0]
    assert "2001:db8::1.4001 > 2001:db8::2.5353" in lines[1]
    assert "198.51.100.7.443 > 203.0.113.9.50000" in lines[2] and "length 3000" in lines[2]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_it(tmp_path):
    path = _sample(tmp_path)
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "ip.src", "-e", "ipv6.src", "-e", "udp.dstport",
         "-e", "tcp.len", "-e", "frame.len"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert rows == [
        ["192.0.2.1", "", "53", "", str(len(UDP4))],
        ["", "2001:db8::1", "5353", "", str(len(UDP6))],
        ["198.51.100.7", "", "", "3000", "3040"],
    ]
