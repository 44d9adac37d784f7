"""Page-selective flush lists as each revision's driver builds them (series-revisions section 4).

Pure functions from an inclusive byte range ``start..last`` (the unmap gather) to the
``(page_number, page_mask_shift)`` rep elements of HVCALL_FLUSH_DEVICE_DOMAIN_LIST, in 4 KiB
pages (the x86 guest's PAGE_SHIFT equals the Hyper-V page shift):

* v1 ``hv_iommu_fill_iova_list``: exact aligned power-of-two blocks, one per element, as many as
  fit the input page (508); ``None`` when they do not (the caller sends a domain flush). The
  inclusive end is rounded with PAGE_ALIGN, so an end exactly on a page boundary loses that page
  (the corner case v2 says it fixed) -- reproduced here on purpose.
* v2: one block covering the range: its shift is one more than the highest bit in which the first
  and last page differ (0 for a single page), its start aligned down to the block.
"""

from __future__ import annotations

from pviommu.abi.revision import FLUSH_LIST_CAPACITY
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE, align_down, align_up

#: BITS_PER_LONG - 1: v1's alignment of page 0 (__ffs(0) is undefined, so it is special-cased).
_PFN0_ALIGN = 63


def v1_exact_blocks(start: int, last: int, capacity: int = FLUSH_LIST_CAPACITY) -> list[tuple[int, int]] | None:
    """v1's blocks for ``start..last``; ``None`` on overflow (more than ``capacity`` blocks)."""
    start_pfn = start >> PAGE_SHIFT
    end_pfn = align_up(last, PAGE_SIZE) >> PAGE_SHIFT  # PAGE_ALIGN(end) >> PAGE_SHIFT
    nr_pages = end_pfn - start_pfn
    out: list[tuple[int, int]] = []
    while nr_pages > 0:
        if len(out) >= capacity:
            return None
        pfn_align = (start_pfn & -start_pfn).bit_length() - 1 if start_pfn else _PFN0_ALIGN  # __ffs
        size_align = nr_pages.bit_length() - 1  # __fls
        order = min(pfn_align, size_align)
        out.append((start_pfn, order))
        start_pfn += 1 << order
        nr_pages -= 1 << order
    return out


def v2_covering_block(start: int, last: int) -> tuple[int, int]:
    """v2's one covering block for ``start..last``: ``(page_number, page_mask_shift)``."""
    first, final = start >> PAGE_SHIFT, last >> PAGE_SHIFT
    shift = (first ^ final).bit_length()  # highest differing bit + 1; 0 when first == final
    return align_down(first, 1 << shift), shift
