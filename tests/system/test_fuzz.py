"""``make fuzz`` in its short form (seconds): the UDP, handshake and UAPI fuzzing of a running wiretun-wg
and the library fuzzing on both paths. It fails on any defect the fuzzers find; the full run is
``make fuzz`` (minutes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_fuzz_finds_no_defect() -> None:
    tag = uuid.uuid4().hex[:6]  # this run's namespaces (others may fuzz meanwhile)
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), "--quick", "--seed", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "WIRETUN_NETNS_TAG": tag})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "defects: 0" in out, out
    # It really ran: attacks sent, probes through the tunnel, library calls on both paths.
    assert int(re.search(r"datagrams sent in all: (\d+)", out).group(1)) > 5000, out  # type: ignore[union-attr]
    probes = re.search(r"probes sent / delivered: (\d+) / (\d+)", out)
    assert probes and int(probes.group(2)) > 100, out
    assert int(re.search(r"library calls \(C\): (\d+)", out).group(1)) > 1000, out  # type: ignore[union-attr]
    assert int(re.search(r"library calls \(pure Python\): (\d+)", out).group(1)) > 1000, out  # type: ignore[union-attr]
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [n for n in after if f"{tag}-" in n], "fuzz namespaces left behind"
