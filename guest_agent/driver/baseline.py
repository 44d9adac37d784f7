"""The map-by-hypercall baseline domain (the emulated design pviommu compares against).

A stage-2 (type 0) domain the hypervisor maps page by page with MapDeviceGpaPages, as a
root-partition or virtio-iommu style design would; only offered when the hypervisor runs with
``--s2-baseline`` (it then advertises HV_IOMMU_CAP_S2).
"""

from __future__ import annotations

from guest_agent.driver.domain import DomainKind, FlushMode, _TranslatingDomain
from guest_agent.driver.hypercalls import HvClient
from guest_agent.driver.stats import Stats
from pviommu.abi import hv
from pviommu.addr import PAGE_SHIFT, PAGE_SIZE, Gpa, Iova
from pviommu.pt.common import Perm
from pviommu.pt.gather import IotlbGather


class BaselineDomain(_TranslatingDomain):
    """The emulated design: an S2 domain the hypervisor maps page by page
    (MapDeviceGpaPages, one rep per 4 KiB page). The hypervisor owns the table
    and flushes on unmap itself, so ``skip_flush`` cannot leave it stale."""

    kind = DomainKind.BASELINE
    hv_type = hv.DeviceDomainType.S2

    def __init__(self, domain_id: int, hvc: HvClient, stats: Stats, *, iova_limit: int, mode: FlushMode) -> None:
        super().__init__(domain_id, hvc, stats, iova_limit, FlushMode.STRICT)
        self._pages: dict[int, tuple[int, int]] = {}  # iova page -> (gpa page, flags)

    def _map(self, iova: Iova, gpa: Gpa, length: int, perm: Perm) -> None:
        assert self.hv is not None
        flags = (hv.MapFlags.READABLE if perm & Perm.READ else 0) | (hv.MapFlags.WRITABLE if perm & Perm.WRITE else 0)
        n = length >> PAGE_SHIFT
        first = gpa >> PAGE_SHIFT
        self.hv.map_gpa_pages(self.domain_id, int(flags), iova, [first + i for i in range(n)])
        self.stats.add("baseline_map_reps", n)
        with self._lock:
            for i in range(n):
                self._pages[(iova >> PAGE_SHIFT) + i] = (first + i, int(flags))

    def _unmap(self, iova: Iova, length: int, gather: IotlbGather[Gpa], skip_flush: bool) -> tuple[int, bool]:
        assert self.hv is not None
        n = length >> PAGE_SHIFT
        self.hv.unmap_gpa_pages(self.domain_id, iova, n)
        self.stats.add("baseline_unmap_reps", n)
        with self._lock:
            unmapped = sum(1 for i in range(n) if self._pages.pop((iova >> PAGE_SHIFT) + i, None) is not None)
        return unmapped << PAGE_SHIFT, True

    def translate(self, iova: Iova) -> Gpa | None:
        with self._lock:
            hit = self._pages.get(iova >> PAGE_SHIFT)
        return None if hit is None else Gpa((hit[0] << PAGE_SHIFT) | (iova & (PAGE_SIZE - 1)))

    def destroy(self) -> None:
        self.close()
