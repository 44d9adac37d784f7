"""VT-d second-stage format (Linux generic_pt fmt/vtdss.h).

Entry bits: 0 R, 1 W, 2 X (only with SSEE, which we never enable), 5:3 EMT and
6 IPAT (leaves; ignored here), 7 PS (2M/1G leaf; reserved in PML4E/PML5E),
8 A / 9 D (only with SSADE, never enabled), 11 SNP (reserved without
ECAP.SC), 51:12 address, 62 TM (reserved), 52-61 and 63 ignored.

There is no present bit: an entry exists iff R|W. Tables are written R|W.
Widths (PASID-entry AW): 39 bits / 3 levels, 48 / 4, 57 / 5.
Reserved (QEMU's masks): 51:oasz and bit 11 everywhere, bit 7 in PML4E/PML5E,
20:11 in a 2M leaf, 29:11 in a 1G leaf, bit 62.
"""

from __future__ import annotations

from pviommu.pt.common import TABLE_LG2, EntryType, Perm, PtFeature, item_lg2

R = 1 << 0
W = 1 << 1
X = 1 << 2
PS = 1 << 7
SNP = 1 << 11
TM = 1 << 62
ADDR_MASK = ((1 << 52) - 1) & ~((1 << TABLE_LG2) - 1)

#: entry_perm by R/W bits, prebuilt: enum arithmetic per entry is slow
_PERM_OF_RW = (Perm.NONE, Perm.READ, Perm.WRITE, Perm.READ | Perm.WRITE)

#: AW field value of the PASID entry for each level count.
AW_OF_LEVELS = {3: 1, 4: 2, 5: 3}
LEVELS_OF_AW = {aw: levels for levels, aw in AW_OF_LEVELS.items()}


class VtdSsFormat:
    """VT-d second-stage tables, 3/4/5 levels for 39/48/57-bit input."""

    supported_perm = Perm.READ | Perm.WRITE
    features = PtFeature.NONE
    leaf_levels: tuple[int, ...] = (0, 1, 2)

    def __init__(self, levels: int = 4, oasz_lg2: int = 52) -> None:
        if levels not in AW_OF_LEVELS:
            raise ValueError(f"VT-d second stage has 3, 4 or 5 levels, not {levels}")
        if not 32 <= oasz_lg2 <= 52:
            raise ValueError(f"output width {oasz_lg2} outside 32..52")
        self.levels = levels
        self.top_level = levels - 1
        self.vasz_lg2 = item_lg2(levels)  # 39 / 48 / 57
        self.oasz_lg2 = oasz_lg2
        self.name = f"vtd_ss-{levels}lvl"
        above = ADDR_MASK & ~((1 << oasz_lg2) - 1)
        common = above | SNP | TM
        self._table_rsvd = [common | (PS if level >= 3 else 0) for level in range(levels)]
        self._leaf_rsvd = [
            common,
            common | (((1 << 21) - 1) & ~((1 << 11) - 1)),  # 2M leaf: 20:11
            common | (((1 << 30) - 1) & ~((1 << 11) - 1)),  # 1G leaf: 29:11
        ]
        self._limit = 1 << self.vasz_lg2

    @property
    def aw(self) -> int:
        """PASID-entry AW encoding of this width."""
        return AW_OF_LEVELS[self.levels]

    def index(self, va: int, level: int) -> int:
        return (va >> (12 + 9 * level)) & 511

    def entry_type(self, entry: int, level: int) -> EntryType:
        if not entry & (R | W):
            return EntryType.EMPTY
        if level == 0 or (entry & PS and level <= 2):
            return EntryType.OA
        return EntryType.TABLE

    def table_oa(self, entry: int) -> int:
        return entry & ADDR_MASK

    def leaf_oa(self, entry: int, level: int) -> int:
        return entry & ADDR_MASK & ~((1 << (12 + 9 * level)) - 1)

    def entry_perm(self, entry: int, level: int) -> Perm:
        return _PERM_OF_RW[entry & (R | W)]

    def make_table(self, table_addr: int) -> int:
        return (table_addr & ADDR_MASK) | R | W

    def make_leaf(self, oa: int, level: int, perm: Perm) -> int:
        rw = int(perm) & 3  # Perm.READ = 1 = R, Perm.WRITE = 2 = W
        if not rw:
            raise ValueError("a second-stage leaf needs READ or WRITE (R=W=0 means not present)")
        entry = (oa & ADDR_MASK) | rw
        if level:
            entry |= PS
        return entry

    def reserved_mask(self, level: int, leaf: bool) -> int:
        return self._leaf_rsvd[level] if leaf else self._table_rsvd[level]

    def ad_bits(self, level: int, leaf: bool, write: bool) -> int:
        return 0  # SSADE is never enabled

    def is_canonical(self, va: int) -> bool:
        return 0 <= va < self._limit
