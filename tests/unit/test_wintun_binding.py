"""The wintun.dll binding against the real DLLs (export tables, version resources), and its pure parts.

The real wintun.dll 0.14.1 for each architecture comes from the pytun-pmd3 wheel (a test dependency);
pefile reads its export table and version resource. No Windows needed, nothing is loaded.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import runpy
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from wiretun import errors
from wiretun.windows import wintun_dll
from wiretun.windows.wintun_dll import EXPORTS, GUID, LOGGER_CALLBACK, WideString, dll_arch, error_for, locate

ROOT = Path(__file__).resolve().parents[2]
STANDIN_C = ROOT / "tests" / "windows" / "standin" / "wintun_standin.c"
MACHINES = {"amd64": 0x8664, "x86": 0x14C, "arm64": 0xAA64, "arm": 0x1C4}
TAGS = {"win-amd64": "amd64", "win32": "x86", "win-arm64": "arm64", "win-arm32": "arm"}


def _pytun_root() -> Path:
    spec = importlib.util.find_spec("pytun_pmd3")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pytun-pmd3 (test extra: the real wintun.dll files) is not installed: make venv")
    return Path(list(spec.submodule_search_locations)[0])


def _pefile() -> Any:
    # A test dependency (pyproject's test extra); a venv made before it was added skips, saying so.
    return pytest.importorskip("pefile", reason="pefile (test extra) is not installed: make venv")


def _version_strings(pe: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for info in pe.FileInfo[0]:
        for table in getattr(info, "StringTable", []):
            found.update({k.decode(): v.decode() for k, v in table.entries.items()})
    return found


@pytest.mark.parametrize("arch", sorted(MACHINES))
def test_real_dll_exports_exactly_the_declared_functions(arch):
    pefile = _pefile()
    path = _pytun_root() / "wintun" / "bin" / arch / "wintun.dll"
    pe = pefile.PE(str(path), fast_load=True)
    try:
        pe.parse_data_directories(
            directories=[
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"],
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"],
            ]
        )
        assert pe.FILE_HEADER.Machine == MACHINES[arch]
        names = sorted(sym.name.decode() for sym in pe.DIRECTORY_ENTRY_EXPORT.symbols if sym.name)
        assert len(names) == 14
        assert names == sorted(EXPORTS)  # undecorated on x86 too: WinDLL finds them by these names
        fixed = pe.VS_FIXEDFILEINFO[0]
        assert fixed.FileVersionMS == (0 << 16) | 14  # 0.14
        strings = _version_strings(pe)
        assert re.fullmatch(r"0\.14\.\d+", strings["FileVersion"]), strings
        assert strings["OriginalFilename"] == "wintun.dll"
    finally:
        pe.close()


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_locate_picks_the_interpreters_architecture(tag, monkeypatch):
    monkeypatch.delenv(wintun_dll.DLL_ENV, raising=False)
    path = Path(locate(tag))
    assert path == _pytun_root() / "wintun" / "bin" / TAGS[tag] / "wintun.dll"
    assert dll_arch(tag) == TAGS[tag]


def test_locate_honours_the_environment_and_says_what_is_missing(monkeypatch, tmp_path):
    dll = tmp_path / "wintun.dll"
    dll.write_bytes(b"MZ")
    monkeypatch.setenv(wintun_dll.DLL_ENV, str(dll))
    assert locate("win-amd64") == str(dll)
    monkeypatch.setenv(wintun_dll.DLL_ENV, str(tmp_path / "absent.dll"))
    with pytest.raises(errors.NotFound) as e:
        locate("win-amd64")
    assert "absent.dll" in str(e.value) and wintun_dll.DLL_ENV in str(e.value)
    with pytest.raises(errors.NotSupported) as e2:
        dll_arch("linux-x86_64")
    assert "linux-x86_64" in str(e2.value)


def test_loading_something_that_is_not_wintun_is_a_clear_error(monkeypatch, tmp_path):
    junk = tmp_path / "junk.dll"
    junk.write_bytes(b"not a library")
    with pytest.raises(errors.NotFound) as e:
        wintun_dll.WintunDLL(str(junk))
    assert "junk.dll" in str(e.value)


# ----------------------------------------------------------------------------- prototypes


def _fixed_width_types() -> set[Any]:
    return {
        None,
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(GUID),
        WideString,
        LOGGER_CALLBACK,
    }


def test_prototypes_use_fixed_width_types_only():
    allowed = _fixed_width_types()
    for name, (restype, argtypes) in EXPORTS.items():
        assert restype in allowed, name
        for arg in argtypes:
            assert arg in allowed, (name, arg)
            assert arg is not ctypes.c_wchar_p and arg is not ctypes.c_long and arg is not ctypes.c_ulong
    assert ctypes.sizeof(GUID) == 16
    assert ctypes.sizeof(ctypes.c_uint32) == 4 and ctypes.sizeof(ctypes.c_uint64) == 8
    assert ctypes.sizeof(ctypes.c_void_p) == ctypes.sizeof(ctypes.c_size_t)
    assert WideString._type_ is ctypes.c_uint16  # type: ignore[attr-defined]
    # The logger: void (*)(WINTUN_LOGGER_LEVEL, DWORD64, const WCHAR *).
    assert LOGGER_CALLBACK._restype_ is None  # type: ignore[attr-defined]
    assert LOGGER_CALLBACK._argtypes_ == (ctypes.c_int32, ctypes.c_uint64, WideString)  # type: ignore[attr-defined]
    assert EXPORTS["WintunGetAdapterLUID"][1][1] is ctypes.POINTER(ctypes.c_uint64)  # NET_LUID: 64 bits
    assert EXPORTS["WintunStartSession"][1] == [ctypes.c_void_p, ctypes.c_uint32]
    assert EXPORTS["WintunReceivePacket"] == (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)])


def test_the_standin_exports_the_same_14_functions():
    source = STANDIN_C.read_text()
    exported = set(re.findall(r"^EXPORT [^(]*?\b(Wintun\w+)\(", source, re.M))
    assert exported == set(EXPORTS)


def test_guid_layout_is_windows():
    value = uuid.UUID("deadbabe-cafe-beef-0123-456789abcdef")
    g = GUID.from_uuid(value)
    assert bytes(g) == bytes.fromhex("bebaadde feca efbe 0123456789abcdef".replace(" ", ""))
    assert (g.Data1, g.Data2, g.Data3) == (0xDEADBABE, 0xCAFE, 0xBEEF)
    assert g.to_uuid() == value


def test_wide_strings_are_utf16le_not_wchar():
    buf = wintun_dll._wide("Data Center 日本 \U0001F600")
    raw = bytes(buf)
    assert raw == "Data Center 日本 \U0001F600".encode("utf-16-le") + b"\0\0"
    assert wintun_dll.wide_to_str(ctypes.cast(buf, WideString)) == "Data Center 日本 \U0001F600"
    assert wintun_dll.wide_to_str(None) == ""


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "code, cls, linux_code",
    [
        (2, errors.NotFound, 2),
        (1168, errors.NotFound, 2),
        (5, errors.AccessDenied, 5),
        (13, errors.InvalidData, 13),
        (38, errors.EndOfFile, 38),
        (87, errors.InvalidParameter, 87),
        (123, errors.InvalidParameter, 87),
        (111, errors.BufferOverflow, 111),
        (1247, errors.Busy, 170),
        (183, errors.AlreadyExists, 183),
        (52, errors.AlreadyExists, 183),
        (259, errors.NoMoreItems, 259),
        (50, errors.NotSupported, 50),
    ],
)
def test_win32_codes_map_to_the_linux_classes_and_codes(code, cls, linux_code):
    exc = error_for(code, "doing it")
    assert type(exc) is cls and exc.code == linux_code
    assert str(exc).startswith("doing it")
    if code != linux_code:
        assert f"Win32 error {code}" in str(exc)


def test_unknown_codes_keep_their_number_and_access_denied_says_elevate():
    exc = error_for(1062, "starting")
    assert type(exc) is errors.WintunError and exc.code == 1062 and "1062" in str(exc)
    assert "elevated" in str(error_for(5, "creating"))


# ----------------------------------------------------------------------------- packaging


def _requirements(platform: str) -> list[str]:
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {"sys_platform": platform, "platform_system": "Windows" if platform == "win32" else "Linux"}
    return [Requirement(d).name for d in deps if Requirement(d).marker is None or Requirement(d).marker.evaluate(env)]


def test_dependencies_follow_the_platform():
    pytest.importorskip("packaging")
    win, linux = _requirements("win32"), _requirements("linux")
    assert "pytun-pmd3" in win and "pyroute2" not in win
    assert "pyroute2" in linux and "pytun-pmd3" not in linux


@pytest.mark.parametrize("platform, built", [("win32", False), ("darwin", False), ("linux", True)])
def test_setup_builds_the_c_extension_on_linux_only(platform, built, monkeypatch):
    import sysconfig

    import setuptools
    import setuptools.command.build_ext

    sysconfig.get_config_vars()
    captured: dict[str, Any] = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    assert bool(captured["ext_modules"]) is built
    assert os.path.exists(ROOT / "setup.py")


# ----------------------------------------------------------------------------- IP Helper structures


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="the sizes below are the 64-bit SDK's")
def test_ip_helper_structures_have_the_sdk_layout():
    """netioapi.h's sizes on 64-bit Windows; x86-64 Linux aligns these field types the same way."""
    from wiretun.windows import ipconfig as ipc

    sizes = {"_SockaddrInet": 28, "_UnicastRow": 80, "_Prefix": 32, "_ForwardRow": 104,
             "_IpInterfaceRow": 168, "_IfRow2": 1352}
    assert {name: ctypes.sizeof(getattr(ipc, name)) for name in sizes} == sizes
    assert ipc._UnicastRow.InterfaceLuid.offset == 32 and ipc._UnicastRow.OnLinkPrefixLength.offset == 60
    assert ipc._ForwardRow.NextHop.offset == 44 and ipc._ForwardRow.Metric.offset == 84
    assert ipc._IfRow2.Mtu.offset == 1124 and ipc._IfRow2.OperStatus.offset == 1156


def test_sockaddr_inet_round_trips_both_families():
    import ipaddress

    from wiretun.windows import ipconfig as ipc

    for text in ("10.6.7.7", "fd00:6:7::7"):
        address = ipaddress.ip_address(text)
        sa = ipc._SockaddrInet.of(address, address.version)
        assert sa.family == (ipc.AF_INET if address.version == 4 else ipc.AF_INET6)
        assert sa.address() == address


def test_wintun_name_limit_counts_utf16_code_units():
    from wiretun.windows.adapter import _check_wintun_name

    _check_wintun_name("adapter name", "x" * 127)
    _check_wintun_name("adapter name", "Data Center")
    _check_wintun_name("adapter name", "\U0001F600" * 63 + "x")  # 127 units
    with pytest.raises(errors.InvalidParameter) as e:
        _check_wintun_name("adapter name", "\U0001F600" * 64)  # 64 characters, 128 UTF-16 units
    assert "128 UTF-16 code units" in str(e.value) and "127" in str(e.value)
