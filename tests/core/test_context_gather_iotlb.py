from __future__ import annotations

import struct
import threading

import pytest

from pviommu.addr import Gpa, Hpa
from pviommu.iommu.context import (
    CONTEXT_ENTRY_SIZE,
    CONTEXT_TABLE_END,
    MAX_SLOTS,
    ContextEntry,
    Pgtt,
    context_hpa,
)
from pviommu.iommu.iotlb import Iotlb, IotlbEntry
from pviommu.pt.gather import IotlbGather

HPA_ROOT = Hpa(0x100_0000_5000)
GPA_ROOT = Gpa(0x3000)


# -- context entries ----------------------------------------------------------------
def test_nested_context_packs_to_hand_computed_bytes() -> None:
    entry = ContextEntry.nested(0x1234, GPA_ROOT, 5, HPA_ROOT, 4)
    # qw0: P | AW=2 (<<2) | PGTT=3 (<<6) | SSPTPTR = 0x1 | 0x8 | 0xC0 | root
    qw0 = 0x100_0000_5000 | 0xC9
    qw2 = 0x3000 | (1 << 2)  # FSPM=1 (5-level)
    assert entry.pack() == struct.pack("<8Q", qw0, 0x1234, qw2, 0, 0, 0, 0, 0)  # qw3..qw7 reserved (zero)
    assert ContextEntry.unpack(entry.pack()) == entry
    assert entry.fs_levels == 5 and entry.s2_levels == 4


def test_identity_and_s2_only_are_pgtt_2_and_blocked_is_all_zero() -> None:
    ident = ContextEntry.identity(5, HPA_ROOT, 3)
    qw0, did, qw2, qw3 = struct.unpack_from("<4Q", ident.pack())
    assert qw0 == 0x100_0000_5000 | 0x1 | (1 << 2) | (Pgtt.SS_ONLY << 6) and did == 5 and qw2 == 0
    assert qw3 == 0
    assert ContextEntry.s2_only(5, HPA_ROOT, 3).pack() == ident.pack()
    assert ContextEntry.blocked().pack() == bytes(CONTEXT_ENTRY_SIZE)


def test_unpack_flags_bits_outside_the_layout_as_reserved() -> None:
    raw = bytearray(ContextEntry.identity(1, HPA_ROOT, 4).pack())
    assert not ContextEntry.unpack(raw).reserved_bits
    for offset in (24, 40):  # qw3 (a software field lived here once) and qw5
        bad = bytearray(raw)
        bad[offset] = 1
        assert ContextEntry.unpack(bad).reserved_bits


def test_context_table_fits_before_the_stage2_frames() -> None:
    assert context_hpa(0) == (1 << 40)
    assert context_hpa(MAX_SLOTS - 1) + CONTEXT_ENTRY_SIZE - (1 << 40) == CONTEXT_TABLE_END
    with pytest.raises(ValueError):
        context_hpa(MAX_SLOTS)


# -- gather ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "last", "addr", "am"),
    [
        (0x1000, 0x1FFF, 0x1000, 0),
        (0x2000, 0x5FFF, 0x0, 3),  # 4 pages, unaligned start widens to 8
        (0x4000, 0x7FFF, 0x4000, 2),
        (0x200000, 0x3FFFFF, 0x200000, 9),
        (0x1FF000, 0x200FFF, 0x0, 10),  # straddles a 2M boundary
    ],
)
def test_gather_psi_covers_range_with_aligned_power_of_two(start: int, last: int, addr: int, am: int) -> None:
    gather: IotlbGather[int] = IotlbGather()
    gather.add_range(start, last, 12)
    assert gather.psi() == (addr, am)
    base, n = gather.psi()
    assert base <= start and last < base + (0x1000 << n)


def test_gather_reset_forgets_range_and_freelist() -> None:
    gather: IotlbGather[int] = IotlbGather()
    gather.add_range(0x1000, 0x1FFF, 12)
    gather.freelist.append(0x5000)
    gather.reset()
    assert gather.empty and gather.freelist == []


# -- IOTLB ------------------------------------------------------------------------------
def _e(iova: int, size_lg2: int = 12, write: bool = True) -> IotlbEntry:
    return IotlbEntry(iova, Hpa((1 << 41) + iova), size_lg2, True, write)


def test_iotlb_page_selective_invalidation_drops_only_overlapping_entries() -> None:
    tlb = Iotlb()
    for i in range(8):
        tlb.insert(1, _e(i << 12), tlb.generation)
    tlb.insert(1, _e(0x200000, 21), tlb.generation)
    tlb.insert(2, _e(0x2000), tlb.generation)
    assert tlb.invalidate_pages(1, 0x2000, 1) == 2  # pages 2 and 3 of DID 1
    assert [tlb.lookup(1, i << 12) is not None for i in range(8)] == [True, True, False, False] + [True] * 4
    assert tlb.lookup(2, 0x2000) is not None  # other domain untouched
    assert tlb.invalidate_pages(1, 0x3FF000, 0) == 1  # a 4K flush inside a 2M entry drops it
    assert tlb.lookup(1, 0x200000) is None


def test_iotlb_domain_and_global_invalidation() -> None:
    tlb = Iotlb()
    tlb.insert(1, _e(0x1000), tlb.generation)
    tlb.insert(2, _e(0x1000), tlb.generation)
    assert tlb.invalidate_domain(1) == 1
    assert tlb.lookup(1, 0x1000) is None and tlb.lookup(2, 0x1000) is not None
    assert tlb.invalidate_all() == 1 and len(tlb) == 0
    assert tlb.stats.inv_domain == 1 and tlb.stats.inv_global == 1


def test_iotlb_read_only_cached_entry_misses_for_writes() -> None:
    tlb = Iotlb()
    tlb.insert(1, _e(0x1000, write=False), tlb.generation)
    assert tlb.lookup(1, 0x1000, write=False) is not None
    assert tlb.lookup(1, 0x1000, write=True) is None


def test_iotlb_insert_from_a_walk_that_raced_an_invalidation_is_dropped() -> None:
    tlb = Iotlb()
    generation = tlb.generation  # walk starts
    tlb.invalidate_domain(1)  # flush arrives mid-walk
    assert not tlb.insert(1, _e(0x1000), generation)
    assert tlb.lookup(1, 0x1000) is None


def test_iotlb_invalidation_is_synchronous_under_concurrent_lookups() -> None:
    tlb = Iotlb()
    for i in range(64):
        tlb.insert(1, _e(i << 12), tlb.generation)
    stop, flushed = threading.Event(), threading.Event()
    errors: list[int] = []
    lookups = [0]

    def reader() -> None:
        while not stop.is_set():
            after_flush = flushed.is_set()  # read before the lookup: no false alarms
            for i in range(64):
                if tlb.lookup(1, i << 12) is not None and after_flush:
                    errors.append(i)
            lookups[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    while lookups[0] < 20:
        threading.Event().wait(0.001)
    tlb.invalidate_domain(1)
    flushed.set()
    target = lookups[0] + 20
    while lookups[0] < target:
        threading.Event().wait(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
