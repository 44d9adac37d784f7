"""Output structures of the calls that have one."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from pviommu.abi.hv._checks import _check_uint
from pviommu.abi.hv.codes import HV_DEVICE_IOMMU_ENABLED, IommuCap

# --------------------------------------------------------------------------------------------
# Output structures
# --------------------------------------------------------------------------------------------


def _output_exact(what: str, buf: bytes, size: int) -> None:
    # An output that does not match its layout is a broken hypervisor, not a refused call.
    if len(buf) != size:
        raise ValueError(f"{what}: {len(buf)} bytes, the structure has {size}")


@dataclass(frozen=True)
class GetIommuCapabilitiesOutput:
    """``hv_output_get_iommu_capabilities`` (24 B): ``u32 size`` @0, ``u16 reserved`` @4, ``u8
    max_iova_width`` @6, ``u8 max_pasid_width`` @7, ``u64 iommu_cap`` @8 (:class:`IommuCap`),
    ``u64 pgsize_bitmap`` @16. Reserved bits of an output are written as 0 and ignored on
    unpack (the TLFS: callers ignore reserved output)."""

    max_iova_width: int
    max_pasid_width: int
    iommu_cap: int
    pgsize_bitmap: int
    size: int = 24

    SIZE: ClassVar[int] = 24

    def __post_init__(self) -> None:
        _check_uint("size", self.size, 32)
        _check_uint("max_iova_width", self.max_iova_width, 8)
        _check_uint("max_pasid_width", self.max_pasid_width, 8)
        _check_uint("iommu_cap", self.iommu_cap, 64)
        _check_uint("pgsize_bitmap", self.pgsize_bitmap, 64)

    def has(self, bit: IommuCap) -> bool:
        """Whether ``iommu_cap`` offers ``bit`` (what a driver asks of the answer)."""
        return bool(self.iommu_cap & bit)

    def pack(self) -> bytes:
        return struct.pack(
            "<IHBBQQ",
            self.size,
            0,
            self.max_iova_width,
            self.max_pasid_width,
            self.iommu_cap,
            self.pgsize_bitmap,
        )

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _output_exact("get_iommu_capabilities output", buf, cls.SIZE)
        size, _reserved_u16, iova, pasid, cap, pgsizes = struct.unpack("<IHBBQQ", buf)
        return cls(max_iova_width=iova, max_pasid_width=pasid, iommu_cap=cap, pgsize_bitmap=pgsizes, size=size)


@dataclass(frozen=True)
class GetLogicalDevicePropertyOutput:
    """``hv_output_get_logical_device_property`` (16 B): ``u64 device_iommu`` @0 (bit0
    ``HV_DEVICE_IOMMU_ENABLED``), ``u64 reserved`` @8."""

    device_iommu: int

    SIZE: ClassVar[int] = 16

    def __post_init__(self) -> None:
        _check_uint("device_iommu", self.device_iommu, 64)

    @property
    def iommu_enabled(self) -> bool:
        return bool(self.device_iommu & HV_DEVICE_IOMMU_ENABLED)

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.device_iommu, 0)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _output_exact("get_logical_device_property output", buf, cls.SIZE)
        device_iommu, _reserved_u64 = struct.unpack("<QQ", buf)
        return cls(device_iommu)
