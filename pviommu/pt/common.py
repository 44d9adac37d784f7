"""Generic page-table language (after Linux ``drivers/iommu/generic_pt``).

Glossary -- the words every module of ``pviommu.pt`` and ``pviommu.iommu``
uses with exactly this meaning:

``va`` / ``oa``
    Input and output address of one table. Stage 1: va = IOVA, oa = GPA.
    Stage 2: va = GPA, oa = HPA. The emulated "map by hypercall" domain:
    va = IOVA, oa = HPA. Tables themselves live at addresses of the space
    their *owner* can touch (GPA for stage 1, HPA for stage 2).
``level``
    Level 0 holds only leaves (4 KiB items); level 1 items are 2 MiB,
    level 2 items 1 GiB, level 3 512 GiB, level 4 256 TiB. ``top_level``
    is ``levels - 1``. The root is one table page at ``top_level``.
``item`` vs ``entry``
    An *item* is the VA span one slot of a table covers
    (``2**item_lg2(level)`` bytes); an *entry* is the u64 stored in the slot.
``_lg2``
    A log2 quantity: ``size_lg2 = 21`` is 2 MiB. Sizes are passed as lg2,
    never as "order" or byte counts, wherever a power of two is meant.
``last`` vs ``end``
    ``last`` is inclusive (``start + length - 1``) -- it never overflows at
    the top of a 64-bit space; ``end`` is exclusive. Gathers use start/last.
``EntryType``
    What an entry is at its level: EMPTY, TABLE (points to the next level),
    or OA (a leaf giving an output address).
``Perm``
    The access an entry grants (READ/WRITE/EXEC) plus PRIV, a supervisor-only
    mapping (x86 U/S=0; device requests are user requests, so a walk through a
    PRIV entry faults).
``PtFeature``
    Variants of a format as flags (sign-extended VA, A/D bits, ...); code
    outside ``pt/fmt`` asks features, never a format's name.

A format is one small class satisfying ``PtFormat``: a handful of accessors
that encode and decode single entries. The algorithms (map, unmap, lookup,
the nested walk) are written once over those accessors.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntFlag
from typing import Generic, Protocol, TypeVar

OA = TypeVar("OA", bound=int)

#: Every format here has 4 KiB table pages of 512 u64 entries.
TABLE_LG2 = 12
ENTRY_LG2 = 3
ITEMS_LG2 = TABLE_LG2 - ENTRY_LG2  # 9: 512 items per table
ITEMS_PER_TABLE = 1 << ITEMS_LG2
U64_MASK = (1 << 64) - 1


class EntryType(Enum):
    EMPTY = 0
    TABLE = 1
    OA = 2


class Perm(IntFlag):
    """Access rights of a mapping (the values of Linux IOMMU_READ/WRITE; EXEC is
    the inverse of IOMMU_NOEXEC, PRIV is IOMMU_PRIV)."""

    NONE = 0
    READ = 1
    WRITE = 2
    EXEC = 4
    PRIV = 32

    @property
    def rw(self) -> Perm:
        return self & (Perm.READ | Perm.WRITE)


RW = Perm.READ | Perm.WRITE


class PtFeature(IntFlag):
    """Variants of a format (generic_pt's PT_FEAT_*)."""

    NONE = 0
    #: VA bits above ``vasz_lg2 - 1`` must copy bit ``vasz_lg2 - 1`` (x86 canonical form).
    SIGN_EXTEND = 1
    #: Entries have Accessed/Dirty bits a walker sets (``ad_bits``).
    AD_BITS = 2
    #: Entries carry a user/supervisor bit (``Perm.PRIV``).
    PRIV = 4
    #: Entries can deny execution (``Perm.EXEC``).
    EXEC = 8
    #: Entries have a present bit separate from the permissions.
    PRESENT_BIT = 16


def item_lg2(level: int) -> int:
    """log2 of the VA span of one item at ``level`` (12 + 9 * level)."""
    return TABLE_LG2 + ITEMS_LG2 * level


class PtFormat(Protocol):
    """The accessors a page-table format provides.

    Attributes are plain values so hot loops read them without calls:
    ``levels`` (tables from root to leaf), ``top_level`` (``levels - 1``),
    ``vasz_lg2`` / ``oasz_lg2`` (input / output widths), ``leaf_levels``
    (levels that may hold leaves, ascending), ``features`` and
    ``supported_perm`` (the ``Perm`` bits an entry can express).
    """

    name: str
    levels: int
    top_level: int
    vasz_lg2: int
    oasz_lg2: int
    leaf_levels: tuple[int, ...]
    features: PtFeature
    supported_perm: Perm

    def index(self, va: int, level: int) -> int:
        """Slot of ``va`` in the table at ``level``."""
        ...

    def entry_type(self, entry: int, level: int) -> EntryType:
        """Decode what ``entry`` is at ``level`` (reserved bits not checked)."""
        ...

    def table_oa(self, entry: int) -> int:
        """Address of the next-level table a TABLE entry points to."""
        ...

    def leaf_oa(self, entry: int, level: int) -> int:
        """First output address of an OA entry at ``level``."""
        ...

    def entry_perm(self, entry: int, level: int) -> Perm:
        """Access ``entry`` grants (tables too: x86 R/W and U/S restrict subtrees)."""
        ...

    def make_table(self, table_addr: int) -> int:
        """Entry pointing to a next-level table at ``table_addr``."""
        ...

    def make_leaf(self, oa: int, level: int, perm: Perm) -> int:
        """Leaf entry mapping ``oa`` (aligned to the level's item size)."""
        ...

    def reserved_mask(self, level: int, leaf: bool) -> int:
        """Bits that must be zero in a present entry of this kind at ``level``."""
        ...

    def ad_bits(self, level: int, leaf: bool, write: bool) -> int:
        """Accessed/Dirty bits a walker sets in this entry (0 if the format has none)."""
        ...

    def is_canonical(self, va: int) -> bool:
        """True when ``va`` (a u64) is a valid input address of this format."""
        ...


@dataclass(frozen=True, slots=True)
class Translation(Generic[OA]):
    """Result of a lookup: the output address of the looked-up VA (not the
    leaf's start), the leaf size and the leaf's rights."""

    oa: OA
    size_lg2: int
    perm: Perm

    @property
    def size(self) -> int:
        return 1 << self.size_lg2


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One entry read during a walk, for inspection tools."""

    level: int
    table: int
    index: int
    entry: int
    type: EntryType


def pgsize_bitmap(fmt: PtFormat) -> int:
    """Leaf sizes the format can map, as a bitmap of byte sizes (Linux style)."""
    bitmap = 0
    for level in fmt.leaf_levels:
        bitmap |= 1 << item_lg2(level)
    return bitmap


def best_pgsize_lg2(bitmap: int, va: int, oa: int, length: int) -> int | None:
    """Largest page size in ``bitmap`` with ``va`` and ``oa`` aligned to it
    and not larger than ``length`` (generic_pt's pt_compute_best_pgsize)."""
    if length <= 0:
        return None
    align = va | oa
    candidates = bitmap & ((1 << length.bit_length()) - 1)  # sizes <= length
    while candidates:
        size_lg2 = candidates.bit_length() - 1
        size = 1 << size_lg2
        if size <= length and not align & (size - 1):
            return size_lg2
        candidates &= ~size
    return None
