"""The platform shim under the wintun.dll binding: the only code that differs between Windows and Linux.

The binding (:mod:`wiretun.windows.wintun_dll`) declares Wintun's 14 functions once, in fixed-width
types, and asks this module for five things: how to load the library, which calling convention its
callbacks use, the calling thread's last error after a call, how to create / wait on / signal /
duplicate / close an event HANDLE, and whether the process may create adapters.

* On Windows: ``WinDLL`` with ``use_last_error`` (stdcall on 32-bit x86, the platform ABI elsewhere),
  ``WINFUNCTYPE`` callbacks, ``ctypes.get_last_error()``, and kernel32's ``WaitForSingleObject``,
  ``SetEvent``, ``DuplicateHandle`` and ``CloseHandle``. This branch is not run by wiretun's tests (they
  run on Linux); it is type-checked with ``mypy --platform win32``.
* Elsewhere (the Linux stand-in library the tests build): ``CDLL``, ``CFUNCTYPE`` callbacks, the
  library's own thread-local last-error slot (it exports ``GetLastError`` as kernel32 does), and an event
  HANDLE that is an eventfd: waiting polls it and reads it (auto-reset), signalling writes it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Callable

WAIT_INFINITE = 0xFFFFFFFF

if sys.platform == "win32":
    import functools

    @functools.cache
    def _kernel32() -> ctypes.CDLL:
        """kernel32's calls, declared on first use (importing wiretun loads nothing)."""
        k = ctypes.WinDLL("kernel32", use_last_error=True)
        for name, restype, argtypes in (
            ("WaitForSingleObject", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_uint32]),
            ("SetEvent", ctypes.c_int32, [ctypes.c_void_p]),
            ("CloseHandle", ctypes.c_int32, [ctypes.c_void_p]),
            ("GetCurrentProcess", ctypes.c_void_p, []),
            ("DuplicateHandle", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint32,
                                                 ctypes.c_int32, ctypes.c_uint32]),
            ("CreateEventW", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]),
        ):
            fn = getattr(k, name)
            fn.restype = restype
            fn.argtypes = argtypes
        return k

    _DUPLICATE_SAME_ACCESS = 0x2
    _WAIT_OBJECT_0 = 0x0
    _WAIT_TIMEOUT = 0x102

    FUNCTYPE: Callable[..., Any] = ctypes.WINFUNCTYPE
    NAME = "windows"

    def load_library(path: str) -> ctypes.CDLL:
        """Load ``path`` (the full path of wintun.dll) with Windows' calling convention and last error."""
        return ctypes.WinDLL(path, use_last_error=True)

    def last_error(library: ctypes.CDLL) -> int:
        """The Win32 error the last foreign call on this thread left (saved by ctypes right after it)."""
        return ctypes.get_last_error()

    def wait(handle: int, milliseconds: int) -> bool:
        """WaitForSingleObject: True when the event was signalled (and, auto-reset, is now clear)."""
        result = _kernel32().WaitForSingleObject(handle, milliseconds)
        if result == _WAIT_OBJECT_0:
            return True
        if result == _WAIT_TIMEOUT:
            return False
        raise OSError(0, "WaitForSingleObject failed", None, ctypes.get_last_error())

    def signal(handle: int) -> None:
        if not _kernel32().SetEvent(handle):
            raise OSError(0, "SetEvent failed", None, ctypes.get_last_error())

    def duplicate(handle: int) -> int:
        """A second HANDLE to the same event object (it outlives the DLL closing its own)."""
        k = _kernel32()
        process = k.GetCurrentProcess()
        out = ctypes.c_void_p()
        if not k.DuplicateHandle(process, handle, process, ctypes.byref(out), 0, 0, _DUPLICATE_SAME_ACCESS):
            raise OSError(0, "DuplicateHandle failed", None, ctypes.get_last_error())
        return out.value or 0

    def close(handle: int) -> None:
        _kernel32().CloseHandle(handle)

    def create_event() -> int:
        """A new manual-reset event, not signalled (it stays signalled once set)."""
        handle = _kernel32().CreateEventW(None, 1, 0, None)
        if not handle:
            raise OSError(0, "CreateEventW failed", None, ctypes.get_last_error())
        return int(handle)

    def is_elevated() -> bool:
        """Whether the process runs elevated (an administrator token): Wintun needs it to create adapters."""
        try:
            return bool(ctypes.windll.shell32.IsUserAnAdmin())
        except (AttributeError, OSError):
            return False

else:
    import select

    FUNCTYPE = ctypes.CFUNCTYPE
    NAME = "standin"

    def load_library(path: str) -> ctypes.CDLL:
        """Load the stand-in library (a Linux shared object with Wintun's 14 exports + GetLastError)."""
        library = ctypes.CDLL(path)
        getter = library.GetLastError
        getter.restype = ctypes.c_uint32
        getter.argtypes = []
        return library

    def last_error(library: ctypes.CDLL) -> int:
        """The stand-in's thread-local last error, read on the thread that made the failed call."""
        return int(library.GetLastError())

    def wait(handle: int, milliseconds: int) -> bool:
        """Wait for the eventfd to become readable, then read it (the event is auto-reset)."""
        timeout = -1 if milliseconds == WAIT_INFINITE else milliseconds
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        if not poller.poll(timeout):
            return False
        try:
            os.eventfd_read(handle)
        except BlockingIOError:
            pass  # another waiter took it: still a wake-up, as a Windows waiter may see one
        return True

    def signal(handle: int) -> None:
        os.eventfd_write(handle, 1)

    def duplicate(handle: int) -> int:
        return os.dup(handle)

    def close(handle: int) -> None:
        os.close(handle)

    def create_event() -> int:
        """A new eventfd, not signalled; it stays readable once set (nobody reads it)."""
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def is_elevated() -> bool:
        """On Linux the stand-in needs CAP_NET_ADMIN for /dev/net/tun (mode 0600 here): root."""
        return os.geteuid() == 0
