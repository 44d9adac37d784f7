"""Fault reasons (VT-d scalable-mode FR codes) and fault records.

Codes are numbered as in the VT-d spec's scalable-mode fault table (reference
vtd-nested.md section 5) so a fault log reads like the hardware's FRCD.FR.

Blocked domains: a device in a blocked domain has a PASID entry with P=0,
exactly as Linux's intel blocking domain clears it, so it faults with
``PASID_ENTRY_NOT_PRESENT`` (0x59); an unassigned slot faults the same way
(the detail text says which). No code outside the spec is invented.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pviommu.addr import Iova
from pviommu.iommu.pasid import SmFault
from pviommu.mem.dma import DmaFault


class FaultReason(IntEnum):
    # PASID entry (our per-device context entry), VT-d 0x58-0x5B
    PASID_ENTRY_ACCESS = 0x58  #: the context entry could not be read
    PASID_ENTRY_NOT_PRESENT = 0x59  #: P=0: blocked domain or unassigned slot
    PASID_ENTRY_RESERVED = 0x5A  #: reserved bits set in the context entry
    PASID_ENTRY_INVALID = 0x5B  #: unsupported PGTT / AW / FSPM
    # first stage, VT-d 0x70-0x77
    FS_ACCESS = 0x70  #: an FS entry could not be read
    FS_NOT_PRESENT = 0x71  #: FS entry with P=0
    FS_RESERVED = 0x72  #: reserved bits set in an FS entry
    FS_TOP_ACCESS = 0x73  #: the FS root (FSPTPTR) entry could not be read
    FS_BEYOND_MGAW = 0x74  #: an FS entry's address exceeds the guest address width
    SS_NO_READ_FS_TOP = 0x75  #: stage 2 denies reading the FS root table
    SS_NO_READ_FS = 0x76  #: stage 2 denies reading an FS table
    SS_NO_WRITE_AD = 0x77  #: stage 2 denies the write that sets A/D in an FS entry
    # second stage, VT-d 0x78-0x7B
    SS_ACCESS = 0x78  #: an SS entry (or the output) names no host memory
    SS_NOT_PRESENT = 0x79  #: SS entry with R=W=0 (a hole in stage 2)
    SS_RESERVED = 0x7A  #: reserved bits set in an SS entry
    SS_BAD_ROOT = 0x7B  #: SSPTPTR names no memory of bank 0
    # request checks, VT-d 0x80-0x87
    NON_CANONICAL = 0x80  #: IOVA not in canonical form for the FS width
    USER_SUPERVISOR = 0x81  #: FS entry with U/S=0 (device requests are user)
    BEYOND_HW_MAX = 0x83  #: address beyond 64 bits / the input width
    SS_BEYOND_MAX = 0x84  #: GPA beyond the stage-2 width (AW)
    NO_WRITE = 0x85  #: write to a read-only mapping (either stage)
    NO_READ = 0x86  #: read of a mapping without read rights (stage 2)
    MSI_WINDOW = 0x87  #: output GPA in 0xFEEx_xxxx (interrupts are not DMA)


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One fault as the unit logs it (the FRCD of this model): who, where,
    which access, why, and a human-readable detail of the failing step."""

    slot: int
    did: int
    iova: Iova
    write: bool
    reason: FaultReason | SmFault
    detail: str = ""
    #: the request's PASID (proposal, not in the series); None = a request without PASID
    pasid: int | None = None

    def to_dma_fault(self) -> DmaFault:
        """The device-side view (``pviommu.mem.dma.DmaFault``)."""
        if self.pasid is None:
            return DmaFault(self.iova, self.write, int(self.reason), self.reason.name, self.detail)
        return DmaFault(self.iova, self.write, int(self.reason), self.reason.name, self.detail, pasid=self.pasid)
