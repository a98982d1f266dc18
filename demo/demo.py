"""Run Wintun's example (``wiretun example``) inside a network namespace made for it, then remove it.

The host's own interfaces, addresses and routes are never touched.
"""

import subprocess
import sys

from wiretun.linux import netns

SECONDS = "4"

with netns.temporary("wtdemo", enter=False) as ns:
    print(f"# namespace {ns}: wiretun example --seconds {SECONDS}", flush=True)
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "wiretun", "example", "--seconds", SECONDS])
print("# namespace removed", flush=True)
sys.exit(result.returncode)
