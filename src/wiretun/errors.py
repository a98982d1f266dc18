"""One exception family for wiretun; each class carries the Wintun (Win32) error code it stands for.

Wintun reports failures through GetLastError(); wiretun raises ``WintunError`` subclasses whose
``code`` is that same number, so code ported from Wintun can keep switching on it.
"""

from __future__ import annotations

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_DATA = 13
ERROR_HANDLE_EOF = 38
ERROR_INVALID_PARAMETER = 87
ERROR_BUFFER_OVERFLOW = 111
ERROR_BUSY = 170
ERROR_ALREADY_EXISTS = 183
ERROR_NO_MORE_ITEMS = 259
ERROR_NOT_SUPPORTED = 50


class WintunError(Exception):
    """Base of every wiretun error. ``code`` is the Win32 error code Wintun would set."""

    code: int = 0

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NoMoreItems(WintunError):
    """ERROR_NO_MORE_ITEMS: the receive ring is empty right now."""

    code = ERROR_NO_MORE_ITEMS


class BufferOverflow(WintunError):
    """ERROR_BUFFER_OVERFLOW: the send ring is full; the caller should drop the packet."""

    code = ERROR_BUFFER_OVERFLOW


class EndOfFile(WintunError):
    """ERROR_HANDLE_EOF: the session or its adapter has ended."""

    code = ERROR_HANDLE_EOF


class InvalidData(WintunError):
    """ERROR_INVALID_DATA: a ring holds a bogus Head, Tail or packet size."""

    code = ERROR_INVALID_DATA


class InvalidParameter(WintunError, ValueError):
    """ERROR_INVALID_PARAMETER: an argument is out of range or malformed."""

    code = ERROR_INVALID_PARAMETER


class AlreadyExists(WintunError):
    """ERROR_ALREADY_EXISTS: the name is taken."""

    code = ERROR_ALREADY_EXISTS


class NotFound(WintunError, LookupError):
    """ERROR_FILE_NOT_FOUND: no such adapter (or no wiretun adapter by that name)."""

    code = ERROR_FILE_NOT_FOUND


class Busy(WintunError):
    """ERROR_BUSY: the adapter already has a session (or the queue is taken)."""

    code = ERROR_BUSY


class AccessDenied(WintunError, PermissionError):
    """ERROR_ACCESS_DENIED: the kernel refused (not root and not the adapter's owner)."""

    code = ERROR_ACCESS_DENIED


class NotSupported(WintunError):
    """ERROR_NOT_SUPPORTED: the kernel lacks a feature this call needs."""

    code = ERROR_NOT_SUPPORTED
