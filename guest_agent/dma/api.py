"""The DMA API drivers use (Linux dma-iommu): coherent buffers, map/unmap of
single buffers and scatter lists, with the direction deciding the rights.

``DMA_TO_DEVICE`` means the device only reads (stage-1 READ),
``DMA_FROM_DEVICE`` that it only writes (WRITE), ``BIDIRECTIONAL`` both, as
``dma_info_to_prot`` does. A buffer need not be page aligned: the page-aligned
span around it is mapped and the returned bus address keeps the offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from guest_agent.dma.pages import GuestMemory
from guest_agent.driver.domain import Domain, UnmapResult
from guest_agent.driver.pviommu import DeviceState, PvIommu
from guest_agent.errors import InvalidRequest
from pviommu.addr import PAGE_SIZE, Gpa, Iova, align_down, align_up
from pviommu.pt.common import Perm


class Direction(IntEnum):
    """``enum dma_data_direction`` (numbered as guest.proto's Direction)."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2


def perm_of(direction: Direction) -> Perm:
    if direction is Direction.TO_DEVICE:
        return Perm.READ
    if direction is Direction.FROM_DEVICE:
        return Perm.WRITE
    return Perm.READ | Perm.WRITE


@dataclass(frozen=True)
class DmaMapping:
    """One mapped buffer: ``dma_addr`` is what the device is given."""

    domain: Domain
    dma_addr: Iova
    size: int
    base: Iova  # page-aligned IOVA of the mapping
    span: int  # page-aligned bytes mapped


@dataclass(frozen=True)
class Coherent:
    gpa: Gpa
    mapping: DmaMapping


class DmaApi:
    """dma_map_single / dma_unmap_single / dma_map_sg / dma_alloc_coherent."""

    def __init__(self, iommu: PvIommu, memory: GuestMemory) -> None:
        self.iommu = iommu
        self.memory = memory

    @staticmethod
    def domain_of(dev: DeviceState) -> Domain:
        if dev.domain is None:
            raise InvalidRequest(f"device {dev.logical_device_id:#x} is in no domain (blocked)")
        return dev.domain

    def map_in(self, dom: Domain, gpa: int, size: int, direction: Direction, iova: Iova | None = None) -> DmaMapping:
        """Map ``[gpa, gpa+size)`` in ``dom`` (optionally at a chosen IOVA)."""
        if size <= 0:
            raise InvalidRequest(f"cannot map {size} bytes")
        self.memory.check(gpa, size)
        offset = gpa & (PAGE_SIZE - 1)
        span = align_up(offset + size, PAGE_SIZE)
        if iova is not None and iova & (PAGE_SIZE - 1) not in (0, offset):
            raise InvalidRequest(f"IOVA {iova:#x} must be page aligned or keep the GPA's page offset {offset:#x}")
        want = None if iova is None else Iova(align_down(iova, PAGE_SIZE))
        base = dom.dma_map(Gpa(gpa - offset), span, perm_of(direction), want)
        return DmaMapping(dom, Iova(base + offset), size, base, span)

    def map_on_demand(self, dom: Domain, gpa: int, size: int, direction: Direction,
                      iova: Iova | None = None) -> DmaMapping:
        """Reserve an IOVA range whose pages the device faults in (page requests)."""
        demand = getattr(dom, "dma_map_on_demand", None)
        if demand is None:
            raise InvalidRequest(f"domain {dom.domain_id} ({dom.kind.value}) cannot map on demand: paging domains only")
        if size <= 0 or gpa % PAGE_SIZE:
            raise InvalidRequest("an on-demand mapping needs a page-aligned GPA and a positive size")
        self.memory.check(gpa, size)
        span = align_up(size, PAGE_SIZE)
        base = demand(Gpa(gpa), span, perm_of(direction), iova)
        return DmaMapping(dom, base, size, base, span)

    def map_single(self, dev: DeviceState, gpa: int, size: int, direction: Direction) -> DmaMapping:
        return self.map_in(self.domain_of(dev), gpa, size, direction)

    def unmap(self, m: DmaMapping, *, skip_flush: bool = False) -> UnmapResult:
        return m.domain.dma_unmap(m.base, m.span, skip_flush=skip_flush)

    def map_sg(self, dev: DeviceState, segments: list[tuple[int, int]], direction: Direction) -> list[DmaMapping]:
        """Each segment mapped (dma-iommu would use one IOVA range; each gets
        its own here, which keeps unmap per segment simple)."""
        done: list[DmaMapping] = []
        try:
            for gpa, size in segments:
                done.append(self.map_single(dev, gpa, size, direction))
        except BaseException:
            for m in done:
                self.unmap(m)
            raise
        return done

    def unmap_sg(self, mappings: list[DmaMapping]) -> None:
        for m in mappings:
            self.unmap(m)

    def alloc_coherent(self, dev: DeviceState, size: int) -> Coherent:
        """Zeroed guest memory mapped read/write for the device."""
        gpa = self.memory.alloc(size)
        try:
            return Coherent(gpa, self.map_single(dev, gpa, size, Direction.BIDIRECTIONAL))
        except BaseException:
            self.memory.free(gpa)
            raise

    def free_coherent(self, c: Coherent) -> None:
        self.unmap(c.mapping)
        self.memory.free(c.gpa)
