"""The IOMMU unit and the slot's owner record (pviommu.iommu.owner): nothing
cached under one owner is used under the next, even when no invalidation
reaches the unit; nothing walked under a context is inserted after that
context was invalidated; the record layout is the one the module documents."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pviommu.addr import SZ_4K, Gpa, Iova
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.owner import FLAG_QUARANTINED, OWNER_TABLE_OFFSET, OwnerRecord, read_owner, write_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.pt.common import RW
from tests.kit.core_env import DATA, DID, SLOT, NestedSystem, build_system

IOVA = Iova(0x7F00_0000)


@pytest.fixture
def system(tmp_path: Path) -> NestedSystem:
    return build_system(tmp_path, p1_ram=16 << 20, p2_ram=16 << 20)


def test_owner_record_packs_at_the_documented_offsets(system: NestedSystem) -> None:
    digest = bytes(range(32))
    write_owner(system.host, 9, OwnerRecord(0x1122, 0x3344, 0x55, FLAG_QUARANTINED, digest))
    raw = system.bank0.read(OWNER_TABLE_OFFSET + 9 * 64, 64)
    seq, epoch, pid, bank, flags = struct.unpack_from("<QQQII", raw)
    assert seq % 2 == 0 and seq > 0  # even: no write in progress
    assert (epoch, pid, bank, flags) == (0x1122, 0x3344, 0x55, 1)
    assert raw[32:64] == digest
    rec = read_owner(system.host, 9)
    assert rec.quarantined and not rec.owned


def test_a_slot_with_no_owner_translates_nothing_whatever_its_context(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    assert system.unit.translate(SLOT, IOVA, 8, False).fault is None
    write_owner(system.host, SLOT, OwnerRecord(epoch=2))  # unassigned; the context still says nested
    runs = system.unit.translate(SLOT, IOVA, 8, False)
    assert runs.fault is not None and runs.fault.reason == FaultReason.PASID_ENTRY_NOT_PRESENT
    write_owner(system.host, SLOT, OwnerRecord(3, 1, 1, FLAG_QUARANTINED))
    assert system.unit.translate(SLOT, IOVA, 8, False).fault is not None


def test_a_new_owner_never_gets_the_previous_owners_cached_context_or_translations(system: NestedSystem) -> None:
    """The next owner's DMA must not land in the previous owner's RAM, even if
    the unit saw no invalidation at all: the record's epoch moved."""
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    runs = system.unit.translate(SLOT, IOVA, 8, True)
    assert runs.fault is None and runs.runs[0].hpa == system.bank1.hpa_of(DATA)
    assert system.unit.iotlb.lookup(DID, int(IOVA), True, count=False) is not None
    # partition 2 takes the slot, with a domain reusing the same DID and the same IOVA
    guest_b, s2_b = system.domain(2, (0, 1 << 20))
    guest_b.s1.map(IOVA, Gpa(2 << 20), SZ_4K, RW)
    write_owner(system.host, SLOT, OwnerRecord(epoch=5, partition_id=2, owner_bank=2))
    write_context(system.host, SLOT, ContextEntry.nested(DID, guest_b.s1.root, 4, s2_b.root, 4))
    # no invalidation of any kind reaches the unit
    runs = system.unit.translate(SLOT, IOVA, 8, True)
    assert runs.fault is None
    assert runs.runs[0].hpa == system.bank2.hpa_of(2 << 20), "the previous owner's translation was used"
    assert system.unit.stats.epoch_changes == 1


@pytest.mark.parametrize("native", [False, True], ids=["python", "compiled"])
def test_a_new_owner_after_a_context_invalidation_never_gets_the_previous_owners_translations(
        tmp_path: Path, native: bool) -> None:
    """A context-cache flush leaves the unit no cached context to compare epochs with: the
    epoch it last read the slot under must still be remembered (found by hypothesis: the old
    owner's IOTLB entry was reused by the next one, landing in the old owner's bank)."""
    system = build_system(tmp_path, p1_ram=16 << 20, p2_ram=16 << 20, native=native)
    if native and system.unit.native is None:
        pytest.skip("the compiled core is not built")
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    assert system.unit.translate(SLOT, IOVA, 8, True).runs[0].hpa == system.bank1.hpa_of(DATA)
    system.unit.invalidate_context(SLOT)  # a context-cache flush; the IOTLB keeps DID's entry
    write_owner(system.host, SLOT, OwnerRecord(epoch=5, partition_id=2, owner_bank=2))  # same context, same DID
    runs = system.unit.translate(SLOT, IOVA, 8, True)
    assert runs.fault is not None or all(system.bank2.hpa_of(0) <= r.hpa < system.bank2.hpa_of(16 << 20)
                                         for r in runs.runs), f"partition 2's DMA reached {runs.runs}"
    assert system.unit.stats.epoch_changes == 1
    assert system.unit.iotlb.lookup(DID, int(IOVA), True, count=False) is None  # the old entry is gone


def test_a_walk_that_raced_a_context_invalidation_inserts_nothing(system: NestedSystem) -> None:
    """A many-page translation whose context is invalidated after its first page
    must not cache any of the later pages (the generation is taken with the
    context, not before each page)."""
    n = 8
    system.s1.map(IOVA, Gpa(DATA), n * SZ_4K, RW)
    unit = IommuUnit(system.host, pscache=False, native=False)  # the Python loop: its walk is the hook
    walk = unit.walker.walk
    calls = {"n": 0}

    def racing_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the hypervisor detaches the domain while this translation runs
            write_context(system.host, SLOT, ContextEntry.blocked())
            unit.invalidate_context(SLOT)
            unit.invalidate_domain(DID)
        return walk(*args, **kwargs)

    unit.walker.walk = racing_walk  # type: ignore[method-assign]
    unit.translate(SLOT, IOVA, n * SZ_4K, False)
    assert calls["n"] >= 2
    cached = [i for i in range(n) if unit.iotlb.lookup(DID, int(IOVA) + i * SZ_4K, count=False) is not None]
    assert cached == [], f"pages {cached} were cached after the context was invalidated"
    assert unit.iotlb.stats.late_inserts_dropped >= 1
