"""``AsyncFeed``: items from any thread to one streaming handler on the event
loop, bounded. A stream waiting for its next item costs no thread; a
producer never blocks (a full feed drops, and counts what it dropped)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class AsyncFeed(Generic[T]):
    """Create it on the loop (inside the handler); ``put``/``close`` from anywhere."""

    def __init__(self, maxsize: int = 4096) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def _offer(self, item: object) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            if item is _END:  # make room for the end: the reader must learn it is over
                self._queue.get_nowait()
                self._queue.put_nowait(_END)
            else:
                self.dropped += 1

    def put(self, item: T) -> None:
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self._offer, item)
        except RuntimeError:  # the loop is gone (server stopped)
            self.closed = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(self._offer, _END)
        except RuntimeError:
            pass

    async def get(self, timeout: float | None = None) -> T | None:
        """The next item; None once closed (or after ``timeout`` seconds)."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if item is _END:
            self._queue.put_nowait(_END)  # every later get sees the end too
            return None
        return item  # type: ignore[return-value]

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item
