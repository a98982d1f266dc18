"""`make demo`'s script, run as the quick start runs it, on both variants."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("right", ["wiretun-wg", "wireguard-go"])
def test_wireguard_demo(right):
    proc = subprocess.Popen(
        ["bash", str(ROOT / "demo" / "wireguard.sh"), right],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "IPERF_SECONDS": "1"},
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    namespaces = {f"wtdemo-l-{proc.pid}", f"wtdemo-r-{proc.pid}"}  # the script names them after its pid
    assert proc.returncode == 0, out + err
    assert "3 packets transmitted, 3 received, 0% packet loss" in out
    sender = re.search(r"([\d.]+) MBytes\s+([\d.]+) Mbits/sec\s+\d*\s+sender", out)
    assert sender and float(sender.group(1)) > 0, out
    assert out.count("latest handshake:") == 2
    assert "interface: wg0" in out and "interface: wg1" in out
    assert "cleaned up" in out
    # Deleting the interfaces is how the demo stops its daemons: a normal event, no warning or error
    # from wiretun-wg (Debian's wireguard-go prints an ERROR of its own about the MTU then; not ours).
    ours = ("wg0", "wg1") if right == "wiretun-wg" else ("wg0",)
    noisy = [line for line in out.splitlines() if re.match(r"(ERROR|WARNING): \(({})\)".format("|".join(ours)), line)]
    assert noisy == [], out
    if right == "wiretun-wg":
        assert "ERROR" not in out, out
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not after & namespaces, "demo namespaces left behind"
    assert not any(p.name in ("wg0.sock", "wg1.sock") for p in Path("/var/run/wireguard").glob("*.sock"))
