"""``map_unmap`` rows: 4 KiB pages mapped and unmapped per second by the nested
design (the guest writes its stage-1 table, one flush per batch) against the
map-by-hypercall baseline."""

from __future__ import annotations

from typing import Any

from pvctl.benchmarks.report import Report, Row, rate, size_label
from pviommu.units import KiB


def bench_map_unmap(report: Report, agent: Any, quick: bool) -> None:
    from guest_agent.driver.domain import DomainKind
    from pviommu.addr import SZ_2M, SZ_4K, Gpa
    from pviommu.pt.common import Perm

    min_time = 0.2 if quick else 1.5
    batch = 16 if quick else 64
    dev = next(iter(agent.iommu.devices.values()))
    rw = Perm.READ | Perm.WRITE
    gpa = agent.memory.alloc(SZ_2M)

    def pages_per_s(kind: DomainKind, size: int, strict: bool) -> float:
        dom = agent.iommu.new_domain(kind)
        agent.iommu.attach(dev, dom)
        try:
            def one() -> int:
                iovas = [dom.dma_map(Gpa(gpa), size, rw) for _ in range(batch)]
                for iova in iovas:
                    dom.dma_unmap(iova, size, skip_flush=not strict and kind is DomainKind.PAGING)
                if not strict and kind is DomainKind.PAGING:
                    dom.flush()
                return batch * (size // SZ_4K)

            one()
            return rate(one, min_time, 2)
        finally:
            agent.iommu.attach(dev, dev.default_domain)
            agent.iommu.delete_domain(dom)

    try:
        for size in (SZ_4K, 64 * KiB, SZ_2M):
            base = pages_per_s(DomainKind.BASELINE, size, True)
            nested = pages_per_s(DomainKind.PAGING, size, False)
            row = report.add("map_unmap", Row(f"nested {size_label(size)} buffers, 1 flush per {batch} unmaps",
                                              nested, "pages/s", "map-by-hypercall", base))
            if size == SZ_4K:
                row.target, row.met = ">= 20x baseline", row.ratio >= 20
                strict = pages_per_s(DomainKind.PAGING, size, True)
                report.add("map_unmap", Row("nested 4 KiB buffers, strict (1 flush per unmap)", strict, "pages/s",
                                            "map-by-hypercall", base))
    finally:
        agent.memory.free(gpa)
    report.notes["map_unmap"] = (f"pages = 4 KiB pages mapped and unmapped; each mapping is one dma_map + one "
                                 f"dma_unmap of one buffer; batches of {batch} mappings; baseline = one "
                                 "MapDeviceGpaPages + one UnmapDeviceGpaPages hypercall per mapping (the "
                                 "hypervisor flushes on unmap); a DSA device is attached so flushes reach it")
