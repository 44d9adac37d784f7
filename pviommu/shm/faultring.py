"""The guest's side of a fault ring (``hypervisor_svc.faultring``,
docs/transports.md): its partition's faults and page requests as 64-byte
records in shared memory, with a doorbell the hypervisor rings when the
reader announced it sleeps.

The ring is closed by the hypervisor (the partition was reset or destroyed:
``close_reason`` set, which this side never writes) or ends with the
session socket (the hypervisor is gone)."""

from __future__ import annotations

import socket

from pviommu.abi import shm as L
from pviommu.shm.region import adaptive_wait
from pviommu.shm.ring import Ring, RingError
from pviommu.shm.sessions import SessionError, open_region_session

#: how long a reader polls the ring before it sleeps on the doorbell
READER_SPIN_S = 0.0002


class RingClosed(Exception):
    def __init__(self, reason: L.CloseReason) -> None:
        super().__init__(f"the fault ring is closed: {reason.name}")
        self.reason = reason


class FaultRingReader:
    """One fault ring session of the partition whose ``token`` opens it."""

    def __init__(self, path: str, token: str, *, after: int = 0, timeout: float = 10.0) -> None:
        try:
            opened = open_region_session(path, {"token": token, "kind": "faults", "after": after}, doorbells=1,
                                         timeout=timeout)
        except SessionError as exc:
            if exc.code != "PROTOCOL_ERROR":
                raise
            raise RingClosed(L.CloseReason.PROTOCOL_ERROR) from exc
        try:
            self.ring = Ring(opened.region)
        except RingError:  # not a ring: nothing of the session stays open
            opened.close()
            raise
        self.region, self.sock, self.session = opened.region, opened.sock, opened.session
        (self.doorbell,) = opened.doorbells
        self._ended: L.CloseReason | None = None

    def _reason(self) -> L.CloseReason | None:
        if self._ended is not None:
            return self._ended
        raw = self.region.u32(L.R_CLOSE_REASON)
        if raw:
            self._ended = L.CloseReason(raw) if raw in L.CloseReason._value2member_map_ else \
                L.CloseReason.PROTOCOL_ERROR
        else:
            try:
                if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self._ended = L.CloseReason.SERVICE_STOPPED
            except BlockingIOError:
                pass
            except OSError:
                self._ended = L.CloseReason.SERVICE_STOPPED
        return self._ended

    @property
    def dropped(self) -> int:
        """Records the hypervisor could not write because the ring was full."""
        return self.region.u64(L.R_DROPPED)

    def read(self, timeout: float, limit: int = 64) -> list[L.FaultRecord]:
        """The records that arrived (waiting up to ``timeout`` for the first);
        RingClosed once the ring has ended and is drained."""
        def ready() -> bool:
            return self.ring.tail != self.ring.head or self._reason() is not None

        adaptive_wait(ready, self.doorbell, spin_s=READER_SPIN_S, timeout=timeout,
                      announce_sleep=lambda s: self.region.set_u32(L.R_STATE, int(s)) if self._reason() is None
                      else None)
        try:
            entries = self.ring.take(limit)
        except RingError as exc:  # the producer broke the ring: nothing more is trusted
            raise RingClosed(L.CloseReason.PROTOCOL_ERROR) from exc
        if not entries and (reason := self._reason()) is not None:
            raise RingClosed(reason)
        return [L.FaultRecord.unpack(raw) for _, raw in entries]

    def stop(self) -> None:
        """Make a ``read`` in another thread return now (it raises RingClosed(CLIENT_CLOSED))."""
        self._ended = L.CloseReason.CLIENT_CLOSED
        self.doorbell.ring()

    def close(self) -> None:
        self.sock.close()
        self.doorbell.close()
        self.region.close()
