"""Rep calls: headers, elements and the requests that carry rep count and start.

A request's rep count and start are checked by its constructor (INVALID_HYPERCALL_INPUT, as the raw
decoder answers), so no caller re-checks them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from pviommu.abi.hv._checks import _U32, _check_uint, _exact, _padding, _reserved
from pviommu.abi.hv.codes import HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT, HvCallCode, MapFlags
from pviommu.abi.hv.inputs import DeviceDomain, HvInputVtl
from pviommu.abi.hv.values import check_reps
from pviommu.addr import Iova

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

    @classmethod
    def from_flags(cls, device_domain: DeviceDomain, flags: int) -> Self:
        """The header from its ``u32 flags`` word; an undefined bit is INVALID_PARAMETER."""
        _check_uint("flush_list.flags", flags, 32)
        _reserved("flush_list.flags", flags, ~HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT & _U32)
        return cls(device_domain, iommu_format=bool(flags & HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT))

    @property
    def flags(self) -> int:
        return HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT if self.iommu_format else 0

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<II", self.flags, 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("flush_device_domain_list header", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf, strict_padding, "flush_list.device_domain")
        flags, reserved = struct.unpack_from("<II", buf, 24)
        header = cls.from_flags(dd, flags)
        _reserved("flush_list.reserved", reserved, _U32)
        return header


_MAP_TAIL = struct.Struct("<B3sIQ")


@dataclass(frozen=True)
class MapDeviceGpaPagesHeader:
    """``hv_input_map_device_gpa_pages`` fixed part (40 B): device_domain @0, ``hv_input_vtl
    target_vtl`` @24, ``u8 padding[3]`` @25, ``u32 map_flags`` @28 (:class:`MapFlags` bits), ``u64
    target_device_va_base`` @32; then ``rep_count`` u64 GPA page numbers. ``map_flags`` is the raw
    word: a bit :class:`MapFlags` does not define is INVALID_PARAMETER, whoever builds the header."""

    device_domain: DeviceDomain
    map_flags: int
    target_device_va_base: Iova
    target_vtl: HvInputVtl = field(default_factory=HvInputVtl)

    SIZE: ClassVar[int] = 40

    def __post_init__(self) -> None:
        _check_uint("map_flags", int(self.map_flags), 32)
        _reserved("map.map_flags", int(self.map_flags), ~int(MapFlags.READABLE | MapFlags.WRITABLE) & _U32)
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
        return cls(
            device_domain=dd,
            map_flags=flags,
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


@dataclass(frozen=True)
class FlushDeviceDomainListRequest:
    """HVCALL_FLUSH_DEVICE_DOMAIN_LIST as decoded: the header, all ``rep_count`` elements (the
    input holds the whole list also when resuming) and the index to resume from."""

    header: FlushDeviceDomainListHeader
    flush_vas: tuple[FlushVa, ...]
    rep_start: int = 0

    CODE: ClassVar[HvCallCode] = HvCallCode.FLUSH_DEVICE_DOMAIN_LIST

    def __post_init__(self) -> None:
        check_reps(self.CODE.name, len(self.flush_vas), self.rep_start)

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
        check_reps(self.CODE.name, len(self.gpa_page_list), self.rep_start)
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
        check_reps(self.CODE.name, self.rep_count, self.rep_start)

    def pack(self) -> bytes:
        return self.input.pack()
