"""Run Wintun's example (``wiretun example``) inside a network namespace made for it, then remove it.

The host's own interfaces, addresses and routes are never touched.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import netns

SECONDS = "4"

with netns.temporary("wtdemo", enter=False) as ns:
    print(f"# namespace {ns}: wiretun example --seconds {SECONDS}", flush=True)
    argv = [sys.executable, "-m", "wiretun", "example", "--seconds", SECONDS]
    result = subprocess.run(["ip", "netns", "exec", ns, *argv])
print("# namespace removed", flush=True)
sys.exit(result.returncode)
