"""PASID directory and tables (pviommu proposal, not in the series): layouts
checked against the VT-d specification's bit positions (written here from
the spec's tables, never from the encoder), the walk to a PASID entry, and
isolation across PASIDs and devices in the IOMMU unit."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pviommu.addr import SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu import native as native_core
from pviommu.iommu.context import ContextEntry, Pgtt, write_context
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.owner import OwnerRecord, write_owner
from pviommu.iommu.pasid import (
    RTADDR_OFFSET,
    SmContextEntry,
    SmFault,
    dir_index,
    pack_dir_entry,
    sm_context_hpa,
    table_index,
)
from pviommu.pt.common import RW
from pviommu.pt.walk import PageTable
from pviommu.units import MiB
from tests.kit.pasid_env import DID, IOVA, SLOT_A, SLOT_B, World, build


def bits(value: int, hi: int, lo: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def as_int(data: bytes) -> int:
    return int.from_bytes(data, "little")


# -- layouts, from the VT-d spec's bit tables -----------------------------------------------
def test_sm_context_entry_fields_sit_at_the_vtd_bit_positions() -> None:
    ctx = SmContextEntry(present=True, fpd=True, dte=False, paside=True, pre=True, pdts=2,
                         pasid_dir=Hpa(0x1_2345_6000), rid_pasid=0xABCDE, rid_priv=True)
    raw = ctx.pack()
    assert len(raw) == 32  # 256-bit entry
    v = as_int(raw)
    assert bits(v, 0, 0) == 1  # P
    assert bits(v, 1, 1) == 1  # FPD
    assert bits(v, 2, 2) == 0  # DTE
    assert bits(v, 3, 3) == 1  # PASIDE
    assert bits(v, 4, 4) == 1  # PRE
    assert bits(v, 11, 9) == 2  # PDTS
    assert bits(v, 63, 12) == 0x1_2345_6000 >> 12  # PASIDDIRPTR
    assert bits(v, 83, 64) == 0xABCDE  # RID_PASID
    assert bits(v, 84, 84) == 1  # RID_PRIV
    assert bits(v, 255, 85) == 0 and bits(v, 8, 5) == 0
    assert SmContextEntry.unpack(raw) == ctx


def test_sm_context_entry_with_a_bit_outside_the_layout_decodes_as_reserved() -> None:
    raw = bytearray(SmContextEntry(present=True, paside=True).pack())
    raw[20] = 1  # bit 160, in the reserved upper half
    assert SmContextEntry.unpack(bytes(raw)).reserved_bits


def test_pdts_gives_two_to_the_pdts_plus_7_directory_entries() -> None:
    assert [SmContextEntry(pdts=p).dir_entries for p in range(4)] == [128, 256, 512, 1024]
    assert SmContextEntry(pdts=0).max_pasid == 128 * 64 - 1


def test_pasid_table_entry_fields_sit_at_the_vtd_bit_positions() -> None:
    entry = ContextEntry.nested(0xBEEF, Gpa(0xABC_D000), 5, Hpa(0x2_DEF0_1000), 4)
    raw = entry.pack()
    assert len(raw) == 64  # 512-bit entry
    v = as_int(raw)
    assert bits(v, 0, 0) == 1  # P
    assert bits(v, 1, 1) == 0  # FPD
    assert bits(v, 4, 2) == 2  # AW: 48-bit, 4-level second stage
    assert bits(v, 8, 6) == 0b011  # PGTT nested
    assert bits(v, 63, 12) == 0x2_DEF0_1000 >> 12  # SSPTPTR
    assert bits(v, 79, 64) == 0xBEEF  # DID
    assert bits(v, 131, 130) == 1  # FSPM: 5-level first stage
    assert bits(v, 191, 140) == 0xABC_D000 >> 12  # FSPTPTR
    assert bits(v, 511, 192) == 0


def test_pgtt_encodings_are_the_specs() -> None:
    # VT-d 9.6: 001 first-stage, 010 second-stage, 011 nested, 100 pass-through
    assert (Pgtt.FS_ONLY, Pgtt.SS_ONLY, Pgtt.NESTED, Pgtt.PASS_THROUGH) == (1, 2, 3, 4)


def test_pasid_directory_entry_is_present_bit_and_table_pointer() -> None:
    v = pack_dir_entry(Hpa(0x3_0000_5000), fpd=True)
    assert bits(v, 0, 0) == 1 and bits(v, 1, 1) == 1 and bits(v, 63, 12) == 0x3_0000_5000 >> 12
    assert pack_dir_entry(None) == 0


def test_pasid_splits_into_directory_bits_19_6_and_table_bits_5_0() -> None:
    assert (dir_index(0x12345), table_index(0x12345)) == (0x12345 >> 6, 0x05)
    assert (dir_index(0xFFFFF), table_index(0xFFFFF)) == (0x3FFF, 0x3F)
    assert (dir_index(63), dir_index(64)) == (0, 1)


@pytest.fixture(params=["python", "native"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "native" and not native_core.AVAILABLE:
        pytest.skip("compiled core not built")
    w = build(tmp_path, native=request.param == "native")
    yield w
    w.host.close()


def test_the_structures_are_where_a_walk_written_from_the_spec_finds_them(world: World) -> None:
    s1 = world.process_table()
    entry = world.nested(s1)
    pasid = 0x1234  # directory index 0x48, table index 0x34
    world.tables.set_entry(SLOT_B, pasid, entry)
    h = world.host
    rtaddr = h.read_u64(Hpa(world.bank0.base + RTADDR_OFFSET))
    assert rtaddr >> 10 & 1  # SMT
    root = rtaddr & ~0xFFF
    hi = h.read_u64(Hpa(root + 8))  # bus 0, upper half (devfn 128-255)
    assert hi & 1
    ctx = struct.unpack("<4Q", h.read(Hpa((hi & ~0xFFF) + (SLOT_B - 128) * 32), 32))
    assert ctx[0] & 1 and ctx[0] >> 3 & 1  # P, PASIDE
    pde = h.read_u64(Hpa((ctx[0] & ~0xFFF) + (pasid >> 6) * 8))
    assert pde & 1
    raw = h.read(Hpa((pde & ~0xFFF) + (pasid & 0x3F) * 64), 64)
    assert raw == entry.pack()
    assert h.read(sm_context_hpa(SLOT_B), 32) == struct.pack("<4Q", *ctx)


# -- the unit --------------------------------------------------------------------------------
def _two_processes(world: World) -> tuple[PageTable[Iova, Gpa, Gpa], PageTable[Iova, Gpa, Gpa]]:
    p1, p2 = world.process_table(), world.process_table()
    p1.map(IOVA, Gpa(8 * MiB), SZ_4K, RW)
    p2.map(IOVA, Gpa(9 * MiB), SZ_4K, RW)
    return p1, p2


def test_two_pasids_of_one_domain_translate_the_same_address_through_their_own_tables(world: World) -> None:
    p1, p2 = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    world.tables.set_entry(SLOT_A, 2, world.nested(p2))  # same DID: only the PASID tells them apart
    for _ in range(2):  # cold, then from the IOTLB
        assert world.dma(SLOT_A, IOVA, 1) == (world.bank1.hpa_of(8 * MiB), None)
        assert world.dma(SLOT_A, IOVA, 2, write=True) == (world.bank1.hpa_of(9 * MiB), None)


def test_requests_without_pasid_and_with_pasid_0_keep_the_flat_context(world: World) -> None:
    p1, _ = _two_processes(world)
    flat = world.process_table()
    flat.map(IOVA, Gpa(10 * MiB), SZ_4K, RW)
    write_context(world.host, SLOT_A, world.nested(flat))
    world.unit.invalidate_context(SLOT_A)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    assert world.dma(SLOT_A, IOVA, None) == (world.bank1.hpa_of(10 * MiB), None)
    assert world.dma(SLOT_A, IOVA, 0) == (world.bank1.hpa_of(10 * MiB), None)
    assert world.dma(SLOT_A, IOVA, 1) == (world.bank1.hpa_of(8 * MiB), None)


def test_a_pasid_after_unbind_and_its_invalidations_faults(world: World) -> None:
    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    assert world.dma(SLOT_A, IOVA, 1)[1] is None
    world.tables.clear_entry(SLOT_A, 1)
    # without invalidation the unit still uses what it cached (the hazard a driver must avoid)
    assert world.dma(SLOT_A, IOVA, 1)[1] is None
    world.unit.invalidate_pasid_cache(DID, 1)
    world.unit.invalidate_pasid(DID, 1)
    assert world.dma(SLOT_A, IOVA, 1) == (None, FaultReason.PASID_ENTRY_NOT_PRESENT)
    assert world.unit.drain_faults()[-1].pasid == 1


def test_a_pasid_bound_on_one_device_does_not_reach_another_devices_request(world: World) -> None:
    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 5, world.nested(p1))
    assert world.dma(SLOT_A, IOVA, 5)[1] is None
    # slot B's directory has no table for PASID 5: its own directory is all that is walked
    assert world.dma(SLOT_B, IOVA, 5) == (None, SmFault.PASID_DIR_NOT_PRESENT)
    world.tables.set_entry(SLOT_B, 6, world.nested(p1))  # now a table exists, entry 5 in it is empty
    assert world.dma(SLOT_B, IOVA, 5) == (None, FaultReason.PASID_ENTRY_NOT_PRESENT)


def test_pasid_invalidation_drops_only_its_own_pasid(world: World) -> None:
    p1, p2 = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    world.tables.set_entry(SLOT_A, 2, world.nested(p2))
    world.dma(SLOT_A, IOVA, 1)
    world.dma(SLOT_A, IOVA, 2)
    p1.map(Iova(IOVA + SZ_4K), Gpa(8 * MiB + SZ_4K), SZ_4K, RW)  # nothing cached for it: no flush needed
    path = world.unit.pasid_path
    assert world.unit.invalidate_pasid(DID, 1) == 1
    assert path.iotlb.lookup(DID | 2 << 16, IOVA) is not None
    world.unit.invalidate_domain(DID)  # a domain-selective flush covers every PASID of the DID
    assert path.iotlb.lookup(DID | 2 << 16, IOVA) is None


def test_structure_faults_carry_the_scalable_mode_reasons(world: World, tmp_path: Path) -> None:
    assert world.dma(7, IOVA, 1) == (None, SmFault.CONTEXT_NOT_PRESENT)  # no SM context for slot 7
    assert world.dma(SLOT_A, IOVA, 128 * 64) == (None, SmFault.CONTEXT_PASID_TOO_BIG)
    # a directory pointer into a partition's RAM is refused (the structures live in bank 0)
    bad = SmContextEntry(True, False, False, True, False, 0, world.bank1.hpa_of(0))
    world.host.write(sm_context_hpa(SLOT_A), bad.pack())
    world.unit.invalidate_context(SLOT_A)
    assert world.dma(SLOT_A, IOVA, 1) == (None, SmFault.PASID_DIR_ACCESS)
    world.host.write(sm_context_hpa(SLOT_A), SmContextEntry(True, pasid_dir=Hpa(world.bank0.base)).pack())
    assert world.dma(SLOT_A, IOVA, 1) == (None, SmFault.CONTEXT_PASID_DISABLED)
    world.host.write_u64(Hpa(world.bank0.base + RTADDR_OFFSET), 0)  # scalable mode off
    assert world.dma(SLOT_B, IOVA, 1) == (None, SmFault.ROOT_TABLE_ADDRESS)


def test_a_pasid_of_a_device_of_another_owner_is_fenced_into_that_owners_bank(world: World) -> None:
    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    write_owner(world.host, SLOT_A, OwnerRecord(epoch=2, partition_id=2, owner_bank=2))
    # the stage 2 in the entry maps bank 1; the slot now belongs to bank 2: output is refused
    assert world.dma(SLOT_A, IOVA, 1)[1] == FaultReason.SS_ACCESS


def test_explain_shows_the_pasid_level_before_the_walk(world: World) -> None:
    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 3, world.nested(p1))
    exp = world.unit.explain(SLOT_A, IOVA, False, pasid=3)
    assert [s.what for s in exp.pasid_steps] == ["RTADDR", "root", "context", "pasid-dir", "pasid-entry"]
    assert exp.pasid == 3 and exp.context is not None and exp.context.did == DID
    assert exp.steps and exp.steps[-1].stage == "out"
    missing = world.unit.explain(SLOT_A, IOVA, False, pasid=4)
    assert "PASID_ENTRY_NOT_PRESENT" in missing.result.reason.name


def test_removing_a_device_frees_its_directory_and_tables(world: World) -> None:
    before = world.h_frames.allocated_frames
    world.tables.set_entry(SLOT_A, 1, world.nested(world.process_table()))
    world.tables.set_entry(SLOT_A, 200, world.nested(world.process_table()))
    assert world.h_frames.allocated_frames == before + 2
    world.tables.remove_device(SLOT_A)
    assert world.h_frames.allocated_frames == before - 1  # its directory too
    assert world.dma(SLOT_A, IOVA, 1) == (None, SmFault.CONTEXT_NOT_PRESENT)


# -- the PASID invalidation descriptors (VT-d types 6 and 7), bits from the spec ---------------
def test_pasid_based_iotlb_descriptor_bits_are_vtds() -> None:
    from pviommu.abi.invq import PasidInvalidation, decode, encode

    qw0, qw1 = encode(PasidInvalidation(False, 0x1234, 0xABCDE, 0x7000_0000, 3))
    assert (bits(qw0, 3, 0), bits(qw0, 5, 4), bits(qw0, 31, 16), bits(qw0, 51, 32)) == (6, 3, 0x1234, 0xABCDE)
    assert (bits(qw1, 5, 0), bits(qw1, 63, 12)) == (3, 0x7000_0000 >> 12)
    qw0, _ = encode(PasidInvalidation(False, 5, 9))
    assert (bits(qw0, 3, 0), bits(qw0, 5, 4)) == (6, 2)
    for item in (PasidInvalidation(False, 1, 2, 0x1000, 0), PasidInvalidation(False, 1, 2)):
        assert decode(*encode(item)) == item


def test_pasid_cache_descriptor_bits_are_vtds() -> None:
    from pviommu.abi.invq import PasidInvalidation, decode, encode

    qw0, _ = encode(PasidInvalidation(True, 0x42, 0x77))
    assert (bits(qw0, 3, 0), bits(qw0, 5, 4), bits(qw0, 31, 16), bits(qw0, 51, 32)) == (7, 1, 0x42, 0x77)
    assert bits(encode(PasidInvalidation(True, 0x42, None))[0], 5, 4) == 0  # domain-selective
    assert bits(encode(PasidInvalidation(True, None, None))[0], 5, 4) == 3  # global
    for item in (PasidInvalidation(True, 3, 4), PasidInvalidation(True, 3, None), PasidInvalidation(True, None, None)):
        assert decode(*encode(item)) == item


def test_pasid_descriptors_applied_to_a_unit_drop_what_they_name(world: World) -> None:
    from pviommu.abi.invq import PasidInvalidation

    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    assert world.dma(SLOT_A, IOVA, 1)[1] is None
    world.tables.clear_entry(SLOT_A, 1)
    PasidInvalidation(True, DID, 1).apply(world.unit)
    PasidInvalidation(False, DID, 1).apply(world.unit)
    assert world.dma(SLOT_A, IOVA, 1) == (None, FaultReason.PASID_ENTRY_NOT_PRESENT)


def test_a_pasid_translation_cached_under_one_owner_is_not_used_under_the_next(world: World) -> None:
    """No invalidation reaches the unit, but the slot's epoch moved: the IOTLB entry the old
    owner's PASID left behind must not answer the new owner's request."""
    p1, _ = _two_processes(world)
    world.tables.set_entry(SLOT_A, 1, world.nested(p1))
    hpa, fault = world.dma(SLOT_A, IOVA, 1)
    assert fault is None and hpa is not None and world.bank1.hpa_of(0) <= hpa < world.bank1.hpa_of(16 * MiB)
    write_owner(world.host, SLOT_A, OwnerRecord(epoch=2, partition_id=2, owner_bank=2))
    assert world.dma(SLOT_A, IOVA, 1)[1] == FaultReason.SS_ACCESS  # walked again, and fenced into bank 2
    assert world.unit.stats.epoch_changes == 1
