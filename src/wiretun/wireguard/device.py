"""The WireGuard device: the sans-I/O core (:mod:`.core`) wired to a wiretun session and UDP sockets.

    import wiretun
    from wiretun.wireguard.device import Device

    adapter = wiretun.Adapter.create("wg0", "WireGuard")
    device = Device(adapter)                       # session, UDP sockets (random port), MTU 1420
    device.configure(private_key=open("private.key").read(), listen_port=51820)   # base64, hex or bytes
    device.add_peer(peer_public_key, endpoint="192.0.2.1:51820", allowed_ips=["10.0.0.2/32"],
                    persistent_keepalive=25)
    device.start()                                  # the event-loop thread starts moving packets
    adapter.add_address("10.0.0.1/24"); adapter.up()
    ...
    device.state().peers[0].last_handshake_time_sec # per-peer handshake time, rx/tx bytes, endpoint
    device.stats["rx_disallowed_source"]           # what was dropped, by reason
    device.close()

What ``wg(8)`` does through the UAPI socket (:class:`~wiretun.wireguard.uapi.UAPIServer`) arrives here as
:meth:`Device.apply` of a :class:`~wiretun.wireguard.config.DeviceSet`, with wireguard-go's semantics;
``get`` is answered from :meth:`Device.state`. The convenience methods (:meth:`configure`,
:meth:`add_peer`, :meth:`remove_peer`) build such requests.

Threads: one event-loop thread (started by :meth:`start`; with offloads a second one reads the TUN, see
below) waits with ``epoll`` on the session's read-wait handle, the UDP sockets (:class:`~.conn.Conn`:
IPv4 and IPv6 on one port, as wireguard-go binds), the adapter's link monitor (up/down, MTU, moved to
another namespace, deleted: the interface is followed wherever it moves, the sockets stay), and an
eventfd that :meth:`apply` and :meth:`close` use to wake it.
Each wake-up drains in batches (TUN packets -> core -> UDP; UDP datagrams -> core -> TUN) and runs the
core's timers when due. Configuration calls from other threads take the core's lock between batches.

Behaviour follows wireguard-go; where it differs, it says so:

* the device is up while the interface is administratively up, as the kernel's WireGuard is: while it
  is down no handshake or keepalive is sent, and setting it down drops sessions and queued packets.
  (wireguard-go assumes "up" at start until the first link event; with ``wg-quick``'s "set MTU, then
  up" that means a handshake, a down and a second handshake that the peer may reject as a flood.)
  Peers with a persistent keepalive send one when the interface comes up;
* the MTU is set to 1420 if the interface still has the TUN default of 1500; the padding of the core
  follows the interface MTU as it changes;
* a listen port of 0 binds a random port (IPv4 first, IPv6 on the same port, retried on collision);
  a listen port change binds the new sockets *before* closing the old ones, so a port in use
  (EADDRINUSE) leaves the device as it was (wireguard-go is left without sockets);
* fwmark sets SO_MARK on both sockets; a peer whose public key is the device's own is ignored;
* replies leave from the local address the peer last reached (sticky source addresses, as the kernel
  does; :mod:`.conn`), and from the routing's choice once that address is gone;
* runs of equal-sized datagrams to one endpoint leave in one UDP GSO send (``UDP_SEGMENT``) when the
  kernel and the path allow it, one by one otherwise; the sockets take UDP GRO, so such trains from
  the peer arrive in one read too (newer wireguard-go does both).
* the data path runs on TUN offloads (an offload session, as current wireguard-go does): one read
  brings a TCP/UDP super-packet of up to 64 KiB, which is split into wire packets, sealed in one batch
  (:mod:`.batch`: C with the GIL released, or its pure-Python twin) and sent as UDP GSO trains; a UDP
  read (a GRO train) is opened in one batch, replay-checked, and its TCP (and, on Linux 6.2+, UDP)
  packets coalesced back into super-packets written with their virtio-net header. ``offload=False``
  (or ``WIRETUN_WG_OFFLOAD=0`` in the environment) keeps the packet-by-packet path, as does a kernel
  that refuses TUN offloads. ``WIRETUN_WG_THREADS=1`` moves TUN -> UDP to a second thread (reads, seals
  with the GIL released and sends while the event loop opens what arrives, both outside the core's
  lock, which they take for routing, counters and accounting only); one thread is the default, as it
  was faster on two cores (the two threads contend for the GIL).

Bad datagrams of any kind are dropped and counted (:attr:`Device.stats`), never raised.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .. import log
from .._backend import LinkEventKind, LinkMonitor
from ..errors import EndOfFile, InvalidParameter, NotSupported, WintunError
from . import keys as _keys
from . import messages as _messages
from .config import (
    EADDRINUSE,
    EINVAL,
    EIO,
    KEY_SIZE,
    AllowedIPChanges,
    AllowedIPList,
    DeviceSet,
    DeviceState,
    Endpoint,
    PeerSet,
    PeerState,
    UAPIError,
)
from .conn import Conn, close_all
from .core import CounterSet, Peer, WireGuard
from .keylog import KeyLog

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..linux import netlink
    from ..session import Session

__all__ = ["Device", "DEFAULT_MTU"]

DEFAULT_MTU = 1420  # wireguard-go's default TUN MTU
TUN_DEFAULT_MTU = 1500  # what the kernel gives a new TUN device
DEFAULT_CAPACITY = 0x800000
BATCH = 64  # packets or datagrams handled per batch before the core's lock is let go
MAX_WAIT = 1.0  # longest epoll sleep, so a lost wake-up can never stall the loop for long
JOIN_TIMEOUT = 10.0


_ZERO_KEY = bytes(KEY_SIZE)
_OPEN_OUT_SIZE = 0x10000  # room for the packets of any UDP read (at most 65535 bytes)


@dataclass(slots=True, eq=False)
class DeviceCounters(CounterSet):
    """Counters of the device's TUN side (the core keeps the per-reason protocol drop counters, the
    conn those of the UDP side)."""

    tun_rx: int = 0  # packets read from the session
    tun_tx: int = 0  # decrypted packets written to the session
    tun_tx_dropped: int = 0  # decrypted packets dropped: the session's send ring was full


# ------------------------------------------------------------------------------------------ helpers


def _parse_key(value: object, what: str) -> bytes:
    """32 raw bytes, or a key as text: base64 (as ``wg`` prints it) or 64 hex digits (UAPI form)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _keys.check_key(value, what)
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 2 * KEY_SIZE:
            try:
                return _keys.from_hex(text)  # strict: bytes.fromhex alone would skip whitespace
            except InvalidParameter:
                raise InvalidParameter(f"{what} is 64 characters long but not hex") from None
        try:
            return _keys.from_base64(text)
        except InvalidParameter:
            # Never echo the text: it may be a private or preshared key.
            raise InvalidParameter(f"{what} must be 32 bytes, 44 base64 or 64 hex characters") from None
    raise InvalidParameter(f"{what} must be bytes or a base64/hex string, not {type(value).__name__}")


