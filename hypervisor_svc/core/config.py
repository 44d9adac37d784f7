"""What this virtual IOMMU offers, set by the host administrator."""

from __future__ import annotations

from dataclasses import dataclass

from pviommu.abi.revision import (
    DEFAULT_REVISION,
    BlockedWithoutTranslation,
    HypervisorFacts,
    Revision,
    SameDomainAttach,
    profile,
)
from pviommu.addr import SZ_1G, SZ_2M, SZ_4K


@dataclass(frozen=True)
class HypervisorConfig:
    #: The revision of the pv-IOMMU series whose semantics the hypercalls enforce
    #: (pviommu.abi.revision; docs/revisions.md).
    revision: Revision = DEFAULT_REVISION
    #: Stage-1 5-level paging offered (IOMMU_CAP_S1_5LVL, 57-bit IOVA).
    five_level: bool = False
    #: Widths reported by GetIommuCapabilities.
    max_iova_width: int = 48
    max_pasid_width: int = 0
    pasid: bool = False
    ats: bool = False
    pri: bool = False
    #: ``pgsize_bitmap`` reported by GetIommuCapabilities (the drivers' init checks read it).
    pgsize_bitmap: int = SZ_4K | SZ_2M | SZ_1G
    #: The map-by-hypercall baseline design, a twin extension: guests may create stage-2
    #: (type 0) domains and call the root-side Map/UnmapDeviceGpaPages, and the capabilities
    #: advertise HV_IOMMU_CAP_S2. Off, such domains are INVALID_PARAMETER and the map calls
    #: ACCESS_DENIED, as the real interface answers a guest (docs/revisions.md).
    s2_baseline: bool = False
    #: ATTACH of a device to the domain it is already in (the series is silent).
    same_domain_attach: SameDomainAttach = SameDomainAttach.ALREADY_IN_DOMAIN
    #: ConfigureDeviceDomain with blocked=1, translation_enabled=0 (refused in every revision by default).
    blocked_without_translation: BlockedWithoutTranslation = BlockedWithoutTranslation.REFUSE
    #: Device domains one partition may hold at once (beyond: INSUFFICIENT_DEVICE_DOMAINS).
    max_domains_per_partition: int = 64
    #: Bank-0 table frames one partition may hold (its stage 2 and baseline domain tables); a
    #: hypercall that needs one more is refused with INSUFFICIENT_MEMORY and changes nothing.
    table_quota_frames: int = 4096
    #: Size of bank 0 (stage-2 tables and context entries); sparse, so cheap.
    bank0_bytes: int = 1 << 30
    #: How long a flush waits for every IOMMU unit to acknowledge.
    flush_timeout_s: float = 5.0
    #: Faults kept per partition (oldest dropped first).
    fault_log_size: int = 4096
    #: IOTLB tags (VT-d DIDs) the host hands out, 1..domain_tags (reused first-in first-out).
    domain_tags: int = 0xFFFF
    #: pviommu proposal, not in the series (docs/proposal-sva.md): PASID-granular attach, SVA and
    #: page-group responses; the capability answer then carries PASID and PRI and a PASID width.
    proposal_sva: bool = False
    #: Unanswered page requests remembered per device (beyond: not delivered, the engine gives up).
    max_page_requests_per_device: int = 1024

    @property
    def iova_width(self) -> int:
        return 57 if self.five_level else min(self.max_iova_width, 48)

    @property
    def facts(self) -> HypervisorFacts:
        """What this revision's hypervisor does (pviommu.abi.revision)."""
        return profile(self.revision).hypervisor
