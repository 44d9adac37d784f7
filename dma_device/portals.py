"""The device's shared-memory portals and interrupts (docs/transports.md).

A guest opens, through the device's session socket, a **portal session** for
one WQ: a ring of 64-byte descriptor slots in a memfd and a doorbell
(eventfd), like a DSA portal page is 64-byte posted writes into MMIO. Posting
is writing a slot and the tail; the device drains many descriptors per look
into the WQ (a dedicated WQ's posted write; a shared WQ answers each slot
accepted or retry, ENQCMD's ZF). An **interrupt session** is a page of
per-vector counters and a doorbell the device rings on each completion
interrupt, irqfd-style.

Every session belongs to the ownership epoch it was opened under (the owner
record's, checked against the caller's token): the device takes nothing from
a session of an ended epoch, and the fence closes them (reason
OWNER_CHANGED) so their owners learn it at their next look. Sessions are
bounded per partition (RESOURCE_EXHAUSTED beyond) and end when their socket
closes, so nothing a guest opens outlives it.

The engines pull from the rings themselves while they are busy or polling
(no hand-off between threads on the hot path); when every engine sleeps the
rings say so, the guest rings the doorbell, and a waker thread pulls and
wakes an engine.
"""

from __future__ import annotations

import itertools
import select
import threading
from dataclasses import dataclass

from dma_device.dsa.device import DsaDevice
from dma_device.ownership import Ownership
from pviommu.abi import shm as L
from pviommu.abi.dsa import DESC_SIZE
from pviommu.log import get_logger
from pviommu.shm.region import Doorbell, Region
from pviommu.shm.ring import Ring, RingError
from pviommu.shm.sessions import Opened, SessionRefused

log = get_logger("dma_device.portals")

#: descriptor slots of one portal ring (a power of two; at least any WQ's size)
PORTAL_SLOTS = 256
#: sessions (portals and interrupt pages) one partition may hold on this device
SESSIONS_PER_PARTITION = 64
#: descriptors taken from one ring per look (fairness between sessions)
PULL_BATCH = 32


@dataclass(eq=False)
class PortalSession:
    id: int
    partition_id: int
    epoch: int
    wq_id: int
    dedicated: bool
    region: Region
    ring: Ring
    doorbell: Doorbell
    taken: int = 0


@dataclass(eq=False)
class InterruptSession:
    id: int
    partition_id: int
    epoch: int
    region: Region
    doorbell: Doorbell
    raised: int = 0


@dataclass
class PortalStats:
    opened: int = 0
    closed: int = 0
    refused: int = 0
    descriptors: int = 0
    retries: int = 0
    protocol_errors: int = 0
    wakeups: int = 0


