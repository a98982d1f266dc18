"""The sans-I/O WireGuard core: a state machine fed datagrams, packets and time, returning what to send.

No sockets, no TUN, no clock, no threads.  Every input carries ``now`` (monotonic seconds, any
origin, never decreasing); wall time is read only for TAI64N timestamps and "last handshake" through
an injectable ``wall_clock`` (default :func:`time.time`).  One thread at a time may call it.

Driving it (what the device does)::

    wg = WireGuard(private_key)
    peer = wg.add_peer(peer_public_key)
    peer.endpoint = ("192.0.2.1", 51820)        # opaque to the core; stored and handed back
    peer.add_allowed_ip("10.0.0.2/32")
    wg.apply_config(now)                        # after a batch of configuration changes

    wg.send_packet(ip_packet, now)              # a plaintext packet read from the TUN session
    wg.receive_datagram(data, source, now)      # a UDP datagram and its source endpoint
    wg.tick(now)                                # when now >= wg.next_deadline()

    for data, endpoint in wg.datagrams: udp.sendto(data, endpoint)
    wg.datagrams.clear()
    for packet in wg.packets: session.send(packet)   # bytes, one whole IP packet
    wg.packets.clear()

Outputs accumulate in two plain lists that the caller drains (``clear()`` them, or swap them with
:meth:`WireGuard.take_datagrams` / :meth:`WireGuard.take_packets`): ``datagrams`` holds
``(bytes, endpoint)`` pairs, ``packets`` holds decrypted IP packets (``bytes``, trimmed to the IP
length field).  The batch forms :meth:`WireGuard.send_packets` and
:meth:`WireGuard.receive_datagrams` take iterables.  Inputs may be ``bytes``, ``bytearray`` or
``memoryview``; the core copies what it keeps, so receive buffers can be reused right after a call.

Peer API (used by the UAPI/config layer)::

    add_peer(public_key) -> Peer            # AlreadyExists / InvalidParameter (own key, too many)
    remove_peer(public_key) -> bool
    remove_all_peers()
    routing_table_copy() / install_routing_table(table)   # change allowed IPs off the data path
    peer(public_key) -> Peer                # NotFound if absent;  get_peer() -> Peer | None
    peers() -> list[Peer]
    set_private_key(key | None)             # re-derives static-static DH, expires sessions,
                                            # removes a peer whose key equals the new public key
    private_key, public_key                 # read-only properties (None when unset)
    keylog = callable | None                # (local static private, remote static public, local
                                            # ephemeral private, psk) per handshake message we make
    under_load = True | False | None        # None: decide from the rate of handshake messages that
                                            # passed MAC1 (under_load_threshold a second) or backlog
    handshake_backlog = n                   # device hint: handshake datagrams it has queued
    mtu = 1420                              # padding cap; 0 pads to 16 without a cap
    up(now) / down()                        # device state: down zeroes sessions, stops timers
    stats                                   # Counters: drops by reason and a few totals

    Peer.public_key                         # read-only
    Peer.preshared_key                      # 32 bytes; None or zeros clears it
    Peer.endpoint                           # opaque; updated to the source of each
                                            # authenticated datagram (roaming)
    Peer.persistent_keepalive_interval      # 0..65535 s; turning it on sends a keepalive at
                                            # the next apply_config()
    Peer.allowed_ips -> list[ip_network]    # add_allowed_ip / remove_allowed_ip /
                                            # replace_allowed_ips / clear_allowed_ips
    Peer.last_handshake -> (sec, nsec)      # wall time of the last completed handshake, (0, 0)
    Peer.rx_bytes, Peer.tx_bytes            # datagram bytes received / sent
    Peer.has_session, Peer.staged_packets   # for tests and status

The structure follows wireguard-go's device/ package: noise.py (handshake), cookie.py (MACs,
cookies, rate limiting), timers.py (the five timers), allowedips.py (cryptokey routing),
replay.py (anti-replay), and here the send/receive paths, keypair rotation and the index table.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, NamedTuple

from cryptography.exceptions import InvalidTag

from ..errors import AlreadyExists, InvalidParameter, NotFound
from . import batch, noise, tai64n
from . import keys as _keys
from . import messages as m
from .allowedips import AllowedIPs, Network, NetworkLike
from .cookie import CookieChecker, CookieGenerator, RateLimiter
from .noise import ConsumeResult, Handshake, Identity, Keypair
from .timers import (
    KEEPALIVE_TIMEOUT,
    MAX_PEERS,
    MAX_TIMER_HANDSHAKES,
    PADDING_MULTIPLE,
    QUEUE_STAGED_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES,
    ZERO_KEY_MATERIAL_TIMEOUT,
    PeerTimers,
    Timer,
)

__all__ = ["WireGuard", "Peer", "Counters", "SealJob", "OpenJob", "default_source_address"]

_HEADER_PACK = m.TRANSPORT_HEADER.pack
_HEADER_UNPACK = m.TRANSPORT_HEADER.unpack_from
_NONCE_PACK = noise.NONCE.pack
_JOIN = b"".join
_PADS = tuple(bytes(n) for n in range(PADDING_MULTIPLE))
_KEEPALIVE = b""
_NEVER = -math.inf

_T_RETRANSMIT = Timer.RETRANSMIT_HANDSHAKE.value
_T_KEEPALIVE = Timer.SEND_KEEPALIVE.value
_T_NEW_HANDSHAKE = Timer.NEW_HANDSHAKE.value
_T_ZERO = Timer.ZERO_KEY_MATERIAL.value
_T_PERSISTENT = Timer.PERSISTENT_KEEPALIVE.value


def default_source_address(endpoint: Any) -> tuple[bytes, bytes]:
    """(bytes the cookie is bound to, rate-limit key) for an endpoint.

    ``(host, port, ...)`` tuples give (packed IP + big-endian port, packed IP); bytes are used as
    they are; anything else by its ``repr``.  A device with another endpoint type passes its own
    function as ``source_address=``.
    """
    if isinstance(endpoint, tuple) and len(endpoint) >= 2 and isinstance(endpoint[0], str):
        host = endpoint[0]
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0]).packed
        except ValueError:
            ip = host.encode("utf-8", "replace")
        port = endpoint[1] if isinstance(endpoint[1], int) else 0
        # IPv6 sources are rate-limited per /64, as the kernel does: one host owns a whole /64.
        return ip + (port & 0xFFFF).to_bytes(2, "big"), (ip[:8] if len(ip) == 16 else ip)
    if isinstance(endpoint, (bytes, bytearray)):
        raw = bytes(endpoint)
        return raw, raw
    raw = repr(endpoint).encode("utf-8", "replace")
    return raw, raw


@dataclass(slots=True, eq=False)
class CounterSet:
    """A fixed set of integer counters (typed dataclass fields, slotted), all starting at zero."""

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Counters that count traffic handled, not dropped; every other rx_/tx_ counter is a drop.
_COUNTER_TOTALS = (
    "rx_data_packets",
    "rx_keepalives",
    "rx_handshakes",
    "tx_data_packets",
    "tx_keepalives",
    "tx_initiations",
    "tx_responses",
)


@dataclass(slots=True, eq=False)
class Counters(CounterSet):
    """Device-level counters.  ``rx_*`` are dropped datagrams by reason, ``tx_*`` dropped packets."""

    # incoming datagrams dropped
    rx_bad_size: int = 0  # shorter than 32 bytes, or a handshake message of the wrong length
    rx_bad_type: int = 0  # type field not 1..4 (or reserved bytes set)
    rx_bad_mac1: int = 0
    rx_cookie_sent: int = 0  # under load without a valid MAC2: answered with a cookie reply
    rx_ratelimited: int = 0
    rx_no_private_key: int = 0
    rx_bad_handshake: int = 0  # does not decrypt or authenticate
    rx_unknown_peer: int = 0  # initiation from a static key we do not know
    rx_handshake_replay: int = 0  # TAI64N timestamp not newer than the last one
    rx_handshake_flood: int = 0  # initiation less than 20 ms after the last one
    rx_unexpected_response: int = 0  # response for a handshake not waiting for one
    rx_bad_cookie_reply: int = 0
    rx_unknown_index: int = 0  # receiver index names no session or handshake
    rx_expired_keypair: int = 0  # transport on a keypair older than REJECT_AFTER_TIME
    rx_bad_tag: int = 0  # transport that does not decrypt
    rx_replay: int = 0  # counter seen before, or too old for the window
    rx_bad_ip: int = 0  # decrypted packet is not well-formed IPv4/IPv6
    rx_disallowed_source: int = 0  # inner source address not in the peer's allowed IPs
    # outgoing packets dropped
    tx_bad_packet: int = 0  # not IPv4/IPv6, or shorter than its header
    tx_no_route: int = 0  # no peer's allowed IPs cover the destination
    tx_no_endpoint: int = 0  # the peer has no endpoint yet
    tx_staged_overflow: int = 0  # oldest queued packet dropped: queue full while waiting for a session
    tx_handshake_timeout: int = 0  # queued packets dropped when the handshake gave up
    tx_flushed: int = 0  # queued packets dropped when keys were zeroed or the peer removed
    # handled, not dropped (_COUNTER_TOTALS)
    rx_data_packets: int = 0
    rx_keepalives: int = 0
    rx_handshakes: int = 0
    tx_data_packets: int = 0
    tx_keepalives: int = 0
    tx_initiations: int = 0
    tx_responses: int = 0

    def dropped(self) -> int:
        """All datagrams and packets dropped, whatever the reason (cookie replies excluded)."""
        return sum(getattr(self, name) for name in _COUNTER_DROPS)


_COUNTER_DROPS = tuple(
    f.name
    for f in fields(Counters)
    if f.name.startswith(("rx_", "tx_")) and f.name != "rx_cookie_sent" and f.name not in _COUNTER_TOTALS
)


class Peer:
    """A configured peer.  Obtain it from :meth:`WireGuard.add_peer` or :meth:`WireGuard.peer`."""

    __slots__ = (
        "_core",
        "_public_key",
        "handshake",
        "cookie_generator",
        "timers",
        "current",
        "previous",
        "next",
        "staged",
        "endpoint",
        "rx_bytes",
        "tx_bytes",
        "_last_handshake",
        "_keepalive_turned_on",
        "removed",
        "__weakref__",
    )

    def __init__(self, core: WireGuard, public_key: bytes) -> None:
        self._core = core
        self._public_key = public_key
        self.handshake = Handshake(self, public_key)
        self.cookie_generator = CookieGenerator(public_key)
        self.timers = PeerTimers(core._schedule, core._rng, self)
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque()
        self.endpoint: Any = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self._last_handshake: float | None = None
        self._keepalive_turned_on = False
        self.removed = False

    def __repr__(self) -> str:
        text = _keys.to_base64(self._public_key)
        return f"<Peer {text[:4]}…{text[39:43]}>"

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key

    @preshared_key.setter
    def preshared_key(self, value: bytes | None) -> None:
        self.handshake.preshared_key = bytes(32) if value is None else _keys.check_key(value, "preshared key")

    @property
    def persistent_keepalive_interval(self) -> int:
        return self.timers.persistent_keepalive_interval

    @persistent_keepalive_interval.setter
    def persistent_keepalive_interval(self, seconds: int) -> None:
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= 65535:
            raise InvalidParameter(f"persistent keepalive interval must be 0..65535 seconds, got {seconds!r}")
        old = self.timers.persistent_keepalive_interval
        self.timers.persistent_keepalive_interval = seconds
        if old == 0 and seconds != 0:
            self._keepalive_turned_on = True
        if seconds == 0:
            self.timers.clear(_T_PERSISTENT)

    @property
    def allowed_ips(self) -> list[Network]:
        return self._core._aips.entries_for_peer(self)

    @property
    def allowed_ip_slots(self) -> list[int]:
        """:attr:`allowed_ips` as slots (:func:`wiretun.wireguard.allowedips.prefix_slot`): cheap for many."""
        return self._core._aips.slots_for_peer(self)

    def add_allowed_ip(self, network: NetworkLike) -> Network:
        """Route ``network`` to this peer (taking it from another peer if one had it)."""
        self._check_live()
        return self._core._aips.insert(network, self)

    def remove_allowed_ip(self, network: NetworkLike) -> bool:
        """Remove exactly ``network`` if this peer has it."""
        return self._core._aips.remove(network, self)

    def clear_allowed_ips(self) -> int:
        return self._core._aips.remove_by_peer(self)

    def replace_allowed_ips(self, networks: Iterable[NetworkLike]) -> None:
        """Make ``networks`` this peer's whole list (all parsed first, so a bad one changes nothing)."""
        from .allowedips import parse_network

        parsed = [parse_network(net) for net in networks]
        self._check_live()
        self._core._aips.remove_by_peer(self)
        for net in parsed:
            self._core._aips.insert(net, self)

    @property
    def last_handshake(self) -> tuple[int, int]:
        """Wall time of the last completed handshake as (seconds, nanoseconds); (0, 0) if never."""
        when = self._last_handshake
        if when is None:
            return 0, 0
        sec = int(when)
        return sec, min(999_999_999, int(round((when - sec) * 1e9)))

    @property
    def last_handshake_time(self) -> float | None:
        return self._last_handshake

    @property
    def has_session(self) -> bool:
        """True if a current keypair exists that may still send."""
        kp = self.current
        return kp is not None and kp.send_counter < REJECT_AFTER_MESSAGES

    @property
    def staged_packets(self) -> int:
        return len(self.staged)

    def _check_live(self) -> None:
        if self.removed:
            raise NotFound(f"{self!r} was removed")


