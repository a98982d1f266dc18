"""The machine line every benchmark prints above its table (imported by the bench scripts)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_line(*tools: str) -> str:
    """``CPU: … (N cores); kernel …; Python …`` followed by the versions of the tools given."""
    parts = [f"CPU: {cpu_model()} ({os.cpu_count()} cores)", f"kernel {platform.release()}",
             f"Python {platform.python_version()}", *tools]
    return "; ".join(parts)
