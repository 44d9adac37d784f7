"""When an unmapped IOVA range and the table pages that held it may be reused.

Linux's IOVA flush queue (``IOMMU_DOMAIN_DMA_FQ``: unmaps queue and one
domain-wide flush every ``FQ_SIZE`` entries or ``FQ_TIMEOUT_S`` releases the
batch) plus the quarantine of ranges unmapped without a flush (``skip_flush``)
or whose flush failed: those wait for the next successful flush. The order is
Linux's: flush, then free table pages, then release the IOVA.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest_agent.driver.stats import Stats
from guest_agent.errors import HypercallFailed
from pviommu.addr import Gpa, Iova
from pviommu.pt.gather import IotlbGather

#: Lazy mode: flush after this many queued unmaps (Linux IOVA_FQ_SIZE) ...
FQ_SIZE = 256
#: ... or this long after the first queued one (Linux IOVA_FQ_TIMEOUT, 10 ms).
FQ_TIMEOUT_S = 0.010


@dataclass
class Pending:
    """An unmapped range waiting for the flush that makes it reusable."""

    iova: Iova | None  # IOVA allocation to release (None: nothing to release)
    gather: IotlbGather[Gpa] = field(default_factory=IotlbGather)


class FlushQueue:
    """One domain's queued and quarantined ranges. ``flush`` is the domain-wide
    flush hypercall; ``release`` frees a batch once a flush covered it."""

    def __init__(self, name: str, flush: Callable[[], None], release: Callable[[list[Pending]], None],
                 stats: Stats, log: Any) -> None:
        self._name = name
        self._flush = flush
        self._release = release
        self._stats = stats
        self._log = log
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queued: list[Pending] = []
        self._quarantine: list[Pending] = []
        self._first = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._inflight = 0  # taken off the queues, their flush not finished

    def pending(self) -> int:
        """Unmapped ranges not yet reusable (queued, quarantined or being flushed)."""
        with self._lock:
            return len(self._queued) + len(self._quarantine) + self._inflight

    def quarantine(self, p: Pending) -> None:
        """Unmapped but not known flushed: reused only after a later flush."""
        with self._lock:
            self._quarantine.append(p)

    def defer(self, p: Pending, skip_flush: bool) -> None:
        """Queue ``p`` for the lazy flush, or quarantine it (``skip_flush``)."""
        with self._lock:
            if skip_flush:
                self._quarantine.append(p)
                self._stats.add("unmaps_skip_flush")
                return
            if not self._queued:
                self._first = time.monotonic()
            self._queued.append(p)
            full = len(self._queued) >= FQ_SIZE
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"fq-{self._name}", daemon=True)
                self._thread.start()
            self._cv.notify()
        if full:
            self._flush_queued()

    def flush_all(self) -> None:
        """Domain-wide flush, then release every queued and quarantined range;
        on a failed flush they stay quarantined and the error propagates."""
        with self._lock:
            batch = self._queued + self._quarantine
            self._queued, self._quarantine = [], []
            self._inflight += len(batch)
        try:
            self._flush()
        except HypercallFailed:
            self._give_back(batch)
            raise
        self._done(batch)

    def drain(self) -> list[Pending]:
        """Everything waiting, without a flush (the domain is being destroyed)."""
        with self._lock:
            batch = self._queued + self._quarantine
            self._queued, self._quarantine = [], []
        return batch

    def close(self) -> None:
        """Stop the timeout thread."""
        with self._lock:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(2)

    # -- internals --------------------------------------------------------------------
    def _give_back(self, batch: list[Pending]) -> None:
        with self._lock:
            self._quarantine.extend(batch)
            self._inflight -= len(batch)

    def _done(self, batch: list[Pending]) -> None:
        self._release(batch)
        with self._lock:
            self._inflight -= len(batch)

    def _flush_queued(self) -> None:
        """Flush the lazy queue once (Linux fq_flush_timeout / queue full)."""
        with self._lock:
            batch, self._queued = self._queued, []
            self._inflight += len(batch)
        if not batch:
            return
        try:
            self._flush()
        except HypercallFailed as exc:
            self._log.warning("domain.fq_flush_failed", error=str(exc), entries=len(batch))
            self._give_back(batch)
            return
        self._stats.add("fq_batches")
        self._done(batch)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                wait = self._first + FQ_TIMEOUT_S - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
            self._flush_queued()
