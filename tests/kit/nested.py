"""The one in-process nested translation system of the tests: host memory with
bank 0 (context and owner tables, then stage-2 table frames) and a bank per
partition, a stage 2 in bank 0 for partition 1, a guest stage-1 table in
partition 1's RAM, context entries with their owner records, and the pieces a
device service puts on top (its own mapping of the banks, an ``IommuUnit``, a
``DsaDevice`` whose DMA goes through it).

The kits give it their memory plans and keep their specialities: core_env (a
hole and a read-only range, one unit), native_env (random rights, hostile
bytes), pasid_env (scalable-mode tables). Kits over the hypervisor service
(dsarig, racekit, hvkit's ``HvEnv.guest_device``, inspectkit) let it build
stage 2 and contexts and take only the guest's side (``guest_tables``) and the
device's (``unit_side``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dma_device.dsa import DsaDevice
from pviommu.addr import Gpa, Hpa, Iova
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.owner import OWNER_TABLE_END, OwnerRecord, write_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import Bank, GuestRam, HostMemory
from pviommu.mem.dma import DmaMemory, DmaTranslator
from pviommu.mem.frames import FrameAllocator, guest_frames, host_frames
from pviommu.pt.common import RW
from pviommu.pt.fmt import VtdSsFormat, X86_64Format
from pviommu.pt.walk import PageTable, stage1_table, stage2_table

N = TypeVar("N", bound="Nested")


# -- the guest's side ----------------------------------------------------------------------
@dataclass
class GuestTables:
    """A guest's CPU view of its RAM, the frames its stage-1 tables come from,
    and its first table."""

    ram: GuestRam
    frames: FrameAllocator[Gpa]
    s1: PageTable[Iova, Gpa, Gpa]
    levels: int = 4

    def new_table(self) -> PageTable[Iova, Gpa, Gpa]:
        """Another (process's or domain's) table from the same frames."""
        return stage1_table(X86_64Format(self.levels), self.ram, self.frames)


def guest_tables(memory: Bank | GuestRam, tables: tuple[int, int], levels: int = 4) -> GuestTables:
    """A guest table of ``levels`` (4 or 5) with its frames in GPAs ``[tables[0], tables[1])``."""
    ram = memory if isinstance(memory, GuestRam) else GuestRam(memory)
    frames = guest_frames(ram, tables[0], tables[1] - tables[0])
    return GuestTables(ram, frames, stage1_table(X86_64Format(levels), ram, frames), levels)


# -- the device's side ---------------------------------------------------------------------
@dataclass
class UnitSide:
    """What a device service builds over the host's bank files: its own
    mapping of them and its unit, and a device whose DMA goes through it."""

    memory: HostMemory
    unit: IommuUnit

    def dsa(self, slot: int, *args: Any, wrap: Callable[[DmaTranslator], DmaTranslator] | None = None,
            device: type[DsaDevice] = DsaDevice, **kwargs: Any) -> DsaDevice:
        """A ``device`` (a DsaDevice by default) for ``slot``; ``wrap`` sits between it and the unit."""
        return dsa_on(self.memory, self.unit.bind(slot) if wrap is None else wrap(self.unit.bind(slot)),
                      *args, device=device, **kwargs)


def unit_side(directory: Path, **unit_options: Any) -> UnitSide:
    memory = HostMemory(directory)
    return UnitSide(memory, IommuUnit(memory, **unit_options))


def dsa_on(memory: HostMemory, translator: DmaTranslator, *args: Any, device: type[DsaDevice] = DsaDevice,
           **kwargs: Any) -> DsaDevice:
    """A device whose every DMA is translated by ``translator`` (a unit's ``bind(slot)``)."""
    return device(DmaMemory(memory, translator), *args, **kwargs)


# -- the whole system, in process ----------------------------------------------------------
@dataclass(kw_only=True)
class Nested:
    """Banks, partition 1's stage 2 and guest table; what callers install in
    the context and owner tables is theirs (``install``)."""

    host: HostMemory
    banks: list[Bank]
    ram: GuestRam
    s2_frames: FrameAllocator[Hpa]
    s2: PageTable[Gpa, Hpa, Hpa]
    g_frames: FrameAllocator[Gpa]
    s1: PageTable[Iova, Gpa, Gpa]
    s2_levels: int = 4
    fs_levels: int = 4

    @classmethod
    def extend(cls: type[N], base: Nested, **more: Any) -> N:
        """``base``'s system as a ``cls`` with ``more`` fields (a kit's own)."""
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Nested)}, **more)

    @property
    def bank0(self) -> Bank:
        return self.banks[0]

    @property
    def bank1(self) -> Bank:
        return self.banks[1]

    @property
    def bank2(self) -> Bank:
        return self.banks[2]

    def hpa(self, gpa: int) -> Hpa:
        """Where partition 1's ``gpa`` is in host memory."""
        return self.banks[1].hpa_of(gpa)

    def context(self, did: int, root: Gpa | None = None) -> ContextEntry:
        """A nested entry: guest table ``root`` (default: ``s1``'s) over partition 1's stage 2."""
        return ContextEntry.nested(did, self.s1.root if root is None else root, self.fs_levels, self.s2.root,
                                   self.s2_levels)

    def identity(self, did: int) -> ContextEntry:
        """A stage-2-only entry over partition 1's stage 2."""
        return ContextEntry.identity(did, self.s2.root, self.s2_levels)

    def own(self, slot: int, owner_bank: int = 1, epoch: int = 1) -> None:
        """The slot's owner record: partition ``owner_bank`` (partition id = bank index here)."""
        write_owner(self.host, slot, OwnerRecord(epoch=epoch, partition_id=owner_bank, owner_bank=owner_bank))

    def install(self, slot: int, entry: ContextEntry, owner_bank: int = 1, epoch: int = 1) -> None:
        """What the hypervisor writes for a unit: the slot's owner record, then its context entry."""
        self.own(slot, owner_bank, epoch)
        write_context(self.host, slot, entry)

    def domain(self, index: int, tables: tuple[int, int]) -> tuple[GuestTables, PageTable[Gpa, Hpa, Hpa]]:
        """Partition ``index``'s own translation: a guest table in its bank over a
        stage 2 (from the same bank-0 frames) that maps the whole bank read-write."""
        bank = self.banks[index]
        s2 = stage2_table(VtdSsFormat(self.s2_levels), self.host, self.s2_frames)
        s2.map(Gpa(0), bank.hpa_of(0), bank.size, RW)
        return guest_tables(bank, tables, self.fs_levels), s2

    def snapshot(self) -> list[bytes]:
        return [bytes(b.view) for b in self.banks]

    def restore(self, snap: list[bytes]) -> None:
        for bank, data in zip(self.banks, snap, strict=True):
            bank.view[:] = data

    def close(self) -> None:
        self.host.close()


