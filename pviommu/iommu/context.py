"""Per-device context entries in bank 0, modelled on the VT-d scalable-mode
PASID entry (reference vtd-nested.md section 3).

The hypervisor assigns each device a *slot* (a small index, < ``MAX_SLOTS``)
and writes one 64-byte entry at ``context_hpa(slot)``; the IOMMU unit reads
it on a context-cache miss. Real VT-d reaches the PASID entry through root,
context and PASID-directory tables; one flat table of PASID-entry-shaped
slots keeps the bits that matter (domain tag, roots, table formats) without
three more lookups that teach nothing about nesting.

Layout (little-endian u64 words; every bit not listed must be 0, else the
unit faults ``PASID_ENTRY_RESERVED``)::

    qw0  bit 0 P, bit 1 FPD, bits 4:2 AW (stage-2 width: 1 = 39-bit/3-level,
         2 = 48/4, 3 = 57/5), bits 8:6 PGTT (2 SS-only, 3 nested; 1 FS-only
         and 4 pass-through are refused as invalid), bits 63:12 SSPTPTR (HPA)
    qw1  bits 15:0 DID (the IOTLB tag)
    qw2  bits 3:2 FSPM (0 = 4-level, 1 = 5-level), bits 63:12 FSPTPTR (GPA)
    qw3-qw7  reserved

The hypervisor's software bookkeeping about a slot (its owner, the owner's
RAM bank that stage-2 output must land in, the ownership epoch) lives beside
the table, in the owner records of ``pviommu.iommu.owner``, never in these
hardware-shaped entries.

Modes the hypervisor writes (see the constructors):

* BLOCKED -- P=0: every request faults 0x59;
* IDENTITY -- translation disabled: PGTT=2 with the partition's stage-2
  root, so IOVA = GPA, still translated and checked by stage 2;
* NESTED -- PGTT=3: guest FS root (a GPA) over the partition's stage 2;
* S2_ONLY -- PGTT=2 with a domain-private IOVA -> HPA table built by map
  hypercalls (the emulated baseline the project compares against).

Ordering rule for writers: ``write_context`` writes qw0 (with P) last when
installing and first when clearing, so a concurrent reader never sees P=1
with half-written fields; changing a live entry means blocking it,
invalidating context cache and IOTLB, then installing the new one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pviommu.addr import Gpa, Hpa
from pviommu.mem.bank import HYPERVISOR_BANK, HostMemory, bank_base

CONTEXT_ENTRY_SIZE = 64
MAX_SLOTS = 256
#: Offset of the context table in bank 0; the hypervisor allocates its
#: stage-2 frames from ``CONTEXT_TABLE_END`` up.
CONTEXT_TABLE_OFFSET = 0
CONTEXT_TABLE_END = CONTEXT_TABLE_OFFSET + MAX_SLOTS * CONTEXT_ENTRY_SIZE

_WORDS = struct.Struct("<8Q")
_NO_HPA = Hpa(0)
_NO_GPA = Gpa(0)
_PTR_MASK = ((1 << 64) - 1) & ~0xFFF

#: AW encoding <-> stage-2 levels.
AW_LEVELS = {1: 3, 2: 4, 3: 5}
#: FSPM encoding <-> first-stage levels.
FSPM_LEVELS = {0: 4, 1: 5}


class Pgtt(IntEnum):
    """PASID Granular Translation Type."""

    FS_ONLY = 1
    SS_ONLY = 2
    NESTED = 3
    PASS_THROUGH = 4


QW0_VALID = 0x1 | 0x2 | (0x7 << 2) | (0x7 << 6) | _PTR_MASK
QW1_VALID = 0xFFFF
QW2_VALID = (0x3 << 2) | _PTR_MASK


@dataclass(frozen=True, slots=True)
class ContextEntry:
    """The decoded fields of one context entry (values as stored, unchecked)."""

    present: bool = False
    fpd: bool = False
    aw: int = 0
    pgtt: int = 0
    ssptptr: Hpa = _NO_HPA
    did: int = 0
    fspm: int = 0
    fsptptr: Gpa = _NO_GPA
    #: words with bits outside the layout (decode only; pack never sets them)
    reserved_bits: bool = False

    # -- constructors for the hypervisor's modes -------------------------------
    @classmethod
    def blocked(cls) -> ContextEntry:
        return cls()

    @classmethod
    def identity(cls, did: int, s2_root: Hpa, s2_levels: int) -> ContextEntry:
        return cls(True, False, _aw(s2_levels), Pgtt.SS_ONLY, s2_root, did)

    @classmethod
    def s2_only(cls, did: int, root: Hpa, levels: int) -> ContextEntry:
        return cls(True, False, _aw(levels), Pgtt.SS_ONLY, root, did)

    @classmethod
    def nested(cls, did: int, fs_root: Gpa, fs_levels: int, s2_root: Hpa, s2_levels: int) -> ContextEntry:
        fspm = {v: k for k, v in FSPM_LEVELS.items()}[fs_levels]
        return cls(True, False, _aw(s2_levels), Pgtt.NESTED, s2_root, did, fspm, fs_root)

    # -- derived ---------------------------------------------------------------
    @property
    def s2_levels(self) -> int | None:
        return AW_LEVELS.get(self.aw)

    @property
    def fs_levels(self) -> int | None:
        return FSPM_LEVELS.get(self.fspm)

    # -- bytes -----------------------------------------------------------------
    def pack(self) -> bytes:
        for name, value, bits in (
            ("aw", self.aw, 3), ("pgtt", self.pgtt, 3), ("did", self.did, 16),
            ("fspm", self.fspm, 2),
        ):  # fmt: skip
            if not 0 <= value < 1 << bits:
                raise ValueError(f"context field {name}={value:#x} does not fit {bits} bits")
        qw0 = int(self.present) | int(self.fpd) << 1 | self.aw << 2 | self.pgtt << 6
        qw0 |= self.ssptptr & _PTR_MASK
        qw2 = self.fspm << 2 | (self.fsptptr & _PTR_MASK)
        return _WORDS.pack(qw0, self.did, qw2, 0, 0, 0, 0, 0)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ContextEntry:
        qw = _WORDS.unpack(bytes(data))
        reserved = bool(
            qw[0] & ~QW0_VALID or qw[1] & ~QW1_VALID or qw[2] & ~QW2_VALID or any(qw[3:])
        )  # fmt: skip
        return cls(
            present=bool(qw[0] & 1),
            fpd=bool(qw[0] & 2),
            aw=(qw[0] >> 2) & 7,
            pgtt=(qw[0] >> 6) & 7,
            ssptptr=Hpa(qw[0] & _PTR_MASK),
            did=qw[1] & 0xFFFF,
            fspm=(qw[2] >> 2) & 3,
            fsptptr=Gpa(qw[2] & _PTR_MASK),
            reserved_bits=reserved,
        )


def _aw(levels: int) -> int:
    for aw, n in AW_LEVELS.items():
        if n == levels:
            return aw
    raise ValueError(f"stage 2 has 3, 4 or 5 levels, not {levels}")


def _check_slot(slot: int) -> None:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"device slot {slot} outside 0..{MAX_SLOTS - 1}")


def context_hpa(slot: int) -> Hpa:
    """Where slot ``slot``'s context entry lives (bank 0)."""
    _check_slot(slot)
    return Hpa(bank_base(HYPERVISOR_BANK) + CONTEXT_TABLE_OFFSET + slot * CONTEXT_ENTRY_SIZE)


def read_context(host: HostMemory, slot: int) -> ContextEntry:
    return ContextEntry.unpack(host.read(context_hpa(slot), CONTEXT_ENTRY_SIZE))


def write_context(host: HostMemory, slot: int, entry: ContextEntry) -> None:
    """Store ``entry`` with qw0 ordered as the module docstring says. The
    caller must then invalidate the slot's context cache (and the old
    domain's IOTLB entries) in every unit."""
    data = entry.pack()
    hpa = context_hpa(slot)
    if entry.present:
        host.write(Hpa(hpa + 8), data[8:])
        host.write(hpa, data[:8])
    else:
        host.write(hpa, data[:8])
        host.write(Hpa(hpa + 8), data[8:])
