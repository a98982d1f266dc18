"""``wiretun example`` (Wintun's example.c) on the Windows backend: the same code path through the
wintun.dll binding, over the Linux stand-in, in a namespace of the test's own."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from wiretun import example, log

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{4} \[([+!-])\] (.*)$")


def test_example_runs_on_the_windows_backend(netns: str, windows_backend: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    try:
        counts = example.run(2.5)
    finally:
        log.reset_logger()
    lines = capsys.readouterr().err.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    messages = [m.group(2) for m in parsed if m]
    assert messages[0] == "Wintun library loaded"
    assert "Wintun v0.14 loaded" in messages  # the stand-in says 0.14, as wintun.dll 0.14 does
    assert "Launching threads and mangling packets..." in messages
    v4 = messages.count("Received IPv4 ICMP echo reply from 10.6.7.7 to 10.6.7.8")
    v6 = messages.count("Received IPv6 ICMPv6 echo reply from fd00:6:7::7 to fd00:6:7::8")
    assert counts["replies"] >= 4 and v4 >= 2 and v6 >= 2, messages
    assert messages[-1] == "Removed adapter Demo"
    assert "Cleaning up and shutting down..." in messages
    assert subprocess.run(["ip", "link", "show", "dev", "Demo"], capture_output=True).returncode != 0
