"""WireGuard's cross-platform userspace API (UAPI): the text protocol and its unix socket server.

The protocol is the one ``wg(8)`` speaks to wireguard-go over ``/var/run/wireguard/<if>.sock``::

    get=1\\n\\n                      ->  key=value lines, errno=0\\n\\n
    set=1\\nkey=value\\n...\\n\\n       ->  errno=N\\n\\n

Behaviour follows wireguard-go's ``device/uapi.go`` and ``ipc/uapi_unix.go``: the same keys, the
same validation, the same order of keys in ``get`` and the same ``errno`` values, which wireguard-go
writes *negated* (``errno=-22`` for EINVAL); ``wg`` turns them back into ``strerror`` text.

Deliberate differences, all on malformed input:

* a ``set`` is parsed completely before anything is applied (wireguard-go applies line by line), so a
  request with a bad line changes nothing;
* after a bad line the rest of the request is still read up to its blank line, so the connection
  stays usable (wireguard-go loses track of the stream and usually closes it);
* a line longer than :data:`MAX_LINE_LENGTH` (wireguard-go's scanner limit) is answered with
  ``errno=-5`` (EIO, as wireguard-go) and the connection is closed; a client that stops in the middle
  of a request (or does not read its reply) is disconnected after ``timeout`` seconds; one idle
  between requests never is (as in wireguard-go).
"""

from __future__ import annotations

import errno as _errno
import gc
import hmac
import ipaddress
import os
import re
import selectors
import socket
import stat
import sys
import threading
import time
from typing import Iterable, Protocol

from .. import log
from ..errors import AlreadyExists, InvalidParameter
from .allowedips import network_slot
from .config import (
    EINVAL,
    EIO,
    EPROTO,
    KEY_SIZE,
    AllowedIPList,
    DeviceSet,
    DeviceState,
    Endpoint,
    IPNetwork,
    PeerSet,
    UAPIError,
)

__all__ = [
    "DEFAULT_SOCKET_DIRECTORY",
    "MAX_LINE_LENGTH",
    "SetParser",
    "UAPIServer",
    "format_errno",
    "format_get",
    "parse_prefix_change",
    "parse_set",
    "socket_in_use",
    "socket_path",
]

DEFAULT_SOCKET_DIRECTORY = "/var/run/wireguard"
# wireguard-go reads set lines with a bufio.Scanner whose buffer is 64 KiB, newline included.
MAX_LINE_LENGTH = 64 * 1024 - 1
MAX_SET_LINES = 1 << 20  # lines in one set request (a million allowed IPs is plenty)
# ipc.IpcErrorUnknown: an error that is not a UAPI error ("shouldn't happen").
ENOANO = _errno.ENOANO

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DEC_DIGITS = frozenset("0123456789")
_ZERO_KEY = bytes(KEY_SIZE)
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL


class DeviceLike(Protocol):
    """What the server needs from a device (wiretun.wireguard.device.Device fits)."""

    def apply(self, request: DeviceSet) -> None: ...

    def state(self) -> DeviceState: ...


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


# A run that could be a key (hex or base64) is never echoed: a mistyped private_key line must not
# end up in an error reply's log.
_KEYLIKE = re.compile(r"[0-9A-Za-z+/=]{16,}")


