"""Paging-structure caches of the nested walk (VT-d 6.2.4 / 3.8), tagged by DID.

A cold 4-over-4 walk reads 24 entries, 20 of them to reach the stage-1 leaf:
four stage-2 sub-walks (4 reads each) of stage-1 table pointers, plus the
upper stage-1 entries. Hardware keeps two kinds of structure caches so that a
walk next to a recent one skips most of that; this module holds both:

* **table pages** (the nested-translation cache of stage-1 table pages): the
  stage-2 translation of a stage-1 table page, GPA page -> (HPA page, the
  stage-2 R/W rights ANDed over its levels). A hit replaces a whole stage-2
  sub-walk; the walker still applies its checks to the cached rights (read
  needs R, an A/D update needs W) and still fences the HPA into the
  partition's bank on every entry read.
* **first-stage entries** (PML5E/PML4E/PDPTE/PDE caches): a present,
  non-leaf stage-1 entry at level L >= 1, keyed by L and the IOVA bits from
  L's index up (``fs_key``) -> (GPA of the level L-1 table, whether every
  entry from the top down to L allows writes). A walk starts below the
  lowest level that hits. An entry is inserted only after the walk checked
  it (P, U/S, reserved bits) *and* its Accessed bit is known set, along with
  all the levels above it, so skipping those levels never skips an A update;
  a write needing R/W=1 skips entries whose path forbids writes, so the
  uncached walk's fault is reproduced exactly. Leaves are never cached here
  (the IOTLB holds translations; a write that needs D walks to the leaf).

As in the IOTLB, only a walk that succeeded inserts anything. Faults always
come from the tables in memory: a walk that used cached entries and faulted
is repeated without lookups (``NestedWalker.walk``; counted as ``rewalks``),
so a stale entry can cost reads but never fault a request. Stale entries do
arise from a legitimate guest: its page-table code unlinks a table as soon
as it is empty (Linux frees only tables a whole unmap range covers) and, in
lazy mode, may link a new table at the same place for a fresh IOVA before
the deferred flush; the cached pointer then leads to the old, emptied table.

Each DID's entries also carry the tag of the context that made them (the
stage-2 root and width for table pages, the stage-1 root and width for
stage-1 entries; the IOTLB uses the DID alone): a lookup with another tag
misses, and an insert with another tag first drops the DID's entries of that
kind, so a context rewritten without a flush cannot reach another root's
tables through a cached pointer.

Invalidation: every invalidation the unit receives drops paging-structure
entries -- global: everything; domain-selective *and* page-selective: every
entry of the DID (a PSI follows an unmap that may have freed table pages,
which the guest then reuses; VT-d PSI with IH=0 drops these caches too);
context invalidation: everything. Each bumps ``generation``; a walk passes
the generation it read before starting to ``insert``, which drops the
entries of a walk an invalidation raced (the IOTLB's mechanism). The unit
invalidates this cache *before* the IOTLB, so a walk that read the IOTLB's
new generation cannot have used a paging-structure entry from before.

Bounded like the IOTLB: when a kind is full, all its entries are dropped
(counted as evictions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

#: (stage-2 root HPA, stage-2 levels) or (stage-1 root GPA, stage-1 levels)
Tag = tuple[int, int]
#: table-page GPA -> (table-page HPA, stage-2 rights as Perm bits ANDed over the levels)
TableItem = tuple[int, tuple[int, int]]
#: ``fs_key(iova, level)`` -> (GPA of the next-level table, writes allowed from the top down to this level)
FsItem = tuple[int, tuple[int, bool]]


def fs_key(iova: int, level: int) -> int:
    """The key of the stage-1 entry at ``level`` on ``iova``'s path: the IOVA
    bits from that level's index up, and the level."""
    return iova >> (12 + 9 * level) << 3 | level


@dataclass(slots=True)
class PsCacheStats:
    table_hits: int = 0
    table_misses: int = 0
    #: hits by the stage-1 level of the cached entry (index 1 = PDE, 2 = PDPTE, 3 = PML4E, 4 = PML5E)
    fs_hits: list[int] = field(default_factory=lambda: [0] * 5)
    fs_misses: int = 0
    inserts: int = 0
    late_inserts_dropped: int = 0
    evictions: int = 0
    #: walks that faulted on a path from the caches and were done again from memory
    rewalks: int = 0
    inv_global: int = 0
    inv_domain: int = 0
    inv_pages: int = 0
    inv_context: int = 0
    entries_dropped: int = 0


@dataclass(slots=True)
class _Domain:
    table_tag: Tag = (-1, 0)
    tables: dict[int, tuple[int, int]] = field(default_factory=dict)
    fs_tag: Tag = (-1, 0)
    fs: dict[int, tuple[int, bool]] = field(default_factory=dict)


