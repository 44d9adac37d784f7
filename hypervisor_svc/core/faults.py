"""Per-partition fault log: DMA faults reported by IOMMU units, offered to the
owning guest as a stream (and to the admin). A partition only ever sees its
own log; sequence numbers let a reader resume without loss."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


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


class FaultLog:
    def __init__(self, capacity: int) -> None:
        self._entries: deque[FaultEntry] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0
        self.dropped = 0
        self._closed = False

    def append(self, **fields: object) -> FaultEntry:
        with self._cond:
            self._seq += 1
            if len(self._entries) == self._entries.maxlen:
                self.dropped += 1
            entry = FaultEntry(sequence=self._seq, **fields)  # type: ignore[arg-type]
            self._entries.append(entry)
            self._cond.notify_all()
            return entry

    def snapshot(self, after: int = 0) -> list[FaultEntry]:
        with self._cond:
            return [e for e in self._entries if e.sequence > after]

    def follow(self, after: int, alive: Callable[[], bool], poll_s: float = 0.5) -> Iterator[FaultEntry]:
        """Yield entries after ``after`` as they come while ``alive()``."""
        last = after
        while True:
            with self._cond:
                pending = [e for e in self._entries if e.sequence > last]
                if not pending and not self._closed:
                    self._cond.wait(poll_s)
                    pending = [e for e in self._entries if e.sequence > last]
            for e in pending:
                last = e.sequence
                yield e
            if self._closed or not alive():
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._entries)
