"""/dev/net/tun ioctls: create or attach a queue, persistence, ownership, offloads, driver info.

Every adapter wiretun creates is an ``IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`` device. The adapter
keeps one *detached* queue open as the device's lifetime anchor: a detached queue receives nothing,
but while it is open the kernel keeps a non-persistent device, and when the process dies the kernel
closes it and removes the device (the behaviour of Wintun's CloseAdapter, even on SIGKILL).
Sessions attach queues of their own, so several sessions can share a device when the caller asks
for multi-queue.

Every queue carries the 10-byte virtio-net header (``IFF_VNET_HDR``). The kernel fixes that flag
when the device is created and ignores it on later attaches, so it is always on: a session without
offloads keeps ``TUNSETOFFLOAD`` at 0, reads a header that is all zero, and writes a zero header.
"""

from __future__ import annotations

import ctypes
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct

CLONE_DEVICE = "/dev/net/tun"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
TUNGETDEVNETNS = 0x54E3  # _IO('T', 227), Linux 5.2

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800
IFF_TUN_EXCL = 0x8000

VNET_HDR_SIZE = 10  # struct virtio_net_hdr

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the 24-byte union

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196  # struct ethtool_drvinfo


def _ifreq(name: str, flags: int = 0) -> bytes:
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:  # struct.pack would cut it and we would attach to another device
        raise ValueError(f"interface name {name!r} is {len(raw)} bytes; the kernel allows {IFNAMSIZ - 1}")
    return _IFREQ.pack(raw, flags)


def open_queue(kernel_name: str, *, create: bool = False, nonblock: bool = True) -> int:
    """Attach one more queue to the device ``kernel_name``, or with ``create`` make a new device.

    Returns the queue's file descriptor (close-on-exec). Raises OSError from the kernel: EBUSY when
    ``create`` and the name exists, or the name belongs to a non-TUN or single-queue device; EPERM
    when the caller may not attach.
    """
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
    if create:
        flags |= IFF_TUN_EXCL
    fd = os.open(CLONE_DEVICE, os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0))
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(kernel_name, flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def attached_name(fd: int) -> str:
    """The kernel name of the device ``fd`` is attached to (TUNGETIFF)."""
    out = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    raw: bytes = _IFREQ.unpack(out)[0]
    return raw.rstrip(b"\0").decode()


def device_netns(fd: int) -> int:
    """A new descriptor (close-on-exec) of the network namespace the device of ``fd`` is in *now*
    (TUNGETDEVNETNS; attached or detached queue alike). OSError EBADFD once the device is gone."""
    return int(fcntl.ioctl(fd, TUNGETDEVNETNS))



def detach_queue(fd: int) -> None:
    fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", IFF_DETACH_QUEUE))


def set_persist(fd: int, persist: bool) -> None:
    fcntl.ioctl(fd, TUNSETPERSIST, int(persist))


def set_owner(fd: int, uid: int) -> None:
    fcntl.ioctl(fd, TUNSETOWNER, uid)


def set_group(fd: int, gid: int) -> None:
    fcntl.ioctl(fd, TUNSETGROUP, gid)


def set_offload(fd: int, offloads: int) -> None:
    fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)


def driver_info(kernel_name: str) -> tuple[str, str]:
    """(driver, version) from the ethtool GDRVINFO ioctl, e.g. ("tun", "1.6")."""
    buf = ctypes.create_string_buffer(_DRVINFO_SIZE)
    struct.pack_into("I", buf, 0, ETHTOOL_GDRVINFO)
    req = struct.pack("16sP16x", kernel_name.encode(), ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, req)
    raw = buf.raw
    driver = raw[4:36].split(b"\0", 1)[0].decode()
    version = raw[36:68].split(b"\0", 1)[0].decode()
    return driver, version


def clone_device_refusal() -> str:
    """Why opening /dev/net/tun was refused (EACCES), and the fix.

    The refusal comes from the device node's file mode, before the TUN driver sees the request: the
    driver's own check (the adapter's owner or group, or CAP_NET_ADMIN) is a different error (EPERM
    from TUNSETIFF). The kernel's default mode is 0666; containers often make it 0600.
    """
    try:
        st = os.stat(CLONE_DEVICE)
    except OSError as e:
        return f"cannot open {CLONE_DEVICE}: {e.strerror or e}"
    return (
        f"cannot open {CLONE_DEVICE}: the device node is mode {stat.S_IMODE(st.st_mode):04o} owned by "
        f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}, which does not let uid {os.geteuid()} open it; "
        f"make it 0666 as the kernel creates it (chmod 0666 {CLONE_DEVICE}; the TUN driver still checks "
        f"each adapter's owner), or run as root"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
