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
"""

from __future__ import annotations

import ipaddress
from typing import Any, Generic, Hashable, Iterator, TypeVar

from ..errors import InvalidParameter

P = TypeVar("P", bound=Hashable)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NetworkLike = str | Network | tuple[Any, int]  # (address as text, bytes or ip_address; prefix length)

_FAMILY_BITS = {4: 32, 6: 128}
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

    __slots__ = ("_v4", "_v6", "_by_peer", "_cache4", "_cache6")

    def __init__(self) -> None:
        self._v4: _Family[P] = _Family(32)
        self._v6: _Family[P] = _Family(128)
        self._cache4: dict[bytes, object] = {}
        self._cache6: dict[bytes, object] = {}
        # peer -> {(version, length, key): None}, kept in insertion order for listing.
        self._by_peer: dict[P, dict[tuple[int, int, int], None]] = {}

    def _family(self, version: int) -> _Family[P]:
        return self._v4 if version == 4 else self._v6

    @staticmethod
    def _slot(network: Network) -> tuple[int, int, int]:
        version = network.version
        length = network.prefixlen
        key = int(network.network_address) >> (_FAMILY_BITS[version] - length)
        return version, length, key

    def insert(self, network: NetworkLike, peer: P) -> Network:
        """Route ``network`` to ``peer`` (taking it from whichever peer had it). Returns the normalised prefix."""
        if peer is None:
            raise InvalidParameter("allowed IP owner must not be None")
        net = parse_network(network)
        version, length, key = slot = self._slot(net)
        fam = self._family(version)
        table = fam.tables.get(length)
        if table is None:
            table = fam.tables[length] = {}
            fam.relevel()
        old = table.get(key)
        if old is not None and old is not peer:
            owned = self._by_peer.get(old)
            if owned is not None:
                owned.pop(slot, None)
                if not owned:
                    del self._by_peer[old]
        table[key] = peer
        self._by_peer.setdefault(peer, {})[slot] = None
        self._cache4.clear()
        self._cache6.clear()
        return net

    def _drop(self, slot: tuple[int, int, int]) -> None:
        self._cache4.clear()
        self._cache6.clear()
        version, length, key = slot
        fam = self._family(version)
        table = fam.tables[length]
        del table[key]
        if not table:
            del fam.tables[length]
            fam.relevel()

    def remove(self, network: NetworkLike, peer: P) -> bool:
        """Remove ``network`` if ``peer`` owns it (exact prefix, not a covering one). True if removed."""
        net = parse_network(network)
        version, length, key = slot = self._slot(net)
        table = self._family(version).tables.get(length)
        if table is None or table.get(key) is not peer:
            return False
        self._drop(slot)
        owned = self._by_peer[peer]
        del owned[slot]
        if not owned:
            del self._by_peer[peer]
        return True

    def remove_by_peer(self, peer: P) -> int:
        """Remove every prefix ``peer`` owns; returns how many."""
        owned = self._by_peer.pop(peer, None)
        if not owned:
            return 0
        for slot in owned:
            self._drop(slot)
        return len(owned)

    def entries_for_peer(self, peer: P) -> list[Network]:
        """The prefixes ``peer`` owns, in the order they were inserted."""
        out: list[Network] = []
        for version, length, key in self._by_peer.get(peer, ()):
            bits = _FAMILY_BITS[version]
            address = key << (bits - length)
            if version == 4:
                out.append(ipaddress.IPv4Network((address, length)))
            else:
                out.append(ipaddress.IPv6Network((address, length)))
        return out

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
        self._by_peer.clear()
        self._cache4.clear()
        self._cache6.clear()
