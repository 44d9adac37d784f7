"""What this virtual IOMMU offers, set by the host administrator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HypervisorConfig:
    #: Stage-1 5-level paging offered (IOMMU_CAP_S1_5LVL, 57-bit IOVA).
    five_level: bool = False
    #: Widths reported by GetIommuCapabilities.
    max_iova_width: int = 48
    max_pasid_width: int = 0
    pasid: bool = False
    ats: bool = False
    pri: bool = False
    #: Device domains one partition may hold at once (beyond: INSUFFICIENT_DEVICE_DOMAINS).
    max_domains_per_partition: int = 64
    #: Size of bank 0 (stage-2 tables and context entries); sparse, so cheap.
    bank0_bytes: int = 1 << 30
    #: How long a flush waits for every IOMMU unit to acknowledge.
    flush_timeout_s: float = 5.0
    #: Faults kept per partition (oldest dropped first).
    fault_log_size: int = 4096
    #: IOTLB tags (VT-d DIDs) the host hands out, 1..domain_tags (reused first-in first-out).
    domain_tags: int = 0xFFFF
    #: Unanswered page requests remembered per device (beyond: not delivered, the engine gives up).
    max_page_requests_per_device: int = 1024

    @property
    def iova_width(self) -> int:
        return 57 if self.five_level else min(self.max_iova_width, 48)
