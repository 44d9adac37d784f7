"""Domains of the guest driver: blocked, identity, paging (nested) and baseline.

A domain owns what Linux splits between ``iommu_domain`` and the dma-iommu
cookie: its translation (stage-1 table in guest RAM, or the hypervisor's S2
table for the baseline), its IOVA allocator, and the rule for *when* an
unmapped IOVA and the table pages that held it may be reused:

* **strict** (``iommu.strict=1``): every unmap gathers its range and flushes
  it before returning, as the revision's ``iotlb_sync`` does (RFC: a domain
  flush; v1: FlushDeviceDomainList of exact aligned blocks, a domain flush only
  on overflow, a failed list call only logged; v2: one covering block, a
  domain flush on any failure -- see ``flushlist``); only then are the freed
  table pages and the IOVA released.
* **lazy** (``IOMMU_DOMAIN_DMA_FQ``): unmaps queue ``(iova, freelist)`` and a
  batch is flushed with one domain-wide flush every ``fq_size`` entries or
  ``fq_timeout`` seconds; releases wait for that flush. This is what makes
  map/unmap-heavy work (dmatest) cheap: one hypercall per batch.
* ``skip_flush`` (API option): the range is unmapped but *not* flushed, so a
  device may still hit the stale IOTLB entry. Its IOVA and table pages are
  quarantined until an explicit ``flush()``; reusing them earlier would let
  the device write into a new owner's memory.

The order "flush, then free table pages, then release IOVA" is the one
Linux's ``iommu_iotlb_sync`` + ``iommu_put_pages_list`` enforce: an IOMMU may
still be walking a table page until the flush has completed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from guest_agent.driver.flushlist import v1_exact_blocks, v2_covering_block
from guest_agent.driver.flushqueue import FlushQueue, Pending
from guest_agent.driver.hypercalls import HvClient
from guest_agent.driver.iova import RCACHE_MAX_PAGES, IovaAllocator, roundup_pow_of_two
from guest_agent.driver.stats import Stats
from guest_agent.errors import HypercallFailed, InvalidRequest
from pviommu.abi import hv
from pviommu.abi.revision import DEFAULT_REVISION, FlushListStyle, Revision, profile
from pviommu.addr import MSI_WINDOW_LAST, MSI_WINDOW_START, PAGE_SHIFT, PAGE_SIZE, Gpa, Iova, align_down, align_up
from pviommu.log import get_logger
from pviommu.mem.bank import GuestRam
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import Perm, PtFeature
from pviommu.pt.fmt.x86_64 import X86_64Format
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable, stage1_table

log = get_logger("guest.domain")

class FlushMode(Enum):
    STRICT = "strict"
    LAZY = "lazy"


class DomainKind(StrEnum):
    BLOCKED = "blocked"
    IDENTITY = "identity"
    PAGING = "paging"
    BASELINE = "baseline"
    NONE = "none"  # no IOMMU (--allow-no-iommu): DMA addresses are GPAs


@dataclass
class UnmapResult:
    unmapped: int
    flushed: bool


def iova_pages(size: int) -> int:
    """Pages of IOVA for a mapping of ``size`` bytes; dma-iommu rounds sizes
    below the rcache limit to a power of two so freed blocks are reusable."""
    pages = max(1, align_up(size, PAGE_SIZE) >> PAGE_SHIFT)
    return roundup_pow_of_two(pages) if pages < RCACHE_MAX_PAGES else pages


def in_msi_window(first: int, last: int) -> bool:
    return first <= MSI_WINDOW_LAST and MSI_WINDOW_START <= last


class Domain:
    """Common state; subclasses implement the translation."""

    kind: DomainKind
    hv_type: int = hv.DeviceDomainType.S1
    static = False
    #: iommu_domain.geometry (aperture start, end) and pgsize_bitmap; None/0 where the revision
    #: sets none (v2's static identity and blocking domains)
    aperture: tuple[int, int] | None = None
    pgsize_bitmap: int = 0

    def __init__(self, domain_id: int, hvc: HvClient | None, stats: Stats) -> None:
        self.domain_id = domain_id
        self.hv = hvc
        self.stats = stats
        self.devices: set[int] = set()
        self.mapped_bytes = 0
        self.log = log.bind(domain=domain_id, kind=self.kind.value)

    # -- DMA-API surface (overridden by translating domains) ---------------------
    @property
    def iovad(self) -> IovaAllocator | None:
        return None

    @property
    def table_pages(self) -> int:
        return 0

    @property
    def root_gpa(self) -> int:
        return 0

    def dma_map(self, gpa: Gpa, size: int, perm: Perm, iova: Iova | None = None) -> Iova:
        """Map page-aligned ``[gpa, gpa+size)``; returns its IOVA."""
        raise InvalidRequest(f"domain {self.domain_id} ({self.kind.value}) has no mappings")

    def dma_unmap(self, iova: Iova, size: int, *, skip_flush: bool = False) -> UnmapResult:
        raise InvalidRequest(f"domain {self.domain_id} ({self.kind.value}) has no mappings")

    def flush(self) -> None:
        """Domain-wide IOTLB flush; releases everything waiting for one."""
        if self.hv is not None and self.kind is not DomainKind.NONE:
            self.hv.flush_domain(self.hv_type, self.domain_id)
            self.stats.add("flushes")

    def translate(self, iova: Iova) -> Gpa | None:
        return None

    def destroy(self) -> None:
        """Free guest memory after the hypervisor deleted the domain."""


class BlockedDomain(Domain):
    """translation_enabled=1, blocked=1: every DMA faults (the release domain)."""

    kind = DomainKind.BLOCKED
    static = True


class IdentityDomain(Domain):
    """translation_enabled=0: stage 1 bypassed, IOVA = GPA (one static domain,
    as Jacob Pan noted: identity is hardware pass-through)."""

    kind = DomainKind.IDENTITY
    static = True

    def dma_map(self, gpa: Gpa, size: int, perm: Perm, iova: Iova | None = None) -> Iova:
        if iova is not None and int(iova) != int(gpa):
            raise InvalidRequest("an identity domain maps IOVA = GPA only")
        return Iova(gpa)

    def dma_unmap(self, iova: Iova, size: int, *, skip_flush: bool = False) -> UnmapResult:
        return UnmapResult(size, False)

    def translate(self, iova: Iova) -> Gpa | None:
        return Gpa(iova)


class DirectDomain(IdentityDomain):
    """No IOMMU at all (--allow-no-iommu): dma-direct, bus address = GPA."""

    kind = DomainKind.NONE


class _TranslatingDomain(Domain):
    """A domain with an IOVA allocator and deferred reuse of unmapped ranges."""

    def __init__(self, domain_id: int, hvc: HvClient, stats: Stats, iova_limit: int, mode: FlushMode) -> None:
        super().__init__(domain_id, hvc, stats)
        self._iovad = IovaAllocator(iova_limit)
        self.mode = mode
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()  # _lengths and _demand
        self._fq = FlushQueue(str(domain_id), lambda: Domain.flush(self), self._release, stats, self.log)
        self._lengths: dict[int, int] = {}  # IOVA of each live mapping -> bytes mapped
        #: on-demand ranges (PagingDomain): IOVA base -> (GPA base, bytes, rights)
        self._demand: dict[int, tuple[Gpa, int, Perm]] = {}

    @property
    def iovad(self) -> IovaAllocator:
        return self._iovad

    # -- allocation of IOVA ------------------------------------------------------------
    def _take_iova(self, size: int, iova: Iova | None) -> Iova:
        pages = iova_pages(size)
        if iova is None:
            return self._iovad.alloc(pages)
        if iova % PAGE_SIZE:
            raise InvalidRequest(f"IOVA {iova:#x} is not page aligned")
        if in_msi_window(iova, iova + size - 1):
            raise InvalidRequest(f"IOVA {iova:#x}+{size:#x} overlaps the MSI window "
                                 f"{MSI_WINDOW_START:#x}-{MSI_WINDOW_LAST:#x}")
        self._iovad.claim(iova, max(1, align_up(size, PAGE_SIZE) >> PAGE_SHIFT))
        return iova

    def _release(self, batch: list[Pending]) -> None:
        """After a flush covered ``batch``: free table pages, then IOVAs."""
        for p in batch:
            self._free_tables(p.gather)
            if p.iova is not None:
                self._iovad.free(p.iova)

    def _free_tables(self, gather: IotlbGather[Gpa]) -> None:
        """Nothing to free by default (the baseline's tables are the hypervisor's)."""

    # -- flush (guest_agent/driver/flushqueue.py decides when a range is reusable) ------------
    def flush(self) -> None:
        """Domain-wide flush, then release every queued and quarantined range."""
        self._fq.flush_all()
        self.log.debug("domain.flushed")

    def pending(self) -> int:
        """Unmapped ranges not yet reusable (queued + quarantined)."""
        return self._fq.pending()

    def close(self) -> None:
        """Stop the flush queue's thread."""
        self._fq.close()

    # -- map / unmap --------------------------------------------------------------------
    def dma_map(self, gpa: Gpa, size: int, perm: Perm, iova: Iova | None = None) -> Iova:
        if gpa % PAGE_SIZE or size <= 0:
            raise InvalidRequest(f"map {gpa:#x}+{size:#x}: GPA must be page aligned and size > 0")
        length = align_up(size, PAGE_SIZE)
        base = self._take_iova(length, iova)
        try:
            self._map(base, gpa, length, perm)
        except BaseException:
            self._iovad.free(base, cached=False)
            raise
        with self._state_lock:
            self._lengths[int(base)] = length
        self.stats.add("maps")
        self.mapped_bytes += length
        return base

    def dma_unmap(self, iova: Iova, size: int, *, skip_flush: bool = False) -> UnmapResult:
        """Unmap a mapping made by ``dma_map`` (from its start). Its IOVA is
        released only when the whole mapping is gone and a flush covered it."""
        if iova % PAGE_SIZE or size <= 0:
            raise InvalidRequest(f"unmap {iova:#x}+{size:#x}: IOVA must be page aligned and size > 0")
        length = align_up(size, PAGE_SIZE)
        with self._state_lock:
            mapped = self._lengths.get(int(iova))
            if mapped is None:
                raise InvalidRequest(f"IOVA {iova:#x} is not the start of a mapping of domain {self.domain_id}")
            whole = length >= mapped
            if whole:
                del self._lengths[int(iova)]
                self._demand.pop(int(iova), None)
        p = Pending(iova if whole else None)
        try:
            unmapped, flushed = self._unmap(iova, length, p.gather, skip_flush)
        except HypercallFailed:
            self._fq.quarantine(p)  # unmapped but not known flushed: never reuse until a flush
            raise
        self.stats.add("unmaps")
        self.mapped_bytes -= unmapped
        if flushed:
            self._release([p])
        else:
            self._fq.defer(p, skip_flush)
        return UnmapResult(unmapped, flushed)

    def _map(self, iova: Iova, gpa: Gpa, length: int, perm: Perm) -> None:
        raise NotImplementedError

    def _unmap(self, iova: Iova, length: int, gather: IotlbGather[Gpa], skip_flush: bool) -> tuple[int, bool]:
        raise NotImplementedError


