"""The compiled IOTLB against the reference (pviommu/iommu/iotlb.py): random
operation sequences (context invalidations' generation bumps included) give
the same answers, lengths, generations and counters;
late inserts lose to concurrent invalidations. Skipped when not built."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pviommu.addr import Hpa
from pviommu.iommu import native
from pviommu.iommu.iotlb import EXTENTS_PER_DOMAIN, Extent, Iotlb, IotlbEntry

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)

TOP = 1 << 64
DIDS = st.sampled_from([1, 1, 1, 2, 0xFFFF])
SIZES = st.sampled_from([12, 12, 12, 21, 21, 30])
#: a few neighbourhoods, so lookups hit: low pages, 2 MiB pages, the top of the space
ADDRS = st.one_of(
    st.integers(0, 64).map(lambda i: i << 12),
    st.integers(0, 6).map(lambda i: (i << 21) + (1 << 30)),
    st.sampled_from([TOP - (1 << 12), TOP - (1 << 21), TOP - (1 << 30), TOP - 3 * (1 << 12)]),
    st.integers(0, TOP - 1),
)
LENGTHS = st.one_of(st.integers(1, 3 << 20), st.sampled_from([1, 8, 4096, 4097, 1 << 21, 1 << 30]))
HPAS = st.integers(0, 1 << 20).map(lambda i: (2 << 40) + (i << 12))


def _end(start: int, length: int) -> int:
    return min(start + length, TOP)


class IotlbMachine(RuleBasedStateMachine):
    """Every operation on both IOTLBs; answers and counters compared each step.
    Lookups aim at the edges of what was inserted (``points``) as often as at
    arbitrary addresses; the capacity is small so that evictions happen."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = Iotlb(capacity=12)
        self.nat = native.NativeIotlb(capacity=12)
        self.points: list[int] = [0]

    def _generation(self, stale: bool) -> int:
        assert self.ref.generation == self.nat.generation
        return self.ref.generation - 1 if stale else self.ref.generation

    def _point(self, data: st.DataObject) -> int:
        edge = st.sampled_from(self.points[-8:]).flatmap(  # recent edges, mostly exact
            lambda p: st.sampled_from([p, p, p, p + 1, p - 1, p + 4096, p - 4096]).map(lambda x: x % TOP))
        return data.draw(edge | edge | ADDRS)

    def _remember(self, iova: int, end: int) -> None:
        self.points += [iova, end % TOP]
        del self.points[:-64]

    @rule(did=DIDS, addr=ADDRS, size=SIZES, n=st.integers(1, 8), hpa=HPAS, read=st.booleans(), write=st.booleans(),
          stale=st.sampled_from([False, False, False, True]), extent=st.booleans())
    def insert(self, did: int, addr: int, size: int, n: int, hpa: int, read: bool, write: bool, stale: bool,
               extent: bool) -> None:
        """``n`` consecutive entries (contiguous in host memory), as a walk-filled
        buffer leaves them, and perhaps the extent ``translate`` builds of them."""
        iova = addr & ~((1 << size) - 1)
        hpa &= ~((1 << size) - 1)
        gen = self._generation(stale)
        n = min(n, (TOP - iova) >> size)
        for i in range(n):
            entry = IotlbEntry(iova + (i << size), Hpa(hpa + (i << size)), size, read, write)
            assert self.nat.insert(did, entry, gen) == self.ref.insert(did, entry, gen)
        if extent and n >= 2:
            ext = Extent(iova, hpa, size, n, read, write)
            assert self.nat.insert_extent(did, ext, gen) == self.ref.insert_extent(did, ext, gen)
        self._remember(iova, iova + (n << size))

    @rule(did=DIDS, data=st.data(), size=SIZES, count=st.integers(1, 6), hpa=HPAS, read=st.booleans(),
          write=st.booleans(), stale=st.sampled_from([False, False, True]))
    def insert_extent(self, did: int, data: st.DataObject, size: int, count: int, hpa: int, read: bool, write: bool,
                      stale: bool) -> None:
        iova = self._point(data) & ~((1 << size) - 1)
        ext = Extent(iova, hpa, size, count, read, write)
        gen = self._generation(stale)
        assert self.nat.insert_extent(did, ext, gen) == self.ref.insert_extent(did, ext, gen)
        self._remember(iova, ext.end)

    @rule(did=DIDS, data=st.data(), write=st.booleans(), count=st.booleans())
    def lookup(self, did: int, data: st.DataObject, write: bool, count: bool) -> None:
        iova = self._point(data)
        assert self.nat.lookup(did, iova, write, count=count) == self.ref.lookup(did, iova, write, count=count)

    @rule(did=DIDS, data=st.data(), length=LENGTHS, write=st.booleans(), count=st.booleans())
    def lookup_run(self, did: int, data: st.DataObject, length: int, write: bool, count: bool) -> None:
        start = self._point(data)
        end = _end(start, length)
        assert (self.nat.lookup_run(did, start, end, write, count=count)
                == self.ref.lookup_run(did, start, end, write, count=count))

    @rule(did=DIDS, data=st.data(), length=LENGTHS, write=st.booleans())
    def lookup_span(self, did: int, data: st.DataObject, length: int, write: bool) -> None:
        start = self._point(data)
        end = _end(start, length)
        assert self.nat.lookup_span(did, start, end, write) == self.ref.lookup_span(did, start, end, write)

    @rule(did=DIDS, data=st.data(), length=LENGTHS, write=st.booleans())
    def lookup_extent(self, did: int, data: st.DataObject, length: int, write: bool) -> None:
        pos = self._point(data)
        end = _end(pos, length)
        assert self.nat.lookup_extent(did, pos, end, write) == self.ref.lookup_extent(did, pos, end, write)

    @rule(kind=st.sampled_from(["pages", "pages", "pages", "domain", "all", "context"]), did=DIDS, data=st.data(),
          am=st.integers(0, 20) | st.sampled_from([40, 51, 52]))
    def invalidate(self, kind: str, did: int, data: st.DataObject, am: int) -> None:
        if kind == "context":  # a context invalidation: no entry dropped, every walk begun before it is late
            assert self.nat.bump_generation() is self.ref.bump_generation() is None
        elif kind == "all":
            assert self.nat.invalidate_all() == self.ref.invalidate_all()
        elif kind == "domain":
            assert self.nat.invalidate_domain(did) == self.ref.invalidate_domain(did)
        else:
            addr = self._point(data)
            assert self.nat.invalidate_pages(did, addr, am) == self.ref.invalidate_pages(did, addr, am)

    @invariant()
    def same_state(self) -> None:
        assert len(self.nat) == len(self.ref)
        assert self.nat.generation == self.ref.generation
        assert self.nat.stats == self.ref.stats


