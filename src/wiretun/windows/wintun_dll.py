"""A ctypes binding of wintun.dll 0.14: its 14 exports with exact prototypes, and errors as WintunError.

Every prototype is written in fixed-width types, so the same declarations are right for the real DLL on
Windows (any architecture) and for the Linux stand-in the tests build: ``c_uint32`` for DWORD,
``c_int32`` for BOOL and the logger level enum, ``c_uint64`` for DWORD64 and NET_LUID, ``c_void_p`` for
every HANDLE and BYTE*, a 16-byte :class:`GUID` structure, and NUL-terminated UTF-16LE ``c_uint16``
buffers for WCHAR strings (never ``c_wchar``, which is 4 bytes on Linux). Loading, the calling
convention, the last error and waiting on a HANDLE are the platform shim's (:mod:`._platform`).

Where the DLL comes from (:func:`locate`): the path in ``WIRETUN_WINTUN_DLL`` if set, else the official
signed wintun.dll inside the ``pytun-pmd3`` package (``pytun_pmd3/wintun/bin/<arch>/wintun.dll``, a
dependency of wiretun on Windows), for the interpreter's architecture: amd64, x86, arm64 or arm.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sysconfig
import threading
import uuid
from typing import Any, Callable, Final

from .. import errors, log
from ..errors import (
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
from . import _platform

__all__ = [
    "DLL_ENV",
    "EXPORTS",
    "GUID",
    "WintunDLL",
    "dll_arch",
    "error_for",
    "load",
    "locate",
]

DLL_ENV: Final = "WIRETUN_WINTUN_DLL"
"""Environment variable: the full path of the wintun.dll (or stand-in library) to load."""
MAX_ADAPTER_NAME: Final = 128  # WCHARs, NUL included (ifdef.h); names hold up to 127 characters

# Win32 error codes beyond the ones wiretun.errors names, and the WintunError class each is reported as.
ERROR_PATH_NOT_FOUND: Final = 3
ERROR_DUP_NAME: Final = 52
ERROR_FILE_EXISTS: Final = 80
ERROR_INVALID_NAME: Final = 123
ERROR_NOT_FOUND: Final = 1168
ERROR_ALREADY_INITIALIZED: Final = 1247
ERROR_GEN_FAILURE: Final = 31

_CLASSES: Final[dict[int, type[WintunError]]] = {
    errors.ERROR_FILE_NOT_FOUND: NotFound,
    ERROR_PATH_NOT_FOUND: NotFound,
    ERROR_NOT_FOUND: NotFound,
    errors.ERROR_ACCESS_DENIED: AccessDenied,
    errors.ERROR_INVALID_DATA: InvalidData,
    errors.ERROR_HANDLE_EOF: EndOfFile,
    errors.ERROR_INVALID_PARAMETER: InvalidParameter,
    ERROR_INVALID_NAME: InvalidParameter,
    errors.ERROR_BUFFER_OVERFLOW: BufferOverflow,
    errors.ERROR_BUSY: Busy,
    ERROR_ALREADY_INITIALIZED: Busy,
    errors.ERROR_ALREADY_EXISTS: AlreadyExists,
    ERROR_DUP_NAME: AlreadyExists,
    ERROR_FILE_EXISTS: AlreadyExists,
    errors.ERROR_NO_MORE_ITEMS: NoMoreItems,
    errors.ERROR_NOT_SUPPORTED: NotSupported,
}


def error_for(code: int, what: str) -> WintunError:
    """The WintunError for Win32 error ``code``: the same class (and ``code``) as Linux raises for the same
    failure; a code Linux has no counterpart for keeps its own number on a plain WintunError."""
    cls = _CLASSES.get(code)
    if cls is None:
        return WintunError(f"{what}: Win32 error {code}", code)
    note = "" if code == cls.code else f" (Win32 error {code})"
    if cls is AccessDenied:
        note += "; creating and opening Wintun adapters needs an elevated (Administrator) process"
    return cls(f"{what}{note}")


class GUID(ctypes.Structure):
    """Windows' GUID: 16 bytes, the first three fields little-endian (``uuid.UUID.bytes_le``)."""

    _fields_ = [
        ("Data1", ctypes.c_uint32),
        ("Data2", ctypes.c_uint16),
        ("Data3", ctypes.c_uint16),
        ("Data4", ctypes.c_uint8 * 8),
    ]

    @classmethod
    def from_uuid(cls, value: uuid.UUID) -> GUID:
        return cls.from_buffer_copy(value.bytes_le)

    def to_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))


WideString = ctypes.POINTER(ctypes.c_uint16)
"""``const WCHAR *``: a NUL-terminated UTF-16LE string."""

LOGGER_CALLBACK = _platform.FUNCTYPE(None, ctypes.c_int32, ctypes.c_uint64, WideString)
"""``void (CALLBACK *)(WINTUN_LOGGER_LEVEL Level, DWORD64 Timestamp, const WCHAR *Message)``."""

