"""WireGuard benchmark: wiretun, upstream wireguard-go, Debian's wireguard-go and the mixed pairs, one run.

Two network namespaces A and B joined by a veth pair (198.18.1.1/24 and 198.18.1.2/24; 198.18.0.0/15 is
the benchmarking range). For every pair, one WireGuard interface per namespace (10.99.0.1/24 in A,
10.99.0.2/24 in B, MTU 1420 both), configured with ``wg``, then through the tunnel from A to B:

* iperf3 TCP for ``--seconds`` (Gbit/s at iperf3's receiver), every round reported and the median;
* iperf3 UDP at full speed with 64-byte and 1400-byte payloads for ``--udp-seconds`` each (datagrams
  per second that arrived at iperf3's receiver);
* CPU seconds per gigabit: the CPU time (utime + stime from ``/proc/<pid>/stat``, all threads) of the
  two WireGuard daemons during the TCP run, divided by the gigabits iperf3 received. iperf3's own CPU
  and the kernel's softirq work charged to nobody are not counted.

Rows (A sends, B receives):

* ``wiretun``           ``wiretun-wg -f`` (:mod:`wiretun.wireguard.daemon`) in both namespaces
* ``upstream``          current upstream wireguard-go (TUN offloads, UDP GSO/GRO): the reference. Its
                        binary comes from ``--upstream PATH``, else ``$WIREGUARD_GO_UPSTREAM``, else
                        /tmp/wireguard-go-upstream/wireguard-go (built by ../shared/tools/build-wireguard-go.sh);
                        without one the upstream rows are skipped with a note and ratios use nothing
* ``debian``            the wireguard-go on ``$PATH`` (Debian's 0.0.20220316, no offloads)
* ``wiretun->upstream`` and ``upstream->wiretun``: the mixed pairs (interoperation at speed)

Rounds alternate between the rows (row 1, row 2, ..., row 1, ...), so load from other work on the
machine spreads over all rows; ratios to upstream are of medians from the same run. Namespaces,
processes and UAPI sockets are removed even on failure or Ctrl-C.

Usage: ``sudo python bench/wireguard.py [--seconds 5] [--rounds 3] [--udp-seconds 3] [--only ROW,...]
[--upstream PATH] [--json FILE]``. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tests.netns: the namespace helper tests and benchmarks share

SOCK_DIR = Path("/var/run/wireguard")
OUTER_A, OUTER_B = "198.18.1.1", "198.18.1.2"
INNER_A, INNER_B = "10.99.0.1", "10.99.0.2"
PORT_A, PORT_B = 51820, 51821
IPERF_PORT = 5201
DEFAULT_UPSTREAM = "/tmp/wireguard-go-upstream/wireguard-go"
UDP_SIZES = (64, 1400)
ROWS = ["wiretun", "upstream", "debian", "wiretun->upstream", "upstream->wiretun"]
SIDES = {  # row -> (implementation in A, implementation in B)
    "wiretun": ("wiretun", "wiretun"),
    "upstream": ("upstream", "upstream"),
    "debian": ("debian", "debian"),
    "wiretun->upstream": ("wiretun", "upstream"),
    "upstream->wiretun": ("upstream", "wiretun"),
}
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    row: str
    tcp_bps: list[float] = field(default_factory=list)  # A -> B, one per round
    retransmits: list[int] = field(default_factory=list)
    cpu_per_gbit: list[float] = field(default_factory=list)  # daemon CPU seconds per gigabit received
    udp_pps: dict[int, list[float]] = field(default_factory=lambda: {size: [] for size in UDP_SIZES})
    errors: list[str] = field(default_factory=list)
    skipped: str = ""


def _run(*argv: str, timeout: float = 30, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _nsx(ns: str, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *argv, timeout=timeout, check=check)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime of all threads


@contextlib.contextmanager
def topology() -> Iterator[tuple[str, str]]:
    """Namespaces A and B and the veth pair between them; removed at the end."""
    from tests import netns

    with netns.several("wgbA", "wgbB") as (a, b):  # removed at the end, daemons and iperf3 too
        veth_a, veth_b = f"vb{uuid.uuid4().hex[:6]}", f"vb{uuid.uuid4().hex[:6]}"
        _run("ip", "link", "add", veth_a, "netns", a, "type", "veth", "peer", "name", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, OUTER_A), (b, veth_b, OUTER_B)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        yield a, b


class Node:
    """One WireGuard process (wireguard-go or wiretun-wg) in a namespace, configured with wg."""

    def __init__(self, impl: str, binaries: dict[str, str], ns: str, tmp: Path) -> None:
        self.impl = impl
        self.ns = ns
        self.ifname = f"wgb{uuid.uuid4().hex[:8]}"
        self.sock = SOCK_DIR / f"{self.ifname}.sock"
        self.private = _run("wg", "genkey").stdout.strip()
        self.public = _run("wg", "pubkey", input=self.private + "\n").stdout.strip()
        self.key_file = tmp / f"{self.ifname}.key"
        self.key_file.write_text(self.private + "\n")
        self.key_file.chmod(0o600)
        if impl == "wiretun":
            argv = [sys.executable, "-m", "wiretun.wireguard.daemon", "-f", self.ifname]
        else:
            argv = [binaries[impl], "-f", self.ifname]
        env = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1",
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # `ip netns exec` execs the command: the pid is the WireGuard process's own.
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: self.sock.exists() or self.proc.poll() is not None, 30, f"{impl} to start")
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read()[:300] if self.proc.stderr else ""
                raise RuntimeError(f"{impl} exited with {self.proc.returncode}: {stderr}")
        except BaseException:
            self.close()
            raise

    def configure(self, port: int, inner: str, peer: Node, peer_inner: str, peer_endpoint: str) -> None:
        _run("wg", "set", self.ifname, "listen-port", str(port), "private-key", str(self.key_file),
             "peer", peer.public, "allowed-ips", f"{peer_inner}/32", "endpoint", peer_endpoint)
        _nsx(self.ns, "ip", "addr", "add", f"{inner}/24", "dev", self.ifname)
        _nsx(self.ns, "ip", "link", "set", self.ifname, "mtu", "1420", "up")

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


def _iperf(client_ns: str, server_ns: str, server_addr: str, extra: list[str], seconds: float) -> dict[str, Any]:
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_addr,
                               "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _nsx(server_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}").stdout.strip(), 10,
              "iperf3 to listen")
        argv = ["iperf3", "-c", server_addr, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", "5000", *extra]
        r = _nsx(client_ns, *argv, timeout=seconds + 60, check=False)
        try:
            report: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 printed no JSON: {r.stderr.strip()[:300]}") from None
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)


def measure(row: str, binaries: dict[str, str], seconds: float, udp_seconds: float, result: Result) -> None:
    impl_a, impl_b = SIDES[row]
    with tempfile.TemporaryDirectory() as tmp, topology() as (ns_a, ns_b):
        a = b = None
        try:
            a = Node(impl_a, binaries, ns_a, Path(tmp))
            b = Node(impl_b, binaries, ns_b, Path(tmp))
            a.configure(PORT_A, INNER_A, b, INNER_B, f"{OUTER_B}:{PORT_B}")
            b.configure(PORT_B, INNER_B, a, INNER_A, f"{OUTER_A}:{PORT_A}")
            # Handshake first, so that it is not part of the measurement.
            _nsx(ns_a, "python3", "-c", _HANDSHAKE_PROBE, INNER_B, timeout=30)
            _wait(lambda: _latest_handshake(a) > 0, 15, "the handshake")  # type: ignore[arg-type]
            cpu0 = a.cpu_seconds() + b.cpu_seconds()
            report = _iperf(ns_a, ns_b, INNER_B, [], seconds)
            cpu = a.cpu_seconds() + b.cpu_seconds() - cpu0
            received = report["end"]["sum_received"]
            bps = float(received["bits_per_second"])
            result.tcp_bps.append(bps)
            result.retransmits.append(int(report["end"]["sum_sent"].get("retransmits", 0)))
            gigabits = float(received["bytes"]) * 8 / 1e9
            if gigabits > 0:
                result.cpu_per_gbit.append(cpu / gigabits)
            for size in UDP_SIZES if udp_seconds > 0 else ():
                report = _iperf(ns_a, ns_b, INNER_B, ["-u", "-b", "0", "-l", str(size)], udp_seconds)
                total = report["end"]["sum"]
                arrived = int(total.get("packets", 0)) - int(total.get("lost_packets", 0))
                result.udp_pps[size].append(max(0, arrived) / float(total.get("seconds") or udp_seconds))
        finally:
            for node in (b, a):
                if node is not None:
                    node.close()


# A UDP datagram into the tunnel: it waits in the sender's queue until the handshake is done.
_HANDSHAKE_PROBE = "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))"


def _latest_handshake(node: Node) -> int:
    r = _run("wg", "show", node.ifname, "latest-handshakes", check=False)
    parts = r.stdout.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


def _version(binary: str | None) -> str:
    if not binary:
        return "absent"
    text = _run(binary, "--version", check=False).stdout.split("\n", 1)[0].strip()
    return text.replace("wireguard-go ", "") or "?"


def machine_line(binaries: dict[str, str]) -> str:
    from _machine import machine_line as line

    return line(f"upstream wireguard-go {_version(binaries.get('upstream'))}",
                f"Debian wireguard-go {_version(binaries.get('debian'))}",
                _run("iperf3", "--version", check=False).stdout.split("\n", 1)[0].strip())


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def table(results: list[Result], args: argparse.Namespace, binaries: dict[str, str], loads: list[str]) -> str:
    by = {r.row: r for r in results}
    base = by.get("upstream")
    base_tcp = _median(base.tcp_bps) if base else None

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}" if value is not None and reference else "-"

    rounds = args.rounds
    lines = [
        f"WireGuard through two namespaces, A -> B: iperf3 TCP {args.seconds:g} s per round, {rounds} "
        f"alternating round{'s' if rounds != 1 else ''}; UDP {args.udp_seconds:g} s per size per round",
        machine_line(binaries),
        f"load average before each round: {', '.join(loads)}",
        "",
        f"{'pair (A -> B)':<19} {'TCP Gbit/s per round':<22} {'median':>6} {'x up':>5} {'retr':>5} "
        f"{'CPU s/Gbit':>10} {'UDP 64 B pkt/s':>14} {'UDP 1400 B pkt/s':>16}",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"{r.row:<19} skipped: {r.skipped}")
            continue
        tcp = _median(r.tcp_bps)
        if tcp is None:
            lines.append(f"{r.row:<19} failed: {'; '.join(r.errors)[:300]}")
            continue
        per_round = " ".join(f"{x / 1e9:.2f}" for x in r.tcp_bps)
        retr = _median([float(x) for x in r.retransmits])
        cpu = _median(r.cpu_per_gbit)
        udp = [_median(r.udp_pps[size]) for size in UDP_SIZES]
        line = (f"{r.row:<19} {per_round:<22} {tcp / 1e9:>6.2f} {ratio(tcp, base_tcp):>5} "
                f"{(f'{retr:.0f}' if retr is not None else '-'):>5} "
                f"{(f'{cpu:.2f}' if cpu is not None else '-'):>10} "
                f"{(f'{udp[0]:,.0f}' if udp[0] is not None else '-'):>14} "
                f"{(f'{udp[1]:,.0f}' if udp[1] is not None else '-'):>16}")
        if r.errors:
            line += f"  ({len(r.errors)} run(s) failed: {r.errors[0][:120]})"
        lines.append(line)
    if base is not None and not base.skipped:
        parts = []
        for r in results:
            if r is base or r.skipped:
                continue
            udp = [ratio(_median(r.udp_pps[s]), _median(base.udp_pps[s])) for s in UDP_SIZES]
            parts.append(f"{r.row} {udp[0]}/{udp[1]}")
        lines.append(f"UDP x up (64 B/1400 B): {'; '.join(parts)}")
    lines += [
        "",
        "x up: ratio of medians to the upstream pair in this run. retr: TCP retransmissions (iperf3 sender).",
        "CPU s/Gbit: CPU time of both WireGuard daemons (all threads, /proc/<pid>/stat utime+stime) during the",
        "TCP run per gigabit received; iperf3 and unattributed softirq time are not counted. UDP pkt/s: datagrams",
        "that reached iperf3's receiver per second, sender unlimited (-b 0).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each TCP run (default 5)")
    parser.add_argument("--udp-seconds", type=float, default=3.0, help="length of each UDP run (default 3; 0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians shown (default 3)")
    parser.add_argument("--only", default="", help=f"comma-separated rows from: {', '.join(ROWS)}")
    parser.add_argument("--upstream", metavar="PATH", help="upstream wireguard-go binary "
                        f"(default $WIREGUARD_GO_UPSTREAM, else {DEFAULT_UPSTREAM} if it exists)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600:
        parser.error(f"--seconds {args.seconds} is outside 0..600")
    if not 0 <= args.udp_seconds <= 600:
        parser.error(f"--udp-seconds {args.udp_seconds} is outside 0..600")
    if not 1 <= args.rounds <= 20:
        parser.error(f"--rounds {args.rounds} is outside 1..20")
    rows = [k.strip() for k in args.only.split(",") if k.strip()] or ROWS
    for row in rows:
        if row not in ROWS:
            parser.error(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
    if os.geteuid() != 0:
        print("wireguard.py: needs root (network namespaces, TUN devices); skipped", file=sys.stderr)
        return 1
    for tool in ("iperf3", "ip", "ss", "wg", "python3"):
        if shutil.which(tool) is None:
            print(f"wireguard.py: {tool} is missing", file=sys.stderr)
            return 1
    binaries: dict[str, str] = {}
    upstream = args.upstream or os.environ.get("WIREGUARD_GO_UPSTREAM") or (
        DEFAULT_UPSTREAM if os.access(DEFAULT_UPSTREAM, os.X_OK) else "")
    if upstream:
        if not os.access(upstream, os.X_OK):
            parser.error(f"upstream wireguard-go {upstream!r} is not an executable file")
        binaries["upstream"] = upstream
    debian = shutil.which("wireguard-go")
    if debian:
        binaries["debian"] = debian
    results = {row: Result(row) for row in rows}
    for row, result in results.items():
        missing = [impl for impl in SIDES[row] if impl != "wiretun" and impl not in binaries]
        if "upstream" in missing:
            result.skipped = ("no upstream wireguard-go (--upstream PATH or WIREGUARD_GO_UPSTREAM; "
                              "../shared/tools/build-wireguard-go.sh builds one)")
        elif missing:
            result.skipped = "no wireguard-go on PATH"
    loads: list[str] = []
    for _ in range(args.rounds):
        loads.append(_load())
        for row, result in results.items():
            if result.skipped:
                continue
            try:
                measure(row, binaries, args.seconds, args.udp_seconds, result)
            except KeyboardInterrupt:
                print("interrupted; cleaned up", file=sys.stderr)
                return 130
            except Exception as exc:  # one failed pair must not hide the others' numbers
                result.errors.append(str(exc)[:300])
    print(table(list(results.values()), args, binaries, loads))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results.values()], indent=2))
    return 0 if all(r.tcp_bps or r.skipped for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