TestIotlbSequencesMatchReference = IotlbMachine.TestCase
TestIotlbSequencesMatchReference.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_lookups_at_every_edge_of_entries_and_extents_match_reference() -> None:
    """Starts and ends exactly on, just inside and just outside entries and
    extents of each size, for reads and writes, with and without rights."""
    ref, nat = Iotlb(), native.NativeIotlb()
    layout = [(0x10_0000, 12, 4, True, True), (0x20_0000, 21, 3, True, False), (0x4000_0000, 30, 2, False, True),
              (TOP - (4 << 12), 12, 4, True, True)]
    edges: list[int] = []
    for tlb in (ref, nat):
        for iova, lg2, n, read, write in layout:
            for i in range(n):
                assert tlb.insert(1, IotlbEntry(iova + (i << lg2), Hpa((2 << 40) + (i << lg2)), lg2, read, write), 0)
            assert tlb.insert_extent(1, Extent(iova, (2 << 40), lg2, n - 1, read, write), 0)
    for iova, lg2, n, _, _ in layout:
        for edge in (iova, iova + (1 << lg2), iova + ((n - 1) << lg2), iova + (n << lg2)):
            edges += [(edge + d) % TOP for d in (-1, 0, 1)]
    for start in edges:
        for end in sorted({min(TOP, e) for e in edges if e > start} | {min(TOP, start + 1)}):
            for write in (False, True):
                assert nat.lookup_span(1, start, end, write) == ref.lookup_span(1, start, end, write)
                assert nat.lookup_extent(1, start, end, write) == ref.lookup_extent(1, start, end, write)
                assert nat.lookup_run(1, start, end, write) == ref.lookup_run(1, start, end, write)
            assert nat.lookup(1, start, write) == ref.lookup(1, start, write)
    assert nat.stats == ref.stats and nat.stats.hits > 0