# name: (restype, argtypes). Exactly the 0.14 exports (tests/windows/test_wintun_exports.py reads them
# from the real DLLs' export tables).
EXPORTS: Final[dict[str, tuple[Any, list[Any]]]] = {
    "WintunCreateAdapter": (ctypes.c_void_p, [WideString, WideString, ctypes.POINTER(GUID)]),
    "WintunOpenAdapter": (ctypes.c_void_p, [WideString]),
    "WintunCloseAdapter": (None, [ctypes.c_void_p]),
    "WintunDeleteDriver": (ctypes.c_int32, []),
    "WintunGetAdapterLUID": (None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)]),
    "WintunGetRunningDriverVersion": (ctypes.c_uint32, []),
    "WintunSetLogger": (None, [LOGGER_CALLBACK]),
    "WintunStartSession": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_uint32]),
    "WintunEndSession": (None, [ctypes.c_void_p]),
    "WintunGetReadWaitEvent": (ctypes.c_void_p, [ctypes.c_void_p]),
    "WintunReceivePacket": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
    "WintunReleaseReceivePacket": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "WintunAllocateSendPacket": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_uint32]),
    "WintunSendPacket": (None, [ctypes.c_void_p, ctypes.c_void_p]),
}

_ARCHES: Final = {"win-amd64": "amd64", "win32": "x86", "win-arm64": "arm64", "win-arm32": "arm"}


def dll_arch(platform_tag: str | None = None) -> str:
    """The wintun.dll architecture directory for an interpreter's platform tag (``sysconfig.get_platform()``:
    ``win-amd64`` -> ``amd64``, ``win32`` -> ``x86``, ``win-arm64`` -> ``arm64``, ``win-arm32`` -> ``arm``).
    The interpreter's, not the machine's: a 32-bit Python on 64-bit Windows needs the x86 DLL."""
    tag = sysconfig.get_platform() if platform_tag is None else platform_tag
    arch = _ARCHES.get(tag.lower())
    if arch is None:
        raise NotSupported(f"wintun.dll is built for {', '.join(sorted(_ARCHES))}; this interpreter is {tag}")
    return arch


def locate(platform_tag: str | None = None) -> str:
    """The path of the wintun.dll to load: ``WIRETUN_WINTUN_DLL``, else pytun-pmd3's copy for this
    interpreter's architecture. NotFound (with what to do) when neither is there."""
    given = os.environ.get(DLL_ENV)
    if given:
        if not os.path.isfile(given):
            raise NotFound(f"{DLL_ENV}={given!r} is not a file; point it at wintun.dll (0.14)")
        return os.path.abspath(given)
    arch = dll_arch(platform_tag)
    spec = importlib.util.find_spec("pytun_pmd3")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = os.path.join(root, "wintun", "bin", arch, "wintun.dll")
        if os.path.isfile(path):
            return path
    where = "pytun-pmd3 is not installed" if not roots else f"pytun-pmd3 at {roots[0]} has no {arch} wintun.dll"
    raise NotFound(
        f"wintun.dll not found ({where}): `pip install wiretun` on Windows installs it "
        f"(pytun-pmd3==3.0.3 carries the official signed wintun.dll 0.14.1), "
        f"or set {DLL_ENV} to the full path of a wintun.dll for {arch}"
    )


def _wide(text: str) -> ctypes.Array[ctypes.c_uint16]:
    """``text`` as a NUL-terminated UTF-16LE buffer for a ``const WCHAR *`` argument."""
    raw = text.encode("utf-16-le") + b"\0\0"
    return (ctypes.c_uint16 * (len(raw) // 2)).from_buffer_copy(raw)


def wide_to_str(pointer: Any, limit: int = 1 << 16) -> str:
    """The NUL-terminated UTF-16LE string at ``pointer`` (a ``WideString``), at most ``limit`` units."""
    if not pointer:
        return ""
    units = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_uint16))
    n = 0
    while n < limit and units[n]:
        n += 1
    return ctypes.string_at(ctypes.addressof(units.contents), 2 * n).decode("utf-16-le", "replace")


