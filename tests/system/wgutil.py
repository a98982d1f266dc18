"""Helpers shared by the WireGuard system tests: commands, waiting, names, keys and wg-quick set-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from wiretun.wireguard.uapi import DEFAULT_SOCKET_DIRECTORY

SOCK_DIR = Path(DEFAULT_SOCKET_DIRECTORY)  # where wg looks for userspace sockets (no override in Debian's wg)
WIREGUARD_GO = shutil.which("wireguard-go")


def sh(*argv: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()} {r.stdout.strip()}")
    return r


def nsx(ns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, **kw)


def wg(*args: str, input: str | None = None, check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(["wg", *args], input=input, capture_output=True, text=True, timeout=20, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"wg {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy (returning its value); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def unique(prefix: str = "wtu") -> str:
    """An interface (or namespace) name unlikely to exist: ``prefix`` and 8 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def genkey() -> tuple[str, str]:
    """(private, public) base64 keys from ``wg genkey`` / ``wg pubkey``."""
    private = wg("genkey").stdout.strip()
    public = wg("pubkey", input=private + "\n").stdout.strip()
    return private, public


def wg_quick_with_wiretun_wg() -> tuple[Path, dict[str, str]]:
    """(the wiretun-wg script, environment) for running wg-quick on wiretun-wg; skips when that cannot work."""
    if shutil.which("wg-quick") is None:
        pytest.skip("wg-quick is not installed")
    if os.path.exists("/sys/module/wireguard"):
        pytest.skip("the kernel has WireGuard: wg-quick would not use a userspace implementation")
    script = Path(sys.executable).with_name("wiretun-wg")
    if not script.exists():
        pytest.skip(f"the wiretun-wg console script is not installed next to {sys.executable}")
    env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION=str(script))
    env.pop("LOG_LEVEL", None)
    return script, env