def test_lookup_returns_the_inserted_entry_object_as_the_reference_does() -> None:
    ref, nat = Iotlb(), native.NativeIotlb()
    entry = IotlbEntry(0x5000, Hpa(2 << 40), 12, True, False)
    for tlb in (ref, nat):
        assert tlb.insert(3, entry, 0)
        assert tlb.lookup(3, 0x5FFF) is entry and tlb.lookup_run(3, 0x5000, 0x6000, False)[0] is entry
        assert tlb.lookup(3, 0x5000, True) is None  # read-only: a write misses


def test_bad_page_mask_is_refused_like_reference() -> None:
    ref, nat = Iotlb(), native.NativeIotlb()
    for am in (-1, 53):
        with pytest.raises(ValueError, match="address mask") as exc_ref:
            ref.invalidate_pages(1, 0, am)
        with pytest.raises(ValueError, match="address mask") as exc_nat:
            nat.invalidate_pages(1, 0, am)
        assert str(exc_nat.value) == str(exc_ref.value)


def test_extents_past_the_per_domain_bound_are_dropped_like_reference() -> None:
    ref, nat = Iotlb(), native.NativeIotlb()
    entry = IotlbEntry(0, Hpa(2 << 40), 12, True, True)
    for tlb in (ref, nat):
        tlb.insert(1, entry, 0)  # the domain must exist for extents
    for i in range(EXTENTS_PER_DOMAIN + 10):
        ext = Extent(i << 16, (2 << 40) + (i << 16), 12, 4, True, i % 3 != 0)
        assert nat.insert_extent(1, ext, 0) == ref.insert_extent(1, ext, 0)
    for i in range(EXTENTS_PER_DOMAIN + 10):
        for write in (False, True):
            pos, end = (i << 16) + 0x1800, (i << 16) + 0x10_0000
            assert nat.lookup_extent(1, pos, end, write) == ref.lookup_extent(1, pos, end, write)
    assert nat.stats == ref.stats


def test_unaligned_entries_and_empty_ranges_get_a_clear_error() -> None:
    nat = native.NativeIotlb()
    with pytest.raises(ValueError, match="not aligned"):
        nat.insert(1, IotlbEntry(0x1800, Hpa(2 << 40), 12, True, True), 0)
    with pytest.raises(ValueError, match="empty range"):
        nat.lookup_span(1, 0x2000, 0x2000, False)


def test_a_flush_beats_every_late_insert_under_concurrency() -> None:
    """Inserters on other threads tag each entry's HPA with the generation they
    read; after ``invalidate_all`` returns, nothing cached may carry an older
    one (the generation check), however the threads interleave."""
    tlb = native.NativeIotlb(capacity=1 << 16)
    stop = threading.Event()
    errors: list[BaseException] = []

    def inserter(did: int) -> None:
        try:
            page = 0
            while not stop.is_set():
                gen = tlb.generation
                tlb.insert(did, IotlbEntry(page << 12, Hpa((gen << 24) | (page << 12)), 12, True, True), gen)
                page = (page + 1) % 4096
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=inserter, args=(d,)) for d in (1, 2)]
    for t in threads:
        t.start()
    stale = 0
    try:
        for _ in range(200):
            tlb.invalidate_all()
            floor = tlb.generation  # inserts from now on may only carry this generation or newer
            for did in (1, 2):
                for hit in tlb.lookup_run(did, 0, 4096 << 12, False, count=False):
                    stale += (int(hit.hpa) >> 24) < floor
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert stale == 0
    assert tlb.stats.late_inserts_dropped >= 0 and tlb.stats.inv_global == 200
