"""Fixtures for the tests of the Windows backend over the Linux stand-in for wintun.dll.

The stand-in (standin/wintun_standin.c) is compiled once per test run with gcc into a temporary
directory and loaded by wiretun's own binding (:mod:`wiretun.windows.wintun_dll`) through the platform
shim, exactly as wintun.dll is on Windows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import wiretun.windows
from wiretun import _backend
from wiretun.windows import ipconfig, wintun_dll

from .linux_ip import LinuxIp

SOURCE = Path(__file__).parent / "standin" / "wintun_standin.c"


def build_standin(directory: Path) -> Path:
    """Compile the stand-in into ``directory``; returns the shared library's path."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the wintun.dll stand-in")
    out = directory / "wintun_standin.so"
    built = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-g", "-pthread", "-fvisibility=hidden", "-std=gnu11", "-Wall",
         "-Wextra", "-Werror", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if built.returncode:
        pytest.fail(f"building the wintun.dll stand-in failed:\n{built.stderr}")
    return out


@pytest.fixture(scope="session")
def standin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("standin"))


@pytest.fixture
def standin(standin_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[wintun_dll.WintunDLL]:
    """The binding, loaded from the stand-in (WIRETUN_WINTUN_DLL points at it for the test)."""
    monkeypatch.setenv(wintun_dll.DLL_ENV, str(standin_path))
    dll = wintun_dll.load(str(standin_path))
    try:
        yield dll
    finally:
        dll.set_logger(wintun_dll.forward_log)


@pytest.fixture
def windows_backend(standin, monkeypatch):
    """wiretun's backend is the Windows one, its DLL the stand-in, its IP configuration Linux's ip."""
    monkeypatch.setattr(_backend, "_platform", wiretun.windows)
    ipconfig.install(LinuxIp())
    try:
        yield standin
    finally:
        ipconfig.install(None)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)



