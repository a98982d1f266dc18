"""The Linux backend: the only place that knows ioctls, netlink, eventfd and epoll.

It implements :class:`wiretun._backend.Platform` with these module-level functions; adapters are
:class:`~wiretun.linux.adapter.LinuxAdapter`, sessions :class:`~wiretun.linux.session.LinuxSession`.
"""

from __future__ import annotations

from .adapter import (
    create_adapter,
    delete_driver,
    enumerate_adapters,
    get_running_driver_version,
    open_adapter,
)

__all__ = ["create_adapter", "delete_driver", "enumerate_adapters", "get_running_driver_version", "open_adapter"]
