"""Hyper-V guest-IOMMU hypercall ABI: call codes, the input/result values and packed layouts.

C sources (shared/reference/hyperv-guest-iommu.md):

* call codes and layouts: Linux RFC "Hyper-V pvIOMMU" 3/5 (``hvgdk_mini.h``, ``hvhdk_mini.h``),
  PATCH v1/v2 4/4 for ``HVCALL_FLUSH_DEVICE_DOMAIN_LIST``; the root-side MAP/UNMAP_DEVICE_GPA_PAGES
  layouts from Wei Liu's RFC of 9 Jul 2021 (``asm-generic/hyperv-tlfs.h``);
* ``hv_build_logical_dev_id()``: RFC 1/5 (``drivers/pci/controller/pci-hyperv.c``);
* the hypercall input and result values: TLFS "Hypercall Interface" (``HV_X64_HYPERCALL_INPUT``,
  ``HV_X64_HYPERCALL_OUTPUT``) and "Common Hypercall Status Codes".

Every structure is ``__packed`` and little-endian. Each input structure is a frozen dataclass
with ``SIZE``, ``pack()`` and ``unpack(buf)``; reserved fields are not dataclass fields (they
are always packed as 0 and checked on unpack), so a decoded object cannot carry a set reserved
bit. Decoding happens here, before any handler runs (STYLE.md convention 7); handlers receive
the typed objects that :func:`decode_input` / :func:`decode_call` return.

Which status for which refusal
------------------------------
The TLFS lists the statuses common to all hypercalls; the choices below follow it:

* ``HV_STATUS_INVALID_HYPERCALL_CODE``: the call code is not one of :class:`HvCallCode`
  (TLFS: "the hypercall code is not recognized"). Checked first, so a probe for an absent
  call always gets this answer (Linux maps it to -ENODEV for GET_IOMMU_CAPABILITIES).
* ``HV_STATUS_INVALID_HYPERCALL_INPUT``: everything wrong with the *input value* or with the
  *shape* of the input block (TLFS: "the rep count is incorrect (a nonzero rep count is passed
  to a basic hypercall or a zero rep count is passed to a rep hypercall)", "the rep start index
  is not smaller than the rep count", "a reserved bit in the specified hypercall input value is
  nonzero"). Hence: reserved bits 27-30, 44-47, 60-63 of the input value; a non-zero rep count
  *or rep start* on a simple call; a zero rep count on a rep call; rep start >= rep count
  (the TLFS rule, one step stricter than "start > count": start == count would be a call with
  nothing to do); the fast bit (these calls exist only in the memory-based convention here);
  a non-zero variable header size (none of these calls has one, Linux passes ``varhead_size``
  0); the nested bit (this twin is the only hypervisor, there is no L0 to forward to). Also the
  input block's length: shorter than the structure (truncated), or longer than allowed (see
  below). The length has no TLFS status of its own (the real hypervisor reads the structure
  from a page, so it cannot be "too short"); a malformed block is a malformed input, so it gets
  the input status, not the parameter status.
* ``HV_STATUS_INVALID_ALIGNMENT``: header + ``rep_count`` elements would not fit in the one
  4 KiB input page (TLFS: "the specified input or output parameter list spans pages"); the raw
  ABI's input bytes stand for the input page from its first byte.
* ``HV_STATUS_INVALID_PARAMETER``: a reserved *field or bit inside the input structure* is
  non-zero (``hv_input_vtl.reserved_z``, bits 4-31 of ``hv_device_domain_id``, undefined bits of
  ``flags``/``map_flags``/settings flags, the ``u32 reserved``/``u64 reserved`` fields). The
  TLFS's INVALID_HYPERCALL_INPUT covers reserved bits of the input *value* only; a bad value of a
  field of the input *structure* is a bad parameter. ``HVCALL_FLUSH_DEVICE_DOMAIN``'s ``flags``
  has no defined bit in any version of the series, so all of it is reserved.

Padding is not reserved. The TLFS says input structures are "padded to a multiple of 8 bytes in
size. The values within the padding regions are ignored by the hypervisor." So the explicit
padding arrays (``hv_input_device_domain.padding[7]``, ``map_device_gpa_pages.padding[3]``) and
the tail that rounds a structure up to 8 bytes (create: 28 -> 32) are ignored by default. A
driver that forgets to zero its input page (the bug Michael Kelley flagged in the RFC review) is
caught by its reserved fields, not by padding. For a pedantic run, ``strict_padding=True``
refuses non-zero padding with INVALID_PARAMETER.

Oversized blocks: a simple call's input may be followed by padding up to the next multiple of 8
(only create, 28 B, has any); a rep call's input must be exactly the header plus ``rep_count``
8-byte elements (all header sizes are multiples of 8, so there is no padding to allow); more
bytes than that -> INVALID_HYPERCALL_INPUT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from types import MappingProxyType
from typing import ClassVar, Self

from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from pviommu.errors import HvError

# --------------------------------------------------------------------------------------------
# Call codes
# --------------------------------------------------------------------------------------------


class HvCallCode(IntEnum):
    """``HVCALL_*`` codes of the guest-IOMMU interface (plus the root-side map/unmap)."""

    CREATE_DEVICE_DOMAIN = 0x00B1
    ATTACH_DEVICE_DOMAIN = 0x00B2
    MAP_DEVICE_GPA_PAGES = 0x00B3
    UNMAP_DEVICE_GPA_PAGES = 0x00B4
    DETACH_DEVICE_DOMAIN = 0x00C4
    DELETE_DEVICE_DOMAIN = 0x00C5
    CONFIGURE_DEVICE_DOMAIN = 0x00CE
    FLUSH_DEVICE_DOMAIN = 0x00D0
    FLUSH_DEVICE_DOMAIN_LIST = 0x00D1
    GET_IOMMU_CAPABILITIES = 0x0125
    GET_LOGICAL_DEVICE_PROPERTY = 0x0127


#: Rep hypercalls. FLUSH_DEVICE_DOMAIN_LIST repeats over ``hv_iommu_flush_va`` elements,
#: MAP_DEVICE_GPA_PAGES over its ``gpa_page_list``, UNMAP_DEVICE_GPA_PAGES over pages (no
#: elements in the input; the rep count is the page count).
REP_CALLS: frozenset[HvCallCode] = frozenset(
    {
        HvCallCode.FLUSH_DEVICE_DOMAIN_LIST,
        HvCallCode.MAP_DEVICE_GPA_PAGES,
        HvCallCode.UNMAP_DEVICE_GPA_PAGES,
    }
)

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

HV_PARTITION_ID_SELF = 0xFFFF_FFFF_FFFF_FFFF
#: The TLFS input page: an input parameter list may not span pages.
HV_HYP_PAGE_SIZE = 4096


class DeviceDomainType(IntEnum):
    """``HV_DEVICE_DOMAIN_TYPE_*``: guests use S1; S2 and SOC are root-side."""

    S2 = 0
    S1 = 1
    SOC = 2


HV_DEVICE_DOMAIN_ID_DEFAULT = 0
HV_DEVICE_DOMAIN_ID_NULL = 0xFFFF_FFFF


class IommuCap(IntFlag):
    """``HV_IOMMU_CAP_*`` bits of ``hv_output_get_iommu_capabilities.iommu_cap``."""

    PRESENT = 1 << 0
    S2 = 1 << 1
    S1 = 1 << 2
    S1_5LVL = 1 << 3
    PASID = 1 << 4
    ATS = 1 << 5
    PRI = 1 << 6


HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU = 10
#: Bit 0 of ``hv_output_get_logical_device_property.device_iommu``.
HV_DEVICE_IOMMU_ENABLED = 1 << 0


class MapFlags(IntFlag):
    """``HV_MAP_GPA_*`` bits of ``map_device_gpa_pages.map_flags``."""

    READABLE = 0x1
    WRITABLE = 0x2


#: Bit 0 of ``hv_input_flush_device_domain_list.flags``.
HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT = 1 << 0

#: ``hv_device_domain_settings.first_stage_paging_mode`` values.
FIRST_STAGE_PAGING_4LEVEL = 0
FIRST_STAGE_PAGING_5LEVEL = 1


class HvDeviceType(IntEnum):
    """``HV_DEVICE_TYPE_*``: bits 62-63 of every ``hv_device_id``."""

    LOGICAL = 0
    PCI = 1
    IOAPIC = 2
    ACPI = 3


_U8 = (1 << 8) - 1
_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _check_uint(what: str, value: int, bits: int) -> None:
    """Programming errors while *building* a structure are ValueErrors, not HV statuses."""
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{what} = {value!r} does not fit in {bits} unsigned bits")


def _reserved(what: str, value: int, mask: int) -> None:
    bad = value & mask
    if bad:
        raise HvError(HvStatus.INVALID_PARAMETER, f"{what}: reserved bits 0x{bad:x} set (must be 0)")


def _padding(what: str, raw: bytes, strict: bool) -> None:
    if strict and any(raw):
        raise HvError(HvStatus.INVALID_PARAMETER, f"{what}: padding {raw.hex()} is not zero")


def _exact(what: str, buf: bytes, size: int) -> None:
    if len(buf) != size:
        raise HvError(HvStatus.INVALID_HYPERCALL_INPUT, f"{what}: {len(buf)} bytes, the structure has {size}")


# --------------------------------------------------------------------------------------------
# hv_device_id and the logical device id
# --------------------------------------------------------------------------------------------

_DEVICE_ID_TYPE_SHIFT = 62
_DEVICE_ID_ID_MASK = (1 << 62) - 1


@dataclass(frozen=True)
class HvDeviceId:
    """``union hv_device_id`` (u64): bits 0-61 type-specific id, bits 62-63 the type.

    Every u64 is a valid encoding (the 2-bit type has four defined values), so parsing is total.
    For LOGICAL the id is the logical device id (:func:`build_logical_device_id`); for PCI see
    :class:`PciDeviceId`.
    """

    type: HvDeviceType
    id: int

    def __post_init__(self) -> None:
        _check_uint("hv_device_id.id", self.id, 62)

    @classmethod
    def logical(cls, logical_id: int) -> HvDeviceId:
        return cls(HvDeviceType.LOGICAL, logical_id)

    def to_u64(self) -> int:
        return (int(self.type) << _DEVICE_ID_TYPE_SHIFT) | self.id

    @classmethod
    def from_u64(cls, raw: int) -> HvDeviceId:
        _check_uint("hv_device_id", raw, 64)
        return cls(HvDeviceType(raw >> _DEVICE_ID_TYPE_SHIFT), raw & _DEVICE_ID_ID_MASK)


_PCI_RSVD_MASK = ((1 << 11) - 1) << 51


@dataclass(frozen=True)
class PciDeviceId:
    """The PCI form of ``hv_device_id``: ``rid`` u16 (bits 0-15), ``segment`` u16 (16-31),
    ``shadow_bus_range`` u16 (32-47), ``phantom:2`` (48-49), ``source_shadow:1`` (50),
    ``rsvd:11`` (51-61), ``type:2`` (62-63) = PCI."""

    rid: int
    segment: int
    shadow_bus_range: int = 0
    phantom: int = 0
    source_shadow: bool = False

    def __post_init__(self) -> None:
        _check_uint("pci rid", self.rid, 16)
        _check_uint("pci segment", self.segment, 16)
        _check_uint("pci shadow_bus_range", self.shadow_bus_range, 16)
        _check_uint("pci phantom", self.phantom, 2)

    def to_device_id(self) -> HvDeviceId:
        raw = (
            self.rid
            | self.segment << 16
            | self.shadow_bus_range << 32
            | self.phantom << 48
            | int(self.source_shadow) << 50
        )
        return HvDeviceId(HvDeviceType.PCI, raw)

    @classmethod
    def from_device_id(cls, dev: HvDeviceId) -> PciDeviceId:
        """ValueError if ``dev`` is not of type PCI; INVALID_PARAMETER if ``rsvd`` is set."""
        if dev.type is not HvDeviceType.PCI:
            raise ValueError(f"hv_device_id of type {dev.type.name}, not PCI")
        _reserved("hv_device_id.pci.rsvd", dev.id, _PCI_RSVD_MASK)
        return cls(
            rid=dev.id & _U16,
            segment=(dev.id >> 16) & _U16,
            shadow_bus_range=(dev.id >> 32) & _U16,
            phantom=(dev.id >> 48) & 0x3,
            source_shadow=bool((dev.id >> 50) & 1),
        )


def logical_device_id_prefix(instance_guid_bytes: bytes) -> int:
    """``hv_build_logical_dev_id_prefix()`` (PATCH v1/v2): the GUID part of the logical id,
    ``(b[5] << 24) | (b[4] << 16) | (b[7] << 8) | (b[6] & 0xf8)``, where ``b`` is the vPCI bus's
    VMBus ``dev_instance`` GUID in memory order (16 bytes)."""
    b = instance_guid_bytes
    if len(b) != 16:
        raise ValueError(f"a GUID has 16 bytes, not {len(b)}")
    return (b[5] << 24) | (b[4] << 16) | (b[7] << 8) | (b[6] & 0xF8)


def build_logical_device_id(instance_guid_bytes: bytes, pci_func: int) -> int:
    """``hv_build_logical_dev_id(pdev)`` (RFC 1/5): the prefix ORed with ``PCI_FUNC(devfn)``.

    Only the function number comes from the PCI address (not domain, bus or slot). The value is
    used directly as an ``hv_device_id``: bits 62-63 are 0, i.e. ``HV_DEVICE_TYPE_LOGICAL``.
    """
    _check_uint("PCI function", pci_func, 3)
    return logical_device_id_prefix(instance_guid_bytes) | pci_func


# --------------------------------------------------------------------------------------------
# Hypercall input and result values (TLFS)
# --------------------------------------------------------------------------------------------

_IN_CODE_MASK = 0xFFFF
_IN_FAST_BIT = 16
_IN_VARHEAD_SHIFT = 17
_IN_VARHEAD_MASK = 0x3FF << _IN_VARHEAD_SHIFT  # bits 17-26
_IN_NESTED_BIT = 31
_IN_REP_COUNT_SHIFT = 32
_IN_REP_START_SHIFT = 48
_REP_MASK = 0xFFF
HV_MAX_REP_COUNT = _REP_MASK
#: Bits of the input value that no field defines: 27-30, 44-47, 60-63.
HV_HYPERCALL_INPUT_RESERVED_MASK = (0xF << 27) | (0xF << 44) | (0xF << 60)


@dataclass(frozen=True)
class HypercallInput:
    """The 64-bit hypercall input value (TLFS ``HV_X64_HYPERCALL_INPUT``).

    ``call_code`` is a plain int so unknown codes survive decoding (:func:`decode_call` answers
    them). ``variable_header_size`` is in 8-byte units. ``reserved`` holds the value's bits that
    no field defines, in place (a mask over bits 27-30, 44-47, 60-63): decoding never refuses,
    the caller refuses a non-zero ``reserved`` with INVALID_HYPERCALL_INPUT.
    """

    call_code: int
    rep_count: int = 0
    rep_start: int = 0
    fast: bool = False
    variable_header_size: int = 0
    nested: bool = False
    reserved: int = 0

    def __post_init__(self) -> None:
        _check_uint("call_code", self.call_code, 16)
        _check_uint("rep_count", self.rep_count, 12)
        _check_uint("rep_start", self.rep_start, 12)
        _check_uint("variable_header_size", self.variable_header_size, 10)
        if self.reserved & ~HV_HYPERCALL_INPUT_RESERVED_MASK:
            raise ValueError(f"reserved = 0x{self.reserved:x} has bits outside the reserved mask")

    def encode(self) -> int:
        return (
            self.call_code
            | int(self.fast) << _IN_FAST_BIT
            | self.variable_header_size << _IN_VARHEAD_SHIFT
            | int(self.nested) << _IN_NESTED_BIT
            | self.rep_count << _IN_REP_COUNT_SHIFT
            | self.rep_start << _IN_REP_START_SHIFT
            | self.reserved
        )

    @classmethod
    def decode(cls, value: int) -> HypercallInput:
        _check_uint("hypercall input value", value, 64)
        return cls(
            call_code=value & _IN_CODE_MASK,
            fast=bool((value >> _IN_FAST_BIT) & 1),
            variable_header_size=(value & _IN_VARHEAD_MASK) >> _IN_VARHEAD_SHIFT,
            nested=bool((value >> _IN_NESTED_BIT) & 1),
            rep_count=(value >> _IN_REP_COUNT_SHIFT) & _REP_MASK,
            rep_start=(value >> _IN_REP_START_SHIFT) & _REP_MASK,
            reserved=value & HV_HYPERCALL_INPUT_RESERVED_MASK,
        )


@dataclass(frozen=True)
class HypercallResult:
    """The 64-bit hypercall result value (TLFS ``HV_X64_HYPERCALL_OUTPUT``): status in bits 0-15,
    reps completed in bits 32-43. The other bits are reserved; the TLFS tells callers to ignore
    them, so :meth:`decode` does. ``status`` is an int so an unknown status survives decoding.
    For rep calls ``reps_completed`` counts from element 0, not from the rep start index."""

    status: int
    reps_completed: int = 0

    def __post_init__(self) -> None:
        _check_uint("status", self.status, 16)
        _check_uint("reps_completed", self.reps_completed, 12)

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS

    def encode(self) -> int:
        return self.status | self.reps_completed << 32

    @classmethod
    def decode(cls, value: int) -> HypercallResult:
        _check_uint("hypercall result value", value, 64)
        return cls(status=value & 0xFFFF, reps_completed=(value >> 32) & _REP_MASK)


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

    def pack(self) -> bytes:
        flags = int(self.forward_progress_required) | int(self.inherit_owning_vtl) << 1
        return self.device_domain.pack() + struct.pack("<I", flags)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("create_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "create.device_domain")
        (flags,) = struct.unpack_from("<I", buf, 24)
        _reserved("create.flags", flags, ~_CREATE_FLAGS_VALID & _U32)
        return cls(dd, forward_progress_required=bool(flags & 1), inherit_owning_vtl=bool(flags & 2))


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

    def pack(self) -> bytes:
        return self.device_domain.pack() + bytes(8)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("flush_device_domain", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "flush.device_domain")
        flags, reserved = struct.unpack_from("<II", buf, 24)
        _reserved("flush.flags", flags, _U32)
        _reserved("flush.reserved", reserved, _U32)
        return cls(dd)


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


# --------------------------------------------------------------------------------------------
# Rep calls: headers, elements and the requests that carry rep count and start
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlushVa:
    """``union hv_iommu_flush_va`` (u64): ``page_mask_shift:12`` bits 0-11, ``page_number:52``
    bits 12-63. Every u64 is valid."""

    page_number: int
    page_mask_shift: int = 0

    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        _check_uint("page_number", self.page_number, 52)
        _check_uint("page_mask_shift", self.page_mask_shift, 12)

    def to_u64(self) -> int:
        return self.page_mask_shift | self.page_number << 12

    @classmethod
    def from_u64(cls, raw: int) -> FlushVa:
        _check_uint("hv_iommu_flush_va", raw, 64)
        return cls(page_number=raw >> 12, page_mask_shift=raw & 0xFFF)

    def pack(self) -> bytes:
        return struct.pack("<Q", self.to_u64())

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _exact("hv_iommu_flush_va", buf, cls.SIZE)
        (raw,) = struct.unpack("<Q", buf)
        return cls(page_number=raw >> 12, page_mask_shift=raw & 0xFFF)


@dataclass(frozen=True)
class FlushDeviceDomainListHeader:
    """``hv_input_flush_device_domain_list`` fixed part (32 B): device_domain @0, ``u32 flags``
    @24 (bit0 ``HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT``), ``u32 reserved`` @28; then
    ``rep_count`` :class:`FlushVa` elements."""

    device_domain: DeviceDomain
    iommu_format: bool = False

    SIZE: ClassVar[int] = 32

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<II", int(self.iommu_format), 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("flush_device_domain_list header", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "flush_list.device_domain")
        flags, reserved = struct.unpack_from("<II", buf, 24)
        _reserved("flush_list.flags", flags, ~HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT & _U32)
        _reserved("flush_list.reserved", reserved, _U32)
        return cls(dd, iommu_format=bool(flags & HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT))


_MAP_TAIL = struct.Struct("<B3sIQ")


@dataclass(frozen=True)
class MapDeviceGpaPagesHeader:
    """``hv_input_map_device_gpa_pages`` fixed part (40 B): device_domain @0, ``hv_input_vtl
    target_vtl`` @24, ``u8 padding[3]`` @25, ``u32 map_flags`` @28 (:class:`MapFlags`), ``u64
    target_device_va_base`` @32; then ``rep_count`` u64 GPA page numbers."""

    device_domain: DeviceDomain
    map_flags: MapFlags
    target_device_va_base: Iova
    target_vtl: HvInputVtl = field(default_factory=HvInputVtl)

    SIZE: ClassVar[int] = 40

    def __post_init__(self) -> None:
        _check_uint("map_flags", int(self.map_flags), 32)
        if self.map_flags & ~(MapFlags.READABLE | MapFlags.WRITABLE):
            raise ValueError(f"map_flags 0x{int(self.map_flags):x} has undefined bits")
        _check_uint("target_device_va_base", self.target_device_va_base, 64)

    def pack(self) -> bytes:
        return self.device_domain.pack() + _MAP_TAIL.pack(
            self.target_vtl.to_u8(), bytes(3), int(self.map_flags), self.target_device_va_base
        )

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("map_device_gpa_pages header", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "map.device_domain")
        vtl, pad, flags, va = _MAP_TAIL.unpack_from(buf, 24)
        _padding("map.padding", pad, strict_padding)
        _reserved("map.map_flags", flags, ~int(MapFlags.READABLE | MapFlags.WRITABLE) & _U32)
        return cls(
            device_domain=dd,
            map_flags=MapFlags(flags),
            target_device_va_base=Iova(va),
            target_vtl=HvInputVtl.from_u8(vtl, "map.target_vtl"),
        )


@dataclass(frozen=True)
class UnmapDeviceGpaPagesInput:
    """``hv_input_unmap_device_gpa_pages`` (32 B): device_domain @0, ``u64
    target_device_va_base`` @24. A rep call over pages with no input elements."""

    device_domain: DeviceDomain
    target_device_va_base: Iova

    SIZE: ClassVar[int] = 32

    def __post_init__(self) -> None:
        _check_uint("target_device_va_base", self.target_device_va_base, 64)

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<Q", self.target_device_va_base)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("unmap_device_gpa_pages", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "unmap.device_domain")
        (va,) = struct.unpack_from("<Q", buf, 24)
        return cls(dd, Iova(va))


def _check_reps(rep_count: int, rep_start: int) -> None:
    if not 1 <= rep_count <= HV_MAX_REP_COUNT:
        raise ValueError(f"rep count {rep_count} outside 1..{HV_MAX_REP_COUNT}")
    if not 0 <= rep_start < rep_count:
        raise ValueError(f"rep start {rep_start} outside 0..{rep_count - 1}")


@dataclass(frozen=True)
class FlushDeviceDomainListRequest:
    """HVCALL_FLUSH_DEVICE_DOMAIN_LIST as decoded: the header, all ``rep_count`` elements (the
    input holds the whole list also when resuming) and the index to resume from."""

    header: FlushDeviceDomainListHeader
    flush_vas: tuple[FlushVa, ...]
    rep_start: int = 0

    CODE: ClassVar[HvCallCode] = HvCallCode.FLUSH_DEVICE_DOMAIN_LIST

    def __post_init__(self) -> None:
        _check_reps(len(self.flush_vas), self.rep_start)

    @property
    def rep_count(self) -> int:
        return len(self.flush_vas)

    def pack(self) -> bytes:
        return self.header.pack() + b"".join(va.pack() for va in self.flush_vas)


@dataclass(frozen=True)
class MapDeviceGpaPagesRequest:
    """HVCALL_MAP_DEVICE_GPA_PAGES as decoded: the header, all ``rep_count`` GPA page numbers
    (``gpa_page_list``; page numbers, not addresses) and the index to resume from."""

    header: MapDeviceGpaPagesHeader
    gpa_page_list: tuple[int, ...]
    rep_start: int = 0

    CODE: ClassVar[HvCallCode] = HvCallCode.MAP_DEVICE_GPA_PAGES

    def __post_init__(self) -> None:
        _check_reps(len(self.gpa_page_list), self.rep_start)
        for pfn in self.gpa_page_list:
            _check_uint("gpa page number", pfn, 64)

    @property
    def rep_count(self) -> int:
        return len(self.gpa_page_list)

    def pack(self) -> bytes:
        return self.header.pack() + struct.pack(f"<{len(self.gpa_page_list)}Q", *self.gpa_page_list)


@dataclass(frozen=True)
class UnmapDeviceGpaPagesRequest:
    """HVCALL_UNMAP_DEVICE_GPA_PAGES as decoded: the input, the page count (the rep count) and
    the index to resume from."""

    input: UnmapDeviceGpaPagesInput
    rep_count: int
    rep_start: int = 0

    CODE: ClassVar[HvCallCode] = HvCallCode.UNMAP_DEVICE_GPA_PAGES

    def __post_init__(self) -> None:
        _check_reps(self.rep_count, self.rep_start)

    def pack(self) -> bytes:
        return self.input.pack()


# --------------------------------------------------------------------------------------------
# Registry and the strict decoder
# --------------------------------------------------------------------------------------------

HvSimpleInput = (
    CreateDeviceDomainInput
    | DeleteDeviceDomainInput
    | AttachDeviceDomainInput
    | DetachDeviceDomainInput
    | ConfigureDeviceDomainInput
    | FlushDeviceDomainInput
    | GetIommuCapabilitiesInput
    | GetLogicalDevicePropertyInput
)
HvRepRequest = FlushDeviceDomainListRequest | MapDeviceGpaPagesRequest | UnmapDeviceGpaPagesRequest
#: What :func:`decode_input` returns: the input struct of a simple call, a ``*Request`` of a rep call.
HvRequest = HvSimpleInput | HvRepRequest
HvOutput = GetIommuCapabilitiesOutput | GetLogicalDevicePropertyOutput

#: ``(fixed part, rep_count, rep_start, elements, strict_padding) -> request``
_Decoder = Callable[[bytes, int, int, bytes, bool], HvRequest]


@dataclass(frozen=True)
class CallSpec:
    """One row of the registry: what a generic raw-ABI dispatcher needs to know about a call.

    ``header_size`` is the fixed part's C size; ``rep_element_size`` is 0 for simple calls and
    for UNMAP (a rep call with no input elements)."""

    code: HvCallCode
    request_type: type[HvRequest]
    output_type: type[HvOutput] | None
    is_rep: bool
    header_size: int
    rep_element_size: int
    _decode: _Decoder = field(repr=False, compare=False)

    @property
    def padded_header_size(self) -> int:
        return (self.header_size + 7) & ~7


def _simple(cls: type[HvSimpleInput]) -> _Decoder:
    def decode(fixed: bytes, _count: int, _start: int, _elems: bytes, strict: bool) -> HvRequest:
        return cls.unpack(fixed, strict_padding=strict)

    return decode


def _decode_flush_list(fixed: bytes, count: int, start: int, elems: bytes, strict: bool) -> HvRequest:
    header = FlushDeviceDomainListHeader.unpack(fixed, strict_padding=strict)
    vas = tuple(FlushVa.from_u64(raw) for raw in struct.unpack(f"<{count}Q", elems))
    return FlushDeviceDomainListRequest(header, vas, start)


def _decode_map(fixed: bytes, count: int, start: int, elems: bytes, strict: bool) -> HvRequest:
    header = MapDeviceGpaPagesHeader.unpack(fixed, strict_padding=strict)
    return MapDeviceGpaPagesRequest(header, struct.unpack(f"<{count}Q", elems), start)


def _decode_unmap(fixed: bytes, count: int, start: int, _elems: bytes, strict: bool) -> HvRequest:
    return UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput.unpack(fixed, strict_padding=strict), count, start)


def _spec(
    cls: type[HvRequest],
    output: type[HvOutput] | None,
    header_size: int,
    rep_element_size: int,
    decode: _Decoder,
) -> CallSpec:
    code = cls.CODE
    return CallSpec(code, cls, output, code in REP_CALLS, header_size, rep_element_size, decode)


#: code -> :class:`CallSpec`, for every :class:`HvCallCode`.
CALLS: Mapping[HvCallCode, CallSpec] = MappingProxyType(
    {
        spec.code: spec
        for spec in (
            _spec(CreateDeviceDomainInput, None, 28, 0, _simple(CreateDeviceDomainInput)),
            _spec(DeleteDeviceDomainInput, None, 24, 0, _simple(DeleteDeviceDomainInput)),
            _spec(AttachDeviceDomainInput, None, 32, 0, _simple(AttachDeviceDomainInput)),
            _spec(DetachDeviceDomainInput, None, 16, 0, _simple(DetachDeviceDomainInput)),
            _spec(ConfigureDeviceDomainInput, None, 40, 0, _simple(ConfigureDeviceDomainInput)),
            _spec(FlushDeviceDomainInput, None, 32, 0, _simple(FlushDeviceDomainInput)),
            _spec(
                GetIommuCapabilitiesInput,
                GetIommuCapabilitiesOutput,
                16,
                0,
                _simple(GetIommuCapabilitiesInput),
            ),
            _spec(
                GetLogicalDevicePropertyInput,
                GetLogicalDevicePropertyOutput,
                24,
                0,
                _simple(GetLogicalDevicePropertyInput),
            ),
            _spec(FlushDeviceDomainListRequest, None, 32, FlushVa.SIZE, _decode_flush_list),
            _spec(MapDeviceGpaPagesRequest, None, 40, 8, _decode_map),
            _spec(UnmapDeviceGpaPagesRequest, None, 32, 0, _decode_unmap),
        )
    }
)


def call_spec(code: int) -> CallSpec:
    """The registry row for ``code``; HvError(INVALID_HYPERCALL_CODE) for an unknown code."""
    try:
        return CALLS[HvCallCode(code)]
    except ValueError:
        raise HvError(HvStatus.INVALID_HYPERCALL_CODE, f"hypercall code 0x{code:x} is not recognized") from None


def _bad_input(message: str) -> HvError:
    return HvError(HvStatus.INVALID_HYPERCALL_INPUT, message)


def decode_input(code: int, rep_count: int, rep_start: int, data: bytes, *, strict_padding: bool = False) -> HvRequest:
    """Decode the input block of call ``code`` into its typed request, or raise HvError.

    Checks, in order (statuses explained in the module docstring):

    1. ``code`` known, else INVALID_HYPERCALL_CODE;
    2. simple call: ``rep_count == rep_start == 0``; rep call: ``1 <= rep_count <= 4095`` and
       ``rep_start < rep_count``; else INVALID_HYPERCALL_INPUT;
    3. header + ``rep_count`` elements fit in one 4 KiB input page, else INVALID_ALIGNMENT;
    4. length: at least the structure (else INVALID_HYPERCALL_INPUT, truncated); at most the
       structure rounded up to 8 bytes for a simple call, exactly header + ``rep_count``
       elements for a rep call (else INVALID_HYPERCALL_INPUT, oversized);
    5. fields: non-zero reserved fields/bits -> INVALID_PARAMETER; non-zero padding is ignored
       (TLFS), or INVALID_PARAMETER when ``strict_padding``.
    """
    spec = call_spec(code)
    name = spec.code.name
    if not spec.is_rep:
        if rep_count != 0 or rep_start != 0:
            raise _bad_input(f"{name} is a simple call: rep count {rep_count}, rep start {rep_start}")
    else:
        if not 1 <= rep_count <= HV_MAX_REP_COUNT:
            raise _bad_input(f"{name} is a rep call: rep count {rep_count} outside 1..{HV_MAX_REP_COUNT}")
        if not 0 <= rep_start < rep_count:
            raise _bad_input(f"{name}: rep start {rep_start} is not smaller than rep count {rep_count}")
    elements_size = rep_count * spec.rep_element_size
    needed = spec.header_size + elements_size if spec.is_rep else spec.header_size
    allowed = spec.padded_header_size + elements_size
    if allowed > HV_HYP_PAGE_SIZE:
        raise HvError(
            HvStatus.INVALID_ALIGNMENT,
            f"{name}: {allowed} bytes of input for {rep_count} reps span more than one page",
        )
    if len(data) < needed:
        raise _bad_input(f"{name}: input truncated, {len(data)} bytes of {needed}")
    if len(data) > allowed:
        raise _bad_input(f"{name}: input has {len(data)} bytes, at most {allowed} allowed")
    fixed = data[: spec.header_size]
    tail_pad = data[spec.header_size : spec.padded_header_size] if not spec.is_rep else b""
    _padding(f"{name} trailing padding", tail_pad, strict_padding)
    elements = data[spec.header_size : spec.header_size + elements_size]
    return spec._decode(fixed, rep_count, rep_start, elements, strict_padding)


def decode_call(input_value: int, data: bytes, *, strict_padding: bool = False) -> HvRequest:
    """Decode a whole raw hypercall (the ``HvCall`` method's ``input_value`` and ``input``).

    Unknown code -> INVALID_HYPERCALL_CODE (checked first); reserved bits of the input value,
    the fast bit, a non-zero variable header size or the nested bit -> INVALID_HYPERCALL_INPUT;
    then :func:`decode_input`.
    """
    value = HypercallInput.decode(input_value)
    call_spec(value.call_code)
    if value.reserved:
        raise _bad_input(f"reserved bits 0x{value.reserved:x} of the hypercall input value are set")
    if value.fast:
        raise _bad_input("the fast (register) calling convention is not offered for this call")
    if value.variable_header_size:
        raise _bad_input(f"variable header size {value.variable_header_size}: this call has none")
    if value.nested:
        raise _bad_input("nested bit set: there is no L0 hypervisor behind this one")
    return decode_input(value.call_code, value.rep_count, value.rep_start, data, strict_padding=strict_padding)


def encode_request(request: HvRequest) -> tuple[HypercallInput, bytes]:
    """The guest side of :func:`decode_call`: the input value and the packed input block."""
    if isinstance(request, HvRepRequest):
        value = HypercallInput(request.CODE, rep_count=request.rep_count, rep_start=request.rep_start)
    else:
        value = HypercallInput(request.CODE)
    return value, request.pack()


def encode_output(code: int, output: HvOutput | None) -> bytes:
    """The packed output block of call ``code`` (empty for calls without output).

    ValueError if ``output`` is not the call's output type: a handler bug, not a guest error.
    """
    spec = call_spec(code)
    if spec.output_type is None:
        if output is not None:
            raise ValueError(f"{spec.code.name} has no output, got {type(output).__name__}")
        return b""
    if not isinstance(output, spec.output_type):
        raise ValueError(f"{spec.code.name} outputs {spec.output_type.__name__}, got {type(output).__name__}")
    return output.pack()


def decode_output(code: int, data: bytes) -> HvOutput | None:
    """The guest side of :func:`encode_output`; ValueError if ``data`` does not fit the layout."""
    spec = call_spec(code)
    if spec.output_type is None:
        if data:
            raise ValueError(f"{spec.code.name} has no output, got {len(data)} bytes")
        return None
    return spec.output_type.unpack(data)
