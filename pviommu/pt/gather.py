"""The unmap gather (Linux ``struct iommu_iotlb_gather``).

Unmap clears entries and records *what the IOTLB must forget* here instead of
flushing per entry; table pages it empties go on ``freelist`` and stay
allocated, because an IOMMU may still be walking them until the flush has
completed. The owner flushes (``start``..``last``, or the whole domain), then
frees the freelist, then ``reset()``s the gather -- the order Linux's
iommu_iotlb_sync enforces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pviommu.addr import PAGE_SHIFT
from pviommu.pt.common import U64_MASK

T = TypeVar("T", bound=int)


@dataclass(slots=True)
class IotlbGather(Generic[T]):
    """Range to flush (``start``..``last`` inclusive; empty while start > last),
    the largest leaf size removed, and emptied table pages awaiting free."""

    start: int = U64_MASK
    last: int = 0
    pgsize_lg2: int = 0
    freelist: list[T] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.start > self.last

    def add_range(self, start: int, last: int, size_lg2: int) -> None:
        """Widen the flush range to the hull of itself and ``start..last``."""
        self.start = min(self.start, start)
        self.last = max(self.last, last)
        self.pgsize_lg2 = max(self.pgsize_lg2, size_lg2)

    def psi(self) -> tuple[int, int]:
        """The page-selective invalidation covering the range: ``(addr, am)``,
        ``2**am`` 4 KiB pages from ``addr`` aligned to their size. Pages are
        rounded up to a power of two and the mask widened until the aligned
        block covers an unaligned start (Linux calculate_psi_aligned_address)."""
        if self.empty:
            raise ValueError("an empty gather has nothing to invalidate")
        first, last = self.start >> PAGE_SHIFT, self.last >> PAGE_SHIFT
        am = (last - first).bit_length()  # ceil(log2(pages)), pages = last - first + 1
        while first >> am != last >> am:
            am += 1
        return (first >> am) << am << PAGE_SHIFT, am

    def reset(self) -> None:
        self.start, self.last, self.pgsize_lg2 = U64_MASK, 0, 0
        self.freelist = []