class SealJob(NamedTuple):
    """What :meth:`WireGuard.reserve_super_packet` reserved: seal with :meth:`seal` (no lock needed)."""

    key: bytes
    receiver: int
    counter: int  # the first of ``segments`` reserved counters
    segments: int
    mtu: int
    endpoint: Any
    peer: Peer

    def seal(self, header: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview) -> tuple[bytes, int]:
        """(train, datagram size) for the read this job was reserved for (:func:`batch.seal_super`)."""
        train, count, size = batch.seal_super(self.key, self.receiver, self.counter, header, packet, self.mtu)
        if count != self.segments:  # cannot happen: both come from the same checks of the same read
            raise ValueError(f"sealed {count} wire packets where {self.segments} were reserved")
        return train, size


class OpenJob(NamedTuple):
    """A run of transport messages for one keypair at ``pos`` in a read (:meth:`WireGuard.open_job`)."""

    keypair: Keypair
    receiver: int  # the keypair's local index, as the messages name it
    pos: int

    def open(self, data: memoryview, segment: int, out: memoryview, udp: bool) -> batch.OpenResult:
        """Open the run (:func:`batch.open_train`) into ``out`` at the same offset; updates the keypair's
        replay window."""
        replay = self.keypair.replay
        pos = self.pos
        r = batch.open_train(self.keypair.receive_key, self.receiver, data[pos:], segment, replay._ring, replay.last,
                             REJECT_AFTER_MESSAGES, out[pos:], udp)
        replay.last = r.last
        return r


