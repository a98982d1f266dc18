"""Kernel errno values mapped to the WintunError a Wintun caller would switch on."""

from __future__ import annotations

import errno

from ..errors import AccessDenied, AlreadyExists, InvalidParameter, NotFound, NotSupported, WintunError
from . import tun


def os_error(exc: OSError, what: str) -> WintunError:
    """Map a kernel errno to the WintunError a Wintun caller would switch on."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code == errno.EACCES and exc.filename == tun.CLONE_DEVICE:  # the node's mode, not the adapter's owner
        return AccessDenied(f"{what}: {tun.clone_device_refusal()}")
    if code in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{what}: {reason} (needs CAP_NET_ADMIN, or to be the adapter's owner)")
    if code in (errno.EEXIST, errno.EBUSY):
        return AlreadyExists(f"{what}: {reason}")
    if code in (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENXIO):
        return NotFound(f"{what}: {reason}")
    if code in (errno.EINVAL, errno.ERANGE, errno.EAFNOSUPPORT, errno.ENETUNREACH):
        return InvalidParameter(f"{what}: {reason}")
    if code == errno.ENETDOWN:
        return InvalidParameter(f"{what}: the adapter is down; bring it up first")
    if code in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
        return NotSupported(f"{what}: {reason}")
    return WintunError(f"{what}: {reason} (errno {code})")
