"""What the client's calls return: small frozen records, printed in hex.

Each is built from one protobuf answer by ``from_proto`` and keeps the
names a driver engineer reads in the spec (``iommu_cap``, ``pgsize_bitmap``,
``logical_device_id``); ids, addresses and bitmaps print in hex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pviommu.abi.hv import IommuCap
from pviommu.abi.hv_status import HvStatus
from pviommu.client.fmt import hex_repr


class Direction(IntEnum):
    """``enum dma_data_direction`` (numbered as guest.proto's Direction): the
    device only reads a TO_DEVICE mapping and only writes a FROM_DEVICE one."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2

    @classmethod
    def parse(cls, value: Direction | int | str) -> Direction:
        """An enum member from itself, its number or its name (any case, ``to-device`` too)."""
        if isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            try:
                return cls[key]
            except KeyError:
                raise ValueError(f"direction {value!r} is not one of {', '.join(m.name for m in cls)}") from None
        return cls(value)


class _Hex:
    """Mixin: dataclass repr with ids, addresses and bitmaps in hex."""

    _decimal: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return hex_repr(self, self._decimal)


@dataclass(frozen=True, repr=False)
class HvResult(_Hex):
    """A hypercall's answer: the HV status and, for rep calls, reps completed."""

    status: int
    status_name: str
    message: str = ""
    reps_completed: int = 0
    _decimal = ("status", "reps_completed")

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS

    @classmethod
    def from_proto(cls, result: Any, reps_completed: int = 0) -> HvResult:
        return cls(int(result.status), result.status_name or HvStatus.name_of(result.status), result.message,
                   reps_completed)


@dataclass(frozen=True, repr=False)
class IommuInfo(_Hex):
    """What the guest's pv-IOMMU driver found (GuestAgent/GetIommuInfo)."""

    present: bool
    iommu_cap: int
    max_iova_width: int
    iova_width: int
    pgsize_bitmap: int
    five_level: bool
    ram_bytes: int
    partition_id: int
    _decimal = ("max_iova_width", "iova_width", "ram_bytes")

    @property
    def caps(self) -> IommuCap:
        return IommuCap(self.iommu_cap)

    @classmethod
    def from_proto(cls, m: Any) -> IommuInfo:
        return cls(m.present, m.iommu_cap, m.max_iova_width, m.iova_width, m.pgsize_bitmap, m.five_level,
                   m.ram_bytes, m.partition_id)


@dataclass(frozen=True, repr=False)
class Capabilities(_Hex):
    """HvCallGetIommuCapabilities' output."""

    size: int
    max_iova_width: int
    max_pasid_width: int
    iommu_cap: int
    pgsize_bitmap: int
    _decimal = ("size", "max_iova_width", "max_pasid_width")

    @property
    def caps(self) -> IommuCap:
        return IommuCap(self.iommu_cap)


@dataclass(frozen=True, repr=False)
class DomainInfo(_Hex):
    """A domain as the guest's driver keeps it (kind: paging, baseline, identity, blocked)."""

    domain_id: int
    kind: str
    devices: tuple[int, ...]
    root_gpa: int
    mapped_bytes: int
    table_pages: int
    _decimal = ("mapped_bytes", "table_pages")

    @classmethod
    def from_proto(cls, m: Any) -> DomainInfo:
        return cls(m.domain_id, m.kind, tuple(m.devices), m.root_gpa, m.mapped_bytes, m.table_pages)


@dataclass(frozen=True, repr=False)
class UnmapResult(_Hex):
    unmapped: int
    flushed: bool
    _decimal = ("unmapped",)


@dataclass(frozen=True, repr=False)
class GuestFault(_Hex):
    """A DMA fault of one of the guest's devices (the guest's fault stream)."""

    sequence: int
    logical_device_id: int
    iova: int
    write: bool
    reason: int
    reason_name: str
    detail: str = ""
    _decimal = ("sequence",)

    @classmethod
    def from_proto(cls, m: Any) -> GuestFault:
        return cls(m.sequence, m.logical_device_id, m.iova, m.write, m.reason, m.reason_name, m.detail)


@dataclass(frozen=True, repr=False)
class Fault(_Hex):
    """A fault record as the hypervisor keeps it (admin and hypervisor streams)."""

    sequence: int
    logical_device_id: int
    iova: int
    write: bool
    reason: int
    reason_name: str
    detail: str
    domain_id: int
    page_request: bool = False
    request_id: int = 0
    _decimal = ("sequence",)

    @classmethod
    def from_proto(cls, m: Any) -> Fault:
        return cls(m.sequence, m.logical_device_id, m.iova, m.write, m.reason, m.reason_name, m.detail,
                   m.domain_id, m.page_request, m.request_id)


@dataclass(frozen=True, repr=False)
class PartitionInfo(_Hex):
    partition_id: int
    name: str
    memory_bytes: int
    bank_path: str
    devices: tuple[int, ...]
    domain_count: int
    stage2_table_pages: int
    _decimal = ("memory_bytes", "domain_count", "stage2_table_pages")

    @classmethod
    def from_proto(cls, m: Any) -> PartitionInfo:
        return cls(m.partition_id, m.name, m.memory_bytes, m.bank_path, tuple(m.devices), m.domain_count,
                   m.stage2_table_pages)


@dataclass(frozen=True, repr=False)
class NewPartition(_Hex):
    """A created (or reset) partition and its credential."""

    partition_id: int
    name: str
    memory_bytes: int
    bank_path: str
    token: str = field(repr=False)
    _decimal = ("memory_bytes",)


@dataclass(frozen=True, repr=False)
class DeviceInfo(_Hex):
    """A registered device as the hypervisor sees it (admin view)."""

    logical_device_id: int
    name: str
    control_address: str
    slot: int
    partition_id: int
    domain_id: int
    reachable: bool
    pci_vendor_id: int
    pci_device_id: int
    _decimal = ("slot",)

    @classmethod
    def from_proto(cls, m: Any) -> DeviceInfo:
        return cls(m.logical_device_id, m.name, m.control_address, m.slot, m.partition_id, m.domain_id,
                   m.reachable, m.pci_vendor_id, m.pci_device_id)


@dataclass(frozen=True, repr=False)
class AdminDomain(_Hex):
    """A domain as the hypervisor keeps it (admin view)."""

    partition_id: int
    domain_id: int
    domain_type: int
    tag: int
    configured: bool
    translation_enabled: bool
    blocked: bool
    five_level: bool
    page_table_root: int
    devices: tuple[int, ...]
    stage2_root_hpa: int
    _decimal = ("domain_type", "tag")

    @classmethod
    def from_proto(cls, m: Any) -> AdminDomain:
        return cls(m.partition_id, m.domain_id, m.domain_type, m.tag, m.configured, m.translation_enabled,
                   m.blocked, m.five_level, m.page_table_root, tuple(m.devices), m.stage2_root_hpa)


@dataclass(frozen=True, repr=False)
class OfferedDevice(_Hex):
    """A device the hypervisor offers a guest (what VMBus would show it)."""

    logical_device_id: int
    name: str
    control_address: str
    pci_vendor_id: int
    pci_device_id: int
    behind_pviommu: bool

    @classmethod
    def from_proto(cls, m: Any) -> OfferedDevice:
        return cls(m.logical_device_id, m.name, m.control_address, m.pci_vendor_id, m.pci_device_id,
                   m.behind_pviommu)


@dataclass(frozen=True, repr=False)
class DmatestThread(_Hex):
    thread: str
    tests: int
    failures: int
    iops: float
    kb_per_s: float
    status: int


@dataclass(frozen=True, repr=False)
class DmatestResult(_Hex):
    """Linux dmatest's outcome: counts, rates, the log lines and the summary line."""

    tests: int
    failures: int
    iops: float
    kb_per_s: float
    summary: str
    runtime_s: float
    lines: tuple[str, ...] = field(repr=False, default=())
    threads: tuple[DmatestThread, ...] = field(repr=False, default=())

    @property
    def ok(self) -> bool:
        return self.tests > 0 and self.failures == 0

    @classmethod
    def from_proto(cls, m: Any) -> DmatestResult:
        return cls(m.tests, m.failures, m.iops, m.kb_per_s, m.summary, m.runtime_s, tuple(m.lines),
                   tuple(DmatestThread(t.thread, t.tests, t.failures, t.iops, t.kb_per_s, t.status)
                         for t in m.threads))
