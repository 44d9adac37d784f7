"""IOTLB extents: a shortcut over contiguous entries that never outlives them."""

from __future__ import annotations

from pviommu.addr import Hpa
from pviommu.iommu.iotlb import Extent, Iotlb, IotlbEntry

DID, BASE, HPA = 7, 0x10_0000_0000, 0x100_0000_0000


def _filled(pages: int = 8) -> Iotlb:
    tlb = Iotlb()
    g = tlb.generation
    for i in range(pages):
        tlb.insert(DID, IotlbEntry(BASE + i * 4096, Hpa(HPA + i * 4096), 12, True, True), g)
    assert tlb.insert_extent(DID, Extent(BASE, HPA, 12, pages, True, True), g)
    return tlb


def test_extent_covers_a_contiguous_range_and_counts_a_hit_per_entry() -> None:
    tlb = _filled()
    hits = tlb.stats.hits
    assert tlb.lookup_extent(DID, BASE + 0x1800, BASE + 0x5000, False) == (HPA + 0x1800, 0x3800)
    assert tlb.stats.hits == hits + 4
    assert tlb.lookup_extent(DID, BASE + 8 * 4096, BASE + 9 * 4096, False) is None


def test_every_invalidation_drops_the_extents_it_could_make_stale() -> None:
    for invalidate in (lambda t: t.invalidate_all(), lambda t: t.invalidate_domain(DID),
                       lambda t: t.invalidate_pages(DID, BASE + 3 * 4096, 0)):
        tlb = _filled()
        invalidate(tlb)
        assert tlb.lookup_extent(DID, BASE + 3 * 4096, BASE + 4 * 4096, False) is None


def test_extent_built_across_an_invalidation_is_discarded() -> None:
    tlb = _filled()
    g = tlb.generation
    tlb.invalidate_pages(DID, BASE, 0)
    assert not tlb.insert_extent(DID, Extent(BASE, HPA, 12, 8, True, True), g)
    assert tlb.lookup_extent(DID, BASE, BASE + 4096, False) is None
