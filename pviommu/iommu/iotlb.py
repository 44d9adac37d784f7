"""The IOTLB: cached IOVA-page -> host-page translations, tagged by DID.

Entries are keyed by (DID, page size, IOVA page number); a nested
translation is cached at the smaller of its two leaf sizes, the span over
which both stages are contiguous. Invalidation mirrors the VT-d IOTLB
descriptor granularities: global, domain-selective (DSI) and page-selective
(PSI: ``2**am`` 4 KiB pages from an address aligned to that size).

Thread safety and the flush contract: device engines look up from their own
threads while a hypervisor flush arrives on a gRPC thread. Every operation
takes one lock, so when an ``invalidate_*`` call returns no later lookup can
hit a dropped entry. A walk that *started* before the flush could still
insert a translation read from the old tables after it; to close that window
each insert carries the ``generation`` read before its walk, and any
invalidation bumps the generation, so such late inserts are discarded.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from pviommu.addr import PAGE_SHIFT, Hpa, Iova, align_down


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    """One cached translation: ``2**size_lg2`` bytes from ``iova`` map to
    ``hpa``. ``write`` is True only after a write walk succeeded (so the
    stage-1 Dirty bit is known set); a write through a read-only-cached entry
    misses and walks again, as hardware re-walks to set D."""

    iova: Iova
    hpa: Hpa
    size_lg2: int
    read: bool
    write: bool


@dataclass(frozen=True, slots=True)
class Extent:
    """``count`` entries of ``2**size_lg2`` bytes from ``iova``, contiguous in
    IOVA and host address from ``hpa``; ``read``/``write`` hold for all."""

    iova: int
    hpa: int
    size_lg2: int
    count: int
    read: bool
    write: bool

    @property
    def end(self) -> int:
        return self.iova + (self.count << self.size_lg2)


#: Extents kept per domain before they are all dropped (like the entries' wholesale eviction).
EXTENTS_PER_DOMAIN = 256


@dataclass(slots=True)
class _Domain:
    entries: dict[tuple[int, int], IotlbEntry] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # sizes present, largest first
    extent_starts: list[int] = field(default_factory=list)  # sorted
    extents: dict[int, Extent] = field(default_factory=dict)  # by start IOVA


@dataclass(slots=True)
class IotlbStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    late_inserts_dropped: int = 0
    evictions: int = 0
    inv_global: int = 0
    inv_domain: int = 0
    inv_pages: int = 0
    entries_dropped: int = 0


class Iotlb:
    """A bounded, thread-safe IOTLB (cleared wholesale when full, as QEMU does)."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self.stats = IotlbStats()
        self._domains: dict[int, _Domain] = {}
        self._count = 0
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Read before a walk; pass to ``insert``."""
        return self._generation

    def __len__(self) -> int:
        return self._count

    def bump_generation(self) -> None:
        """Refuse every insert of a walk that started before now (a context
        invalidation: what was walked under the old context must not land)."""
        with self._lock:
            self._generation += 1

    def lookup(self, did: int, iova: int, write: bool = False, *, count: bool = True) -> IotlbEntry | None:
        """The cached entry holding ``iova`` that allows the access, or None
        (a miss: the caller walks). ``count=False`` peeks (inspection)."""
        hits = self.lookup_run(did, iova, iova + 1, write, count=count)
        return hits[0] if hits else None

    def lookup_run(self, did: int, start: int, end: int, write: bool, *, count: bool = True) -> list[IotlbEntry]:
        """Consecutive cached entries covering ``[start, end)`` from ``start``,
        stopping at the first miss (counted once). One lock round-trip for a
        whole DMA buffer instead of one per page."""
        out: list[IotlbEntry] = []
        with self._lock:
            dom = self._domains.get(did)
            if dom is not None:
                entries, sizes = dom.entries, dom.sizes
                pos = start
                while pos < end:
                    for size_lg2 in sizes:
                        entry = entries.get((size_lg2, pos >> size_lg2))
                        if entry is not None and (entry.write if write else entry.read):
                            out.append(entry)
                            pos = entry.iova + (1 << size_lg2)
                            break
                    else:
                        break
            if count:  # a miss is a lookup that found nothing (one walk follows)
                self.stats.hits += len(out)
                if not out:
                    self.stats.misses += 1
            return out

    def lookup_span(self, did: int, start: int, end: int, write: bool) -> int | None:
        """The host address of ``start`` when one extent or one entry covers
        all of ``[start, end)`` with the access allowed, else None (nothing
        counted: the caller goes page by page). The common case of a warm DMA
        buffer, answered with one lock round-trip and no list."""
        with self._lock:
            dom = self._domains.get(did)
            if dom is None:
                return None
            starts = dom.extent_starts
            if starts:
                i = bisect.bisect_right(starts, start) - 1
                if i >= 0:
                    ext = dom.extents[starts[i]]
                    if end <= ext.iova + (ext.count << ext.size_lg2) and (ext.write if write else ext.read):
                        self.stats.hits += ((end - 1) >> ext.size_lg2) - (start >> ext.size_lg2) + 1
                        return ext.hpa + (start - ext.iova)
            entries = dom.entries
            for size_lg2 in dom.sizes:
                entry = entries.get((size_lg2, start >> size_lg2))
                if (entry is not None and end <= entry.iova + (1 << size_lg2)
                        and (entry.write if write else entry.read)):
                    self.stats.hits += 1
                    return entry.hpa + (start - entry.iova)
            return None

    def lookup_extent(self, did: int, pos: int, end: int, write: bool) -> tuple[int, int] | None:
        """``(hpa, bytes)`` for the prefix of ``[pos, end)`` that one extent
        covers with the access allowed, or None (fall back to the entries)."""
        with self._lock:
            dom = self._domains.get(did)
            if dom is None or not dom.extent_starts:
                return None
            i = bisect.bisect_right(dom.extent_starts, pos) - 1
            if i < 0:
                return None
            ext = dom.extents[dom.extent_starts[i]]
            if pos >= ext.end or not (ext.write if write else ext.read):
                return None
            n = min(end, ext.end) - pos
            self.stats.hits += ((pos + n - 1) >> ext.size_lg2) - (pos >> ext.size_lg2) + 1
            return ext.hpa + (pos - ext.iova), n

    def insert_extent(self, did: int, ext: Extent, generation: int) -> bool:
        """Remember ``ext`` (built from entries looked up or inserted since
        ``generation``) unless an invalidation happened meanwhile."""
        with self._lock:
            dom = self._domains.get(did)
            if generation != self._generation or dom is None:
                return False
            starts = dom.extent_starts
            if len(starts) >= EXTENTS_PER_DOMAIN:
                starts.clear()
                dom.extents.clear()
            i = bisect.bisect_right(starts, ext.iova) - 1
            if i >= 0 and dom.extents[starts[i]].end > ext.iova:  # overlaps the one before
                del dom.extents[starts.pop(i)]
            i = bisect.bisect_left(starts, ext.iova)
            while i < len(starts) and starts[i] < ext.end:  # and those it covers
                del dom.extents[starts.pop(i)]
            starts.insert(i, ext.iova)
            dom.extents[ext.iova] = ext
            return True

    def insert(self, did: int, entry: IotlbEntry, generation: int) -> bool:
        """Cache ``entry`` unless an invalidation happened since ``generation``."""
        with self._lock:
            if generation != self._generation:
                self.stats.late_inserts_dropped += 1
                return False
            if self._count >= self.capacity:
                self.stats.evictions += self._count
                self._domains.clear()
                self._count = 0
            dom = self._domains.setdefault(did, _Domain())
            key = (entry.size_lg2, entry.iova >> entry.size_lg2)
            if key not in dom.entries:
                self._count += 1
            dom.entries[key] = entry
            if entry.size_lg2 not in dom.sizes:
                dom.sizes = sorted([*dom.sizes, entry.size_lg2], reverse=True)
            self.stats.inserts += 1
            return True

    # -- invalidation ---------------------------------------------------------
    def invalidate_all(self) -> int:
        """Global invalidation; returns the number of entries dropped."""
        with self._lock:
            self._generation += 1
            dropped, self._count = self._count, 0
            self._domains.clear()
            self.stats.inv_global += 1
            self.stats.entries_dropped += dropped
            return dropped

    def invalidate_domain(self, did: int) -> int:
        """Domain-selective invalidation (every entry tagged ``did``)."""
        with self._lock:
            self._generation += 1
            dom = self._domains.pop(did, None)
            dropped = len(dom.entries) if dom else 0
            self._count -= dropped
            self.stats.inv_domain += 1
            self.stats.entries_dropped += dropped
            return dropped

    def invalidate_pages(self, did: int, addr: int, am: int) -> int:
        """Page-selective invalidation of ``2**am`` 4 KiB pages from ``addr``
        (aligned down to that size, as the descriptor's ADDR/AM mean); any
        cached page overlapping the block is dropped, large ones included."""
        if not 0 <= am <= 52:
            raise ValueError(f"address mask {am} out of range")
        span_lg2 = PAGE_SHIFT + am
        start = align_down(addr, 1 << span_lg2)
        last = start + (1 << span_lg2) - 1
        with self._lock:
            self._generation += 1
            self.stats.inv_pages += 1
            dom = self._domains.get(did)
            if dom is None:
                return 0
            dropped = 0
            entries = dom.entries
            for xs in [x for x in dom.extent_starts if x <= last and dom.extents[x].end > start]:
                dom.extent_starts.remove(xs)
                del dom.extents[xs]
            for size_lg2 in dom.sizes:
                first, final = start >> size_lg2, last >> size_lg2
                if final - first + 1 <= len(entries):
                    keys = [(size_lg2, vpn) for vpn in range(first, final + 1)]
                else:
                    keys = [k for k in entries if k[0] == size_lg2 and first <= k[1] <= final]
                for key in keys:
                    if entries.pop(key, None) is not None:
                        dropped += 1
            self._count -= dropped
            self.stats.entries_dropped += dropped
            return dropped
