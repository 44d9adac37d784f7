"""The hypervisor's records: partitions, device domains and devices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypervisor_svc.core.faults import FaultLog
from pviommu.addr import Gpa
from pviommu.mem.bank import Bank


@dataclass
class Domain:
    """A device domain in its partition's id space. ``tag`` is the host-wide
    IOTLB tag (VT-d DID), so the same guest id in two partitions is two domains."""

    partition_id: int
    domain_id: int
    domain_type: int  # HV_DEVICE_DOMAIN_TYPE_S1 (nested) or _S2 (baseline)
    tag: int
    flags: int = 0
    configured: bool = False
    translation_enabled: bool = False
    blocked: bool = False
    five_level: bool = False
    root: Gpa = field(default_factory=lambda: Gpa(0))
    devices: set[int] = field(default_factory=set)
    #: Baseline S2 domains: their own IOVA->HPA table (built by Map hypercalls).
    table: Any = None
    mapped_pages: int = 0


@dataclass
class Partition:
    partition_id: int
    name: str
    token: str
    bank: Bank
    memory_bytes: int
    stage2: Any  # PageTable over bank 0 (GPA -> HPA)
    holes: list[tuple[int, int]] = field(default_factory=list)
    read_only: list[tuple[int, int]] = field(default_factory=list)
    domains: dict[int, Domain] = field(default_factory=dict)
    devices: set[int] = field(default_factory=set)
    faults: FaultLog | None = None

    def gpa_backed(self, gpa: int, length: int = 1) -> bool:
        """True when every byte of ``[gpa, gpa+length)`` is RAM (not a hole)."""
        if gpa < 0 or gpa + length > self.memory_bytes:
            return False
        return not any(gpa < h + n and h < gpa + length for h, n in self.holes)


@dataclass
class Device:
    logical_device_id: int
    name: str
    control_address: str
    slot: int
    token: str
    pci_vendor_id: int = 0x8086
    pci_device_id: int = 0x0B25  # Intel DSA
    partition_id: int = 0
    domain_id: int = 0  # attached domain in the partition's id space, 0 = none (blocked)
    #: IOTLB tags the unit may hold entries for (flushes go only where needed).
    tags: set[int] = field(default_factory=set)
    reachable: bool = True
