"""IOVA allocator after Linux ``drivers/iommu/iova.c`` (one per DMA domain).

Why these rules (reference vtd-nested.md section 6):

* **size-aligned**: a block of ``n`` pages starts on a multiple of
  ``roundup_pow_of_two(n)`` pages, so one power-of-two page-selective
  invalidation (``gather.psi()``) covers it exactly, and 2 MiB blocks can be
  mapped with 2 MiB leaves;
* **top-down from the limit**, continuing below the last allocation (the
  ``cached_node``) and retrying from the top once before giving up, so the
  common case does not rescan the busy top of the space;
* **reserved ranges** (``reserve``) are ordinary allocated ranges nobody
  frees: the MSI window 0xfee00000-0xfeefffff and page 0 are never handed out;
* **rcache**: freed ranges of up to 32 pages (``IOVA_RANGE_CACHE_MAX_SIZE`` 6)
  stay allocated in a per-size magazine and are handed out again first, as
  ``alloc_iova_fast`` / ``free_iova_fast`` do. A cached range is *released*
  (freed by its owner), so reusing it is safe; anything not yet released
  (unmapped but unflushed) is never in the cache.

A range is ``(pfn_lo, pfn_hi)`` inclusive, in 4 KiB page frame numbers.
"""

from __future__ import annotations

import bisect
import threading

from guest_agent.errors import InvalidRequest, IovaExhausted
from pviommu.addr import MSI_WINDOW_LAST, MSI_WINDOW_START, PAGE_SHIFT, Iova

#: Sizes up to 2^(6-1) = 32 pages are cached (iova.c IOVA_RANGE_CACHE_MAX_SIZE).
RCACHE_MAX_PAGES = 1 << (6 - 1)
#: Entries kept per size (one magazine of IOVA_MAG_SIZE in spirit).
RCACHE_DEPTH = 127


def roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class IovaAllocator:
    """Top-down, size-aligned IOVA ranges below ``limit`` (exclusive, bytes)."""

    def __init__(self, limit: int, *, start_pfn: int = 1, reserve_msi: bool = True) -> None:
        self.limit_pfn = limit >> PAGE_SHIFT  # exclusive
        self.start_pfn = start_pfn
        self._lo: list[int] = []  # sorted pfn_lo of every allocated range
        self._hi: dict[int, int] = {}  # pfn_lo -> pfn_hi
        self._reserved: set[int] = set()
        self._rcache: dict[int, list[int]] = {}
        self._cached_limit = self.limit_pfn  # exclusive end where the next search starts
        self._lock = threading.Lock()
        self.allocated_pages = 0  # pages handed out and not released (cache excluded)
        if reserve_msi and MSI_WINDOW_START >> PAGE_SHIFT < self.limit_pfn:
            self.reserve(MSI_WINDOW_START, MSI_WINDOW_LAST)

    # -- reservation -------------------------------------------------------------
    def reserve(self, first: int, last: int) -> None:
        """Never hand out bytes ``first..last`` (iova.c reserve_iova)."""
        lo, hi = first >> PAGE_SHIFT, last >> PAGE_SHIFT
        with self._lock:
            if self._overlaps(lo, hi):
                raise InvalidRequest(f"reserved range {first:#x}..{last:#x} overlaps an allocation")
            self._insert(lo, hi)
            self._reserved.add(lo)

    def _overlaps(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._lo, hi)
        return i > 0 and self._hi[self._lo[i - 1]] >= lo

    def _insert(self, lo: int, hi: int) -> None:
        bisect.insort(self._lo, lo)
        self._hi[lo] = hi

    # -- allocation --------------------------------------------------------------
    def alloc(self, pages: int, *, cached: bool = True) -> Iova:
        """``pages`` 4 KiB pages, size-aligned; the cache is tried first for
        sizes up to 32 pages (callers round those to a power of two, as
        dma-iommu does, so cached blocks fit exactly)."""
        if pages <= 0:
            raise InvalidRequest(f"cannot allocate {pages} IOVA pages")
        with self._lock:
            if cached and pages <= RCACHE_MAX_PAGES:
                mag = self._rcache.get(pages)
                if mag:
                    self.allocated_pages += pages
                    return Iova(mag.pop() << PAGE_SHIFT)
            lo: int | None = self._search(pages, self._cached_limit)
            if lo is None and self._cached_limit != self.limit_pfn:
                lo = self._search(pages, self.limit_pfn)  # iova.c: retry from the top
            if lo is None and self._drain_rcache():
                lo = self._search(pages, self.limit_pfn)  # alloc_iova_fast: flush caches, retry
            if lo is None:
                raise IovaExhausted(f"no free {pages}-page IOVA range below {self.limit_pfn << PAGE_SHIFT:#x}")
            self._insert(lo, lo + pages - 1)
            self._cached_limit = lo
            self.allocated_pages += pages
            return Iova(lo << PAGE_SHIFT)

    def _search(self, pages: int, limit: int) -> int | None:
        """Highest size-aligned pfn_lo with [lo, lo+pages) free and below ``limit``."""
        align = roundup_pow_of_two(pages)
        ceiling = limit  # exclusive top of the current gap
        i = bisect.bisect_left(self._lo, ceiling) - 1
        # a range straddling the ceiling lowers it
        while True:
            floor = self._hi[self._lo[i]] + 1 if i >= 0 else self.start_pfn
            if ceiling > floor:
                lo = ((ceiling - pages) // align) * align if ceiling >= pages else -1
                if lo >= floor:
                    return lo
            if i < 0:
                return None
            ceiling = min(ceiling, self._lo[i])
            i -= 1

    def _drain_rcache(self) -> bool:
        drained = False
        for pages, mag in self._rcache.items():
            for lo in mag:
                self._remove(lo)
                drained = True
            mag.clear()
            del pages
        return drained

    def _remove(self, lo: int) -> int:
        hi = self._hi.pop(lo)
        i = bisect.bisect_left(self._lo, lo)
        del self._lo[i]
        if hi + 1 > self._cached_limit:  # iova.c __cached_rbnode_delete_update
            self._cached_limit = min(self.limit_pfn, hi + 1)
        return hi - lo + 1

    # -- release -----------------------------------------------------------------
    def free(self, iova: Iova, *, cached: bool = True) -> None:
        """Release a range from ``alloc`` (only once the IOTLB can hold nothing of it)."""
        lo = iova >> PAGE_SHIFT
        with self._lock:
            hi = self._hi.get(lo)
            if hi is None or lo in self._reserved or any(lo in m for m in self._rcache.values()):
                raise InvalidRequest(f"IOVA {iova:#x} is not an allocated range")
            pages = hi - lo + 1
            self.allocated_pages -= pages
            if cached and pages <= RCACHE_MAX_PAGES:
                mag = self._rcache.setdefault(pages, [])
                if len(mag) < RCACHE_DEPTH:
                    mag.append(lo)
                    return
            self._remove(lo)

    # -- introspection -----------------------------------------------------------
    def size_of(self, iova: Iova) -> int:
        """Bytes of the allocated range starting at ``iova`` (0 if none)."""
        lo = iova >> PAGE_SHIFT
        with self._lock:
            hi = self._hi.get(lo)
            return 0 if hi is None else (hi - lo + 1) << PAGE_SHIFT

    def ranges(self) -> list[tuple[int, int]]:
        """Every range held in the tree (reserved and cached included), as bytes first..last."""
        with self._lock:
            return [(lo << PAGE_SHIFT, ((self._hi[lo] + 1) << PAGE_SHIFT) - 1) for lo in self._lo]

    def is_free(self, first: int, last: int) -> bool:
        with self._lock:
            return not self._overlaps(first >> PAGE_SHIFT, last >> PAGE_SHIFT)

    def claim(self, iova: Iova, pages: int) -> None:
        """Take a caller-chosen range (a Map request naming its IOVA)."""
        lo = iova >> PAGE_SHIFT
        if lo < self.start_pfn or lo + pages > self.limit_pfn:
            raise InvalidRequest(f"IOVA {iova:#x}+{pages} pages is outside the aperture")
        with self._lock:
            if self._overlaps(lo, lo + pages - 1):
                raise InvalidRequest(f"IOVA {iova:#x}+{pages} pages overlaps an allocated or reserved range")
            self._insert(lo, lo + pages - 1)
            self.allocated_pages += pages
