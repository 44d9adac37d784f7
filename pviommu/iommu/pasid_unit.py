"""The IOMMU unit's path for requests with a PASID other than 0.

pviommu proposal, not in the series (docs/proposal-sva.md). ``IommuUnit``
hands a request with PASID >= 1 to its ``PasidPath``: the PASID entry is
found through the scalable-mode tables (``pasid.lookup``), cached per
(slot, PASID) under the slot's ownership epoch, checked like a flat context
entry, and walked by the Python ``NestedWalker`` with this path's own IOTLB
and paging-structure caches. Both caches are tagged by ``pasid_tag(DID,
PASID)`` = DID | PASID << 16, which no request without PASID (tag = DID,
< 2**16) can produce, so translations of two PASIDs never mix, even under
one DID. Requests without PASID, and PASID 0, never come here (they keep the
series' flat path, compiled core included).

Invalidations, as VT-d 6.5.2 scopes them: an IOTLB descriptor (global,
domain or page selective, type 2) drops the PASID-tagged entries of the DID
too (a superset of what hardware must drop, always safe); a PASID-based
IOTLB descriptor (type 6) drops one (DID, PASID)'s entries, all or a page
range; a PASID-cache descriptor (type 7) drops cached PASID entries by DID,
by (DID, PASID) or all; a context-cache invalidation drops every cached
PASID entry of the slot.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pviommu.addr import Iova
from pviommu.errors import PviommuError
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.iotlb import Iotlb, IotlbEntry
from pviommu.iommu.nested import ExplainStep, NestedWalker, WalkFault, WalkOk
from pviommu.iommu.owner import OwnerRecord
from pviommu.iommu.pasid import MAX_PASID, PasidFault, PasidStep, lookup
from pviommu.iommu.pscache import PsCache
from pviommu.iommu.runs import RunBuilder
from pviommu.mem.dma import DmaRuns

if TYPE_CHECKING:
    from pviommu.iommu.unit import IommuUnit

#: raises an exception with ``reason`` and ``detail`` if the entry or owner refuses translation
Check = Callable[[int, ContextEntry, OwnerRecord], None]


def pasid_tag(did: int, pasid: int) -> int:
    """The IOTLB / paging-structure tag of (DID, PASID); PASID 0 gives the DID itself."""
    return did | pasid << 16


@dataclass(frozen=True, slots=True)
class BoundPasid:
    """A PASID entry with the owner record it was read under."""

    entry: ContextEntry
    #: ``entry`` with its DID replaced by the (DID, PASID) tag, for the walker's caches
    tagged: ContextEntry
    owner_bank: int
    epoch: int


@dataclass(frozen=True, slots=True)
class PasidExplain:
    """``PasidPath.explain``: the PASID-level reads, the PASID entry, what the
    IOTLB holds, the walk, and (reason, name, detail) if the PASID level refused."""

    steps: list[PasidStep]
    entry: ContextEntry | None
    cached: IotlbEntry | None
    walk: list[ExplainStep]
    result: WalkOk | WalkFault | None
    refused: tuple[int, str, str] | None


class PasidFaultError(Exception):
    def __init__(self, reason: int, detail: str, fpd: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.fpd = fpd


class PasidPath:
    def __init__(self, unit: IommuUnit, check: Check, *, fs_mgaw_lg2: int, iotlb_capacity: int,
                 pscache: bool) -> None:
        self.unit = unit
        self.check = check
        self.walker = NestedWalker(unit.host, fs_mgaw_lg2=fs_mgaw_lg2)
        self.iotlb = Iotlb(iotlb_capacity)
        self.pscache: PsCache | None = PsCache() if pscache else None
        self._bound: dict[tuple[int, int], BoundPasid] = {}
        self._tags: dict[int, set[int]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        #: PASID-entry lookups that read the tables / found them cached
        self.entry_reads = 0
        self.entry_hits = 0

    # -- lookups ------------------------------------------------------------------
    def bound(self, slot: int, pasid: int) -> BoundPasid:
        """The valid PASID entry of (slot, PASID) under the slot's current owner."""
        owners = self.unit.owners
        try:
            epoch = owners.epoch(slot)
        except PviommuError as exc:
            raise PasidFaultError(0x58, f"owner record of slot {slot}: {exc}") from exc
        key = (slot, pasid)
        cached = self._bound.get(key)
        if cached is not None and cached.epoch == epoch:
            with self._lock:
                self.entry_hits += 1
            return cached
        generation = self._generation
        try:
            record = owners.read(slot)
            found = lookup(self.unit.host, slot, pasid)
            moved = owners.epoch(slot) != record.epoch
        except PasidFault as exc:
            raise PasidFaultError(int(exc.reason), exc.detail) from exc
        except PviommuError as exc:
            raise PasidFaultError(0x58, f"slot {slot}: {exc}") from exc
        if moved:
            raise PasidFaultError(0x59, f"slot {slot}: ownership changing")
        self.unit.note_epoch(slot, record.epoch)  # a new owner: nothing the old one cached is used
        entry = found.entry
        try:
            self.check(slot, entry, record)
        except Exception as exc:
            reason = getattr(exc, "reason", None)
            if reason is None:
                raise
            raise PasidFaultError(int(reason), f"PASID {pasid:#x}: {getattr(exc, 'detail', exc)}",
                                  entry.fpd and entry.present) from exc
        tag = pasid_tag(entry.did, pasid)
        bound = BoundPasid(entry, dataclasses.replace(entry, did=tag), record.owner_bank, record.epoch)
        with self._lock:
            self.entry_reads += 1
            self._tags.setdefault(entry.did, set()).add(tag)
            if generation == self._generation:
                self._bound[key] = bound
        return bound

    def translate(self, slot: int, pasid: int, iova: Iova, length: int, write: bool) -> DmaRuns:
        unit = self.unit
        pos, end = int(iova), int(iova) + length
        iotlb, ps = self.iotlb, self.pscache
        generation0 = iotlb.generation
        ps_generation = ps.generation if ps is not None else 0
        try:
            if not 1 <= pasid <= MAX_PASID:
                raise PasidFaultError(0x46, f"PASID {pasid:#x} is not 1..{MAX_PASID:#x}")
            if pos < 0 or end > 1 << 64:
                raise PasidFaultError(0x83, f"IOVA {iova:#x}+{length:#x} beyond 64 bits")
            bound = self.bound(slot, pasid)
        except PasidFaultError as exc:
            record = unit.record_fault(slot, 0, iova, write, exc.reason, exc.detail, exc.fpd, pasid)
            return DmaRuns([], record.to_dma_fault())
        tagged = bound.tagged
        tag = tagged.did
        runs = RunBuilder(pos, end)
        while runs.pos < end:
            entries = iotlb.lookup_run(tag, runs.pos, end, write)
            if not entries:
                result = self.walker.walk(tagged, Iova(runs.pos), write, owner_bank=bound.owner_bank, cache=ps,
                                          generation=ps_generation)
                unit.count_walk(result.reads)
                if isinstance(result, WalkFault):
                    record = unit.record_fault(slot, bound.entry.did, Iova(runs.pos), write, result.reason,
                                               result.detail, bound.entry.fpd, pasid)
                    return runs.result(record.to_dma_fault())
                entry = IotlbEntry(result.iova, result.hpa, result.size_lg2, result.read, result.write)
                iotlb.insert(tag, entry, generation0)
                entries = [entry]
            for entry in entries:
                runs.add(entry.hpa, entry.iova, 1 << entry.size_lg2)
        return runs.result()

    def explain(self, slot: int, pasid: int, iova: Iova, write: bool) -> PasidExplain:
        """What a request of (slot, PASID) would meet: the PASID-level reads,
        the PASID entry and a dry-run walk, touching no cache or counter."""
        steps: list[PasidStep] = []
        try:
            record = self.unit.owners.read(slot)
            found = lookup(self.unit.host, slot, pasid, steps)
        except PasidFault as exc:
            return PasidExplain(steps, None, None, [], None, (int(exc.reason), exc.reason.name, exc.detail))
        except PviommuError as exc:
            return PasidExplain(steps, None, None, [], None, (0x58, "PASID_TABLE_ACCESS", str(exc)))
        try:
            self.check(slot, found.entry, record)
        except Exception as exc:
            reason = getattr(exc, "reason", None)
            if reason is None:
                raise
            return PasidExplain(steps, found.entry, None, [], None,
                                (int(reason), reason.name, str(getattr(exc, "detail", exc))))
        tagged = dataclasses.replace(found.entry, did=pasid_tag(found.entry.did, pasid))
        cached = self.iotlb.lookup(tagged.did, int(iova), write, count=False)
        trace: list[ExplainStep] = []
        result = self.walker.walk(tagged, iova, write, trace, owner_bank=record.owner_bank, dry_run=True)
        return PasidExplain(steps, found.entry, cached, trace, result, None)

    # -- invalidation -------------------------------------------------------------
    def _bump(self) -> None:
        with self._lock:
            self._generation += 1

    def invalidate_all(self) -> None:
        if self.pscache is not None:
            self.pscache.invalidate_all()
        self.iotlb.invalidate_all()

    def _tags_of(self, did: int) -> list[int]:
        with self._lock:
            return list(self._tags.get(did, ()))

    def invalidate_domain(self, did: int) -> int:
        dropped = 0
        for tag in self._tags_of(did):
            if self.pscache is not None:
                self.pscache.invalidate_domain(tag)
            dropped += self.iotlb.invalidate_domain(tag)
        return dropped

    def invalidate_pages(self, did: int, addr: int, am: int) -> int:
        dropped = 0
        for tag in self._tags_of(did):
            if self.pscache is not None:
                self.pscache.invalidate_domain(tag, pages=True)
            dropped += self.iotlb.invalidate_pages(tag, addr, am)
        return dropped

    def invalidate_pasid(self, did: int, pasid: int, addr: int | None = None, am: int = 0) -> int:
        """PASID-based IOTLB invalidation: every entry of (DID, PASID), or
        ``2**am`` pages from ``addr`` (paging-structure entries of the tag go too)."""
        tag = pasid_tag(did, pasid)
        if self.pscache is not None:
            self.pscache.invalidate_domain(tag, pages=addr is not None)
        if addr is None:
            return self.iotlb.invalidate_domain(tag)
        return self.iotlb.invalidate_pages(tag, addr, am)

    def invalidate_pasid_cache(self, did: int | None, pasid: int | None) -> int:
        """PASID-cache invalidation: cached entries of ``did`` (all if None),
        of one PASID if given. Walks that read an entry before it return nothing."""
        self.iotlb.bump_generation()
        with self._lock:
            self._generation += 1
            gone = [k for k, b in self._bound.items()
                    if (did is None or b.entry.did == did) and (pasid is None or k[1] == pasid)]
            for k in gone:
                del self._bound[k]
        return len(gone)

    def invalidate_context(self, slot: int | None) -> None:
        if self.pscache is not None:
            self.pscache.invalidate_all(context=True)
        self.iotlb.bump_generation()
        with self._lock:
            self._generation += 1
            if slot is None:
                self._bound.clear()
            else:
                for k in [k for k in self._bound if k[0] == slot]:
                    del self._bound[k]
