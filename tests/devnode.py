"""A private /dev/net/tun for one forked child: its own mount namespace, the node made with the mode a
test needs (0666 as the kernel creates it, or 0600 as many containers do). The host's node is never
touched: the child's mounts are private, so nothing propagates back.

Call :func:`use_private_tun_node` in a single-threaded child (after ``fork``), before dropping
privileges; :func:`private_tun_node_unavailable` says once, from the parent, why that cannot work here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import stat

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
TUN_MAJOR, TUN_MINOR = 10, 200
NODE = "/dev/net/tun"


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def use_private_tun_node(mode: int) -> None:
    """In this (single-threaded) process only: /dev/net/tun becomes a fresh TUN node of ``mode``."""
    _libc_call("unshare", CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
    _libc_call("mount", b"wiretun-test-dev", os.path.dirname(NODE).encode(), b"tmpfs", 0, b"mode=0755,size=16k")
    os.mknod(NODE, stat.S_IFCHR | mode, os.makedev(TUN_MAJOR, TUN_MINOR))
    os.chmod(NODE, mode)  # mknod's mode is cut by the umask


@functools.cache
def private_tun_node_unavailable() -> str | None:
    """None when a child can make a private 0666 node and open it as nobody; else the reason."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            use_private_tun_node(0o666)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.close(os.open(NODE, os.O_RDWR))
            status = 0
        except BaseException as exc:
            try:
                os.write(w, f"{type(exc).__name__}: {exc}".encode())
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(w)
    try:
        text = os.read(r, 4096).decode(errors="replace")
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return f"cannot give a child a private {NODE} (mount namespace + mknod {TUN_MAJOR},{TUN_MINOR}): {text}"
