"""The hostile-table and concurrency checks, extended to the PASID path (pviommu proposal,
not in the series): garbage in the scalable-mode structures or in a process's table
faults cleanly, never raises and never leads outside the owner's bank; a PASID detached
and invalidated while devices translate is unusable once the invalidation returned."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pviommu.addr import SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.pasid import SmFault, sm_context_hpa
from pviommu.pt.common import RW
from tests.kit.pasidkit import IOVA, SLOT_A, SLOT_B, MiB, World, build

_KNOWN = {int(r) for r in FaultReason} | {int(r) for r in SmFault}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build(Path(tmp_path_factory.mktemp("pasid-fuzz")), native=False)
    yield w
    w.host.close()


def _check(world: World, slot: int, pasid: int) -> None:
    for write in (False, True):
        runs = world.unit.translate(slot, Iova(IOVA), 3 * SZ_4K, write, pasid)
        if runs.fault is not None:
            assert runs.fault.reason in _KNOWN
        for run in runs.runs:  # whatever translated lies in the owner's RAM (bank 1)
            assert world.bank1.base <= run.hpa and run.hpa + run.length <= world.bank1.base + world.bank1.size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_in_the_scalable_mode_structures_faults_cleanly(world: World, data: st.DataObject) -> None:
    proc = world.process_table()
    proc.map(IOVA, Gpa(8 * MiB), 2 * SZ_4K, RW)
    world.tables.set_entry(SLOT_A, 1, world.nested(proc))
    bank2 = world.host.bank(2).read(0, 4 * MiB)
    ctx = sm_context_hpa(SLOT_A)
    targets = [ctx, Hpa(ctx + 8)]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.sampled_from(targets))
        value = data.draw(st.integers(0, (1 << 64) - 1) | st.sampled_from(
            [0x9, 0x1 | int(world.bank1.base), 0x9 | int(world.bank0.base) + 0x9000, 0xB | (1 << 51), 0x9 | 7 << 9]))
        world.host.write_u64(at, value)
    world.unit.invalidate_context(SLOT_A)
    try:
        _check(world, SLOT_A, data.draw(st.sampled_from([1, 2, 63, 64, 8191, 1 << 19])))
        assert world.host.bank(2).read(0, 4 * MiB) == bank2
    finally:
        world.tables.remove_device(SLOT_A)
        world.tables.add_device(SLOT_A)
        world.unit.invalidate_context(None)
        proc.destroy()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_hostile_process_table_under_a_pasid_faults_cleanly(world: World, data: st.DataObject) -> None:
    proc = world.process_table()
    proc.map(IOVA, Gpa(8 * MiB), 2 * SZ_4K, RW)
    world.tables.set_entry(SLOT_B, 3, world.nested(proc))
    pages = sorted({Gpa(step.table) for step in proc.walk(IOVA)})
    bank0, bank2 = world.bank0.read(0, world.bank0.size), world.host.bank(2).read(0, 4 * MiB)
    try:
        for _ in range(data.draw(st.integers(1, 8))):
            page = data.draw(st.sampled_from(pages))
            index = data.draw(st.integers(0, 511) | st.sampled_from([0, 255, 256, 511]))
            entry = data.draw(st.integers(0, (1 << 64) - 1) | st.builds(
                lambda a, f: a | f, st.sampled_from([*pages, 15 << 20, 16 << 20, 1 << 47]),
                st.sampled_from([0x27, 0x67, 0x23, 0x1, 0x8000_0000_0000_0027])))
            world.ram.write_u64(Gpa(page + index * 8), entry)
        world.unit.invalidate_pasid(9, 3)
        _check(world, SLOT_B, 3)
        assert world.bank0.read(0, world.bank0.size) == bank0  # the walk never writes the hypervisor's memory
        assert world.host.bank(2).read(0, 4 * MiB) == bank2
    finally:
        world.tables.clear_entry(SLOT_B, 3)
        world.unit.invalidate_pasid_cache(None, None)
        world.unit.invalidate_pasid(9, 3)


def test_a_pasid_detached_under_concurrent_translation_is_unusable_once_invalidated(world: World) -> None:
    proc = world.process_table()
    proc.map(IOVA, Gpa(8 * MiB), 16 * SZ_4K, RW)
    world.tables.set_entry(SLOT_A, 7, world.nested(proc))
    stop = threading.Event()
    after: list[bool] = []  # per translation started after the invalidation: did it succeed?
    done = threading.Event()
    errors: list[BaseException] = []

    def device() -> None:
        try:
            while not stop.is_set():
                late = done.is_set()
                runs = world.unit.translate(SLOT_A, Iova(IOVA), 16 * SZ_4K, True, 7)
                if late:
                    after.append(runs.fault is None)
        except BaseException as exc:  # collected, asserted in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=device) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        world.tables.clear_entry(SLOT_A, 7)
        world.unit.invalidate_pasid_cache(9, 7)
        world.unit.invalidate_pasid(9, 7)
        done.set()
        while len(after) < 30 and not errors:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert after and not any(after), "a translation after the invalidation returned used the detached PASID"
