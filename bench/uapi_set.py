"""Large UAPI requests: one ``set`` of N allowed IPs for one peer, then a ``get`` of them all.

    sudo .venv/bin/python bench/uapi_set.py [--lines 1000000] [--upstream PATH]

Each daemon (wiretun-wg; Debian's wireguard-go when installed; upstream wireguard-go from
``--upstream`` or ``$WIREGUARD_GO_UPSTREAM``) runs alone in a namespace made for it. Printed per
daemon: the set's wall time and the daemon's CPU time for it, its peak RSS (VmHWM) after the set,
and the get's wall time. Run under ``flock /tmp/wiretun-bench.lock``; the machine's other load shows in
the wall times, less in the CPU times. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOCK_DIR = Path("/var/run/wireguard")


def request(count: int) -> bytes:
    """Three in four IPv4 /32s, one in four IPv6 /64s, all distinct."""
    lines = [f"set=1\npublic_key={'ab' * 32}\nreplace_allowed_ips=true\n"]
    for i in range(count):
        if i % 4 == 3:
            lines.append(f"allowed_ip=fd99:{i >> 16:x}:{i & 0xFFFF:x}::/64\n")
        else:
            lines.append(f"allowed_ip=10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32\n")
    lines.append("\n")
    return "".join(lines).encode()


def read_reply(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(label: str, argv: list[str], body: bytes, count: int) -> str:
    name = "wtbu" + uuid.uuid4().hex[:6]
    ns = "wtbu-" + uuid.uuid4().hex[:8]
    path = SOCK_DIR / f"{name}.sock"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv, "-f", name],
                            env=dict(os.environ, LOG_LEVEL="silent", WG_PROCESS_FOREGROUND="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                return f"{label:<22} did not start"
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            sock.sendall(body)
            reply = read_reply(sock)
            t1 = time.monotonic()
            cpu = cpu_seconds(proc.pid) - cpu0
            peak = peak_mb(proc.pid)
            sock.sendall(b"get=1\n\n")
            state = read_reply(sock)
            t2 = time.monotonic()
        listed = state.count(b"\nallowed_ip=")
        ok = "" if reply == b"errno=0\n\n" and listed == count else f"  (reply {reply[:20]!r}, {listed} listed)"
        return f"{label:<22} {t1 - t0:8.2f} {cpu:8.2f} {peak:9.0f} {t2 - t1:8.2f}{ok}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        if path.exists():
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="allowed_ip lines in the set")
    parser.add_argument("--upstream", default=os.environ.get("WIREGUARD_GO_UPSTREAM", ""),
                        help="upstream wireguard-go binary (default $WIREGUARD_GO_UPSTREAM)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (namespaces, TUN devices)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_line

    daemons = [("wiretun-wg", [sys.executable, "-m", "wiretun.wireguard.daemon"])]
    debian = shutil.which("wireguard-go")
    if debian:
        daemons.append(("wireguard-go (Debian)", [debian]))
    if args.upstream and os.access(args.upstream, os.X_OK):
        daemons.append(("wireguard-go (upstream)", [args.upstream]))
    body = request(args.lines)
    print(machine_line())
    print(f"one set of {args.lines} allowed_ip lines ({len(body) / 1e6:.1f} MB), then a get of them all")
    print(f"{'daemon':<22} {'set s':>8} {'set CPU':>8} {'peak MB':>9} {'get s':>8}")
    for label, command in daemons:
        print(run_one(label, command, body, args.lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
