"""Bank 0: the hypervisor's stage-2 tables and device context entries.

Each partition gets a VT-d second-stage table (GPA -> HPA) mapping its RAM
bank with the largest leaves that fit, leaving MMIO holes unbacked and
read-only ranges without W. The emulated baseline design gets, per S2
domain, a private IOVA -> HPA table filled one page per map hypercall.
All of it is built with the shared ``pviommu.pt`` code in bank 0, where the
devices' IOMMU units walk it straight from shared memory.
"""

from __future__ import annotations

import threading

from pviommu.abi.hv_status import HvStatus
from pviommu.addr import PAGE_SIZE, SZ_2M, Gpa, Hpa, Iova, align_up
from pviommu.errors import HvError, OutOfFrames
from pviommu.iommu.context import CONTEXT_ENTRY_SIZE, ContextEntry, context_hpa, write_context
from pviommu.iommu.owner import OWNER_TABLE_END
from pviommu.mem.bank import Bank, HostMemory
from pviommu.mem.frames import FrameAllocator, host_frames
from pviommu.pt.common import Perm
from pviommu.pt.fmt.vtd_ss import VtdSsFormat
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable, direct_table, stage2_table
from pviommu.shm.invq import QUEUE_REGION_END

#: Stage-2 levels: 4 (48-bit GPA), VT-d AW = 2.
S2_LEVELS = 4

Stage2 = PageTable[Gpa, Hpa, Hpa]
Baseline = PageTable[Iova, Hpa, Hpa]


def _segments(size: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[0, size)`` minus ``cuts``, as sorted (start, length) pieces."""
    pieces, pos = [], 0
    for start, length in sorted(cuts):
        if start > pos:
            pieces.append((pos, start - pos))
        pos = max(pos, start + length)
    if pos < size:
        pieces.append((pos, size - pos))
    return pieces


class TableQuotaExceeded(OutOfFrames):
    """A partition asked for more bank-0 table frames than its quota (INSUFFICIENT_MEMORY)."""


class PartitionFrames:
    """One partition's share of bank 0's table frames: at most ``quota`` held at
    once, so no guest can make the hypervisor's table memory grow without
    bound (its baseline map hypercalls build tables here). Frames come back
    when a table page is freed, a domain deleted or the partition destroyed.
    Callers hold the partition's lock; the counter has its own anyway."""

    def __init__(self, frames: FrameAllocator[Hpa], quota: int, owner: str) -> None:
        self._frames = frames
        self.quota = quota
        self.owner = owner
        self.used = 0
        self._lock = threading.Lock()

    def alloc_table(self) -> Hpa:
        with self._lock:
            if self.used >= self.quota:
                raise TableQuotaExceeded(f"{self.owner} holds {self.used} hypervisor table frames, its quota "
                                         f"(--table-quota {self.quota})")
            self.used += 1
        try:
            return self._frames.alloc_table()
        except BaseException:
            with self._lock:
                self.used -= 1
            raise

    def free_table(self, addr: Hpa) -> None:
        self._frames.free_table(addr)
        with self._lock:
            self.used -= 1


class HostTables:
    def __init__(self, memory: HostMemory, bank0: Bank) -> None:
        self.memory = memory
        # bank 0: context table, owner records, then the invalidation queues, then table frames
        first = max(SZ_2M, align_up(max(OWNER_TABLE_END, QUEUE_REGION_END), SZ_2M))
        self.frames = host_frames(bank0, first, bank0.size - first)
        self.fmt = VtdSsFormat(levels=S2_LEVELS)

    def partition_frames(self, quota: int, owner: str) -> PartitionFrames:
        return PartitionFrames(self.frames, quota, owner)

    def build_partition_stage2(self, bank: Bank, memory_bytes: int, holes: list[tuple[int, int]],
                               read_only: list[tuple[int, int]], frames: PartitionFrames) -> Stage2:
        try:
            table = stage2_table(self.fmt, self.memory, frames)
        except OutOfFrames as exc:
            raise HvError(HvStatus.INSUFFICIENT_MEMORY, f"stage 2 of {frames.owner}: {exc}") from exc
        try:
            for start, length in _segments(memory_bytes, holes):
                # read-only sub-ranges without W, the rest R/W
                ro = [(max(s, start), min(s + n, start + length) - max(s, start)) for s, n in read_only
                      if s < start + length and start < s + n]
                for piece_start, piece_len in _segments(start + length, [(0, start), *ro]):
                    table.map(Gpa(piece_start), bank.hpa_of(piece_start), piece_len, Perm.READ | Perm.WRITE)
                for s, n in ro:
                    table.map(Gpa(s), bank.hpa_of(s), n, Perm.READ)
        except OutOfFrames as exc:
            table.destroy()
            raise HvError(HvStatus.INSUFFICIENT_MEMORY, f"stage 2 of {frames.owner}: {exc}") from exc
        except Exception:
            table.destroy()
            raise
        return table

    def new_baseline_table(self, frames: PartitionFrames) -> Baseline:
        return direct_table(self.fmt, self.memory, frames)

    def map_baseline(self, table: Baseline, stage2: Stage2, iova: Iova, gpa: Gpa,
                     readable: bool, writable: bool) -> None:
        tr = stage2.lookup(gpa)
        if tr is None:
            raise HvError(HvStatus.INVALID_PARAMETER, f"GPA {gpa:#x} is not backed")
        perm = (Perm.READ if readable else Perm.NONE) | (Perm.WRITE if writable else Perm.NONE)
        try:
            table.map(iova, Hpa(tr.oa), PAGE_SIZE, perm)
        except Exception as exc:
            raise HvError(getattr(exc, "hv_status", HvStatus.INVALID_PARAMETER), str(exc)) from exc

    def unmap_baseline(self, table: Baseline, iova: Iova, length: int) -> tuple[int, IotlbGather[Hpa]]:
        gather: IotlbGather[Hpa] = IotlbGather()
        try:
            done = table.unmap(iova, length, gather)
        except Exception as exc:
            raise HvError(getattr(exc, "hv_status", HvStatus.INVALID_PARAMETER), str(exc)) from exc
        return done, gather

    @staticmethod
    def free_gathered(frames: PartitionFrames, gather: IotlbGather[Hpa]) -> None:
        for frame in gather.freelist:
            frames.free_table(frame)
        gather.reset()

    @staticmethod
    def root_of(table: Stage2 | Baseline) -> Hpa:
        return table.root

    @staticmethod
    def table_pages(table: Stage2 | Baseline) -> int:
        return table.table_pages

    @staticmethod
    def free_table(table: Stage2 | Baseline) -> None:
        table.destroy()

    def write_context(self, slot: int, entry: ContextEntry) -> None:
        write_context(self.memory, slot, entry)

    def read_context_raw(self, slot: int) -> bytes:
        return self.memory.read(context_hpa(slot), CONTEXT_ENTRY_SIZE)

    def write_context_raw(self, slot: int, raw: bytes) -> None:
        """Put back an entry read with ``read_context_raw`` (same write order)."""
        write_context(self.memory, slot, ContextEntry.unpack(raw))

    def allocated_frames(self) -> int:
        return self.frames.allocated_frames
