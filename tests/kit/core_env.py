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

from pviommu.addr import SZ_2M, SZ_4K, Gpa
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.unit import IommuUnit
from pviommu.pt.common import RW, Perm
from pviommu.units import MiB
from tests.kit.nested import Nested, build_nested

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


@dataclass(kw_only=True)
class NestedSystem(Nested):
    unit: IommuUnit
    #: IommuUnit keyword arguments of ``unit`` and ``new_unit`` (``pscache=True``: the Python walk with its caches)
    unit_options: dict[str, Any] = field(default_factory=dict)

    def install(self, slot: int, entry: ContextEntry, owner_bank: int = 1, epoch: int = 1) -> None:
        """Write ``entry`` at ``slot`` with partition ``owner_bank`` (bank =
        partition id here) as the slot's owner; the unit forgets the slot."""
        super().install(slot, entry, owner_bank, epoch)
        self.unit.invalidate_context(slot)

    def nested_ctx(self, root: Gpa | None = None, did: int = DID) -> ContextEntry:
        return self.context(did, root)

    def new_unit(self) -> IommuUnit:
        self.unit = IommuUnit(self.host, **self.unit_options)
        return self.unit


def build_system(
    directory: Path, *, p1_ram: int = P1_RAM, p2_ram: int = P2_RAM, bank0_size: int = BANK0, **unit_options: Any
) -> NestedSystem:
    """The system above; smaller banks (p1_ram >= 14 MiB) make snapshots cheap;
    ``unit_options`` go to every ``IommuUnit`` it makes."""
    base = build_nested(directory, bank0=bank0_size, rams=(p1_ram, p2_ram), tables=GUEST_TABLES, mark=p2_ram // 64)
    s2, hpa = base.s2, base.hpa
    for gpa in range(0, SMALL_END, SZ_4K):  # 4K leaves: full-depth walks
        s2.map(Gpa(gpa), hpa(gpa), SZ_4K, RW)
    s2.map(Gpa(RO[0]), hpa(RO[0]), SZ_2M, Perm.READ)
    s2.map(Gpa(RO[1]), hpa(RO[1]), p1_ram - RO[1], RW)
    system = NestedSystem.extend(base, unit=IommuUnit(base.host, **unit_options), unit_options=unit_options)
    system.install(SLOT, system.nested_ctx())
    return system


def u64s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)
