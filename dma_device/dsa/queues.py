"""The work queues' portals and the engines' pick: what a submitter posts
(ENQCMD/MOVDIR64B semantics), the ownership-epoch drop, and how an engine
finds its next descriptor (WQ priority, then age) and polls the portal rings."""

from __future__ import annotations

import collections
import os
import time

from dma_device.dsa.state import (
    POLL_S,
    DsaCore,
    Portal,
    SwError,
    _WorkQueue,
    log,
)
from pviommu.abi.dsa import (
    Descriptor,
    DeviceState,
    DsaStatus,
    WqState,
)


class WorkQueues(DsaCore):
    """Submission into the WQs and the engines' choice of the next descriptor."""

    # ---- portal --------------------------------------------------------------------
    def submit(self, wq_id: int, desc: bytes | bytearray | memoryview | Descriptor,
               portal: Portal = Portal.UNLIMITED, *, epoch: int = 0) -> bool:
        """Write one 64-byte descriptor to WQ ``wq_id``'s portal.

        Returns False only for a shared WQ that did not accept it (ENQCMD
        ZF=1: disabled or full; retry later). A dedicated WQ always returns
        True (MOVDIR64B is posted); overflow and disabled-WQ drops are counted."""
        d = desc if isinstance(desc, Descriptor) else Descriptor.unpack(desc)
        wq = self._wq(wq_id)
        with self._cv:
            enabled = wq.state == WqState.ENABLED and self._state == DeviceState.ENABLED
            limit = wq.cfg.wq_thresh if portal is Portal.LIMITED else wq.cfg.wq_size
            full = len(wq.queue) >= limit
            if enabled and not full:
                wq.queue.append((next(self._seq), d, epoch))
                self._cv.notify_all()
                accepted = True
            else:
                accepted = False
        if accepted:
            self.counters.add("submitted")
            return True
        if not wq.cfg.dedicated:
            self.counters.add("retries")
            return False
        reason = "dropped_full" if enabled else "dropped_disabled"
        self.counters.add(reason)
        self._sw_error(SwError(int(DsaStatus.NONE), wq_id, d.opcode, None, reason=reason))
        return True

    def end_epochs_except(self, epoch: int, timeout: float = 10.0) -> int:
        """An owner change: drop every queued descriptor of another epoch (no
        record: its owner is gone) and wait up to ``timeout`` for the running
        ones of other epochs to finish (their translations fault from now
        on). Returns the number dropped."""
        with self._cv:
            dropped = 0
            for wq in self._wqs:
                keep = [item for item in wq.queue if item[2] == epoch]
                dropped += len(wq.queue) - len(keep)
                wq.queue = collections.deque(keep)
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: all(e == epoch for wq in self._wqs for e in wq.running.values()),
                                     timeout)
        if dropped:
            self.counters.add("aborted_epoch", dropped)
        if not done:
            log.warning("dsa.fence_running_left", epoch=epoch)
        return dropped

    # ---- engines -------------------------------------------------------------------
    def _pick(self, engine: int) -> tuple[_WorkQueue, int, Descriptor, int] | None:
        gid = self._engine_group.get(engine)
        if gid is None:
            return None
        best: _WorkQueue | None = None
        for w in self._groups[gid].wqs:
            wq = self._wqs[w]
            if not wq.queue or wq.state == WqState.DISABLED:
                continue
            if best is None or (wq.cfg.priority, -wq.queue[0][0]) > (best.cfg.priority,
                                                                    -best.queue[0][0]):
                best = wq
        if best is None:
            return None
        seq, d, epoch = best.queue.popleft()
        best.running[seq] = epoch
        return best, seq, d, epoch

    def kick(self) -> None:
        """Work arrived from outside (a portal doorbell while every engine
        slept): pull it into the WQs and wake the engines."""
        with self._cv:
            if self.work_source is not None and self.work_source():
                self._cv.notify_all()

    def _next(self, engine: int, poll: bool) -> tuple[_WorkQueue, int, Descriptor, int] | None:
        """The next descriptor for ``engine`` (None: stop). Portal rings are
        pulled here, by the engines themselves: an engine that just ran one
        and finds nothing polls them (one engine at a time) for ``POLL_S``
        before it sleeps, so a descriptor posted meanwhile runs without any
        hand-off between threads; a sleeping device tells the rings
        (``on_idle``), whose producers then ring its doorbell."""
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return None
                    item = self._pick(engine)
                    if item is None and self.work_source is not None and self.work_source():
                        item = self._pick(engine)
                    if item is not None:
                        return item
                    if poll and self.work_pending is not None and not self._polling:
                        self._polling = True
                        poll = False
                        break
                    if self.on_idle is not None and not self._polling:
                        self.on_idle(True)
                        if self.work_source is not None and self.work_source():  # posted before it saw us sleep
                            continue
                    self._cv.wait(0.5)
                    if self.on_idle is not None and not self._polling:
                        self.on_idle(False)
            try:
                pending = self.work_pending
                end = time.monotonic() + POLL_S
                while pending is not None and not pending() and time.monotonic() < end and not self._stop:
                    os.sched_yield()  # time.sleep(0) would cost the timer slack (50-100 us)
            finally:
                with self._cv:
                    self._polling = False

