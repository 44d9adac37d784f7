"""How ``IommuUnit`` reads a slot's context entry with its owner record, and
why they (or a PASID entry) refuse translation: the checks it makes on every
entry it reads, in the order VT-d reports them, before it caches the entry.

A refusal is a ``ContextFault`` carrying the fault reason and its detail;
the unit turns it into a fault record (the request translates nothing).
"""

from __future__ import annotations

from pviommu.errors import PviommuError
from pviommu.iommu.context import AW_LEVELS, CONTEXT_ENTRY_SIZE, FSPM_LEVELS, ContextEntry, Pgtt, context_hpa
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.owner import OwnerRecord, OwnerTable
from pviommu.mem.bank import HostMemory


class ContextFault(Exception):
    """The context (or owner record) refuses translation for ``reason``."""

    def __init__(self, reason: FaultReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_context(host: HostMemory, owners: OwnerTable, slot: int) -> tuple[OwnerRecord, ContextEntry]:
    """The slot's owner record and context entry (unchecked), read under one
    ownership epoch: a change of owner while reading refuses the request."""
    try:
        record = owners.read(slot)
        raw = host.read(context_hpa(slot), CONTEXT_ENTRY_SIZE)
        moved = owners.epoch(slot) != record.epoch
    except PviommuError as exc:
        raise ContextFault(FaultReason.PASID_ENTRY_ACCESS, f"context of slot {slot}: {exc}") from exc
    if moved:  # the owner changed while we read: the next request reads again
        raise ContextFault(FaultReason.PASID_ENTRY_NOT_PRESENT, f"slot {slot}: ownership changing")
    return record, ContextEntry.unpack(raw)


def check_pasid_entry(slot: int, entry: ContextEntry, record: OwnerRecord) -> None:
    """A PASID entry is checked as a flat context entry is, owner first."""
    check_owner(slot, record)
    validate_context(slot, entry)


def check_owner(slot: int, record: OwnerRecord) -> None:
    """A slot with no owner, or quarantined, translates nothing whatever its
    context says (the owner record is the second fence behind the context)."""
    if not record.owned or record.owner_bank <= 0:
        why = "quarantined (not synchronised)" if record.quarantined else "assigned to no partition"
        raise ContextFault(FaultReason.PASID_ENTRY_NOT_PRESENT, f"slot {slot}: device {why}")


def validate_context(slot: int, ctx: ContextEntry) -> None:
    """The PASID-entry checks (VT-d 0x59-0x5B), in that order."""
    if not ctx.present:
        raise ContextFault(
            FaultReason.PASID_ENTRY_NOT_PRESENT, f"slot {slot}: context not present (blocked or unassigned)"
        )
    if ctx.reserved_bits:
        raise ContextFault(FaultReason.PASID_ENTRY_RESERVED, f"slot {slot}: reserved bits set in context")
    if ctx.pgtt not in (Pgtt.SS_ONLY, Pgtt.NESTED) or ctx.aw not in AW_LEVELS:
        raise ContextFault(FaultReason.PASID_ENTRY_INVALID, f"slot {slot}: unsupported PGTT {ctx.pgtt} or AW {ctx.aw}")
    if ctx.pgtt == Pgtt.NESTED and ctx.fspm not in FSPM_LEVELS:
        raise ContextFault(FaultReason.PASID_ENTRY_INVALID, f"slot {slot}: unsupported FSPM {ctx.fspm}")


__all__ = ["ContextFault", "check_owner", "check_pasid_entry", "read_context", "validate_context"]
