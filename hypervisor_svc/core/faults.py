"""Per-partition fault log: DMA faults reported by IOMMU units, offered to the
owning guest as a stream (and to the admin). A partition only ever sees its
own log; sequence numbers let a reader resume without loss. Followers are
sinks (``pviommu.rpc.feeds.AsyncFeed``: a following stream holds no thread)
fed as entries arrive, and closed with the log."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class FaultEntry:
    sequence: int
    partition_id: int
    logical_device_id: int
    iova: int
    write: bool
    reason: int
    reason_name: str
    detail: str
    domain_id: int
    page_request: bool = False
    request_id: int = 0
    timestamp: float = field(default_factory=time.time)
    #: SVA proposal only: the request's PASID and its SynIC-shaped message (pviommu.abi.prq)
    pasid: int | None = None
    synic_message: bytes = b""


class Follower(Protocol):
    def put(self, item: FaultEntry) -> None: ...

    def close(self) -> None: ...


class FaultLog:
    def __init__(self, capacity: int) -> None:
        self._entries: deque[FaultEntry] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0
        self.dropped = 0
        self._closed = False
        self._followers: list[Follower] = []

    def subscribe(self, follower: Follower, after: int = 0) -> list[FaultEntry]:
        """Feed ``follower`` every later entry; returns those after ``after`` so far
        (nothing lost or doubled between the two). A closed log closes it at once."""
        with self._cond:
            if self._closed:
                follower.close()
            else:
                self._followers.append(follower)
            return [e for e in self._entries if e.sequence > after]

    def unsubscribe(self, follower: Follower) -> None:
        with self._cond:
            if follower in self._followers:
                self._followers.remove(follower)

    def append(self, **fields: object) -> FaultEntry:
        with self._cond:
            self._seq += 1
            if len(self._entries) == self._entries.maxlen:
                self.dropped += 1
            entry = FaultEntry(sequence=self._seq, **fields)  # type: ignore[arg-type]
            self._entries.append(entry)
            self._cond.notify_all()
            for f in self._followers:
                f.put(entry)
            return entry

    def snapshot(self, after: int = 0) -> list[FaultEntry]:
        with self._cond:
            return [e for e in self._entries if e.sequence > after]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            followers, self._followers = self._followers, []
        for f in followers:
            f.close()

    def __len__(self) -> int:
        return len(self._entries)
