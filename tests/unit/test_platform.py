"""The portable layer imports on platforms without Linux's names, and the backend is chosen at one point.

Each check runs in a fresh interpreter whose platform is faked before wiretun is imported: ``sys.platform``
set to another value, ``errno.EBADFD`` deleted (macOS and Windows lack it), and ``pyroute2`` made
unimportable (it is a Linux-only dependency).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

FAKE = """
import errno, sys
import asyncio, mmap, select, socket, subprocess, threading  # the real stdlib first: it checks sys.platform too
del errno.EBADFD
sys.platform = {platform!r}
import ctypes
ctypes.WINFUNCTYPE = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)  # a Windows interpreter has it

class _NoPyroute2:
    def find_spec(self, name, path=None, target=None):
        if name == "pyroute2" or name.startswith("pyroute2."):
            raise ImportError("pyroute2 is Linux-only (faked platform)")
        return None

sys.meta_path.insert(0, _NoPyroute2())
"""


def run_faked(platform: str, body: str) -> str:
    code = FAKE.format(platform=platform) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_public_api_imports_without_linux_names(platform):
    out = run_faked(platform, """
        import wiretun
        from wiretun import Adapter, Session, aio
        from wiretun.session import Session as S2
        from wiretun.wireguard.device import Device
        from wiretun.wireguard import Device as D2
        assert Session is S2 and Device is D2
        assert callable(Adapter.start_session) and callable(aio.packets)
        assert "wiretun.linux" not in sys.modules, sorted(m for m in sys.modules if m.startswith("wiretun"))
        print("imported")
    """)
    assert out.split() == ["imported"]


def test_unknown_platform_is_not_supported():
    out = run_faked("darwin", """
        from wiretun import Adapter, NotSupported, delete_driver
        for call in (lambda: Adapter.create("Demo", "Example"), lambda: Adapter.open("Demo"), delete_driver):
            try:
                call()
            except NotSupported as exc:
                print("NotSupported", "darwin" in str(exc))
    """)
    assert out.split() == ["NotSupported", "True"] * 3


def test_windows_selects_the_windows_backend():
    """On win32 the backend is wiretun.windows (importing it loads nothing: no DLL, no kernel32)."""
    out = run_faked("win32", """
        from wiretun import _backend
        from wiretun.windows import _platform
        assert _backend.BACKENDS["win32"] == "wiretun.windows"
        print(_backend.platform().__name__, _platform.NAME)
        import wiretun.example
        assert "wiretun.linux" not in sys.modules, sorted(m for m in sys.modules if m.startswith("wiretun"))
    """)
    assert out.split() == ["wiretun.windows", "windows"]


def test_windows_without_the_dll_says_what_to_do():
    out = run_faked("win32", """
        import importlib.util, os, sysconfig
        os.environ.pop("WIRETUN_WINTUN_DLL", None)
        sysconfig.get_platform = lambda: "win-amd64"
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "pytun_pmd3" else real(name, *a)
        from wiretun import Adapter, NotFound
        try:
            Adapter.create("Demo", "Example")
        except NotFound as e:
            print(e.code, e)
    """)
    assert out.startswith("2 wintun.dll not found (pytun-pmd3 is not installed)"), out
    assert "WIRETUN_WINTUN_DLL" in out and "amd64" in out


def test_linux_selects_the_linux_backend():
    from wiretun import _backend

    if sys.platform != "linux":
        pytest.skip("runs on Linux")
    import wiretun.linux

    assert _backend.platform() is wiretun.linux
