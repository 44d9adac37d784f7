"""IOVA allocator properties (Linux iova.c rules)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.driver.domain import iova_pages
from guest_agent.driver.iova import IovaAllocator, roundup_pow_of_two
from pviommu.addr import MSI_WINDOW_LAST, MSI_WINDOW_START, PAGE_SHIFT, Iova

LIMIT = 1 << 32  # small enough that the MSI window is in the way

ops = st.lists(st.tuples(st.booleans(), st.integers(1, 600)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_allocations_are_size_aligned_disjoint_and_never_in_msi_window(steps: list[tuple[bool, int]]) -> None:
    a = IovaAllocator(LIMIT)
    live: dict[int, int] = {}
    for do_free, pages in steps:
        if do_free and live:
            iova = sorted(live)[pages % len(live)]
            del live[iova]
            a.free(Iova(iova))
            continue
        pages = iova_pages(pages << PAGE_SHIFT)
        iova = int(a.alloc(pages))
        size = pages << PAGE_SHIFT
        assert iova % (roundup_pow_of_two(pages) << PAGE_SHIFT) == 0, "size-aligned"
        assert not (iova <= MSI_WINDOW_LAST and MSI_WINDOW_START <= iova + size - 1), "MSI window handed out"
        assert 0 < iova and iova + size <= LIMIT
        for other, osize in live.items():
            assert iova + size <= other or other + osize <= iova, "overlap"
        live[iova] = size


def test_allocation_is_top_down_from_the_limit() -> None:
    a = IovaAllocator(1 << 40)
    first = a.alloc(1)
    second = a.alloc(1)
    big = a.alloc(512)
    assert first == (1 << 40) - 4096
    assert second == first - 4096
    assert big == ((second >> PAGE_SHIFT) - 512) // 512 * 512 << PAGE_SHIFT


def test_search_skips_the_msi_window() -> None:
    a = IovaAllocator(MSI_WINDOW_LAST + 1)  # the window is the top of the space
    iova = a.alloc(1)
    assert iova == MSI_WINDOW_START - 4096


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_a_range_is_handed_out_again_only_after_it_was_freed(sizes: list[int]) -> None:
    a = IovaAllocator(1 << 36)
    held: set[int] = set()
    released: set[int] = set()
    for i, pages in enumerate(sizes):
        iova = int(a.alloc(roundup_pow_of_two(pages)))
        assert iova not in held, "a live range was handed out twice"
        held.add(iova)
        released.discard(iova)
        if i % 3 == 2:
            victim = min(held)
            held.discard(victim)
            a.free(Iova(victim))
            released.add(victim)


def test_freed_small_ranges_come_back_from_the_rcache_first() -> None:
    a = IovaAllocator(1 << 36)
    x = a.alloc(4)
    a.alloc(4)
    a.free(x)
    assert a.alloc(4) == x


def test_claim_refuses_overlap_and_the_msi_window() -> None:
    a = IovaAllocator(1 << 36)
    a.claim(Iova(0x10000), 4)
    for bad in (0x12000, MSI_WINDOW_START):
        try:
            a.claim(Iova(bad), 4)
        except Exception as exc:
            assert "overlap" in str(exc)
        else:
            raise AssertionError("claim should have been refused")
