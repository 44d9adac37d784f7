"""One page table, written once over any ``PtFormat`` (generic_pt iommu_pt.h).

``PageTable[V, OA, T]`` maps input addresses ``V`` to output addresses ``OA``
with table pages addressed as ``T``: stage 1 is ``PageTable[Iova, Gpa, Gpa]``
over guest RAM, stage 2 ``PageTable[Gpa, Hpa, Hpa]`` over host memory, the
emulated map-by-hypercall domain ``PageTable[Iova, Hpa, Hpa]``.

Rules (those of generic_pt's map_pages / unmap_pages):

* ``map`` picks, at each step, the largest leaf allowed by the page-size
  bitmap with VA and OA aligned to it and not longer than what remains. Any
  existing mapping in the range is refused with ``PageTableError`` (Linux
  -EADDRINUSE) *before* anything is written; running out of frames midway
  rolls back what was written.
* ``unmap`` never splits a leaf. A leaf whose first byte is hit is removed
  whole and its full size counted, even if it extends past the range (so a
  4 KiB unmap of a 2 MiB page returns 2 MiB). A range that *starts* inside
  a leaf is refused with ``PageTableError`` and nothing changes. Unmapped
  holes inside the range are skipped. Table pages left empty are unlinked and
  put on ``gather.freelist`` -- not freed: the caller frees them after the
  IOTLB flush (an IOMMU may be mid-walk through them).
* Occupancy of each table page is counted in a dict, so emptied tables are
  found without rescanning 512 entries; this object must be the only writer
  of its tables (the guest's driver / the hypervisor, each for its own).

Hot loops work on plain ints and call the format's accessors once per entry;
there are no per-entry objects, so mapping 2 MiB as 512 pages takes ~1 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from pviommu.addr import PAGE_SIZE, Gpa, Hpa, Iova, align_down
from pviommu.errors import OutOfFrames, PageTableError, PviommuError
from pviommu.mem.bank import GuestRam, HostMemory
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import (
    ENTRY_LG2,
    ITEMS_LG2,
    EntryType,
    Perm,
    PtFeature,
    PtFormat,
    Translation,
    WalkStep,
    best_pgsize_lg2,
    item_lg2,
    pgsize_bitmap,
)
from pviommu.pt.gather import IotlbGather

V = TypeVar("V", bound=int)
OA = TypeVar("OA", bound=int)
T = TypeVar("T", bound=int)
T_contra = TypeVar("T_contra", bound=int, contravariant=True)

_EMPTY = EntryType.EMPTY
_OA = EntryType.OA


class TableMemory(Protocol[T_contra]):
    """Where table pages live: u64 access at table addresses."""

    def read_u64(self, addr: T_contra) -> int: ...

    def write_u64(self, addr: T_contra, value: int) -> None: ...


class FrameSource(Protocol[T]):
    """Zeroed 4 KiB frames for table pages (``FrameAllocator`` is one)."""

    def alloc_table(self) -> T: ...

    def free_table(self, addr: T) -> None: ...


class PageTable(Generic[V, OA, T]):
    """map / unmap / lookup over one format, one table memory, one frame source."""

    def __init__(
        self,
        fmt: PtFormat,
        mem: TableMemory[T],
        frames: FrameSource[T],
        *,
        table_addr: Callable[[int], T],
        out_addr: Callable[[int], OA],
        page_sizes: int | None = None,
    ) -> None:
        self.fmt = fmt
        self._mem = mem
        self._frames = frames
        self._ta = table_addr
        self._out = out_addr
        full = pgsize_bitmap(fmt)
        self.pgsize_bitmap = full if page_sizes is None else page_sizes & full
        if not self.pgsize_bitmap & PAGE_SIZE:
            raise ValueError("the page-size bitmap must include 4 KiB")
        self._root = int(frames.alloc_table())
        #: live entries per table page (int address -> count)
        self._count: dict[int, int] = {self._root: 0}

    # -- introspection ------------------------------------------------------
    @property
    def root(self) -> T:
        """Address of the top-level table (what a context entry points to)."""
        return self._ta(self._root)

    @property
    def table_pages(self) -> int:
        """Table pages currently linked into this table (root included)."""
        return len(self._count)

    # -- checks ---------------------------------------------------------------
    def _check_range(self, va: int, length: int, what: str) -> int:
        fmt = self.fmt
        if length <= 0 or (va | length) & (PAGE_SIZE - 1):
            raise PageTableError(f"{what} {va:#x}+{length:#x}: VA and length must be 4 KiB aligned")
        last = va + length - 1
        if not (fmt.is_canonical(va) and fmt.is_canonical(last)):
            raise PageTableError(f"{what} {va:#x}..{last:#x} is outside the {fmt.vasz_lg2}-bit VA space")
        if fmt.features & PtFeature.SIGN_EXTEND and (va ^ last) >> (fmt.vasz_lg2 - 1):
            raise PageTableError(f"{what} {va:#x}..{last:#x} crosses the non-canonical hole")
        return last

    # -- map --------------------------------------------------------------------
    def map(self, va: V, oa: OA, length: int, perm: Perm) -> None:
        """Map ``[va, va + length)`` to ``[oa, oa + length)`` with ``perm``."""
        last = self._check_range(va, length, "map")
        if oa & (PAGE_SIZE - 1) or oa < 0 or oa + length > 1 << self.fmt.oasz_lg2:
            raise PageTableError(f"OA {oa:#x}+{length:#x} unaligned or beyond {self.fmt.oasz_lg2} bits")
        if not perm & (Perm.READ | Perm.WRITE):
            raise PageTableError("a mapping needs READ or WRITE")
        self._check_free(self._root, self.fmt.top_level, int(va), last)
        pos = int(va)
        try:
            self._map_checked(pos, int(oa), length, perm)
        except OutOfFrames:
            gather: IotlbGather[T] = IotlbGather()
            self.unmap(va, length, gather)
            for table in gather.freelist:
                self._frames.free_table(table)
            raise

    def _check_free(self, table: int, level: int, start: int, last: int) -> None:
        fmt, rd, ta = self.fmt, self._mem.read_u64, self._ta
        shift = item_lg2(level)
        base = align_down(start, 1 << (shift + ITEMS_LG2))
        for idx in range(fmt.index(start, level), fmt.index(last, level) + 1):
            entry = rd(ta(table + (idx << ENTRY_LG2)))
            kind = fmt.entry_type(entry, level)
            if kind is _EMPTY:
                continue
            item_start = base | (idx << shift)
            item_last = item_start + (1 << shift) - 1
            if kind is _OA or (start <= item_start and item_last <= last):
                # a leaf, or a (never empty) table wholly inside the range
                raise PageTableError(f"range {start:#x}..{last:#x} overlaps an existing mapping near {item_start:#x}")
            self._check_free(fmt.table_oa(entry), level - 1, max(start, item_start), min(last, item_last))

    def _map_checked(self, pos: int, oa: int, left: int, perm: Perm) -> None:
        fmt, rd, wr, ta = self.fmt, self._mem.read_u64, self._mem.write_u64, self._ta
        count, bitmap, top = self._count, self.pgsize_bitmap, fmt.top_level
        make_leaf = fmt.make_leaf
        while left:
            size_lg2 = best_pgsize_lg2(bitmap, pos, oa, left)
            assert size_lg2 is not None  # 4 KiB always fits an aligned remainder
            level = (size_lg2 - item_lg2(0)) // ITEMS_LG2
            table = self._root
            for lvl in range(top, level, -1):
                slot = ta(table + (fmt.index(pos, lvl) << ENTRY_LG2))
                entry = rd(slot)
                if fmt.entry_type(entry, lvl) is _EMPTY:
                    child = int(self._frames.alloc_table())
                    count[child] = 0
                    wr(slot, fmt.make_table(child))
                    count[table] += 1
                    table = child
                else:
                    table = fmt.table_oa(entry)
            idx = fmt.index(pos, level)
            n = min(left >> size_lg2, (1 << ITEMS_LG2) - idx)
            step = 1 << size_lg2
            for i in range(n):
                wr(ta(table + ((idx + i) << ENTRY_LG2)), make_leaf(oa + i * step, level, perm))
            count[table] += n
            pos += n * step
            oa += n * step
            left -= n * step

    # -- unmap ------------------------------------------------------------------
    def unmap(self, va: V, length: int, gather: IotlbGather[T]) -> int:
        """Unmap leaves starting in ``[va, va + length)``; returns bytes unmapped
        (whole leaves). Emptied tables go to ``gather.freelist``."""
        last = self._check_range(va, length, "unmap")
        hit = self._leaf_at(int(va))
        if hit is not None and hit[0] != va:
            raise PageTableError(
                f"unmap at {va:#x} starts inside a 2^{hit[1]} leaf at {hit[0]:#x}; leaves are never split"
            )
        return self._unmap(self._root, self.fmt.top_level, int(va), last, gather)

    def _unmap(self, table: int, level: int, start: int, last: int, gather: IotlbGather[T]) -> int:
        fmt, rd, wr, ta, count = self.fmt, self._mem.read_u64, self._mem.write_u64, self._ta, self._count
        shift = item_lg2(level)
        base = align_down(start, 1 << (shift + ITEMS_LG2))
        done = 0
        lo, hi = -1, -1  # first/last index of leaves removed here, for one gather update
        for idx in range(fmt.index(start, level), fmt.index(last, level) + 1):
            slot = ta(table + (idx << ENTRY_LG2))
            entry = rd(slot)
            kind = fmt.entry_type(entry, level)
            if kind is _EMPTY:
                continue
            if kind is _OA:
                wr(slot, 0)
                count[table] -= 1
                done += 1 << shift
                if lo < 0:
                    lo = idx
                hi = idx
                continue
            item_start = base | (idx << shift)
            child = fmt.table_oa(entry)
            done += self._unmap(
                child, level - 1, max(start, item_start), min(last, item_start + (1 << shift) - 1), gather
            )
            if count[child] == 0:
                wr(slot, 0)
                del count[child]
                count[table] -= 1
                gather.freelist.append(ta(child))
        if lo >= 0:
            gather.add_range(base | (lo << shift), (base | (hi << shift)) + (1 << shift) - 1, shift)
        return done

    # -- lookup -----------------------------------------------------------------
    def _leaf_at(self, va: int) -> tuple[int, int, int] | None:
        """(leaf start VA, size_lg2, entry) of the leaf holding ``va``."""
        fmt, rd, ta = self.fmt, self._mem.read_u64, self._ta
        table = self._root
        for level in range(fmt.top_level, -1, -1):
            entry = rd(ta(table + (fmt.index(va, level) << ENTRY_LG2)))
            kind = fmt.entry_type(entry, level)
            if kind is _EMPTY:
                return None
            if kind is _OA:
                shift = item_lg2(level)
                return align_down(va, 1 << shift), shift, entry
            table = fmt.table_oa(entry)
        raise AssertionError("level 0 holds only leaves")

    def lookup(self, va: V) -> Translation[OA] | None:
        """Output address of ``va``, the leaf size and rights, or None if unmapped.
        (Rights are the leaf's: tables this object writes never restrict.)"""
        if not self.fmt.is_canonical(va):
            return None
        hit = self._leaf_at(int(va))
        if hit is None:
            return None
        start, shift, entry = hit
        level = (shift - item_lg2(0)) // ITEMS_LG2
        oa = self.fmt.leaf_oa(entry, level) + (va - start)
        return Translation(self._out(oa), shift, self.fmt.entry_perm(entry, level))

    def walk(self, va: V) -> list[WalkStep]:
        """Every entry read to translate ``va``, top level first (for inspection)."""
        fmt, rd, ta = self.fmt, self._mem.read_u64, self._ta
        steps: list[WalkStep] = []
        table = self._root
        for level in range(fmt.top_level, -1, -1):
            idx = fmt.index(va, level)
            entry = rd(ta(table + (idx << ENTRY_LG2)))
            kind = fmt.entry_type(entry, level)
            steps.append(WalkStep(level, table, idx, entry, kind))
            if kind is not EntryType.TABLE:
                break
            table = fmt.table_oa(entry)
        return steps

    # -- teardown ---------------------------------------------------------------
    def destroy(self) -> None:
        """Free every table page, root included; the table is unusable after.
        Only after the owner made sure no IOMMU can still walk it."""
        for table in list(self._count):
            self._frames.free_table(self._ta(table))
        self._count.clear()


# -- reading any table: the inspection iterator ----------------------------------
@dataclass(frozen=True, slots=True)
class TableItem:
    """One present entry met by ``TableIterator``, in VA order.

    ``va`` is the first (canonical) VA of the item, ``table`` the address of
    the table page holding the entry, ``oa`` the next table (TABLE) or the
    first output address (OA), ``size_lg2`` the item's span, ``perm`` the
    rights *effective* at this entry (R/W/EXEC ANDed and PRIV ORed from the
    root down, as a walker applies them). ``error`` says why the next table
    could not be read (it is not descended)."""

    level: int
    va: int
    table: int
    index: int
    entry: int
    type: EntryType
    oa: int
    size_lg2: int
    perm: Perm
    error: str = ""


@dataclass(frozen=True, slots=True)
class MappedRange:
    """Leaves merged where VA and OA are both contiguous and the rights equal."""

    va: int
    oa: int
    size: int
    perm: Perm


class TableIterator:
    """Every present entry of the table rooted at ``root``, depth first in VA
    order, read through ``read_u64`` alone -- so it reads tables nobody here
    built (a guest's stage 1 from its RAM) as well as ``PageTable``'s own.

    Hostile tables cannot make it loop or explode: it descends at most
    ``levels`` steps, reads at most ``max_tables`` table pages (then stops and
    sets ``truncated``), and a table it cannot read (``PviommuError`` from
    ``read_u64``) is reported on the entry pointing to it."""

    def __init__(self, fmt: PtFormat, read_u64: Callable[[int], int], root: int, *, max_tables: int = 4096) -> None:
        self.fmt = fmt
        self._rd = read_u64
        self.root = root
        self.max_tables = max_tables
        self.tables_read = 0
        self.truncated = False

    def _canonical(self, va: int) -> int:
        fmt = self.fmt
        if fmt.features & PtFeature.SIGN_EXTEND and va >> (fmt.vasz_lg2 - 1) & 1:
            return va | (((1 << 64) - 1) & ~((1 << fmt.vasz_lg2) - 1))
        return va

    def _read_table(self, table: int) -> list[int]:
        if self.tables_read >= self.max_tables:
            self.truncated = True
            return []
        self.tables_read += 1
        return [self._rd(table + (idx << ENTRY_LG2)) for idx in range(1 << ITEMS_LG2)]

    def __iter__(self) -> Iterator[TableItem]:
        entries = self._read_table(self.root)  # an unreadable root raises: there is no tree
        yield from self._table(self.root, entries, self.fmt.top_level, 0, Perm.READ | Perm.WRITE | Perm.EXEC)

    def _table(self, table: int, entries: list[int], level: int, base: int, perm: Perm) -> Iterator[TableItem]:
        fmt = self.fmt
        shift = item_lg2(level)
        for idx, entry in enumerate(entries):
            kind = fmt.entry_type(entry, level)
            if kind is _EMPTY:
                continue
            va = base | (idx << shift)
            own = fmt.entry_perm(entry, level)
            eff = (perm & own & (Perm.READ | Perm.WRITE | Perm.EXEC)) | ((perm | own) & Perm.PRIV)
            if kind is _OA:
                yield TableItem(level, self._canonical(va), table, idx, entry, kind, fmt.leaf_oa(entry, level),
                                shift, eff)
                continue
            child = fmt.table_oa(entry)
            try:
                child_entries = self._read_table(child)
            except PviommuError as exc:
                yield TableItem(level, self._canonical(va), table, idx, entry, kind, child, shift, eff, str(exc))
                continue
            yield TableItem(level, self._canonical(va), table, idx, entry, kind, child, shift, eff)
            if self.truncated:
                return
            yield from self._table(child, child_entries, level - 1, va, eff)


def mapped_ranges(items: Iterator[TableItem] | list[TableItem]) -> list[MappedRange]:
    """The leaves of ``items`` (in VA order) merged into ranges."""
    out: list[MappedRange] = []
    for it in items:
        if it.type is not _OA:
            continue
        size = 1 << it.size_lg2
        if out:
            last = out[-1]
            if last.va + last.size == it.va and last.oa + last.size == it.oa and last.perm == it.perm:
                out[-1] = MappedRange(last.va, last.oa, last.size + size, last.perm)
                continue
        out.append(MappedRange(it.va, it.oa, size, it.perm))
    return out


# -- the three tables of the system -------------------------------------------
def stage1_table(
    fmt: PtFormat, ram: GuestRam, frames: FrameAllocator[Gpa], page_sizes: int | None = None
) -> PageTable[Iova, Gpa, Gpa]:
    """A guest's stage-1 (IOVA -> GPA) table in its own RAM."""
    return PageTable(fmt, ram, frames, table_addr=Gpa, out_addr=Gpa, page_sizes=page_sizes)


def stage2_table(
    fmt: PtFormat, host: HostMemory, frames: FrameSource[Hpa], page_sizes: int | None = None
) -> PageTable[Gpa, Hpa, Hpa]:
    """The hypervisor's stage-2 (GPA -> HPA) table of a partition, in bank 0."""
    return PageTable(fmt, host, frames, table_addr=Hpa, out_addr=Hpa, page_sizes=page_sizes)


def direct_table(
    fmt: PtFormat, host: HostMemory, frames: FrameSource[Hpa], page_sizes: int | None = None
) -> PageTable[Iova, Hpa, Hpa]:
    """A domain-private IOVA -> HPA table the hypervisor fills on map hypercalls
    (the emulated baseline), in bank 0."""
    return PageTable(fmt, host, frames, table_addr=Hpa, out_addr=Hpa, page_sizes=page_sizes)
