"""x86-64 / VT-d first-stage format (Linux generic_pt fmt/x86_64.h).

Entry bits: 0 P, 1 R/W, 2 U/S, 3 PWT, 4 PCD, 5 A, 6 D (leaves), 7 PS in
PDPTE/PDE (reserved in PML4E/PML5E), 8 G, 12 PAT of a 2M/1G leaf, 51:12
address, 63 XD. Leaves at levels 0-2 (4K, 2M with PS, 1G with PS); 4 levels
for a 48-bit VA, 5 for 57 bits; VAs are sign-extended (canonical).

What we write follows generic_pt: tables P|RW|U|A, leaves P|U|A (+RW|D when
writable, PS above level 0, U/S cleared for PRIV). Like generic_pt's
``x86_64_pt_iommu_set_prot`` we never set XD: execute-disable means something
only under the PASID entry's NXE, which the context entry never enables, and
with NXE clear a set XD is a reserved bit (the walker faults it), so every
leaf is executable and ``Perm.EXEC`` cannot be taken away. Decoding still
reads XD (a hostile or foreign entry may carry it).
Setting A (and D) up front spares the hardware the atomic update; a walker
still sets them when it finds them clear (guest-built tables may omit them).
Reserved bits (QEMU's masks, VT-d 3.6): 51:oasz at every level, PS in
PML4E/PML5E, 20:13 in a 2M leaf, 29:13 in a 1G leaf; 62:52 are ignored.
"""

from __future__ import annotations

from pviommu.pt.common import (
    TABLE_LG2,
    EntryType,
    Perm,
    PtFeature,
    item_lg2,
)

P = 1 << 0
RW = 1 << 1
US = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
A = 1 << 5
D = 1 << 6
PS = 1 << 7
G = 1 << 8
PAT_LARGE = 1 << 12
XD = 1 << 63
ADDR_MASK = ((1 << 52) - 1) & ~((1 << TABLE_LG2) - 1)  # bits 51:12

_LEAF_LEVELS = (0, 1, 2)


def _perm_of(key: int) -> Perm:
    """Perm of an entry whose RW, US, XD bits are bits 0, 1, 2 of ``key``."""
    perm = Perm.READ
    if key & 1:
        perm |= Perm.WRITE
    if not key & 2:
        perm |= Perm.PRIV
    if not key & 4:
        perm |= Perm.EXEC
    return perm


#: prebuilt: enum arithmetic per entry is slow in a walker's hot loop
_PERMS = tuple(_perm_of(key) for key in range(8))
_WRITE, _PRIV = (int(p) for p in (Perm.WRITE, Perm.PRIV))


class X86_64Format:
    """x86-64 4-level (48-bit) or 5-level (57-bit) paging."""

    supported_perm = Perm.READ | Perm.WRITE | Perm.PRIV
    features = PtFeature.SIGN_EXTEND | PtFeature.AD_BITS | PtFeature.PRIV | PtFeature.PRESENT_BIT
    leaf_levels: tuple[int, ...] = _LEAF_LEVELS

    def __init__(self, levels: int = 4, oasz_lg2: int = 52) -> None:
        if levels not in (4, 5):
            raise ValueError(f"x86-64 paging has 4 or 5 levels, not {levels}")
        if not 32 <= oasz_lg2 <= 52:
            raise ValueError(f"output width {oasz_lg2} outside 32..52")
        self.levels = levels
        self.top_level = levels - 1
        self.vasz_lg2 = item_lg2(levels)  # 48 or 57
        self.oasz_lg2 = oasz_lg2
        self.name = f"x86_64-{levels}lvl"
        above = ADDR_MASK & ~((1 << oasz_lg2) - 1)
        self._table_rsvd = [above | (PS if level >= 3 else 0) for level in range(levels)]
        self._leaf_rsvd = [
            above,
            above | (((1 << 21) - 1) & ~((1 << 13) - 1)),  # 2M leaf: 20:13
            above | (((1 << 30) - 1) & ~((1 << 13) - 1)),  # 1G leaf: 29:13
        ]
        self._sign_bit = 1 << (self.vasz_lg2 - 1)
        self._upper = ((1 << 64) - 1) & ~((1 << self.vasz_lg2) - 1)

    def index(self, va: int, level: int) -> int:
        return (va >> (12 + 9 * level)) & 511

    def entry_type(self, entry: int, level: int) -> EntryType:
        if not entry & P:
            return EntryType.EMPTY
        if level == 0 or (entry & PS and level <= 2):
            return EntryType.OA
        return EntryType.TABLE

    def table_oa(self, entry: int) -> int:
        return entry & ADDR_MASK

    def leaf_oa(self, entry: int, level: int) -> int:
        return entry & ADDR_MASK & ~((1 << (12 + 9 * level)) - 1)

    def entry_perm(self, entry: int, level: int) -> Perm:
        return _PERMS[((entry >> 1) & 3) | ((entry >> 61) & 4)]

    def make_table(self, table_addr: int) -> int:
        return (table_addr & ADDR_MASK) | P | RW | US | A

    def make_leaf(self, oa: int, level: int, perm: Perm) -> int:
        p = int(perm)
        entry = (oa & ADDR_MASK) | P | A
        if not p & _PRIV:
            entry |= US
        if p & _WRITE:
            entry |= RW | D
        if level:
            entry |= PS
        return entry  # never XD (generic_pt): reserved without NXE

    def reserved_mask(self, level: int, leaf: bool) -> int:
        return self._leaf_rsvd[level] if leaf else self._table_rsvd[level]

    def ad_bits(self, level: int, leaf: bool, write: bool) -> int:
        return A | D if leaf and write else A

    def is_canonical(self, va: int) -> bool:
        upper = va & self._upper
        return upper == (self._upper if va & self._sign_bit else 0) and 0 <= va < (1 << 64)
