"""Channels: one-way message pipes between actors, one interface over two transports.

- `LocalChannel`: in one event loop (tests, embedding); messages pass as objects, nothing is encoded.
- `ShmChannel`: across processes; msgpack frames (`messages.encode`/`decode`) in a shared-memory `Ring`.

Both ends of a channel start in the process that creates it. `ShmChannel.spec("recv")` (or "send") gives
that end away as a picklable `ChannelSpec`; the other process opens it with `spec.open()`, and the parent
then calls `spec.close()` to drop its copy of the end's socket (`process.ChildProcess` does both).
Ownership: the creating process unlinks the shared-memory segment when it closes its channel object, so
it must outlive the users or at least keep its object until they have attached; see `ring.py` for what
happens when a process is killed.

Closing: `close()` ends this side. A receiver still gets every message sent before the sender closed,
then `recv`/`recv_nowait` raise ChannelClosed; a sender gets ChannelClosed once the receiver closed or died.
(`LocalChannel` is both ends in one object: `close()` from either side behaves as a sender's close.)
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Literal

from baleen.actors.ring import ChannelClosed, ChannelFull, Ring, RingSpec
from baleen.messages import Message, decode, encode

__all__ = ["Channel", "ChannelClosed", "ChannelFull", "ChannelSpec", "LocalChannel", "ShmChannel", "open_channel"]

End = Literal["send", "recv"]


class Channel(ABC):
    """A one-way, ordered, back-pressured pipe of Messages; one sender and one receiver."""

    @abstractmethod
    async def send(self, msg: Message) -> None:
        """Send, waiting while the channel is full; raises ChannelClosed if the receiver is gone."""

    @abstractmethod
    def send_nowait(self, msg: Message) -> None:
        """Send now or raise ChannelFull (nothing is sent then); raises ChannelClosed like `send`."""

    @abstractmethod
    def recv_nowait(self, max_messages: int | None = None) -> list[Message]:
        """Every message ready now (at most `max_messages`), possibly none; ChannelClosed at the end."""

    @abstractmethod
    def ready(self) -> asyncio.Future[None]:
        """A future done when `recv_nowait` may return messages or raise; cancelling it is harmless."""

    @abstractmethod
    def close(self) -> None:
        """Close this end; idempotent."""

    async def recv(self) -> Message:
        """The next message, waiting for one; raises ChannelClosed once the sender closed and all are read."""
        while True:
            got = self.recv_nowait(1)
            if got:
                return got[0]
            await self.ready()

    def spec(self, end: End) -> ChannelSpec:
        """Give away one end to another process."""
        raise ValueError(f"{type(self).__name__} cannot cross processes; use ShmChannel.create()")


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    fut: asyncio.Future[None] = loop.create_future()
    fut.set_result(None)
    return fut


class LocalChannel(Channel):
    """Both ends in one event loop: a bounded FIFO of message objects (no encoding, no copies)."""

    def __init__(self, maxsize: int = 1024) -> None:
        if maxsize < 1:
            raise ValueError(f"LocalChannel maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: deque[Message] = deque()
        self._recv_waiters: list[asyncio.Future[None]] = []
        self._send_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    async def send(self, msg: Message) -> None:
        while True:
            try:
                self.send_nowait(msg)
                return
            except ChannelFull:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._send_waiters.append(fut)
                await fut

    def send_nowait(self, msg: Message) -> None:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        if len(self._items) >= self.maxsize:
            raise ChannelFull(f"the channel holds {self.maxsize} unread messages")
        self._items.append(msg)
        _wake(self._recv_waiters)

    def recv_nowait(self, max_messages: int | None = None) -> list[Message]:
        count = len(self._items) if max_messages is None else min(max_messages, len(self._items))
        if count == 0:
            if self._closed:
                raise ChannelClosed("the channel is closed")
            return []
        out = [self._items.popleft() for _ in range(count)]
        _wake(self._send_waiters)
        return out

    def ready(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._items or self._closed:
            return _done(loop)
        fut: asyncio.Future[None] = loop.create_future()
        self._recv_waiters = [w for w in self._recv_waiters if not w.done()]
        self._recv_waiters.append(fut)
        return fut

    def close(self) -> None:
        self._closed = True
        _wake(self._recv_waiters)
        _wake(self._send_waiters)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.pop()
        if not fut.done():
            fut.set_result(None)


@dataclass(frozen=True, eq=False)
class ChannelSpec:
    """One end of a ShmChannel, picklable, to open in another process."""

    ring: RingSpec

    @property
    def end(self) -> End:
        return "send" if self.ring.role == "writer" else "recv"

    def open(self) -> ShmChannel:
        """Open this end here (once per spec)."""
        return ShmChannel(Ring.open(self.ring))

    def close(self) -> None:
        """Drop this process's copy of the end's socket (after handing the spec to the other process)."""
        self.ring.close()


def open_channel(spec: ChannelSpec) -> ShmChannel:
    """Open a channel end handed over from another process."""
    return spec.open()


class ShmChannel(Channel):
    """A channel over a shared-memory ring; messages travel as msgpack frames."""

    def __init__(self, ring: Ring) -> None:
        self._ring = ring

    @classmethod
    def create(cls, capacity: int = 4 << 20) -> ShmChannel:
        """A new channel holding both ends; `capacity` bytes bound the largest message (less 8)."""
        return cls(Ring.create(capacity))

    def spec(self, end: End) -> ChannelSpec:
        """Give away the `end` ("send" or "recv") to another process; this object keeps the other end."""
        if end not in ("send", "recv"):
            raise ValueError(f"a channel end is 'send' or 'recv', got {end!r}")
        return ChannelSpec(self._ring.spec("writer" if end == "send" else "reader"))

    @property
    def name(self) -> str:
        return self._ring.name

    async def send(self, msg: Message) -> None:
        await self._ring.write_async(encode(msg))

    def send_nowait(self, msg: Message) -> None:
        if not self._ring.write(encode(msg)):
            raise ChannelFull(f"the {self._ring.capacity}-byte ring has no room for this message now")

    def recv_nowait(self, max_messages: int | None = None) -> list[Message]:
        return self._ring.read_with(decode, max_messages)

    def ready(self) -> asyncio.Future[None]:
        return self._ring.readable()

    def close(self) -> None:
        self._ring.close()
