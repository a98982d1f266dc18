"""The port of Wintun's example.c, run as a user would: ``python -m wiretun example`` in a namespace."""

import re
import sys

from tests import netns as _netns

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{4} \[([+!-])\] (.*)$")


def test_example_prints_echo_replies_and_removes_adapter(make_netns):
    ns = make_netns("wtex")
    proc = _netns.run(ns, sys.executable, "-m", "wiretun", "example", "--seconds", "2.5", timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    messages = [m.group(2) for m in parsed]
    assert messages[0] == "Wintun library loaded"
    assert "Wintun v1.6 loaded" in messages
    assert "Launching threads and mangling packets..." in messages
    v4 = messages.count("Received IPv4 ICMP echo reply from 10.6.7.7 to 10.6.7.8")
    v6 = messages.count("Received IPv6 ICMPv6 echo reply from fd00:6:7::7 to fd00:6:7::8")
    sent4 = messages.count("Sending IPv4 ICMP echo request to 10.6.7.7 from 10.6.7.8")
    assert sent4 >= 2 and v4 >= 2 and v6 >= 2, messages
    assert v4 <= sent4
    assert messages[-2:] == ["Cleaning up and shutting down...", "Removed adapter Demo"]
    links = _netns.run(ns, "ip", "-o", "link", "show").stdout
    assert "Demo" not in links
