"""A port of Wintun's example.c onto wiretun's session API, with the IPv6 counterpart it lacks.

Creates adapter "Demo" of tunnel type "Example" (GUID deadbabe-cafe-beef-0123-456789abcdef), gives it
10.6.7.7/24 and fd00:6:7::7/64, starts a session of 0x400000 bytes, and runs two threads: one sends an
ICMP echo request from 10.6.7.8 (and fd00:6:7::8) to the adapter's address once a second, the other
prints what the operating system sends back. Ctrl-C (or ``--seconds``) cleans up and removes the adapter.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING

from . import log, packet
from .errors import BufferOverflow, EndOfFile, NotSupported, WintunError
from .log import LogLevel

if TYPE_CHECKING:
    from .session import Session

EXAMPLE_GUID = uuid.UUID("deadbabe-cafe-beef-0123-456789abcdef")
ADAPTER_NAME = "Demo"
TUNNEL_TYPE = "Example"
RING_CAPACITY = 0x400000
V4_ADAPTER, V4_PEER = "10.6.7.7", "10.6.7.8"
V6_ADAPTER, V6_PEER = "fd00:6:7::7", "fd00:6:7::8"
_MARKERS = {LogLevel.INFO: "+", LogLevel.WARN: "-", LogLevel.ERR: "!"}
_print_lock = threading.Lock()


def console_logger(level: LogLevel, timestamp: int, message: str) -> None:
    """example.c's ConsoleLogger: ``YYYY-MM-DD hh:mm:ss.ffff [+|-|!] message`` on stderr."""
    when = datetime.datetime(1601, 1, 1) + datetime.timedelta(microseconds=timestamp // 10)
    line = (
        f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:04d} "
        f"[{_MARKERS.get(level, '?')}] {message}"
    )
    with _print_lock:
        print(line, file=sys.stderr, flush=True)


def describe(data: memoryview | bytes) -> str:
    """example.c's PrintPacket: an echo reply by name, anything else by version and protocol."""
    try:
        info = packet.parse(data)
    except WintunError:
        return f"Received packet without room for an IP header ({len(data)} bytes)"
    is_reply = (info.version == 4 and info.protocol == 1 and info.icmp_type == 0) or (
        info.version == 6 and info.protocol == 58 and info.icmp_type == 129
    )
    if is_reply:
        kind = "ICMP" if info.version == 4 else "ICMPv6"
        return f"Received IPv{info.version} {kind} echo reply from {info.src} to {info.dst}"
    return f"Received IPv{info.version} proto 0x{info.protocol:x} packet from {info.src} to {info.dst}"


def _receive_packets(session: Session, quit_event: threading.Event, counts: dict[str, int]) -> None:
    while not quit_event.is_set():
        try:
            pkt = session.try_receive_packet()
        except EndOfFile:
            return
        except WintunError as e:
            log.err(f"Packet read failed: {e}")
            return
        if pkt is None:
            session.wait(0.2)  # WaitForSingleObject(WintunGetReadWaitEvent(...)), with a timeout for Ctrl-C
            continue
        line = describe(pkt)
        session.release_receive_packet(pkt)
        if "echo reply" in line:
            counts["replies"] += 1
        log.info(line)


def _send_packets(session: Session, quit_event: threading.Event, ipv6: bool, counts: dict[str, int]) -> None:
    seq = 0
    while not quit_event.is_set():
        seq += 1
        probes = [packet.wintun_example_echo_request()]  # example.c's exact 28 bytes
        if ipv6:
            probes.append(packet.ipv6_icmp_echo(V6_PEER, V6_ADAPTER, ident=0x6007, seq=seq))
        for probe in probes:
            v = "IPv4" if probe[0] >> 4 == 4 else "IPv6"
            peer, adapter = (V4_PEER, V4_ADAPTER) if v == "IPv4" else (V6_PEER, V6_ADAPTER)
            log.info(f"Sending {v} ICMP echo request to {adapter} from {peer}")
            try:
                buf = session.allocate_send_packet(len(probe))
            except EndOfFile:
                return
            except BufferOverflow:
                continue  # the ring is full: drop, as example.c does
            buf[:] = probe
            session.send_packet(buf)
            counts["sent"] += 1
        quit_event.wait(1.0)


def run(seconds: float | None = None, *, ipv6: bool = True) -> dict[str, int]:
    """Run the example; returns counts of echo requests sent and replies received."""
    from .adapter import Adapter, get_running_driver_version

    log.set_logger(console_logger)
    log.info("Wintun library loaded")
    try:
        for existing in Adapter.enumerate(TUNNEL_TYPE):
            log.info(f"Found adapter {existing.name} of type {existing.tunnel_type}")
            existing.close()
    except NotSupported:
        pass  # Windows: wintun.dll 0.14 cannot enumerate (its example.c does not either)
    quit_event = threading.Event()
    counts = {"sent": 0, "replies": 0}
    adapter = Adapter.create(ADAPTER_NAME, TUNNEL_TYPE, EXAMPLE_GUID)
    try:
        version = get_running_driver_version()
        log.info(f"Wintun v{(version >> 16) & 0xFF}.{version & 0xFF} loaded")
        adapter.add_address(f"{V4_ADAPTER}/24")
        if ipv6:
            adapter.add_address(f"{V6_ADAPTER}/64")  # TUN is NOARP: no DAD delay
        adapter.up()
        with adapter.start_session(RING_CAPACITY) as session:
            log.info("Launching threads and mangling packets...")
            workers = [
                threading.Thread(target=_receive_packets, args=(session, quit_event, counts), daemon=True),
                threading.Thread(target=_send_packets, args=(session, quit_event, ipv6, counts), daemon=True),
            ]
            for w in workers:
                w.start()
            on_main = threading.current_thread() is threading.main_thread()
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
            for sig in previous:
                signal.signal(sig, lambda *_: quit_event.set())
            try:
                # In slices: on Windows a wait without a timeout is not interrupted by Ctrl-C.
                deadline = None if seconds is None else time.monotonic() + seconds
                while not quit_event.is_set():
                    left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                    if left <= 0:
                        break
                    quit_event.wait(left)
            finally:
                log.info("Cleaning up and shutting down...")
                quit_event.set()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                for w in workers:
                    w.join(timeout=2)
    finally:
        adapter.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wiretun example", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)"
    )
    parser.add_argument("--no-ipv6", action="store_true", help="send only the IPv4 echo request, as example.c does")
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds must be positive, not {args.seconds}")
    try:
        run(args.seconds, ipv6=not args.no_ipv6)
    except WintunError as e:
        log.err(f"Failed: {e}")
        return 1
    return 0
