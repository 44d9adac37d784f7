"""Paging-structure caches of the nested walk (``pviommu.iommu.pscache``):
cheaper walks next to a recent one, dropped by every invalidation, never a
path to a freed table page, race-safe, and never a different answer."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pviommu.abi.invq import Invalidation
from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.errors import PageTableError
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.pscache import PsCache, fs_key
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.dma import DmaRuns
from pviommu.pt.common import RW, EntryType, Perm
from pviommu.pt.fmt.x86_64 import A, D
from pviommu.pt.gather import IotlbGather
from tests.kit.core_env import DATA, DID, HOLE, RO, SLOT, NestedSystem, build_system

IOVA = Iova(0x7F00_0000_0000)
FULL = 24  # (4 + 1) * (4 + 1) - 1
#: a neighbour below a cached PDE: the PT page's stage 2 is cached too, so one
#: stage-1 read and the 4 reads of the data page's stage-2 walk
NEIGHBOUR = 1 + 4


@pytest.fixture
def system(tmp_path: Path) -> Iterator[NestedSystem]:
    """The caches exist only in the Python walk: every unit here asks for them."""
    sys_ = build_system(tmp_path, pscache=True)
    yield sys_
    sys_.host.close()


def reads_of(unit: IommuUnit, iova: int, write: bool = False, length: int = 8) -> tuple[DmaRuns, int]:
    before = unit.stats.walk_reads
    runs = unit.translate(SLOT, Iova(iova), length, write)
    return runs, unit.stats.walk_reads - before


def test_neighbouring_page_after_a_first_walk_costs_fewer_reads(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 4 * SZ_4K, RW)
    unit = system.new_unit()
    runs, n = reads_of(unit, IOVA)
    assert runs.fault is None and n == FULL
    for i in (1, 2, 3):
        runs, n = reads_of(unit, IOVA + i * SZ_4K)
        assert runs.fault is None and runs.runs[0].hpa == system.hpa(DATA + i * SZ_4K)
        assert n == NEIGHBOUR
    assert unit.pscache is not None and unit.pscache.stats.fs_hits == [0, 3, 0, 0, 0]


def test_page_in_another_2mib_region_starts_from_the_cached_pdpte(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    system.s1.map(Iova(IOVA + SZ_2M), Gpa(DATA + SZ_4K), SZ_4K, RW)
    unit = system.new_unit()
    assert reads_of(unit, IOVA)[1] == FULL
    # PDPTE cached (and the PD page's stage 2): PDE read, PT page's stage 2 (4), PTE, data stage 2 (4)
    runs, n = reads_of(unit, IOVA + SZ_2M)
    assert runs.fault is None and runs.runs[0].hpa == system.hpa(DATA + SZ_4K)
    assert n == 1 + 4 + 1 + 4


def test_caches_disabled_every_iotlb_miss_is_a_full_walk(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = IommuUnit(system.host, pscache=False)
    assert unit.pscache is None
    assert reads_of(unit, IOVA)[1] == FULL
    assert reads_of(unit, IOVA + SZ_4K)[1] == FULL


INVALIDATIONS: dict[str, Invalidation] = {
    "global": Invalidation.everything(),
    "domain": Invalidation.domain(DID),
    # a PSI of one page far from the next walk's page still drops every entry of the DID
    "pages": Invalidation.pages(DID, Iova(0x1000_0000), 0),
    "pages, large mask": Invalidation.pages(DID, IOVA, 9),
    "context of the slot": Invalidation.context(SLOT),
    "every context": Invalidation.context(None),
}


@pytest.mark.parametrize("kind", list(INVALIDATIONS))
def test_every_invalidation_kind_drops_the_caches_so_the_next_walk_reads_every_level(
    system: NestedSystem, kind: str
) -> None:
    system.s1.map(IOVA, Gpa(DATA), 3 * SZ_4K, RW)
    unit = system.new_unit()
    assert reads_of(unit, IOVA)[1] == FULL
    assert reads_of(unit, IOVA + SZ_4K)[1] == NEIGHBOUR
    assert unit.pscache is not None and len(unit.pscache) > 0
    INVALIDATIONS[kind].apply(unit)
    assert len(unit.pscache) == 0
    runs, n = reads_of(unit, IOVA + 2 * SZ_4K)  # never walked: an IOTLB miss whatever the kind
    assert runs.fault is None and n == FULL


def test_invalidating_another_domain_keeps_this_domains_caches(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = system.new_unit()
    assert reads_of(unit, IOVA)[1] == FULL
    unit.invalidate_domain(DID + 1)
    unit.invalidate_pages(DID + 1, IOVA, 0)
    assert reads_of(unit, IOVA + SZ_4K)[1] == NEIGHBOUR


def test_freed_and_reused_stage1_table_page_is_never_reached_through_a_cached_entry(system: NestedSystem) -> None:
    """The guest unmaps a 2 MiB region of 4 KiB pages (its page table goes to
    the freelist), flushes with a PSI of that range, frees the table page and
    reuses it -- here as a page table for another region, its entries
    pointing somewhere else. A walk in the old region must fault (PDE cleared
    in memory), not follow the cached PDE into the reused page."""
    unit = system.new_unit()
    system.s1.map(IOVA, Gpa(DATA + SZ_4K), SZ_2M, RW)  # GPA not 2 MiB aligned: 512 4 KiB leaves
    system.s1.map(Iova(IOVA + SZ_2M), Gpa(DATA), SZ_4K, RW)  # keeps the page directory alive
    assert reads_of(unit, IOVA)[0].fault is None  # caches now hold the PDE -> this PT
    pt_page = system.s1.walk(IOVA)[-1].table
    gather: IotlbGather[Gpa] = IotlbGather()
    assert system.s1.unmap(IOVA, SZ_2M, gather) == SZ_2M
    assert gather.freelist == [pt_page]
    # the hazard a guest must avoid: reusing the page before the flush lets the
    # (legitimately) cached PDE reach it, as a stale IOTLB entry would
    system.ram.write_u64(Gpa(pt_page + 8), (DATA + 64 * SZ_4K) | 0x67)
    stale = unit.translate(SLOT, Iova(IOVA + SZ_4K), 8, False)
    assert stale.fault is None and stale.runs[0].hpa == system.hpa(DATA + 64 * SZ_4K)
    system.ram.write_u64(Gpa(pt_page + 8), 0)
    # the correct order: flush (PSI of the unmapped range), then free and reuse
    addr, am = gather.psi()
    unit.invalidate_pages(DID, addr, am)
    for table in gather.freelist:
        system.g_frames.free_table(table)
    other = Iova(IOVA + 2 * SZ_2M)  # same page directory, another PDE
    system.s1.map(other, Gpa(DATA + 64 * SZ_4K), SZ_2M, RW)  # a new PT: the freed page
    assert system.s1.walk(other)[-1].table == pt_page
    for i in (0, 1, 2, 511):
        runs = unit.translate(SLOT, Iova(IOVA + i * SZ_4K), 8, bool(i & 1))
        assert runs.fault is not None and runs.fault.reason == FaultReason.FS_NOT_PRESENT
        ok = unit.translate(SLOT, Iova(other + i * SZ_4K), 8, False)
        assert ok.fault is None and ok.runs[0].hpa == system.hpa(DATA + (64 + i) * SZ_4K)


def test_freed_upper_table_reused_after_a_domain_flush_is_not_reached(system: NestedSystem) -> None:
    """The same when the only mapping under a PML4E goes: PDPT, PD and PT pages
    freed, DSI, reuse."""
    unit = system.new_unit()
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    assert reads_of(unit, IOVA)[0].fault is None
    steps = system.s1.walk(IOVA)
    gather: IotlbGather[Gpa] = IotlbGather()
    system.s1.unmap(IOVA, 2 * SZ_4K, gather)
    assert set(gather.freelist) == {step.table for step in steps[1:]}  # PDPT, PD, PT
    unit.invalidate_domain(DID)
    for table in gather.freelist:
        system.g_frames.free_table(table)
    # reuse both pages as tables pointing at other memory (garbage, present, user, writable)
    for table in gather.freelist:
        for i in range(4):
            system.ram.write_u64(Gpa(table + i * 8), (DATA + 128 * SZ_4K) | 0x67)
    runs = unit.translate(SLOT, Iova(IOVA + SZ_4K), 8, False)
    assert runs.fault is not None and runs.fault.reason == FaultReason.FS_NOT_PRESENT


def test_table_relinked_before_a_lazy_flush_never_faults_a_mapped_page(system: NestedSystem) -> None:
    """Lazy mode (DMA_FQ): the guest unmaps the only page under a PDE -- the
    emptied page table is unlinked, its free deferred to the next flush --
    then maps a fresh IOVA in the same 2 MiB, which links a new page table
    at the same PDE. The cached PDE leads to the old, empty table: that walk
    faults, so it is done again from memory, which maps the page; the fresh
    entries replace the stale ones."""
    unit = system.new_unit()
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    system.s1.map(Iova(IOVA + 2 * SZ_2M), Gpa(DATA), SZ_4K, RW)  # keeps the page directory alive
    assert reads_of(unit, IOVA)[0].fault is None
    old_pt = system.s1.walk(IOVA)[-1].table
    gather: IotlbGather[Gpa] = IotlbGather()
    system.s1.unmap(IOVA, SZ_4K, gather)
    assert gather.freelist == [old_pt]  # unlinked, freed only after the (deferred) flush
    fresh = Iova(IOVA + 8 * SZ_4K)
    system.s1.map(fresh, Gpa(DATA + 8 * SZ_4K), 2 * SZ_4K, RW)
    assert system.s1.walk(fresh)[-1].table != old_pt
    runs, n = reads_of(unit, fresh, write=True)
    assert runs.fault is None and runs.runs[0].hpa == system.hpa(DATA + 8 * SZ_4K)
    assert n == 1 + FULL  # the empty old table's entry, then the full walk
    assert unit.pscache is not None and unit.pscache.stats.rewalks == 1
    runs, n = reads_of(unit, fresh + SZ_4K)
    assert runs.fault is None and n == NEIGHBOUR  # the cached PDE now leads to the new table
    # an IOVA really unmapped still faults, with the uncached walk's reason
    plain = IommuUnit(system.host, pscache=False)
    got, want = unit.translate(SLOT, Iova(IOVA + SZ_2M), 8, False), plain.translate(SLOT, Iova(IOVA + SZ_2M), 8, False)
    assert got.fault is not None and got == want


def test_walk_that_started_before_an_invalidation_does_not_insert(system: NestedSystem) -> None:
    """An invalidation arriving in the middle of a walk (after it read the
    first table entry): the walk's answer is used once, but nothing it found
    is cached -- the next walk next to it reads every level again."""
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = system.new_unit()
    walker = unit.walker
    real_host = walker._host
    fired: list[bool] = []

    def racing_host(*args: object, **kwargs: object) -> object:
        if not fired:
            fired.append(True)
            unit.invalidate_pages(DID, 0x1000_0000, 0)  # any invalidation of the DID
        return real_host(*args, **kwargs)  # type: ignore[arg-type]

    walker._host = racing_host  # type: ignore[method-assign]
    runs, n = reads_of(unit, IOVA)
    walker._host = real_host  # type: ignore[method-assign]
    assert fired and runs.fault is None and n == FULL
    assert unit.pscache is not None and len(unit.pscache) == 0
    assert unit.pscache.stats.late_inserts_dropped > 0
    assert unit.iotlb.stats.late_inserts_dropped == 1  # the IOTLB dropped its insert too
    assert reads_of(unit, IOVA + SZ_4K)[1] == FULL


def test_insert_with_a_generation_older_than_an_invalidation_is_dropped() -> None:
    cache = PsCache()
    s2_tag, fs_tag = (0x10_0000, 4), (0x2000, 4)
    tables = [(0x1000, (0x2000, 3))]
    fs = [(fs_key(int(IOVA), 1), (0x3000, True))]
    for invalidate in (cache.invalidate_all, lambda: cache.invalidate_domain(DID),
                       lambda: cache.invalidate_domain(DID, pages=True),
                       lambda: cache.invalidate_all(context=True)):
        generation = cache.generation
        invalidate()
        assert not cache.insert(DID, s2_tag, tables, fs_tag, fs, generation)
        assert len(cache) == 0
    assert cache.insert(DID, s2_tag, tables, fs_tag, fs, cache.generation)
    assert cache.lookup_table(DID, s2_tag, 0x1000) == (0x2000, 3)
    assert cache.lookup_fs(DID, fs_tag, int(IOVA) + SZ_4K, True) == (0, 0x3000, True)


def test_entries_of_another_context_under_the_same_did_are_never_used() -> None:
    """A context rewritten without a flush (another root, same DID): its walks
    miss, and their inserts replace the old root's entries."""
    cache = PsCache()
    old_tag, new_tag = (0x2000, 4), (0x5000, 4)
    assert cache.insert(DID, (1, 4), [(0x2000, (0x9000, 3))], old_tag, [(fs_key(int(IOVA), 1), (0x3000, True))],
                        cache.generation)
    assert cache.lookup_fs(DID, new_tag, int(IOVA), False) is None
    assert cache.lookup_table(DID, (2, 4), 0x2000) is None
    assert cache.insert(DID, (2, 4), [(0x5000, (0xA000, 3))], new_tag, [(fs_key(int(IOVA), 2), (0x6000, True))],
                        cache.generation)
    assert len(cache) == 2
    assert cache.lookup_fs(DID, old_tag, int(IOVA), False) is None
    assert cache.lookup_fs(DID, new_tag, int(IOVA), False) == (1, 0x6000, True)


