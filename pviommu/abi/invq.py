"""The invalidation queue's packed layouts: the per-unit queue page in bank 0
and its 128-bit descriptors (VT-d 6.5.2 queued invalidation, plus two
descriptors this model adds), decoded into typed queue items.

Queue page (one per device slot, at ``QUEUE_REGION_OFFSET + slot * QUEUE_PAGE``
in bank 0)::

    +0     u64 tail      written by the hypervisor: next descriptor index
    +8     u64 head      written by the unit: descriptors consumed
    +16    u64 status    the last invalidation-wait status data the unit wrote
    +24    u64 ready     READY_MAGIC while a unit serves the queue
    +64    char[256]     the unit's doorbell socket path (NUL-padded)
    +320   char[256]     the hypervisor's acknowledgement socket path
    +1024  RING_ENTRIES x 16-byte descriptors (a ring)

Descriptors (qw0 bits 3:0 = type):

* 1 context-cache invalidation: G bits 5:4 (1 global, 3 device), SID bits 47:32 (the slot);
* 2 IOTLB invalidation: G bits 5:4 (1 global, 2 domain, 3 page), DID bits 31:16;
  qw1: AM bits 5:0, ADDR bits 63:12;
* 5 invalidation wait: SW bit 5, status data bits 63:32; qw1: status address (HPA);
* 6 PASID-based IOTLB invalidation (pviommu proposal, not in the series; VT-d's
  layout): G bits 5:4 (2 every entry of the PASID, 3 page-selective within it),
  DID bits 31:16, PASID bits 51:32; qw1: AM bits 5:0, ADDR bits 63:12;
* 7 PASID-cache invalidation (proposal; VT-d's layout): G bits 5:4 (0 every
  PASID entry of the DID, 1 one PASID of it, 3 global), DID bits 31:16, PASID bits 51:32;
* 9 page group response (VT-d's type, pviommu's fields): response code bits 63:60
  (0 success, 1 invalid request, 0xF failure), SID bits 47:32; qw1: the 64-bit
  page-request id the unit gave the request (VT-d carries a 9-bit group index);
* 0xF ownership fence (pviommu's own, no VT-d equivalent): qw1 the slot's
  ownership epoch the hypervisor just published; the device ends every session
  and in-flight descriptor of any other epoch before it consumes the next
  descriptor (so a following wait acknowledges the fence).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pviommu.addr import SZ_4K, Hpa, Iova, align_down, is_aligned

# -- the queue page --------------------------------------------------------------------
QUEUE_REGION_OFFSET = 64 * 1024
QUEUE_PAGE = 4096
TAIL_OFFSET = 0
HEAD_OFFSET = 8
STATUS_OFFSET = 16
READY_OFFSET = 24
DOORBELL_PATH_OFFSET = 64
ACK_PATH_OFFSET = 320
PATH_FIELD = 256
RING_OFFSET = 1024
DESC_SIZE = 16
RING_ENTRIES = (QUEUE_PAGE - RING_OFFSET) // DESC_SIZE
READY_MAGIC = 0x5156_4950_5649_4F4D  # "MOIVPIVQ"

_DESC = struct.Struct("<QQ")
_IOVA_ZERO = Iova(0)


class DescType(IntEnum):
    CONTEXT = 1
    IOTLB = 2
    WAIT = 5
    P_IOTLB = 6
    PASID_CACHE = 7
    PAGE_RESPONSE = 9
    OWNER_FENCE = 0xF


class Scope(IntEnum):
    """What an invalidation drops in a unit."""

    GLOBAL = 0  # every IOTLB and paging-structure entry
    DOMAIN = 1  # every entry of one DID
    PAGES = 2  # 2**am pages of one DID from addr
    CONTEXT = 3  # one slot's cached context (all slots when slot is None)


class InvalidationTarget(Protocol):
    """What an IOMMU unit offers the queue (``pviommu.iommu.unit.IommuUnit``)."""

    def invalidate_all(self) -> int: ...

    def invalidate_domain(self, did: int) -> int: ...

    def invalidate_pages(self, did: int, addr: Iova, am: int) -> int: ...

    def invalidate_context(self, slot: int | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One invalidation, in the granularities of the VT-d descriptors."""

    scope: Scope
    did: int = 0
    addr: Iova = _IOVA_ZERO
    am: int = 0
    slot: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.did <= 0xFFFF:
            raise ValueError(f"DID {self.did:#x} does not fit 16 bits")
        if not 0 <= self.am <= _AM_MAX or not is_aligned(self.addr, SZ_4K) or not 0 <= self.addr < 1 << 64:
            raise ValueError(f"page invalidation {self.addr:#x}/{self.am} is not a 4 KiB aligned block")

    @classmethod
    def everything(cls) -> Invalidation:
        return cls(Scope.GLOBAL)

    @classmethod
    def domain(cls, did: int) -> Invalidation:
        return cls(Scope.DOMAIN, did)

    @classmethod
    def pages(cls, did: int, addr: Iova, am: int) -> Invalidation:
        return cls(Scope.PAGES, did, addr, am)

    @classmethod
    def context(cls, slot: int | None) -> Invalidation:
        return cls(Scope.CONTEXT, slot=slot)

    def apply(self, unit: InvalidationTarget) -> int | None:
        """Do it in ``unit``: the IOTLB entries it dropped (None for a context
        invalidation, which drops cached contexts and walks, not entries)."""
        if self.scope is Scope.GLOBAL:
            return unit.invalidate_all()
        if self.scope is Scope.DOMAIN:
            return unit.invalidate_domain(self.did)
        if self.scope is Scope.PAGES:
            return unit.invalidate_pages(self.did, self.addr, self.am)
        unit.invalidate_context(self.slot)
        return None


