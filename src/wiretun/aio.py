"""asyncio on a session's read-wait handle: ``async for packet in session.packets()`` and awaitable send.

No threads on Linux: a coroutine that finds nothing to receive registers the session's read-wait handle
with ``loop.add_reader`` and sleeps until the kernel has packets (or the session ends); a send that finds
the send ring full registers the TUN queue with ``loop.add_writer``. On Windows the read-wait handle is an
event HANDLE that no event loop's selector takes (``Session.read_wait_selectable`` is False): one worker
thread per session and loop sleeps on it (``Session.wait``, in half-second slices) and wakes the
coroutines. Readers are registered only while
someone waits (the handle is level-triggered, so a reader left registered over a non-empty queue would
fire on every loop iteration), and several coroutines may wait on one session at once.

The pattern::

    async def forward(a: Session, b: Session) -> None:
        async for packet in a.packets():      # zero copy: a view into a's receive ring
            await b.send(packet)              # copied into b's send ring and written to the kernel
            a.release_receive_packet(packet)  # as with receive_packet: release every packet

The functions here take the session as their first argument and use only its public surface
(:class:`SessionLike`); :class:`~wiretun.session.Session` has them as methods ``packets()``,
``receive()`` and ``send()`` through :class:`AsyncSessionMethods`, so this module never imports the
session module and the session never calls into this one's internals.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from .errors import BufferOverflow, EndOfFile, InvalidParameter
from .offload import HeaderLike

Buffer = bytes | bytearray | memoryview


class SessionLike(Protocol):
    """What asyncio needs of a session: its public calls and wait handles."""

    @property
    def ended(self) -> bool: ...

    @property
    def send_stalled(self) -> bool: ...

    def get_read_wait_event(self) -> int: ...

    def get_write_wait_event(self) -> int | None: ...

    def get_end_event(self) -> int: ...

    @property
    def read_wait_selectable(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def try_receive_packet(self) -> memoryview | None: ...

    def receive_packets(self, max_count: int = ...) -> list[memoryview]: ...

    def release_receive_packets(self, packets: list[memoryview]) -> None: ...

    def send_packets(self, packets: Sequence[Buffer], headers: Sequence[HeaderLike | None] | None = ...) -> int: ...


class _Waiters:
    """Coroutines sleeping until one descriptor is ready, on one loop; the fd is registered meanwhile."""

    __slots__ = ("loop", "fd", "futures", "add", "remove", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, writer: bool) -> None:
        self.loop = loop
        self.fd = fd
        self.futures: list[asyncio.Future[None]] = []
        self.add: Callable[..., Any] = loop.add_writer if writer else loop.add_reader
        self.remove: Callable[[int], bool] = loop.remove_writer if writer else loop.remove_reader

    def wait(self) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if not self.futures:
            self.add(self.fd, self._wake)
        self.futures.append(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _wake(self) -> None:
        self.remove(self.fd)
        futures, self.futures = self.futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def _forget(self, fut: asyncio.Future[None]) -> None:
        # A cancelled waiter must not leave the descriptor registered for nobody.
        if fut.cancelled() and fut in self.futures:
            self.futures.remove(fut)
            if not self.futures:
                self.remove(self.fd)

    def close(self) -> None:
        if self.futures:
            self._wake()


class _ThreadWaiter:
    """Coroutines sleeping until a session's read-wait event is set where the event cannot go into the
    loop's selector (a Windows event HANDLE): one worker thread sleeps in ``session.wait`` for all of them,
    in slices of :data:`THREAD_WAIT_SLICE` seconds, so that a waiter nobody needs any more is gone soon."""

    __slots__ = ("loop", "session", "futures", "running", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, session: SessionLike) -> None:
        self.loop = loop
        self.session = weakref.ref(session)  # weak: the table that holds this is keyed by the session
        self.futures: list[asyncio.Future[None]] = []
        self.running = False

    def wait(self) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self.futures.append(fut)
        session = self.session()
        if session is None:
            fut.set_result(None)
        elif not self.running:
            self.running = True
            job = self.loop.run_in_executor(None, session.wait, THREAD_WAIT_SLICE)
            job.add_done_callback(self._done)
        return fut

    def _done(self, job: asyncio.Future[bool]) -> None:
        self.running = False
        if not job.cancelled():
            job.exception()  # retrieved: an error shows up as the next receive's own
        futures, self.futures = self.futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)  # woken, or a slice passed: the receiver looks again either way


THREAD_WAIT_SLICE = 0.5
_thread_waiters: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _ThreadWaiter]] = (
    weakref.WeakKeyDictionary()
)

_Table = weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _Waiters]]

# Per session and loop; weak so a forgotten session is not kept alive by asyncio bookkeeping.
_readers: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _Waiters]] = weakref.WeakKeyDictionary()
_writers: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _Waiters]] = weakref.WeakKeyDictionary()
_enders: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, _Waiters]] = weakref.WeakKeyDictionary()


def _waiters(table: _Table, session: Any, fd: int, writer: bool) -> _Waiters:
    loop = asyncio.get_running_loop()
    per_loop = table.get(session)
    if per_loop is None:
        per_loop = table[session] = {}
    w = per_loop.get(loop)
    if w is None or w.fd != fd:
        w = per_loop[loop] = _Waiters(loop, fd, writer)
    return w


async def wait_readable(session: SessionLike) -> None:
    """Sleep until the session's read-wait handle is readable (packets may be waiting, or it ended)."""
    if session.ended:
        return
    if not session.read_wait_selectable:
        loop = asyncio.get_running_loop()
        per_loop = _thread_waiters.setdefault(session, {})
        waiter = per_loop.get(loop)
        if waiter is None:
            waiter = per_loop[loop] = _ThreadWaiter(loop, session)
        await waiter.wait()
        return
    await _waiters(_readers, session, session.get_read_wait_event(), False).wait()