class WireGuard:
    """The protocol core.  See the module docstring for the whole API."""

    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
        source_address: Callable[[Any], tuple[bytes, bytes]] = default_source_address,
        mtu: int = 1420,
    ) -> None:
        self._wall = wall_clock
        self._random_bytes = random_bytes
        self._rng = rng if rng is not None else random.Random()
        self._source_address = source_address
        self.mtu = mtu
        self._identity = Identity()
        self._checker = CookieChecker(None, random_bytes)
        self._ratelimiter = RateLimiter()
        self._peers: dict[bytes, Peer] = {}
        self._aips: AllowedIPs[Peer] = AllowedIPs()
        self._keypairs: dict[int, Keypair] = {}  # local index -> keypair
        self._handshakes: dict[int, Peer] = {}  # local index -> peer with a handshake in flight
        self._heap: list[tuple[float, int, PeerTimers]] = []
        self._heap_seq = 0
        self._up = True
        self.under_load: bool | None = None
        self.under_load_threshold = UNDER_LOAD_HANDSHAKES
        self.handshake_backlog = 0
        self._load_window_start = _NEVER
        self._load_count = 0
        self._under_load_until = _NEVER
        self.on_event: Callable[[str, Peer], None] | None = None
        # Called as keylog(local static private, remote static public, local ephemeral private,
        # preshared key) for each initiation or response this side makes: for a Wireshark key log.
        self.keylog: Callable[[bytes, bytes, bytes, bytes], None] | None = None
        self.stats = Counters()
        self.datagrams: list[tuple[bytes, Any]] = []
        self.packets: list[bytes] = []
        # Outputs of the offload path: (train, datagram size, endpoint) and (virtio-net header, packet).
        self.trains: list[tuple[bytes, int, Any]] = []
        self.frames: list[tuple[bytes, memoryview]] = []
        if private_key is not None:
            self.set_private_key(private_key)

    # ------------------------------------------------------------------ configuration

    @property
    def mtu(self) -> int:
        return self._mtu

    @mtu.setter
    def mtu(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= m.MAX_CONTENT_SIZE:
            raise InvalidParameter(f"mtu must be 0..{m.MAX_CONTENT_SIZE}, got {value!r}")
        self._mtu = value

    @property
    def private_key(self) -> bytes | None:
        return self._identity.private_key

    @property
    def public_key(self) -> bytes | None:
        return self._identity.public_key

    def set_private_key(self, private_key: bytes | None) -> None:
        """Set (clamped) or clear (None or all zeros) the local static key, as wireguard-go does."""
        if private_key is not None:
            private_key = _keys.check_key(private_key, "private key")
            private_key = None if _keys.is_zero(private_key) else _keys.clamp(private_key)
        old = self._identity.private_key
        if old is not None and private_key is not None and _keys.keys_equal(old, private_key):
            return
        if old is None and private_key is None:
            return
        identity = Identity(private_key)
        if identity.public_key is not None:
            for key, peer in list(self._peers.items()):
                if _keys.keys_equal(key, identity.public_key):
                    self._remove(peer)
        self._identity = identity
        self._checker.reset(identity.public_key)
        for peer in self._peers.values():
            peer.handshake.precompute(identity)
            self._expire_current_keypairs(peer)

    def routing_table_copy(self) -> AllowedIPs[Peer]:
        """A copy of the allowed-IPs table (copy-on-write, cheap) to change without holding up the
        data path, then put in place with :meth:`install_routing_table`. Nothing else may change the
        table in between (the device serialises its configuration calls)."""
        return self._aips.copy()

    def install_routing_table(self, table: AllowedIPs[Peer]) -> None:
        """Route by ``table`` from now on (see :meth:`routing_table_copy`)."""
        self._aips = table

    def add_peer(self, public_key: bytes) -> Peer:
        """Create a peer.  AlreadyExists if present; InvalidParameter for our own key or past MAX_PEERS."""
        public_key = _keys.check_key(public_key, "public key")
        if public_key in self._peers:
            raise AlreadyExists(f"peer {_keys.to_base64(public_key)} already exists")
        own = self._identity.public_key
        if own is not None and _keys.keys_equal(own, public_key):
            raise InvalidParameter("a peer cannot have the device's own public key")
        if len(self._peers) >= MAX_PEERS:
            raise InvalidParameter(f"too many peers: the limit is {MAX_PEERS}")
        peer = Peer(self, public_key)
        peer.handshake.precompute(self._identity)
        self._peers[public_key] = peer
        if self._up:
            peer.timers.start()
        return peer

    def peer(self, public_key: bytes) -> Peer:
        """The peer with this public key; NotFound if there is none."""
        peer = self._peers.get(bytes(public_key))
        if peer is None:
            raise NotFound(f"no peer with public key {bytes(public_key).hex()}")
        return peer

    def get_peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(bytes(public_key))

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def remove_peer(self, public_key: bytes) -> bool:
        """Remove a peer (its routes, sessions, queued packets).  False if it did not exist."""
        peer = self._peers.get(bytes(public_key))
        if peer is None:
            return False
        self._remove(peer)
        return True

    def remove_all_peers(self) -> None:
        for peer in list(self._peers.values()):
            self._remove(peer)

    def _remove(self, peer: Peer) -> None:
        self._aips.remove_by_peer(peer)
        peer.timers.stop()
        self._zero_and_flush(peer)
        peer.removed = True
        del self._peers[peer.public_key]

    def apply_config(self, now: float) -> None:
        """After configuration changes: send the keepalive a newly enabled persistent keepalive asks
        for, and flush packets that were waiting (wireguard-go's handlePostConfig)."""
        if not self._up:
            return
        for peer in self._peers.values():
            if peer._keepalive_turned_on:
                peer._keepalive_turned_on = False
                self._send_keepalive(peer, now)
            elif peer.staged:
                self._send_staged(peer, now)

    def up(self, now: float) -> None:
        """The device came up: peers run, and those with persistent keepalive announce themselves."""
        if self._up:
            return
        self._up = True
        for peer in self._peers.values():
            peer.timers.start()
            peer.handshake.last_sent_handshake = _NEVER
            if peer.timers.persistent_keepalive_interval > 0:
                self._send_keepalive(peer, now)

    def down(self) -> None:
        """The device went down: timers stop, every session and queued packet is dropped."""
        if not self._up:
            return
        self._up = False
        for peer in self._peers.values():
            peer.timers.stop()
            self._zero_and_flush(peer)

    @property
    def is_up(self) -> bool:
        return self._up

    # ------------------------------------------------------------------ outputs

    def take_datagrams(self) -> list[tuple[bytes, Any]]:
        """Return the pending datagrams and start a new list."""
        out = self.datagrams
        self.datagrams = []
        return out

    def take_trains(self) -> list[tuple[bytes, int, Any]]:
        """Return the pending trains (:meth:`send_super_packet`) and start a new list."""
        out = self.trains
        self.trains = []
        return out

    def take_frames(self) -> list[tuple[bytes, memoryview]]:
        """Return the pending frames (:meth:`receive_train`) and start a new list."""
        out = self.frames
        self.frames = []
        return out

    def take_packets(self) -> list[bytes]:
        """Return the pending decrypted packets and start a new list."""
        out = self.packets
        self.packets = []
        return out

    # ------------------------------------------------------------------ timers

    def _schedule(self, timers: PeerTimers, deadline: float) -> None:
        self._heap_seq += 1
        timers.wake = deadline
        timers.wake_seq = self._heap_seq
        heapq.heappush(self._heap, (deadline, self._heap_seq, timers))

    def next_deadline(self) -> float | None:
        """The monotonic time at which :meth:`tick` has work to do, or None."""
        heap = self._heap
        while heap:
            deadline, seq, timers = heap[0]
            if timers.wake_seq != seq or not timers.active:
                heapq.heappop(heap)  # superseded by an earlier entry, or the peer stopped
                continue
            # Timers may have been cleared or pushed later since this entry was made (every
            # pending deadline is >= the entry's): re-file it at the real earliest one.
            actual = timers.next_deadline()
            if actual is None:
                heapq.heappop(heap)
                timers.wake = None
                continue
            if actual > deadline:
                heapq.heappop(heap)
                self._schedule(timers, actual)
                continue
            return deadline
        return None

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, timers = heapq.heappop(heap)
            if timers.wake_seq != seq or not timers.active:
                continue
            timers.wake = None
            peer: Peer = timers.owner  # type: ignore[assignment]
            while timers.active:
                which = timers.pop_expired(now)
                if which < 0:
                    break
                self._expired(peer, which, now)
            # A handler may have armed a timer later than one left pending from before; make
            # sure the heap holds the earliest of all.
            if timers.active:
                deadline = timers.next_deadline()
                if deadline is not None and (timers.wake is None or deadline < timers.wake):
                    self._schedule(timers, deadline)

    def _expired(self, peer: Peer, which: int, now: float) -> None:
        timers = peer.timers
        if which == _T_RETRANSMIT:
            if timers.handshake_attempts > MAX_TIMER_HANDSHAKES:
                # Give up: drop what waited for this session, and erase leftovers later.
                timers.clear(_T_KEEPALIVE)
                self.stats.tx_handshake_timeout += len(peer.staged)
                peer.staged.clear()
                if not timers.pending(_T_ZERO):
                    timers.set(_T_ZERO, now + ZERO_KEY_MATERIAL_TIMEOUT)
                self._event("handshake_gave_up", peer)
            else:
                timers.handshake_attempts += 1
                self._send_handshake_initiation(peer, True, now)
        elif which == _T_KEEPALIVE:
            self._send_keepalive(peer, now)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.set(_T_KEEPALIVE, now + KEEPALIVE_TIMEOUT)
        elif which == _T_NEW_HANDSHAKE:
            self._send_handshake_initiation(peer, False, now)
        elif which == _T_ZERO:
            self._zero_and_flush(peer)
            self._event("keys_zeroed", peer)
        elif which == _T_PERSISTENT:
            if timers.persistent_keepalive_interval > 0:
                self._send_keepalive(peer, now)

    def _event(self, name: str, peer: Peer) -> None:
        hook = self.on_event
        if hook is not None:
            hook(name, peer)

    # ------------------------------------------------------------------ index table

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random_bytes(4), "little")
            if index and index not in self._keypairs and index not in self._handshakes:
                return index

    def _free_handshake_index(self, peer: Peer) -> None:
        index = peer.handshake.local_index
        if index and self._handshakes.get(index) is peer:
            del self._handshakes[index]

    def _delete_keypair(self, kp: Keypair | None) -> None:
        if kp is not None and self._keypairs.get(kp.local_index) is kp:
            del self._keypairs[kp.local_index]

    def _zero_and_flush(self, peer: Peer) -> None:
        self._delete_keypair(peer.previous)
        self._delete_keypair(peer.current)
        self._delete_keypair(peer.next)
        peer.previous = peer.current = peer.next = None
        self._free_handshake_index(peer)
        peer.handshake.clear()
        self.stats.tx_flushed += len(peer.staged)
        peer.staged.clear()

    def _expire_current_keypairs(self, peer: Peer) -> None:
        self._free_handshake_index(peer)
        peer.handshake.clear()
        peer.handshake.last_sent_handshake = _NEVER
        if peer.current is not None:
            peer.current.send_counter = REJECT_AFTER_MESSAGES
        if peer.next is not None:
            peer.next.send_counter = REJECT_AFTER_MESSAGES

    def _install_keypair(self, peer: Peer, kp: Keypair) -> None:
        """Put a fresh keypair in place (BeginSymmetricSession's rotation)."""
        self._handshakes.pop(kp.local_index, None)
        self._keypairs[kp.local_index] = kp
        previous, current, nxt = peer.previous, peer.current, peer.next
        if kp.is_initiator:
            if nxt is not None:
                peer.next = None
                peer.previous = nxt
                self._delete_keypair(current)
            else:
                peer.previous = current
            self._delete_keypair(previous)
            peer.current = kp
        else:
            # The responder may not send with it until the initiator proves it has it too.
            peer.next = kp
            self._delete_keypair(nxt)
            peer.previous = None
            self._delete_keypair(previous)

    # ------------------------------------------------------------------ sending

    def send_packets(self, packets: Iterable[bytes | bytearray | memoryview], now: float) -> None:
        """:meth:`send_packet` for each packet."""
        send = self.send_packet
        for packet in packets:
            send(packet, now)

    def send_packet(self, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Route a plaintext IP packet by destination and encrypt it (or queue it for a handshake)."""
        n = len(packet)
        if n == 0:
            self.stats.tx_bad_packet += 1
            return
        version = packet[0] >> 4
        if version == 4:
            if n < 20:
                self.stats.tx_bad_packet += 1
                return
            peer = self._aips.lookup4(packet[16:20])
        elif version == 6:
            if n < 40:
                self.stats.tx_bad_packet += 1
                return
            peer = self._aips.lookup6(packet[24:40])
        else:
            self.stats.tx_bad_packet += 1
            return
        if peer is None:
            self.stats.tx_no_route += 1
            return
        kp = peer.current
        if (
            kp is not None
            and not peer.staged
            and kp.send_counter < REJECT_AFTER_MESSAGES
            and now - kp.created < REJECT_AFTER_TIME
            and self._up
        ):
            self._encrypt_send(peer, kp, packet, now)
            return
        self._stage(peer, packet)
        self._send_staged(peer, now)

    def send_super_packet(self, header: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview,
                          now: float) -> None:
        """Route one read of an offload session (``header``: its 10-byte virtio-net header; ``packet``: an IP
        packet, possibly a TCP/UDP super-packet) and seal all of its wire packets in one batch, as one
        entry of :attr:`trains`: ``(train, datagram size, endpoint)``, datagrams end to end, all of that
        size but the last (a UDP GSO send). Without a usable session its wire packets take
        :meth:`send_packet`'s way (queued for the handshake). A header that does not fit the packet is
        counted in ``tx_bad_packet``. This is :meth:`reserve_super_packet` and :meth:`SealJob.seal`."""
        job = self.reserve_super_packet(header, packet, now)
        if job is not None:
            train, size = job.seal(header, packet)
            self.trains.append((train, size, job.endpoint))
            job.peer.tx_bytes += len(train)

    def reserve_super_packet(self, header: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview,
                             now: float) -> SealJob | None:
        """The state half of :meth:`send_super_packet`: route, take the counters the packet's wire packets
        will use and run the timer hooks. The caller seals with :meth:`SealJob.seal`, which needs no
        lock (another thread may do it, in the order of the reservations for each peer), sends the
        train to ``job.endpoint`` and adds its length to ``job.peer.tx_bytes`` later, with the core's
        lock. None when there is nothing to seal (dropped, counted, or queued for a handshake)."""
        n = len(packet)
        if n == 0:
            self.stats.tx_bad_packet += 1
            return None
        version = packet[0] >> 4
        if version == 4 and n >= 20:
            peer = self._aips.lookup4(packet[16:20])
        elif version == 6 and n >= 40:
            peer = self._aips.lookup6(packet[24:40])
        else:
            self.stats.tx_bad_packet += 1
            return None
        if peer is None:
            self.stats.tx_no_route += 1
            return None
        try:
            count = batch.segment_count(header, packet)
        except ValueError:
            self.stats.tx_bad_packet += 1
            return None
        kp = peer.current
        if (
            kp is None
            or peer.staged
            or kp.send_counter + count >= REJECT_AFTER_MESSAGES
            or now - kp.created >= REJECT_AFTER_TIME
            or not self._up
        ):
            for one in batch.split_packets(header, packet):
                self.send_packet(one, now)
            return None
        counter = kp.send_counter
        kp.send_counter = counter + count
        timers = peer.timers
        interval = timers.persistent_keepalive_interval
        if interval and timers.active:
            timers.set(_T_PERSISTENT, now + interval)
        timers.deadlines[_T_KEEPALIVE] = None
        self.stats.tx_data_packets += count
        if timers.deadlines[_T_NEW_HANDSHAKE] is None:
            timers.data_sent(now)
        endpoint = peer.endpoint
        if counter + count > REKEY_AFTER_MESSAGES or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self._send_handshake_initiation(peer, False, now)
        if endpoint is None:
            self.stats.tx_no_endpoint += count
            return None
        return SealJob(kp.send_key, kp.remote_index, counter, count, self._mtu, endpoint, peer)

    def _stage(self, peer: Peer, packet: bytes | bytearray | memoryview) -> None:
        staged = peer.staged
        if len(staged) >= QUEUE_STAGED_SIZE:
            staged.popleft()
            self.stats.tx_staged_overflow += 1
        staged.append(bytes(packet))

    def _send_staged(self, peer: Peer, now: float) -> None:
        staged = peer.staged
        if not staged or not self._up:
            return
        kp = peer.current
        if kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES or now - kp.created >= REJECT_AFTER_TIME:
            self._send_handshake_initiation(peer, False, now)
            return
        while staged:
            packet = staged.popleft()
            if not self._encrypt_send(peer, kp, packet, now):
                staged.appendleft(packet)
                self._send_handshake_initiation(peer, False, now)
                return

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(_KEEPALIVE)
        self._send_staged(peer, now)

    def _encrypt_send(self, peer: Peer, kp: Keypair, packet: bytes | bytearray | memoryview, now: float) -> bool:
        counter = kp.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        kp.send_counter = counter + 1
        n = len(packet)
        # Pad to a multiple of 16, but never past the MTU (wireguard-go's calculatePaddingSize).
        mtu = self._mtu
        if mtu == 0:
            pad = -n & 15
        else:
            last = n % mtu if n > mtu else n
            padded = (last + 15) & ~15
            if padded > mtu:
                padded = mtu
            pad = padded - last
        plaintext = _JOIN((packet, _PADS[pad])) if pad else packet
        datagram = _HEADER_PACK(4, kp.remote_index, counter) + kp.send.encrypt(_NONCE_PACK(counter), plaintext, None)
        # The timer hooks (traversal, any-sent, data-sent), inlined: this runs for every packet.
        timers = peer.timers
        deadlines = timers.deadlines
        interval = timers.persistent_keepalive_interval
        if interval and timers.active:
            timers.set(_T_PERSISTENT, now + interval)
        deadlines[_T_KEEPALIVE] = None
        endpoint = peer.endpoint
        if n:
            self.stats.tx_data_packets += 1
            if deadlines[_T_NEW_HANDSHAKE] is None:
                timers.data_sent(now)
        else:
            self.stats.tx_keepalives += 1
        if endpoint is None:
            self.stats.tx_no_endpoint += 1
            return True
        self.datagrams.append((datagram, endpoint))
        peer.tx_bytes += len(datagram)
        # keepKeyFreshSending: the initiator rekeys after REKEY_AFTER_TIME, anyone after many messages.
        if counter + 1 > REKEY_AFTER_MESSAGES or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self._send_handshake_initiation(peer, False, now)
        return True

    def _send_handshake_initiation(self, peer: Peer, is_retry: bool, now: float) -> None:
        timers = peer.timers
        if not is_retry:
            timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_handshake < REKEY_TIMEOUT:
            return
        hs.last_sent_handshake = now
        if self._identity.private_object is None or hs.static_static is None:
            return
        self._free_handshake_index(peer)
        index = self._new_index()
        msg = noise.create_initiation(self._identity, hs, index, tai64n.stamp(self._wall()))
        if msg is None:
            return
        self._handshakes[index] = peer
        if self.keylog is not None:
            self._log_keys(peer)
        peer.cookie_generator.add_macs(msg, now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent()
        self.stats.tx_initiations += 1
        self._send(peer, bytes(msg))
        timers.handshake_initiated(now)

    def _send_handshake_response(self, peer: Peer, now: float) -> None:
        hs = peer.handshake
        hs.last_sent_handshake = now
        self._free_handshake_index(peer)
        index = self._new_index()
        msg = noise.create_response(hs, index)
        if msg is None:
            self.stats.rx_bad_handshake += 1
            return
        self._handshakes[index] = peer
        if self.keylog is not None:
            self._log_keys(peer)
        peer.cookie_generator.add_macs(msg, now)
        kp = noise.derive_keypair(hs, now)
        if kp is None:  # cannot happen after a created response; keep the table clean anyway
            self._handshakes.pop(index, None)
            return
        self._install_keypair(peer, kp)
        timers = peer.timers
        timers.session_derived(now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent()
        self.stats.tx_responses += 1
        self._send(peer, bytes(msg))

    def _log_keys(self, peer: Peer) -> None:
        hook = self.keylog
        ephemeral = peer.handshake.local_ephemeral
        private = self._identity.private_key
        if hook is None or ephemeral is None or private is None:
            return
        hook(private, peer.public_key, ephemeral.private_bytes_raw(), peer.handshake.preshared_key)

    def _send(self, peer: Peer, datagram: bytes) -> None:
        endpoint = peer.endpoint
        if endpoint is None:
            self.stats.tx_no_endpoint += 1
            return
        self.datagrams.append((datagram, endpoint))
        peer.tx_bytes += len(datagram)

    # ------------------------------------------------------------------ receiving

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes | bytearray | memoryview, Any]], now: float) -> None:
        """:meth:`receive_datagram` for each ``(data, source)`` pair."""
        receive = self.receive_datagram
        for data, source in datagrams:
            receive(data, source, now)

    def receive_datagram(self, data: bytes | bytearray | memoryview, source: Any, now: float) -> None:
        """Process one UDP datagram that arrived from ``source`` (an opaque endpoint)."""
        n = len(data)
        if n < m.MIN_MESSAGE_SIZE:
            self.stats.rx_bad_size += 1
            return
        mtype, index, counter = _HEADER_UNPACK(data, 0)
        if mtype == 4:
            kp = self._keypairs.get(index)
            if kp is None:
                self.stats.rx_unknown_index += 1
                return
            if now - kp.created > REJECT_AFTER_TIME:
                self.stats.rx_expired_keypair += 1
                return
            try:
                plaintext = kp.receive.decrypt(_NONCE_PACK(counter), data[16:], None)
            except InvalidTag:
                self.stats.rx_bad_tag += 1
                return
            if not kp.replay.validate(counter, REJECT_AFTER_MESSAGES):
                self.stats.rx_replay += 1
                return
            self._transport_received(kp, plaintext, source, now)
            return
        if mtype == 1:
            if n != m.INITIATION_SIZE:
                self.stats.rx_bad_size += 1
                return
        elif mtype == 2:
            if n != m.RESPONSE_SIZE:
                self.stats.rx_bad_size += 1
                return
        elif mtype == 3:
            if n != m.COOKIE_REPLY_SIZE:
                self.stats.rx_bad_size += 1
                return
            self._cookie_reply_received(data, index, now)
            return
        else:
            self.stats.rx_bad_type += 1
            return
        self._handshake_received(data, mtype, source, now)

    def receive_train(self, data: memoryview, segment: int, source: Any, now: float, out: memoryview,
                      udp: bool = False) -> None:
        """Process one UDP read that may hold a GRO train: datagrams of ``segment`` bytes (the last may be
        shorter) from ``source``. Transport messages are opened in batches into ``out`` (at least
        ``len(data)`` bytes) and their packets coalesced into super-packets (TCP; UDP too with ``udp``)
        appended to :attr:`frames` as ``(virtio-net header, view of out)``: write them before ``out`` is
        used again. Other messages take :meth:`receive_datagram`'s way (packets in :attr:`packets`).
        This is :meth:`open_job`, :meth:`OpenJob.open` and :meth:`opened` in a loop."""
        pos = 0
        while True:
            job, pos = self.open_job(data, pos, segment, source, now)
            if job is None:
                return
            pos = self.opened(job, job.open(data, segment, out, udp), data, segment, source, now, out)

    def open_job(self, data: memoryview, pos: int, segment: int, source: Any,
                 now: float) -> tuple[OpenJob | None, int]:
        """From ``pos`` on in a read of :meth:`receive_train`: datagrams that are not transport messages for
        a live keypair go :meth:`receive_datagram`'s way; at the first that is, ``(job, pos)`` to open
        with :meth:`OpenJob.open` (no lock needed: only the thread that receives opens, and a keypair's
        replay window is touched by nothing else) and then hand to :meth:`opened`. ``(None, end)`` when
        the read is done."""
        n = len(data)
        if n == 0 and pos == 0:
            self.receive_datagram(data, source, now)  # counted as too short
            return None, 0
        keypairs = self._keypairs
        while pos < n:
            length = min(segment, n - pos)
            if length >= m.MIN_MESSAGE_SIZE and data[pos] == 4:
                index = int.from_bytes(data[pos + 4 : pos + 8], "little")
                kp = keypairs.get(index)
                if kp is not None and now - kp.created <= REJECT_AFTER_TIME:
                    return OpenJob(kp, index, pos), pos
            self.receive_datagram(data[pos : pos + length], source, now)  # counts why it is dropped
            pos += length
        return None, pos

    def opened(self, job: OpenJob, r: batch.OpenResult, data: memoryview, segment: int, source: Any, now: float,
               out: memoryview) -> int:
        """Account for what :meth:`OpenJob.open` did (counters, roaming, timers, the inner-source check) and
        queue its frames; returns where the read goes on."""
        pos = job.pos
        n = len(data)
        if not r.consumed:  # reserved bytes set: the single path says why
            length = min(segment, n - pos)
            self.receive_datagram(data[pos : pos + length], source, now)
            return pos + length
        end = min(n, pos + r.consumed * segment)
        stats = self.stats
        kp = job.keypair
        if self._keypairs.get(job.receiver) is not kp:  # removed while it was being opened
            stats.rx_unknown_index += r.consumed
            return end
        stats.rx_bad_tag += r.bad_tag
        stats.rx_replay += r.replay
        stats.rx_bad_ip += r.bad_ip
        stats.rx_keepalives += r.keepalives
        if r.nbytes:
            peer = self._transport_authenticated(kp, source, now, r.nbytes, r.ok + r.bad_ip > 0)
            aips = self._aips
            delivered = r.ok
            for header, start, stop in r.frames:
                start += pos
                stop += pos
                if out[start] >> 4 == 4:
                    allowed = aips.lookup4(out[start + 12 : start + 16]) is peer
                else:
                    allowed = aips.lookup6(out[start + 8 : start + 24]) is peer
                if not allowed:
                    lost = batch.frame_packets(header, stop - start)
                    stats.rx_disallowed_source += lost
                    delivered -= lost
                    continue
                self.frames.append((header, out[start:stop]))
            stats.rx_data_packets += delivered
        return end

    def _transport_received(self, kp: Keypair, plaintext: bytes, source: Any, now: float) -> None:
        n = len(plaintext)
        peer = self._transport_authenticated(kp, source, now, n + m.KEEPALIVE_SIZE, n != 0)
        if n == 0:
            self.stats.rx_keepalives += 1
            return
        version = plaintext[0] >> 4
        if version == 4:
            if n < 20:
                self.stats.rx_bad_ip += 1
                return
            length = (plaintext[2] << 8) | plaintext[3]
            if length > n or length < 20:
                self.stats.rx_bad_ip += 1
                return
            if self._aips.lookup4(plaintext[12:16]) is not peer:
                self.stats.rx_disallowed_source += 1
                return
        elif version == 6:
            if n < 40:
                self.stats.rx_bad_ip += 1
                return
            length = ((plaintext[4] << 8) | plaintext[5]) + 40
            if length > n:
                self.stats.rx_bad_ip += 1
                return
            if self._aips.lookup6(plaintext[8:24]) is not peer:
                self.stats.rx_disallowed_source += 1
                return
        else:
            self.stats.rx_bad_ip += 1
            return
        self.stats.rx_data_packets += 1
        self.packets.append(plaintext if length == n else plaintext[:length])

    def _transport_authenticated(self, kp: Keypair, source: Any, now: float, size: int, data: bool) -> Peer:
        """What authenticated, fresh transport messages on ``kp`` do (``size`` datagram bytes in all; ``data``
        if any carried a packet): keypair confirmation, roaming, rekey-on-receive and the timer hooks."""
        peer: Peer = kp.peer
        timers = peer.timers
        if kp is peer.next:
            # First packet on the responder's new keypair: the initiator has it, so start using it.
            old = peer.previous
            peer.previous = peer.current
            self._delete_keypair(old)
            peer.current = kp
            peer.next = None
            peer.endpoint = source
            timers.handshake_complete()
            peer._last_handshake = self._wall()
            self._event("handshake_complete", peer)
            self._send_staged(peer, now)
        peer.rx_bytes += size
        peer.endpoint = source
        # keepKeyFreshReceiving: an initiator whose session nears REJECT_AFTER_TIME rekeys once.
        if not timers.sent_last_minute_handshake:
            current = peer.current
            if current is not None and current.is_initiator and now - current.created > REKEY_ON_RECEIVE_AGE:
                timers.sent_last_minute_handshake = True
                self._send_handshake_initiation(peer, False, now)
        # The timer hooks (traversal, any-received, data-received), inlined for the per-packet path.
        deadlines = timers.deadlines
        interval = timers.persistent_keepalive_interval
        if interval and timers.active:
            timers.set(_T_PERSISTENT, now + interval)
        deadlines[_T_NEW_HANDSHAKE] = None
        if data:
            if deadlines[_T_KEEPALIVE] is None:
                timers.data_received(now)
            else:
                timers.need_another_keepalive = True
        return peer

    def _is_under_load(self, now: float) -> bool:
        forced = self.under_load
        if forced is not None:
            return forced
        if self._load_count >= self.under_load_threshold or self.handshake_backlog >= self.under_load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME
            return True
        return now < self._under_load_until

    def _handshake_received(self, data: bytes | bytearray | memoryview, mtype: int, source: Any, now: float) -> None:
        if not self._checker.check_mac1(data):
            self.stats.rx_bad_mac1 += 1
            return
        # Load is the rate of handshakes that passed MAC1 (only a sender who knows our public key can
        # make one): junk that fails MAC1 costs one BLAKE2s and must not put real peers through cookies.
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._is_under_load(now):
            cookie_source, limit_key = self._source_address(source)
            if not self._checker.check_mac2(data, cookie_source, now):
                sender = int.from_bytes(bytes(data[4:8]), "little")
                self.datagrams.append((self._checker.create_reply(data, sender, cookie_source, now), source))
                self.stats.rx_cookie_sent += 1
                return
            if not self._ratelimiter.allow(limit_key, now):
                self.stats.rx_ratelimited += 1
                return
        if mtype == 1:
            result, hs = noise.consume_initiation(self._identity, data, self._lookup_static, now)
            if result is not ConsumeResult.OK or hs is None:
                self._count_failure(result)
                return
            peer: Peer = hs.owner
            timers = peer.timers
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_received()
            peer.endpoint = source
            peer.rx_bytes += m.INITIATION_SIZE
            self.stats.rx_handshakes += 1
            self._send_handshake_response(peer, now)
        else:
            result, hs = noise.consume_response(self._identity, data, self._lookup_handshake)
            if result is not ConsumeResult.OK or hs is None:
                self._count_failure(result)
                return
            peer = hs.owner
            peer.endpoint = source
            peer.rx_bytes += m.RESPONSE_SIZE
            self.stats.rx_handshakes += 1
            timers = peer.timers
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_received()
            kp = noise.derive_keypair(hs, now)
            if kp is None:
                return
            self._install_keypair(peer, kp)
            timers.session_derived(now)
            timers.handshake_complete()
            peer._last_handshake = self._wall()
            self._event("handshake_complete", peer)
            self._send_keepalive(peer, now)

    def _count_failure(self, result: ConsumeResult) -> None:
        stats = self.stats
        if result is ConsumeResult.UNKNOWN_PEER:
            stats.rx_unknown_peer += 1
        elif result is ConsumeResult.REPLAY:
            stats.rx_handshake_replay += 1
        elif result is ConsumeResult.FLOOD:
            stats.rx_handshake_flood += 1
        elif result is ConsumeResult.NO_IDENTITY:
            stats.rx_no_private_key += 1
        elif result is ConsumeResult.WRONG_STATE:
            stats.rx_unexpected_response += 1
        else:
            stats.rx_bad_handshake += 1

    def _lookup_static(self, static: bytes) -> Handshake | None:
        peer = self._peers.get(static)
        if peer is None or not self._up:
            return None
        return peer.handshake

    def _lookup_handshake(self, index: int) -> Handshake | None:
        peer = self._handshakes.get(index)
        return None if peer is None else peer.handshake

    def _cookie_reply_received(self, data: bytes | bytearray | memoryview, receiver: int, now: float) -> None:
        peer = self._handshakes.get(receiver)
        if peer is None:
            kp = self._keypairs.get(receiver)
            peer = None if kp is None else kp.peer
        if peer is None:
            self.stats.rx_unknown_index += 1
            return
        if not peer.cookie_generator.consume_reply(data, now):
            self.stats.rx_bad_cookie_reply += 1