def _show(value: str, limit: int = 64) -> str:
    """``value`` quoted for an error message, key-like runs redacted, long values shortened."""
    value = _KEYLIKE.sub(lambda m: f"<{len(m.group())} characters>", value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _parse_uint(key: str, value: str, bits: int) -> int:
    # Like Go's strconv.ParseUint(value, 10, bits): ASCII digits only, no sign, no spaces.
    top = (1 << bits) - 1
    if not value or not set(value) <= _DEC_DIGITS:
        raise UAPIError(EINVAL, f"{key}: {_show(value)} is not a decimal integer in 0..{top}")
    # Bound the length before int() so a huge digit string cannot cost time (or hit int limits).
    stripped = value.lstrip("0")
    if len(stripped) > 20 or int(stripped or "0") > top:
        raise UAPIError(EINVAL, f"{key}: {_show(value)} is out of range 0..{top}")
    return int(stripped or "0")


def _parse_key(key: str, value: str) -> bytes:
    # The value may be a private or preshared key: never put it in a message.
    if len(value) != 2 * KEY_SIZE or not set(value) <= _HEX_DIGITS:
        raise UAPIError(EINVAL, f"{key}: expected {2 * KEY_SIZE} hex digits, got {len(value)} characters"
                        + ("" if len(value) != 2 * KEY_SIZE else " that are not all hex digits"))
    return bytes.fromhex(value)


def _parse_true(key: str, value: str) -> bool:
    if value != "true":
        raise UAPIError(EINVAL, f"{key}: the only accepted value is 'true', not {_show(value)}")
    return True


def _clamp(private_key: bytes) -> bytes:
    # wireguard-go clamps a (non-zero) private key when it parses it, so get returns it clamped.
    if hmac.compare_digest(private_key, _ZERO_KEY):
        return private_key
    k = bytearray(private_key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not text.isascii():
        raise ValueError(f"{_show(text)} is not an IP address")
    return ipaddress.ip_address(text)


def format_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as Go's netip prints it (IPv4-mapped IPv6 keeps its dotted quad)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            scope = address.scope_id
            return f"::ffff:{mapped}" + (f"%{scope}" if scope else "")
    return str(address)


_inet_ntop = socket.inet_ntop


def format_slot(slot: int) -> str:
    """A prefix slot as ``address/bits``, exactly as :func:`format_ip` (Go's netip) prints it, fast:
    ``inet_ntop`` except for the IPv6 addresses of ::/96 and ::ffff:0:0/96, where glibc and Go differ."""
    length = (slot >> 1) & 0xFF
    if slot & 1:
        address = (slot >> 9) << (128 - length)
        top = address >> 32
        if top == 0 or top == 0xFFFF:
            return f"{format_ip(ipaddress.IPv6Address(address))}/{length}"
        return f"{_inet_ntop(socket.AF_INET6, address.to_bytes(16, 'big'))}/{length}"
    return f"{_inet_ntop(socket.AF_INET, ((slot >> 9) << (32 - length)).to_bytes(4, 'big'))}/{length}"


def parse_endpoint(value: str) -> Endpoint:
    """``a.b.c.d:port`` or ``[v6]:port`` (literal addresses only) -> ``(host, port)``.

    Mirrors Go's ``netip.ParseAddrPort``, which wireguard-go's ``ParseEndpoint`` uses: brackets if and
    only if the address is IPv6, a zone (``%eth0``) allowed on IPv6, a decimal port 0..65535.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise UAPIError(EINVAL, f"endpoint: {_show(value)} is not address:port")
    if not host:
        raise UAPIError(EINVAL, f"endpoint: {_show(value)} has no address")
    if not port_text:
        raise UAPIError(EINVAL, f"endpoint: {_show(value)} has no port")
    bracketed = host.startswith("[")
    if bracketed:
        if len(host) < 2 or not host.endswith("]"):
            raise UAPIError(EINVAL, f"endpoint: {_show(value)} is missing ']'")
        host = host[1:-1]
    port_digits = port_text.lstrip("0") or "0"
    if not set(port_text) <= _DEC_DIGITS or len(port_digits) > 5 or int(port_digits) > 0xFFFF:
        raise UAPIError(EINVAL, f"endpoint: port {_show(port_text)} is not a decimal integer in 0..65535")
    try:
        address = _parse_address(host)
    except ValueError:
        # wireguard-go's standard bind does not resolve names, and wg sends numeric addresses.
        raise UAPIError(EINVAL, f"endpoint: {_show(host)} is not a literal IPv4 or IPv6 address") from None
    if bracketed and address.version == 4:
        raise UAPIError(EINVAL, f"endpoint: {_show(value)}: brackets are only for IPv6 addresses")
    if not bracketed and address.version == 6:
        raise UAPIError(EINVAL, f"endpoint: {_show(value)}: an IPv6 address needs [brackets]")
    return (format_ip(address), int(port_digits))


def parse_prefix(value: str) -> IPNetwork:
    """``address/bits`` as Go's ``netip.ParsePrefix`` reads it; host bits are cleared (as wireguard-go's
    allowed-IPs trie stores it)."""
    text, sep, bits_text = value.rpartition("/")
    if not sep:
        raise UAPIError(EINVAL, f"allowed_ip: {_show(value)} has no '/bits'")
    if "%" in text:
        raise UAPIError(EINVAL, f"allowed_ip: {_show(value)}: an IPv6 zone is not allowed in a prefix")
    try:
        address = _parse_address(text)
    except ValueError:
        raise UAPIError(EINVAL, f"allowed_ip: {_show(text)} is not an IPv4 or IPv6 address") from None
    top = 32 if address.version == 4 else 128
    if (not bits_text or not bits_text.isascii() or not set(bits_text) <= _DEC_DIGITS
            or (len(bits_text) > 1 and bits_text[0] == "0") or len(bits_text) > 3 or int(bits_text) > top):
        raise UAPIError(EINVAL, f"allowed_ip: prefix length {_show(bits_text)} is not in 0..{top}")
    return ipaddress.ip_network((address, int(bits_text)), strict=False)


_PREFIX_BITS = {str(n): n for n in range(129)}  # decimal, no sign, no leading zeros: as Go's ParsePrefix
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton = socket.inet_pton


def parse_prefix_change(value: str) -> int:
    """An ``allowed_ip`` value (``[-]address/bits``) as ``slot << 1 | remove``
    (:class:`~wiretun.wireguard.config.AllowedIPChanges`).

    The common case goes through ``inet_pton`` (which refuses what Go's ``netip`` refuses: leading
    zeros in IPv4, zones, spaces); anything it does not take goes through :func:`parse_prefix`, which
    decides and words the error, so both paths accept exactly the same prefixes.
    """
    remove = value[:1] == "-"
    text, sep, bits_text = (value[1:] if remove else value).rpartition("/")
    bits = _PREFIX_BITS.get(bits_text)
    if bits is not None and sep:
        try:
            if ":" in text:
                if bits <= 128:
                    address = int.from_bytes(_inet_pton(_AF_INET6, text), "big")
                    return (((address >> (128 - bits)) << 9 | bits << 1 | 1) << 1) | remove
            elif bits <= 32:
                address = int.from_bytes(_inet_pton(_AF_INET, text), "big")
                return (((address >> (32 - bits)) << 9 | bits << 1) << 1) | remove
        except (OSError, ValueError):
            pass
    return network_slot(parse_prefix(value[1:] if remove else value)) << 1 | remove


class SetParser:
    """Reads the body of one ``set=1`` request line by line into a :class:`DeviceSet`.

    The first bad line raises :class:`UAPIError` with wireguard-go's errno: EPROTO for a line without
    ``=``, EINVAL for anything else (unknown key, peer key before any ``public_key``, bad value).
    """

    def __init__(self) -> None:
        self._request = DeviceSet()
        self._peer: PeerSet | None = None
        self._lines = 0

    @property
    def request(self) -> DeviceSet:
        return self._request

    def feed_lines(self, lines: list[str], start: int) -> int:
        """Feed ``lines[start:]`` (without newlines) up to the request's blank line, as :meth:`feed`
        does one by one; a trailing ``\\r`` is dropped. Returns the index of the blank line, or
        ``len(lines)``. On a bad line raises :class:`UAPIError` with ``.line`` set to its index."""
        n = len(lines)
        i = start
        changes = None if self._peer is None else self._peer.allowed_ips.changes
        parse = parse_prefix_change
        budget = MAX_SET_LINES - self._lines
        try:
            while i < n:
                line = lines[i]
                if line[-1:] == "\r":
                    line = line[:-1]
                if not line:
                    break
                if len(line) > MAX_LINE_LENGTH:
                    raise UAPIError(EIO, f"set: line of {len(line)} characters is longer than {MAX_LINE_LENGTH}")
                if changes is not None and line[:11] == "allowed_ip=" and i - start < budget:
                    changes.append(parse(line[11:]))  # most lines of a large request
                else:
                    self._lines += i - start
                    budget = MAX_SET_LINES - self._lines
                    start = i
                    self.feed(line)
                    start = i + 1
                    budget = MAX_SET_LINES - self._lines
                    changes = None if self._peer is None else self._peer.allowed_ips.changes
                i += 1
        except UAPIError as e:
            e.line = i  # type: ignore[attr-defined]
            raise
        finally:
            self._lines += i - start
        return i

    def feed(self, line: str) -> None:
        """One ``key=value`` line (no newline). The blank end-of-request line is not fed."""
        self._lines += 1
        if self._lines > MAX_SET_LINES:
            # The whole request is held until its blank line: bound what one client can make us hold.
            raise UAPIError(EINVAL, f"set: request longer than {MAX_SET_LINES} lines")
        if line[:11] == "allowed_ip=" and self._peer is not None:  # most lines of a large request
            self._peer.allowed_ips.changes.append(parse_prefix_change(line[11:]))
            return
        key, sep, value = line.partition("=")
        if not sep:
            raise UAPIError(EPROTO, f"set: line {_show(line)} is not key=value")
        if key == "public_key":
            self._peer = PeerSet(public_key=_parse_key(key, value))
            self._request.peers.append(self._peer)
        elif self._peer is None:
            self._device_line(key, value)
        else:
            self._peer_line(self._peer, key, value)

    def _device_line(self, key: str, value: str) -> None:
        request = self._request
        if key == "private_key":
            request.private_key = _clamp(_parse_key(key, value))
        elif key == "listen_port":
            request.listen_port = _parse_uint(key, value, 16)
        elif key == "fwmark":
            request.fwmark = _parse_uint(key, value, 32)
        elif key == "replace_peers":
            request.replace_peers = _parse_true(key, value)
        else:
            raise UAPIError(EINVAL, f"set: invalid UAPI device key {_show(key)}")

    def _peer_line(self, peer: PeerSet, key: str, value: str) -> None:
        if key == "update_only":
            peer.update_only = _parse_true(key, value)
        elif key == "remove":
            peer.remove = _parse_true(key, value)
        elif key == "preshared_key":
            peer.preshared_key = _parse_key(key, value)
        elif key == "endpoint":
            peer.endpoint = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive_interval = _parse_uint(key, value, 16)
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _parse_true(key, value)
            # wireguard-go applies lines in order: prefixes given before this line are dropped again.
            peer.allowed_ips.clear()
        elif key == "allowed_ip":
            peer.allowed_ips.changes.append(parse_prefix_change(value))
        elif key == "protocol_version":
            if value != "1":
                raise UAPIError(EINVAL, f"protocol_version: only 1 is supported, not {_show(value)}")
            peer.protocol_version = 1
        else:
            raise UAPIError(EINVAL, f"set: invalid UAPI peer key {_show(key)}")


def _strip_eol(line: str) -> str:
    # Go's bufio.ScanLines drops "\n" and one "\r" before it.
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def parse_set(lines: Iterable[str]) -> DeviceSet:
    """Parse the body of a ``set=1`` request (the lines after ``set=1``) into a :class:`DeviceSet`.

    Lines may keep their ``\\n``/``\\r\\n``; parsing stops at the first blank line (the end of the
    request) or at the end of ``lines``. Raises :class:`UAPIError` on the first bad line.
    """
    parser = SetParser()
    for raw in lines:
        line = _strip_eol(raw)
        if not line:
            break
        if len(line) > MAX_LINE_LENGTH:
            raise UAPIError(EIO, f"set: line of {len(line)} characters is longer than {MAX_LINE_LENGTH}")
        parser.feed(line)
    return parser.request


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _key_hex(name: str, key: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise InvalidParameter(f"{name} must be {KEY_SIZE} bytes, not {len(key)}")
    return key.hex()


def _format_host(host: str) -> str:
    try:
        return format_ip(_parse_address(host))
    except ValueError:
        return host


def format_get(state: DeviceState) -> str:
    """The whole reply to ``get=1``, in wireguard-go's order, ending with ``errno=0`` and a blank line.

    Device: private_key (if set and non-zero), listen_port (if non-zero), fwmark (if non-zero).
    Each peer: public_key, preshared_key, protocol_version, endpoint (if set),
    last_handshake_time_sec, last_handshake_time_nsec, tx_bytes, rx_bytes,
    persistent_keepalive_interval, then one allowed_ip line per prefix.
    """
    out: list[str] = []
    if state.private_key is not None and not hmac.compare_digest(state.private_key, _ZERO_KEY):
        out.append(f"private_key={_key_hex('private_key', state.private_key)}\n")
    if state.listen_port:
        out.append(f"listen_port={state.listen_port:d}\n")
    if state.fwmark:
        out.append(f"fwmark={state.fwmark:d}\n")
    for peer in state.peers:
        out.append(f"public_key={_key_hex('public_key', peer.public_key)}\n")
        out.append(f"preshared_key={_key_hex('preshared_key', peer.preshared_key)}\n")
        out.append(f"protocol_version={peer.protocol_version:d}\n")
        if peer.endpoint is not None:
            host = _format_host(peer.endpoint[0])
            host = f"[{host}]" if ":" in host else host
            out.append(f"endpoint={host}:{peer.endpoint[1]:d}\n")
        out.append(f"last_handshake_time_sec={peer.last_handshake_time_sec:d}\n")
        out.append(f"last_handshake_time_nsec={peer.last_handshake_time_nsec:d}\n")
        out.append(f"tx_bytes={peer.tx_bytes:d}\n")
        out.append(f"rx_bytes={peer.rx_bytes:d}\n")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive_interval:d}\n")
        if isinstance(peer.allowed_ips, AllowedIPList):
            out.extend([f"allowed_ip={format_slot(slot)}\n" for slot in peer.allowed_ips.slots])
        else:
            for network in peer.allowed_ips:
                out.append(f"allowed_ip={format_ip(network.network_address)}/{network.prefixlen:d}\n")
    out.append("errno=0\n\n")
    return "".join(out)


def format_errno(code: int) -> str:
    """The ``errno=`` reply ending an operation. wireguard-go writes its error codes negated
    (``errno=-22``), and wg turns that back into "Invalid argument"."""
    return "errno=0\n\n" if code == 0 else f"errno={-abs(code):d}\n\n"


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def socket_path(interface_name: str, directory: str = DEFAULT_SOCKET_DIRECTORY) -> str:
    """``<directory>/<interface_name>.sock``, after checking the name can be part of that path."""
    if not isinstance(interface_name, str) or not interface_name:
        raise InvalidParameter(f"interface name must be a non-empty string, not {interface_name!r}")
    if "/" in interface_name or "\0" in interface_name:
        raise InvalidParameter(f"interface name {interface_name!r} must not contain '/' or NUL")
    path = os.path.join(directory, f"{interface_name}.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise InvalidParameter(f"UAPI socket path {path!r} is longer than {_SUN_PATH_MAX} bytes")
    return path


def socket_in_use(path: str) -> bool:
    """True if a process accepts connections on the unix socket at ``path`` (or holds it without
    answering); False if there is no file or nobody listens (a stale socket)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # e.g. a timeout with a full backlog: someone holds it
        return True
    finally:
        probe.close()
    return True


_IDLE, _GET, _SET = 0, 1, 2  # what a client's next line is: an operation, get's blank line, a set line
_RECV_SIZE = 256 * 1024
_MAX_PENDING_REPLY = 1 << 20  # pipelined requests wait while this much of their replies is unsent
_FD_LOG_INTERVAL = 10.0  # seconds between "out of file descriptors" log lines
_ACCEPT_PAUSE = 0.5  # seconds without accepting when even the spare descriptor is gone
_SWITCH_INTERVAL = 0.0005  # seconds: the GIL switch interval while a request is parsed and applied
_FD_EXHAUSTED = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM})


