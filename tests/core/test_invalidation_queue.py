"""Queued invalidation in shared memory: a flush returns only after the unit
executed every descriptor and wrote the wait status; a stalled unit times out
(UnitStalled); a vanished one is reported as gone (UnitGone). Descriptor
layouts are checked against values written by hand from VT-d 6.5.2."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest

from pviommu.abi import invq as layout
from pviommu.abi.invq import Invalidation, OwnerFence, PageResponse, PageResponseCode, QueueItem, Scope, Wait
from pviommu.errors import UnitGone, UnitStalled
from pviommu.mem.bank import HostMemory
from pviommu.shm import invq


class RecordingUnit:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, object]] = []
        self.delay = delay

    def invalidate_context(self, slot: int | None = None) -> None:
        self.calls.append(("context", slot))

    def invalidate_all(self) -> int:
        self.calls.append(("all", None))
        return 0

    def invalidate_domain(self, did: int) -> int:
        time.sleep(self.delay)
        self.calls.append(("domain", did))
        return 0

    def invalidate_pages(self, did: int, addr: int, am: int) -> int:
        self.calls.append(("pages", (did, addr, am)))
        return 0

    def handle(self, item: QueueItem) -> None:
        if isinstance(item, Invalidation):
            item.apply(self)
        else:
            self.calls.append((type(item).__name__, item))


@pytest.fixture
def memory(tmp_path: Path) -> HostMemory:
    mem = HostMemory(tmp_path)
    mem.create_bank(0, 4 << 20)
    return mem


def qw(raw: bytes) -> tuple[int, int]:
    a, b = struct.unpack("<QQ", raw)
    return int(a), int(b)


# -- layouts (hand-computed) ------------------------------------------------------------
def test_descriptors_pack_to_the_vtd_bit_positions() -> None:
    # IOTLB (type 2), page granularity G=3 at bits 5:4, DID at 31:16; qw1 ADDR 63:12 | AM 5:0
    assert qw(layout.pack(Invalidation.pages(0x1234, 0x7FFF_F000_0000, 4))) == (0x1234_0032, 0x7FFF_F000_0004)
    assert qw(layout.pack(Invalidation.domain(7))) == (0x7_0022, 0)
    assert qw(layout.pack(Invalidation.everything())) == (0x12, 0)
    # context-cache (type 1): device granularity G=3, SID at 47:32; global G=1
    assert qw(layout.pack(Invalidation.context(0x2A))) == (0x2A_0000_0031, 0)
    assert qw(layout.pack(Invalidation.context(None))) == (0x11, 0)
    # invalidation wait (type 5): SW bit 5, status data 63:32; qw1 the status address
    assert qw(layout.pack(Wait(0xCAFE, 0x100_0001_0010))) == (0xCAFE_0000_0025, 0x100_0001_0010)
    # page group response (type 9): response code 63:60, SID 47:32; qw1 the request id
    assert qw(layout.pack(PageResponse(3, 99, PageResponseCode.INVALID))) == (0x1000_0003_0000_0009, 99)
    # ownership fence (pviommu's type 0xF): qw1 the epoch
    assert qw(layout.pack(OwnerFence(0x1_0000_0005))) == (0xF, 0x1_0000_0005)


@pytest.mark.parametrize("item", [
    Invalidation.pages(5, 0x20_0000, 9), Invalidation.domain(0xFFFF), Invalidation.everything(),
    Invalidation.context(7), Invalidation.context(None), OwnerFence(12), PageResponse(1, 1 << 40,
                                                                                     PageResponseCode.SUCCESS),
    Wait(1, 0x100_0000_0010),
])
def test_every_item_decodes_to_itself(item: QueueItem | Wait) -> None:
    assert layout.unpack(layout.pack(item)) == item


def test_unknown_descriptor_types_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        layout.decode(0x3, 0)  # device-TLB invalidation: not modelled
    with pytest.raises(ValueError):
        Invalidation(Scope.PAGES, 1, 0x1234, 0)  # not 4 KiB aligned
    with pytest.raises(ValueError):
        Invalidation(Scope.DOMAIN, 0x1_0000)


# -- the transport -------------------------------------------------------------------
def test_flush_returns_after_the_unit_applied_every_descriptor_in_order(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 3)
    consumer = invq.QueueConsumer(memory, 3, unit.handle)
    host = invq.QueueHost(memory)
    try:
        w = host.writer(3)
        w.submit([Invalidation.context(3), Invalidation.domain(7), Invalidation.pages(7, 0x7FFF_F000_0000, 4),
                  Invalidation.everything(), OwnerFence(2)], 5.0)
        assert unit.calls == [("context", 3), ("domain", 7), ("pages", (7, 0x7FFF_F000_0000, 4)), ("all", None),
                              ("OwnerFence", OwnerFence(2))]
        for i in range(3 * layout.RING_ENTRIES):  # the ring wraps many times
            w.submit([Invalidation.domain(i & 0xFFFF)], 5.0)
        assert len(unit.calls) == 5 + 3 * layout.RING_ENTRIES
    finally:
        host.close()
        consumer.close()


def test_posted_items_are_applied_without_a_wait(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 4)
    consumer = invq.QueueConsumer(memory, 4, unit.handle)
    host = invq.QueueHost(memory)
    try:
        host.writer(4).post([PageResponse(4, 17, PageResponseCode.SUCCESS)], 1.0)
        deadline = time.monotonic() + 5
        while not unit.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert unit.calls == [("PageResponse", PageResponse(4, 17, PageResponseCode.SUCCESS))]
    finally:
        host.close()
        consumer.close()


def test_an_unserved_queue_is_reported_gone(memory: HostMemory) -> None:
    invq.reset_queue(memory, 5)
    host = invq.QueueHost(memory)
    try:
        with pytest.raises(UnitGone):
            host.writer(5)
    finally:
        host.close()


class GatedUnit(RecordingUnit):
    """A unit stuck in a domain invalidation until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def invalidate_domain(self, did: int) -> int:
        self.gate.wait(60)
        return super().invalidate_domain(did)


