"""A key log for Wireshark: the keys its WireGuard dissector needs to decrypt a capture.

The file is the one Wireshark's ``wg.keylog_file`` preference reads: per handshake this device
takes part in, four lines ``<type> = <base64 key>``::

    LOCAL_STATIC_PRIVATE_KEY = ...
    REMOTE_STATIC_PUBLIC_KEY = ...
    LOCAL_EPHEMERAL_PRIVATE_KEY = ...
    PRESHARED_KEY = ...

This is the one place wiretun writes private keys, and only to the file its user named. Anyone who
can read the file can decrypt the tunnel's traffic (past and future, while it is on) and impersonate
the device: it is created 0600, and an existing file that others may read is refused.

Nothing here raises on I/O trouble: an unusable file is logged once and the tunnel goes on without it.
"""

from __future__ import annotations

import base64
import errno
import os
import stat

from .. import log

__all__ = ["KeyLog", "ENV_KEYLOG_FILE"]

ENV_KEYLOG_FILE = "WIRETUN_KEYLOG_FILE"  # the daemon's switch: the path to append to


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


class KeyLog:
    """Appends handshake keys to ``path`` in Wireshark's format (see the module docstring).

    :attr:`active` is False when the file could not be opened (or a write failed): the reason is logged.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "") -> None:
        self._path = os.fspath(path)
        self._name = name
        self._fd = -1
        self._failed = False
        try:
            # O_NOFOLLOW: a symlink planted at the path cannot send the keys elsewhere.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
            log.err(f"{self._who}key log {self._path!r} cannot be opened ({why}); keys are not logged")
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("it is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(f"its mode {stat.S_IMODE(st.st_mode):04o} lets others read it (want 0600)")
            if st.st_uid != os.geteuid():
                raise ValueError(f"it belongs to uid {st.st_uid}, not to this process (uid {os.geteuid()})")
        except (OSError, ValueError) as e:
            os.close(fd)
            log.err(f"{self._who}key log {self._path!r} refused: {e}; keys are not logged")
            return
        self._fd = fd
        log.warn(f"{self._who}key log on: the keys of every handshake are appended to {self._path!r}; "
                 "anyone who can read it can decrypt this tunnel's traffic")

    @property
    def _who(self) -> str:
        return f"Device {self._name}: " if self._name else ""

    @property
    def path(self) -> str:
        return self._path

    @property
    def active(self) -> bool:
        return self._fd >= 0 and not self._failed

    def write(self, local_static_private: bytes, remote_static_public: bytes, local_ephemeral_private: bytes,
              preshared_key: bytes) -> None:
        """Append one handshake's keys (one write, so concurrent appenders do not interleave lines)."""
        if self._fd < 0 or self._failed:
            return
        text = (
            f"LOCAL_STATIC_PRIVATE_KEY = {_b64(local_static_private)}\n"
            f"REMOTE_STATIC_PUBLIC_KEY = {_b64(remote_static_public)}\n"
            f"LOCAL_EPHEMERAL_PRIVATE_KEY = {_b64(local_ephemeral_private)}\n"
            f"PRESHARED_KEY = {_b64(preshared_key)}\n"
        ).encode("ascii")
        try:
            written = os.write(self._fd, text)
            if written != len(text):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(text)} bytes)")
        except OSError as e:
            self._failed = True  # logged once; the tunnel carries on without it
            log.err(f"{self._who}writing key log {self._path!r} failed ({e.strerror or e}); keys are no longer logged")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<KeyLog {self._path!r} {'on' if self.active else 'off'}>"
