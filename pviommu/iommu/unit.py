"""The IOMMU unit a device emulator embeds (one per device process).

``IommuUnit.translate(slot, iova, length, write)`` turns a DMA request into
``DmaRuns``: host runs for the longest translatable prefix, physically
contiguous pages coalesced into one run (``runs.RunBuilder``), and the fault
that stopped it. It starts by finding the slot's context (read from bank 0,
checked by ``checks``, cached per slot until ``invalidate_context``); then
per page it looks in the IOTLB (tagged by the context's DID) and fills a
miss with a walk (``nested.NestedWalker``, helped by the paging-structure
caches of ``pscache``, also tagged by DID; ``pscache=False`` turns them off).

The hypervisor drives the invalidation entry points (global, domain, pages,
context); each returns only when no later lookup can use what it dropped.
Every one of them also drops paging-structure entries (all of them, or all
of the DID for domain- and page-selective ones), before the IOTLB's.
Faults are counted by reason, logged (bounded) unless the context set FPD,
and handed to ``on_fault`` if given; the device sees them in ``DmaRuns``.

With the compiled core (``pviommu.iommu.native``; ``native=None`` uses it
when it is built and ``PVIOMMU_NATIVE=0`` is not set) the IOTLB and the walk
are compiled, and ``translate`` runs its loop after the context lookup in one
compiled call; contexts, owner epochs, generations, faults and counters stay
here, identical for both. The compiled walk has no paging-structure caches
(a cold compiled walk costs less than a cached Python one).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pviommu.addr import Hpa, Iova
from pviommu.errors import PviommuError
from pviommu.iommu import native as _native
from pviommu.iommu.checks import ContextFault, check_owner, check_pasid_entry, read_context, validate_context
from pviommu.iommu.context import MAX_SLOTS, ContextEntry
from pviommu.iommu.explain import FAULT_CODES, Explanation, explain_in_context, explain_request
from pviommu.iommu.fault import FaultReason, FaultRecord
from pviommu.iommu.iotlb import Extent, Iotlb, IotlbEntry
from pviommu.iommu.nested import NestedWalker, WalkFault
from pviommu.iommu.owner import OwnerTable
from pviommu.iommu.pasid import SmFault
from pviommu.iommu.pasid_unit import PasidPath
from pviommu.iommu.pscache import PsCache
from pviommu.iommu.runs import RunBuilder
from pviommu.mem.bank import HostMemory
from pviommu.mem.dma import DmaFault, DmaRuns, Run

_U64_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class BoundContext:
    """A slot's context entry with the owner record it was read under: the
    unit uses it only while the slot's ownership epoch is still ``epoch``."""

    entry: ContextEntry
    owner_bank: int
    epoch: int


@dataclass(slots=True)
class UnitStats:
    walks: int = 0
    walk_reads: int = 0
    context_reads: int = 0
    context_hits: int = 0
    #: translations that found the slot's ownership epoch moved (every cache dropped)
    epoch_changes: int = 0
    translations: int = 0
    faults: Counter[int] = field(default_factory=Counter)

    @property
    def reads_per_walk(self) -> float:
        return self.walk_reads / self.walks if self.walks else 0.0


@dataclass(frozen=True, slots=True)
class BoundTranslator:
    """One device's view of its unit: implements ``pviommu.mem.dma.DmaTranslator``."""

    unit: IommuUnit
    slot: int
    #: requests with this PASID (proposal, not in the series); None = without PASID
    pasid: int | None = None

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        return self.unit.translate(self.slot, iova, length, write, self.pasid)