class PagingDomain(_TranslatingDomain):
    """A DMA domain whose stage-1 (IOVA -> GPA) table the guest builds in its RAM."""

    kind = DomainKind.PAGING

    def __init__(self, domain_id: int, hvc: HvClient, stats: Stats, *, ram: GuestRam,
                 frames: FrameAllocator[Gpa], levels: int, pgsize_bitmap: int, iova_width: int,
                 mode: FlushMode, aperture_width: int = 0, revision: Revision | str = DEFAULT_REVISION) -> None:
        fmt = X86_64Format(levels=levels)
        # x86-64 stage 1 is sign-extended: with bit (width-1) set an IOVA is non-canonical unless
        # sign-extended, so DMA uses the lower half of the aperture. The aperture follows the
        # clamped width, except in the RFC, which took the reported one (IOVAs it hands out
        # beyond the table's width then fail to map: its bug, kept).
        width = aperture_width or min(iova_width, fmt.vasz_lg2)
        limit = 1 << (width - (1 if fmt.features & PtFeature.SIGN_EXTEND else 0))
        super().__init__(domain_id, hvc, stats, limit, mode)
        self.frames = frames
        self.table: PageTable[Iova, Gpa, Gpa] = stage1_table(fmt, ram, frames, pgsize_bitmap)
        self.levels = levels
        self.aperture = (0, (1 << width) - 1)
        self.pgsize_bitmap = self.table.pgsize_bitmap
        self.revision = Revision.parse(revision)
        self.facts = profile(self.revision).driver

    @property
    def table_pages(self) -> int:
        return self.table.table_pages

    @property
    def root_gpa(self) -> int:
        return int(self.table.root)

    def settings(self) -> hv.DeviceDomainSettings:
        paging = hv.FIRST_STAGE_PAGING_5LEVEL if self.levels == 5 else hv.FIRST_STAGE_PAGING_4LEVEL
        return hv.DeviceDomainSettings(translation_enabled=True, blocked=False, first_stage_paging_mode=paging,
                                       page_table_root=Gpa(int(self.table.root)))

    def _map(self, iova: Iova, gpa: Gpa, length: int, perm: Perm) -> None:
        with self._lock:
            self.table.map(iova, gpa, length, perm)

    # -- on-demand mappings (page requests) ----------------------------------------------
    def dma_map_on_demand(self, gpa: Gpa, size: int, perm: Perm, iova: Iova | None = None) -> Iova:
        """Reserve an IOVA range for ``[gpa, gpa+size)`` and map nothing: each
        page is mapped when the device faults on it with BOF and its page
        request reaches ``resolve_page_request`` (I/O page faults, as SVA/IOPF
        drivers do). Unmapped like any mapping."""
        if gpa % PAGE_SIZE or size <= 0:
            raise InvalidRequest(f"map {gpa:#x}+{size:#x}: GPA must be page aligned and size > 0")
        length = align_up(size, PAGE_SIZE)
        base = self._take_iova(length, iova)
        with self._state_lock:
            self._lengths[int(base)] = length
            self._demand[int(base)] = (gpa, length, perm)
        self.stats.add("maps_on_demand")
        return base

    def resolve_page_request(self, iova: int) -> bool:
        """Map the page of ``iova`` if it lies in an on-demand range; True
        when the page is (now) mapped, False when the request is invalid.
        A non-present entry is never cached by the IOMMU, so no flush is due."""
        page = align_down(iova, PAGE_SIZE)
        with self._state_lock:
            hit = next(((b, g, n, p) for b, (g, n, p) in self._demand.items() if b <= page < b + n), None)
        if hit is None:
            return False
        base, gpa, _length, perm = hit
        with self._lock:
            if self.table.lookup(Iova(page)) is None:
                self.table.map(Iova(page), Gpa(gpa + page - base), PAGE_SIZE, perm)
                self.mapped_bytes += PAGE_SIZE
        self.stats.add("page_requests_resolved")
        return True

    def _unmap(self, iova: Iova, length: int, gather: IotlbGather[Gpa], skip_flush: bool) -> tuple[int, bool]:
        with self._lock:
            unmapped = self.table.unmap(iova, length, gather)
        if skip_flush or self.mode is FlushMode.LAZY:
            return unmapped, False
        self.flush_gather(gather)
        return unmapped, True

    def flush_gather(self, gather: IotlbGather[Gpa]) -> None:
        """This revision's ``iotlb_sync`` of the gathered range (series-revisions section 4).

        RFC: a domain flush (0xD0). v1: the exact aligned blocks in one list call (rep count =
        blocks), a domain flush only when they overflow the input page; a failed list call is only
        logged, as v1 does (the range then counts as flushed although it was not). v2: one covering
        block, rep count 1, flags IOMMU_FORMAT; any failure falls back to a domain flush (flags 0),
        WARNed. A failed domain flush raises, so the caller keeps the pages quarantined (where
        Linux, after its WARN, would free them)."""
        assert self.hv is not None
        if gather.empty:
            return
        style = self.facts.flush_list
        if style is FlushListStyle.EXACT_BLOCKS:
            blocks = v1_exact_blocks(gather.start, gather.last, self.facts.flush_list_capacity)
            if blocks is not None:  # sent even when empty (v1's PAGE_ALIGN corner case), as v1 does
                try:
                    self.hv.flush_domain_list(self.hv_type, self.domain_id, blocks, flags=self.facts.flush_list_flags)
                    self.stats.add("flush_list")
                except HypercallFailed as exc:
                    self.stats.add("flush_list_failed")
                    self.log.error("domain.flush_list_failed", error=str(exc), blocks=len(blocks))
                return
            self.stats.add("flush_list_overflow")
        elif style is FlushListStyle.COVERING_BLOCK:
            block = v2_covering_block(gather.start, gather.last)
            try:
                self.hv.flush_domain_list(self.hv_type, self.domain_id, [block], flags=self.facts.flush_list_flags)
                self.stats.add("flush_list")
                return
            except HypercallFailed as exc:
                self.stats.add("flush_list_failed")
                self.log.warning("domain.flush_list_failed", warn=True, error=str(exc), fallback="domain flush")
        self.hv.flush_domain(self.hv_type, self.domain_id)
        self.stats.add("flushes")

    def _free_tables(self, gather: IotlbGather[Gpa]) -> None:
        for table in gather.freelist:
            self.frames.free_table(table)
        gather.freelist = []

    def translate(self, iova: Iova) -> Gpa | None:
        with self._lock:
            t = self.table.lookup(iova)
        return None if t is None else t.oa

    def destroy(self) -> None:
        self.close()
        for p in self._fq.drain():
            self._free_tables(p.gather)
        with self._lock:
            self.table.destroy()


def describe(d: Domain) -> dict[str, Any]:
    """A plain summary (logs and the RPC layer)."""
    return {"domain_id": d.domain_id, "kind": d.kind.value, "devices": sorted(d.devices),
            "root_gpa": d.root_gpa, "mapped_bytes": d.mapped_bytes, "table_pages": d.table_pages}
