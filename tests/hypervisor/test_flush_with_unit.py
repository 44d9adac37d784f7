"""Flush semantics against a real IOMMU unit behind a fake device server.

The guest (this test) builds a 4-level stage-1 table in its own RAM, points
a domain at it, attaches the device and warms the unit's IOTLB by
translating; the hypervisor's flushes must then reach that unit before the
hypercall returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from pviommu.addr import Gpa, Iova
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import bank_base
from pviommu.pt.common import Perm
from pviommu.pt.gather import IotlbGather
from pviommu.v1 import hypervisor_pb2
from tests.kit.hvkit import (
    CALL_TIMEOUT,
    FLUSH,
    INVALID_DEVICE_STATE,
    PAGE,
    SELF,
    SUCCESS,
    TIME_OUT,
    GuestDevice,
    MiB,
)
from tests.kit.nested import guest_tables

FLUSH_TIMEOUT = 0.5
IOVA0 = 0x4000_0000
DATA_GPA = 4 * MiB
PAGES = 8
DOM = 7


@dataclass
class Rig(GuestDevice):
    tag: int = 0

    def iova(self, i: int) -> Iova:
        return Iova(IOVA0 + i * PAGE)

    def translate(self, i: int, write: bool = False):  # type: ignore[no-untyped-def]
        return self.unit.translate(self.slot, self.iova(i), PAGE, write)

    def cached(self, i: int) -> bool:
        return self.unit.iotlb.lookup(self.tag, int(self.iova(i)), count=False) is not None

    def warm(self) -> None:
        for i in range(PAGES):
            runs = self.translate(i)
            assert runs.fault is None, runs.fault
            assert runs.runs[0].hpa == bank_base(self.guest.pid) + DATA_GPA + i * PAGE
        assert all(self.cached(i) for i in range(PAGES))


@pytest.fixture
def rig(make_hv) -> Rig:
    env = make_hv("--flush-timeout", str(FLUSH_TIMEOUT))
    side = env.guest_device("g", 16 * MiB, dom=DOM)  # tables in [1M, 2M) of its RAM, data from 4M
    for i in range(PAGES):
        side.s1.map(Iova(IOVA0 + i * PAGE), Gpa(DATA_GPA + i * PAGE), PAGE, Perm.READ | Perm.WRITE)
    tag = env.domains(side.guest.pid)[(side.guest.pid, DOM)].tag
    r = Rig(side.env, side.guest, side.fake, side.dev, side.slot, side.tables, tag)
    r.warm()
    return r


def test_translation_goes_through_guest_stage1_and_hypervisor_stage2(rig: Rig) -> None:
    runs = rig.translate(3, write=True)
    assert runs.fault is None
    assert runs.runs[0].hpa == bank_base(rig.guest.pid) + DATA_GPA + 3 * PAGE  # HPA, not the GPA


def test_flush_device_domain_returns_only_after_the_unit_dropped_the_domain(rig: Rig) -> None:
    rig.fake.servicer.delay = 0.2  # a slow unit: the hypercall must wait for it
    t0 = time.monotonic()
    assert rig.guest.flush(DOM) == SUCCESS
    returned = time.monotonic()
    assert not any(rig.cached(i) for i in range(PAGES))
    assert returned - t0 >= 0.2
    assert rig.fake.servicer.done_at[-1] <= returned


def test_flush_makes_a_guest_unmap_visible_to_the_device(rig: Rig) -> None:
    gather: IotlbGather[Gpa] = IotlbGather()
    assert rig.s1.unmap(rig.iova(2), PAGE, gather) == PAGE
    # without a flush the unit still uses its cached translation (the hazard)
    assert rig.translate(2).fault is None
    assert rig.guest.flush(DOM) == SUCCESS
    runs = rig.translate(2)
    assert runs.fault is not None and runs.runs == []
    assert rig.translate(1).fault is None  # re-walked, still mapped


def test_flush_list_drops_only_the_selected_pages(rig: Rig) -> None:
    gather: IotlbGather[Gpa] = IotlbGather()
    rig.s1.unmap(rig.iova(1), PAGE, gather)
    rig.s1.unmap(rig.iova(4), 4 * PAGE, gather)
    page0 = int(rig.iova(0)) >> 12
    status, reps = rig.guest.flush_list(DOM, [(page0 + 1, 0), (page0 + 4, 2)])
    assert (status, reps) == (SUCCESS, 2)
    assert [rig.cached(i) for i in range(PAGES)] == [True, False, True, True, False, False, False, False]
    walks, hits = rig.unit.stats.walks, rig.unit.iotlb.stats.hits
    for i in (0, 2, 3):  # the others still hit, no walk
        assert rig.translate(i).fault is None
    assert rig.unit.stats.walks == walks and rig.unit.iotlb.stats.hits == hits + 3
    for i in (1, 4, 5, 6, 7):  # the flushed ones walk again and fault
        assert rig.translate(i).fault is not None


def test_reconfigure_makes_the_unit_walk_the_new_root(rig: Rig) -> None:
    s1b = guest_tables(rig.guest.ram(rig.env.host_memory()), (2 * MiB, 3 * MiB)).s1
    s1b.map(rig.iova(0), Gpa(6 * MiB), PAGE, Perm.READ | Perm.WRITE)
    assert rig.guest.configure(DOM, int(s1b.root)) == SUCCESS
    assert not rig.cached(0)
    assert rig.translate(0).runs[0].hpa == bank_base(rig.guest.pid) + 6 * MiB
    assert rig.translate(1).fault is not None  # not in the new table


def test_detach_leaves_no_entry_and_blocks_the_device(rig: Rig) -> None:
    assert rig.guest.detach(rig.dev) == SUCCESS
    assert not any(rig.cached(i) for i in range(PAGES))
    runs = rig.translate(0)
    assert runs.fault is not None and runs.fault.reason == 0x59  # context not present (blocked)


def test_unit_that_never_answers_makes_the_flush_time_out(rig: Rig) -> None:
    rig.fake.servicer.hang.set()
    before = rig.env.host.snapshot()
    # the unit hangs until released below, so an answer at all is the deadline at work
    assert rig.guest.flush(DOM) == TIME_OUT == 0x78
    # the raw ABI answers the same
    data = bytearray(32)
    data[0:8] = SELF.to_bytes(8, "little")
    data[16:24] = (1 | DOM << 32).to_bytes(8, "little")
    status, reps, out = rig.guest.raw(FLUSH, bytes(data))
    assert (status, reps, out) == (TIME_OUT, 0, b"")
    assert rig.env.host.snapshot() == before
    status_list, _ = rig.guest.flush_list(DOM, [(0, 0)])
    assert status_list == TIME_OUT
    # a slow unit is not a lost one: once it answers again, flushes succeed
    rig.fake.servicer.hang.clear()
    rig.fake.servicer.release.set()
    assert rig.env.admin_devices()[rig.dev].reachable
    assert rig.guest.flush(DOM) == SUCCESS


def test_unit_whose_server_stopped_is_dropped_and_flushes_still_succeed(rig: Rig) -> None:
    rig.fake.stop()
    t0 = time.monotonic()
    assert rig.guest.flush(DOM) == SUCCESS
    assert time.monotonic() - t0 < FLUSH_TIMEOUT + 2.0
    info = rig.env.admin_devices()[rig.dev]
    assert not info.reachable
    assert rig.env.host.tables.read_context_raw(rig.slot) == bytes(64)  # blocked
    assert rig.env.host.counters.stats.get("devices_lost") == 1
    # any unit that reads the context now (a restarted one) finds the device blocked
    fresh = IommuUnit(rig.env.host_memory())
    runs = fresh.translate(rig.slot, rig.iova(0), PAGE, False)
    assert runs.fault is not None and runs.fault.reason == 0x59
    # and the guest's other calls keep working
    assert rig.guest.flush_list(DOM, [(0, 0)]) == (SUCCESS, 1)
    assert rig.guest.detach(rig.dev) == SUCCESS
    assert rig.guest.detach(rig.dev) == INVALID_DEVICE_STATE
    assert rig.guest.delete(DOM) == SUCCESS


def test_flush_reaches_only_units_that_may_cache_the_domain(rig: Rig) -> None:
    other_fake = rig.env.fake_device()
    other_dev, _, _ = rig.env.device("dsa1", rig.guest, fake=other_fake, function=1)
    assert rig.guest.create(DOM + 1) == SUCCESS
    assert rig.guest.configure(DOM + 1, int(rig.s1.root)) == SUCCESS
    assert rig.guest.attach(DOM + 1, other_dev) == SUCCESS
    n = len(other_fake.servicer.invalidations)
    assert rig.guest.flush(DOM) == SUCCESS
    assert len(other_fake.servicer.invalidations) == n  # the other unit never held DOM's tag
    stub_reply = rig.guest.stub.FlushDeviceDomain(hypervisor_pb2.FlushDeviceDomainRequest(
        device_domain=hypervisor_pb2.DeviceDomain(partition_id=SELF, domain_type=1, domain_id=DOM + 1)),
        timeout=CALL_TIMEOUT)
    assert stub_reply.result.status == SUCCESS
    assert len(other_fake.servicer.invalidations) == n + 1