def build_nested(directory: Path, *, bank0: int, rams: Sequence[int], tables: tuple[int, int],
                 s2_levels: int = 4, fs_levels: int = 4, s2_frames: tuple[int, int] | None = None,
                 mark: int = 0) -> Nested:
    """Bank 0 of ``bank0`` bytes and a bank per entry of ``rams`` (bank 1 is
    partition 1's RAM); an empty stage 2 of ``s2_levels`` with frames at
    ``s2_frames`` of bank 0 (default: all after the owner table); a guest
    table of ``fs_levels`` with frames at GPAs ``tables``. The first ``mark``
    bytes of every other partition's bank get a pattern, to prove they are
    never touched. The stage 2 maps nothing: that is the caller's plan."""
    host = HostMemory(directory)
    banks = [host.create_bank(0, bank0), *(host.create_bank(i, size) for i, size in enumerate(rams, 1))]
    for other in banks[2:] if mark else ():
        other.write(0, bytes(range(256)) * (min(mark, other.size) // 256))
    lo, hi = s2_frames or (OWNER_TABLE_END, bank0)
    frames = host_frames(banks[0], lo, hi - lo)
    s2 = stage2_table(VtdSsFormat(s2_levels), host, frames)
    guest = guest_tables(banks[1], tables, fs_levels)
    return Nested(host=host, banks=banks, ram=guest.ram, s2_frames=frames, s2=s2, g_frames=guest.frames,
                  s1=guest.s1, s2_levels=s2_levels, fs_levels=fs_levels)
