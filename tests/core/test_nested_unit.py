"""The IOMMU unit over a real host: nested walk, IOTLB behaviour, faults."""

from __future__ import annotations

import random

import pytest

from pviommu.addr import MSI_WINDOW_START, SZ_2M, SZ_4K, Gpa, Iova
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.fault import FaultReason
from pviommu.mem.dma import DmaMemory
from pviommu.pt.common import RW, Perm
from pviommu.pt.fmt.x86_64 import PS, A, D
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import direct_table
from tests.kit.core_env import DATA, DID, HOLE, RO, SLOT, NestedSystem
from tests.kit.nested import guest_tables

IOVA = Iova(0x7F00_0000_0000)


def reason(system: NestedSystem, iova: int, write: bool = False, slot: int = SLOT) -> FaultReason | None:
    runs = system.unit.translate(slot, Iova(iova), 8, write)
    return None if runs.fault is None else FaultReason(runs.fault.reason)


def test_nested_translation_equals_composed_stage_lookups(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 64 * SZ_4K, RW)
    system.s1.map(Iova(IOVA + SZ_2M * 8), Gpa(14 * SZ_2M), 2 * SZ_2M, RW)
    rng = random.Random(1)
    probes = [IOVA + rng.randrange(64 * SZ_4K) for _ in range(50)]
    probes += [IOVA + SZ_2M * 8 + rng.randrange(2 * SZ_2M) for _ in range(50)]
    for iova in probes:
        s1 = system.s1.lookup(Iova(iova))
        assert s1 is not None
        s2 = system.s2.lookup(s1.oa)
        assert s2 is not None
        runs = system.unit.translate(SLOT, Iova(iova), 1, write=bool(iova & 1))
        assert runs.fault is None and runs.runs[0].hpa == s2.oa


