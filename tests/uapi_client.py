"""A minimal client for the WireGuard UAPI text protocol, shared by the unit and system UAPI tests."""

from __future__ import annotations

import re
import socket
from pathlib import Path

_REPLY_END = re.compile(rb"(^|\n)errno=-?[0-9]+\n\n\Z")


def connect(path: str | Path, timeout: float = 5.0) -> socket.socket:
    """A connected UNIX stream socket to the UAPI socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_reply(s: socket.socket) -> str:
    """Read up to and including the blank line that ends a reply (or until the server hangs up)."""
    data = bytearray()
    # Only the tail can hold the end: looking at all of it after each chunk made reading a reply with
    # a million allowed IPs take minutes.
    while not _REPLY_END.search(data, max(0, len(data) - 64)):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data.decode()


def exchange(path: str | Path, request: str | bytes) -> str:
    """Send one request on a fresh connection and return the reply."""
    with connect(path) as s:
        s.sendall(request.encode() if isinstance(request, str) else request)
        return read_reply(s)
