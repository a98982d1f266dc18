"""The device's UDP side: the IPv4 and IPv6 sockets, marks, UDP GSO/GRO (wireguard-go's ``conn``).

    conn = Conn("wg0", namespace)          # nothing bound yet
    conn.bind(51820, fwmark=0)             # both families on one port (0: a random free one)
    conn.send(datagrams)                   # [(bytes, endpoint), ...] as the core queues them
    conn.receive(sock, deliver, now)       # one batch: deliver(view, source_endpoint, now) per datagram
    conn.close()

Endpoints are opaque to the core: a datagram's source endpoint is what :meth:`Conn.receive` hands to
``deliver``, and the core sends back to whatever endpoint it stored. Here they are socket address
tuples (``(host, port)``, ``(host, port, flowinfo, scope_id)``), which compare, hash and print as
such; one that came from :meth:`Conn.receive` is an :class:`Endpoint`, which also remembers the local
address the datagram arrived at.

Source addresses are sticky, as in the kernel's WireGuard and wireguard-go: a reply leaves from the
local address the peer last reached (``IP_PKTINFO`` / ``IPV6_PKTINFO`` on receive, the same control
message on send, GSO trains included), also on a host with several addresses. When that address is
gone the kernel refuses the send (ENETUNREACH for IPv4, EINVAL for IPv6): the endpoint forgets it and the datagram
goes again with the source the routing picks ("sticky, but not too sticky").

A :class:`Conn` is not thread-safe: the device calls it with its own lock held. Sockets are always
created in the namespace the conn was given (the interface's birth namespace), from any thread.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import log
from .core import CounterSet

if TYPE_CHECKING:
    from ..linux import netlink  # the namespace a device's sockets live in (Linux)

__all__ = ["Conn", "ConnCounters", "Datagram", "Deliver", "DeliverTrain", "Endpoint", "SOCKET_BUFFER_SIZE",
           "GSO_RETRY_AFTER"]

SOCKET_BUFFER_SIZE = 7 << 20  # wireguard-go's UDP socket buffer size
RANDOM_PORT_ATTEMPTS = 100  # wireguard-go's retries when port 0 collides on IPv6
SEND_WAIT = 0.1  # how long one flush of datagrams may wait, in all, for socket buffer space; then drops
BATCH = 64  # datagrams read per receive call
_RECV_SIZE = 65536  # larger than any UDP payload

# UDP generic segmentation offload (Linux 4.18): one send of up to 64 equal-sized datagrams.
_UDP_SEGMENT = 103
_GSO_SIZE = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
_GSO_MAX_BYTES = 65000  # the whole train is one UDP datagram to the stack (IPv4 or IPv6)
# The kernel or the path cannot do it: EIO (no checksum offload on the route's device), EMSGSIZE or
# EINVAL (a segment larger than the path MTU: single datagrams get fragmented, trains do not),
# ENOPROTOOPT/EOPNOTSUPP (no UDP GSO). Then datagrams go one by one, and GSO is tried again later.
_GSO_REFUSED = frozenset({errno.EIO, errno.EMSGSIZE, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
GSO_RETRY_AFTER = 60.0  # seconds
# UDP GRO (Linux 5.0): the kernel may hand over several datagrams of one flow in one read.
_UDP_GRO = 104
_GRO_INT = struct.Struct("=i")
_SO_RCVBUFFORCE = 33
_SO_SNDBUFFORCE = 32
_SO_MARK = 36
_MARK = struct.Struct("=I")
# Sticky source addresses.
_IP_PKTINFO = 8  # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
_IPV6_RECVPKTINFO = 49
_IPV6_PKTINFO = 50  # struct in6_pktinfo { in6_addr addr; unsigned int ifindex; }
_IN6_PKTINFO = struct.Struct("=16sI")
_ANCILLARY_SPACE = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(_IN6_PKTINFO.size)
# A source address that is no longer local: IPv4 route lookups say ENETUNREACH, IPv6 EINVAL.
_STALE_SOURCE = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})
_ENDPOINT_CACHE = 1024  # distinct (peer address, local address) pairs remembered between reads

Datagram = tuple[bytes, Any]  # (payload, endpoint)


class Endpoint(tuple):  # type: ignore[type-arg]
    """A peer's socket address (compares, hashes and prints as the plain tuple) plus the local
    address its datagram arrived at: ``source``, the ``IP_PKTINFO`` / ``IPV6_PKTINFO`` control
    message data to send replies with, or None (then the routing picks one)."""

    source: bytes | None

    def __new__(cls, address: tuple[Any, ...], source: bytes | None) -> Endpoint:
        self = super().__new__(cls, address)
        self.source = source
        return self

    @property
    def local_address(self) -> str | None:
        """The local address replies leave from (None: the routing's choice)."""
        src = self.source
        if src is None:
            return None
        if len(src) == _IN6_PKTINFO.size:
            return socket.inet_ntop(socket.AF_INET6, src[:16])
        return socket.inet_ntop(socket.AF_INET, src[4:8])
Deliver = Callable[[memoryview, Any, float], None]
DeliverTrain = Callable[[memoryview, int, Any, float], None]  # (datagrams, segment size, source, now)


@dataclass(slots=True, eq=False)
class ConnCounters(CounterSet):
    """Counters of the UDP side."""

    udp_rx: int = 0  # datagrams received
    udp_rx_trains: int = 0  # reads that carried several datagrams at once (UDP GRO)
    udp_rx_errors: int = 0  # receive calls that failed (other than "nothing waiting")
    udp_tx: int = 0  # datagrams sent
    udp_tx_trains: int = 0  # sends that carried several datagrams at once (UDP GSO)
    udp_tx_errors: int = 0  # datagrams the kernel refused or had no room for: dropped
    udp_tx_no_socket: int = 0  # datagrams for an address family without a socket: dropped
    udp_gso_refused: int = 0  # times the kernel refused a GSO train (then one by one for a while)


def close_all(socks: Iterable[socket.socket | None]) -> None:
    for sock in socks:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK (fwmark) on ``sock`` (OSError if refused). ``setsockopt(..., int)`` passes a C ``int``,
    so marks from 0x80000000 up would not fit: the 4 bytes of the unsigned value go instead."""
    sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, _MARK.pack(mark))


def udp_socket(family: int, port: int, fwmark: int) -> socket.socket | None:
    """A non-blocking UDP socket bound to the wildcard address; None if the family is unavailable."""
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_SIZE)
            except OSError:  # without CAP_NET_ADMIN: as much as net.core.*mem_max allows
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_SIZE)
        if fwmark:
            set_mark(sock, fwmark)
        try:
            sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
        except OSError:
            pass  # older kernel: one datagram per read
        # Where each datagram arrived (sticky source addresses).
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError as e:
        sock.close()
        if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
            return None  # IPv6 disabled in this namespace
        raise
    return sock


def bind_pair(port: int, fwmark: int) -> tuple[socket.socket | None, socket.socket | None, int]:
    """IPv4 and IPv6 sockets on one port (0: a random port free in both families), in the calling
    thread's namespace."""
    attempts = RANDOM_PORT_ATTEMPTS if port == 0 else 1
    error: OSError | None = None
    for _ in range(attempts):
        s4 = s6 = None
        try:
            s4 = udp_socket(socket.AF_INET, port, fwmark)
            chosen = s4.getsockname()[1] if s4 is not None else port
            s6 = udp_socket(socket.AF_INET6, chosen, fwmark)
            if s6 is not None and s4 is None:
                chosen = s6.getsockname()[1]
            elif s4 is None:
                raise OSError(errno.EAFNOSUPPORT, "neither IPv4 nor IPv6 UDP sockets are available")
            return s4, s6, int(chosen)
        except OSError as e:
            close_all((s4, s6))
            error = e
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue  # the random IPv4 port is taken on IPv6: pick another
            raise
    assert error is not None
    raise error


def _source(endpoint: Any) -> bytes | None:
    return endpoint.source if type(endpoint) is Endpoint else None


def _pktinfo(source: bytes) -> tuple[int, int, bytes]:
    if len(source) == _IN6_PKTINFO.size:
        return (socket.IPPROTO_IPV6, _IPV6_PKTINFO, source)
    return (socket.IPPROTO_IP, _IP_PKTINFO, source)


class Conn:
    """The UDP sockets of one device (see the module docstring)."""

    def __init__(self, name: str, namespace: netlink.Namespace) -> None:
        self.name = name  # for log lines
        self._ns = namespace
        self.sock4: socket.socket | None = None
        self.sock6: socket.socket | None = None
        self.port = 0
        self.fwmark = 0
        self.generation = 0  # changes whenever the set of sockets changes (the poller re-registers)
        self._retired: list[socket.socket] = []
        self.counters = ConnCounters()
        self._rx_buffer = bytearray(_RECV_SIZE)
        self._rx_view = memoryview(self._rx_buffer)
        self._rx_buffers = [self._rx_buffer]
        self._errors_logged: set[int] = set()
        self._endpoints: dict[tuple[Any, bytes], Endpoint] = {}
        self.gso = True  # False for a while after the kernel refused UDP_SEGMENT
        self._gso_retry_at = 0.0
        self._send_wait_until = 0.0

    # ------------------------------------------------------------------ sockets

    @property
    def bound(self) -> bool:
        return self.sock4 is not None or self.sock6 is not None

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.sock4, self.sock6) if s is not None]

    def bind(self, port: int, fwmark: int) -> int:
        """Bind new sockets on ``port`` (0: random) with ``fwmark``, then retire the old ones, so a
        port in use (OSError EADDRINUSE) leaves everything as it was. Returns the port bound."""
        s4, s6, bound = self._ns.call(bind_pair, port, fwmark)
        self._retired += self.sockets()
        self.sock4, self.sock6, self.port, self.fwmark = s4, s6, bound, fwmark
        self.generation += 1
        return bound

    def set_fwmark(self, fwmark: int) -> None:
        """SO_MARK on both sockets (OSError if the kernel refuses)."""
        for sock in self.sockets():
            set_mark(sock, fwmark)
        self.fwmark = fwmark

    def take_retired(self) -> list[socket.socket]:
        """Sockets replaced by :meth:`bind`, for the caller to close once no longer polled."""
        retired, self._retired = self._retired, []
        return retired

    def close(self) -> None:
        socks = [self.sock4, self.sock6, *self._retired]
        self.sock4 = self.sock6 = None
        self._retired = []
        self.generation += 1
        close_all(socks)

    # ------------------------------------------------------------------ receive

    def receive(self, sock: socket.socket, deliver: Deliver, now: float) -> int:
        """Read one batch of datagrams from ``sock`` and ``deliver`` each. Returns how many.

        With UDP GRO on the socket, a train the sender sent with UDP GSO arrives in one read, with
        its segment size in a control message; it is cut back into its datagrams here. The source
        endpoint handed to ``deliver`` is an :class:`Endpoint` carrying the local address the
        datagram arrived at. The view is only valid during the call."""
        def cut(train: memoryview, size: int, source: Endpoint, now: float) -> None:
            if len(train) <= size:
                deliver(train, source, now)
                return
            for offset in range(0, len(train), size):
                deliver(train[offset:offset + size], source, now)

        return self.receive_trains(sock, cut, now)

    def receive_trains(self, sock: socket.socket, deliver: DeliverTrain, now: float) -> int:
        """:meth:`receive` for a caller that takes a GRO train whole: ``deliver(view, segment, source,
        now)`` once per read, ``segment`` being the datagram size (the read's length when it holds one
        datagram). Returns how many datagrams were read."""
        recv = sock.recvmsg_into
        buffers = self._rx_buffers
        view = self._rx_view
        counters = self.counters
        endpoint_of = self._endpoint
        count = 0
        try:
            for _ in range(BATCH):
                n, ancillary, _, address = recv(buffers, _ANCILLARY_SPACE)
                size = 0
                local = b""
                for level, kind, data in ancillary:
                    if level == socket.SOL_UDP:
                        if kind == _UDP_GRO and len(data) >= 4:
                            size = _GRO_INT.unpack_from(data)[0]
                    else:
                        local = data
                source = endpoint_of(address, local)
                if 0 < size < n:
                    counters.udp_rx_trains += 1
                    count += -(-n // size)
                else:
                    size = max(n, 1)
                    count += 1
                deliver(view[:n], size, source, now)
        except BlockingIOError:
            pass
        except OSError:
            counters.udp_rx_errors += 1
        counters.udp_rx += count
        return count

    def _endpoint(self, address: tuple[Any, ...], pktinfo: bytes) -> Endpoint:
        """The endpoint for a datagram from ``address`` that arrived with this packet-info data: one
        object per pair while it is remembered (the core stores it as the peer's endpoint)."""
        key = (address, pktinfo)
        endpoint = self._endpoints.get(key)
        if endpoint is not None and endpoint.source is not None:
            return endpoint
        source: bytes | None = None
        if len(pktinfo) >= _IN6_PKTINFO.size:
            local, ifindex = _IN6_PKTINFO.unpack_from(pktinfo)
            # The interface matters for link-local addresses only; elsewhere the routing picks it.
            link_local = local[0] == 0xFE and (local[1] & 0xC0) == 0x80  # fe80::/10
            source = _IN6_PKTINFO.pack(local, ifindex if link_local else 0)
        elif len(pktinfo) >= 12:
            source = bytes(4) + pktinfo[4:8] + bytes(4)  # ipi_spec_dst: the local address reached
        endpoint = Endpoint(address, source)
        if len(self._endpoints) >= _ENDPOINT_CACHE:
            self._endpoints.clear()
        self._endpoints[key] = endpoint
        return endpoint

    # ------------------------------------------------------------------ send

    def send(self, datagrams: list[Datagram]) -> int:
        """Send the core's datagrams; returns how many left. A run of equal-sized datagrams to one
        endpoint (a shorter one may end it) goes out in one ``sendmsg`` with UDP_SEGMENT: the kernel
        cuts it into the same datagrams on the wire, for one trip through the stack instead of one
        per datagram (the per-datagram ``sendto`` is most of the cost). Replies to an
        :class:`Endpoint` leave from its local address. Failures are counted and logged once per
        kind, never raised."""
        s4 = self.sock4
        s6 = self.sock6
        counters = self.counters
        sent = 0
        n = len(datagrams)
        now = time.monotonic()
        if not self.gso and n > 1 and now >= self._gso_retry_at:
            self.gso = True  # paths change (MTU, route): try again now and then
        # One budget for the whole flush: the caller holds the device lock, so a full socket buffer
        # must not stall it (and UAPI get/set) for SEND_WAIT per datagram.
        self._send_wait_until = now + SEND_WAIT
        i = 0
        while i < n:
            data, endpoint = datagrams[i]
            sock = s6 if ":" in endpoint[0] else s4
            if sock is None:
                counters.udp_tx_no_socket += 1
                i += 1
                continue
            j = i + 1
            if self.gso and j < n:
                size = len(data)
                stop = min(n, i + _GSO_MAX_SEGMENTS, i + _GSO_MAX_BYTES // max(size, 1))
                while j < stop:
                    more, where = datagrams[j]
                    if where is not endpoint and (where != endpoint or _source(where) != _source(endpoint)):
                        break
                    m = len(more)
                    if m != size:
                        if m < size:
                            j += 1  # the last segment may be shorter
                        break
                    j += 1
                if j - i > 1:
                    count = self._send_train(sock, datagrams, i, j, size, endpoint)
                    if count >= 0:
                        sent += count
                        i = j
                        continue
                    # UDP GSO refused here: _send_train turned it off; send them one by one.
            sent += self._send_one(sock, data, endpoint)
            i += 1
        counters.udp_tx += sent
        return sent

    def send_train(self, train: bytes, size: int, endpoint: Any) -> int:
        """Send datagrams laid end to end in ``train``, each ``size`` bytes but the last (shorter or
        equal), to one endpoint: UDP GSO sends of up to 64 datagrams and 65000 bytes each when allowed,
        else one by one. Returns how many left."""
        n = len(train)
        count = -(-n // size) if size > 0 else 0
        if count <= 1:
            return self.send([(train, endpoint)])
        sock = self.sock6 if ":" in endpoint[0] else self.sock4
        if sock is None:
            self.counters.udp_tx_no_socket += count
            return 0
        now = time.monotonic()
        if not self.gso and now >= self._gso_retry_at:
            self.gso = True
        view = memoryview(train)
        if self.gso:
            self._send_wait_until = now + SEND_WAIT
            step = min(_GSO_MAX_SEGMENTS, max(1, _GSO_MAX_BYTES // size)) * size
            sent = other = 0  # send() counts its own in udp_tx
            for start in range(0, n, step):
                chunk = view[start : start + step]
                k = -(-len(chunk) // size)
                if k == 1:
                    other += self.send([(chunk, endpoint)])  # type: ignore[list-item]
                    continue
                done = self._send_train(sock, [(chunk, endpoint)], 0, k, size, endpoint)  # type: ignore[list-item]
                if done < 0:  # refused: the rest one by one
                    other += self.send([(view[i : i + size], endpoint)  # type: ignore[misc]
                                        for i in range(start, n, size)])
                    break
                sent += done
            self.counters.udp_tx += sent
            return sent + other
        return self.send([(view[i : i + size], endpoint) for i in range(0, n, size)])  # type: ignore[misc]

    def _send_one(self, sock: socket.socket, data: bytes, endpoint: Any) -> int:
        """One datagram (1 if sent, 0 if dropped)."""
        for attempt in (0, 1):
            source = _source(endpoint)
            try:
                if source is None:
                    sock.sendto(data, endpoint)
                else:
                    sock.sendmsg([data], [_pktinfo(source)], 0, endpoint)
                return 1
            except BlockingIOError:
                # The socket buffer is full: wait briefly for room (as a blocking send would), once.
                if attempt:
                    break
                self._wait_writable(sock)
            except OSError as e:
                if source is not None and e.errno in _STALE_SOURCE:
                    self._forget_source(endpoint, e)
                    continue  # once more, from the address the routing picks
                self._send_failed(e, endpoint)
                return 0
        self._send_failed(BlockingIOError(errno.EAGAIN, "socket buffer full"), endpoint)
        return 0

    def _forget_source(self, endpoint: Endpoint, error: OSError) -> None:
        """The local address ``endpoint`` stuck to is gone (or no longer routes there)."""
        address = endpoint.local_address
        endpoint.source = None
        log.info(f"Device {self.name}: local address {address} no longer usable towards {endpoint[0]} "
                 f"({error.strerror or error}); replies leave from the address the routing picks")

    def _wait_writable(self, sock: socket.socket) -> None:
        """Wait for room in ``sock``'s buffer, within what is left of this flush's budget.
        ``poll``, not ``select``: select fails on descriptors >= 1024 in a process with many files."""
        left = self._send_wait_until - time.monotonic()
        if left > 0:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            poller.poll(left * 1000)

    def _send_train(self, sock: socket.socket, datagrams: list[Datagram], i: int, j: int, size: int,
                    endpoint: Any) -> int:
        """datagrams[i:j] in one UDP GSO send. Returns how many were sent (0 if dropped), or -1 when
        the kernel refuses GSO on this path (then it is off for GSO_RETRY_AFTER)."""
        buffers = [d for d, _ in datagrams[i:j]]
        segment = (socket.SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))
        waited = False
        while True:
            source = _source(endpoint)
            ancillary = [segment] if source is None else [segment, _pktinfo(source)]
            try:
                sock.sendmsg(buffers, ancillary, 0, endpoint)
                self.counters.udp_tx_trains += 1
                return j - i
            except BlockingIOError:
                if waited:
                    break
                waited = True
                self._wait_writable(sock)
            except OSError as e:
                if source is not None and e.errno in _STALE_SOURCE:
                    # EINVAL is also what a train too big for the path gets: without the source
                    # the next attempt tells which it was.
                    self._forget_source(endpoint, e)
                    continue
                if e.errno in _GSO_REFUSED:
                    self.gso = False
                    self.counters.udp_gso_refused += 1
                    self._gso_retry_at = time.monotonic() + GSO_RETRY_AFTER
                    if e.errno not in self._errors_logged:
                        self._errors_logged.add(e.errno or 0)
                        log.info(f"Device {self.name}: UDP segmentation offload refused ({e.strerror or e}); "
                                 f"sending datagrams one by one for {GSO_RETRY_AFTER:g} s")
                    return -1
                for _ in range(j - i):
                    self._send_failed(e, endpoint)
                return 0
        for _ in range(j - i):
            self._send_failed(BlockingIOError(errno.EAGAIN, "socket buffer full"), endpoint)
        return 0

    def _send_failed(self, e: OSError, endpoint: Any) -> None:
        self.counters.udp_tx_errors += 1
        code = e.errno or 0
        if code not in self._errors_logged:  # once per kind: this can happen per packet
            self._errors_logged.add(code)
            log.warn(f"Device {self.name}: sending to {endpoint[0]} port {endpoint[1]} failed: "
                     f"{e.strerror or e} (dropping; logged once)")
