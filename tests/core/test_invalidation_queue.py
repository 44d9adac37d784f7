"""Queued invalidation in shared memory: a flush returns only after the unit
executed every descriptor and wrote the wait status; a stalled unit times out;
a vanished one is reported as gone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pviommu.errors import DeviceUnavailable
from pviommu.iommu import invq
from pviommu.mem.bank import HostMemory


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


@pytest.fixture
def memory(tmp_path: Path) -> HostMemory:
    mem = HostMemory(tmp_path)
    mem.create_bank(0, 4 << 20)
    return mem


def test_flush_returns_after_the_unit_applied_every_descriptor_in_order(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 3)
    consumer = invq.QueueConsumer(memory, 3, invq.apply_to_unit(unit))  # type: ignore[arg-type]
    host = invq.QueueHost(memory)
    try:
        w = host.writer(3)
        assert w is not None
        w.submit([invq.context_desc(3), invq.iotlb_desc(invq.G_DOMAIN, 7),
                  invq.iotlb_desc(invq.G_PAGE, 7, 0x7FFF_F000_0000, 4), invq.iotlb_desc(invq.G_GLOBAL)], 5.0)
        assert unit.calls == [("context", 3), ("domain", 7), ("pages", (7, 0x7FFF_F000_0000, 4)), ("all", None)]
        for i in range(3 * invq.RING_ENTRIES):  # the ring wraps many times
            w.submit([invq.iotlb_desc(invq.G_DOMAIN, i & 0xFFFF)], 5.0)
        assert len(unit.calls) == 4 + 3 * invq.RING_ENTRIES
    finally:
        host.close()
        consumer.close()


def test_an_unserved_queue_is_reported_so_the_caller_can_fall_back(memory: HostMemory) -> None:
    invq.reset_queue(memory, 5)
    host = invq.QueueHost(memory)
    try:
        assert host.writer(5) is None
    finally:
        host.close()


def test_a_stalled_unit_makes_the_flush_time_out_instead_of_hanging(memory: HostMemory) -> None:
    unit = RecordingUnit(delay=2.0)
    invq.reset_queue(memory, 1)
    consumer = invq.QueueConsumer(memory, 1, invq.apply_to_unit(unit))  # type: ignore[arg-type]
    host = invq.QueueHost(memory)
    try:
        w = host.writer(1)
        assert w is not None
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable):
            w.submit([invq.iotlb_desc(invq.G_DOMAIN, 1)], 0.3)
        assert time.monotonic() - started < 1.5
    finally:
        host.close()
        consumer.close()


def test_a_unit_whose_process_is_gone_is_reported_unavailable(memory: HostMemory) -> None:
    unit = RecordingUnit()
    invq.reset_queue(memory, 2)
    consumer = invq.QueueConsumer(memory, 2, invq.apply_to_unit(unit))  # type: ignore[arg-type]
    host = invq.QueueHost(memory)
    try:
        w = host.writer(2)
        assert w is not None
        # a crash: the socket is gone but the page still says "ready"
        consumer._stop = True
        consumer._sock.close()
        consumer._reply.close()
        Path(consumer.path).unlink()
        with pytest.raises(invq.QueueUnavailable):
            w.submit([invq.iotlb_desc(invq.G_DOMAIN, 1)], 1.0)
    finally:
        host.close()


def test_concurrent_flushes_to_two_units_each_wait_for_their_own_status(memory: HostMemory) -> None:
    units = [RecordingUnit(), RecordingUnit()]
    consumers = []
    for slot, unit in enumerate(units):
        invq.reset_queue(memory, slot)
        consumers.append(invq.QueueConsumer(memory, slot, invq.apply_to_unit(unit)))  # type: ignore[arg-type]
    host = invq.QueueHost(memory)
    errors: list[BaseException] = []

    def flood(slot: int) -> None:
        try:
            w = host.writer(slot)
            assert w is not None
            for i in range(200):
                w.submit([invq.iotlb_desc(invq.G_DOMAIN, i)], 5.0)
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
