"""Input structures: the building blocks and the simple calls' inputs (all ``__packed``, little-endian)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from pviommu.abi.hv._checks import _U8, _U32, _U64, _check_uint, _exact, _padding, _reserved
from pviommu.abi.hv.codes import (
    FIRST_STAGE_PAGING_4LEVEL,
    HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU,
    HV_PARTITION_ID_SELF,
    DeviceDomainType,
    HvCallCode,
)
from pviommu.abi.hv.ids import HvDeviceId
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa
from pviommu.errors import HvError

# --------------------------------------------------------------------------------------------
# Building blocks: hv_input_vtl, hv_device_domain_id, hv_input_device_domain
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HvInputVtl:
    """``union hv_input_vtl`` (u8): ``target_vtl:4`` bits 0-3, ``use_target_vtl:1`` bit 4,
    ``reserved_z:3`` bits 5-7 (must be zero)."""

    target_vtl: int = 0
    use_target_vtl: bool = False

    SIZE: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _check_uint("target_vtl", self.target_vtl, 4)

    def to_u8(self) -> int:
        return self.target_vtl | int(self.use_target_vtl) << 4

    @classmethod
    def from_u8(cls, raw: int, what: str = "hv_input_vtl") -> HvInputVtl:
        """The union from its byte; a wider value (a gRPC ``uint32``) or a set ``reserved_z`` bit is
        INVALID_PARAMETER."""
        if not 0 <= raw <= _U8:
            raise HvError(HvStatus.INVALID_PARAMETER, f"{what} {raw:#x} does not fit hv_input_vtl")
        _reserved(f"{what}.reserved_z", raw, 0xE0)
        return cls(target_vtl=raw & 0xF, use_target_vtl=bool(raw & 0x10))


@dataclass(frozen=True)
class DeviceDomainId:
    """``union hv_device_domain_id`` (u64): ``type`` bits 0-3, reserved bits 4-31, ``id`` bits
    32-63. ``type`` stays an int: a defined but unsupported type (S2/SOC for a guest) or an
    undefined one (3-15) is for the handler to refuse, not the layout."""

    type: int
    id: int

    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        _check_uint("domain_id.type", self.type, 4)
        _check_uint("domain_id.id", self.id, 32)

    @property
    def domain_type(self) -> DeviceDomainType | None:
        try:
            return DeviceDomainType(self.type)
        except ValueError:
            return None

    def to_u64(self) -> int:
        return self.type | self.id << 32

    @classmethod
    def from_u64(cls, raw: int, what: str = "hv_device_domain_id") -> DeviceDomainId:
        _reserved(what, raw, 0xFFFF_FFF0)
        return cls(type=raw & 0xF, id=raw >> 32)


_DEVICE_DOMAIN = struct.Struct("<QB7sQ")


@dataclass(frozen=True)
class DeviceDomain:
    """``struct hv_input_device_domain`` (24 B): ``u64 partition_id`` @0, ``hv_input_vtl
    owner_vtl`` @8, ``u8 padding[7]`` @9, ``hv_device_domain_id domain_id`` @16."""

    partition_id: int
    domain_id: DeviceDomainId
    owner_vtl: HvInputVtl = field(default_factory=HvInputVtl)

    SIZE: ClassVar[int] = 24

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)

    def pack(self) -> bytes:
        return _DEVICE_DOMAIN.pack(self.partition_id, self.owner_vtl.to_u8(), bytes(7), self.domain_id.to_u64())

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("hv_input_device_domain", buf, cls.SIZE)
        return cls._decode(buf, strict_padding, "device_domain")

    @classmethod
    def _decode(cls, buf: bytes, strict_padding: bool, what: str) -> Self:
        partition_id, vtl, pad, domain_id = _DEVICE_DOMAIN.unpack_from(buf)
        _padding(f"{what}.padding", pad, strict_padding)
        return cls(
            partition_id=partition_id,
            owner_vtl=HvInputVtl.from_u8(vtl, f"{what}.owner_vtl"),
            domain_id=DeviceDomainId.from_u64(domain_id, f"{what}.domain_id"),
        )


# --------------------------------------------------------------------------------------------
# Input structures of the simple calls
# --------------------------------------------------------------------------------------------

_CREATE_FLAGS_VALID = 0x3


@dataclass(frozen=True)
class CreateDeviceDomainInput:
    """``hv_input_create_device_domain`` (28 B, padded to 32 in the input page): device_domain
    @0, ``u32 flags`` @24 (bit0 forward_progress_required, bit1 inherit_owning_vtl)."""

    device_domain: DeviceDomain
    forward_progress_required: bool = False
    inherit_owning_vtl: bool = False

    CODE: ClassVar[HvCallCode] = HvCallCode.CREATE_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 28

    @classmethod
    def from_flags(cls, device_domain: DeviceDomain, flags: int) -> Self:
        """The input from its ``u32 flags`` word; an undefined bit is INVALID_PARAMETER."""
        _check_uint("create.flags", flags, 32)
        _reserved("create.flags", flags, ~_CREATE_FLAGS_VALID & _U32)
        return cls(device_domain, forward_progress_required=bool(flags & 1), inherit_owning_vtl=bool(flags & 2))

    @property
    def flags(self) -> int:
        return int(self.forward_progress_required) | int(self.inherit_owning_vtl) << 1

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<I", self.flags)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("create_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "create.device_domain")
        (flags,) = struct.unpack_from("<I", buf, 24)
        return cls.from_flags(dd, flags)


@dataclass(frozen=True)
class DeleteDeviceDomainInput:
    """``hv_input_delete_device_domain`` (24 B): device_domain @0."""

    device_domain: DeviceDomain

    CODE: ClassVar[HvCallCode] = HvCallCode.DELETE_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 24

    def pack(self) -> bytes:
        return self.device_domain.pack()

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("delete_device_domain", buf, cls.SIZE)
        return cls(DeviceDomain._decode(buf, strict_padding, "delete.device_domain"))


@dataclass(frozen=True)
class AttachDeviceDomainInput:
    """``hv_input_attach_device_domain`` (32 B): device_domain @0, ``hv_device_id device_id``
    @24."""

    device_domain: DeviceDomain
    device_id: HvDeviceId

    CODE: ClassVar[HvCallCode] = HvCallCode.ATTACH_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 32

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<Q", self.device_id.to_u64())

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("attach_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "attach.device_domain")
        (dev,) = struct.unpack_from("<Q", buf, 24)
        return cls(dd, HvDeviceId.from_u64(dev))


@dataclass(frozen=True)
class DetachDeviceDomainInput:
    """``hv_input_detach_device_domain`` (16 B): ``u64 partition_id`` @0, ``hv_device_id
    device_id`` @8."""

    partition_id: int
    device_id: HvDeviceId

    CODE: ClassVar[HvCallCode] = HvCallCode.DETACH_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 16

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.partition_id, self.device_id.to_u64())

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("detach_device_domain", buf, cls.SIZE)
        partition_id, dev = struct.unpack("<QQ", buf)
        return cls(partition_id, HvDeviceId.from_u64(dev))


_SETTINGS_FLAGS_VALID = 0x7
_GPA_ZERO = Gpa(0)


@dataclass(frozen=True)
class DeviceDomainSettings:
    """``hv_device_domain_settings`` (16 B): ``u64 flags`` @0 (bit0 translation_enabled: clear
    bypasses stage 1; bit1 blocked; bit2 first_stage_paging_mode: 0 4-level, 1 5-level; bits
    3-63 reserved), ``u64 page_table_root`` @8 (a GPA: the stage-1 tables live in guest RAM)."""

    translation_enabled: bool = False
    blocked: bool = False
    first_stage_paging_mode: int = FIRST_STAGE_PAGING_4LEVEL
    page_table_root: Gpa = _GPA_ZERO

    SIZE: ClassVar[int] = 16

    def __post_init__(self) -> None:
        _check_uint("first_stage_paging_mode", self.first_stage_paging_mode, 1)
        _check_uint("page_table_root", self.page_table_root, 64)

    def pack(self) -> bytes:
        flags = int(self.translation_enabled) | int(self.blocked) << 1 | self.first_stage_paging_mode << 2
        return struct.pack("<QQ", flags, self.page_table_root)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("hv_device_domain_settings", buf, cls.SIZE)
        return cls._decode(buf, "settings")

    @classmethod
    def _decode(cls, buf: bytes, what: str) -> Self:
        flags, root = struct.unpack_from("<QQ", buf)
        _reserved(f"{what}.flags", flags, ~_SETTINGS_FLAGS_VALID & _U64)
        return cls(
            translation_enabled=bool(flags & 1),
            blocked=bool(flags & 2),
            first_stage_paging_mode=(flags >> 2) & 1,
            page_table_root=Gpa(root),
        )


@dataclass(frozen=True)
class ConfigureDeviceDomainInput:
    """``hv_input_configure_device_domain`` (40 B): device_domain @0, settings @24."""

    device_domain: DeviceDomain
    settings: DeviceDomainSettings

    CODE: ClassVar[HvCallCode] = HvCallCode.CONFIGURE_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 40

    def pack(self) -> bytes:
        return self.device_domain.pack() + self.settings.pack()

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("configure_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "configure.device_domain")
        return cls(dd, DeviceDomainSettings._decode(buf[24:], "configure.settings"))


@dataclass(frozen=True)
class FlushDeviceDomainInput:
    """``hv_input_flush_device_domain`` (32 B): device_domain @0, ``u32 flags`` @24, ``u32
    reserved`` @28. No flag bit is defined in any version of the series (the driver passes 0),
    so both words are reserved and must be 0."""

    device_domain: DeviceDomain

    CODE: ClassVar[HvCallCode] = HvCallCode.FLUSH_DEVICE_DOMAIN
    SIZE: ClassVar[int] = 32

    @classmethod
    def from_flags(cls, device_domain: DeviceDomain, flags: int) -> Self:
        """The input from its ``u32 flags`` word; any set bit is INVALID_PARAMETER (none is defined)."""
        _check_uint("flush.flags", flags, 32)
        _reserved("flush.flags", flags, _U32)
        return cls(device_domain)

    def pack(self) -> bytes:
        return self.device_domain.pack() + bytes(8)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("flush_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "flush.device_domain")
        flags, reserved = struct.unpack_from("<II", buf, 24)
        request = cls.from_flags(dd, flags)
        _reserved("flush.reserved", reserved, _U32)
        return request


@dataclass(frozen=True)
class GetIommuCapabilitiesInput:
    """``hv_input_get_iommu_capabilities`` (16 B): ``u64 partition_id`` @0, ``u64 reserved``
    @8."""

    partition_id: int = HV_PARTITION_ID_SELF

    CODE: ClassVar[HvCallCode] = HvCallCode.GET_IOMMU_CAPABILITIES
    SIZE: ClassVar[int] = 16

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.partition_id, 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("get_iommu_capabilities", buf, cls.SIZE)
        partition_id, reserved = struct.unpack("<QQ", buf)
        _reserved("get_iommu_capabilities.reserved", reserved, _U64)
        return cls(partition_id)


@dataclass(frozen=True)
class GetLogicalDevicePropertyInput:
    """``hv_input_get_logical_device_property`` (24 B): ``u64 partition_id`` @0, ``u64
    logical_device_id`` @8, ``u32 code`` @16 (an enum in the RFC, u32 from v1), ``u32 reserved``
    @20. ``code`` stays an int: an unknown property is the handler's to refuse."""

    partition_id: int
    logical_device_id: int
    code: int = HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU

    CODE: ClassVar[HvCallCode] = HvCallCode.GET_LOGICAL_DEVICE_PROPERTY
    SIZE: ClassVar[int] = 24

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)
        _check_uint("logical_device_id", self.logical_device_id, 64)
        _check_uint("code", self.code, 32)

    def pack(self) -> bytes:
        return struct.pack("<QQII", self.partition_id, self.logical_device_id, self.code, 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("get_logical_device_property", buf, cls.SIZE)
        partition_id, dev, code, reserved = struct.unpack("<QQII", buf)
        _reserved("get_logical_device_property.reserved", reserved, _U32)
        return cls(partition_id, dev, code)
