"""Allowed IPs: longest-prefix match from an IPv4/IPv6 address to the peer that owns it.

This is cryptokey routing: on send, the destination address picks the peer; on receive, the source
address must map back to the peer the packet came from.

The structure is a prefix table per address family: one dict per prefix length, keyed by the
address shifted down to that length, probed from the longest length present to the shortest.  It
answers exactly what wireguard-go's bit trie answers (an insert of a prefix that exists moves it to
the new peer; host bits are masked off; removal only removes what the given peer owns), and costs
one dict probe per distinct prefix length instead of one Python step per bit, which is what matters
in Python on the per-packet path.  In front of it, a bounded cache maps exact addresses seen
recently to their answer (cleared on every change), so a flow's packets cost one dict probe.

A prefix is one integer, its *slot* (:func:`prefix_slot`): the address shifted down to the prefix
length, the length and the family. Large configurations are applied as slots (:meth:`AllowedIPs.apply`)
without an ``ip_network`` per prefix, and a configuration change is built on a :meth:`AllowedIPs.copy`
(copy-on-write: only the tables it changes are copied) that then replaces the table in use at once.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Generic, Hashable, Iterable, Iterator, TypeVar

from ..errors import InvalidParameter

P = TypeVar("P", bound=Hashable)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NetworkLike = str | Network | tuple[Any, int]  # (address as text, bytes or ip_address; prefix length)

_FAMILY_BITS = {4: 32, 6: 128}
_V6 = 1  # slot bit 0: the family; bits 1..8: the prefix length; the rest: the address >> (bits - length)
CACHE_SIZE = 4096  # exact addresses remembered per family; the cache is emptied when full
_MISS = object()  # cached "no peer"


def parse_network(value: NetworkLike) -> Network:
    """Normalise ``"10.0.0.1/24"``, an ``ip_network`` or ``(address, cidr)`` to a network (host bits cleared)."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    try:
        if isinstance(value, tuple) and len(value) == 2:
            addr, cidr = value
            if isinstance(addr, (bytes, bytearray, memoryview)):
                addr = ipaddress.ip_address(bytes(addr))
            return ipaddress.ip_network((addr, cidr), strict=False)
        if isinstance(value, str):
            return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise InvalidParameter(f"allowed IP {value!r} is not an IPv4/IPv6 prefix: {exc}") from None
    raise InvalidParameter(f"allowed IP must be a prefix string, ip_network or (address, cidr), not {value!r}")


def prefix_slot(version: int, length: int, address: int) -> int:
    """The slot of ``address/length`` (``address`` an int; host bits are ignored)."""
    bits = 32 if version == 4 else 128
    return ((address >> (bits - length)) << 9) | (length << 1) | (version == 6)


def network_slot(network: Network) -> int:
    return prefix_slot(network.version, network.prefixlen, int(network.network_address))


def slot_network(slot: int) -> Network:
    """The ``ip_network`` a slot stands for."""
    length = (slot >> 1) & 0xFF
    if slot & _V6:
        return ipaddress.IPv6Network(((slot >> 9) << (128 - length), length))
    return ipaddress.IPv4Network(((slot >> 9) << (32 - length), length))


class _Family(Generic[P]):
    __slots__ = ("bits", "tables", "levels")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, P]] = {}  # prefix length -> {address >> (bits - length): peer}
        self.levels: tuple[tuple[int, dict[int, P]], ...] = ()  # (shift, table), longest prefix first

    def relevel(self) -> None:
        self.levels = tuple(
            (self.bits - length, self.tables[length]) for length in sorted(self.tables, reverse=True)
        )


def _resolve(fam: _Family[P], cache: dict[bytes, object], address: bytes) -> object:
    """Cache miss: probe ``fam`` longest prefix first and remember the answer (``_MISS`` for none)."""
    peer: object = _MISS
    value = int.from_bytes(address, "big")
    for shift, table in fam.levels:
        found = table.get(value >> shift)
        if found is not None:
            peer = found
            break
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    cache[address] = peer
    return peer


