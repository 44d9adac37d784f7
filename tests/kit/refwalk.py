"""An independent reference walker for the isolation fuzz suites (tests/robustness, fuzz/).

Deliberately plain x86-64-over-stage-2 walking written from the Intel SDM / VT-d rules
(not from ``pviommu.iommu.nested``), composed with the partition's stage 2 through the
hypervisor's own ``PageTable.lookup``: it says, page by page, what the unit must answer
and which bytes of the guest's RAM a step may change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hypervisor_svc.core.model import Partition
from pviommu.addr import PAGE_SIZE, Gpa, Hpa
from pviommu.mem.bank import HostMemory, bank_base
from pviommu.pt.common import Perm

PAGE = PAGE_SIZE

# x86-64 paging-structure entry bits (Intel SDM vol. 3 4.5, VT-d 3.6 first stage)
_P, _RW, _US, _A, _D, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_ADDR = ((1 << 52) - 1) & ~0xFFF
#: the unit's first-stage output width (MGAW 48): bits 51:48 of an address are reserved
_FS_OA_BITS = 48
_RSVD_ADDR = ((1 << 52) - 1) & ~((1 << _FS_OA_BITS) - 1)
#: XD (bit 63) means execute-disable only under NXE, which no context entry here enables: reserved (SDM 4.5)
_XD = 1 << 63
_RSVD_2M = ((1 << 21) - 1) & ~((1 << 13) - 1)
_RSVD_1G = ((1 << 30) - 1) & ~((1 << 13) - 1)
_MSI_FIRST, _MSI_LAST = 0xFEE0_0000, 0xFEEF_FFFF
_S2_WIDTH = 48

#: the accessed and dirty bits: the only bits of an entry the unit itself may set
AD = _A | _D


@dataclass
class RefPage:
    """What one 4 KiB page of a DMA must do: ``hpa`` (page start) or a fault."""

    hpa: int | None
    why: str
    #: HPAs of u64 entries whose A (and D) bits the unit may set on this walk
    ad_entries: list[int] = field(default_factory=list)
    #: HPAs of the table pages this walk read
    tables: list[int] = field(default_factory=list)


@dataclass
class RefRange:
    """The reference answer for ``translate(iova, length, write)``."""

    runs: list[tuple[int, int]]
    faulted: bool
    ad_entries: list[int]
    tables: list[int]

    @property
    def done(self) -> int:
        return sum(n for _, n in self.runs)


def coalesce(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for hpa, n in pieces:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == hpa:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((hpa, n))
    return out


class RefWalker:
    """Nested walk of one partition's domain: x86-64 stage 1 (4 or 5 levels,
    rooted at a GPA) over the hypervisor's stage 2 (``Partition.stage2.lookup``)."""

    def __init__(self, memory: HostMemory, part: Partition, root: int, levels: int = 4) -> None:
        self.memory = memory
        self.part = part
        self.root = root
        self.levels = levels
        self.bank_lo = int(bank_base(part.bank.index))
        self.bank_hi = self.bank_lo + part.memory_bytes

    def s2(self, gpa: int) -> tuple[int, bool, bool] | None:
        """(HPA, readable, writable) of ``gpa`` by the partition's stage 2."""
        if gpa < 0 or gpa >> _S2_WIDTH:
            return None
        tr = self.part.stage2.lookup(Gpa(gpa))
        if tr is None:
            return None
        hpa = int(tr.oa)
        # what the hypervisor built must stay inside the partition's bank
        assert self.bank_lo <= hpa < self.bank_hi, f"stage 2 maps GPA {gpa:#x} to {hpa:#x} outside the bank"
        return hpa, bool(tr.perm & Perm.READ), bool(tr.perm & Perm.WRITE)

    def canonical(self, iova: int) -> bool:
        width = 12 + 9 * self.levels
        top = iova >> (width - 1)
        return top == 0 or top == (1 << (64 - width + 1)) - 1

    def page(self, iova: int, write: bool) -> RefPage:
        out = RefPage(None, "")
        if not self.canonical(iova):
            out.why = "non-canonical"
            return out
        table = self.root
        gpa = -1
        for level in range(self.levels - 1, -1, -1):
            s = self.s2(table)
            if s is None or not s[1]:
                out.why = f"table GPA {table:#x} not readable through stage 2"
                return out
            table_hpa, _, table_w = s
            out.tables.append(table_hpa)
            slot = table_hpa + ((iova >> (12 + 9 * level)) & 511) * 8
            entry = self.memory.read_u64(Hpa(slot))
            if not entry & _P:
                out.why = f"P=0 at level {level}"
                return out
            if not entry & _US:
                out.why = f"supervisor entry at level {level}"
                return out
            if write and not entry & _RW:
                out.why = f"read-only entry at level {level}"
                return out
            leaf = level == 0 or (level <= 2 and bool(entry & _PS))
            reserved = _RSVD_ADDR | _XD
            if not leaf and level >= 3:
                reserved |= _PS
            if leaf and level == 1:
                reserved |= _RSVD_2M
            if leaf and level == 2:
                reserved |= _RSVD_1G
            if entry & reserved:
                out.why = f"reserved bits at level {level}"
                return out
            need = _A | (_D if leaf and write else 0)
            if entry & need != need:
                if not table_w:
                    out.why = f"A/D update denied by stage 2 at level {level}"
                    return out
                out.ad_entries.append(slot)
            if leaf:
                shift = 12 + 9 * level
                gpa = (entry & _ADDR & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1))
                break
            table = entry & _ADDR
        page_gpa = gpa & ~0xFFF
        if _MSI_FIRST <= page_gpa <= _MSI_LAST:
            out.why = "MSI window"
            return out
        s = self.s2(page_gpa)
        if s is None:
            out.why = f"GPA {page_gpa:#x} not backed"
            return out
        if (write and not s[2]) or (not write and not s[1]):
            out.why = f"stage 2 denies {'write' if write else 'read'} of GPA {page_gpa:#x}"
            return out
        out.hpa = s[0]
        return out

    def translate(self, iova: int, length: int, write: bool) -> RefRange:
        res = RefRange([], False, [], [])
        if length <= 0:
            return res
        if iova < 0 or iova + length > 1 << 64:
            res.faulted = True
            return res
        pos, end = iova, iova + length
        pieces: list[tuple[int, int]] = []
        while pos < end:
            p = self.page(pos & ~0xFFF, write)
            res.ad_entries += p.ad_entries
            res.tables += p.tables
            if p.hpa is None:
                res.faulted = True
                break
            n = min(end, (pos & ~0xFFF) + PAGE) - pos
            pieces.append((p.hpa + (pos & 0xFFF), n))
            pos += n
        res.runs = coalesce(pieces)
        return res

