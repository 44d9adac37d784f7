"""The in-process nested system the engine benchmarks measure (banks, partition 1's stage 2 in
bank 0 and its stage-1 table in its own RAM, owning one slot): one builder, so every engine row
measures the same shape and only says how its mappings differ."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pviommu.addr import SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.owner import OWNER_TABLE_END, OwnerRecord, write_owner
from pviommu.mem.bank import Bank, GuestRam, HostMemory
from pviommu.mem.frames import guest_frames, host_frames
from pviommu.pt.common import RW
from pviommu.pt.fmt import VtdSsFormat, X86_64Format
from pviommu.pt.walk import PageTable, stage1_table, stage2_table
from pviommu.units import MiB

#: the one guest partition: its id is also its bank's index
PARTITION = 1


@contextmanager
def scratch_host(prefix: str) -> Iterator[HostMemory]:
    """Host memory in a fresh folder (on /dev/shm when there is one), removed afterwards."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as directory:
        host = HostMemory(Path(directory))
        try:
            yield host
        finally:
            host.close()


@dataclass(frozen=True)
class World:
    """Partition 1's memory and tables."""

    host: HostMemory
    bank: Bank
    ram: GuestRam
    s1: PageTable[Iova, Gpa, Gpa]
    s2: PageTable[Gpa, Hpa, Hpa]

    def own(self, slot: int, domain_id: int) -> ContextEntry:
        """Partition 1 owns ``slot`` through a nested context entry of its tables (4 levels each)."""
        ctx = ContextEntry.nested(domain_id, self.s1.root, 4, self.s2.root, 4)
        write_owner(self.host, slot, OwnerRecord(epoch=1, partition_id=PARTITION, owner_bank=PARTITION))
        write_context(self.host, slot, ctx)
        return ctx


def nested_world(host: HostMemory, *, bank0_bytes: int = 16 * MiB, ram_bytes: int = 16 * MiB,
                 s2_4k_bytes: int = 0, s1_table_bytes: int = 2 * MiB) -> World:
    """Partition 1 with ``ram_bytes`` of RAM, all of it mapped by stage 2: the first ``s2_4k_bytes``
    with 4 KiB leaves (full-depth nested walks), the rest with the largest leaves (2 MiB, as the
    hypervisor builds). The stage-1 table takes its frames from the first ``s1_table_bytes`` of RAM."""
    bank0 = host.create_bank(0, bank0_bytes)
    bank = host.create_bank(PARTITION, ram_bytes)
    s2 = stage2_table(VtdSsFormat(4), host, host_frames(bank0, OWNER_TABLE_END, bank0_bytes - OWNER_TABLE_END))
    for gpa in range(0, s2_4k_bytes, SZ_4K):
        s2.map(Gpa(gpa), bank.hpa_of(gpa), SZ_4K, RW)
    if s2_4k_bytes < ram_bytes:
        s2.map(Gpa(s2_4k_bytes), bank.hpa_of(s2_4k_bytes), ram_bytes - s2_4k_bytes, RW)
    ram = GuestRam(bank)
    s1 = stage1_table(X86_64Format(4), ram, guest_frames(ram, 0, s1_table_bytes))
    return World(host, bank, ram, s1, s2)
