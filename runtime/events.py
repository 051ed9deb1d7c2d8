"""The events channel: create, delete and execute events fanned out to subscribers.

Each subscriber has its own bounded queue. Publishing never waits: a subscriber
whose queue is full is dropped (its iterator raises ``SubscriberOverflowError``
after the events it already has), so a slow subscriber never slows the others.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from remote_exec.exceptions import SubscriberOverflowError
from remote_exec.executor import RemoteStream, check_channel

__all__ = ["EventHub", "Subscription"]


class Subscription(RemoteStream):
    """An async iterator of event dicts ``{"name", "channel", "data", "time_ns"}``."""

    def __init__(self, hub: EventHub, name: str, channel: str, max_queue: int) -> None:
        self.name = name
        self.channel = channel
        self.overflowed = False
        self._send: MemoryObjectSendStream[dict[str, Any]]
        self._receive: MemoryObjectReceiveStream[dict[str, Any]]
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](max_queue)
        self._hub = hub

    def matches(self, name: str, channel: str) -> bool:
        return (not self.name or self.name == name) and (
            not self.channel or self.channel == channel
        )

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.overflowed = True
            self.end()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.end()

    def end(self) -> None:
        self._hub.unsubscribe(self)
        self._send.close()

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self.overflowed:
                raise SubscriberOverflowError(
                    f"event subscriber for {self.name or '*'}/{self.channel or '*'} fell behind "
                    "and was dropped"
                ) from None
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.end()
        self._receive.close()


class EventHub:
    """Fan-out of instance events to bounded subscriber queues."""

    def __init__(self, max_queue: int = 1024) -> None:
        self.max_queue = max_queue
        self._subscribers: list[Subscription] = []

    def subscribe(self, name: str = "", channel: str = "") -> Subscription:
        check_channel(name, channel)
        sub = Subscription(self, name, channel, self.max_queue)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def publish(self, name: str, channel: str, data: dict[str, Any]) -> None:
        """Offer an event to every matching subscriber; never blocks."""
        if not self._subscribers:
            return
        event = {"name": name, "channel": channel, "data": data, "time_ns": time.perf_counter_ns()}
        for sub in list(self._subscribers):
            if sub.matches(name, channel):
                sub.offer(event)

    def close(self) -> None:
        """End every subscription (their iterators finish)."""
        for sub in list(self._subscribers):
            sub.end()
