"""WireGuard's protocol constants and the five per-peer timers, as deadlines on a monotonic clock.

The timers follow the kernel's timers.c / wireguard-go's timers.go one for one:

==========================  ======================================================================
timer                       armed by, and what its expiry does (the core runs the action)
==========================  ======================================================================
retransmit_handshake        an initiation was sent: after REKEY_TIMEOUT + jitter, resend it, up to
                            MAX_TIMER_HANDSHAKES more times; then give up and drop queued packets
send_keepalive              data was received: after KEEPALIVE_TIMEOUT with nothing sent back,
                            send a keepalive
new_handshake               data was sent: if nothing authenticated arrives within
                            KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter, start a new handshake
zero_key_material           a session was derived: after REJECT_AFTER_TIME * 3, erase all keys
persistent_keepalive        any authenticated packet passed: after the configured interval of
                            silence, send a keepalive
==========================  ======================================================================

:class:`PeerTimers` holds the deadlines (``None`` = not pending) and the hooks the core calls at
each event; it tells its scheduler (the core) when a deadline moves earlier so the core's heap
always knows the next wake-up.  Nothing here reads a clock.
"""

from __future__ import annotations

import enum
import random
from typing import Callable

# Specification constants (seconds or message counts).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
MAX_TIMER_HANDSHAKES = 90 // 5  # REKEY_ATTEMPT_TIME / REKEY_TIMEOUT
REKEY_TIMEOUT_JITTER_MAX_MS = 334  # jitter is a whole number of ms in [0, 334)
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # 20 ms
PADDING_MULTIPLE = 16

# Derived durations the protocol uses.
NEW_HANDSHAKE_TIMEOUT = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # 15 s of sending without hearing back
ZERO_KEY_MATERIAL_TIMEOUT = REJECT_AFTER_TIME * 3  # 540 s
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s

# Implementation constants (wireguard-go's).
UNDER_LOAD_AFTER_TIME = 1.0  # the device stays "under load" this long after it was last detected
UNDER_LOAD_HANDSHAKES = 1024 // 8  # handshake messages that passed MAC1, per second, that mean "under load"
MAX_PEERS = 1 << 16
QUEUE_STAGED_SIZE = 128  # packets held per peer while its handshake completes


class Timer(enum.IntEnum):
    RETRANSMIT_HANDSHAKE = 0
    SEND_KEEPALIVE = 1
    NEW_HANDSHAKE = 2
    ZERO_KEY_MATERIAL = 3
    PERSISTENT_KEEPALIVE = 4


_RETRANSMIT = Timer.RETRANSMIT_HANDSHAKE.value
_KEEPALIVE = Timer.SEND_KEEPALIVE.value
_NEW_HANDSHAKE = Timer.NEW_HANDSHAKE.value
_ZERO = Timer.ZERO_KEY_MATERIAL.value
_PERSISTENT = Timer.PERSISTENT_KEEPALIVE.value

Scheduler = Callable[["PeerTimers", float], None]


def jitter(rng: random.Random) -> float:
    """A random 0..333 ms, as wireguard-go adds to REKEY_TIMEOUT so peers do not retry in lockstep."""
    return rng.randrange(REKEY_TIMEOUT_JITTER_MAX_MS) / 1000.0


class PeerTimers:
    """Deadlines of one peer's five timers plus the counters the timer logic keeps."""

    __slots__ = (
        "owner",
        "deadlines",
        "active",
        "handshake_attempts",
        "need_another_keepalive",
        "sent_last_minute_handshake",
        "persistent_keepalive_interval",
        "wake",
        "wake_seq",
        "_schedule",
        "_rng",
    )

    def __init__(self, schedule: Scheduler, rng: random.Random, owner: object = None) -> None:
        self.owner = owner  # the peer these timers belong to, handed back to the scheduler
        self.deadlines: list[float | None] = [None] * len(Timer)
        self.active = False
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive_interval = 0
        self.wake: float | None = None  # earliest deadline the scheduler has been told about
        self.wake_seq = 0
        self._schedule = schedule
        self._rng = rng

    # -- plumbing

    def set(self, timer: int, deadline: float) -> None:
        """Arm (or re-arm) ``timer`` to fire at ``deadline``."""
        self.deadlines[timer] = deadline
        wake = self.wake
        if wake is None or deadline < wake:
            self._schedule(self, deadline)

    def clear(self, timer: int) -> None:
        self.deadlines[timer] = None

    def pending(self, timer: int) -> bool:
        return self.deadlines[timer] is not None

    def next_deadline(self) -> float | None:
        best = None
        for deadline in self.deadlines:
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def pop_expired(self, now: float) -> int:
        """The earliest timer whose deadline is <= now (cleared), or -1 if none is due."""
        best = -1
        best_at = now
        for index, deadline in enumerate(self.deadlines):
            if deadline is not None and deadline <= best_at:
                best, best_at = index, deadline
        if best >= 0:
            self.deadlines[best] = None
        return best

    def start(self) -> None:
        """The peer starts running (device up): timers may be armed from now on."""
        self.active = True
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.need_another_keepalive = False

    def stop(self) -> None:
        """Disarm everything (device down or peer removed)."""
        self.active = False
        for index in range(len(self.deadlines)):
            self.deadlines[index] = None
        # Forget the scheduled wake-up too: otherwise a later set() sees an old (past) wake and
        # schedules nothing, and the peer's timers stay dead after a down/up cycle.
        self.wake = None

    # -- event hooks, named after wireguard-go's timers* functions

    def data_sent(self, now: float) -> None:
        """An authenticated data packet was sent."""
        if self.active and self.deadlines[_NEW_HANDSHAKE] is None:
            self.set(_NEW_HANDSHAKE, now + NEW_HANDSHAKE_TIMEOUT + jitter(self._rng))

    def data_received(self, now: float) -> None:
        """An authenticated data packet was received."""
        if self.active:
            if self.deadlines[_KEEPALIVE] is None:
                self.set(_KEEPALIVE, now + KEEPALIVE_TIMEOUT)
            else:
                self.need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        """Any authenticated packet (keepalive, data, handshake) was sent."""
        self.deadlines[_KEEPALIVE] = None

    def any_authenticated_packet_received(self) -> None:
        """Any authenticated packet (keepalive, data, handshake) was received."""
        self.deadlines[_NEW_HANDSHAKE] = None

    def handshake_initiated(self, now: float) -> None:
        """An initiation was sent."""
        if self.active:
            self.set(_RETRANSMIT, now + REKEY_TIMEOUT + jitter(self._rng))

    def handshake_complete(self) -> None:
        """A response was consumed, or the first data packet confirmed the responder's keypair."""
        self.deadlines[_RETRANSMIT] = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        """A keypair was derived (response created or consumed)."""
        if self.active:
            self.set(_ZERO, now + ZERO_KEY_MATERIAL_TIMEOUT)

    def any_authenticated_packet_traversal(self, now: float) -> None:
        """Before any authenticated packet is sent, or after one is received."""
        interval = self.persistent_keepalive_interval
        if interval > 0 and self.active:
            self.set(_PERSISTENT, now + interval)