def test_caches_are_bounded_and_evict_wholesale_counted(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), SZ_4K, RW)
    system.s1.map(Iova(IOVA + (1 << 39)), Gpa(DATA + SZ_4K), SZ_4K, RW)  # another PML4E: 4 new tables
    unit = system.new_unit()
    unit.pscache = PsCache(table_capacity=5, fs_capacity=4)
    reads_of(unit, IOVA)  # 4 table pages, 3 stage-1 entries
    assert len(unit.pscache) == 7 and unit.pscache.stats.evictions == 0
    runs, n = reads_of(unit, IOVA + (1 << 39))
    assert runs.fault is None and n == FULL - 4  # only the root's stage-2 walk was cached
    assert unit.pscache.stats.evictions == 4 + 3
    assert unit.pscache._tables <= 5 and unit.pscache._fs <= 4
    assert reads_of(unit, IOVA + (1 << 39) + SZ_4K)[0].fault is not None  # unmapped, still a correct answer


def test_cached_entry_keeps_accessed_semantics_after_a_flush(system: NestedSystem) -> None:
    """A bits the guest clears (and flushes) are set again by the next walk."""
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = system.new_unit()
    assert reads_of(unit, IOVA)[0].fault is None
    steps = system.s1.walk(IOVA)
    for step in steps[:-1]:
        system.ram.write_u64(Gpa(step.table + step.index * 8), step.entry & ~A)
    unit.invalidate_domain(DID)
    assert reads_of(unit, IOVA + SZ_4K)[1] == FULL
    for step in steps[:-1]:
        assert system.ram.read_u64(Gpa(step.table + step.index * 8)) & A


