"""The guest's side of the device's shared-memory data plane
(``dma_device.portals``, docs/transports.md): portal rings to post
descriptors into, and the interrupt page the device rings.

A ``ShmPortal`` is one producer's portal session for one WQ: a dedicated WQ
is posted (MOVDIR64B: write the slot and the tail, ring only when the
device sleeps), a shared WQ waits for the slot's answer (ENQCMDS: accepted
or retry). The session's Unix socket stays open while it lives: the device
closes the ring when its owner changes (the next post or check raises), and
the socket's end tells that the device's process is gone.
"""

from __future__ import annotations

import os
import threading
import time

from guest_agent.errors import DeviceCommandFailed
from pviommu.abi import shm as L
from pviommu.shm.ring import Ring, RingError
from pviommu.shm.sessions import open_region_session, peer_alive

#: how long a shared-WQ submission waits for its answer before giving up
ANSWER_TIMEOUT_S = 5.0


class PortalClosed(DeviceCommandFailed):
    """The device ended this portal session (its owner changed, it stopped, or
    it found the ring broken); ``reason`` says which."""

    def __init__(self, reason: L.CloseReason, detail: str = "") -> None:
        super().__init__(f"the device closed its portal session: {reason.name}{': ' + detail if detail else ''}")
        self.reason = reason


#: how often ``check`` asks the kernel whether the device's process is still there (the ring's
#: closed flag, a memory read, is checked every time)
ALIVE_CHECK_S = 0.005


class ShmPortal:
    """One portal session (one producer at a time: the driver checks it out)."""

    def __init__(self, path: str, token: str, wq_id: int) -> None:
        opened = open_region_session(path, {"token": token, "kind": "portal", "wq": wq_id}, doorbells=1)
        reply, self.sock, self.session = opened.reply, opened.sock, opened.session
        self.wq_id = wq_id
        self.dedicated = bool(reply["dedicated"])
        self._alive_at = 0.0
        self.epoch = int(reply["epoch"])
        self.region, (self.doorbell,) = opened.region, opened.doorbells
        self.ring = Ring(self.region)

    def check(self) -> None:
        """Raise if the session is over (closed by the device, or the device is gone)."""
        if self.ring.closed:
            raise PortalClosed(self.ring.close_reason)
        now = time.monotonic()
        if now - self._alive_at < ALIVE_CHECK_S:
            return
        self._alive_at = now
        if not peer_alive(self.sock):
            raise PortalClosed(L.CloseReason.SERVICE_STOPPED, "the device's process is gone")

    def _put(self, descriptor: bytes) -> int:
        try:
            index = self.ring.put(descriptor)
        except RingError as exc:
            self.check()
            raise DeviceCommandFailed(f"portal session {self.session}: {exc}") from exc
        if self.ring.consumer_sleeping():
            self.doorbell.ring()
        return index

    def post(self, descriptor: bytes) -> None:
        """A posted write (a dedicated WQ): returns at once."""
        if self.ring.closed:
            raise PortalClosed(self.ring.close_reason)
        self._put(descriptor)

    def write(self, descriptor: bytes) -> bool:
        """A non-posted write (a shared WQ): True accepted, False retry."""
        if self.ring.closed:
            raise PortalClosed(self.ring.close_reason)
        index = self._put(descriptor)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        spins = 0
        while True:
            answer = self.ring.answer_of(index)
            if answer is L.Answer.ACCEPTED:
                return True
            if answer is L.Answer.RETRY:
                return False
            if answer is L.Answer.REFUSED:
                raise DeviceCommandFailed(f"portal session {self.session}: the device refused the descriptor")
            spins += 1
            if spins % 64 == 0:
                self.check()
                if time.monotonic() > deadline:
                    raise DeviceCommandFailed(f"portal session {self.session}: no answer in {ANSWER_TIMEOUT_S}s")
                if self.ring.consumer_sleeping():
                    self.doorbell.ring()
            if spins < 256:
                os.sched_yield()
            else:
                time.sleep(0.0001)

    def close(self) -> None:
        self.sock.close()
        self.doorbell.close()
        self.region.close()


class ShmInterrupts:
    """The device's completion interrupts through an interrupt page: a thread
    waits on its doorbell, counts and wakes every waiter (which then checks
    its own record -- an interrupt names a vector, not a descriptor)."""

    def __init__(self, path: str, token: str) -> None:
        opened = open_region_session(path, {"token": token, "kind": "interrupts"}, doorbells=1)
        self.sock, self.region, (self.doorbell,) = opened.sock, opened.region, opened.doorbells
        self._cv = threading.Condition()
        self.count = 0
        self.alive = True
        self._stop = False
        self._thread = threading.Thread(target=self._listen, name="dsa-interrupts", daemon=True)
        self._thread.start()

    def _closed(self) -> bool:
        return self.region.u32(L.IRQ_STATE) == 2 or not peer_alive(self.sock)

    def _listen(self) -> None:
        try:
            while not self._stop:
                rung = self.doorbell.rings(0.5)  # interrupts since the last look (the eventfd sums them)
                if self._closed():
                    return
                if rung:
                    with self._cv:
                        self.count += rung
                        self._cv.notify_all()
        finally:
            with self._cv:
                self.alive = False
                self._cv.notify_all()

    def vector_count(self, vector: int) -> int:
        return self.region.u64(L.IRQ_COUNTS + 8 * vector)

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout``, or until the next interrupt."""
        with self._cv:
            if self.alive:
                self._cv.wait(timeout)
            else:
                time.sleep(timeout)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        self.doorbell.close()
        self.region.close()
