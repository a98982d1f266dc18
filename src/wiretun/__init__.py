"""wiretun: Wintun's layer-3 TUN API for Python on Linux, and a userspace WireGuard built on it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AccessDenied,
    AlreadyExists,
    BufferOverflow,
    Busy,
    EndOfFile,
    InvalidData,
    InvalidParameter,
    NoMoreItems,
    NotFound,
    NotSupported,
    WintunError,
)
from .log import LogLevel, set_logger

__version__ = "0.1.0"

MIN_RING_CAPACITY = 0x20000  # 128 KiB
MAX_RING_CAPACITY = 0x4000000  # 64 MiB
MAX_IP_PACKET_SIZE = 0xFFFF

# Imported on first use so that `import wiretun` stays cheap and pure modules work without pyroute2.
# Type checkers and IDEs see the real objects through the TYPE_CHECKING imports (keep both in step;
# tests/unit/test_typing.py checks that they agree).
if TYPE_CHECKING:
    from .adapter import Adapter, delete_driver, get_running_driver_version
    from .session import Packet as Packet  # not in __all__, importable by name
    from .session import Session

_LAZY = {
    "Adapter": "adapter",
    "get_running_driver_version": "adapter",
    "delete_driver": "adapter",
    "Session": "session",
    "Packet": "session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wiretun' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AccessDenied",
    "Adapter",
    "AlreadyExists",
    "BufferOverflow",
    "Busy",
    "EndOfFile",
    "InvalidData",
    "InvalidParameter",
    "LogLevel",
    "MAX_IP_PACKET_SIZE",
    "MAX_RING_CAPACITY",
    "MIN_RING_CAPACITY",
    "NoMoreItems",
    "NotFound",
    "NotSupported",
    "Session",
    "WintunError",
    "delete_driver",
    "get_running_driver_version",
    "set_logger",
]