def _normalise_host(host: str) -> str:
    """A literal address in canonical form; IPv4-mapped IPv6 becomes plain IPv4 (it is sent over IPv4)."""
    bare, sep, zone = host.partition("%")
    address = ipaddress.ip_address(bare)
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return f"{address}%{zone}" if sep and zone else str(address)
    return str(address)


def _normalise_endpoint(endpoint: Endpoint) -> Endpoint:
    return (_normalise_host(endpoint[0]), int(endpoint[1]))


def _parse_endpoint(value: object) -> Endpoint:
    """``(host, port)`` or ``"host:port"`` / ``"[v6]:port"``; a host name is resolved (as ``wg`` does)."""
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise InvalidParameter(f"endpoint {value!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
    else:
        raise InvalidParameter(f"endpoint must be (host, port) or 'host:port', not {value!r}")
    if not isinstance(host, str) or not host:
        raise InvalidParameter(f"endpoint host must be a non-empty string, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise InvalidParameter(f"endpoint port {port!r} is out of range 1..65535")
    try:
        return (_normalise_host(host), port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise InvalidParameter(f"endpoint host {host!r} cannot be resolved: {e.strerror}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # prefer IPv4, as wg does
    return (_normalise_host(str(infos[0][4][0])), port)


def _report_endpoint(endpoint: Any) -> Endpoint | None:
    """The (host, port) that state() reports for a stored endpoint (a source may be a 4-tuple)."""
    if endpoint is None:
        return None
    host = endpoint[0]
    if len(endpoint) >= 4 and endpoint[3] and "%" not in host:
        try:
            host = f"{host}%{socket.if_indextoname(endpoint[3])}"
        except OSError:
            host = f"{host}%{endpoint[3]}"
    return (host, endpoint[1])


# ------------------------------------------------------------------------------------------ device


class Device:
    """A userspace WireGuard interface on a wiretun adapter (see the module docstring).

    ``Device(adapter)`` starts a session with ``capacity``-byte rings and binds UDP sockets on a random
    port; nothing moves until :meth:`start`. Configure it before or after starting. :meth:`close` ends
    it (idempotent); :attr:`closed` is set then, and also when the adapter disappears.
    """

    def __init__(self, adapter: Adapter, *, capacity: int = DEFAULT_CAPACITY, offload: bool | None = None,
                 keylog: str | os.PathLike[str] | None = None) -> None:
        if offload is None:
            offload = os.environ.get("WIRETUN_WG_OFFLOAD", "1") != "0"
        self._adapter = adapter
        self._name = adapter.kernel_name
        self._lock = threading.Lock()  # the core, the sockets and the counters
        self._api_mutex = threading.Lock()  # one configuration call at a time
        self._api_waiting = False
        self._state_lock = threading.Lock()  # lifetime: closing, wake fd, teardown
        self._closed = threading.Event()
        self._closing = False
        self._torn_down = False
        self._thread: threading.Thread | None = None
        self.counters = DeviceCounters()

        self._core = WireGuard(mtu=DEFAULT_MTU)
        self._core.on_event = self._on_core_event
        self._keylog: KeyLog | None = None
        if keylog is not None:  # off by default; an unusable file is logged and the device runs without it
            self._keylog = KeyLog(keylog, self._name)
            if self._keylog.active:
                self._core.keylog = self._keylog.write
        self._ns: netlink.Namespace | None = None
        self._session: Session | None = None
        self._conn: Conn | None = None
        self._wake_fd = -1
        self._links: LinkMonitor | None = None
        self._link_up = True  # the interface's administrative state, followed through link events
        self._interface_deleted = False
        self._link_errors_logged: set[int] = set()
        self._offload = False  # the session hands over super-packets (TSO/USO) and takes them back
        self._udp_coalesce = False  # the kernel takes UDP super-packets (USO) on write
        self._open_out = memoryview(bytearray(_OPEN_OUT_SIZE))  # decrypted trains, coalesced
        self._rx_headers: list[Any] = []
        self._tun_thread: threading.Thread | None = None
        self._tun_thread_wanted = os.environ.get("WIRETUN_WG_THREADS", "0") == "1"
        self._send_lock = threading.Lock()  # the conn's sends, from the event loop and the TUN thread
        try:
            from ..linux import netlink  # Linux only: imported where used, so the module imports anywhere

            self._ns = netlink.Namespace()  # where sockets go, also those made later (rebinds)
            mtu = adapter.get_mtu()
            if mtu == TUN_DEFAULT_MTU:
                adapter.set_mtu(DEFAULT_MTU)  # wireguard-go creates its TUN with 1420
                mtu = DEFAULT_MTU
            self._core.mtu = min(mtu, _messages.MAX_CONTENT_SIZE)
            self._session = self._start_session(adapter, capacity, offload)
            self._conn = Conn(self._name, self._ns)
            self._conn.bind(0, 0)
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self._links = adapter.link_monitor()
            except (WintunError, OSError) as e:
                log.warn(f"Device {self._name}: cannot watch link events ({e}); staying up")
            # Subscribed first, then read: a change in between arrives as an event.
            if self._links is not None and not self._links.state.up:
                self._link_up = False
                self._core.down()
        except BaseException:
            self._teardown()
            raise
        log.info(f"Device {self._name}: created, UDP port {self.listen_port}, MTU {mtu}")

    def _start_session(self, adapter: Adapter, capacity: int, offload: bool) -> Session:
        """An offload session where the kernel allows it (the data path then moves super-packets),
        else a plain one."""
        if offload:
            try:
                session = adapter.start_session(capacity, offload=True)
            except (InvalidParameter, NotSupported) as e:
                log.info(f"Device {self._name}: no TUN offloads ({e}); packet by packet")
            else:
                self._offload = True
                from ..linux.session import BASE_OFFLOADS

                self._udp_coalesce = bool(session.offloads & ~BASE_OFFLOADS)  # USO: Linux 6.2+
                return session
        return adapter.start_session(capacity)

    @property
    def offload(self) -> bool:
        """Whether the data path runs on TUN offloads (super-packets split and sealed in batches, UDP
        trains opened and coalesced back); False on a kernel or adapter without them."""
        return self._offload

    # ------------------------------------------------------------------ identity and lifetime

    @property
    def name(self) -> str:
        """The interface's kernel name."""
        try:
            self._name = self._adapter.kernel_name
        except (WintunError, OSError):
            pass  # gone or closed: the last known name
        return self._name

    @property
    def adapter(self) -> Adapter:
        return self._adapter

    @property
    def interface_deleted(self) -> bool:
        """True once the interface was deleted (not merely moved to another namespace)."""
        return self._interface_deleted

    @property
    def closed(self) -> threading.Event:
        """Set once the device is closed, by :meth:`close` or because the adapter went away."""
        return self._closed

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else f"port={self.listen_port}"
        return f"<wiretun.wireguard.Device {self._name!r} {state}>"

    def start(self) -> None:
        """Start the event-loop thread. InvalidParameter if already started or closed."""
        with self._state_lock:
            if self._closing or self._torn_down:
                raise InvalidParameter(f"device {self._name} is closed")
            if self._thread is not None:
                raise InvalidParameter(f"device {self._name} is already started")
            self._thread = threading.Thread(target=self._run, name=f"wiretun-wg-{self._name}", daemon=True)
            if self._offload and self._tun_thread_wanted:
                # TUN -> UDP on a thread of its own: reads, seals (GIL released) and sends while the
                # event loop opens what arrives, so both directions (and both cores) work at once.
                self._tun_thread = threading.Thread(target=self._tun_run, name=f"wiretun-wg-{self._name}-tun",
                                                    daemon=True)
            self._thread.start()
            if self._tun_thread is not None:
                self._tun_thread.start()
        log.info(f"Device {self._name}: started")

    def close(self) -> None:
        """Stop the loop, close the sockets, end the session; sets :attr:`closed`. Idempotent.

        The adapter is not closed: it belongs to the caller.
        """
        with self._state_lock:
            self._closing = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.err(f"Device {self._name}: the event loop did not stop within {JOIN_TIMEOUT:g} s")
        self._teardown()

    def _namespace(self) -> netlink.Namespace:
        ns = self._ns
        if ns is None or ns.closed:
            raise OSError(errno.EBADF, "the device is closed")
        return ns

    def _wake(self) -> None:
        with self._state_lock:
            if self._wake_fd >= 0:
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError:
                    pass

    def _teardown(self) -> None:
        with self._state_lock:
            if self._torn_down:
                return
            self._torn_down = True
            self._closing = True
            wake_fd, self._wake_fd = self._wake_fd, -1
        tun_thread = self._tun_thread
        if tun_thread is not None and tun_thread is not threading.current_thread():
            session = self._session
            if session is not None:
                try:
                    session.end()  # wakes the TUN thread, which then stops
                except Exception as e:
                    log.warn(f"Device {self._name}: ending the session failed: {e}")
            tun_thread.join(JOIN_TIMEOUT)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._core.down()  # forget session keys and queued packets
            self._core.take_datagrams()
            self._core.take_packets()
            self._core.take_trains()
            self._core.take_frames()
            self._core.keylog = None
            if self._keylog is not None:
                self._keylog.close()
        links, self._links = self._links, None
        if links is not None:
            links.close()
        session, self._session = self._session, None
        if session is not None:
            try:
                session.end()
            except Exception as e:
                log.warn(f"Device {self._name}: ending the session failed: {e}")
        if wake_fd >= 0:
            os.close(wake_fd)
        if self._ns is not None:
            self._ns.close()
        log.info(f"Device {self._name}: closed")
        self._closed.set()

    # ------------------------------------------------------------------ configuration (any thread)

    @contextmanager
    def _core_locked(self) -> Iterator[None]:
        """The core's lock, for a configuration call that holds ``_api_mutex``; the loop steps aside
        for it between batches."""
        self._api_waiting = True
        try:
            self._lock.acquire()
        finally:
            self._api_waiting = False
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _api_lock(self) -> Iterator[None]:
        """The core's lock for a configuration call (one call at a time)."""
        with self._api_mutex, self._core_locked():
            yield

    def apply(self, request: DeviceSet) -> None:
        """Apply a UAPI ``set`` request with wireguard-go's semantics.

        Raises :class:`UAPIError`: EADDRINUSE when the listen port cannot be bound or fwmark cannot be
        set, EINVAL for a value the core refuses (e.g. too many peers), EIO once the device is closed.
        A listen port failure changes nothing; later failures leave what was applied before them, as
        wireguard-go does.
        """
        if not isinstance(request, DeviceSet):
            raise InvalidParameter(f"apply() takes a DeviceSet, not {type(request).__name__}")
        # Allowed-IP changes are collected while the rest is applied under the core's lock, then
        # made on a copy of the routing table without the lock (a large set would otherwise stall
        # the data plane for its whole length), and the copy replaces the table at once. Only
        # configuration calls change the table, and they are serialised by _api_mutex.
        routes: list[tuple[Peer, list[int] | None]] = []
        try:
            with self._api_mutex:
                try:
                    with self._core_locked():
                        if self._torn_down:
                            raise UAPIError(EIO, f"device {self._name} is closed")
                        self._apply_locked(request, routes)
                finally:
                    table = None
                    if routes:
                        table = self._core.routing_table_copy()
                        for peer, changes in routes:
                            if changes is None:
                                table.remove_by_peer(peer)
                            else:
                                table.apply(peer, changes)
                    with self._core_locked():
                        if table is not None and not self._torn_down:
                            self._core.install_routing_table(table)
                        self._core.apply_config(time.monotonic())
        finally:
            self._wake()  # flush what the core queued; pick up new sockets

    def _apply_locked(self, request: DeviceSet, routes: list[tuple[Peer, list[int] | None]]) -> None:
        """Everything but the allowed IPs, whose changes go to ``routes`` in request order:
        ``(peer, None)`` drops all of the peer's prefixes, ``(peer, changes)`` applies changes."""
        core = self._core
        conn = self._conn
        if conn is None:
            raise UAPIError(EIO, f"device {self._name} is closed")
        fwmark = conn.fwmark if request.fwmark is None else request.fwmark
        if not 0 <= fwmark <= 0xFFFFFFFF:
            raise UAPIError(EINVAL, f"fwmark {fwmark} is out of range 0..4294967295")
        port = request.listen_port
        if port is not None and not 0 <= port <= 0xFFFF:
            raise UAPIError(EINVAL, f"listen_port {port} is out of range 0..65535")
        if port is not None and (port != conn.port or not conn.bound):
            try:
                bound = conn.bind(port, fwmark)
            except OSError as e:
                raise UAPIError(EADDRINUSE, f"cannot listen on UDP port {port}: {e.strerror or e}") from None
            log.info(f"Device {self._name}: listening on UDP port {bound}")
        elif request.fwmark is not None:
            try:
                conn.set_fwmark(fwmark)
            except OSError as e:
                raise UAPIError(EADDRINUSE, f"cannot set fwmark {fwmark}: {e.strerror or e}") from None

        try:
            if request.private_key is not None:
                core.set_private_key(request.private_key)  # zero clears; removes a peer with our key
            if request.replace_peers:
                core.remove_all_peers()
            for peer_set in request.peers:
                self._apply_peer(peer_set, routes)
        except (InvalidParameter, ValueError) as e:
            raise UAPIError(EINVAL, str(e)) from None

    def _apply_peer(self, ps: PeerSet, routes: list[tuple[Peer, list[int] | None]]) -> None:
        core = self._core
        public_key = _keys.check_key(ps.public_key, "public key")
        own = core.public_key
        if own is not None and _keys.keys_equal(own, public_key):
            return  # wireguard-go ignores a peer with the device's own key
        peer = core.get_peer(public_key)
        if ps.remove:
            if peer is not None:
                core.remove_peer(public_key)
                routes.append((peer, None))  # also what earlier sections of this request gave it
                log.info(f"Device {self._name}: {peer!r} removed")
            return
        if peer is None:
            if ps.update_only:
                return
            peer = core.add_peer(public_key)
            log.info(f"Device {self._name}: {peer!r} created")
        if ps.preshared_key is not None:
            peer.preshared_key = ps.preshared_key
        if ps.endpoint is not None:
            peer.endpoint = _normalise_endpoint(ps.endpoint)
        if ps.persistent_keepalive_interval is not None:
            peer.persistent_keepalive_interval = ps.persistent_keepalive_interval
        if ps.replace_allowed_ips:
            routes.append((peer, None))
        if ps.allowed_ips:
            routes.append((peer, ps.allowed_ips.changes))

    def state(self) -> DeviceState:
        """A snapshot for ``get``: keys, listen port, fwmark, and per peer its configuration, endpoint,
        last handshake time and rx/tx bytes."""
        with self._api_lock():
            core = self._core
            peers = []
            for peer in core.peers():
                sec, nsec = peer.last_handshake
                peers.append(
                    PeerState(
                        public_key=peer.public_key,
                        preshared_key=peer.preshared_key,
                        endpoint=_report_endpoint(peer.endpoint),
                        persistent_keepalive_interval=peer.persistent_keepalive_interval,
                        last_handshake_time_sec=sec,
                        last_handshake_time_nsec=nsec,
                        rx_bytes=peer.rx_bytes,
                        tx_bytes=peer.tx_bytes,
                        allowed_ips=AllowedIPList(peer.allowed_ip_slots),
                    )
                )
            return DeviceState(private_key=core.private_key, listen_port=self.listen_port,
                               fwmark=self.fwmark, peers=peers)

    # ------------------------------------------------------------------ Python API

    def configure(
        self,
        *,
        private_key: bytes | str | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        replace_peers: bool = False,
    ) -> None:
        """Set device fields; None leaves a field unchanged. Keys are 32 bytes or base64/hex text;
        a private key of 32 zero bytes clears it; ``listen_port=0`` picks a random port, ``fwmark=0``
        clears the mark; ``replace_peers`` removes every peer. Raises InvalidParameter for a bad value
        and UAPIError (EADDRINUSE) when the port cannot be bound."""
        request = DeviceSet(replace_peers=bool(replace_peers))
        if private_key is not None:
            request.private_key = _parse_key(private_key, "private key")
        if listen_port is not None:
            if isinstance(listen_port, bool) or not isinstance(listen_port, int) or not 0 <= listen_port <= 0xFFFF:
                raise InvalidParameter(f"listen_port {listen_port!r} is out of range 0..65535")
            request.listen_port = listen_port
        if fwmark is not None:
            if isinstance(fwmark, bool) or not isinstance(fwmark, int) or not 0 <= fwmark <= 0xFFFFFFFF:
                raise InvalidParameter(f"fwmark {fwmark!r} is out of range 0..4294967295")
            request.fwmark = fwmark
        self.apply(request)

    def add_peer(
        self,
        public_key: bytes | str,
        *,
        preshared_key: bytes | str | None = None,
        endpoint: Endpoint | str | None = None,
        allowed_ips: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        persistent_keepalive: int = 0,
    ) -> None:
        """Add a peer, or reconfigure the one with this key: its allowed IPs become ``allowed_ips``,
        its preshared key ``preshared_key`` (None: none), its persistent keepalive interval
        ``persistent_keepalive`` seconds (0: off). ``endpoint`` is ``(host, port)`` or ``"host:port"``
        (``"[v6]:port"``; names are resolved); None keeps the current one (e.g. a learned endpoint).
        InvalidParameter for a bad value, including the device's own public key."""
        key = _parse_key(public_key, "public key")
        own = self.public_key
        if own is not None and _keys.keys_equal(own, key):
            raise InvalidParameter("a peer cannot have the device's own public key")
        if isinstance(persistent_keepalive, bool) or not isinstance(persistent_keepalive, int) \
                or not 0 <= persistent_keepalive <= 0xFFFF:
            raise InvalidParameter(f"persistent_keepalive {persistent_keepalive!r} is out of range 0..65535 s")
        if isinstance(allowed_ips, (str, bytes)):
            allowed_ips = [allowed_ips]
        networks = []
        for item in allowed_ips:
            try:
                networks.append((ipaddress.ip_network(item, strict=False), False))
            except (TypeError, ValueError) as e:
                raise InvalidParameter(f"allowed IP {item!r} is not an IPv4/IPv6 prefix: {e}") from None
        self.apply(DeviceSet(peers=[PeerSet(
            public_key=key,
            preshared_key=_ZERO_KEY if preshared_key is None else _parse_key(preshared_key, "preshared key"),
            endpoint=None if endpoint is None else _parse_endpoint(endpoint),
            persistent_keepalive_interval=persistent_keepalive,
            replace_allowed_ips=True,
            allowed_ips=AllowedIPChanges(networks),
        )]))

    def remove_peer(self, public_key: bytes | str) -> bool:
        """Remove the peer with this key (its sessions, routes, queued packets). False if absent."""
        key = _parse_key(public_key, "public key")
        with self._api_lock():
            removed = self._core.remove_peer(key)
        if removed:
            log.info(f"Device {self._name}: peer {_keys.to_base64(key)[:8]}… removed")
        return removed

    def peer(self, public_key: bytes | str) -> PeerState | None:
        """The state of one peer (as in :meth:`state`), or None if there is no such peer."""
        key = _parse_key(public_key, "public key")
        for peer in self.state().peers:
            if peer.public_key == key:
                return peer
        return None

    @property
    def public_key(self) -> bytes | None:
        """The device's public key (None without a private key)."""
        with self._api_lock():
            return self._core.public_key

    @property
    def listen_port(self) -> int:
        """The UDP port the device is bound to."""
        conn = self._conn
        return conn.port if conn is not None else 0

    @property
    def fwmark(self) -> int:
        conn = self._conn
        return conn.fwmark if conn is not None else 0

    @property
    def mtu(self) -> int:
        """The MTU the core pads to: the interface's, followed as it changes."""
        return self._core.mtu

    @property
    def is_up(self) -> bool:
        """Whether the device is up (it follows the interface's administrative state)."""
        return self._core.is_up

    @property
    def stats(self) -> dict[str, int]:
        """Counters: the core's drops by reason (``rx_bad_mac1``, ``rx_replay``,
        ``rx_disallowed_source``, ...; see :class:`wiretun.wireguard.core.Counters`) and totals, plus the
        device's I/O counters (:class:`DeviceCounters`) and ``dropped``, all drops together."""
        with self._api_lock():
            out = self._core.stats.as_dict()
            out["dropped"] = self._core.stats.dropped()
            device = self.counters.as_dict()
            if self._conn is not None:
                device.update(self._conn.counters.as_dict())
        out["dropped"] += device.get("udp_tx_errors", 0) + device.get("udp_tx_no_socket", 0) + device["tun_tx_dropped"]
        out.update(device)
        return out

    # ------------------------------------------------------------------ the event loop

    def _on_core_event(self, name: str, peer: Peer) -> None:
        if name == "handshake_complete":
            log.info(f"Device {self._name}: {peer!r} handshake completed")
        elif name == "handshake_gave_up":
            log.info(f"Device {self._name}: {peer!r} handshake did not complete; giving up for now")

    def _run(self) -> None:
        try:
            self._loop()
        except EndOfFile:
            self._interface_deleted = True
            log.info(f"Device {self._name}: the interface is gone; closing")
        except Exception as e:  # a bug must not leave a daemon running without a data path
            log.err(f"Device {self._name}: event loop failed: {e!r}; closing")
        finally:
            self._teardown()

    def _loop(self) -> None:
        session = self._session
        if session is None:
            return
        conn = self._conn
        if conn is None:
            return
        session_fd = session.get_read_wait_event()
        wake_fd = self._wake_fd
        links = self._links
        netlink_fd = links.fileno() if links is not None else -1
        poller = select.epoll()
        try:
            if self._tun_thread is None:
                poller.register(session_fd, select.EPOLLIN)
            poller.register(wake_fd, select.EPOLLIN)
            if netlink_fd >= 0:
                poller.register(netlink_fd, select.EPOLLIN)
            lock = self._lock
            core = self._core
            monotonic = time.monotonic
            receive_datagram = core.receive_datagram
            gen = -1
            sockets: dict[int, socket.socket] = {}
            while not self._closing:
                if gen != conn.generation:
                    with lock:
                        gen = conn.generation
                        for fd in sockets:
                            try:
                                poller.unregister(fd)
                            except (OSError, ValueError):
                                pass
                        close_all(conn.take_retired())
                        sockets = {s.fileno(): s for s in conn.sockets()}
                        for fd in sockets:
                            poller.register(fd, select.EPOLLIN)
                with lock:
                    deadline = core.next_deadline()
                    if core.datagrams or core.packets or core.trains or core.frames:
                        self._flush()
                if deadline is None:
                    timeout = MAX_WAIT
                else:
                    timeout = min(MAX_WAIT, max(0.0, deadline - monotonic()))
                events = poller.poll(timeout)
                for fd, _ in events:
                    if self._closing:
                        break
                    if fd == session_fd:
                        with lock:
                            self._from_tun(session)
                    elif fd == wake_fd:
                        try:
                            os.eventfd_read(wake_fd)
                        except BlockingIOError:
                            pass
                    elif fd == netlink_fd:
                        self._link_events()
                    else:
                        sock = sockets.get(fd)
                        if sock is not None and self._tun_thread is not None:
                            # Opening needs no lock (only this thread opens): the TUN thread goes on.
                            conn.receive_trains(sock, self._train_received_unlocked, monotonic())
                        elif sock is not None:
                            with lock:
                                if conn.generation == gen:  # not retired meanwhile
                                    if self._offload:
                                        conn.receive_trains(sock, self._train_received, monotonic())
                                    elif conn.receive(sock, receive_datagram, monotonic()):
                                        self._flush()
                    if self._api_waiting:
                        self._step_aside()
                if deadline is not None:
                    now = monotonic()
                    if now >= deadline:
                        with lock:
                            core.tick(now)
                            self._flush()
                if self._api_waiting:
                    self._step_aside()
        finally:
            poller.close()

    def _step_aside(self) -> None:
        """Let a waiting configuration call take the lock (a released Lock is re-taken by the thread
        holding the GIL before a waiter wakes, so without this a busy loop would starve it)."""
        deadline = time.monotonic() + 1.0
        while self._api_waiting and not self._closing and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _from_tun(self, session: Session) -> None:
        """One batch of packets from the session through the core to UDP. Called with the lock held.
        With offloads each read (a super-packet, say) is sealed whole into one train."""
        if self._offload:
            headers = self._rx_headers
            headers.clear()
            views = session.receive_packets(BATCH, headers=headers)
            if not views:
                return
            try:
                send = self._core.send_super_packet
                now = time.monotonic()
                for view, header in zip(views, headers):
                    send(header, view, now)
            finally:
                session.release_receive_packets(views)
        else:
            views = session.receive_packets(BATCH)
            if not views:
                return
            try:
                self._core.send_packets(views, time.monotonic())
            finally:
                session.release_receive_packets(views)
        self.counters.tun_rx += len(views)
        self._flush()

    def _tun_run(self) -> None:
        try:
            self._tun_loop()
        except EndOfFile:
            if not self._closing:
                self._interface_deleted = True  # the session ends on its own only when the interface goes
                log.info(f"Device {self._name}: the interface is gone; closing")
        except Exception as e:  # a bug must not leave a daemon running without a data path
            log.err(f"Device {self._name}: TUN thread failed: {e!r}; closing")
        finally:
            if not self._closing:
                self._closing = True
                self._wake()  # the event loop tears down

    def _tun_loop(self) -> None:
        """TUN -> UDP on its own thread: per batch, routes and counters under the core's lock
        (:meth:`WireGuard.reserve_super_packet`), then sealing (the GIL released) and sending without it,
        in reservation order, so packets of one peer leave in order. Nothing is queued between threads:
        the TUN is read again only when the batch has left (back-pressure to the kernel's queue)."""
        session = self._session
        conn = self._conn
        if session is None or conn is None:
            return
        lock = self._lock
        core = self._core
        reserve = core.reserve_super_packet
        headers: list[Any] = []
        monotonic = time.monotonic
        while not self._closing:
            if self._api_waiting:
                self._step_aside()
            headers.clear()
            views = session.receive_packets(BATCH, block=True, timeout=MAX_WAIT, headers=headers)
            if not views:
                continue
            sealed: list[tuple[bytes, int, Any]] = []
            sent_by: list[tuple[Any, int]] = []
            try:
                now = monotonic()
                with lock:
                    jobs = [reserve(header, view, now) for view, header in zip(views, headers)]
                    datagrams = core.take_datagrams() if core.datagrams else None
                for job, view, header in zip(jobs, views, headers):
                    if job is not None:
                        train, size = job.seal(header, view)
                        sealed.append((train, size, job.endpoint))
                        sent_by.append((job.peer, len(train)))
            finally:
                session.release_receive_packets(views)
            with self._send_lock:
                if datagrams:
                    conn.send(datagrams)
                if sealed:
                    self._send_trains(conn, sealed)
            with lock:
                self.counters.tun_rx += len(views)
                for peer, size in sent_by:
                    peer.tx_bytes += size

    def _train_received_unlocked(self, data: memoryview, segment: int, source: Any, now: float) -> None:
        """:meth:`_train_received` while the TUN thread runs: the core's lock only around the state steps
        (:meth:`WireGuard.open_job`, :meth:`WireGuard.opened`), not around opening or writing."""
        lock = self._lock
        core = self._core
        out = self._open_out
        udp = self._udp_coalesce
        pos = 0
        while True:
            with lock:
                job, pos = core.open_job(data, pos, segment, source, now)
                if job is None:
                    self._flush()
                    return
            result = job.open(data, segment, out, udp)
            with lock:
                pos = core.opened(job, result, data, segment, source, now, out)

    def _train_received(self, data: memoryview, segment: int, source: Any, now: float) -> None:
        """One UDP read (a GRO train or one datagram) through the core, its packets to the session at
        once (they live in the one decrypt buffer until then)."""
        self._core.receive_train(data, segment, source, now, self._open_out, self._udp_coalesce)
        self._flush()

    def _flush(self) -> None:
        """Send what the core produced: datagrams to UDP, decrypted packets to the session."""
        core = self._core
        packets: list[Any] = core.packets
        frames = core.frames
        if packets or frames:
            headers: list[Any] | None = None
            if frames:
                core.frames = []
                headers = [None] * len(packets)
                packets = packets + [packet for _, packet in frames]
                headers += [header for header, _ in frames]
            core.packets = []
            session = self._session
            written = 0
            if session is not None:
                try:
                    written = session.send_packets(packets, headers)
                except EndOfFile:
                    raise
                except InvalidParameter:  # cannot happen: the core checks the IP length
                    written = 0
            self.counters.tun_tx += written
            self.counters.tun_tx_dropped += len(packets) - written
        datagrams = core.datagrams
        conn = self._conn
        if datagrams:
            core.datagrams = []
            if conn is not None:
                with self._send_lock:
                    conn.send(datagrams)
        trains = core.trains
        if trains:
            core.trains = []
            if conn is not None:
                with self._send_lock:
                    self._send_trains(conn, trains)

    @staticmethod
    def _send_trains(conn: Conn, trains: list[tuple[bytes, int, Any]]) -> None:
        """Trains in order; runs of single datagrams (small packets: ACKs, 64-byte UDP) go together
        through :meth:`Conn.send`, which sends runs of equal size to one endpoint as one GSO train."""
        singles: list[tuple[bytes, Any]] = []
        for train, size, endpoint in trains:
            if len(train) <= size:
                singles.append((train, endpoint))
                continue
            if singles:
                conn.send(singles)
                singles = []
            conn.send_train(train, size, endpoint)
        if singles:
            conn.send(singles)

    def _link_events(self) -> None:
        """Follow the interface's up/down state and MTU (wireguard-go's tun events), wherever it is:
        a move to another namespace is followed, a deletion ends the loop (EndOfFile)."""
        links = self._links
        if links is None:
            return
        try:
            events = links.read_events()
        except OSError as e:
            code = e.errno or 0
            if code not in self._link_errors_logged:
                self._link_errors_logged.add(code)
                log.warn(f"Device {self._name}: cannot follow the interface ({e.strerror or e}); "
                         "keeping its last known state (logged once)")
            return
        if not events:
            return
        with self._lock:
            core = self._core
            for event in events:
                kind = event.kind
                if kind is LinkEventKind.MTU and event.mtu is not None:
                    if event.mtu != core.mtu:
                        core.mtu = min(event.mtu, _messages.MAX_CONTENT_SIZE)
                        log.info(f"Device {self._name}: MTU {event.mtu}")
                elif kind is LinkEventKind.UP or kind is LinkEventKind.DOWN:
                    up = kind is LinkEventKind.UP
                    if up != self._link_up:
                        self._link_up = up
                        if up:
                            core.up(time.monotonic())
                            log.info(f"Device {self._name}: interface up")
                        else:
                            core.down()
                            log.info(f"Device {self._name}: interface down")
                elif kind is LinkEventKind.MOVED:
                    log.info(f"Device {self._name}: the interface moved to another network namespace "
                             f"(now {links.state.name}, index {links.state.index}); "
                             "following it, the UDP sockets stay")
                elif kind is LinkEventKind.DELETED:
                    self._interface_deleted = True
                    raise EndOfFile(f"interface {self._name} deleted")
            self._flush()
