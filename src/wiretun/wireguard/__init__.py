"""A userspace WireGuard on wiretun: a sans-I/O protocol core, a device, the UAPI and a daemon.

``Device`` (device.py) runs WireGuard on a wiretun adapter; ``WireGuard`` (core.py) is the protocol
state machine with no I/O, usable on its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use (the device needs pyroute2 and the C crypto; the core does not). Type
# checkers and IDEs see the real objects through the TYPE_CHECKING imports (keep both in step;
# tests/unit/test_typing.py checks that they agree).
if TYPE_CHECKING:
    from .config import UAPIError
    from .core import Peer, WireGuard
    from .device import Device
    from .uapi import UAPIServer

_LAZY = {"Device": "device", "WireGuard": "core", "Peer": "core", "UAPIServer": "uapi", "UAPIError": "config"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wiretun.wireguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["Device", "Peer", "UAPIError", "UAPIServer", "WireGuard"]
