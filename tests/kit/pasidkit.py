"""A small scalable-mode system for the PASID proposal's suites: bank 0 with
PASID tables for two device slots, a partition's stage 2 and guest RAM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pviommu.addr import Gpa, Hpa, Iova
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.owner import OwnerRecord, write_owner
from pviommu.iommu.pasid import (
    SM_REGION_END,
    PasidTables,
)
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import Bank, GuestRam, HostMemory
from pviommu.mem.frames import FrameAllocator, guest_frames, host_frames
from pviommu.pt.common import RW
from pviommu.pt.fmt import VtdSsFormat, X86_64Format
from pviommu.pt.walk import PageTable, stage1_table, stage2_table

MiB = 1 << 20
SLOT_A, SLOT_B = 3, 130  # one in each half of bus 0's context tables (LP / UP)
DID = 9
IOVA = Iova(0x7F00_0000_0000)



@dataclass
class World:
    host: HostMemory
    bank0: Bank
    bank1: Bank
    ram: GuestRam
    s2: PageTable[Gpa, Hpa, Hpa]
    g_frames: FrameAllocator[Gpa]
    h_frames: FrameAllocator[Hpa]
    tables: PasidTables
    unit: IommuUnit

    def process_table(self) -> PageTable[Iova, Gpa, Gpa]:
        return stage1_table(X86_64Format(4), self.ram, self.g_frames)

    def nested(self, s1: PageTable[Iova, Gpa, Gpa], did: int = DID) -> ContextEntry:
        return ContextEntry.nested(did, s1.root, 4, self.s2.root, 4)

    def dma(self, slot: int, iova: int, pasid: int | None, write: bool = False) -> tuple[int | None, int | None]:
        """(HPA, None) or (None, fault reason)."""
        runs = self.unit.translate(slot, Iova(iova), 8, write, pasid)
        if runs.fault is not None:
            return None, runs.fault.reason
        return int(runs.runs[0].hpa), None


def build(tmp_path: Path, **unit_options: object) -> World:
    host = HostMemory(tmp_path)
    bank0 = host.create_bank(0, 8 * MiB)
    bank1 = host.create_bank(1, 16 * MiB)
    host.create_bank(2, 4 * MiB)
    frames = host_frames(bank0, 2 * MiB, 6 * MiB)
    assert SM_REGION_END <= 2 * MiB
    s2 = stage2_table(VtdSsFormat(4), host, frames)
    s2.map(Gpa(0), bank1.hpa_of(0), 16 * MiB, RW)
    ram = GuestRam(bank1)
    g_frames = guest_frames(ram, 0, 4 * MiB)
    tables = PasidTables(host, frames.alloc_table, frames.free_table)
    tables.enable()
    for slot in (SLOT_A, SLOT_B):
        write_owner(host, slot, OwnerRecord(epoch=1, partition_id=1, owner_bank=1))
        tables.add_device(slot)
    unit = IommuUnit(host, **unit_options)  # type: ignore[arg-type]
    return World(host, bank0, bank1, ram, s2, g_frames, frames, tables, unit)
