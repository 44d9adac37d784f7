"""The hypervisor's records: partitions, device domains and devices."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from hypervisor_svc.core.faults import FaultLog
from hypervisor_svc.core.stage2 import PartitionFrames
from pviommu.addr import Gpa
from pviommu.mem.bank import Bank

if TYPE_CHECKING:
    from hypervisor_svc.core.stage2 import Baseline, Stage2


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
    table: Baseline | None = None
    mapped_pages: int = 0
    #: (logical device, PASID) pairs attached to this domain (SVA proposal; always empty without it)
    pasids: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Partition:
    partition_id: int
    name: str
    token: str
    bank: Bank
    memory_bytes: int
    stage2: Stage2  # over bank 0 (GPA -> HPA)
    holes: list[tuple[int, int]] = field(default_factory=list)
    read_only: list[tuple[int, int]] = field(default_factory=list)
    domains: dict[int, Domain] = field(default_factory=dict)
    devices: set[int] = field(default_factory=set)
    faults: FaultLog | None = None
    #: its bank-0 table frames (stage 2 and baseline domain tables), at most its quota
    frames: PartitionFrames | None = None
    #: Serialises everything that touches this partition's domains, devices and
    #: contexts: its hypercalls and the admin changes that concern it. Unit
    #: waits happen under it (a stalled unit stalls only its own partition).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def table_frames(self) -> PartitionFrames:
        if self.frames is None:
            raise AssertionError(f"partition {self.partition_id} was built without its table frames")
        return self.frames

    def gpa_backed(self, gpa: int, length: int = 1) -> bool:
        """True when every byte of ``[gpa, gpa+length)`` is RAM (not a hole)."""
        if gpa < 0 or gpa + length > self.memory_bytes:
            return False
        return not any(gpa < h + n and h < gpa + length for h, n in self.holes)


class Sync(Enum):
    """Whether the hypervisor knows what the device's IOMMU unit holds."""

    #: every invalidation and fence sent was confirmed
    SYNCED = "synced"
    #: alive, but something sent was not confirmed in time: it may hold stale
    #: translations or sessions, so it is handed to no new owner before a resync
    UNSYNCED = "unsynced"
    #: no process serves the unit: it holds nothing; it comes back by re-registering
    LOST = "lost"


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
    sync: Sync = Sync.SYNCED
    #: the ownership epoch last published in the slot's owner record
    epoch: int = 0
    #: page requests delivered to the owner and not answered yet: request id -> (partition, epoch)
    page_requests: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: PASID -> attached domain id (SVA proposal; always empty without it)
    pasids: dict[int, int] = field(default_factory=dict)
    #: one ownership change or resync at a time
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def reachable(self) -> bool:
        return self.sync is not Sync.LOST