def test_write_after_a_read_walks_the_leaf_and_sets_dirty(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = system.new_unit()
    leaf = system.s1.walk(Iova(IOVA + SZ_4K))[-1]
    system.ram.write_u64(Gpa(leaf.table + leaf.index * 8), leaf.entry & ~(A | D))  # clean, not accessed
    assert reads_of(unit, IOVA)[0].fault is None
    assert reads_of(unit, IOVA + SZ_4K)[0].fault is None  # a read sets A only
    assert system.ram.read_u64(Gpa(leaf.table + leaf.index * 8)) & (A | D) == A
    runs, n = reads_of(unit, IOVA + SZ_4K, write=True)
    assert runs.fault is None and n == NEIGHBOUR
    assert system.ram.read_u64(Gpa(leaf.table + leaf.index * 8)) & D


def test_write_through_a_read_only_upper_entry_faults_as_the_uncached_walk(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    pde = system.s1.walk(IOVA)[-2]
    system.ram.write_u64(Gpa(pde.table + pde.index * 8), pde.entry & ~2)  # R/W=0 in the PDE
    cached, plain = system.new_unit(), IommuUnit(system.host, pscache=False)
    assert cached.translate(SLOT, IOVA, 8, False).fault is None  # caches the PDE, writes not allowed
    got = cached.translate(SLOT, Iova(IOVA + SZ_4K), 8, True)
    want = plain.translate(SLOT, Iova(IOVA + SZ_4K), 8, True)
    assert got.fault is not None and got.fault.reason == FaultReason.NO_WRITE
    assert got == want  # same reason and the same level in the detail
    assert cached.translate(SLOT, Iova(IOVA + SZ_4K), 8, False).fault is None


def test_explain_shows_the_full_walk_with_warm_caches(system: NestedSystem) -> None:
    system.s1.map(IOVA, Gpa(DATA), 2 * SZ_4K, RW)
    unit = system.unit
    reads_of(unit, IOVA)
    assert unit.pscache is not None and len(unit.pscache) > 0
    exp = unit.explain(SLOT, Iova(IOVA + SZ_4K), False)
    assert exp.result.reads == FULL
    assert len([s for s in exp.steps if s.stage in ("S1", "S2")]) == FULL


# -- results always equal the uncached walk ---------------------------------------------------
REGIONS = [0x7F00_0000_0000, 0x7F00_4000_0000, 0x0000_1234_0000_0000, 0xFFFF_8000_0000_0000]
GPAS = [DATA, DATA + 64 * SZ_4K, 14 * SZ_2M, RO[0], HOLE[0], 16 * SZ_2M]
PERMS = [RW, Perm.READ, Perm.WRITE | Perm.READ | Perm.PRIV]

region = st.integers(0, len(REGIONS) - 1)
page = st.one_of(st.integers(0, 8), st.integers(508, 516), st.integers(0, 1023))  # two page tables mostly
op = st.one_of(
    st.tuples(st.just("map"), region, page, st.integers(1, 8), st.sampled_from(GPAS), st.sampled_from(PERMS),
              st.booleans()),
    st.tuples(st.just("unmap"), region, st.one_of(st.sampled_from([0, 512]), page), st.sampled_from([1, 8, 512, 1024]),
              st.sampled_from(["pages", "domain", "global", "context", "lazy", "lazy"])),
    st.tuples(st.just("clear_a"), region, page),
    st.tuples(st.just("clear_w"), region, page, st.integers(1, 3)),
    *[st.tuples(st.just("translate"), region, page.map(lambda p: p * SZ_4K), st.integers(1, 3 * SZ_4K),
                st.booleans())] * 4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40))
# a page table emptied, PSI, the region walked again (through a stale PDE if the PSI kept it)
@example(ops=[("map", 0, 0, 8, DATA, RW, False), ("translate", 0, 0, 8, False),
              ("unmap", 0, 0, 512, "pages"), ("translate", 0, SZ_4K, 8, False)])
# lazy: a page table emptied and relinked before the flush, then walked through the stale PDE
@example(ops=[("map", 0, 0, 1, DATA, RW, False), ("translate", 0, 0, 8, False),
              ("unmap", 0, 0, 1, "lazy"), ("map", 0, 4, 2, DATA, RW, False), ("translate", 0, 4 * SZ_4K, 8, True),
              ("unmap", 0, 4, 2, "pages"), ("map", 0, 4, 2, DATA, RW, False), ("translate", 0, 5 * SZ_4K, 8, False)])
# a cached PDE that forbids writes, then a write next to it
@example(ops=[("map", 0, 0, 2, DATA, RW, False), ("clear_w", 0, 0, 1), ("translate", 0, 0, 8, False),
              ("translate", 0, SZ_4K, 8, True)])
def test_results_always_equal_the_uncached_walk(ops: list[tuple[Any, ...]]) -> None:
    """Two identical systems driven by the same guest: one unit with the
    caches, one without. Every translation gives the same runs and fault
    (reason and detail), and guest RAM -- A/D bits included -- stays equal.
    Unmaps flush at once, or lazily (the emptied tables wait for the next
    flush, and fresh IOVAs may be mapped meanwhile, as DMA_FQ does)."""
    _pending.clear()
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        sys_c, sys_u = (build_system(Path(d1), p1_ram=40 << 20, pscache=True),
                        build_system(Path(d2), p1_ram=40 << 20, pscache=False))
        try:
            assert sys_c.unit.pscache is not None
            for o in ops:
                for s in (sys_c, sys_u):
                    _apply(s, o)
                if o[0] == "translate":
                    _, region, off, length, write = o
                    iova = Iova(REGIONS[region] + off)
                    got = sys_c.unit.translate(SLOT, iova, length, write)
                    want = sys_u.unit.translate(SLOT, iova, length, write)
                    assert got == want, (o, got, want)
                    assert sys_c.bank1.read(0, 4 << 20) == sys_u.bank1.read(0, 4 << 20)  # tables: A/D bits
            assert sys_c.unit.stats.walks == sys_u.unit.stats.walks
        finally:
            sys_c.host.close()
            sys_u.host.close()


#: per system: table pages unlinked by unmaps whose flush has not come yet
_pending: dict[int, list[Gpa]] = {}


def _apply(s: NestedSystem, o: tuple[Any, ...]) -> None:
    kind = o[0]
    if kind == "map":
        _, region, page, n, gpa, perm, large = o
        if large:
            iova, size, oa = REGIONS[region] + (page % 4) * SZ_2M, SZ_2M, 14 * SZ_2M
        else:
            iova, size, oa = REGIONS[region] + page * SZ_4K, n * SZ_4K, gpa
        try:
            s.s1.map(Iova(iova), Gpa(oa), size, perm)
        except PageTableError:  # overlaps an existing mapping: the guest's map refuses it
            pass
    elif kind == "unmap":
        _, region, page, n, flush = o
        gather: IotlbGather[Gpa] = IotlbGather()
        try:
            s.s1.unmap(Iova(REGIONS[region] + page * SZ_4K), n * SZ_4K, gather)
        except PageTableError:  # starts inside a large leaf
            return
        pending = _pending.setdefault(id(s), [])
        pending += gather.freelist  # freed after the next flush, then reused by later maps
        if flush == "lazy":
            return
        if flush == "pages":
            if not gather.empty:
                addr, am = gather.psi()
                s.unit.invalidate_pages(DID, addr, am)
            elif gather.freelist:
                s.unit.invalidate_domain(DID)
        elif flush == "domain":
            s.unit.invalidate_domain(DID)
        elif flush == "global":
            s.unit.invalidate_all()
        else:  # a context-cache flush alone: IOTLBs stay (equally) stale, structure caches go
            s.unit.invalidate_context(SLOT)
        for table in pending:
            s.g_frames.free_table(table)
        pending.clear()
    elif kind == "clear_a":  # the guest clears the Accessed bits on a path, then flushes
        _, region, page = o
        for step in s.s1.walk(Iova(REGIONS[region] + page * SZ_4K)):
            s.ram.write_u64(Gpa(step.table + step.index * 8), step.entry & ~A)
        s.unit.invalidate_domain(DID)
    elif kind == "clear_w":  # the guest makes an upper-level entry read-only, then flushes
        _, region, page, level = o
        for step in s.s1.walk(Iova(REGIONS[region] + page * SZ_4K)):
            if step.level == level and step.type is EntryType.TABLE:
                s.ram.write_u64(Gpa(step.table + step.index * 8), step.entry & ~2)
        s.unit.invalidate_all()