class PsCache:
    """Both paging-structure caches of one IOMMU unit, thread-safe (one lock)."""

    def __init__(self, table_capacity: int = 1024, fs_capacity: int = 4096) -> None:
        self.table_capacity = table_capacity
        self.fs_capacity = fs_capacity
        self.stats = PsCacheStats()
        self._domains: dict[int, _Domain] = {}
        self._tables = 0
        self._fs = 0
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Read before a walk; pass to ``insert``."""
        return self._generation

    def __len__(self) -> int:
        return self._tables + self._fs

    # -- lookups (the walker) ---------------------------------------------------
    def lookup_table(self, did: int, tag: Tag, gpa: int) -> tuple[int, int] | None:
        """``(HPA, stage-2 rights)`` of the stage-1 table page at ``gpa``, or None."""
        with self._lock:
            dom = self._domains.get(did)
            hit = dom.tables.get(gpa) if dom is not None and dom.table_tag == tag else None
            if hit is None:
                self.stats.table_misses += 1
            else:
                self.stats.table_hits += 1
            return hit

    def lookup_fs(self, did: int, tag: Tag, iova: int, write: bool) -> tuple[int, int, bool] | None:
        """``(level to continue at, GPA of its table, writes allowed above)``
        from the lowest cached non-leaf stage-1 entry on ``iova``'s path (for a
        write, one whose path allows writes), or None: walk from the top.
        ``tag[1]`` is the number of stage-1 levels."""
        with self._lock:
            dom = self._domains.get(did)
            if dom is not None and dom.fs and dom.fs_tag == tag:
                fs = dom.fs
                for level in range(1, tag[1]):
                    hit = fs.get(iova >> (12 + 9 * level) << 3 | level)  # fs_key, inlined
                    if hit is not None and (hit[1] or not write):
                        self.stats.fs_hits[level] += 1
                        return level - 1, hit[0], hit[1]
            self.stats.fs_misses += 1
            return None

    def count_rewalk(self) -> None:
        with self._lock:
            self.stats.rewalks += 1

    def insert(self, did: int, table_tag: Tag, tables: list[TableItem], fs_tag: Tag, fs: list[FsItem],
               generation: int) -> bool:
        """Cache what one walk found, unless an invalidation happened since
        ``generation`` (read before the walk started)."""
        with self._lock:
            if generation != self._generation:
                self.stats.late_inserts_dropped += len(tables) + len(fs)
                return False
            if self._tables + len(tables) > self.table_capacity:
                self.stats.evictions += self._tables
                for d in self._domains.values():
                    d.tables.clear()
                self._tables = 0
                tables = tables[: self.table_capacity]  # any subset is valid
            if self._fs + len(fs) > self.fs_capacity:
                self.stats.evictions += self._fs
                for d in self._domains.values():
                    d.fs.clear()
                self._fs = 0
                fs = fs[: self.fs_capacity]
            dom = self._domains.get(did)
            if dom is None:
                dom = self._domains[did] = _Domain()
            if tables:
                if dom.table_tag != table_tag:  # another context under this DID: its entries go
                    self._tables -= len(dom.tables)
                    self.stats.entries_dropped += len(dom.tables)
                    dom.tables.clear()
                    dom.table_tag = table_tag
                n = len(dom.tables)
                dom.tables.update(tables)
                self._tables += len(dom.tables) - n
            if fs:
                if dom.fs_tag != fs_tag:
                    self._fs -= len(dom.fs)
                    self.stats.entries_dropped += len(dom.fs)
                    dom.fs.clear()
                    dom.fs_tag = fs_tag
                n = len(dom.fs)
                dom.fs.update(fs)
                self._fs += len(dom.fs) - n
            self.stats.inserts += len(tables) + len(fs)
            return True

    # -- invalidation -------------------------------------------------------------
    def invalidate_all(self, *, context: bool = False) -> int:
        """Global (or context-cache) invalidation: drop everything."""
        with self._lock:
            self._generation += 1
            dropped = self._tables + self._fs
            self._domains.clear()
            self._tables = self._fs = 0
            if context:
                self.stats.inv_context += 1
            else:
                self.stats.inv_global += 1
            self.stats.entries_dropped += dropped
            return dropped

    def invalidate_domain(self, did: int, *, pages: bool = False) -> int:
        """Domain- or page-selective invalidation of ``did``: drop every entry
        of the DID (a PSI may follow the freeing of table pages)."""
        with self._lock:
            self._generation += 1
            if pages:
                self.stats.inv_pages += 1
            else:
                self.stats.inv_domain += 1
            dom = self._domains.pop(did, None)
            if dom is None:
                return 0
            self._tables -= len(dom.tables)
            self._fs -= len(dom.fs)
            dropped = len(dom.tables) + len(dom.fs)
            self.stats.entries_dropped += dropped
            return dropped