class Portals:
    """Session bookkeeping, the socket opener and the ring pull of one device."""

    def __init__(self, device: DsaDevice, own: Ownership) -> None:
        self.device = device
        self.own = own
        self.stats = PortalStats()
        self._lock = threading.Lock()
        self._portals: dict[int, PortalSession] = {}
        self._irqs: dict[int, InterruptSession] = {}
        self._ids = itertools.count(1)
        self._sleeping = False
        self._wake = Doorbell()  # session set changed: the waker re-reads its fds
        self._stop = False
        self._waker = threading.Thread(target=self._wake_loop, name="portal-waker", daemon=True)
        self._waker.start()
        device.work_source = self.pull
        device.work_pending = self.pending
        device.on_idle = self.set_sleeping

    # -- opening (the session socket's thread) -----------------------------------------------
    def open(self, request: dict[str, object]) -> Opened:
        token = request.get("token")
        principal = self.own.authorize(token) if isinstance(token, str) else None
        if principal is None:
            self.stats.refused += 1
            raise SessionRefused("UNAUTHENTICATED", "the token is not the current owner's credential for this device")
        with self._lock:
            held = (sum(1 for p in self._portals.values() if p.partition_id == principal.id)
                    + sum(1 for q in self._irqs.values() if q.partition_id == principal.id))
        if held >= SESSIONS_PER_PARTITION:
            self.stats.refused += 1
            raise SessionRefused("RESOURCE_EXHAUSTED", f"partition {principal.id} holds {held} sessions on this "
                                                       "device (the limit); close one first")
        kind = request.get("kind")
        sid = next(self._ids)
        if kind == "portal":
            wq_id = request.get("wq", 0)
            if not isinstance(wq_id, int) or not 0 <= wq_id < self.device.config.num_wqs:
                raise SessionRefused("INVALID_ARGUMENT",
                                     f"no WQ {wq_id!r} (the device has {self.device.config.num_wqs})")
            dedicated = bool(self.device.wqcfg(wq_id).dedicated)
            region = Region.create(f"pviommu-portal-{sid}", L.ring_bytes(DESC_SIZE, PORTAL_SLOTS))
            ring = Ring(region, DESC_SIZE, PORTAL_SLOTS)
            bell = Doorbell()
            session = PortalSession(sid, principal.id, principal.epoch, wq_id, dedicated, region, ring, bell)
            with self._lock:
                self._portals[sid] = session
                if self._sleeping:
                    ring.set_sleeping(True)
            self._wake.ring()
            self.stats.opened += 1
            return Opened({"session": sid, "kind": "portal", "wq": wq_id, "dedicated": dedicated,
                           "slots": PORTAL_SLOTS, "slot_size": DESC_SIZE, "bytes": region.size,
                           "epoch": principal.epoch},
                          [region.fd, bell.fd], lambda: self._close_portal(sid, L.CloseReason.CLIENT_CLOSED))
        if kind == "interrupts":
            region = Region.create(f"pviommu-irq-{sid}", L.IRQ_PAGE)
            bell = Doorbell()
            irq = InterruptSession(sid, principal.id, principal.epoch, region, bell)
            with self._lock:
                self._irqs[sid] = irq
            self.stats.opened += 1
            return Opened({"session": sid, "kind": "interrupts", "vectors": L.IRQ_VECTORS, "bytes": region.size,
                           "epoch": principal.epoch},
                          [region.fd, bell.fd], lambda: self._close_irq(sid, L.CloseReason.CLIENT_CLOSED))
        raise SessionRefused("INVALID_ARGUMENT", f"unknown session kind {kind!r} (portal or interrupts)")

    def _close_portal(self, sid: int, reason: L.CloseReason) -> None:
        with self._lock:
            s = self._portals.pop(sid, None)
        if s is None:
            return
        s.ring.close(reason)
        s.doorbell.close()
        s.region.close()
        self.stats.closed += 1
        self._wake.ring()

    def _close_irq(self, sid: int, reason: L.CloseReason) -> None:
        with self._lock:
            irq = self._irqs.pop(sid, None)
        if irq is None:
            return
        irq.region.set_u32(L.IRQ_CLOSE_REASON, reason)
        irq.region.set_u32(L.IRQ_STATE, 2)
        irq.doorbell.ring()  # a waiter wakes and sees the end
        irq.doorbell.close()
        irq.region.close()
        self.stats.closed += 1

    def end_epochs_except(self, epoch: int) -> int:
        """The fence: close every session of another epoch (their owners see OWNER_CHANGED)."""
        with self._lock:
            portals = [sid for sid, s in self._portals.items() if s.epoch != epoch]
            irqs = [sid for sid, s in self._irqs.items() if s.epoch != epoch]
        for sid in portals:
            self._close_portal(sid, L.CloseReason.OWNER_CHANGED)
        for sid in irqs:
            self._close_irq(sid, L.CloseReason.OWNER_CHANGED)
        return len(portals) + len(irqs)

    # -- the engines' side -------------------------------------------------------------------
    def pull(self) -> int:
        """Move pending descriptors of current-epoch sessions into their WQs
        (called with the device's condition held); returns how many."""
        with self._lock:
            sessions = list(self._portals.values())
        if not sessions:
            return 0
        current = self.own.epoch()
        moved = 0
        for s in sessions:
            if s.epoch != current:
                continue  # the fence closes it; meanwhile nothing of it runs
            try:
                entries = s.ring.take(PULL_BATCH)
            except RingError as exc:
                self.stats.protocol_errors += 1
                log.warning("portal.protocol_error", session=s.id, error=str(exc),
                            header=bytes(s.region.view[:256]).hex())
                threading.Thread(target=self._close_portal, args=(s.id, L.CloseReason.PROTOCOL_ERROR),
                                 daemon=True).start()
                continue
            for index, raw in entries:
                accepted = self.device.submit(s.wq_id, raw, epoch=s.epoch)
                if not s.dedicated:
                    s.ring.answer(index, L.Answer.ACCEPTED if accepted else L.Answer.RETRY)
                    if not accepted:
                        self.stats.retries += 1
            moved += len(entries)
            s.taken += len(entries)
        self.stats.descriptors += moved
        return moved

    def pending(self) -> bool:
        """Cheap check (no device lock): does any ring hold something?"""
        with self._lock:
            sessions = list(self._portals.values())
        for s in sessions:
            try:
                if s.ring.tail != s.ring.head:
                    return True
            except (ValueError, OSError):
                continue
        return False

    def set_sleeping(self, sleeping: bool) -> None:
        """Every engine went to sleep (True) or one woke (False): tell the
        producers whether a doorbell is needed."""
        with self._lock:
            self._sleeping = sleeping
            sessions = list(self._portals.values())
        for s in sessions:
            s.ring.set_sleeping(sleeping)

    def _wake_loop(self) -> None:
        """While the engines sleep: wait on every portal doorbell; a ring pulls
        and wakes an engine."""
        while not self._stop:
            with self._lock:
                fds = {s.doorbell.fd: s for s in self._portals.values() if not s.doorbell.closed}
            try:
                ready, _, _ = select.select([self._wake.fd, *fds], [], [], 0.5)
            except (OSError, ValueError):
                continue  # a doorbell closed under us: read the set again
            if self._wake.fd in ready:
                self._wake.consume()
            rung = [fds[fd] for fd in ready if fd in fds]
            for s in rung:
                s.doorbell.consume()
            if rung:
                self.stats.wakeups += 1
                self.device.kick()

    # -- interrupts ------------------------------------------------------------------------
    def publish_interrupt(self, handle: int, epoch: int) -> None:
        """An MSI of a descriptor of ``epoch``: counted and rung on that epoch's interrupt pages."""
        with self._lock:
            irqs = [s for s in self._irqs.values() if s.epoch == epoch]
        if not 0 <= handle < L.IRQ_VECTORS:
            return
        for s in irqs:
            off = L.IRQ_COUNTS + 8 * handle
            try:
                s.region.set_u64(off, s.region.u64(off) + 1)
            except ValueError:  # closed meanwhile
                continue
            s.raised += 1
            s.doorbell.ring()

    # -- bookkeeping ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            open_portals, open_irqs = len(self._portals), len(self._irqs)
        st = self.stats
        return {"portal_sessions": open_portals, "interrupt_sessions": open_irqs, "sessions_opened": st.opened,
                "sessions_closed": st.closed, "sessions_refused": st.refused, "portal_descriptors": st.descriptors,
                "portal_retries": st.retries, "portal_protocol_errors": st.protocol_errors,
                "portal_wakeups": st.wakeups}

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake.ring()
        self._waker.join(5)
        with self._lock:
            portals, irqs = list(self._portals), list(self._irqs)
        for sid in portals:
            self._close_portal(sid, L.CloseReason.SERVICE_STOPPED)
        for sid in irqs:
            self._close_irq(sid, L.CloseReason.SERVICE_STOPPED)
        self._wake.close()