class PasidInvalidationTarget(Protocol):
    def invalidate_pasid(self, did: int, pasid: int, addr: int | None = None, am: int = 0) -> int: ...

    def invalidate_pasid_cache(self, did: int | None = None, pasid: int | None = None) -> int: ...


@dataclass(frozen=True, slots=True)
class PasidInvalidation:
    """Proposal, not in the series: a PASID-based IOTLB invalidation (``cache``
    False: every entry of (DID, PASID), or ``2**am`` pages from ``addr``) or a
    PASID-cache invalidation (``cache`` True: entries of ``did``, of one
    ``pasid`` if given; ``did`` None = global)."""

    cache: bool
    did: int | None
    pasid: int | None
    addr: int | None = None
    am: int = 0

    def __post_init__(self) -> None:
        if self.did is not None and not 0 <= self.did <= 0xFFFF:
            raise ValueError(f"DID {self.did:#x} does not fit 16 bits")
        if self.pasid is not None and not 0 <= self.pasid < 1 << 20:
            raise ValueError(f"PASID {self.pasid:#x} does not fit 20 bits")
        if not self.cache and (self.did is None or self.pasid is None):
            raise ValueError("a PASID-based IOTLB invalidation names one DID and one PASID")
        if self.cache and self.did is None and self.pasid is not None:
            raise ValueError("a PASID-selective PASID-cache invalidation names its DID")
        if self.addr is not None and (self.addr & 0xFFF or not 0 <= self.am <= 52 or not 0 <= self.addr < 1 << 64):
            raise ValueError(f"page invalidation {self.addr:#x}/{self.am} is not a 4 KiB aligned block")

    def apply(self, unit: PasidInvalidationTarget) -> None:
        if self.cache:
            unit.invalidate_pasid_cache(self.did, self.pasid)
        else:
            assert self.did is not None and self.pasid is not None
            unit.invalidate_pasid(self.did, self.pasid, self.addr, self.am)


@dataclass(frozen=True, slots=True)
class OwnerFence:
    """End everything of every ownership epoch but ``epoch`` (see module doc)."""

    epoch: int


class PageResponseCode(IntEnum):
    SUCCESS = 0
    INVALID = 1
    FAILURE = 0xF


@dataclass(frozen=True, slots=True)
class PageResponse:
    """The answer to one page request (block-on-fault)."""

    slot: int
    request_id: int
    code: PageResponseCode


@dataclass(frozen=True, slots=True)
class Wait:
    """Invalidation wait: write ``data`` at ``status_hpa`` once everything before is done."""

    data: int
    status_hpa: Hpa


QueueItem = Invalidation | OwnerFence | PageResponse | PasidInvalidation

