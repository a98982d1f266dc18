"""``make bench``: run every benchmark in bench/, each printing its own table.

bench/forward.py runs first (the forwarding benchmark of issue 4), then every other ``bench/*.py``
that exists (session.py, wg_core.py, wireguard.py, ... in name order), each with its own defaults.
Exits non-zero if any of them failed; one failure does not stop the others.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST = "forward.py"
SKIP = {"run_all.py"}


def benchmarks() -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP and not p.name.startswith("_"))
    return sorted(found, key=lambda p: (p.name != FIRST, p.name))


def main() -> int:
    failed: list[str] = []
    for path in benchmarks():
        print(f"=== {path.name} ===", flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run([sys.executable, str(path)], cwd=HERE.parent).returncode
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        print(f"--- {path.name}: exit {code}, {time.monotonic() - start:.0f} s\n", flush=True)
        if code != 0:
            failed.append(path.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