class _Client:
    """One connection: bytes not yet read as lines, the reply not yet sent, and where in a request it is."""

    __slots__ = ("sock", "inbuf", "outbuf", "mode", "parser", "error", "deadline", "hangup", "eof", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.mode = _IDLE
        self.parser: SetParser | None = None
        self.error: UAPIError | None = None
        # Set while the client is inside a request or owes us reading a reply; None while idle
        # between requests: an idle client is never cut off.
        self.deadline: float | None = None
        self.hangup = False  # close once the pending reply is out
        self.eof = False  # the client has shut down its side: answer what it sent, then close
        self.events = selectors.EVENT_READ


class UAPIServer:
    """Serves the UAPI for ``device`` on ``<directory>/<interface_name>.sock`` from one thread.

    The socket is bound at construction (the directory is created 0755, the socket 0700 like
    wireguard-go's umask 077). A stale socket whose process is gone is replaced; a live one raises
    :class:`~wiretun.errors.AlreadyExists`. One thread serves every client with ``selectors``, so
    requests to the device are serialised (wireguard-go's ipcMutex) and there is no limit on clients
    but the process's file descriptors. A client may stay connected and idle between requests for as
    long as it likes (wg's library users keep one connection open); a client that stops in the middle
    of a request, or does not read its reply, is disconnected after ``timeout`` seconds. When the
    process runs out of file descriptors, new clients are refused (accepted and closed at once, with a
    log line) and nothing else changes. :meth:`close` stops serving and removes the socket file (if it
    is still this server's).
    """

    def __init__(
        self,
        interface_name: str,
        device: DeviceLike,
        *,
        directory: str = DEFAULT_SOCKET_DIRECTORY,
        timeout: float = 30.0,
    ) -> None:
        if not timeout > 0:
            raise InvalidParameter(f"timeout must be > 0 seconds, not {timeout!r}")
        self._path = socket_path(interface_name, directory)
        self._name = interface_name
        self._device = device
        self._timeout = float(timeout)
        self._clients: dict[int, _Client] = {}
        self._closed = threading.Event()
        self._next_fd_log = 0.0
        self._accept_paused_until = 0.0
        self._refused = 0

        try:
            os.makedirs(directory, mode=0o755)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o755)  # makedirs' mode is filtered by the umask; wg needs to read it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The socket file takes the sockfs inode's mode minus the umask: 0700 here gives what
            # wireguard-go gets with umask 077, without touching the process-wide umask.
            os.fchmod(listener.fileno(), 0o700)
            try:
                listener.bind(self._path)
            except OSError as e:
                if e.errno != _errno.EADDRINUSE:
                    raise
                self._replace_stale()
                listener.bind(self._path)
            st = os.lstat(self._path)
            self._identity = (st.st_dev, st.st_ino)
            listener.listen(socket.SOMAXCONN)  # as Go's net.Listen: bursts of clients wait, not fail
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        # A descriptor held in reserve: when accept() fails for want of descriptors, it is let go for a
        # moment to accept the waiting client and close it (a clean refusal instead of a busy loop).
        self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._thread = threading.Thread(target=self._serve, name=f"uapi-{interface_name}", daemon=True)
        self._thread.start()
        log.info(f"UAPI: listening on {self._path}")

    # -- public ---------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def socket_intact(self) -> bool:
        """True while the file at :attr:`path` is still the socket this server bound.

        A userspace WireGuard should exit when its socket file is deleted (wireguard.com/xplatform);
        the daemon polls this."""
        try:
            st = os.lstat(self._path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def close(self) -> None:
        """Stop accepting, disconnect clients, remove the socket file. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.socket_intact:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(10)
        log.info(f"UAPI: closed {self._path}")

    def __enter__(self) -> UAPIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _replace_stale(self) -> None:
        path = self._path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # gone meanwhile
        if not stat.S_ISSOCK(st.st_mode):
            raise AlreadyExists(f"{path} exists and is not a socket; not replacing it")
        if socket_in_use(path):
            raise AlreadyExists(f"UAPI socket {path} is in use by a running process; is another daemon running?")
        # Nobody listens: the process that made it is gone (wg itself cleans up the same way).
        log.info(f"UAPI: replacing stale socket {path}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    self._serve_once()
                except Exception as e:  # a bug must not stop the UAPI; never spin on it either
                    log.err(f"UAPI: unexpected error: {e!r}")
                    self._closed.wait(0.1)
        finally:
            for client in list(self._clients.values()):
                self._drop(client)
            self._selector.close()
            self._listener.close()
            for fd in (self._wake_r, self._wake_w, self._spare):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def _serve_once(self) -> None:
        now = time.monotonic()
        timeout: float | None = None
        for client in self._clients.values():
            if client.deadline is not None:
                left = client.deadline - now
                timeout = left if timeout is None else min(timeout, left)
        if self._accept_paused_until:
            left = self._accept_paused_until - now
            timeout = left if timeout is None else min(timeout, left)
        events = self._selector.select(None if timeout is None else max(0.0, timeout))
        for key, mask in events:
            if self._closed.is_set():
                return
            data = key.data
            if data is None:
                self._accept()
            elif isinstance(data, _Client):
                if data.sock.fileno() < 0 or self._clients.get(data.sock.fileno()) is not data:
                    continue  # dropped by an earlier event of this round
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._writable(data)
                    elif mask & selectors.EVENT_READ:
                        self._readable(data)
                except Exception as e:  # never let one client take the server down
                    log.err(f"UAPI: unexpected error serving a client: {e!r}")
                    self._drop(data)
            else:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline is not None and c.deadline <= now]:
            what = "reading its reply" if client.outbuf else "in the middle of a request"
            log.err(f"UAPI: client stuck {what} for {self._timeout:g} s; disconnecting it")
            self._drop(client)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == _errno.ECONNABORTED:
                    continue
                if e.errno in _FD_EXHAUSTED:
                    self._refuse_one(e)
                    if self._accept_paused_until:
                        return
                    continue
                log.err(f"UAPI: accept failed: {e}")
                self._pause_accepting()
                return
            try:
                conn.setblocking(False)
                client = _Client(conn)
                self._selector.register(conn, selectors.EVENT_READ, client)
            except (OSError, ValueError) as e:  # e.g. epoll out of memory: refuse this one
                log.err(f"UAPI: cannot serve a new client: {e}")
                conn.close()
                continue
            self._clients[conn.fileno()] = client

    def _refuse_one(self, error: OSError) -> None:
        """Out of descriptors: refuse the waiting client (accept it with the spare and close it)."""
        self._refused += 1
        now = time.monotonic()
        if now >= self._next_fd_log:
            self._next_fd_log = now + _FD_LOG_INTERVAL
            log.err(f"UAPI: out of file descriptors ({error.strerror or error}); refusing new clients "
                    f"({self._refused} so far); connected clients and the tunnel carry on")
        if self._spare < 0:
            self._pause_accepting()
            return
        os.close(self._spare)
        self._spare = -1
        try:
            conn, _ = self._listener.accept()
            conn.close()
        except OSError:
            pass
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._pause_accepting()

    def _pause_accepting(self) -> None:
        if not self._accept_paused_until:
            self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0 and self._clients.get(fd) is client:
            del self._clients[fd]
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()

    def _want(self, client: _Client, events: int) -> None:
        if client.events != events:
            client.events = events
            self._selector.modify(client.sock, events, client)

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)  # reset by the client
            return
        if data:
            client.inbuf += data
            self._process(client)
        else:
            client.eof = True
            if not client.outbuf:
                self._process(client)
                if not client.outbuf:
                    self._end_of_input(client)
        if client.deadline is None and (client.mode != _IDLE or client.inbuf):
            client.deadline = time.monotonic() + self._timeout  # a request has begun

    def _writable(self, client: _Client) -> None:
        self._flush(client)
        if client.outbuf or client.sock.fileno() < 0:
            return
        if client.hangup:
            self._drop(client)
            return
        if not client.eof:
            self._want(client, selectors.EVENT_READ)
        client.deadline = None
        self._process(client)  # pipelined requests that waited for the reply to go out
        if client.eof and not client.outbuf:
            self._end_of_input(client)
            return
        if client.deadline is None and (client.mode != _IDLE or client.inbuf):
            client.deadline = time.monotonic() + self._timeout

    def _flush(self, client: _Client) -> None:
        out = client.outbuf
        while out:
            try:
                sent = client.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                out.clear()
                client.hangup = True  # the client went away
                self._drop(client)
                return
            del out[:sent]
            client.deadline = time.monotonic() + self._timeout  # progress: the reader is alive
        if out:
            self._want(client, selectors.EVENT_WRITE)
        else:
            client.deadline = None if client.mode == _IDLE and not client.inbuf else client.deadline

    def _reply(self, client: _Client, text: str) -> None:
        client.outbuf += text.encode("ascii")
        self._flush(client)

    def _process(self, client: _Client) -> None:
        """Act on every complete line received, in order; stop while a reply is waiting to go out."""
        # A large set makes millions of small objects that are never cyclic garbage: without the
        # cycle collector looking at them over and over, it parses and applies twice as fast.
        # Meanwhile the device's loop thread waits for the GIL after each of its system calls, up to
        # the switch interval each time (5 ms by default: tens of ms per packet's round trip), so
        # the interval is shortened while a request is worked on.
        collecting = gc.isenabled()
        interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
        try:
            self._process_lines(client)
        finally:
            sys.setswitchinterval(interval)
            if collecting:
                gc.enable()

    def _process_lines(self, client: _Client) -> None:
        buf = client.inbuf
        end = buf.rfind(b"\n")
        if end >= 0 and not client.outbuf and not client.hangup:
            lines = buf[:end].decode("latin-1").split("\n")
            del buf[: end + 1]
            overlong = -1
            if max(map(len, lines)) > MAX_LINE_LENGTH:  # act on the lines before it, then hang up
                overlong = next(k for k, line in enumerate(lines) if len(line) > MAX_LINE_LENGTH)
                buf[:0] = "\n".join(lines[overlong:]).encode("latin-1") + b"\n"
                lines = lines[:overlong]
            n = len(lines)
            i = 0
            while i < n:
                if client.mode == _SET:
                    i = self._set_lines(client, lines, i)
                else:
                    line = lines[i]
                    i += 1
                    self._line(client, line[:-1] if line.endswith("\r") else line)
                if client.hangup or client.sock.fileno() < 0:
                    return
                if client.outbuf and i < n:
                    # The reply is not out yet: keep the rest for when it is (bounded memory).
                    buf[:0] = "\n".join(lines[i:]).encode("latin-1") + b"\n"
                    return
            if overlong >= 0 and not client.outbuf:
                self._overlong(client, buf.find(b"\n"))
                return
        if len(buf) > MAX_LINE_LENGTH and buf.find(b"\n") < 0 and not client.outbuf and client.sock.fileno() >= 0:
            self._overlong(client, len(buf))

    def _set_lines(self, client: _Client, lines: list[str], i: int) -> int:
        """Feed set lines from ``lines[i]`` on to the client's parser; returns the index after the
        request's blank line (the request then completed) or len(lines)."""
        parser = client.parser
        assert parser is not None
        n = len(lines)
        while i < n:
            if client.error is None:
                try:
                    i = parser.feed_lines(lines, i)
                except UAPIError as e:
                    client.error = e  # keep reading to the blank line, to stay in step
                    i = getattr(e, "line", i) + 1
                    continue
            else:
                line = lines[i]
                if line[-1:] == "\r":
                    line = line[:-1]
                if line:
                    i += 1
                    continue
            if i < n:  # the blank line: the request is complete
                self._finish_set(client)
                return i + 1
        return n

    def _line(self, client: _Client, line: str) -> None:
        if client.mode == _IDLE:
            if line == "get=1":
                client.mode = _GET
            elif line == "set=1":
                client.mode = _SET
                client.parser = SetParser()
                client.error = None
            else:
                # wireguard-go logs and hangs up without a reply.
                log.err(f"UAPI: invalid operation {_show(line)}; disconnecting")
                client.hangup = True
                client.inbuf.clear()
                if not client.outbuf:
                    self._drop(client)
        else:  # _GET: the blank line that ends the request
            client.mode = _IDLE
            if line:
                self._reply(client, self._error_reply(UAPIError(EINVAL, "get: trailing characters after get=1")))
            else:
                self._reply(client, self._get())

    def _finish_set(self, client: _Client) -> None:
        parser, error = client.parser, client.error
        client.mode, client.parser, client.error = _IDLE, None, None
        if error is not None:
            self._reply(client, self._error_reply(error))
        elif parser is not None:
            # Applied only after the whole request parsed (wireguard-go applies line by line): a
            # request with a bad line anywhere changes nothing.
            self._reply(client, self._apply(parser.request))

    def _end_of_input(self, client: _Client) -> None:
        if client.sock.fileno() < 0:
            return
        if client.mode == _SET and not client.outbuf:
            # EOF ends the request, as in wireguard-go; it is still applied and answered. A partial
            # last line without "\n" is dropped, as by Go's ReadString.
            client.inbuf.clear()
            self._finish_set(client)
        client.hangup = True
        client.inbuf.clear()
        if not client.outbuf:
            self._drop(client)

    def _overlong(self, client: _Client, length: int) -> None:
        log.err(f"UAPI: line of at least {length} bytes is longer than {MAX_LINE_LENGTH}; disconnecting")
        client.inbuf.clear()
        client.hangup = True
        if client.mode == _SET:
            # wireguard-go's scanner fails the same way (EIO); we cannot find the next line again.
            client.mode = _IDLE
            self._reply(client, self._error_reply(
                UAPIError(EIO, f"set: line of at least {length} bytes is longer than {MAX_LINE_LENGTH}")))
        if client.sock.fileno() >= 0 and not client.outbuf:
            self._drop(client)

    def _get(self) -> str:
        try:
            return format_get(self._device.state())
        except UAPIError as e:
            return self._error_reply(e)
        except Exception as e:
            return self._error_reply(UAPIError(ENOANO, f"get: unexpected error: {e!r}"))

    def _apply(self, request: DeviceSet) -> str:
        try:
            self._device.apply(request)
        except UAPIError as e:
            return self._error_reply(e)
        except Exception as e:
            return self._error_reply(UAPIError(ENOANO, f"set: unexpected error: {e!r}"))
        return format_errno(0)

    def _error_reply(self, error: UAPIError) -> str:
        log.err(f"UAPI: {self._name}: {error} (errno {error.errno})")
        return format_errno(error.errno or ENOANO)