class AllowedIPs(Generic[P]):
    """Longest-prefix-match table from addresses to peers (any hashable object)."""

    __slots__ = ("_v4", "_v6", "_by_peer", "_cache4", "_cache6", "_owned")

    def __init__(self) -> None:
        self._v4: _Family[P] = _Family(32)
        self._v6: _Family[P] = _Family(128)
        self._cache4: dict[bytes, object] = {}
        self._cache6: dict[bytes, object] = {}
        # peer -> {slot: None}, kept in insertion order for listing.
        self._by_peer: dict[P, dict[int, None]] = {}
        # The inner dicts this table may change in place (id -> dict, which also keeps the id
        # taken); the others are shared with a copy and are copied before their first change.
        self._owned: dict[int, dict[Any, Any]] = {}

    def copy(self) -> AllowedIPs[P]:
        """An independent table with the same contents, cheap to make: the per-length tables and
        per-peer lists are shared until one side changes them. Lookups on either side are unaffected."""
        other: AllowedIPs[P] = AllowedIPs()
        for mine, theirs in ((self._v4, other._v4), (self._v6, other._v6)):
            theirs.tables = dict(mine.tables)
            theirs.relevel()
        other._by_peer = dict(self._by_peer)
        self._owned = {}  # everything is shared now: this side copies before changing too
        return other

    def _own(self, table: dict[Any, Any]) -> dict[Any, Any]:
        self._owned[id(table)] = table
        return table

    def _table_for_change(self, fam: _Family[P], length: int) -> dict[int, P]:
        table = fam.tables.get(length)
        if table is None:
            table = fam.tables[length] = self._own({})
            fam.relevel()
        elif id(table) not in self._owned:
            table = fam.tables[length] = self._own(dict(table))
            fam.relevel()
        return table

    def _owned_for_change(self, peer: P) -> dict[int, None]:
        owned = self._by_peer.get(peer)
        if owned is None:
            owned = self._by_peer[peer] = self._own({})
        elif id(owned) not in self._owned:
            owned = self._by_peer[peer] = self._own(dict(owned))
        return owned

    def _family(self, version: int) -> _Family[P]:
        return self._v4 if version == 4 else self._v6

    def insert(self, network: NetworkLike, peer: P) -> Network:
        """Route ``network`` to ``peer`` (taking it from whichever peer had it). Returns the normalised prefix."""
        if peer is None:
            raise InvalidParameter("allowed IP owner must not be None")
        net = parse_network(network)
        self._insert(network_slot(net), peer)
        self._cache4.clear()
        self._cache6.clear()
        return net

    def _insert(self, slot: int, peer: P) -> None:
        fam = self._v6 if slot & _V6 else self._v4
        length = (slot >> 1) & 0xFF
        key = slot >> 9
        table = fam.tables.get(length)
        if table is None or id(table) not in self._owned:
            table = self._table_for_change(fam, length)
        old = table.get(key)
        if old is not None and old is not peer:
            owned = self._by_peer.get(old)
            if owned is not None:
                if id(owned) not in self._owned:
                    owned = self._owned_for_change(old)
                owned.pop(slot, None)
                if not owned:
                    del self._by_peer[old]
        table[key] = peer
        owned = self._by_peer.get(peer)
        if owned is None or id(owned) not in self._owned:
            owned = self._owned_for_change(peer)
        owned[slot] = None

    def _remove(self, slot: int, peer: P) -> bool:
        fam = self._v6 if slot & _V6 else self._v4
        length = (slot >> 1) & 0xFF
        key = slot >> 9
        table = fam.tables.get(length)
        if table is None or table.get(key) is not peer:
            return False
        self._drop(slot)
        owned = self._owned_for_change(peer)
        del owned[slot]
        if not owned:
            del self._by_peer[peer]
        return True

    def apply(self, peer: P, changes: Iterable[int]) -> None:
        """Insert or remove prefixes of ``peer`` in order: each change is ``slot << 1 | remove``
        (:func:`prefix_slot`). The fast path for large configurations: :meth:`_insert` inlined, with
        the tables it writes to looked up once."""
        if peer is None:
            raise InvalidParameter("allowed IP owner must not be None")
        by_peer = self._by_peer
        tables: dict[int, dict[int, P]] = {}  # slot & 0x1FF (family, length) -> a table we own
        mine: dict[int, None] | None = None
        for change in changes:
            slot = change >> 1
            if change & 1:
                self._remove(slot, peer)
                tables.clear()  # a table or our list may have gone
                mine = None
                continue
            head = slot & 0x1FF
            table = tables.get(head)
            if table is None:
                table = tables[head] = self._table_for_change(self._v6 if head & 1 else self._v4, head >> 1)
            key = slot >> 9
            old = table.get(key)
            if old is not peer:
                if old is not None:
                    owned = self._owned_for_change(old)
                    owned.pop(slot, None)
                    if not owned:
                        del by_peer[old]
                table[key] = peer
            if mine is None:
                mine = self._owned_for_change(peer)
            mine[slot] = None
        self._cache4.clear()
        self._cache6.clear()

    def _drop(self, slot: int) -> None:
        self._cache4.clear()
        self._cache6.clear()
        fam = self._v6 if slot & _V6 else self._v4
        length = (slot >> 1) & 0xFF
        table = self._table_for_change(fam, length)
        del table[slot >> 9]
        if not table:
            del fam.tables[length]
            fam.relevel()

    def remove(self, network: NetworkLike, peer: P) -> bool:
        """Remove ``network`` if ``peer`` owns it (exact prefix, not a covering one). True if removed."""
        return self._remove(network_slot(parse_network(network)), peer)

    def remove_by_peer(self, peer: P) -> int:
        """Remove every prefix ``peer`` owns; returns how many."""
        owned = self._by_peer.pop(peer, None)
        if not owned:
            return 0
        for slot in owned:
            self._drop(slot)
        return len(owned)

    def slots_for_peer(self, peer: P) -> list[int]:
        """The slots of the prefixes ``peer`` owns, in the order they were inserted."""
        return list(self._by_peer.get(peer, ()))

    def entries_for_peer(self, peer: P) -> list[Network]:
        """The prefixes ``peer`` owns, in the order they were inserted."""
        return [slot_network(slot) for slot in self._by_peer.get(peer, ())]

    def lookup(
        self, address: bytes | bytearray | memoryview | str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> P | None:
        """The peer owning the longest prefix that contains ``address`` (4 or 16 raw bytes, or text)."""
        if isinstance(address, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            address = ipaddress.ip_address(address).packed
        n = len(address)
        if n == 4:
            return self.lookup4(address)
        if n == 16:
            return self.lookup6(address)
        raise InvalidParameter(f"address must be 4 or 16 bytes, got {n}")

    def lookup4(self, address: bytes | bytearray | memoryview) -> P | None:
        """Longest-prefix match for 4 raw IPv4 address bytes (the per-packet path)."""
        if type(address) is not bytes:
            address = bytes(address)
        peer = self._cache4.get(address)
        if peer is None:
            peer = _resolve(self._v4, self._cache4, address)
        return None if peer is _MISS else peer  # type: ignore[return-value]

    def lookup6(self, address: bytes | bytearray | memoryview) -> P | None:
        """Longest-prefix match for 16 raw IPv6 address bytes (the per-packet path)."""
        if type(address) is not bytes:
            address = bytes(address)
        peer = self._cache6.get(address)
        if peer is None:
            peer = _resolve(self._v6, self._cache6, address)
        return None if peer is _MISS else peer  # type: ignore[return-value]

    def peers(self) -> Iterator[P]:
        """Every peer that owns at least one prefix."""
        return iter(list(self._by_peer))

    def __len__(self) -> int:
        return sum(len(owned) for owned in self._by_peer.values())

    def clear(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._by_peer = {}
        self._owned = {}
        self._cache4.clear()
        self._cache6.clear()