def test_cold_4_over_4_walk_reads_24_entries_and_warm_hit_reads_none(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    unit = system.new_unit()
    assert unit.translate(SLOT, IOVA, 8, False).fault is None
    assert (unit.stats.walks, unit.stats.walk_reads) == (1, 24)
    assert unit.translate(SLOT, Iova(IOVA + 8), 8, False).fault is None
    assert (unit.stats.walks, unit.stats.walk_reads) == (1, 24)
    assert unit.iotlb.stats.hits == 1


def test_large_pages_coalesce_a_1mib_request_into_one_run(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(14 * SZ_2M), SZ_2M, RW)  # 2M over 2M
    runs = system.unit.translate(SLOT, Iova(IOVA + 0x80000), 1 << 20, True)
    assert runs.fault is None and len(runs.runs) == 1 and runs.done == 1 << 20
    system.s1.map(Iova(IOVA + SZ_2M), Gpa(DATA), 256 * SZ_4K, RW)  # 4K pages, contiguous
    runs = system.unit.translate(SLOT, Iova(IOVA + SZ_2M), 1 << 20, False)
    assert runs.fault is None and len(runs.runs) == 1


def test_unmap_without_flush_leaves_stale_iotlb_entry(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    before = system.unit.translate(SLOT, IOVA, 8, True)
    gather: IotlbGather[Gpa] = IotlbGather()
    assert system.s1.unmap(IOVA, SZ_4K, gather) == SZ_4K
    stale = system.unit.translate(SLOT, IOVA, 8, True)
    assert stale.fault is None and stale.runs == before.runs  # the hazard a driver must avoid
    system.unit.invalidate_domain(DID)
    assert reason(system, IOVA, True) is FaultReason.FS_NOT_PRESENT


def test_page_selective_invalidation_drops_only_the_selected_pages(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 4 * SZ_4K, RW)
    for i in range(4):
        assert reason(system, IOVA + i * SZ_4K) is None
    gather: IotlbGather[Gpa] = IotlbGather()
    system.s1.unmap(IOVA, 4 * SZ_4K, gather)
    system.unit.invalidate_pages(DID, IOVA + 2 * SZ_4K, 0)
    assert [reason(system, IOVA + i * SZ_4K) for i in range(4)] == [
        None,
        None,
        FaultReason.FS_NOT_PRESENT,
        None,
    ]
    addr, am = gather.psi()
    system.unit.invalidate_pages(DID, addr, am)
    assert all(reason(system, IOVA + i * SZ_4K) is not None for i in range(4))


def _clear_ad(system: NestedSystem, iova: Iova) -> list[Gpa]:
    slots = []
    for step in system.s1.walk(iova):
        slot = Gpa(step.table + step.index * 8)
        system.ram.write_u64(slot, system.ram.read_u64(slot) & ~(A | D))
        slots.append(slot)
    return slots


def test_walk_sets_accessed_on_every_level_and_dirty_only_on_write(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    slots = _clear_ad(system, IOVA)
    assert reason(system, IOVA, write=False) is None
    assert all(system.ram.read_u64(s) & A for s in slots)
    assert not any(system.ram.read_u64(s) & D for s in slots)
    assert reason(system, IOVA, write=True) is None  # read-cached entry: re-walk to set D
    assert system.ram.read_u64(slots[-1]) & D
    assert not any(system.ram.read_u64(s) & D for s in slots[:-1])


def test_accessed_update_needs_stage2_write_on_the_table_page(system: NestedSystem) -> None:
    # the guest keeps a stage-1 table in its read-only range (its CPU may write it)

    ro_tables = guest_tables(system.ram, (RO[0], RO[0] + SZ_2M)).s1
    ro_tables.map(IOVA, Gpa(DATA), SZ_4K, RW)
    system.install(5, system.nested_ctx(ro_tables.root, did=9))
    assert reason(system, IOVA, slot=5) is None  # A already set: nothing to write
    root_slot = Gpa(ro_tables.root + ro_tables.fmt.index(IOVA, 3) * 8)
    system.ram.write_u64(root_slot, system.ram.read_u64(root_slot) & ~A)
    system.unit.invalidate_domain(9)
    assert reason(system, IOVA, slot=5) is FaultReason.SS_NO_WRITE_AD


def test_stage2_hole_and_read_only_range_fault_with_spec_reasons(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(HOLE[0]), SZ_4K, RW)
    system.s1.map(Iova(IOVA + SZ_2M), Gpa(RO[0]), SZ_2M, RW)
    assert reason(system, IOVA) is FaultReason.SS_NOT_PRESENT
    assert reason(system, IOVA + SZ_2M, write=False) is None
    assert reason(system, IOVA + SZ_2M, write=True) is FaultReason.NO_WRITE


def test_stage1_permission_faults(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, Perm.READ)
    system.s1.map(Iova(IOVA + SZ_4K), Gpa(DATA), SZ_4K, RW | Perm.PRIV)
    assert reason(system, IOVA, write=True) is FaultReason.NO_WRITE
    assert reason(system, IOVA + SZ_4K) is FaultReason.USER_SUPERVISOR
    assert reason(system, IOVA + 2 * SZ_4K) is FaultReason.FS_NOT_PRESENT


def test_reserved_bits_in_stage1_entries_fault_0x72(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(14 * SZ_2M), SZ_2M, RW)
    leaf = system.s1.walk(IOVA)[-1]
    slot = Gpa(leaf.table + leaf.index * 8)
    system.ram.write_u64(slot, leaf.entry | (1 << 13))  # bit 13 of a 2M leaf
    assert reason(system, IOVA) is FaultReason.FS_RESERVED
    system.ram.write_u64(slot, leaf.entry)
    top = system.s1.walk(IOVA)[0]
    system.ram.write_u64(Gpa(top.table + top.index * 8), top.entry | PS)  # PS in a PML4E
    assert reason(system, IOVA) is FaultReason.FS_RESERVED


@pytest.mark.parametrize("where", ["leaf", "table"])
def test_xd_without_nxe_is_a_reserved_bit_fault_0x72(system: NestedSystem, where: str) -> None:
    # The context entry enables no NXE (PASID-entry bit 133), so XD (bit 63) is reserved in
    # every first-stage entry (SDM: XD is reserved when NXE = 0).
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    assert reason(system, IOVA) is None and reason(system, IOVA, write=True) is None
    steps = system.s1.walk(IOVA)
    step = steps[-1] if where == "leaf" else steps[0]
    slot = Gpa(step.table + step.index * 8)
    system.ram.write_u64(slot, step.entry | (1 << 63))
    system.unit.invalidate_all()
    assert reason(system, IOVA) is FaultReason.FS_RESERVED
    assert reason(system, IOVA, write=True) is FaultReason.FS_RESERVED
    system.ram.write_u64(slot, step.entry)
    system.unit.invalidate_all()
    assert reason(system, IOVA) is None


def test_request_checks_non_canonical_msi_window_and_widths(system: NestedSystem) -> None:
    assert reason(system, 0x0000_8000_0000_0000) is FaultReason.NON_CANONICAL
    system.s1.map(IOVA, Gpa(MSI_WINDOW_START), SZ_4K, RW)
    assert reason(system, IOVA) is FaultReason.MSI_WINDOW
    system.install(6, system.nested_ctx(Gpa(1 << 49)))
    assert reason(system, 0, slot=6) is FaultReason.FS_BEYOND_MGAW
    system.install(6, system.nested_ctx(Gpa(60 << 30)))  # past the 64 MiB of RAM
    assert reason(system, 0, slot=6) is FaultReason.SS_NOT_PRESENT
    assert system.unit.translate(SLOT, Iova((1 << 64) - 4), 8, False).fault is not None


def test_context_faults_blocked_unassigned_invalid_reserved(system: NestedSystem) -> None:
    assert reason(system, 0, slot=40) is FaultReason.PASID_ENTRY_NOT_PRESENT
    system.install(41, ContextEntry.blocked())
    assert reason(system, 0, slot=41) is FaultReason.PASID_ENTRY_NOT_PRESENT
    bad = ContextEntry(True, False, 2, 4, system.s2.root, 3)  # PGTT pass-through
    system.install(42, bad)
    assert reason(system, 0, slot=42) is FaultReason.PASID_ENTRY_INVALID
    system.install(43, system.nested_ctx())
    system.host.write_u64(system.bank0.hpa_of(43 * 64 + 40), 1)
    assert reason(system, 0, slot=43) is FaultReason.PASID_ENTRY_RESERVED
    assert reason(system, 0, slot=4096) is FaultReason.PASID_ENTRY_ACCESS


def test_identity_context_uses_iova_as_gpa_through_stage2(system: NestedSystem) -> None:
    system.install(7, ContextEntry.identity(11, system.s2.root, 4))
    runs = system.unit.translate(7, Iova(DATA + 0x123), 16, True)
    assert runs.fault is None and runs.runs[0].hpa == system.hpa(DATA + 0x123)
    assert reason(system, HOLE[0], slot=7) is FaultReason.SS_NOT_PRESENT
    assert reason(system, RO[0], write=True, slot=7) is FaultReason.NO_WRITE
    assert reason(system, 1 << 50, slot=7) is FaultReason.SS_BEYOND_MAX


def test_s2_only_domain_translates_iova_straight_to_hpa(system: NestedSystem) -> None:
    from pviommu.pt.fmt import VtdSsFormat

    table = direct_table(VtdSsFormat(4), system.host, system.s2_frames)
    table.map(Iova(0x10000), system.hpa(DATA), 2 * SZ_4K, RW)
    system.install(8, ContextEntry.s2_only(12, table.root, 4))
    runs = system.unit.translate(8, Iova(0x10000), 2 * SZ_4K, False)
    assert runs.fault is None and runs.runs[0].hpa == system.hpa(DATA) and len(runs.runs) == 1
    assert reason(system, 0x12000, slot=8) is FaultReason.SS_NOT_PRESENT


def test_stage2_output_outside_the_owner_bank_is_fenced(system: NestedSystem) -> None:
    system.s2.map(Gpa(40 << 20 << 4), system.bank2.hpa_of(0), SZ_4K, RW)  # a hypervisor bug
    system.s1.map(IOVA, Gpa(40 << 20 << 4), SZ_4K, RW)
    assert reason(system, IOVA) is FaultReason.SS_ACCESS


def test_dma_copy_through_unit_equals_reference_and_stops_at_unmapped_page(system: NestedSystem) -> None:
    src, dst = IOVA, Iova(IOVA + 0x100000)
    system.s1.map(src, Gpa(DATA), 3 * SZ_4K, RW)
    system.s1.map(dst, Gpa(DATA + 0x10000), 2 * SZ_4K, RW)  # third page unmapped
    payload = random.Random(5).randbytes(3 * SZ_4K)
    system.ram.write(Gpa(DATA), payload)
    before = system.bank1.read(0, system.bank1.size)
    dma = DmaMemory(system.host, system.unit.bind(SLOT))
    result = dma.copy(src, dst, 3 * SZ_4K)
    assert result.done == 2 * SZ_4K
    assert result.fault is not None and result.fault.iova == dst + 2 * SZ_4K and result.fault.write
    assert result.fault.reason == FaultReason.FS_NOT_PRESENT
    after = system.bank1.read(0, system.bank1.size)
    expected = bytearray(before)
    expected[DATA + 0x10000 : DATA + 0x12000] = payload[: 2 * SZ_4K]
    assert after == bytes(expected)  # exactly the copied prefix changed
    data, fault = dma.read(src, 3 * SZ_4K)
    assert data == payload and fault is None


class _RecordingView:
    """A bank view that records the order of slice/byte stores."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stores: list[tuple[int, int]] = []

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        return self.view[key]

    def __setitem__(self, key, value) -> None:  # type: ignore[no-untyped-def]
        start, stop = (key.start, key.stop) if isinstance(key, slice) else (key, key + 1)
        self.stores.append((start, stop - start))
        self.view[key] = value


def test_write_record_writes_byte_0_last_and_nothing_on_a_fault(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    system.s1.map(Iova(IOVA + SZ_4K), Gpa(DATA + SZ_4K), SZ_4K, Perm.READ)
    dma = DmaMemory(system.host, system.unit.bind(SLOT))
    record = bytes(range(1, 33))
    bank = system.bank1
    spy = _RecordingView(bank.view)
    bank.view = spy  # type: ignore[assignment]
    try:
        res = dma.write_record(Iova(IOVA + 64), record)
    finally:
        bank.view = spy.view
    off = DATA + 64
    assert res.done == 32 and res.fault is None
    assert spy.stores == [(off + 1, 31), (off, 1)]
    assert system.ram.read(Gpa(off), 32) == record
    before = system.ram.read(Gpa(DATA + SZ_4K), 64)
    res = dma.write_record(Iova(IOVA + SZ_4K + 32), record)  # read-only page
    assert res.done == 0 and res.fault is not None and res.fault.iova == IOVA + SZ_4K + 32 and res.fault.write
    assert system.ram.read(Gpa(DATA + SZ_4K), 64) == before


def test_single_run_copy_fast_path_is_a_memmove(system: NestedSystem) -> None:
    """Warm, one run per side (2 MiB leaves): overlapping copies both ways equal memmove."""
    big = Gpa(12 << 20)  # RW, 2 MiB stage-2 leaves
    system.s1.map(IOVA, big, SZ_2M, RW)
    payload = random.Random(9).randbytes(SZ_2M)
    system.ram.write(big, payload)
    dma = DmaMemory(system.host, system.unit.bind(SLOT))
    dma.copy(IOVA, Iova(IOVA + 4096), 8192)  # warms the IOTLB
    ref = bytearray(payload)
    ref[4096:12288] = ref[0:8192]
    for src, dst in ((0, 100), (200, 50)):
        assert dma.copy(Iova(IOVA + src), Iova(IOVA + dst), 10000).done == 10000
        ref[dst : dst + 10000] = bytes(ref[src : src + 10000])
    assert system.ram.read(big, SZ_2M) == bytes(ref)
    assert system.unit.translate(SLOT, IOVA, SZ_2M, False).runs[0].length == SZ_2M


def test_faults_are_counted_logged_and_reported(system: NestedSystem) -> None:
    seen = []
    system.unit.on_fault = seen.append
    reason(system, IOVA, write=True)
    records = system.unit.drain_faults()
    assert len(records) == 1 and records[0].reason is FaultReason.FS_NOT_PRESENT
    assert records[0].slot == SLOT and records[0].did == DID and records[0].write
    assert seen == records and system.unit.stats.faults[0x71] == 1
    assert records[0].to_dma_fault().reason_name == "FS_NOT_PRESENT"


def test_explain_records_every_read_without_side_effects(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    slots = _clear_ad(system, IOVA)
    exp = system.unit.explain(SLOT, IOVA, True)
    assert [s.stage for s in exp.steps].count("S1") == 4
    assert [s.stage for s in exp.steps].count("S2") == 20
    assert exp.steps[-1].stage == "out" and exp.result.reads == 24
    assert not any(system.ram.read_u64(s) & A for s in slots)  # dry run
    assert system.unit.stats.walks == 0


def test_context_change_needs_context_invalidation(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    assert reason(system, IOVA) is None
    write_context(system.host, SLOT, ContextEntry.blocked())
    system.unit.invalidate_domain(DID)
    assert reason(system, IOVA) is None  # cached context still used
    system.unit.invalidate_context(SLOT)
    assert reason(system, IOVA) is FaultReason.PASID_ENTRY_NOT_PRESENT


@pytest.mark.parametrize("write", [False, True])
def test_translate_never_returns_runs_outside_the_owner_bank(system: NestedSystem, write: bool) -> None:
    system.s1.map(IOVA, Gpa(DATA), 16 * SZ_4K, RW)
    runs = system.unit.translate(SLOT, IOVA, 20 * SZ_4K, write)
    assert runs.done == 16 * SZ_4K and runs.fault is not None
    for run in runs.runs:
        assert system.bank1.base <= run.hpa and run.hpa + run.length <= system.bank1.base + system.bank1.size
