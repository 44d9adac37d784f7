"""Entry encodings computed by hand from the bit layouts (reference
vtd-nested.md sections 1-2), and the format-level properties of generic_pt's
kunit_generic_pt.h, for every format configuration."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.pt.common import ITEMS_LG2, EntryType, Perm, PtFeature, best_pgsize_lg2, item_lg2, pgsize_bitmap
from pviommu.pt.fmt import FORMAT_CONFIGS, VtdSsFormat, X86_64Format

R, W, X, PRIV = Perm.READ, Perm.WRITE, Perm.EXEC, Perm.PRIV


# -- x86-64 / first stage ---------------------------------------------------------
@pytest.mark.parametrize(
    ("level", "oa", "perm", "expected"),
    [
        # generic_pt x86_64_pt_iommu_set_prot: U|A, +RW|D when writable, never XD (bit 63)
        # 4K RW: P|RW|US|A|D = 0x67
        (0, 0x12345000, R | W, 0x0000_0000_1234_5067),
        # 2M RW: + PS (0xE7)
        (1, 0x4020_0000, R | W, 0x0000_0000_4020_00E7),
        # 1G read-only: P|US|A|PS = 0xA5 (asking for exec changes nothing: every leaf is executable)
        (2, 0x1_4000_0000, R | X, 0x0000_0001_4000_00A5),
        (2, 0x1_4000_0000, R, 0x0000_0001_4000_00A5),
        # 4K supervisor-only read-only: P|A = 0x21, U/S clear
        (0, 0xABC000, R | PRIV, 0x0000_0000_00AB_C021),
    ],
)
def test_x86_64_leaf_encoding_matches_hand_computed_u64(level: int, oa: int, perm: Perm, expected: int) -> None:
    fmt = X86_64Format(4)
    assert fmt.make_leaf(oa, level, perm) == expected
    assert fmt.entry_type(expected, level) is EntryType.OA
    assert fmt.leaf_oa(expected, level) == oa


@pytest.mark.parametrize("levels", [4, 5])
def test_x86_64_never_writes_xd_whatever_the_rights(levels: int) -> None:
    fmt = X86_64Format(levels)
    for level in (0, 1, 2):
        for perm in (R, R | W, W, R | PRIV, R | W | PRIV, R | X, R | W | X):
            assert fmt.make_leaf(1 << (12 + 9 * level), level, perm) >> 63 == 0
    assert not fmt.supported_perm & X and not fmt.features & PtFeature.EXEC
    # an entry written by someone else that carries XD still decodes as not executable
    assert not fmt.entry_perm(0x8000_0000_0000_1067, 0) & X


@pytest.mark.parametrize("level", [1, 2, 3])
def test_x86_64_table_entry_is_p_rw_us_a(level: int) -> None:
    fmt = X86_64Format(4)
    assert fmt.make_table(0x5000) == 0x5027
    assert fmt.entry_type(0x5027, level) is EntryType.TABLE
    assert fmt.table_oa(0x5027) == 0x5000


def test_x86_64_ps_bit_is_reserved_only_in_pml4e_and_pml5e() -> None:
    for levels in (4, 5):
        fmt = X86_64Format(levels)
        for level in range(levels):
            assert bool(fmt.reserved_mask(level, False) & 0x80) == (level >= 3)
    # a PML4E with PS decodes as a table whose reserved bit the walker will see
    assert X86_64Format(4).entry_type(0x10A7, 3) is EntryType.TABLE


def test_x86_64_large_leaf_reserved_bits_and_address_width() -> None:
    fmt = X86_64Format(4, oasz_lg2=48)
    assert fmt.reserved_mask(1, True) & ((1 << 21) - 1) == 0x1FE000  # bits 20:13
    assert fmt.reserved_mask(2, True) & ((1 << 30) - 1) == 0x3FFFE000  # bits 29:13
    assert fmt.reserved_mask(0, True) == 0x000F_0000_0000_0000  # bits 51:48
    assert fmt.reserved_mask(1, True) & (1 << 12) == 0  # PAT of a large leaf is legal


@pytest.mark.parametrize(
    ("levels", "va", "ok"),
    [
        (4, 0x0000_7FFF_FFFF_F000, True),
        (4, 0x0000_8000_0000_0000, False),
        (4, 0xFFFF_8000_0000_0000, True),
        (4, 0xFFFE_FFFF_FFFF_F000, False),
        (5, 0x00FF_FFFF_FFFF_F000, True),
        (5, 0x0100_0000_0000_0000, False),
        (5, 0xFF00_0000_0000_0000, True),
        (5, 0xFE00_0000_0000_0000, False),
    ],
)
def test_x86_64_canonical_rule_is_sign_extension(levels: int, va: int, ok: bool) -> None:
    assert X86_64Format(levels).is_canonical(va) is ok


# -- VT-d second stage ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("level", "oa", "perm", "expected"),
    [
        (2, 0x8000_0000, R, 0x8000_0081),  # 1G read-only: R|PS
        (1, 0x20_0000, R | W, 0x20_0083),  # 2M RW: R|W|PS
        (0, 0x3000, W, 0x3002),  # 4K write-only
        (0, 0x1_0000_0000, R | W | X, 0x1_0000_0003),  # X needs SSEE: never written
    ],
)
def test_vtd_ss_leaf_encoding_matches_hand_computed_u64(level: int, oa: int, perm: Perm, expected: int) -> None:
    fmt = VtdSsFormat(4)
    assert fmt.make_leaf(oa, level, perm) == expected
    assert fmt.entry_type(expected, level) is EntryType.OA


def test_vtd_ss_has_no_present_bit_and_tables_are_rw() -> None:
    fmt = VtdSsFormat(4)
    assert fmt.make_table(0x7000) == 0x7003
    assert fmt.entry_type(0x7000 | 0x4, 1) is EntryType.EMPTY  # X alone is not present
    assert fmt.entry_type(0x7001, 1) is EntryType.TABLE
    with pytest.raises(ValueError):
        fmt.make_leaf(0x1000, 0, Perm.EXEC)


def test_vtd_ss_reserved_masks_match_qemu() -> None:
    fmt = VtdSsFormat(4, oasz_lg2=52)
    low = (1 << 32) - 1
    assert fmt.reserved_mask(3, False) & low == 0x880  # PML4E: PS + SNP
    assert fmt.reserved_mask(1, True) & low == 0x1FF800
    assert fmt.reserved_mask(2, True) & low == 0x3FFFF800
    assert fmt.reserved_mask(0, True) & (1 << 62)  # TM


@pytest.mark.parametrize(("levels", "bits"), [(3, 39), (4, 48), (5, 57)])
def test_vtd_ss_widths_follow_aw(levels: int, bits: int) -> None:
    fmt = VtdSsFormat(levels)
    assert fmt.vasz_lg2 == bits
    assert fmt.is_canonical((1 << bits) - 1) and not fmt.is_canonical(1 << bits)
    assert fmt.aw == levels - 2


# -- generic format properties, every configuration -------------------------------
CONFIGS = sorted(FORMAT_CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_table_radix_levels_decode_contiguous_va_bits(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    covered = 0
    for level in range(fmt.levels):
        for bit in range(ITEMS_LG2):
            va = 1 << (item_lg2(level) + bit)
            assert fmt.index(va, level) == 1 << bit
            assert all(fmt.index(va, other) == 0 for other in range(fmt.levels) if other != level)
        covered += ITEMS_LG2
    assert 12 + covered == fmt.vasz_lg2


@pytest.mark.parametrize("cfg", CONFIGS)
def test_possible_sizes_are_4k_2m_1g_at_existing_levels(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    assert pgsize_bitmap(fmt) == (1 << 12) | (1 << 21) | (1 << 30)
    assert 0 in fmt.leaf_levels and max(fmt.leaf_levels) <= fmt.top_level


@pytest.mark.parametrize("cfg", CONFIGS)
def test_table_entry_roundtrips_at_every_level(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    for level in range(1, fmt.levels):
        for addr in (0x1000, 0x000F_FFFF_FFFF_F000):
            entry = fmt.make_table(addr)
            assert fmt.entry_type(entry, level) is EntryType.TABLE
            assert fmt.table_oa(entry) == addr
            assert entry & fmt.reserved_mask(level, False) == 0


@pytest.mark.parametrize("cfg", CONFIGS)
def test_attrs_roundtrip_gives_identical_entry(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    flags = [f for f in (R, W, X, PRIV) if f & fmt.supported_perm]
    for level in fmt.leaf_levels:
        size = 1 << item_lg2(level)
        for oa in (0, size, (1 << fmt.oasz_lg2) - size):
            for n in range(len(flags) + 1):
                for combo in itertools.combinations(flags, n):
                    perm = Perm.NONE
                    for f in combo:
                        perm |= f
                    if not perm & (R | W):
                        continue
                    entry = fmt.make_leaf(oa, level, perm)
                    assert fmt.entry_type(entry, level) is EntryType.OA
                    assert fmt.leaf_oa(entry, level) == oa
                    assert entry & fmt.reserved_mask(level, True) == 0
                    again = fmt.make_leaf(fmt.leaf_oa(entry, level), level, fmt.entry_perm(entry, level))
                    assert again == entry


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sign_extend_feature_matches_canonical_rule(cfg: str) -> None:
    fmt = FORMAT_CONFIGS[cfg]()
    top = (1 << 64) - 0x1000
    assert fmt.is_canonical(top) == bool(fmt.features & PtFeature.SIGN_EXTEND)


def _ref_best_pgsize(bitmap: int, va: int, oa: int, length: int) -> int | None:
    best = None
    for lg2 in range(64):
        size = 1 << lg2
        if bitmap & size and size <= length and va % size == 0 and oa % size == 0:
            best = lg2
    return best


@given(
    bitmap=st.integers(0, (1 << 40) - 1) | st.sampled_from([0, (1 << 12) | (1 << 21) | (1 << 30)]),
    va=st.integers(0, (1 << 48) - 1) | st.sampled_from([0, (1 << 48) - 1]),
    oa=st.integers(0, (1 << 52) - 1),
    length=st.integers(0, 1 << 36),
)
def test_best_pgsize_matches_brute_force(bitmap: int, va: int, oa: int, length: int) -> None:
    assert best_pgsize_lg2(bitmap, va, oa, length) == _ref_best_pgsize(bitmap, va, oa, length)
