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
  ``errno=-5`` (EIO, as wireguard-go) and the connection is closed; an idle client is disconnected
  after ``timeout`` seconds.
"""

from __future__ import annotations

import errno as _errno
import hmac
import ipaddress
import os
import re
import selectors
import socket
import stat
import threading
from typing import Iterable, Protocol

from .. import log
from ..errors import AlreadyExists, InvalidParameter
from .config import (
    EINVAL,
    EIO,
    EPROTO,
    KEY_SIZE,
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

    def feed(self, line: str) -> None:
        """One ``key=value`` line (no newline). The blank end-of-request line is not fed."""
        self._lines += 1
        if self._lines > MAX_SET_LINES:
            # The whole request is held until its blank line: bound what one client can make us hold.
            raise UAPIError(EINVAL, f"set: request longer than {MAX_SET_LINES} lines")
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
            remove = value.startswith("-")
            peer.allowed_ips.append((parse_prefix(value[1:] if remove else value), remove))
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


class _Overlong(Exception):
    pass


class _LineReader:
    """Buffered ``\\n``-terminated lines from a socket, each at most MAX_LINE_LENGTH bytes."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no newline

    def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream. Raises _Overlong, OSError."""
        while True:
            i = self._buf.find(b"\n", self._scan)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                self._scan = 0
                if len(line) > MAX_LINE_LENGTH:
                    raise _Overlong(len(line))
                return line
            self._scan = len(self._buf)
            if self._scan > MAX_LINE_LENGTH:
                raise _Overlong(self._scan)
            chunk = self._conn.recv(65536)
            if not chunk:
                return None  # a partial last line without "\n" is dropped, as by ReadString/Scanner
            self._buf += chunk


class UAPIServer:
    """Serves the UAPI for ``device`` on ``<directory>/<interface_name>.sock`` from its own threads.

    The socket is bound at construction (the directory is created 0755, the socket 0700 like
    wireguard-go's umask 077). A stale socket whose process is gone is replaced; a live one raises
    :class:`~wiretun.errors.AlreadyExists`. Each client has its own thread, so a slow or stuck client
    never delays another; requests to the device are serialised. :meth:`close` stops serving and
    removes the socket file (if it is still this server's).
    """

    def __init__(
        self,
        interface_name: str,
        device: DeviceLike,
        *,
        directory: str = DEFAULT_SOCKET_DIRECTORY,
        timeout: float = 30.0,
        max_clients: int = 128,
    ) -> None:
        if not timeout > 0:
            raise InvalidParameter(f"timeout must be > 0 seconds, not {timeout!r}")
        if max_clients < 1:
            raise InvalidParameter(f"max_clients must be >= 1, not {max_clients!r}")
        self._path = socket_path(interface_name, directory)
        self._name = interface_name
        self._device = device
        self._timeout = float(timeout)
        self._max_clients = max_clients
        self._device_lock = threading.Lock()  # wireguard-go's ipcMutex: one request at a time
        self._clients_lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._closed = threading.Event()

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
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"uapi-{interface_name}", daemon=True)
        self._acceptor.start()
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
        if self._acceptor is not threading.current_thread():
            self._acceptor.join(5)
        with self._clients_lock:
            clients = list(self._clients.items())
        for conn, _ in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the client's thread out of recv()
            except OSError:
                pass
        for _, thread in clients:
            if thread is not threading.current_thread():
                thread.join(5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
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

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                try:
                    sel.select()
                    if self._closed.is_set():
                        return
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    if self._closed.is_set():
                        return
                    log.err(f"UAPI: accept failed: {e}")  # e.g. EMFILE; back off a little
                    self._closed.wait(0.1)
                    continue
                self._start_client(conn)

    def _start_client(self, conn: socket.socket) -> None:
        with self._clients_lock:
            if len(self._clients) >= self._max_clients:
                log.err(f"UAPI: refusing a client: {self._max_clients} already connected")
                conn.close()
                return
            thread = threading.Thread(target=self._serve_client, args=(conn,), name=f"uapi-{self._name}-client",
                                      daemon=True)
            self._clients[conn] = thread
        thread.start()

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._timeout)
            self._converse(conn, _LineReader(conn))
        except TimeoutError:
            log.err(f"UAPI: client idle for {self._timeout:g} s; disconnecting it")
        except _Overlong as e:
            log.err(f"UAPI: line of at least {e.args[0]} bytes is longer than {MAX_LINE_LENGTH}; disconnecting")
        except OSError:
            pass  # the client went away (reset, broken pipe) or we are closing
        except Exception as e:  # never let a client take the server down
            log.err(f"UAPI: unexpected error serving a client: {e!r}")
        finally:
            with self._clients_lock:
                self._clients.pop(conn, None)
            conn.close()

    def _converse(self, conn: socket.socket, reader: _LineReader) -> None:
        while not self._closed.is_set():
            op = reader.readline()
            if op is None:
                return
            if op == b"get=1":
                terminator = reader.readline()
                if terminator is None:
                    return
                if terminator:
                    reply = self._error_reply(UAPIError(EINVAL, "get: trailing characters after get=1"))
                else:
                    reply = self._get()
            elif op == b"set=1":
                reply, ended = self._set(reader, conn)
                if ended:  # the client half-closed: answer if it still listens, then hang up
                    conn.sendall(reply.encode("ascii"))
                    return
            else:
                # wireguard-go logs and hangs up without a reply.
                log.err(f"UAPI: invalid operation {_show(op.decode('latin-1'))}; disconnecting")
                return
            conn.sendall(reply.encode("ascii"))

    def _get(self) -> str:
        try:
            with self._device_lock:
                state = self._device.state()
            return format_get(state)
        except UAPIError as e:
            return self._error_reply(e)
        except Exception as e:
            return self._error_reply(UAPIError(ENOANO, f"get: unexpected error: {e!r}"))

    def _set(self, reader: _LineReader, conn: socket.socket) -> tuple[str, bool]:
        """Read the whole request, then apply it. Returns (reply, connection ended)."""
        parser = SetParser()
        error: UAPIError | None = None
        ended = False
        while True:
            try:
                raw = reader.readline()
            except _Overlong as e:
                # wireguard-go's scanner fails the same way (EIO); we cannot find the next line again.
                conn.sendall(self._error_reply(
                    UAPIError(EIO, f"set: line of at least {e.args[0]} bytes is longer than {MAX_LINE_LENGTH}")
                ).encode("ascii"))
                raise
            if raw is None:
                ended = True  # EOF ends the request, as in wireguard-go; it is still applied
                break
            line = _strip_eol(raw.decode("latin-1"))
            if not line:
                break
            if error is None:  # after an error keep reading to the blank line, to stay in step
                try:
                    parser.feed(line)
                except UAPIError as e:
                    error = e
        if error is not None:
            return self._error_reply(error), ended
        # Applied only after the whole request parsed (wireguard-go applies line by line): a request
        # with a bad line anywhere changes nothing.
        try:
            with self._device_lock:
                self._device.apply(parser.request)
        except UAPIError as e:
            return self._error_reply(e), ended
        except Exception as e:
            return self._error_reply(UAPIError(ENOANO, f"set: unexpected error: {e!r}")), ended
        return format_errno(0), ended

    def _error_reply(self, error: UAPIError) -> str:
        log.err(f"UAPI: {self._name}: {error} (errno {error.errno})")
        return format_errno(error.errno or ENOANO)