_G_GLOBAL, _G_DOMAIN, _G_PAGE, _G_DEVICE = 1, 2, 3, 3
# descriptor fields (bit positions as in the module docstring)
_TYPE_MASK = 0xF
_G_SHIFT, _G_MASK = 4, 3
_WAIT_SW = 1 << 5
_DID_SHIFT, _SID_SHIFT, _DATA_SHIFT, _RESP_SHIFT = 16, 32, 32, 60
_U16, _U32 = 0xFFFF, 0xFFFF_FFFF
_AM_MASK = 0x3F
_AM_MAX = 52


def encode(item: QueueItem | Wait) -> tuple[int, int]:
    """The two quadwords of ``item``'s descriptor."""
    if isinstance(item, Invalidation):
        if item.scope is Scope.CONTEXT:
            if item.slot is None:
                return DescType.CONTEXT | _G_GLOBAL << _G_SHIFT, 0
            return DescType.CONTEXT | _G_DEVICE << _G_SHIFT | (item.slot & _U16) << _SID_SHIFT, 0
        g = {Scope.GLOBAL: _G_GLOBAL, Scope.DOMAIN: _G_DOMAIN, Scope.PAGES: _G_PAGE}[item.scope]
        return DescType.IOTLB | g << _G_SHIFT | item.did << _DID_SHIFT, item.am | item.addr
    if isinstance(item, Wait):
        return DescType.WAIT | _WAIT_SW | (item.data & _U32) << _DATA_SHIFT, item.status_hpa
    if isinstance(item, PasidInvalidation):
        pasid = (item.pasid or 0) << 32 | (item.did or 0) << 16
        if item.cache:
            g = 3 if item.did is None else (0 if item.pasid is None else 1)
            return DescType.PASID_CACHE | g << 4 | pasid, 0
        if item.addr is None:
            return DescType.P_IOTLB | 2 << 4 | pasid, 0
        return DescType.P_IOTLB | 3 << 4 | pasid, item.am | item.addr
    if isinstance(item, PageResponse):
        return (DescType.PAGE_RESPONSE | (item.slot & _U16) << _SID_SHIFT | int(item.code) << _RESP_SHIFT,
                item.request_id)
    return DescType.OWNER_FENCE, item.epoch


def decode(qw0: int, qw1: int) -> QueueItem | Wait:
    """The item a descriptor carries; ValueError for one this model does not know."""
    kind, g = qw0 & _TYPE_MASK, (qw0 >> _G_SHIFT) & _G_MASK
    if kind == DescType.CONTEXT:
        return Invalidation.context(None if g == _G_GLOBAL else (qw0 >> _SID_SHIFT) & _U16)
    if kind == DescType.IOTLB:
        did = (qw0 >> _DID_SHIFT) & _U16
        if g == _G_GLOBAL:
            return Invalidation.everything()
        if g == _G_DOMAIN:
            return Invalidation.domain(did)
        if g == _G_PAGE:
            return Invalidation.pages(did, Iova(align_down(qw1, SZ_4K)), qw1 & _AM_MASK)
    elif kind == DescType.WAIT:
        return Wait(qw0 >> _DATA_SHIFT, Hpa(qw1))
    elif kind == DescType.P_IOTLB and g in (2, 3):
        did, pasid = (qw0 >> 16) & 0xFFFF, (qw0 >> 32) & 0xFFFFF
        if g == 2:
            return PasidInvalidation(False, did, pasid)
        return PasidInvalidation(False, did, pasid, qw1 & ~0xFFF, qw1 & 0x3F)
    elif kind == DescType.PASID_CACHE and g in (0, 1, 3):
        did, pasid = (qw0 >> 16) & 0xFFFF, (qw0 >> 32) & 0xFFFFF
        return PasidInvalidation(True, None if g == 3 else did, pasid if g == 1 else None)
    elif kind == DescType.PAGE_RESPONSE:
        return PageResponse((qw0 >> _SID_SHIFT) & _U16, qw1, PageResponseCode(qw0 >> _RESP_SHIFT))
    elif kind == DescType.OWNER_FENCE:
        return OwnerFence(qw1)
    raise ValueError(f"unknown invalidation descriptor {qw0:#018x} {qw1:#018x}")


def pack(item: QueueItem | Wait) -> bytes:
    return _DESC.pack(*encode(item))


def unpack(raw: bytes | bytearray | memoryview) -> QueueItem | Wait:
    return decode(*_DESC.unpack(raw))
