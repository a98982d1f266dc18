"""WireGuard benchmark: iperf3 TCP through a wiretun pair and a wireguard-go pair on this machine, one run.

Two network namespaces A and B joined by a veth pair (198.18.1.1/24 and 198.18.1.2/24; 198.18.0.0/15 is
the benchmarking range). For every pair, one WireGuard interface per namespace (10.99.0.1/24 in A,
10.99.0.2/24 in B, MTU 1420 both), configured with ``wg``, then iperf3 TCP from A to B (and back with
``--both-ways``) through the tunnel:

* ``wireguard-go``         ``wireguard-go -f`` in both namespaces (the reference)
* ``wiretun``              ``wiretun-wg -f`` (:mod:`wiretun.wireguard.daemon`) in both namespaces: two
                           processes, so each device has an interpreter (and a GIL) of its own
* ``wiretun->wireguard-go``wiretun in A sending, wireguard-go in B receiving (the interop path)

The table shows Gbit/s (iperf3's receiver), the ratio to the wireguard-go pair of the same run, and the
CPU the two WireGuard processes used during the run (per second, summed: 200% is both cores of a
2-core machine). Pairs are measured in interleaved rounds; the table shows medians. Namespaces,
processes and UAPI sockets are removed even on failure or Ctrl-C.

Usage: ``sudo python bench/wireguard.py [--seconds 5] [--rounds 3] [--both-ways] [--only KIND,...]``.
Not a test.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

SOCK_DIR = Path("/var/run/wireguard")
OUTER_A, OUTER_B = "198.18.1.1", "198.18.1.2"
INNER_A, INNER_B = "10.99.0.1", "10.99.0.2"
PORT_A, PORT_B = 51820, 51821
IPERF_PORT = 5201
KINDS = ["wireguard-go", "wiretun", "wiretun->wireguard-go"]
SIDES = {  # kind -> (implementation in A, implementation in B)
    "wireguard-go": ("wireguard-go", "wireguard-go"),
    "wiretun": ("wiretun", "wiretun"),
    "wiretun->wireguard-go": ("wiretun", "wireguard-go"),
}
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    kind: str
    forward_bps: list[float] = field(default_factory=list)  # A -> B
    reverse_bps: list[float] = field(default_factory=list)  # B -> A
    cpu: list[float] = field(default_factory=list)  # WireGuard processes' CPU seconds per second, A -> B
    retransmits: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _run(*argv: str, timeout: float = 30, check: bool = True,  # type: ignore[no-untyped-def]
         **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _nsx(ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return _run("ip", "netns", "exec", ns, *argv, **kw)


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
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
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


@contextlib.contextmanager
def topology() -> Iterator[tuple[str, str]]:
    """Namespaces A and B and the veth pair between them; removed at the end."""
    from wiretun.linux import netns

    with netns.several("wgbA", "wgbB") as (a, b):  # removed at the end, daemons and iperf3 too
        veth_a, veth_b = f"vb{uuid.uuid4().hex[:6]}", f"vb{uuid.uuid4().hex[:6]}"
        _run("ip", "link", "add", veth_a, "netns", a, "type", "veth", "peer", "name", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, OUTER_A), (b, veth_b, OUTER_B)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        yield a, b


class Node:
    """One WireGuard process (wireguard-go or wiretun-wg) in a namespace, configured with wg."""

    def __init__(self, impl: str, ns: str, tmp: Path) -> None:
        self.impl = impl
        self.ns = ns
        self.ifname = f"wgb{uuid.uuid4().hex[:8]}"
        self.sock = SOCK_DIR / f"{self.ifname}.sock"
        self.private = _run("wg", "genkey").stdout.strip()
        self.public = _run("wg", "pubkey", input=self.private + "\n").stdout.strip()
        self.key_file = tmp / f"{self.ifname}.key"
        self.key_file.write_text(self.private + "\n")
        self.key_file.chmod(0o600)
        if impl == "wireguard-go":
            argv = [shutil.which("wireguard-go") or "wireguard-go", "-f", self.ifname]
        else:
            argv = [sys.executable, "-m", "wiretun.wireguard.daemon", "-f", self.ifname]
        env = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1",
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # `ip netns exec` execs the command: the pid is the WireGuard process's own.
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: self.sock.exists() or self.proc.poll() is not None, 30, f"{impl} to start")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{impl} exited with {self.proc.returncode}: {self.proc.stderr.read()[:300]}")
        except BaseException:
            self.close()
            raise

    def configure(self, port: int, inner: str, peer: "Node", peer_inner: str, peer_endpoint: str) -> None:
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
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


def _iperf(client_ns: str, server_ns: str, server_addr: str, seconds: float, reverse: bool) -> dict:
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_addr,
                               "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _nsx(server_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}").stdout.strip(), 10,
              "iperf3 to listen")
        argv = ["iperf3", "-c", server_addr, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", "5000"]
        if reverse:
            argv.append("-R")
        r = _nsx(client_ns, *argv, timeout=seconds + 60, check=False)
        try:
            report = json.loads(r.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 printed no JSON: {r.stderr.strip()[:300]}") from None
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)


def measure(kind: str, seconds: float, both_ways: bool, result: Result) -> None:
    impl_a, impl_b = SIDES[kind]
    with tempfile.TemporaryDirectory() as tmp, topology() as (ns_a, ns_b):
        a = b = None
        try:
            a = Node(impl_a, ns_a, Path(tmp))
            b = Node(impl_b, ns_b, Path(tmp))
            a.configure(PORT_A, INNER_A, b, INNER_B, f"{OUTER_B}:{PORT_B}")
            b.configure(PORT_B, INNER_B, a, INNER_A, f"{OUTER_A}:{PORT_A}")
            # Handshake first, so that it is not part of the measurement.
            _nsx(ns_a, "python3", "-c", _HANDSHAKE_PROBE, INNER_B, timeout=30)
            _wait(lambda: _latest_handshake(a) > 0, 15, "the handshake")
            cpu0, t0 = a.cpu_seconds() + b.cpu_seconds(), time.monotonic()
            report = _iperf(ns_a, ns_b, INNER_B, seconds, reverse=False)
            cpu = (a.cpu_seconds() + b.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            result.forward_bps.append(float(report["end"]["sum_received"]["bits_per_second"]))
            result.retransmits.append(int(report["end"]["sum_sent"].get("retransmits", 0)))
            result.cpu.append(cpu)
            if both_ways:
                report = _iperf(ns_a, ns_b, INNER_B, seconds, reverse=True)
                result.reverse_bps.append(float(report["end"]["sum_received"]["bits_per_second"]))
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


def machine_line() -> str:
    from _machine import machine_line as line

    wggo = _run("wireguard-go", "--version", check=False).stdout.split("\n", 1)[0].strip() or "wireguard-go ?"
    return line(wggo, _run("iperf3", "--version", check=False).stdout.split("\n", 1)[0].strip())


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def table(results: list[Result], seconds: float, rounds: int, both_ways: bool) -> str:
    by = {r.kind: r for r in results}
    base = by.get("wireguard-go")
    base_fwd = _median(base.forward_bps) if base else None
    base_rev = _median(base.reverse_bps) if base else None

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.3f}x" if value is not None and reference else "-"

    lines = [
        f"WireGuard tunnel throughput: iperf3 TCP through two WireGuard interfaces in two namespaces "
        f"({seconds:g} s per run, median of {rounds} interleaved round{'s' if rounds != 1 else ''})",
        machine_line(),
        "",
        f"{'pair (A -> B)':<24} {'Gbit/s':>8} {'x wg-go':>8} {'CPU':>5} {'retr':>6}"
        + (f" {'B->A Gbit/s':>11} {'x wg-go':>8}" if both_ways else ""),
    ]
    for r in results:
        fwd = _median(r.forward_bps)
        if fwd is None:
            lines.append(f"{r.kind:<24} failed: {'; '.join(r.errors)[:300]}")
            continue
        rev = _median(r.reverse_bps)
        cpu = _median(r.cpu)
        retr = _median([float(x) for x in r.retransmits])
        cpu_text = f"{cpu * 100:.0f}%" if cpu is not None else "-"
        retr_text = f"{retr:.0f}" if retr is not None else "-"
        line = f"{r.kind:<24} {fwd / 1e9:>8.3f} {ratio(fwd, base_fwd):>8} {cpu_text:>5} {retr_text:>6}"
        if both_ways:
            line += f" {(f'{rev / 1e9:.3f}' if rev is not None else '-'):>11} {ratio(rev, base_rev):>8}"
        if r.errors:
            line += f"  ({len(r.errors)} run(s) failed: {r.errors[0][:120]})"
        lines.append(line)
    lines.append("")
    lines.append("x wg-go: ratio to the wireguard-go pair in this run. CPU: CPU time of both WireGuard "
                 "processes per second of the A -> B run")
    lines.append("(200% = two cores). retr: TCP retransmissions reported by the iperf3 sender.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians shown (default 3)")
    parser.add_argument("--both-ways", action="store_true", help="also measure B -> A (iperf3 -R)")
    parser.add_argument("--only", default="", help=f"comma-separated pairs from: {', '.join(KINDS)}")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600:
        parser.error(f"--seconds {args.seconds} is outside 0..600")
    if not 1 <= args.rounds <= 20:
        parser.error(f"--rounds {args.rounds} is outside 1..20")
    kinds = [k.strip() for k in args.only.split(",") if k.strip()] or KINDS
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown pair {kind!r}; choose from {', '.join(KINDS)}")
    if os.geteuid() != 0:
        print("wireguard.py: needs root (network namespaces, TUN devices); skipped", file=sys.stderr)
        return 1
    for tool in ("iperf3", "ip", "ss", "wg", "wireguard-go", "python3"):
        if shutil.which(tool) is None:
            print(f"wireguard.py: {tool} is missing", file=sys.stderr)
            return 1
    results = {kind: Result(kind) for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            try:
                measure(kind, args.seconds, args.both_ways, results[kind])
            except KeyboardInterrupt:
                print("interrupted; cleaned up", file=sys.stderr)
                return 130
            except Exception as exc:  # one failed pair must not hide the others' numbers
                results[kind].errors.append(str(exc)[:300])
    print(table(list(results.values()), args.seconds, args.rounds, args.both_ways))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results.values()], indent=2))
    return 0 if all(r.forward_bps for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
