"""Page requests and IOMMU faults as SynIC messages: pviommu proposal, not in the series.

The message types are OpenVMM hvdef's (``X64IommuPrq`` 0x80010005, ``IommuFault``
0x80000024). The 256-byte frame follows the TLFS ``HV_MESSAGE``: a 16-byte header
(``u32 message_type``, ``u8 payload_size``, ``u8 message_flags``, ``u16 reserved``,
``u64 origination_id``) and 240 bytes of payload. **The payloads below are this project's
invention** (docs/proposal-sva.md); no public layout exists.

X64IommuPrq payload (32 bytes used)::

    +0   u64 logical_device_id
    +8   u64 request_id          answer it with ProcessIommuPrq (0x00C3)
    +16  u64 address             the faulting virtual address, page aligned
    +24  u32 pasid
    +28  u8  access              bit 0 read, bit 1 write
    +29  u8  flags               bit 0 last-in-group (always 1: one page per group), bit 1 PASID valid
    +30  u16 group_index         request_id & 0x1FF (PCIe's 9-bit PRG index, informative)

IommuFault payload (32 bytes used)::

    +0   u64 logical_device_id
    +8   u64 address
    +16  u32 pasid
    +20  u16 reason              the VT-d fault reason code
    +22  u8  access              bit 0 read, bit 1 write
    +23  u8  flags               bit 1 PASID valid
    +24  u64 reserved
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from pviommu.abi.hv.sva import SynicMessageType

MESSAGE_SIZE = 256
HEADER = struct.Struct("<IBBHQ")
PAYLOAD_OFFSET = HEADER.size
PAYLOAD_MAX = MESSAGE_SIZE - PAYLOAD_OFFSET
_PRQ = struct.Struct("<QQQIBBH")
_FAULT = struct.Struct("<QQIHBBQ")
ACCESS_READ, ACCESS_WRITE = 1, 2
FLAG_LAST, FLAG_PASID = 1, 2


def _frame(kind: SynicMessageType, payload: bytes, origin: int) -> bytes:
    return HEADER.pack(int(kind), len(payload), 0, 0, origin) + payload + bytes(PAYLOAD_MAX - len(payload))


def message_type(raw: bytes) -> int:
    return int(HEADER.unpack_from(raw)[0])


def _payload(raw: bytes, kind: SynicMessageType, size: int) -> bytes:
    if len(raw) != MESSAGE_SIZE:
        raise ValueError(f"a SynIC message is {MESSAGE_SIZE} bytes, got {len(raw)}")
    mtype, psize, _, _, _ = HEADER.unpack_from(raw)
    if mtype != kind or psize < size:
        raise ValueError(f"message type {mtype:#x} / payload {psize} is not {kind.name}")
    return raw[PAYLOAD_OFFSET:PAYLOAD_OFFSET + size]


@dataclass(frozen=True, slots=True)
class PageRequestMessage:
    logical_device_id: int
    request_id: int
    address: int
    pasid: int
    write: bool

    TYPE: ClassVar[SynicMessageType] = SynicMessageType.X64_IOMMU_PRQ

    def pack(self, origin: int = 0) -> bytes:
        access = ACCESS_WRITE if self.write else ACCESS_READ
        return _frame(self.TYPE, _PRQ.pack(self.logical_device_id, self.request_id, self.address & ~0xFFF,
                                           self.pasid, access, FLAG_LAST | FLAG_PASID, self.request_id & 0x1FF),
                      origin)

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        dev, rid, addr, pasid, access, _flags, _group = _PRQ.unpack(_payload(raw, cls.TYPE, _PRQ.size))
        return cls(dev, rid, addr, pasid, bool(access & ACCESS_WRITE))


@dataclass(frozen=True, slots=True)
class FaultMessage:
    logical_device_id: int
    address: int
    pasid: int
    reason: int
    write: bool

    TYPE: ClassVar[SynicMessageType] = SynicMessageType.IOMMU_FAULT

    def pack(self, origin: int = 0) -> bytes:
        access = ACCESS_WRITE if self.write else ACCESS_READ
        return _frame(self.TYPE, _FAULT.pack(self.logical_device_id, self.address, self.pasid, self.reason & 0xFFFF,
                                             access, FLAG_PASID, 0), origin)

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        dev, addr, pasid, reason, access, _flags, _ = _FAULT.unpack(_payload(raw, cls.TYPE, _FAULT.size))
        return cls(dev, addr, pasid, reason, bool(access & ACCESS_WRITE))