class IommuUnit:
    """Context lookup, IOTLB, nested walk and fault records for the devices
    whose slots it serves (any slot; the hypervisor decides who is where)."""

    def __init__(
        self,
        host: HostMemory,
        *,
        iotlb_capacity: int = 8192,
        fs_mgaw_lg2: int = 48,
        fault_log_size: int = 1024,
        on_fault: Callable[[FaultRecord], None] | None = None,
        pscache: bool | None = None,
        native: bool | None = None,
    ) -> None:
        """``native``: True = the compiled core (``NativeUnavailable`` if it
        is not built or switched off), False = the Python reference, None =
        the compiled core when ``native.AVAILABLE`` unless ``pscache=True``
        asks for the paging-structure caches only the Python walk has.
        ``pscache``: None = on for the Python walk, absent for the compiled one."""
        if native and pscache:
            raise ValueError("the compiled core has no paging-structure caches: pscache=True needs native=False")
        use_native = _native.AVAILABLE and not pscache if native is None else native
        self.host = host
        self.iotlb: Iotlb | _native.NativeIotlb
        self.walker: NestedWalker | _native.NativeWalker
        #: the compiled walker when native (its translate is the fast path), else None
        self.native: _native.NativeWalker | None = None
        if use_native:
            self.iotlb = _native.NativeIotlb(iotlb_capacity)
            self.walker = self.native = _native.NativeWalker(host, fs_mgaw_lg2=fs_mgaw_lg2)
            self._memmove = self.native.memmove_for(self.iotlb)
        else:
            self.iotlb = Iotlb(iotlb_capacity)
            self.walker = NestedWalker(host, fs_mgaw_lg2=fs_mgaw_lg2)
        #: paging-structure caches; None = every IOTLB miss is a full walk
        self.pscache: PsCache | None = PsCache() if pscache or (pscache is None and not use_native) else None
        self.stats = UnitStats()
        self.faults: deque[FaultRecord] = deque(maxlen=fault_log_size)
        self.on_fault = on_fault
        self.owners = OwnerTable(host)
        self._contexts: dict[int, BoundContext] = {}
        self._ctx_generation = 0
        #: the ownership epoch each slot's cached state was last read under; kept across context
        #: invalidations, so a slot that changes owner while nothing of it is cached still drops
        #: whatever its old owner left in the IOTLB and paging-structure caches
        self._epochs: dict[int, int] = {}
        self._lock = threading.Lock()  # contexts, stats, fault log
        #: requests with a PASID >= 1 (proposal, not in the series), made on the first one
        self._pasid: PasidPath | None = None
        self._pasid_options = (fs_mgaw_lg2, iotlb_capacity, self.pscache is not None or not use_native)

    # -- device side ------------------------------------------------------------
    def bind(self, slot: int, pasid: int | None = None) -> BoundTranslator:
        return BoundTranslator(self, slot, pasid)

    @property
    def pasid_path(self) -> PasidPath:
        """The path of requests with PASID >= 1 (proposal; ``pasid_unit``)."""
        path = self._pasid
        if path is None:
            with self._lock:
                if self._pasid is None:
                    mgaw, capacity, ps = self._pasid_options
                    self._pasid = PasidPath(self, check_pasid_entry, fs_mgaw_lg2=mgaw, iotlb_capacity=capacity,
                                            pscache=ps)
                path = self._pasid
        return path

    def translate(self, slot: int, iova: Iova, length: int, write: bool, pasid: int | None = None) -> DmaRuns:
        """Host runs for ``[iova, iova + length)``; stops at the first fault.

        The IOTLB and paging-structure generations are taken before the
        context is looked up, so nothing walked under a context that an
        invalidation (of any scope, context included) dropped meanwhile is
        ever inserted; the slot's ownership epoch is checked on every call,
        so no cached context or translation outlives a change of owner.
        Steps: ``_start`` (context), the compiled loop if native, else one
        IOTLB lookup for the whole request, then ``_lookup`` page by page
        (``_fill`` walks each miss)."""
        if length <= 0:
            return DmaRuns()
        if pasid:  # a request with PASID >= 1: the proposal's path (PASID 0 is RID_PASID, below)
            with self._lock:
                self.stats.translations += 1
            return self.pasid_path.translate(slot, pasid, iova, length, write)
        iotlb, ps = self.iotlb, self.pscache
        generation = iotlb.generation  # before the context, as said above
        ps_generation = ps.generation if ps is not None else 0
        bound = self._start(slot, iova, length, write)
        if not isinstance(bound, BoundContext):
            return bound
        if self.native is not None:
            done = self._compiled(slot, bound, iova, length, write, generation)
            if done is not None:
                return done
        hpa = iotlb.lookup_span(bound.entry.did, int(iova), int(iova) + length, write)
        if hpa is not None:  # fast path: one extent or entry covers the whole request
            return DmaRuns([Run(Hpa(hpa), length)])
        return self._lookup(slot, bound, iova, length, write, generation, ps_generation)

    def _start(self, slot: int, iova: Iova, length: int, write: bool) -> BoundContext | DmaRuns:
        """Count the request and find its context; the faulted request if
        the range or the context refuses it."""
        with self._lock:
            self.stats.translations += 1
        try:
            if iova < 0 or iova + length > _U64_LIMIT:
                raise ContextFault(FaultReason.BEYOND_HW_MAX, f"IOVA {iova:#x}+{length:#x} beyond 64 bits")
            return self._context(slot)
        except ContextFault as exc:
            return DmaRuns([], self._fault(slot, 0, iova, write, exc.reason, exc.detail, fpd=False).to_dma_fault())

    def _compiled(self, slot: int, bound: BoundContext, iova: Iova, length: int, write: bool,
                  generation: int) -> DmaRuns | None:
        """The lookup and fill steps in one compiled call; None when the
        compiled core leaves this context to them."""
        assert self.native is not None
        ctx = bound.entry
        done = self.native.translate(self.iotlb, ctx, iova, length, write, bound.owner_bank,  # type: ignore[arg-type]
                                     generation)
        if done is None:
            return None
        if done.walks:
            with self._lock:
                self.stats.walks += done.walks
                self.stats.walk_reads += done.reads
        if done.fault is None:
            return DmaRuns(done.runs)
        fault = self._fault(slot, ctx.did, done.fault_iova, write, done.fault.reason, done.fault.detail, ctx.fpd)
        return DmaRuns(done.runs, fault.to_dma_fault())

    def _lookup(self, slot: int, bound: BoundContext, iova: Iova, length: int, write: bool, generation: int,
                ps_generation: int) -> DmaRuns:
        """Page by page: an IOTLB extent, else the consecutive cached entries,
        else one walk (``_fill``); the extents the entries form are cached."""
        did, iotlb = bound.entry.did, self.iotlb
        end = int(iova) + length
        runs = RunBuilder(int(iova), end)
        # The extent being built from consecutive same-size entries (see iotlb).
        x_iova = x_hpa = x_lg2 = x_count = 0
        x_read = x_write = True
        while runs.pos < end:
            hit = iotlb.lookup_extent(did, runs.pos, end, write)
            if hit is not None:
                runs.add(hit[0], runs.pos, hit[1])
                continue
            entries = iotlb.lookup_run(did, runs.pos, end, write)
            if not entries:
                filled = self._fill(slot, bound, Iova(runs.pos), write, generation, ps_generation)
                if not isinstance(filled, IotlbEntry):
                    return runs.result(filled)
                entries = [filled]
            for entry in entries:
                runs.add(entry.hpa, entry.iova, 1 << entry.size_lg2)
                size = x_count << x_lg2
                if x_count and entry.size_lg2 == x_lg2 and entry.iova == x_iova + size and entry.hpa == x_hpa + size:
                    x_count += 1
                    x_read, x_write = x_read and entry.read, x_write and entry.write
                else:
                    if x_count >= 2:
                        iotlb.insert_extent(did, Extent(x_iova, x_hpa, x_lg2, x_count, x_read, x_write), generation)
                    x_iova, x_hpa, x_lg2, x_count = entry.iova, int(entry.hpa), entry.size_lg2, 1
                    x_read, x_write = entry.read, entry.write
        if x_count >= 2:
            iotlb.insert_extent(did, Extent(x_iova, x_hpa, x_lg2, x_count, x_read, x_write), generation)
        return runs.result()

    def _fill(self, slot: int, bound: BoundContext, iova: Iova, write: bool, generation: int,
              ps_generation: int) -> IotlbEntry | DmaFault:
        """The IOTLB miss at ``iova``: walk (with the paging-structure caches),
        insert the translation under ``generation``; the fault if the walk faulted."""
        ctx = bound.entry
        result = self.walker.walk(ctx, iova, write, owner_bank=bound.owner_bank, cache=self.pscache,
                                  generation=ps_generation)
        self.count_walk(result.reads)
        if isinstance(result, WalkFault):
            return self._fault(slot, ctx.did, iova, write, result.reason, result.detail, ctx.fpd).to_dma_fault()
        entry = IotlbEntry(result.iova, result.hpa, result.size_lg2, result.read, result.write)
        self.iotlb.insert(ctx.did, entry, generation)
        return entry

    def memmove_warm(self, slot: int, desc: bytes, limits: _native.MoveLimits) -> _native.NativeMemmove | None:
        """One MEMMOVE descriptor of ``slot`` in one compiled call
        (``NativeWalker.memmove``) when the unit is native, the slot's context
        is cached under its current ownership epoch and every translation is
        in the IOTLB; the counters then read as after the device model's own
        translations. None otherwise, nothing touched or counted: the caller
        runs the model (which reads the context, checks the epoch, walks)."""
        if self.native is None:
            return None
        generation0 = self.iotlb.generation  # before the context, as translate
        bound = self._contexts.get(slot)
        try:
            if bound is None or bound.epoch != self.owners.epoch(slot):
                return None
        except PviommuError:
            return None
        ctx = bound.entry
        done = self._memmove(ctx, ctx.did, desc, limits, bound.owner_bank, generation0)
        if done is not None:
            n, stats = done.translations, self.stats
            with self._lock:  # the model's translations: each a context hit (it was cached)
                stats.translations += n
                stats.context_hits += n
                if done.walks:
                    stats.walks += done.walks
                    stats.walk_reads += done.reads
        return done

    # -- contexts -----------------------------------------------------------------
    def _context(self, slot: int) -> BoundContext:
        """The valid, present context of ``slot`` under its current owner
        (cached while the ownership epoch holds), else ``ContextFault``."""
        if not 0 <= slot < MAX_SLOTS:
            raise ContextFault(FaultReason.PASID_ENTRY_ACCESS, f"slot {slot} outside the context table")
        try:
            epoch = self.owners.epoch(slot)
        except PviommuError as exc:
            raise ContextFault(FaultReason.PASID_ENTRY_ACCESS, f"owner record of slot {slot}: {exc}") from exc
        cached = self._contexts.get(slot)
        if cached is not None:
            if cached.epoch == epoch:
                with self._lock:
                    self.stats.context_hits += 1
                return cached
            self.note_epoch(slot, epoch)
        generation = self._ctx_generation
        record, ctx = read_context(self.host, self.owners, slot)
        self.note_epoch(slot, record.epoch)
        with self._lock:
            self.stats.context_reads += 1
        validate_context(slot, ctx)
        check_owner(slot, record)
        bound = BoundContext(ctx, record.owner_bank, record.epoch)
        with self._lock:
            if generation == self._ctx_generation:  # no invalidation raced the read
                self._contexts[slot] = bound
        return bound

    def note_epoch(self, slot: int, epoch: int) -> None:
        """``slot``'s state is being read under ownership ``epoch``: if the slot had another
        epoch when last read (cached contexts may have been invalidated since), drop every cache."""
        with self._lock:
            last = self._epochs.get(slot)
            self._epochs[slot] = epoch
        if last is not None and last != epoch:
            self._epoch_moved(slot)

    def _epoch_moved(self, slot: int) -> None:
        """The slot changed owner since its context was cached: nothing walked
        or cached before may be used (its IOTLB tags may be reused)."""
        with self._lock:
            self.stats.epoch_changes += 1
        self.invalidate_context(slot)
        self.invalidate_all()

    # -- invalidation (hypervisor side) -------------------------------------------
    # The paging-structure caches go first: a walk that read the IOTLB's new
    # generation then cannot have used a structure entry the flush dropped.
    def invalidate_all(self) -> int:
        """Global invalidation (IOTLB and paging-structure caches); returns
        IOTLB entries dropped."""
        if self.pscache is not None:
            self.pscache.invalidate_all()
        if self._pasid is not None:
            self._pasid.invalidate_all()
        return self.iotlb.invalidate_all()

    def invalidate_domain(self, did: int) -> int:
        if self.pscache is not None:
            self.pscache.invalidate_domain(did)
        if self._pasid is not None:
            self._pasid.invalidate_domain(did)
        return self.iotlb.invalidate_domain(did)

    def invalidate_pages(self, did: int, addr: int, am: int) -> int:
        """Page-selective: ``2**am`` 4 KiB pages from ``addr`` of domain
        ``did``; every paging-structure entry of ``did`` goes too (the guest
        may have freed table pages, VT-d PSI with IH=0)."""
        if self.pscache is not None:
            self.pscache.invalidate_domain(did, pages=True)
        if self._pasid is not None:
            self._pasid.invalidate_pages(did, addr, am)
        return self.iotlb.invalidate_pages(did, addr, am)

    def invalidate_pasid(self, did: int, pasid: int, addr: int | None = None, am: int = 0) -> int:
        """PASID-based IOTLB invalidation (VT-d type 6; proposal): all of
        (DID, PASID), or ``2**am`` pages from ``addr``. PASID 0 is the DID's own tag."""
        if pasid == 0:
            return self.invalidate_domain(did) if addr is None else self.invalidate_pages(did, addr, am)
        return self._pasid.invalidate_pasid(did, pasid, addr, am) if self._pasid is not None else 0

    def invalidate_pasid_cache(self, did: int | None = None, pasid: int | None = None) -> int:
        """PASID-cache invalidation (VT-d type 7; proposal): cached PASID
        entries of ``did`` (all if None), of one PASID if given."""
        return self._pasid.invalidate_pasid_cache(did, pasid) if self._pasid is not None else 0

    def invalidate_context(self, slot: int | None = None) -> None:
        """Forget the cached context of ``slot`` (all slots if None). Call after
        rewriting a present context entry, together with an IOTLB flush of the
        old domain. Drops every paging-structure entry too (the slot's
        tables may have changed under the same DID)."""
        if self.pscache is not None:
            self.pscache.invalidate_all(context=True)
        self.iotlb.bump_generation()  # a walk under the old context inserts nothing
        if self._pasid is not None:
            self._pasid.invalidate_context(slot)
        with self._lock:
            self._ctx_generation += 1
            if slot is None:
                self._contexts.clear()
            else:
                self._contexts.pop(slot, None)

    # -- faults and inspection ----------------------------------------------------
    def _fault(
        self, slot: int, did: int, iova: Iova, write: bool, reason: FaultReason | SmFault, detail: str, fpd: bool,
        pasid: int | None = None,
    ) -> FaultRecord:
        record = FaultRecord(slot, did, iova, write, reason, detail) if pasid is None else \
            FaultRecord(slot, did, iova, write, reason, detail, pasid)
        with self._lock:
            self.stats.faults[int(reason)] += 1
            if not fpd:
                self.faults.append(record)
        if self.on_fault is not None and not fpd:
            self.on_fault(record)
        return record

    def record_fault(self, slot: int, did: int, iova: Iova, write: bool, reason: int, detail: str, fpd: bool,
                     pasid: int) -> FaultRecord:
        """A fault of the PASID path (reason: a ``FaultReason`` or ``SmFault`` code)."""
        code: FaultReason | SmFault = FaultReason(reason) if reason in FAULT_CODES else SmFault(reason)
        return self._fault(slot, did, iova, write, code, detail, fpd, pasid)

    def count_walk(self, reads: int) -> None:
        with self._lock:
            self.stats.walks += 1
            self.stats.walk_reads += reads

    def drain_faults(self) -> list[FaultRecord]:
        """Fault records logged since the last drain, oldest first."""
        with self._lock:
            out = list(self.faults)
            self.faults.clear()
        return out

    def explain(self, slot: int, iova: Iova, write: bool, pasid: int | None = None) -> Explanation:
        """Walk ``iova`` recording every entry read, without touching the
        IOTLB, counters or A/D bits. With ``pasid`` >= 1 (proposal) the
        scalable-mode reads that found the PASID entry come first."""
        return explain_request(self, slot, iova, write, pasid)

    def explain_context(self, ctx: ContextEntry, iova: Iova, write: bool, owner_bank: int,
                        slot: int = -1) -> Explanation:
        """``explain`` for a context entry given by the caller (the hypervisor
        asking what a device *would* see in a domain of the partition whose RAM
        is bank ``owner_bank``): the same checks, in the same order, and the
        same walk as ``translate``."""
        return explain_in_context(self, ctx, iova, write, owner_bank, slot)


__all__ = ["BoundContext", "BoundTranslator", "Explanation", "IommuUnit", "UnitStats"]
