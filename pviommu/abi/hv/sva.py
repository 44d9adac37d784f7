"""PASID / SVA / page-request hypercalls: pviommu proposal, not in the series.

No revision of the series defines these (docs/proposal-sva.md has the reasoning, the packed
layouts and the statuses). Public facts reused: Hyper-V's public headers name call code 0x00C3
``ProcessIommuPrq`` (here: the page-group response); OpenVMM's hvdef names the SynIC message
types ``IommuFault`` 0x80000024 and ``X64IommuPrq`` 0x80010005 (here: how faults and page
requests reach the guest). Every layout below, and the codes 0x7F01/0x7F02, are this project's
invention. The hypervisor decodes them only with ``--proposal-sva``; without it they are
unknown codes (HV_STATUS_INVALID_HYPERCALL_CODE), exactly as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar, Self

from pviommu.abi.hv._checks import _check_uint, _exact, _padding, _reserved
from pviommu.abi.hv.codes import HV_HYP_PAGE_SIZE
from pviommu.abi.hv.ids import HvDeviceId
from pviommu.abi.hv.inputs import DeviceDomain
from pviommu.abi.hv.values import HypercallInput
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError

#: PASIDs are 20 bits (PCIe); the capability answer's ``max_pasid_width`` says how many a partition has.
PASID_WIDTH = 20


class SvaCallCode(IntEnum):
    """Proposal call codes (only decoded when the hypervisor runs ``--proposal-sva``)."""

    #: Hyper-V's public name and code; the input below is pviommu's.
    PROCESS_IOMMU_PRQ = 0x00C3
    #: pviommu's own codes, outside every range the public headers use.
    ATTACH_DEVICE_PASID = 0x7F01
    DETACH_DEVICE_PASID = 0x7F02


class PrqResponse(IntEnum):
    """Page-group response codes (the PCIe PRG response codes)."""

    SUCCESS = 0x0
    INVALID = 0x1
    FAILURE = 0xF


class SynicMessageType(IntEnum):
    """SynIC message types from OpenVMM's hvdef (payload layouts: pviommu's, see ``pviommu.abi.prq``)."""

    IOMMU_FAULT = 0x8000_0024
    X64_IOMMU_PRQ = 0x8001_0005


def _pasid(what: str, value: int) -> None:
    _check_uint(what, value, 32)


@dataclass(frozen=True)
class AttachDevicePasidInput:
    """Attach device domain ``device_domain`` (an S1 domain: its stage-1 root is what the PASID's
    requests walk, e.g. a process's CPU page table) to (``device_id``, ``pasid``). 40 B:
    ``hv_input_device_domain device_domain`` @0 (24 B, as in AttachDeviceDomain),
    ``hv_device_id device_id`` @24, ``u32 pasid`` @32, ``u32 reserved`` @36 (zero)."""

    device_domain: DeviceDomain
    device_id: HvDeviceId
    pasid: int

    CODE: ClassVar[SvaCallCode] = SvaCallCode.ATTACH_DEVICE_PASID
    SIZE: ClassVar[int] = 40

    def __post_init__(self) -> None:
        _pasid("pasid", self.pasid)

    def pack(self) -> bytes:
        return self.device_domain.pack() + struct.pack("<QII", self.device_id.to_u64(), self.pasid, 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("attach_device_pasid", buf, cls.SIZE)
        dd = DeviceDomain._decode(buf[:DeviceDomain.SIZE], strict_padding, "attach_pasid.device_domain")
        dev, pasid, reserved = struct.unpack_from("<QII", buf, DeviceDomain.SIZE)
        _reserved("attach_device_pasid.reserved", reserved, 0xFFFF_FFFF)
        return cls(dd, HvDeviceId.from_u64(dev), pasid)


@dataclass(frozen=True)
class DetachDevicePasidInput:
    """Detach whatever domain (``device_id``, ``pasid``) is attached to; the PASID's requests
    then fault (PASID entry not present). 24 B: ``u64 partition_id`` @0, ``hv_device_id
    device_id`` @8, ``u32 pasid`` @16, ``u32 reserved`` @20 (zero)."""

    partition_id: int
    device_id: HvDeviceId
    pasid: int

    CODE: ClassVar[SvaCallCode] = SvaCallCode.DETACH_DEVICE_PASID
    SIZE: ClassVar[int] = 24

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)
        _pasid("pasid", self.pasid)

    def pack(self) -> bytes:
        return struct.pack("<QQII", self.partition_id, self.device_id.to_u64(), self.pasid, 0)

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("detach_device_pasid", buf, cls.SIZE)
        part, dev, pasid, reserved = struct.unpack("<QQII", buf)
        _reserved("detach_device_pasid.reserved", reserved, 0xFFFF_FFFF)
        return cls(part, HvDeviceId.from_u64(dev), pasid)


@dataclass(frozen=True)
class ProcessIommuPrqInput:
    """The page-group response to one page request (X64IommuPrq message). 32 B:
    ``u64 partition_id`` @0, ``hv_device_id device_id`` @8, ``u64 request_id`` @16 (from the
    message), ``u32 pasid`` @24 (the request's), ``u8 response_code`` @28 (``PrqResponse``),
    ``u8 reserved[3]`` @29 (zero)."""

    partition_id: int
    device_id: HvDeviceId
    request_id: int
    pasid: int
    response: PrqResponse

    CODE: ClassVar[SvaCallCode] = SvaCallCode.PROCESS_IOMMU_PRQ
    SIZE: ClassVar[int] = 32

    def __post_init__(self) -> None:
        _check_uint("partition_id", self.partition_id, 64)
        _check_uint("request_id", self.request_id, 64)
        _pasid("pasid", self.pasid)

    def pack(self) -> bytes:
        return struct.pack("<QQQIB3x", self.partition_id, self.device_id.to_u64(), self.request_id, self.pasid,
                           int(self.response))

    @classmethod
    def unpack(cls, buf: bytes, *, strict_padding: bool = False) -> Self:
        _exact("process_iommu_prq", buf, cls.SIZE)
        part, dev, rid, pasid, code = struct.unpack_from("<QQQIB", buf)
        _reserved("process_iommu_prq.reserved", int.from_bytes(buf[29:32], "little"), 0xFF_FFFF)
        try:
            response = PrqResponse(code)
        except ValueError:
            raise HvError(HvStatus.INVALID_PARAMETER,
                          f"page-group response code {code:#x} is not 0 (success), 1 (invalid) or 0xF (failure)"
                          ) from None
        return cls(part, HvDeviceId.from_u64(dev), rid, pasid, response)


SvaInput = AttachDevicePasidInput | DetachDevicePasidInput | ProcessIommuPrqInput

#: code -> input layout: the proposal's registry (the hypervisor consults it only when the option is on)
SVA_CALLS: Mapping[SvaCallCode, type[SvaInput]] = MappingProxyType({
    SvaCallCode.PROCESS_IOMMU_PRQ: ProcessIommuPrqInput,
    SvaCallCode.ATTACH_DEVICE_PASID: AttachDevicePasidInput,
    SvaCallCode.DETACH_DEVICE_PASID: DetachDevicePasidInput,
})


def is_sva_code(code: int) -> bool:
    return any(code == c for c in SVA_CALLS)


def decode_sva_call(input_value: int, data: bytes, *, strict_padding: bool = False) -> SvaInput:
    """A raw proposal hypercall, checked as ``hv.decode_call`` checks a simple call."""
    value = HypercallInput.decode(input_value)
    try:
        code = SvaCallCode(value.call_code)
    except ValueError:
        raise HvError(HvStatus.INVALID_HYPERCALL_CODE,
                      f"hypercall code 0x{value.call_code:x} is not recognized") from None
    cls: type[SvaInput] = SVA_CALLS[code]
    name = code.name
    bad: Callable[[str], HvError] = lambda m: HvError(HvStatus.INVALID_HYPERCALL_INPUT, f"{name}: {m}")  # noqa: E731
    if value.reserved or value.fast or value.variable_header_size or value.nested:
        raise bad("reserved bits, fast, variable header or nested set in the input value")
    if value.rep_count or value.rep_start:
        raise bad(f"a simple call: rep count {value.rep_count}, rep start {value.rep_start}")
    if len(data) > HV_HYP_PAGE_SIZE:
        raise HvError(HvStatus.INVALID_ALIGNMENT, f"{name}: input spans more than one page")
    if len(data) < cls.SIZE:
        raise bad(f"input truncated, {len(data)} bytes of {cls.SIZE}")
    if len(data) > (cls.SIZE + 7) & ~7:
        raise bad(f"input has {len(data)} bytes, at most {(cls.SIZE + 7) & ~7} allowed")
    _padding(f"{name} trailing padding", data[cls.SIZE:], strict_padding)
    return cls.unpack(data[:cls.SIZE], strict_padding=strict_padding)


def encode_sva_request(request: SvaInput) -> tuple[HypercallInput, bytes]:
    return HypercallInput(int(request.CODE)), request.pack()
