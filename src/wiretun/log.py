"""Wintun's logger callback: ``callback(level, timestamp, message)``, bridged to :mod:`logging`.

The timestamp is Wintun's: 100-nanosecond intervals since 1601-01-01 UTC (a Windows FILETIME).
The callback may be called from several threads at once; it must serialise itself if it needs to.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Callable

# 100 ns intervals between 1601-01-01 and 1970-01-01.
_EPOCH_DELTA_100NS = 116_444_736_000_000_000

_logger = logging.getLogger("wiretun")


class LogLevel(enum.IntEnum):
    INFO = 0
    WARN = 1
    ERR = 2


LoggerCallback = Callable[[LogLevel, int, str], None]

_UNSET: object = object()
_callback: object = _UNSET  # _UNSET: go to logging; None: disabled; else a callable
_lock = threading.Lock()

_TO_LOGGING = {LogLevel.INFO: logging.INFO, LogLevel.WARN: logging.WARNING, LogLevel.ERR: logging.ERROR}


def set_logger(callback: LoggerCallback | None) -> None:
    """Set the global logger callback (WintunSetLogger). ``None`` disables logging entirely."""
    global _callback
    if callback is not None and not callable(callback):
        from .errors import InvalidParameter

        raise InvalidParameter(f"logger callback must be callable or None, not {type(callback).__name__}")
    with _lock:
        _callback = callback


def reset_logger() -> None:
    """Go back to the default: messages go to the ``wiretun`` :mod:`logging` logger."""
    global _callback
    with _lock:
        _callback = _UNSET


def filetime_now() -> int:
    """The current time as Wintun's timestamp: 100 ns intervals since 1601-01-01 UTC."""
    return time.time_ns() // 100 + _EPOCH_DELTA_100NS


def filetime_to_unix(timestamp: int) -> float:
    """Convert a Wintun timestamp to seconds since the Unix epoch."""
    return (timestamp - _EPOCH_DELTA_100NS) / 1e7


def log(level: LogLevel, message: str) -> None:
    cb = _callback
    if cb is None:
        return
    if cb is _UNSET:
        _logger.log(_TO_LOGGING[level], "%s", message)
        return
    try:
        cb(level, filetime_now(), message)  # type: ignore[operator]
    except Exception:  # a broken user logger must not break the data path
        _logger.exception("wiretun logger callback raised")


def info(message: str) -> None:
    log(LogLevel.INFO, message)


def warn(message: str) -> None:
    log(LogLevel.WARN, message)


def err(message: str) -> None:
    log(LogLevel.ERR, message)
