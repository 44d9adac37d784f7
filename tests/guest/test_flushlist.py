"""Flush-list construction of each revision against hand-worked examples and a brute-force model.

Worked from the reference (series-revisions section 4): v1 splits the pages into exact aligned
power-of-two blocks (``__ffs(start_pfn)`` vs ``__fls(nr_pages)``, PAGE_ALIGN of the inclusive end);
v2 sends one block whose shift is one more than the highest differing bit of first and last page.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent.driver.flushlist import v1_exact_blocks, v2_covering_block

K4 = 4096


@pytest.mark.parametrize(("start", "last", "blocks"), [
    (0x3000, 0x9FFF, [(3, 0), (4, 2), (8, 1)]),        # pages 3..9: 1 + 4 + 2
    (0x0, 0xFFF, [(0, 0)]),                            # page 0: __ffs(0) is taken as 63, __fls(1) = 0
    (0x0, 0x7FFF, [(0, 3)]),                           # pages 0..7: one block of 8
    (0x10_0000, 0x10_3FFF, [(0x100, 2)]),              # 4 aligned pages
    (0x5000, 0x5FFF, [(5, 0)]),
    (0x1_F000, 0x2_0FFF, [(0x1F, 0), (0x20, 0)]),      # across a 128 KiB boundary
    (0x2000, 0x2000, []),                              # inclusive end on a page boundary: v1 drops the page
    (0x2000, 0x2800, [(2, 0)]),
])
def test_v1_blocks_match_hand_worked_examples(start: int, last: int, blocks: list[tuple[int, int]]) -> None:
    assert v1_exact_blocks(start, last) == blocks


def test_v1_reports_overflow_beyond_the_capacity_and_one_range_never_reaches_508() -> None:
    assert v1_exact_blocks(0x3000, 0x9FFF, capacity=2) is None  # needs 3
    assert v1_exact_blocks(0x3000, 0x9FFF, capacity=3) == [(3, 0), (4, 2), (8, 1)]
    # the worst contiguous range of a 48-bit space: about 2 blocks per address bit, far below 508
    worst = v1_exact_blocks(K4, (1 << 47) - K4 - 1)
    assert worst is not None and len(worst) < 2 * 36


@pytest.mark.parametrize(("start", "last", "block"), [
    (0x3000, 0x9FFF, (0, 4)),            # 3 ^ 9 = 0b1010: shift 4, start aligned down to 0
    (0x5000, 0x5FFF, (5, 0)),            # one page: shift 0
    (0x5000, 0x5FFF + K4, (4, 2)),       # pages 5, 6: 5 ^ 6 = 0b11 -> shift 2 from page 4
    (0x10_0000, 0x10_3FFF, (0x100, 2)),  # pages 0x100..0x103: 0b11 -> 2
    (0x7000, 0x8FFF, (0, 4)),            # pages 7, 8: 0b1111 -> shift 4 from 0
    (0x2000, 0x2000, (2, 0)),            # v2 fixed v1's corner case: the page is flushed
])
def test_v2_covering_block_matches_hand_worked_examples(start: int, last: int, block: tuple[int, int]) -> None:
    assert v2_covering_block(start, last) == block


ranges = st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 24)).map(lambda t: (t[0], t[0] + t[1]))


@given(ranges)
def test_v1_blocks_are_aligned_disjoint_powers_of_two_covering_exactly_the_pages(r: tuple[int, int]) -> None:
    start, last = r
    blocks = v1_exact_blocks(start, last, capacity=10_000)
    assert blocks is not None
    first_pfn, end_pfn = start // K4, -(-last // K4)  # PAGE_ALIGN(last) / 4K
    pages: list[int] = []
    for pfn, shift in blocks:
        assert pfn % (1 << shift) == 0  # aligned to its size
        pages.extend(range(pfn, pfn + (1 << shift)))
    assert pages == list(range(first_pfn, end_pfn))  # in order, no gaps, no overlaps


@given(ranges)
def test_v2_block_is_the_smallest_aligned_power_of_two_holding_first_and_last_page(r: tuple[int, int]) -> None:
    start, last = r
    pfn, shift = v2_covering_block(start, last)
    first, final = start // K4, last // K4
    assert pfn % (1 << shift) == 0 and pfn <= first and final < pfn + (1 << shift)
    smaller = [s for s in range(shift) if first >> s == final >> s]  # brute force: no smaller block holds both
    assert smaller == []