class WintunDLL:
    """wintun.dll loaded and declared: one method per export, each raising the mapped WintunError.

    Thread-safe as the DLL is; the per-packet methods return addresses (ints) so that the session layer
    makes the views."""

    def __init__(self, path: str) -> None:
        try:
            lib = _platform.load_library(path)
        except OSError as exc:
            raise NotFound(f"cannot load {path}: {exc}") from None
        missing = [name for name in EXPORTS if not hasattr(lib, name)]
        if missing:
            raise NotSupported(f"{path} is not wintun.dll 0.14: it lacks {', '.join(missing)}")
        for name, (restype, argtypes) in EXPORTS.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.path = path
        self._lib = lib
        f = lib
        self._create = f.WintunCreateAdapter
        self._open = f.WintunOpenAdapter
        self._close = f.WintunCloseAdapter
        self._delete_driver = f.WintunDeleteDriver
        self._get_luid = f.WintunGetAdapterLUID
        self._version = f.WintunGetRunningDriverVersion
        self._set_logger = f.WintunSetLogger
        self._start = f.WintunStartSession
        self._end = f.WintunEndSession
        self._read_wait = f.WintunGetReadWaitEvent
        self._receive = f.WintunReceivePacket
        self._release = f.WintunReleaseReceivePacket
        self._allocate = f.WintunAllocateSendPacket
        self._send = f.WintunSendPacket
        self._logger: Any = None  # the ctypes callback object must outlive its registration

    def last_error(self) -> int:
        return _platform.last_error(self._lib)

    def _fail(self, what: str) -> WintunError:
        return error_for(self.last_error(), what)

    # -- adapters --

    def create_adapter(self, name: str, tunnel_type: str, guid: uuid.UUID | None) -> int:
        """WintunCreateAdapter: an adapter handle (a non-zero int)."""
        ref = None if guid is None else ctypes.byref(GUID.from_uuid(guid))
        handle = self._create(_wide(name), _wide(tunnel_type), ref)
        if not handle:
            raise self._fail(f"cannot create adapter {name!r}")
        return int(handle)

    def open_adapter(self, name: str) -> int:
        handle = self._open(_wide(name))
        if not handle:
            raise self._fail(f"cannot open adapter {name!r}")
        return int(handle)

    def close_adapter(self, adapter: int) -> None:
        self._close(adapter)

    def get_adapter_luid(self, adapter: int) -> int:
        luid = ctypes.c_uint64(0)
        self._get_luid(adapter, ctypes.byref(luid))
        return luid.value

    def get_running_driver_version(self) -> int:
        version = int(self._version())
        if not version:
            raise self._fail("cannot read the Wintun driver version (is the driver loaded?)")
        return version

    def delete_driver(self) -> None:
        if not self._delete_driver():
            raise self._fail("cannot delete the Wintun driver")

    def set_logger(self, callback: Callable[[int, int, str], None] | None) -> None:
        """WintunSetLogger: ``callback(level, timestamp, message)`` (None disables). The callback is kept
        alive here for as long as it is registered."""
        if callback is None:
            self._set_logger(LOGGER_CALLBACK())  # a NULL function pointer
            self._logger = None
            return

        def trampoline(level: int, timestamp: int, message: Any) -> None:
            try:
                callback(level, timestamp, wide_to_str(message))
            except Exception:  # an exception must never unwind into the DLL
                pass

        native = LOGGER_CALLBACK(trampoline)
        self._set_logger(native)
        self._logger = native

    # -- sessions --

    def start_session(self, adapter: int, capacity: int) -> int:
        session = self._start(adapter, capacity)
        if not session:
            raise self._fail(f"cannot start a session of capacity {capacity:#x}")
        return int(session)

    def end_session(self, session: int) -> None:
        self._end(session)

    def get_read_wait_event(self, session: int) -> int:
        event = self._read_wait(session)
        if not event:
            raise self._fail("the session has no read-wait event")
        return int(event)

    def receive_packet(self, session: int, size_out: ctypes.c_uint32) -> int:
        """WintunReceivePacket: the packet's address, its size left in ``size_out``; 0 when the ring is
        empty (ERROR_NO_MORE_ITEMS, no exception: the common case of a poll); EndOfFile / InvalidData."""
        address = self._receive(session, ctypes.byref(size_out))
        if address:
            return int(address)
        code = self.last_error()
        if code == errors.ERROR_NO_MORE_ITEMS:
            return 0
        raise error_for(code, "cannot receive a packet")

    def release_receive_packet(self, session: int, address: int) -> None:
        self._release(session, address)

    def allocate_send_packet(self, session: int, size: int) -> int:
        """WintunAllocateSendPacket: the address of ``size`` writable bytes; BufferOverflow, EndOfFile."""
        address = self._allocate(session, size)
        if not address:
            raise self._fail(f"cannot allocate a {size}-byte packet")
        return int(address)

    def send_packet(self, session: int, address: int) -> None:
        self._send(session, address)


_loaded: WintunDLL | None = None
_load_lock = threading.Lock()


def load(path: str | None = None) -> WintunDLL:
    """The process's wintun.dll binding, loaded on first use from ``path`` or :func:`locate`."""
    global _loaded
    with _load_lock:
        if _loaded is None or (path is not None and os.path.abspath(path) != _loaded.path):
            _loaded = WintunDLL(os.path.abspath(path) if path is not None else locate())
            _loaded.set_logger(forward_log)  # the DLL's own messages go where wiretun's go
        return _loaded


def forward_log(level: int, timestamp: int, message: str) -> None:
    """The logger :func:`load` gives the DLL: its messages go to :mod:`wiretun.log`."""
    log.log(log.LogLevel(level) if level in (0, 1, 2) else log.LogLevel.ERR, message)


def is_elevated() -> bool:
    """Whether this process may create Wintun adapters (Windows: elevated; the Linux stand-in: root)."""
    return _platform.is_elevated()
