"""wiretun's Windows backend: wintun.dll 0.14 through ctypes, the IP Helper API by LUID.

The only place that knows wintun.dll, HANDLEs and iphlpapi. :mod:`.wintun_dll` binds the DLL's 14
exports, :mod:`._platform` is the shim that lets the same binding load the Linux stand-in the tests
build, :mod:`.adapter` and :mod:`.session` implement :mod:`wiretun._backend`'s interfaces over it, and
:mod:`.ipconfig` configures addresses, routes and MTU through the IP Helper API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adapter import (
    create_adapter,
    delete_driver,
    enumerate_adapters,
    get_running_driver_version,
    open_adapter,
)

__all__ = ["create_adapter", "delete_driver", "enumerate_adapters", "get_running_driver_version", "open_adapter"]

if TYPE_CHECKING:  # this module is the seam's Platform for win32
    from .. import _backend, windows

    _PLATFORM: _backend.Platform = windows
