"""Network namespaces for tests, benchmarks and the demo: create, enter (per thread), remove.

Not part of the installed package: bench/, demo/ and fuzz/ import it as ``tests.netns`` (the repository
root on sys.path). ``setns`` changes the calling thread's namespace only; sockets, TUN devices and
netlink sockets belong to the namespace of the thread that creates them, and threads and processes
started afterwards inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def create(prefix: str = "wt") -> str:
    # WIRETUN_NETNS_TAG marks the namespaces of one run, so a test can tell its leftovers from those of
    # other runs on the same machine.
    name = f"{prefix}{os.environ.get('WIRETUN_NETNS_TAG', '')}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def create_up(prefix: str = "wt") -> str:
    """:func:`create` with loopback up; the namespace is removed again if that fails."""
    name = create(prefix)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    except BaseException:
        remove(name)
        raise
    return name


def remove(name: str) -> None:
    # Kill anything still running inside first so the namespace really goes away.
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body of the ``with`` in namespace ``name`` (this thread only), then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


@contextlib.contextmanager
def temporary(prefix: str = "wt", *, enter: bool = True) -> Iterator[str]:
    """A fresh namespace with loopback up; entered for the body if ``enter``; always removed."""
    name = create_up(prefix)
    try:
        if enter:
            with entered(name):
                yield name
        else:
            yield name
    finally:
        remove(name)


@contextlib.contextmanager
def several(*prefixes: str) -> Iterator[list[str]]:
    """Fresh namespaces with loopback up, one per prefix (not entered); all removed at the end."""
    made: list[str] = []
    try:
        for prefix in prefixes:
            made.append(create_up(prefix))
        yield made
    finally:
        for name in made:
            remove(name)  # kills anything still inside


def run(name: str, *argv: str, **kw: object) -> subprocess.CompletedProcess:
    """Run a command inside namespace ``name`` (``ip netns exec``)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["ip", "netns", "exec", name, *argv], **kw)  # type: ignore[call-overload]