async def wait_writable(session: SessionLike) -> None:
    """Sleep until the session's TUN queue accepts writes again (after EAGAIN/ENOBUFS) or it ends."""
    if session.ended:
        return
    fd = session.get_write_wait_event()
    if fd is None:  # sends never stall on this platform: nothing to wait for but a moment
        await asyncio.sleep(0.001)
        return
    writable = _waiters(_writers, session, fd, True).wait()
    ended = _waiters(_enders, session, session.get_end_event(), False).wait()
    try:
        await asyncio.wait((writable, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (writable, ended):
            if not fut.done():
                fut.cancel()  # unregisters its descriptor when nobody else waits on it


async def receive(session: SessionLike) -> memoryview:
    """The next packet, sleeping (without blocking the loop) until one comes; EndOfFile once ended."""
    while True:
        packet = session.try_receive_packet()
        if packet is not None:
            return packet
        await wait_readable(session)


async def packets(session: SessionLike, batch: int = 64) -> AsyncIterator[memoryview]:
    """Every packet the session receives until it ends; release each one as usual.

    Packets are taken ``batch`` at a time with one call; those of a batch not yet handed out when the
    iteration stops (``break``, an exception, cancellation) are released here.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidParameter(f"batch {batch!r} must be an int >= 1")
    while True:
        try:
            got = session.receive_packets(batch)
        except EndOfFile:
            return
        if not got:
            await wait_readable(session)
            continue
        done = 0  # packets handed out so far; the one at a yield that never resumes counts too
        try:
            for packet in got:
                done += 1
                yield packet
        finally:
            if done < len(got):
                session.release_receive_packets(got[done:])


async def send(session: SessionLike, packet: Buffer, header: HeaderLike | None = None) -> None:
    """Send one packet (copied into the send ring when the kernel cannot take it at once).

    Sleeps while the kernel refuses writes (EAGAIN/ENOBUFS) and the send ring is full.
    BufferOverflow when the ring is full of packets allocated and not yet sent (nothing to wait for:
    they leave only when their owner sends them); EndOfFile once the session has ended. ``header``
    is the packet's virtio-net header on an offload session (see ``Session.send_packet``).
    """
    packets_ = (packet,)
    headers = None if header is None else (header,)
    waits = 0
    while True:
        if session.ended:
            raise EndOfFile("the session has ended")
        if session.send_packets(packets_, headers):
            return
        if not session.send_stalled:
            raise BufferOverflow("the send ring is full of allocated packets not yet sent")
        if waits:
            await asyncio.sleep(0.001)  # writable yet refused again (ENOBUFS/ENOMEM): do not spin
        await wait_writable(session)
        waits += 1


class AsyncSessionMethods:
    """The asyncio methods of :class:`wiretun.session.Session` (a mixin over its public surface)."""

    def packets(self: SessionLike, batch: int = 64) -> AsyncIterator[memoryview]:
        """``async for packet in session.packets()``: every packet until the session ends (release each)."""
        return packets(self, batch)

    async def receive(self: SessionLike) -> memoryview:
        """The next packet, awaiting without blocking the event loop; EndOfFile once ended."""
        return await receive(self)

    async def send(self: SessionLike, packet: Buffer, header: HeaderLike | None = None) -> None:
        """Send one packet (copied), awaiting while the send ring is full; EndOfFile once ended.

        ``header`` as for ``Session.send_packet``."""
        await send(self, packet, header)
