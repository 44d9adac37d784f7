"""The device's view of who owns it: the slot's owner record in bank 0
(``pviommu.iommu.owner``, written by the hypervisor), and everything opened
under each ownership epoch -- interrupt listeners, page requests in flight,
portal sessions (whose submissions are checked against the record per call).

``fence(epoch)`` runs when the hypervisor's ownership fence arrives through
the invalidation queue: everything of any other epoch ends (listeners are
closed, page requests cancelled, queued descriptors dropped, running ones
waited for), the device is reset to its power-on configuration when the
epoch is new (a new owner, or its reboot, never inherits WQ state), then the
queue goes on and its wait acknowledges the fence.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dma_device.dsa.device import DsaDevice
from pviommu.abi.invq import PageResponseCode
from pviommu.errors import AuthError
from pviommu.iommu.owner import OwnerRecord, OwnerTable
from pviommu.log import get_logger
from pviommu.mem.bank import HostMemory
from pviommu.rpc.auth import Principal, token_digest

log = get_logger("dma_device.ownership")


class Sink(Protocol):
    """Where a listener's interrupts go (``pviommu.rpc.feeds.AsyncFeed``, a queue...)."""

    def put(self, item: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class PendingPageRequest:
    epoch: int
    answered: threading.Event = field(default_factory=threading.Event)
    #: True resolved, False refused, None no answer (cancelled or timed out)
    answer: bool | None = None


class Ownership:
    """Owner checks, listeners and page requests of one device slot."""

    def __init__(self, memory: HostMemory, slot: int, device: DsaDevice,
                 reset: Callable[[], None] | None = None) -> None:
        self.memory = memory
        self.slot = slot
        self.device = device
        #: called when a fence names a new epoch: the device goes back to its power-on
        #: state, as a function-level reset before assignment does (None: no reset)
        self._reset = reset
        self._fenced_epoch = -1
        #: more to end on a fence (``dma_device.portals.Portals.end_epochs_except``), called first
        self.on_fence: list[Callable[[int], object]] = []
        self.owners = OwnerTable(memory)
        self.lock = threading.Lock()
        self._listeners: list[tuple[int, Sink]] = []
        self._pending: dict[int, PendingPageRequest] = {}
        self._request_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.fences = 0
        self.refused_stale = 0
        device.current_epoch = self.epoch

    # -- the record ---------------------------------------------------------------
    def record(self) -> OwnerRecord:
        return self.owners.read(self.slot)

    def epoch(self) -> int:
        return self.owners.epoch(self.slot)

    def authorize(self, token: str) -> Principal | None:
        """A partition credential is the current owner's, under its epoch."""
        rec = self.record()
        if rec.owned and token_digest(token) == rec.token_sha256:
            return Principal("partition", rec.partition_id, epoch=rec.epoch)
        return None

    def check(self, principal: Principal) -> int:
        """The epoch a call of ``principal`` runs under; AuthError when a
        partition's credential was accepted under an epoch that has ended."""
        rec = self.record()
        if principal.kind != "partition":
            return rec.epoch
        if not rec.owned or rec.epoch != principal.epoch or rec.partition_id != principal.id:
            self.refused_stale += 1
            raise AuthError(f"device slot {self.slot} changed owner (epoch {principal.epoch} ended; "
                            f"now {rec.epoch}): this session is over")
        return rec.epoch

    # -- interrupts ---------------------------------------------------------------
    def publish_interrupt(self, handle: int, epoch: int) -> None:
        """An MSI of a descriptor of ``epoch``: only that epoch's listeners get it."""
        with self.lock:
            for e, q in self._listeners:
                if e == epoch:
                    q.put(handle)

    def subscribe(self, epoch: int, sink: Sink) -> None:
        with self.lock:
            self._listeners.append((epoch, sink))

    def unsubscribe(self, sink: Sink) -> None:
        with self.lock:
            self._listeners = [(e, x) for e, x in self._listeners if x is not sink]

    def next_sequence(self) -> int:
        return next(self._seq)

    # -- page requests --------------------------------------------------------------
    def new_page_request(self, epoch: int) -> tuple[int, PendingPageRequest]:
        rid = next(self._request_ids)
        pending = PendingPageRequest(epoch)
        with self.lock:
            self._pending[rid] = pending
        return rid, pending

    def finish_page_request(self, rid: int) -> None:
        with self.lock:
            self._pending.pop(rid, None)

    def answer(self, rid: int, code: PageResponseCode) -> bool:
        """The hypervisor's page group response; False when nothing waits for it."""
        with self.lock:
            pending = self._pending.get(rid)
        if pending is None or pending.epoch != self.epoch():
            return False
        pending.answer = code is PageResponseCode.SUCCESS
        pending.answered.set()
        return True

    # -- the fence -------------------------------------------------------------------
    def fence(self, expected: int, on_stale_banks: Callable[[list[int]], None] | None = None) -> None:
        """End everything of every epoch but the current one (the record's;
        ``expected`` is what the hypervisor published, for the log)."""
        keep = self.epoch()
        for end in self.on_fence:
            end(keep)
        with self.lock:
            ended = [q for e, q in self._listeners if e != keep]
            self._listeners = [(e, q) for e, q in self._listeners if e == keep]
            cancelled = [p for p in self._pending.values() if p.epoch != keep]
        for q in ended:
            q.close()
        for p in cancelled:
            p.answered.set()  # answer stays None: the engine gives up blocking
        dropped = self.device.end_epochs_except(keep)
        reset = self._reset is not None and keep != self._fenced_epoch
        if reset and self._reset is not None:
            self._reset()
        self._fenced_epoch = keep
        stale = self.memory.drop_stale()
        if stale and on_stale_banks is not None:
            on_stale_banks(stale)
        self.fences += 1
        log.info("device.fence", slot=self.slot, epoch=keep, expected=expected, listeners_ended=len(ended),
                 page_requests_cancelled=len(cancelled), descriptors_dropped=dropped, device_reset=reset,
                 banks_unmapped=stale)