def test_a_stalled_unit_makes_the_flush_time_out_instead_of_hanging(memory: HostMemory) -> None:
    unit = GatedUnit()
    invq.reset_queue(memory, 1)
    consumer = invq.QueueConsumer(memory, 1, unit.handle)
    host = invq.QueueHost(memory)
    try:
        w = host.writer(1)
        # the unit stays stuck until after the raise: a submit that waited for it could not return
        with pytest.raises(UnitStalled):
            w.submit([Invalidation.domain(1)], 0.3)
        assert unit.calls == []
    finally:
        unit.gate.set()
        host.close()
        consumer.close()


def test_a_paused_unit_times_out_and_answers_once_resumed(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 6)
    consumer = invq.QueueConsumer(memory, 6, unit.handle)
    host = invq.QueueHost(memory)
    try:
        consumer.paused.set()
        with pytest.raises(UnitStalled):
            host.writer(6).submit([Invalidation.domain(1)], 0.2)
        assert unit.calls == []
        consumer.paused.clear()
        host.writer(6).submit([Invalidation.domain(2)], 5.0)  # the late one is applied first, in order
        assert unit.calls == [("domain", 1), ("domain", 2)]
    finally:
        host.close()
        consumer.close()


def test_a_unit_whose_process_is_gone_is_reported_gone(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 2)
    consumer = invq.QueueConsumer(memory, 2, unit.handle)
    host = invq.QueueHost(memory)
    try:
        w = host.writer(2)
        # a crash: the socket is gone but the page still says "ready"
        consumer._stop = True
        consumer._sock.close()
        consumer._reply.close()
        Path(consumer.path).unlink()
        with pytest.raises(UnitGone):
            w.submit([Invalidation.domain(1)], 1.0)
    finally:
        host.close()


def test_a_bad_descriptor_is_consumed_and_counted_and_later_flushes_still_complete(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 7)
    consumer = invq.QueueConsumer(memory, 7, unit.handle)
    host = invq.QueueHost(memory)
    try:
        w = host.writer(7)
        base = invq.queue_hpa(7)
        tail = memory.read_u64(base + layout.TAIL_OFFSET)
        memory.write(base + layout.RING_OFFSET + (tail % layout.RING_ENTRIES) * 16, struct.pack("<QQ", 0x3, 0))
        memory.write_u64(base + layout.TAIL_OFFSET, tail + 1)
        w.submit([Invalidation.domain(9)], 5.0)
        assert consumer.errors == 1 and unit.calls == [("domain", 9)]
    finally:
        host.close()
        consumer.close()


def test_concurrent_flushes_to_two_units_each_wait_for_their_own_status(memory: HostMemory) -> None:
    units = [RecordingUnit(), RecordingUnit()]
    consumers = []
    for slot, unit in enumerate(units):
        invq.reset_queue(memory, slot)
        consumers.append(invq.QueueConsumer(memory, slot, unit.handle))
    host = invq.QueueHost(memory)
    errors: list[BaseException] = []

    def flood(slot: int) -> None:
        try:
            w = host.writer(slot)
            for i in range(200):
                w.submit([Invalidation.domain(i)], 5.0)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=flood, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert [len(u.calls) for u in units] == [200, 200]
    finally:
        host.close()
        for c in consumers:
            c.close()
