"""A small host for the PASID tests (SVA proposal, not in the series): bank 0 with the
scalable-mode structures (``PasidTables``) and a stage 2 for partition 1 (bank 1), two
devices with PASID directories, and a unit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pviommu.addr import Gpa, Hpa, Iova
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.pasid import SM_REGION_END, PasidTables
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import RW
from pviommu.pt.fmt import X86_64Format
from pviommu.pt.walk import PageTable, stage1_table
from pviommu.units import MiB
from tests.kit.nested import Nested, build_nested

SLOT_A, SLOT_B = 3, 130  # one in each half of bus 0's context tables (LP / UP)
DID = 9
IOVA = Iova(0x7F00_0000_0000)


@dataclass(kw_only=True)
class World(Nested):
    tables: PasidTables
    unit: IommuUnit

    @property
    def h_frames(self) -> FrameAllocator[Hpa]:
        """Bank 0's frames after the scalable-mode region: stage 2 and the PASID tables share them."""
        return self.s2_frames

    def process_table(self) -> PageTable[Iova, Gpa, Gpa]:
        return stage1_table(X86_64Format(self.fs_levels), self.ram, self.g_frames)

    def nested(self, s1: PageTable[Iova, Gpa, Gpa], did: int = DID) -> ContextEntry:
        return self.context(did, s1.root)

    def dma(self, slot: int, iova: int, pasid: int | None, write: bool = False) -> tuple[int | None, int | None]:
        """(HPA, None) or (None, fault reason)."""
        runs = self.unit.translate(slot, Iova(iova), 8, write, pasid)
        if runs.fault is not None:
            return None, runs.fault.reason
        return int(runs.runs[0].hpa), None


def build(tmp_path: Path, **unit_options: object) -> World:
    assert SM_REGION_END <= 2 * MiB
    base = build_nested(tmp_path, bank0=8 * MiB, rams=(16 * MiB, 4 * MiB), tables=(0, 4 * MiB),
                        s2_frames=(2 * MiB, 8 * MiB))
    base.s2.map(Gpa(0), base.hpa(0), 16 * MiB, RW)
    frames = base.s2_frames
    tables = PasidTables(base.host, frames.alloc_table, frames.free_table)
    tables.enable()
    for slot in (SLOT_A, SLOT_B):
        base.own(slot)
        tables.add_device(slot)
    unit = IommuUnit(base.host, **unit_options)  # type: ignore[arg-type]
    return World.extend(base, tables=tables, unit=unit)
