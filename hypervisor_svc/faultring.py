"""Fault rings (docs/transports.md): a partition's faults and page requests
in shared memory, as VT-d records faults and queues page requests in memory.

A partition's credential holder opens a ``faults`` session on the
hypervisor's session socket and gets a ring of 64-byte ``FaultRecord``
slots (the hypervisor produces, the guest consumes) and a doorbell rung
when the guest announced it sleeps. The ring follows the partition's
``FaultLog`` like a gRPC stream does (the backlog after ``after`` first), but
costs no thread at all: the thread that appends a fault writes the slot. A
full ring drops the record and counts it in the header (``dropped``; the
sequence numbers show the gap), as VT-d's fault overflow does. The log's end
(partition reset or destroyed) closes the ring (OWNER_CHANGED).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from hypervisor_svc.core.faults import FaultEntry, FaultLog
from hypervisor_svc.core.host import Host
from hypervisor_svc.hcpage import partition_of
from pviommu.abi import shm as L
from pviommu.log import get_logger
from pviommu.shm.region import Doorbell, Region
from pviommu.shm.ring import Ring, RingError
from pviommu.shm.sessions import Opened, SessionRefused

log = get_logger("hypervisor.faultring")

#: fault rings one partition may hold at once (a guest agent needs one)
RINGS_PER_PARTITION = 2


@dataclass(eq=False)
class FaultRingSession:
    """One ring; a ``FaultLog`` follower (``put``/``close`` run in the log's lock)."""

    id: int
    partition_id: int
    log: FaultLog
    region: Region
    ring: Ring
    doorbell: Doorbell
    written: int = 0
    dropped: int = 0
    closed: bool = False
    released: bool = False
    #: put, close and release exclude each other: no slot or doorbell is touched after release
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def put(self, e: FaultEntry) -> None:
        with self.lock:
            if not self.closed:
                self._put(e)

    def _put(self, e: FaultEntry) -> None:
        rec = L.FaultRecord(e.sequence, e.logical_device_id, e.iova, e.request_id, e.reason, e.domain_id, e.write,
                            e.page_request, e.timestamp, e.pasid)
        try:
            self.ring.put(rec.pack())
            self.written += 1
        except RingError:  # full (or the guest broke it): dropped and counted, the producer never waits
            self.dropped += 1
            self.region.set_u64(L.R_DROPPED, self.dropped)
        except ValueError:  # unmapped meanwhile
            return
        if self.ring.consumer_sleeping():
            self.doorbell.ring()

    def close(self, reason: L.CloseReason = L.CloseReason.OWNER_CHANGED) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.ring.close(reason)
            self.doorbell.ring()

    def release(self) -> None:
        self.close(L.CloseReason.CLIENT_CLOSED)
        with self.lock:
            if not self.released:
                self.released = True
                self.doorbell.close()
                self.region.close()


class FaultRings:
    """The fault-ring sessions of one hypervisor (an opener of its session socket)."""

    def __init__(self, host: Host, *, per_partition: int = RINGS_PER_PARTITION) -> None:
        self.host = host
        self.per_partition = per_partition
        self._lock = threading.Lock()
        self._sessions: dict[int, FaultRingSession] = {}
        self._ids = itertools.count(1)

    def open(self, request: dict[str, object]) -> Opened:
        part, _ = partition_of(self.host, request)
        after = request.get("after", 0)
        if not isinstance(after, int) or after < 0:
            raise SessionRefused("INVALID_ARGUMENT", f"after must be a sequence number, not {after!r}")
        faults = part.faults
        if faults is None:
            raise SessionRefused("FAILED_PRECONDITION", "the partition keeps no fault log")
        with self._lock:
            held = sum(1 for s in self._sessions.values() if s.partition_id == part.partition_id and not s.closed)
            if held >= self.per_partition:
                raise SessionRefused("RESOURCE_EXHAUSTED", f"partition {part.partition_id} holds {held} fault "
                                                           "rings (the limit); close one first")
            sid = next(self._ids)
            region = Region.create(f"pviommu-faults-{sid}", L.ring_bytes(L.FAULT_RECORD, L.FAULT_RING_SLOTS))
            s = FaultRingSession(sid, part.partition_id, faults, region, Ring(region, L.FAULT_RECORD,
                                                                              L.FAULT_RING_SLOTS), Doorbell())
            self._sessions[sid] = s
        for e in faults.subscribe(s, after):  # the backlog, then every new entry (none lost or doubled)
            s.put(e)
        log.info("faultring.opened", partition=part.partition_id, session=sid, after=after)
        return Opened({"session": sid, "kind": "faults", "bytes": region.size, "slots": L.FAULT_RING_SLOTS,
                       "slot_size": L.FAULT_RECORD, "partition_id": part.partition_id},
                      [region.fd, s.doorbell.fd], lambda: self._end(sid))

    def _end(self, sid: int) -> None:
        """The guest closed its session socket."""
        with self._lock:
            s = self._sessions.pop(sid, None)
        if s is None:
            return
        s.log.unsubscribe(s)
        s.release()
        log.info("faultring.closed", partition=s.partition_id, session=sid, written=s.written, dropped=s.dropped)

    def held(self, partition_id: int) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.partition_id == partition_id and not s.closed)

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for sid in sessions:
            self._end(sid)
