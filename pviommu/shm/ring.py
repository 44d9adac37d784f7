"""A single-producer single-consumer ring of fixed-size slots in a shared
region (layout in ``pviommu.abi.shm``): portal descriptors from a guest to a
device, fault and page-request records from the hypervisor to a guest.

The producer writes the slot, then the tail; the consumer reads the tail,
then the slots, then writes the head. Each side trusts nothing the other
wrote: a consumer that finds the tail behind its head or more than ``slots``
ahead closes the ring as a protocol error instead of replaying garbage."""

from __future__ import annotations

from pviommu.abi import shm as L
from pviommu.shm.region import Region


class RingError(Exception):
    """The other side broke the ring (or closed it)."""


class Ring:
    """One ring over ``region`` (the consumer creates and formats it)."""

    def __init__(self, region: Region, slot_size: int = 0, slots: int = 0) -> None:
        self.region = region
        if slot_size:  # format a fresh ring
            if slots & (slots - 1) or not 0 < slots <= L.MAX_RING_SLOTS or slot_size % 8:
                raise ValueError(f"ring of {slots} x {slot_size} bytes")
            region.view[: L.RING_HEADER] = bytes(L.RING_HEADER)
            region.set_u32(L.R_SLOT_SIZE, slot_size)
            region.set_u32(L.R_SLOTS, slots)
            region.set_u64(L.R_MAGIC, L.RING_MAGIC)
        if region.u64(L.R_MAGIC) != L.RING_MAGIC:
            raise RingError("not a pviommu ring")
        self.slot_size = region.u32(L.R_SLOT_SIZE)
        self.slots = region.u32(L.R_SLOTS)
        self._closed_here = False
        if L.ring_bytes(self.slot_size, self.slots) > region.size:
            raise RingError("ring larger than its region")

    # -- both sides ------------------------------------------------------------------------
    @property
    def tail(self) -> int:
        return self.region.u64(L.R_TAIL)

    @property
    def head(self) -> int:
        return self.region.u64(L.R_HEAD)

    @property
    def state(self) -> L.ConsumerState:
        raw = self.region.u32(L.R_STATE)
        return L.ConsumerState(raw) if raw in (0, 1, 2) else L.ConsumerState.CLOSED

    @property
    def closed(self) -> bool:
        return self.state is L.ConsumerState.CLOSED

    @property
    def close_reason(self) -> L.CloseReason:
        raw = self.region.u32(L.R_CLOSE_REASON)
        return L.CloseReason(raw) if raw in L.CloseReason._value2member_map_ else L.CloseReason.PROTOCOL_ERROR

    def _slot(self, index: int) -> int:
        return L.RING_HEADER + (index % self.slots) * self.slot_size

    # -- producer -------------------------------------------------------------------------
    def room(self) -> int:
        return self.slots - (self.tail - self.head)

    def put(self, data: bytes) -> int:
        """Write one entry; returns its index (RingError when full or closed)."""
        if self.closed:
            raise RingError(f"ring closed: {self.close_reason.name}")
        tail = self.tail
        head = self.head
        if tail - head >= self.slots:
            raise RingError(f"ring full (tail {tail}, head {head}, {self.state.name}, "
                            f"header {bytes(self.region.view[:200]).hex()})")
        off = self._slot(tail)
        self.region.view[off : off + len(data)] = data
        self.region.view[L.R_ANSWERS + tail % self.slots] = L.Answer.NONE
        self.region.set_u64(L.R_TAIL, tail + 1)
        return tail

    def consumer_sleeping(self) -> bool:
        return self.region.u32(L.R_STATE) == L.ConsumerState.SLEEPING

    def answer_of(self, index: int) -> L.Answer:
        raw = self.region.view[L.R_ANSWERS + index % self.slots]
        return L.Answer(raw) if raw in (0, 1, 2, 3) else L.Answer.REFUSED

    # -- consumer -------------------------------------------------------------------------
    def pending(self) -> int:
        """Entries written and not consumed; RingError for an impossible tail."""
        n = self.tail - self.head
        if not 0 <= n <= self.slots:
            raise RingError(f"producer tail {self.tail} is {n} entries from head {self.head}")
        return n

    def take(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` entries as (index, bytes), consumed."""
        n = min(self.pending(), limit)
        head = self.head
        out = []
        for i in range(head, head + n):
            off = self._slot(i)
            out.append((i, bytes(self.region.view[off : off + self.slot_size])))
        self.region.set_u64(L.R_HEAD, head + n)
        return out

    def answer(self, index: int, answer: L.Answer) -> None:
        self.region.view[L.R_ANSWERS + index % self.slots] = answer

    def set_sleeping(self, sleeping: bool) -> None:
        if not self._closed_here:
            self.region.set_u32(L.R_STATE, L.ConsumerState.SLEEPING if sleeping else L.ConsumerState.POLLING)
            if self._closed_here:  # closed meanwhile by another thread of this side: closed stays closed
                self.region.set_u32(L.R_STATE, L.ConsumerState.CLOSED)

    def close(self, reason: L.CloseReason) -> None:
        self._closed_here = True
        self.region.set_u32(L.R_CLOSE_REASON, reason)
        self.region.set_u32(L.R_STATE, L.ConsumerState.CLOSED)
