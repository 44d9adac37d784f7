"""A small nested system for the core tests: host memory with bank 0 (context
table + stage-2 tables) and two partition banks, a stage 2 for partition 1
with a hole and a read-only range, and a guest stage-1 table in its RAM.

Partition 1's GPA map (64 MiB of RAM in bank 1)::

    [0, 8M)    RW, 4 KiB stage-2 leaves   (guest tables in [0, 4M), data above)
    [8M, 10M)  hole (stage 2 maps nothing)
    [10M, 12M) read-only (one 2 MiB leaf)
    [12M, 64M) RW, 2 MiB leaves
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pviommu.addr import SZ_2M, SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.owner import OWNER_TABLE_END, OwnerRecord, write_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import Bank, GuestRam, HostMemory
from pviommu.mem.frames import FrameAllocator, guest_frames, host_frames
from pviommu.pt.common import RW, Perm
from pviommu.pt.fmt import VtdSsFormat, X86_64Format
from pviommu.pt.walk import PageTable, stage1_table, stage2_table
from pviommu.units import MiB

P1_RAM = 64 * MiB
P2_RAM = 16 * MiB
BANK0 = 16 * MiB
SMALL_END = 8 * MiB
HOLE = (8 * MiB, 10 * MiB)
RO = (10 * MiB, 12 * MiB)
GUEST_TABLES = (0, 4 * MiB)
DATA = 4 * MiB  # first data GPA in the 4K region
DID = 7
SLOT = 3


@dataclass
class NestedSystem:
    host: HostMemory
    bank0: Bank
    bank1: Bank
    bank2: Bank
    ram: GuestRam
    s2_frames: FrameAllocator[Hpa]
    s2: PageTable[Gpa, Hpa, Hpa]
    g_frames: FrameAllocator[Gpa]
    s1: PageTable[Iova, Gpa, Gpa]
    unit: IommuUnit
    #: IommuUnit keyword arguments of ``unit`` and ``new_unit`` (``pscache=True``: the Python walk with its caches)
    unit_options: dict[str, Any] = field(default_factory=dict)

    def hpa(self, gpa: int) -> Hpa:
        return self.bank1.hpa_of(gpa)

    def install(self, slot: int, entry: ContextEntry, owner_bank: int = 1) -> None:
        """Write ``entry`` at ``slot`` with partition ``owner_bank`` (bank =
        partition id here) as the slot's owner."""
        write_owner(self.host, slot, OwnerRecord(epoch=1, partition_id=owner_bank, owner_bank=owner_bank))
        write_context(self.host, slot, entry)
        self.unit.invalidate_context(slot)

    def nested_ctx(self, root: Gpa | None = None, did: int = DID) -> ContextEntry:
        return ContextEntry.nested(did, self.s1.root if root is None else root, 4, self.s2.root, 4)

    def new_unit(self) -> IommuUnit:
        self.unit = IommuUnit(self.host, **self.unit_options)
        return self.unit


def build_system(
    directory: Path, *, p1_ram: int = P1_RAM, p2_ram: int = P2_RAM, bank0_size: int = BANK0, **unit_options: Any
) -> NestedSystem:
    """The system above; smaller banks (p1_ram >= 14 MiB) make snapshots cheap;
    ``unit_options`` go to every ``IommuUnit`` it makes."""
    host = HostMemory(directory)
    bank0 = host.create_bank(0, bank0_size)
    bank1 = host.create_bank(1, p1_ram)
    bank2 = host.create_bank(2, p2_ram)
    # something recognisable in partition 2, to prove it is never touched
    bank2.write(0, bytes(range(256)) * (p2_ram // 256 // 64))
    s2_frames = host_frames(bank0, OWNER_TABLE_END, bank0_size - OWNER_TABLE_END)
    s2 = stage2_table(VtdSsFormat(4), host, s2_frames)
    for gpa in range(0, SMALL_END, SZ_4K):  # 4K leaves: full-depth walks
        s2.map(Gpa(gpa), bank1.hpa_of(gpa), SZ_4K, RW)
    s2.map(Gpa(RO[0]), bank1.hpa_of(RO[0]), SZ_2M, Perm.READ)
    s2.map(Gpa(RO[1]), bank1.hpa_of(RO[1]), p1_ram - RO[1], RW)
    ram = GuestRam(bank1)
    g_frames = guest_frames(ram, GUEST_TABLES[0], GUEST_TABLES[1] - GUEST_TABLES[0])
    s1 = stage1_table(X86_64Format(4), ram, g_frames)
    system = NestedSystem(host, bank0, bank1, bank2, ram, s2_frames, s2, g_frames, s1,
                          IommuUnit(host, **unit_options), unit_options)
    system.install(SLOT, system.nested_ctx())
    return system


def u64s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)
