# Types of the optional C extension (wiretun/wireguard/_wgcrypto.c); see wiretun.wireguard.batch.
from typing import Any

def seal_super(
    key: bytes, receiver: int, counter: int, header: Any, packet: Any, mtu: int, /
) -> tuple[bytes, int, int]: ...
def open_train(
    key: bytes, receiver: int, data: Any, segment: int, ring: Any, last: int, limit: int, out: Any, udp: bool, /
) -> tuple[int, int, int, int, int, int, int, int, list[tuple[bytes, int, int]]]: ...
