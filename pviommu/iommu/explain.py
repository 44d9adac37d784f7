"""What one translation looked at (``IommuUnit.explain``), grouped for
``pviommu inspect``, and how the unit finds it: the same checks, in the same
order, and the same walk as ``IommuUnit.translate``, as a dry run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pviommu.addr import Iova
from pviommu.errors import PviommuError
from pviommu.iommu.checks import ContextFault, check_owner, validate_context
from pviommu.iommu.context import CONTEXT_ENTRY_SIZE, ContextEntry, Pgtt, context_hpa
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.iotlb import IotlbEntry
from pviommu.iommu.nested import ExplainStep, WalkFault, WalkOk
from pviommu.iommu.pasid import PasidStep
from pviommu.iommu.pasid_unit import PasidExplain
from pviommu.pt.fmt.x86_64 import X86_64Format

if TYPE_CHECKING:
    from pviommu.iommu.unit import IommuUnit

_FS_FORMAT = X86_64Format(4)  # table_oa is the same for 4 and 5 levels


@dataclass(frozen=True, slots=True)
class ExplainLevel:
    """One stage-1 level of a nested walk: the stage-2 walk of its table
    pointer (``s2``), then the stage-1 entry read (``s1``; None when the
    stage-2 sub-walk or its checks faulted before the entry could be read)."""

    level: int
    table_gpa: int
    s2: list[ExplainStep]
    s1: ExplainStep | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Everything one translation looked at, for ``pviommu inspect``."""

    slot: int
    iova: Iova
    write: bool
    context: ContextEntry | None
    cached: IotlbEntry | None
    steps: list[ExplainStep]
    result: WalkOk | WalkFault
    #: the request's PASID (proposal, not in the series; None = without PASID)
    pasid: int | None = None
    #: the scalable-mode structures read to reach the PASID entry
    pasid_steps: list[PasidStep] = field(default_factory=list)

    def levels(self) -> tuple[list[ExplainLevel], list[ExplainStep]]:
        """``steps`` grouped: the stage-1 levels (each with the stage-2 walk of
        its table), and the final stage-2 walk of the output GPA (or of the
        IOVA itself without stage 1). Stage-2 steps after a TABLE entry (or
        before any entry) belong to the next level's table; after a leaf, to
        the data page."""
        nested = self.context is not None and self.context.pgtt == Pgtt.NESTED
        levels: list[ExplainLevel] = []
        pending: list[ExplainStep] = []
        next_level = (self.context.fs_levels or 4) - 1 if nested and self.context is not None else -1
        next_table = int(self.context.fsptptr) if nested and self.context is not None else 0
        last_s1: ExplainStep | None = None
        for step in self.steps:
            if step.stage == "S2":
                pending.append(step)
            elif step.stage == "S1":
                levels.append(ExplainLevel(step.level, step.table, pending, step))
                pending, last_s1 = [], step
                next_level, next_table = step.level - 1, _next_table(step)
        if nested and pending and (last_s1 is None or last_s1.note == "TABLE"):
            levels.append(ExplainLevel(next_level, next_table, pending, None))
            pending = []
        return levels, pending


def _next_table(step: ExplainStep) -> int:
    """GPA of the next-level table a stage-1 TABLE entry points to."""
    return _FS_FORMAT.table_oa(step.entry)


FAULT_CODES = frozenset(int(r) for r in FaultReason)


def pasid_explanation(slot: int, iova: Iova, write: bool, pasid: int, got: PasidExplain) -> Explanation:
    result: WalkOk | WalkFault
    if got.result is not None:
        result = got.result
    else:
        assert got.refused is not None
        code, name, detail = got.refused
        # The walk result type carries FaultReason; SM-structure refusals keep their code in the detail.
        reason = FaultReason(code) if code in FAULT_CODES else FaultReason.PASID_ENTRY_ACCESS
        result = WalkFault(reason, f"{name} ({code:#x}): {detail}", 0)
    return Explanation(slot, iova, write, got.entry, got.cached, got.walk, result, pasid, got.steps)


def explain_request(unit: IommuUnit, slot: int, iova: Iova, write: bool, pasid: int | None) -> Explanation:
    """``IommuUnit.explain``: the slot's owner record and context read afresh."""
    if pasid:
        return pasid_explanation(slot, iova, write, pasid, unit.pasid_path.explain(slot, pasid, iova, write))
    try:
        record = unit.owners.read(slot)
        ctx = ContextEntry.unpack(unit.host.read(context_hpa(slot), CONTEXT_ENTRY_SIZE))
    except (PviommuError, ValueError) as exc:
        return Explanation(slot, iova, write, None, None, [],
                           WalkFault(FaultReason.PASID_ENTRY_ACCESS, str(exc), 0))
    try:
        check_owner(slot, record)
    except ContextFault as exc:
        if ctx.present:
            return Explanation(slot, iova, write, ctx, None, [], WalkFault(exc.reason, exc.detail, 0))
    return unit.explain_context(ctx, iova, write, record.owner_bank, slot)


def explain_in_context(unit: IommuUnit, ctx: ContextEntry, iova: Iova, write: bool, owner_bank: int,
                       slot: int) -> Explanation:
    """``IommuUnit.explain_context``: ``ctx`` checked, then a dry-run walk."""
    steps: list[ExplainStep] = []
    if iova < 0 or iova >= 1 << 64:
        return Explanation(slot, iova, write, ctx, None, steps,
                           WalkFault(FaultReason.BEYOND_HW_MAX, f"IOVA {iova:#x} beyond 64 bits", 0))
    try:
        validate_context(slot, ctx)
    except ContextFault as exc:
        return Explanation(slot, iova, write, ctx, None, steps, WalkFault(exc.reason, exc.detail, 0))
    cached = unit.iotlb.lookup(ctx.did, int(iova), write, count=False)
    result = unit.walker.walk(ctx, iova, write, steps, owner_bank=owner_bank, dry_run=True)
    return Explanation(slot, iova, write, ctx, cached, steps, result)


__all__ = ["FAULT_CODES", "ExplainLevel", "Explanation", "explain_in_context", "explain_request", "pasid_explanation"]
