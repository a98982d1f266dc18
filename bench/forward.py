"""Forwarding benchmark: a userspace forwarder between two TUN adapters, measured with iperf3.

Two network namespaces A and B, a TUN device in each (``fwa`` in A with 198.18.0.1/24, ``fwb`` in B
with 198.18.0.2/24; 198.18.0.0/15 is the benchmarking range), and one forwarder process that copies
every packet read from one device to the other. iperf3 then sends TCP (Gbit/s) and UDP with 64-byte
payloads (packets/s received) from A to B. Forwarders, all in one run:

* ``python-pytun``   python-pytun, one thread per direction, one packet per read/write (installed
                     into the running interpreter's environment with pip when missing)
* ``wiretun plain``  wiretun sessions without offloads, a thread per direction, batch receive/send
* ``wiretun offload`` the same with ``offload=True`` (virtio-net header, TSO/USO): super-packets of
                     up to 64 KiB pass from one adapter to the other with their header unchanged
* ``wiretun per-packet`` Wintun's own loop (example.c's): try_receive_packet, allocate_send_packet, copy,
                     send_packet, release_receive_packet, one packet per call, a thread per direction
* ``C plain``        bench/c/forward.c compiled with gcc into bench/out/: thread per direction
* ``C offload``      the same with IFF_VNET_HDR + TUNSETOFFLOAD, headers passed through

Every forwarder runs as its own process (``--serve KIND``), creates its devices in the namespaces,
prints ``ready``, and exits when its standard input closes (or its parent dies). Rates come from the
kernel's device counters, the same for every forwarder: TCP throughput from iperf3's receiver,
packets/s from the packets the forwarder wrote into B's device during the UDP run (iperf3's own
receiver count is printed too: on a small machine the iperf3 processes compete with the forwarder for
CPU). Namespaces, forwarders and iperf3 processes are removed even on failure or Ctrl-C.

Usage: ``python bench/forward.py [--seconds 4] [--rounds 3] [--only KIND,...] [--no-udp]``; every
forwarder is measured ``--rounds`` times, interleaved, and the table shows medians (the machine may be
busy with other work). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
C_SOURCE = HERE / "c" / "forward.c"
C_BINARY = OUT / "forward"

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.netns: the namespace helper tests and benchmarks share

DEV_A, DEV_B = "fwa", "fwb"
ADDR_A, ADDR_B = "198.18.0.1", "198.18.0.2"
PREFIX = 24
IPERF_PORT = 5201

KINDS = ["python-pytun", "wiretun plain", "wiretun per-packet", "wiretun offload", "C plain", "C offload"]
SERVE_NAMES = {
    "python-pytun": "pytun",
    "wiretun plain": "wiretun",
    "wiretun per-packet": "wiretun-single",
    "wiretun offload": "wiretun-offload",
    "C plain": "c",
    "C offload": "c-offload",
}


# ------------------------------------------------------------------------------------------------
# Forwarders (run in their own process with --serve)


def _die_with_parent() -> None:
    # The benchmark holds our stdin; PR_SET_PDEATHSIG also covers a SIGKILLed benchmark.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_for_stdin_eof() -> None:
    while True:
        try:
            if not os.read(0, 64):
                return
        except InterruptedError:
            continue
        except OSError:
            return


def serve_pytun(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """The way Python tunnels forward today: python-pytun, a thread per direction, blocking I/O."""
    import pytun  # type: ignore[import-not-found]
    from tests import netns

    flags = pytun.IFF_TUN | pytun.IFF_NO_PI
    # pytun's mtu property asks the kernel by name, in the calling thread's namespace.
    with netns.entered(ns_a):
        a = pytun.TunTapDevice(name=dev_a, flags=flags)
        mtu_a = a.mtu  # pytun.TunTapDevice.mtu (a property there)
    with netns.entered(ns_b):
        b = pytun.TunTapDevice(name=dev_b, flags=flags)
        mtu_b = b.mtu

    def pump(src: pytun.TunTapDevice, dst: pytun.TunTapDevice, size: int) -> None:
        read, write = src.read, dst.write
        while True:
            try:
                packet = read(size)
            except pytun.Error:
                return  # the device went away
            try:
                write(packet)
            except pytun.Error:
                pass  # dropped (the other device is still down, say), as a link would

    for args in ((a, b, mtu_a), (b, a, mtu_b)):
        threading.Thread(target=pump, args=args, daemon=True).start()
    print("ready 0x0", flush=True)
    _wait_for_stdin_eof()
    os._exit(0)


def serve_wiretun(ns_a: str, dev_a: str, ns_b: str, dev_b: str, offload: bool) -> None:
    """wiretun: one session per adapter, batch receive and send, a thread per direction.

    Each thread receives a batch from one session (blocking; zero copy: views into the receive ring,
    and with offloads each packet's virtio-net header), sends it on the other session (written straight
    from those views when nothing is queued) and releases it. The session's C loops release the GIL for
    a whole batch of reads or writes, so the two directions overlap on two cores (measured: TCP 0.94x to
    1.09x python-pytun with threads against 0.78x to 0.91x with one loop; offload 10.0 against 8.5
    Gbit/s). With ``WIRETUN_BENCH_THREADS=0`` it runs one poll loop for both directions instead: each
    turn a batch from each session, sleeping on both read-wait handles only when neither had anything.
    """
    from tests import netns

    from wiretun import Adapter
    from wiretun.errors import EndOfFile

    with netns.entered(ns_a):
        a = Adapter.create(dev_a, "Bench")
    with netns.entered(ns_b):
        b = Adapter.create(dev_b, "Bench")
    capacity = 0x2000000 if offload else 0x800000
    sa = a.start_session(capacity, offload=offload)
    sb = b.start_session(capacity, offload=offload)
    batch = int(os.environ.get("WIRETUN_BENCH_BATCH", "64"))

    def pump(src, dst) -> None:  # type: ignore[no-untyped-def]
        receive, send, release = src.receive_packets, dst.send_packets, src.release_receive_packets
        headers: list[bytes] | None = [] if offload else None
        try:
            while True:
                packets = receive(batch, block=True, headers=headers)
                if packets:
                    send(packets, headers)
                    release(packets)
                    if headers is not None:
                        headers.clear()
        except EndOfFile as exc:
            print(f"forwarder {src.adapter.kernel_name}: {exc}", file=sys.stderr, flush=True)

    def poll_loop() -> None:
        ep = select.epoll()
        ep.register(sa.get_read_wait_event(), select.EPOLLIN)
        ep.register(sb.get_read_wait_event(), select.EPOLLIN)
        receive_a, receive_b = sa.receive_packets, sb.receive_packets
        send_a, send_b = sa.send_packets, sb.send_packets
        release_a, release_b = sa.release_receive_packets, sb.release_receive_packets
        # With offloads each packet's header travels beside it: a TSO/USO super-packet read from one
        # adapter is written whole to the other, which accepts the same offloads.
        ha: list[bytes] | None = [] if offload else None
        hb: list[bytes] | None = [] if offload else None
        wait = ep.poll
        try:
            while True:
                p = receive_a(batch, headers=ha)
                q = receive_b(batch, headers=hb)
                if p:
                    send_b(p, ha)
                    release_a(p)
                    if ha is not None:
                        ha.clear()
                if q:
                    send_a(q, hb)
                    release_b(q)
                    if hb is not None:
                        hb.clear()
                if not p and not q:
                    wait(1.0)
        except EndOfFile as exc:
            print(f"forwarder: {exc}", file=sys.stderr, flush=True)

    if os.environ.get("WIRETUN_BENCH_THREADS", "1") == "1":
        for args in ((sa, sb), (sb, sa)):
            threading.Thread(target=pump, args=args, daemon=True).start()
    else:
        threading.Thread(target=poll_loop, daemon=True).start()
    print(f"ready {sa.offloads:#x}", flush=True)
    _wait_for_stdin_eof()
    os._exit(0)


def serve_wiretun_single(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """wiretun with Wintun's per-packet calls, as a port of example.c forwards: a thread per direction,
    each receiving one packet (sleeping on the read-wait handle while none waits), allocating its room
    in the other session's send ring, copying it there, sending it and releasing the received packet.
    A full send ring drops the packet (BufferOverflow), as a Wintun program does. The receive is
    ``try_receive_packet`` (Wintun's receive, None instead of ERROR_NO_MORE_ITEMS), as bench/session.py's
    per-packet rows."""
    from tests import netns

    from wiretun import Adapter
    from wiretun.errors import BufferOverflow, EndOfFile

    with netns.entered(ns_a):
        a = Adapter.create(dev_a, "Bench")
    with netns.entered(ns_b):
        b = Adapter.create(dev_b, "Bench")
    sa = a.start_session(0x800000)
    sb = b.start_session(0x800000)

    def pump(src, dst) -> None:  # type: ignore[no-untyped-def]
        receive, release = src.try_receive_packet, src.release_receive_packet
        allocate, send = dst.allocate_send_packet, dst.send_packet
        # example.c sleeps on the session's read-wait event (WaitForMultipleObjects); here its handle,
        # readable when packets may be waiting or the session ended.
        poller = select.poll()
        poller.register(src.get_read_wait_event(), select.POLLIN)
        wait = poller.poll
        try:
            while True:
                packet = receive()
                if packet is None:
                    wait()
                    continue
                try:
                    out = allocate(len(packet))
                except BufferOverflow:
                    release(packet)
                    continue
                out[:] = packet
                send(out)
                release(packet)
        except EndOfFile as exc:
            print(f"forwarder {src.adapter.kernel_name}: {exc}", file=sys.stderr, flush=True)

    for args in ((sa, sb), (sb, sa)):
        threading.Thread(target=pump, args=args, daemon=True).start()
    print("ready 0x0", flush=True)
    _wait_for_stdin_eof()
    os._exit(0)


def serve(kind: str, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if kind == "pytun":
        serve_pytun(ns_a, dev_a, ns_b, dev_b)
    elif kind in ("wiretun", "wiretun-offload"):
        sys.path.insert(0, str(HERE))
        serve_wiretun(ns_a, dev_a, ns_b, dev_b, kind == "wiretun-offload")
    elif kind == "wiretun-single":
        serve_wiretun_single(ns_a, dev_a, ns_b, dev_b)
    else:
        raise SystemExit(f"unknown forwarder kind {kind!r}")


# ------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Result:
    kind: str
    tcp_bps: float | None = None
    udp_pps: float | None = None  # 64-byte datagrams the forwarder wrote into B per second
    udp_received_pps: float | None = None  # of which the iperf3 server received
    tcp_read_avg: float | None = None  # bytes per read on A during the TCP run (header included)
    tcp_cpu: float | None = None  # forwarder CPU seconds per second during the TCP run
    tcp_us_per_packet: float | None = None  # forwarder CPU microseconds per packet moved (both ways)
    offloads: str = ""
    error: str | None = None
    failed_runs: int = 0


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _check(*argv: str) -> None:
    r = _run(*argv)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, str]]:
    from tests import netns

    with netns.several("wtbA", "wtbB") as (a, b):  # removed at the end, iperf3 and all
        yield a, b


def build_c(notes: list[str]) -> Path | None:
    """Compile the C reference forwarder into bench/out/ (when missing or older than its source)."""
    if C_BINARY.exists() and C_BINARY.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return C_BINARY
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        notes.append("C reference skipped: no gcc")
        return None
    OUT.mkdir(exist_ok=True)
    r = _run(gcc, "-O2", "-pthread", "-o", str(C_BINARY), str(C_SOURCE), timeout=120)
    if r.returncode != 0:
        notes.append(f"C reference skipped: gcc failed: {r.stderr.strip()[:300]}")
        return None
    return C_BINARY


def ensure_pytun(notes: list[str]) -> bool:
    """python-pytun in this interpreter's environment: a benchmark-only dependency, installed on demand."""
    probe = [sys.executable, "-c", "import pytun"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return True
    r = _run(sys.executable, "-m", "pip", "install", "-q", "python-pytun", timeout=300)
    if r.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        notes.append(f"python-pytun skipped: pip install failed: {r.stderr.strip()[-300:]}")
        return False
    return True


class Forwarder:
    """One forwarder process; closing its stdin stops it (and removes its devices)."""

    def __init__(self, kind: str, ns_a: str, ns_b: str) -> None:
        serve_name = SERVE_NAMES[kind]
        if serve_name.startswith("c"):
            argv = [str(C_BINARY)] + (["--offload"] if serve_name == "c-offload" else [])
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve", serve_name]
        argv += [ns_a, DEV_A, ns_b, DEV_B]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.offloads = ""

    def wait_ready(self, timeout: float = 20) -> None:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else ""
        if not line.startswith("ready"):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"forwarder did not start: {line.strip()} {err.strip()[-800:]}")
        self.offloads = line.split()[1] if len(line.split()) > 1 else ""

    def cpu_seconds(self) -> float:
        """User + system CPU time the forwarder process has used so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Close the forwarder's stdin (its signal to exit) and wait; kill it if it lingers."""
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def _iperf(ns_a: str, ns_b: str, seconds: float, udp: bool) -> dict:
    """One iperf3 run from A to B; the server is a one-off process inside B."""
    from tests import netns

    server = subprocess.Popen(["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                               "-B", ADDR_B], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until the server listens
            r = netns.run(ns_b, "ss", "-Hltn", f"sport = :{IPERF_PORT}")
            if r.stdout.strip():
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["iperf3", "-c", ADDR_B, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
        if udp:
            argv += ["-u", "-b", "0", "-l", "64"]
        r = netns.run(ns_a, *argv, timeout=seconds + 30)
        try:
            report = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 failed: {r.stderr.strip() or r.stdout.strip()[:300]}") from None
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report
    finally:
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        server.wait(5)


def tcp_bits_per_second(report: dict) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"])


def udp_received_per_second(report: dict) -> float:
    """Datagrams the iperf3 server received per second (sent minus lost, over the run's length)."""
    s = report["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def measure(kind: str, seconds: float, udp: bool) -> Result:
    result = Result(kind)
    with _namespaces() as (ns_a, ns_b):
        fwd = Forwarder(kind, ns_a, ns_b)
        try:
            fwd.wait_ready()
            result.offloads = fwd.offloads
            for ns, dev, addr in ((ns_a, DEV_A, ADDR_A), (ns_b, DEV_B, ADDR_B)):
                _check("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
                _check("ip", "-n", ns, "link", "set", dev, "up")
            before = _counters(ns_a, DEV_A, "tx")
            back_before = _counters(ns_b, DEV_B, "tx")
            cpu_before, t0 = fwd.cpu_seconds(), time.monotonic()
            result.tcp_bps = tcp_bits_per_second(_iperf(ns_a, ns_b, seconds, udp=False))
            cpu, elapsed = fwd.cpu_seconds() - cpu_before, time.monotonic() - t0
            after = _counters(ns_a, DEV_A, "tx")
            back_after = _counters(ns_b, DEV_B, "tx")
            moved = after[0] - before[0] + back_after[0] - back_before[0]
            if after[0] > before[0]:
                result.tcp_read_avg = (after[1] - before[1]) / (after[0] - before[0])
            result.tcp_cpu = cpu / elapsed
            if moved:
                result.tcp_us_per_packet = cpu / moved * 1e6
            if udp:
                before = _counters(ns_b, DEV_B, "rx")
                report = _iperf(ns_a, ns_b, seconds, udp=True)
                after = _counters(ns_b, DEV_B, "rx")
                result.udp_pps = (after[0] - before[0]) / report["end"]["sum_sent"]["seconds"]
                result.udp_received_pps = udp_received_per_second(report)
            fwd.stop()
        finally:
            fwd.kill()
    return result


def _counters(ns: str, dev: str, side: str) -> tuple[int, int]:
    """(packets, bytes) of ``dev``'s ``side``: "tx" is what the kernel handed to the forwarder, "rx"
    what the forwarder wrote into the device and the kernel accepted."""
    from tests import netns

    r = netns.run(ns, "ip", "-s", "-j", "link", "show", dev)
    try:
        data = json.loads(r.stdout)[0]["stats64"][side]
        return int(data["packets"]), int(data["bytes"])
    except (ValueError, KeyError, IndexError):
        raise RuntimeError(f"cannot read the counters of {dev}: {r.stderr.strip()}") from None


def machine_line() -> str:
    from _machine import machine_line as line

    return line(_run("iperf3", "--version").stdout.split("\n", 1)[0].strip())


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def median_result(kind: str, runs: list[Result]) -> Result:
    """One row from several runs: the median of every measured field; an error if every run failed."""
    good = [r for r in runs if r.error is None]
    if not good:
        return runs[-1]
    out = Result(kind, offloads=good[0].offloads)
    for name in ("tcp_bps", "udp_pps", "udp_received_pps", "tcp_read_avg", "tcp_cpu", "tcp_us_per_packet"):
        values = [getattr(r, name) for r in good if getattr(r, name) is not None]
        if values:
            setattr(out, name, statistics.median(values))
    failed = len(runs) - len(good)
    if failed:
        out.error = None
        out.failed_runs = failed
    return out


def table(results: list[Result], seconds: float, rounds: int = 1) -> str:
    by = {r.kind: r for r in results}

    def tcp(kind: str) -> float | None:
        r = by.get(kind)
        return r.tcp_bps if r else None

    def pps(kind: str) -> float | None:
        r = by.get(kind)
        return r.udp_pps if r else None

    lines = [
        f"Forwarding between two TUN adapters (iperf3 A -> B, {seconds:g} s per run, "
        f"median of {rounds} interleaved round{'s' if rounds != 1 else ''})",
        machine_line(),
        "",
        f"{'forwarder':<18} {'TCP Gbit/s':>10} {'x pytun':>8} {'x C':>7} {'x C off':>8} {'B/read':>7} {'CPU':>5}"
        f" {'us/pkt':>6}"
        f" {'UDP-64 kpps':>11} {'x pytun':>8} {'x C':>7} {'rcvd kpps':>9}  offloads",
    ]
    for kind in KINDS:
        r = by.get(kind)
        if r is None:
            continue
        if r.error:
            lines.append(f"{kind:<18} failed: {r.error}")
            continue
        gbit = f"{r.tcp_bps / 1e9:.2f}" if r.tcp_bps is not None else "-"
        kpps = f"{r.udp_pps / 1e3:.1f}" if r.udp_pps is not None else "-"
        rcvd = f"{r.udp_received_pps / 1e3:.1f}" if r.udp_received_pps is not None else "-"
        avg = f"{r.tcp_read_avg:.0f}" if r.tcp_read_avg else "-"
        cpu = f"{r.tcp_cpu * 100:.0f}%" if r.tcp_cpu is not None else "-"
        per = f"{r.tcp_us_per_packet:.1f}" if r.tcp_us_per_packet is not None else "-"
        lines.append(
            f"{kind:<18} {gbit:>10} {_ratio(r.tcp_bps, tcp('python-pytun')):>8} "
            f"{_ratio(r.tcp_bps, tcp('C plain')):>7} {_ratio(r.tcp_bps, tcp('C offload')):>8} {avg:>7} "
            f"{cpu:>5} {per:>6}"
            f" {kpps:>11} {_ratio(r.udp_pps, pps('python-pytun')):>8} {_ratio(r.udp_pps, pps('C plain')):>7}"
            f" {rcvd:>9}  {r.offloads}" + (f"  ({r.failed_runs} run(s) failed)" if r.failed_runs else "")
        )
    lines.append("")
    lines.append("x pytun / x C / x C off: ratio to python-pytun / C plain / C offload in this run. "
                 "B/read: bytes per read on A")
    lines.append("during TCP (header included). CPU, us/pkt: the forwarder's CPU time during TCP, per second "
                 "and per packet moved (both ways).")
    lines.append("UDP-64 kpps: 64-byte datagrams forwarded into B per second; rcvd: of those, "
                 "what the iperf3 server read")
    lines.append("(it shares the CPUs with the client and the forwarder). "
                 "offloads: TUNSETOFFLOAD flags.")
    checks = [
        ("wiretun offload >= 5x python-pytun (TCP)", tcp("wiretun offload"), tcp("python-pytun"), 5.0),
        ("wiretun offload >= 0.8x C offload (TCP)", tcp("wiretun offload"), tcp("C offload"), 0.8),
        ("wiretun plain >= 1x python-pytun (TCP)", tcp("wiretun plain"), tcp("python-pytun"), 1.0),
        ("wiretun per-packet >= 1x python-pytun (TCP)", tcp("wiretun per-packet"), tcp("python-pytun"), 1.0),
    ]
    for label, value, base, target in checks:
        if value is None or not base:
            lines.append(f"target {label}: not measured")
        else:
            ratio = value / base
            lines.append(f"target {label}: {ratio:.2f}x {'met' if ratio >= target else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each iperf3 run (default 4)")
    parser.add_argument("--only", default="", help="comma-separated forwarder kinds, e.g. 'C plain,C offload'")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every forwarder this many times, interleaved; the table shows medians "
                             "(default 3)")
    parser.add_argument("--no-udp", action="store_true", help="skip the UDP packets/s runs")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--serve", nargs=5, metavar=("KIND", "NS_A", "DEV_A", "NS_B", "DEV_B"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    if not 0 < args.seconds <= 600:
        parser.error(f"--seconds {args.seconds} is outside 0..600")
    if not 1 <= args.rounds <= 20:
        parser.error(f"--rounds {args.rounds} is outside 1..20")
    if os.geteuid() != 0:
        print("forward.py: needs root (network namespaces, TUN devices); skipped", file=sys.stderr)
        return 1
    for tool in ("iperf3", "ip", "ss"):
        if shutil.which(tool) is None:
            print(f"forward.py: {tool} is missing", file=sys.stderr)
            return 1
    kinds = [k.strip() for k in args.only.split(",") if k.strip()] or KINDS
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown forwarder {kind!r}; choose from {', '.join(KINDS)}")
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM/SIGHUP clean up like Ctrl-C: namespaces, forwarders, iperf3

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    notes: list[str] = []
    available = set(kinds)
    if any(k.startswith("C ") for k in kinds) and build_c(notes) is None:
        available -= {"C plain", "C offload"}
    if "python-pytun" in kinds and not ensure_pytun(notes):
        available.discard("python-pytun")
    runs: dict[str, list[Result]] = {k: [] for k in kinds if k in available}
    # Rounds are interleaved so that a burst of load elsewhere on the machine hits every forwarder
    # alike; Ctrl-C: the finally blocks in measure() remove namespaces and processes.
    for _ in range(args.rounds):
        for kind in runs:
            try:
                runs[kind].append(measure(kind, args.seconds, not args.no_udp))
            except KeyboardInterrupt:
                print("interrupted; cleaned up", file=sys.stderr)
                return 130
            except Exception as exc:  # one failed forwarder must not hide the others' numbers
                runs[kind].append(Result(kind, error=str(exc)[:300]))
    results = [median_result(kind, got) for kind, got in runs.items()]
    print(table(results, args.seconds, args.rounds))
    for note in notes:
        print("note:", note)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
