"""``make fuzz``: attack a running wiretun-wg and fuzz the library, then print what was sent and found.

    python fuzz/run.py [--quick] [--seed N] [--peer wireguard-go|wiretun-wg] [--only net,library]

Needs root (namespaces, TUN devices); everything happens in namespaces made and removed here. The full
run takes a few minutes; ``--quick`` (seconds) is what ``make test`` runs. Exit status 0 only when no
defect was found: no crash, no hang, no forged or replayed delivery, no fd leak, no memory growth, no
raw exception from the library, and the C and pure-Python paths agreeing call for call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def library(quick: bool, seed: int) -> tuple[list[str], dict[str, object]]:
    """The library fuzzer twice, C loops and pure Python, each in its own process; then compare."""
    defects: list[str] = []
    figures: dict[str, object] = {}
    rounds = "30" if quick else "600"
    transcripts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="wtfzl-") as tmp:
        for label, env_value in (("C", "0"), ("pure Python", "1")):
            path = Path(tmp) / f"{env_value}.txt"
            env = dict(os.environ, WIRETUN_NO_SPEEDUPS=env_value)
            t0 = time.monotonic()
            try:
                r = subprocess.run([sys.executable, str(HERE / "library.py"), "--rounds", rounds, "--seed", str(seed),
                                    "--transcript", str(path)], env=env, capture_output=True, text=True,
                                   timeout=120 if quick else 1200)
            except subprocess.TimeoutExpired:
                defects.append(f"library ({label}): no result within the time limit (hang)")
                continue
            if r.returncode != 0:
                defects.append(f"library ({label}): exit status {r.returncode} (crash): {r.stderr.strip()[-500:]}")
                continue
            result = json.loads(r.stdout.strip().splitlines()[-1])
            if label == "C" and not result["speedups"]:
                print("  note: the C extension is not built; both runs use pure Python")
            for d in result["defects"]:
                defects.append(f"library ({label}): {d}")
            if result["defect_count"] > len(result["defects"]):
                defects.append(f"library ({label}): ... {result['defect_count'] - len(result['defects'])} more")
            figures[f"library calls ({label})"] = result["calls"]
            figures[f"library calls by area ({label})"] = result["by_area"]
            figures[f"library seconds ({label})"] = round(time.monotonic() - t0, 1)
            transcripts[label] = path.read_text().splitlines()
    if len(transcripts) == 2:
        a, b = transcripts["C"], transcripts["pure Python"]
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                defects.append(f"library: the C and pure-Python paths disagree at call {i}: {x!r} vs {y!r}")
                break
        else:
            if len(a) != len(b):
                defects.append(f"library: the C and pure-Python paths made {len(a)} and {len(b)} calls")
    return defects, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds instead of minutes (what make test runs)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--peer", choices=["wireguard-go", "wiretun-wg"], default=None,
                        help="the target's peer (default: Debian's wireguard-go when installed)")
    parser.add_argument("--only", default="net,library", help="net, library or both (default)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("fuzz: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    peer = args.peer or ("wireguard-go" if shutil.which("wireguard-go") else "wiretun-wg")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    print(f"fuzz: {'quick' if args.quick else 'full'} run, seed {args.seed}, peer {peer}", flush=True)
    defects: list[str] = []
    figures: dict[str, object] = {}
    if "net" in parts:
        import net

        print("fuzz: UDP, handshake and UAPI against wiretun-wg ...", flush=True)
        found, got = net.run(net.QUICK if args.quick else net.FULL, peer, args.seed)
        defects += found
        figures.update(got)
    if "library" in parts:
        print("fuzz: ring, offload helpers and session, C and pure Python ...", flush=True)
        found, got = library(args.quick, args.seed)
        defects += found
        figures.update(got)
    print("\nfuzz results")
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        else:
            print(f"  {key}: {value}")
    def count(*words: str) -> int:
        return sum(1 for d in defects if any(w in d for w in words))

    print(f"  crashes: {count('(crash)', 'traceback', 'event loop failed')}, hangs: {count('(hang)')}, "
          f"raw exceptions: {count(' raised ')}, C/Python disagreements: {count('disagree')}, "
          f"fd leaks: {count('file descriptors')}, memory growth: {count('RSS grew')}")
    print(f"  defects: {len(defects)}")
    for d in defects:
        print(f"    - {d}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
