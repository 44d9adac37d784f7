"""The two-dimensional walk, written once (VT-d 3.8, nested translation).

Stage 1 (the guest's x86-64 tables, IOVA -> GPA) is walked level by level,
but every stage-1 table address -- the FS root and each entry's next-table
pointer -- is a GPA, so it is first translated through stage 2 (the
hypervisor's VT-d SS tables, GPA -> HPA) before the entry is read; finally
the output GPA goes through stage 2 too. With n FS levels over m SS levels
and nothing cached that is (n + 1) * (m + 1) - 1 entry reads: 24 for 4 over 4.
Contexts without stage 1 (PGTT=2: identity or a private IOVA -> HPA table)
run only the final stage-2 walk, with the IOVA as its input.

Checks, in the order QEMU's vtd_iova_to_flpte applies them per FS level:
the stage-2 sub-walk of the table page (its faults are SS faults; a table
page stage 2 does not let us read faults 0x75 at the root, 0x76 below),
P=0 (0x71), U/S=0 (0x81: device requests are user requests), write through
R/W=0 (0x85), reserved bits (0x72), then the Accessed bit -- and Dirty on a
leaf for writes -- set only if clear, which needs stage-2 write access to the
table page (0x77). Stage 2 ANDs R/W across its levels (0x79 for R=W=0,
0x7A reserved); the final page needs R to read (0x86) and W to write (0x85).

Paging-structure caches (``pscache``): ``translate`` passes the unit's
cache; a walk then takes stage-1 table pages' stage-2 translations from it
and starts below the lowest cached non-leaf stage-1 entry; a walk that
succeeds inserts what it checked (entries only once their Accessed bit is
set) with the generation read before it started, a faulting one nothing. A
walk that took anything from the caches and faulted is done again from
memory alone, so the caches never fault a request the tables allow.
``reads`` counts only the entries actually read. Inspection (``dry_run``)
never uses the caches: it shows the full walk.

Memory safety against hostile guest tables: the walker reads stage-2 tables
only inside bank 0 and stage-1 tables only at HPAs stage 2 produced, which
must lie in the context's owner bank (never bank 0). Pointers outside RAM,
into stage-2 holes, or beyond the widths fault; self-referencing tables
cannot loop because every walk descends exactly ``levels`` steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pviommu.addr import MSI_WINDOW_LAST, MSI_WINDOW_START, Hpa, Iova
from pviommu.errors import HpaOutOfRange
from pviommu.iommu.context import ContextEntry, Pgtt
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.pscache import FsItem, PsCache, TableItem, fs_key
from pviommu.mem.bank import HYPERVISOR_BANK, Bank, HostMemory, bank_index_of
from pviommu.pt.common import EntryType, Perm
from pviommu.pt.fmt.vtd_ss import VtdSsFormat
from pviommu.pt.fmt.x86_64 import XD, X86_64Format

_EMPTY = EntryType.EMPTY
_OA = EntryType.OA
# permissions as plain ints inside the walk: IntFlag arithmetic is slow
_R = int(Perm.READ)
_W = int(Perm.WRITE)
_PRIV = int(Perm.PRIV)
#: Reserved in every FS entry while NXE is clear -- always here: the context entry has no NXE.
_XD_UNLESS_NXE = XD


@dataclass(frozen=True, slots=True)
class ExplainStep:
    """One entry read (or decision) of a walk, for ``pviommu inspect``.
    ``stage`` is "S1", "S2" or "out"; ``va`` is the input being translated
    at that stage, ``table`` the address of the table read (GPA for S1 --
    ``table_hpa`` is where it really was -- HPA for S2)."""

    stage: str
    level: int
    va: int
    table: int
    table_hpa: int
    index: int
    entry: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class WalkOk:
    """A translation to cache: ``2**size_lg2`` bytes from ``iova`` at ``hpa``."""

    iova: Iova
    hpa: Hpa
    size_lg2: int
    read: bool
    write: bool
    reads: int


@dataclass(frozen=True, slots=True)
class WalkFault:
    reason: FaultReason
    detail: str
    reads: int


class _Fault(Exception):
    def __init__(self, reason: FaultReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class _State:
    #: the bank stage-2 output must lie in (the slot's owner record)
    owner_bank: int = -1
    reads: int = 0
    trace: list[ExplainStep] | None = None
    dry_run: bool = False
    cache: PsCache | None = None
    #: look entries up in ``cache`` (off for the walk that confirms a fault)
    lookup: bool = False
    #: entries taken from ``cache``
    hits: int = 0
    #: what this walk found, inserted into ``cache`` when it ends
    new_tables: list[TableItem] = field(default_factory=list)
    new_fs: list[FsItem] = field(default_factory=list)


class NestedWalker:
    """Walks one context's tables in host memory. Stateless apart from the
    A/D update lock, so device threads can share one walker."""

    def __init__(self, host: HostMemory, *, fs_mgaw_lg2: int = 48) -> None:
        self.host = host
        self._fs = {n: X86_64Format(n, oasz_lg2=fs_mgaw_lg2) for n in (4, 5)}
        self._ss = {n: VtdSsFormat(n) for n in (3, 4, 5)}
        self._ad_lock = threading.Lock()

    def walk(
        self,
        ctx: ContextEntry,
        iova: Iova,
        write: bool,
        trace: list[ExplainStep] | None = None,
        *,
        owner_bank: int,
        dry_run: bool = False,
        cache: PsCache | None = None,
        generation: int | None = None,
    ) -> WalkOk | WalkFault:
        """Translate the page holding ``iova`` for a read or a write. ``ctx``
        must be present and valid (the unit checks it). ``dry_run`` leaves
        A/D bits alone (inspection) and ignores ``cache``; with ``cache`` the
        walk uses and fills the paging-structure caches."""
        if dry_run:
            cache = None
        if cache is not None and generation is None:
            generation = cache.generation  # before anything is read
        st = _State(owner_bank, trace=trace, dry_run=dry_run, cache=cache, lookup=cache is not None)
        try:
            result = self._walk(ctx, int(iova), write, st)
        except _Fault as fault:
            if cache is None or not st.hits:
                if trace is not None:
                    trace.append(ExplainStep("out", -1, int(iova), 0, 0, 0, 0, f"fault {fault.reason.name}"))
                return WalkFault(fault.reason, fault.detail, st.reads)
            # The path came (partly) from the caches and faulted: a cached entry
            # may be stale (a guest that unlinked an emptied table and linked a
            # new one for another IOVA before its deferred flush). Only the
            # tables in memory may fault a request: walk again without lookups;
            # the fresh entries it inserts replace the stale ones.
            cache.count_rewalk()
            st = _State(owner_bank, reads=st.reads, cache=cache)
            try:
                result = self._walk(ctx, int(iova), write, st)
            except _Fault as fault2:
                return WalkFault(fault2.reason, fault2.detail, st.reads)
        # like the IOTLB, only a walk that succeeded leaves anything cached
        if cache is not None and generation is not None and (st.new_tables or st.new_fs):
            cache.insert(ctx.did, (int(ctx.ssptptr), ctx.s2_levels or 4), st.new_tables,
                         (int(ctx.fsptptr), ctx.fs_levels or 4), st.new_fs, generation)
        return result

    def _walk(self, ctx: ContextEntry, iova: int, write: bool, st: _State) -> WalkOk:
        if ctx.pgtt == Pgtt.NESTED:
            return self._nested(ctx, iova, write, st)
        return self._final(ctx, iova, None, write, st)

    # -- stage 2 ----------------------------------------------------------------
    def _s2(self, ctx: ContextEntry, gpa: int, st: _State, why: str) -> tuple[int, int, int]:
        """(HPA, leaf size_lg2, R/W ANDed over the levels) of ``gpa``."""
        fmt = self._ss[ctx.s2_levels or 4]
        bank0 = self._bank0()
        base, size = int(bank0.base), bank0.size
        table = int(ctx.ssptptr)
        perm = _R | _W
        for level in range(fmt.top_level, -1, -1):
            idx = (gpa >> (12 + 9 * level)) & 511
            off = table - base + (idx << 3)
            if not 0 <= off <= size - 8:
                reason = FaultReason.SS_BAD_ROOT if level == fmt.top_level else FaultReason.SS_ACCESS
                raise _Fault(reason, f"stage-2 table {table:#x} is not in bank 0 ({why})")
            entry = bank0.read_u64(off)
            st.reads += 1
            kind = fmt.entry_type(entry, level)
            if st.trace is not None:
                st.trace.append(ExplainStep("S2", level, gpa, table, table, idx, entry, f"{kind.name} ({why})"))
            if kind is _EMPTY:
                raise _Fault(FaultReason.SS_NOT_PRESENT, f"GPA {gpa:#x} not mapped by stage 2 ({why})")
            leaf = kind is _OA
            if entry & fmt.reserved_mask(level, leaf):
                raise _Fault(FaultReason.SS_RESERVED, f"stage-2 entry {entry:#x} at level {level} has reserved bits")
            perm &= int(fmt.entry_perm(entry, level))
            if leaf:
                shift = 12 + 9 * level
                return fmt.leaf_oa(entry, level) | (gpa & ((1 << shift) - 1)), shift, perm
            table = fmt.table_oa(entry)
        raise AssertionError("level 0 holds only leaves")

    def _bank0(self) -> Bank:
        try:
            return self.host.bank(HYPERVISOR_BANK)
        except HpaOutOfRange as exc:
            raise _Fault(FaultReason.SS_BAD_ROOT, "bank 0 is not mapped") from exc

    def _host(self, st: _State, hpa: int, length: int, why: str) -> tuple[Bank, int]:
        """Bank and offset of stage-2 output ``hpa``: must be the owner's RAM."""
        index = bank_index_of(Hpa(hpa))
        if index <= HYPERVISOR_BANK or index != st.owner_bank:
            raise _Fault(FaultReason.SS_ACCESS, f"stage 2 gave HPA {hpa:#x} outside the partition ({why})")
        try:
            bank = self.host.bank(index)
        except HpaOutOfRange as exc:
            raise _Fault(FaultReason.SS_ACCESS, f"HPA {hpa:#x} names no bank ({why})") from exc
        off = hpa - int(bank.base)
        if off + length > bank.size:
            raise _Fault(FaultReason.SS_ACCESS, f"HPA {hpa:#x}+{length:#x} runs past bank {index} ({why})")
        return bank, off

    def _gpa_fits(self, ctx: ContextEntry, gpa: int, reason: FaultReason, why: str) -> None:
        if gpa >> self._ss[ctx.s2_levels or 4].vasz_lg2:
            raise _Fault(reason, f"GPA {gpa:#x} beyond the stage-2 width ({why})")

    # -- stage 1 over stage 2 -----------------------------------------------------
    def _nested(self, ctx: ContextEntry, iova: int, write: bool, st: _State) -> WalkOk:
        fmt = self._fs[ctx.fs_levels or 4]
        if not fmt.is_canonical(iova):
            raise _Fault(FaultReason.NON_CANONICAL, f"IOVA {iova:#x} is not canonical for {fmt.vasz_lg2} bits")
        table_gpa = int(ctx.fsptptr)
        start = fmt.top_level
        cache = st.cache
        #: writes allowed by every stage-1 entry from the top down to here
        path_w = True
        #: every entry above (and at) this level has its A bit known set
        cacheable = cache is not None
        lookup = st.lookup
        did, s2_tag = ctx.did, (int(ctx.ssptptr), ctx.s2_levels or 4)
        if cache is not None and lookup:
            hit = cache.lookup_fs(did, (table_gpa, fmt.top_level + 1), iova, write)
            if hit is not None:
                start, table_gpa, path_w = hit
                st.hits += 1
        for level in range(start, -1, -1):
            top = level == fmt.top_level
            why = f"FS level {level} table at GPA {table_gpa:#x}"
            self._gpa_fits(ctx, table_gpa, FaultReason.FS_BEYOND_MGAW, why)
            if cache is None:
                table_hpa, _, s2perm = self._s2(ctx, table_gpa, st, why)
            else:
                cached = cache.lookup_table(did, s2_tag, table_gpa) if lookup else None
                if cached is None:
                    table_hpa, _, s2perm = self._s2(ctx, table_gpa, st, why)
                    st.new_tables.append((table_gpa, (table_hpa, s2perm)))
                else:
                    table_hpa, s2perm = cached
                    st.hits += 1
            if not s2perm & _R:
                reason = FaultReason.SS_NO_READ_FS_TOP if top else FaultReason.SS_NO_READ_FS
                raise _Fault(reason, f"stage 2 denies reading the {why}")
            idx = fmt.index(iova, level)
            bank, off = self._host(st, table_hpa + (idx << 3), 8, why)
            entry = bank.read_u64(off)
            st.reads += 1
            kind = fmt.entry_type(entry, level)
            if st.trace is not None:
                st.trace.append(ExplainStep("S1", level, iova, table_gpa, table_hpa, idx, entry, kind.name))
            if kind is _EMPTY:
                raise _Fault(FaultReason.FS_NOT_PRESENT, f"IOVA {iova:#x}: P=0 at FS level {level}")
            perm = int(fmt.entry_perm(entry, level))
            if perm & _PRIV:
                raise _Fault(FaultReason.USER_SUPERVISOR, f"IOVA {iova:#x}: U/S=0 at FS level {level}")
            if not perm & _W:
                if write:
                    raise _Fault(FaultReason.NO_WRITE, f"IOVA {iova:#x}: R/W=0 at FS level {level}")
                path_w = False
            leaf = kind is _OA
            # XD (bit 63) is execute-disable only under the PASID entry's NXE (bit 133); our context
            # entries never enable NXE, so a set XD is a reserved bit, as the SDM has it without NXE.
            if entry & (fmt.reserved_mask(level, leaf) | _XD_UNLESS_NXE):
                raise _Fault(FaultReason.FS_RESERVED, f"FS entry {entry:#x} at level {level} has reserved bits")
            ad = fmt.ad_bits(level, leaf, write)
            if entry & ad != ad and not st.dry_run:
                if not s2perm & _W:
                    raise _Fault(FaultReason.SS_NO_WRITE_AD, f"stage 2 denies the A/D update in the {why}")
                with self._ad_lock:  # set only if clear, never lose a concurrent guest write
                    current = bank.read_u64(off)
                    if current == entry:
                        bank.write_u64(off, entry | ad)
                    else:  # A not set by us: neither this entry nor those below may be cached
                        cacheable = False
            if leaf:
                shift = 12 + 9 * level
                gpa = fmt.leaf_oa(entry, level) | (iova & ((1 << shift) - 1))
                return self._final(ctx, iova, (gpa, shift), write, st)
            table_gpa = fmt.table_oa(entry)
            if cacheable:
                st.new_fs.append((fs_key(iova, level), (table_gpa, path_w)))
        raise AssertionError("level 0 holds only leaves")

    def _final(self, ctx: ContextEntry, iova: int, s1: tuple[int, int] | None, write: bool, st: _State) -> WalkOk:
        """Stage 2 of the final GPA (= IOVA without stage 1) and the page checks."""
        if s1 is None:
            gpa, s1_lg2 = iova, 64
            self._gpa_fits(ctx, gpa, FaultReason.SS_BEYOND_MAX, f"IOVA {iova:#x} as GPA")
        else:
            gpa, s1_lg2 = s1
            self._gpa_fits(ctx, gpa, FaultReason.FS_BEYOND_MGAW, f"output of IOVA {iova:#x}")
        if MSI_WINDOW_START <= gpa <= MSI_WINDOW_LAST:
            raise _Fault(FaultReason.MSI_WINDOW, f"IOVA {iova:#x} -> GPA {gpa:#x} is in the MSI window")
        hpa, s2_lg2, perm = self._s2(ctx, gpa, st, f"data page of IOVA {iova:#x}")
        if write and not perm & _W:
            raise _Fault(FaultReason.NO_WRITE, f"stage 2 maps GPA {gpa:#x} read-only")
        if not write and not perm & _R:
            raise _Fault(FaultReason.NO_READ, f"stage 2 denies reading GPA {gpa:#x}")
        shift = min(s1_lg2, s2_lg2)
        low = iova & ((1 << shift) - 1)
        self._host(st, hpa - low, 1 << shift, f"data page of IOVA {iova:#x}")
        if st.trace is not None:
            st.trace.append(ExplainStep("out", 0, gpa, 0, hpa, 0, 0, f"HPA {hpa:#x}, 2^{shift} page"))
        return WalkOk(Iova(iova - low), Hpa(hpa - low), shift, bool(perm & _R), write, st.reads)
