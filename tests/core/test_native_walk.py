"""The compiled nested walk against the reference (pviommu/iommu/nested.py):
same WalkOk/WalkFault (reason, detail text, entry reads), same Accessed/Dirty
updates byte for byte, same fences (the owner bank is the walk's argument,
as the unit takes it from the slot's owner record), on random and hostile
tables of every format configuration. Skipped when the compiled core is not built."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pviommu.addr import SZ_2M, SZ_4K, Gpa, Hpa, Iova
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.nested import ExplainStep, NestedWalker, WalkFault, WalkOk
from pviommu.iommu.pscache import PsCache
from pviommu.mem.bank import HostMemory, bank_base, bank_path
from pviommu.pt.common import RW, Perm
from pviommu.pt.fmt.x86_64 import A, D
from tests.kit.native_env import (
    BANK0,
    BIG_GPA,
    FOREIGN_GPA,
    HOLE,
    MSI_GPA,
    OWNER,
    RAM,
    RO,
    Kept,
    World,
    build_world,
    contexts,
    iovas,
    scribble,
)

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)

CONFIGS = [(s2, fs) for s2 in (3, 4, 5) for fs in (4, 5)]
SEEDS = (11, 12)
#: (context, owner bank, IOVA, write)
Case = tuple[ContextEntry, int, int, bool]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    """One world per format configuration and seed, with its pristine bytes."""
    out = Kept()
    for s2, fs in CONFIGS:
        for seed in SEEDS:
            w = build_world(Path(tmp_path_factory.mktemp(f"w{s2}{fs}{seed}")), seed, s2_levels=s2, fs_levels=fs)
            out[(s2, fs, seed)] = (w, w.snapshot())
    yield out
    out.close()


def compare(world: World, cases: list[Case], fs_mgaw: int = 48, *, events: bool = False) -> list[WalkOk | WalkFault]:
    """Run ``cases`` with the reference and then, from the same bytes, with the
    compiled walker: equal results and equal banks afterwards, or fail."""
    ref = NestedWalker(world.host, fs_mgaw_lg2=fs_mgaw)
    nat = native.NativeWalker(world.host, fs_mgaw_lg2=fs_mgaw)
    before = world.snapshot()
    expected = [ref.walk(c, Iova(i), w, owner_bank=b) for c, b, i, w in cases]
    after_ref = world.snapshot()
    world.restore(before)
    got = [nat.walk(c, Iova(i), w, owner_bank=b) for c, b, i, w in cases]
    after_nat = world.snapshot()
    world.restore(before)
    for (ctx, bank, iova, write), e, g in zip(cases, expected, got, strict=True):
        assert g == e, f"IOVA {iova:#x} write={write} ctx={ctx} owner bank {bank}"
    assert nat.fallbacks == sum(1 for _, b, _, _ in cases if b <= 0)  # the compiled path really ran
    for index, (a, b) in enumerate(zip(after_ref, after_nat, strict=True)):
        if a != b:
            off = next(i for i in range(0, len(a), 8) if a[i : i + 8] != b[i : i + 8])
            pytest.fail(f"bank {index} differs at {off:#x}: reference {a[off:off + 8].hex()}, "
                        f"native {b[off:off + 8].hex()}")
    # the fences, independently of the reference: bank 0 and the other partition never written
    assert after_nat[0] == before[0] and after_nat[2] == before[2]
    for r in expected if events else []:
        event(r.reason.name if isinstance(r, WalkFault) else f"ok 2^{r.size_lg2}")
    return expected


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=st.sampled_from(CONFIGS), seed=st.sampled_from(SEEDS), pick=st.integers(0, 2**32),
       fs_mgaw=st.sampled_from([48, 48, 39, 52]))
def test_native_walk_equals_reference_on_random_tables(
    worlds: Kept, config: tuple[int, int], seed: int, pick: int,
    fs_mgaw: int,
) -> None:
    world, pristine = worlds[(*config, seed)]
    rnd = random.Random(pick)
    ctxs = [world.nested(), world.s2_only()]
    cases = [(rnd.choice(ctxs), OWNER, iova, write) for iova in iovas(rnd, world, 40) for write in (False, True)]
    try:
        compare(world, cases, fs_mgaw, events=True)
    finally:
        world.restore(pristine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=st.sampled_from(CONFIGS), seed=st.sampled_from(SEEDS), pick=st.integers(0, 2**32),
       writes=st.integers(1, 24), stage2=st.booleans())
def test_native_walk_equals_reference_on_hostile_tables_and_contexts(
    worlds: Kept, config: tuple[int, int], seed: int, pick: int,
    writes: int, stage2: bool,
) -> None:
    world, pristine = worlds[(*config, seed)]
    rnd = random.Random(pick)
    try:
        scribble(rnd, world, writes, stage2=stage2)
        ctxs = contexts(rnd, world)
        cases = [(*rnd.choice(ctxs), iova, write) for iova in iovas(rnd, world, 30) for write in (False, True)]
        compare(world, cases, events=True)
    finally:
        world.restore(pristine)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(tmp_path, 3, mappings=0, clear_ad=0, odd_tables=0)
    yield w
    w.close()


def _map(world: World, iova: int, gpa: int, size: int = SZ_4K, perm: Perm = RW) -> int:
    world.s1.map(Iova(iova), Gpa(gpa), size, perm)
    return iova


def _leaf_slot(world: World, iova: int) -> Gpa:
    """GPA of the stage-1 entry that maps ``iova`` (its last walk step)."""
    return Gpa(world.s1.walk(Iova(iova))[-1].table + 8 * world.s1.walk(Iova(iova))[-1].index)


def _s2_leaf_hpa(world: World, gpa: int) -> Hpa:
    step = world.s2.walk(Gpa(gpa))[-1]
    return Hpa(step.table + 8 * step.index)


def _reason_case(world: World, reason: FaultReason, tmp: Path) -> tuple[World, Case]:
    """A walk the reference faults with ``reason`` (checked by the caller)."""
    where, (ctx, iova, write) = _reason_walk(world, reason, tmp)
    return where, (ctx, OWNER, iova, write)


def _reason_walk(world: World, reason: FaultReason, tmp: Path) -> tuple[World, tuple[ContextEntry, int, bool]]:
    base = 0x10_0000_0000
    nested = world.nested()
    if reason is FaultReason.FS_BEYOND_MGAW:  # a 52-bit stage-1 output beyond the 48-bit stage 2
        _map(world, base, 1 << 48)
        return world, (nested, base, False)
    if reason is FaultReason.FS_NOT_PRESENT:
        return world, (nested, base, False)
    if reason is FaultReason.FS_RESERVED:
        _map(world, base, 12 << 20)
        slot = _leaf_slot(world, base)
        world.ram.write_u64(slot, world.ram.read_u64(slot) | 1 << 50)  # above the 48-bit output width
        return world, (nested, base, False)
    if reason is FaultReason.SS_NO_READ_FS_TOP:
        world.host.write_u64(_s2_leaf_hpa(world, world.s1.root), world.hpa(world.s1.root) | 0x2)  # W only
        return world, (nested, base, False)
    if reason is FaultReason.SS_NO_READ_FS:
        _map(world, base, 12 << 20)
        table = world.s1.walk(Iova(base))[-1].table
        world.host.write_u64(_s2_leaf_hpa(world, table), int(world.hpa(table)) | 0x2)
        return world, (nested, base, False)
    if reason is FaultReason.SS_NO_WRITE_AD:
        _map(world, base, 12 << 20)
        slot = _leaf_slot(world, base)
        world.ram.write_u64(slot, world.ram.read_u64(slot) & ~A)
        table = world.s1.walk(Iova(base))[-1].table
        world.host.write_u64(_s2_leaf_hpa(world, table), int(world.hpa(table)) | 0x1)  # R only
        return world, (nested, base, False)
    if reason is FaultReason.SS_ACCESS:
        _map(world, base, FOREIGN_GPA)  # stage 2 sends this page into the other partition
        return world, (nested, base, False)
    if reason is FaultReason.SS_NOT_PRESENT:
        _map(world, base, HOLE[0])
        return world, (nested, base, False)
    if reason is FaultReason.SS_RESERVED:
        _map(world, base, 12 << 20)
        hpa = _s2_leaf_hpa(world, 12 << 20)
        world.host.write_u64(hpa, world.host.read_u64(hpa) | 1 << 11)  # SNP without snoop control
        return world, (nested, base, False)
    if reason is FaultReason.SS_BAD_ROOT:  # a second view of the host without bank 0
        other = tmp / "no-bank0"
        other.mkdir()
        os.link(bank_path(world.host.directory, 1), bank_path(other, 1))
        _map(world, base, 12 << 20)
        alone = dataclasses.replace(world, host=HostMemory(other))
        return alone, (nested, base, False)
    if reason is FaultReason.NON_CANONICAL:
        return world, (nested, 1 << 47, False)
    if reason is FaultReason.USER_SUPERVISOR:
        _map(world, base, 12 << 20, perm=RW | Perm.PRIV)
        return world, (nested, base, False)
    if reason is FaultReason.SS_BEYOND_MAX:
        return world, (world.s2_only(), 1 << 50, False)
    if reason is FaultReason.NO_WRITE:
        _map(world, base, 12 << 20, perm=Perm.READ)
        return world, (nested, base, True)
    if reason is FaultReason.NO_READ:
        _map(world, base, 12 << 20)
        world.host.write_u64(_s2_leaf_hpa(world, 12 << 20), int(world.hpa(12 << 20)) | 0x2 | 0x80)  # W only
        return world, (nested, base, False)
    if reason is FaultReason.MSI_WINDOW:
        _map(world, base, MSI_GPA)
        return world, (nested, base, False)
    raise AssertionError(f"no case for {reason!r}")


#: every reason the walker itself produces (the unit adds the PASID-entry and 64-bit ones)
WALK_REASONS = [r for r in FaultReason if r not in (
    FaultReason.PASID_ENTRY_ACCESS, FaultReason.PASID_ENTRY_NOT_PRESENT, FaultReason.PASID_ENTRY_RESERVED,
    FaultReason.PASID_ENTRY_INVALID, FaultReason.FS_ACCESS, FaultReason.FS_TOP_ACCESS, FaultReason.BEYOND_HW_MAX)]


@pytest.mark.parametrize("reason", WALK_REASONS, ids=lambda r: r.name)
def test_every_walk_fault_reason_of_the_reference_is_reproduced(world: World, reason: FaultReason,
                                                                tmp_path: Path) -> None:
    where, case = _reason_case(world, reason, tmp_path)
    try:
        result = compare(where, [case], fs_mgaw=52 if reason is FaultReason.FS_BEYOND_MGAW else 48)[0]
        assert isinstance(result, WalkFault) and result.reason is reason, result
    finally:
        if where is not world:
            where.host.close()


def test_accessed_and_dirty_bits_set_by_native_walks_match_reference(world: World) -> None:
    """Tables without A/D: a read walk sets A at every level and no D; a write
    walk then sets D on the leaf only, in both implementations alike."""
    iova_4k, iova_2m = _map(world, 0x20_0000_0000, 12 << 20), _map(world, 0x20_4000_0000, 14 << 20, SZ_2M)
    slots = []
    for iova in (iova_4k, iova_2m):
        for step in world.s1.walk(Iova(iova)):
            slot = Gpa(step.table + 8 * step.index)
            world.ram.write_u64(slot, world.ram.read_u64(slot) & ~(A | D))
            slots.append(slot)
    before = [world.ram.read_u64(s) for s in slots]
    ctx = world.nested()
    compare(world, [(ctx, OWNER, iova_4k, False), (ctx, OWNER, iova_2m, False)])
    nat = native.NativeWalker(world.host)
    for iova in (iova_4k, iova_2m):
        assert isinstance(nat.walk(ctx, Iova(iova), False, owner_bank=OWNER), WalkOk)
    after_read = [world.ram.read_u64(s) for s in slots]
    assert all(a == b | A for a, b in zip(after_read, before, strict=True))
    compare(world, [(ctx, OWNER, iova_4k, True), (ctx, OWNER, iova_2m, True)])
    for iova in (iova_4k, iova_2m):
        assert isinstance(nat.walk(ctx, Iova(iova), True, owner_bank=OWNER), WalkOk)
    leaves = {_leaf_slot(world, iova_4k), _leaf_slot(world, iova_2m)}
    for slot, old in zip(slots, after_read, strict=True):
        assert world.ram.read_u64(slot) == (old | D if slot in leaves else old)


def test_shim_hands_trace_dry_run_cache_and_unfenced_contexts_to_the_reference(world: World) -> None:
    iova = _map(world, 0x30_0000_0000, 12 << 20)
    ctx = world.nested()
    ref, nat = NestedWalker(world.host), native.NativeWalker(world.host)
    ref_trace: list[ExplainStep] = []
    nat_trace: list[ExplainStep] = []
    b = OWNER
    assert (nat.walk(ctx, Iova(iova), False, nat_trace, owner_bank=b)
            == ref.walk(ctx, Iova(iova), False, ref_trace, owner_bank=b))
    assert nat_trace == ref_trace and len(nat_trace) == ref.walk(ctx, Iova(iova), False, owner_bank=b).reads + 1
    assert (nat.walk(ctx, Iova(iova), True, owner_bank=b, dry_run=True)
            == ref.walk(ctx, Iova(iova), True, owner_bank=b, dry_run=True))
    assert (nat.walk(ctx, Iova(iova), False, owner_bank=b, cache=PsCache()).reads
            == ref.walk(ctx, Iova(iova), False, owner_bank=b, cache=PsCache()).reads)
    # no owner bank (an unowned slot; the unit never walks one): both fault it at the fence
    unfenced = ref.walk(ctx, Iova(iova), False, owner_bank=0)
    assert nat.walk(ctx, Iova(iova), False, owner_bank=0) == unfenced
    assert isinstance(unfenced, WalkFault) and unfenced.reason is FaultReason.SS_ACCESS
    assert nat.fallbacks == 4
    assert nat.walk(ctx, Iova(iova), False, owner_bank=b) == ref.walk(ctx, Iova(iova), False, owner_bank=b)
    assert nat.fallbacks == 4
    with pytest.raises(TypeError, match="owner_bank"):  # no default, in both
        nat.walk(ctx, Iova(iova), False)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="owner_bank"):
        ref.walk(ctx, Iova(iova), False)  # type: ignore[call-arg]


def test_native_walk_never_reaches_a_bank_the_host_forgot(world: World) -> None:
    """A bank dropped from HostMemory (its partition destroyed) is neither read
    nor kept mapped by the compiled walker: the walk faults as the reference does."""
    iova = _map(world, 0x30_0000_0000, 12 << 20)
    nat, ctx = native.NativeWalker(world.host), world.nested()
    assert isinstance(nat.walk(ctx, Iova(iova), False, owner_bank=OWNER), WalkOk)
    bank1 = world.banks[1]
    world.host.destroy_bank(1)
    assert bank1._map.closed  # no export of ours kept it mapped
    got = nat.walk(ctx, Iova(iova), False, owner_bank=OWNER)
    assert got == NestedWalker(world.host).walk(ctx, Iova(iova), False, owner_bank=OWNER)
    assert isinstance(got, WalkFault) and got.reason is FaultReason.SS_ACCESS and "names no bank" in got.detail


def test_native_walk_of_a_large_final_page_past_the_bank_faults_like_reference(world: World) -> None:
    """A 1 GiB stage-1 leaf over the 1 GiB stage-2 leaf: the 1 GiB page runs
    past the owner's 16 MiB bank, so the fence faults (0x78) instead of
    handing out a translation into unmapped host memory."""
    iova = _map(world, 0x60_0000_0000, BIG_GPA, 1 << 30)
    result = compare(world, [(world.nested(), OWNER, iova + 5 * SZ_4K, False),
                             (world.nested(), OWNER, iova + RAM, False)])
    assert all(isinstance(r, WalkFault) and r.reason is FaultReason.SS_ACCESS for r in result)


def test_native_walk_handles_odd_bank_layouts_like_reference(world: World) -> None:
    """Read-only 2 MiB stage-2 leaves and the bank-0 edge: the stage-2 root
    pointer at the very end of bank 0, and just past it."""
    iova = _map(world, 0x50_0000_0000, RO[0] + SZ_2M - SZ_4K)
    edge = int(bank_base(0)) + BANK0 - SZ_4K
    cases = [(world.nested(), OWNER, iova, False), (world.nested(), OWNER, iova, True),
             (world.nested(ssptptr=edge), OWNER, iova, False), (world.nested(ssptptr=edge + SZ_4K), OWNER, iova, False)]
    result = compare(world, cases)
    assert isinstance(result[0], WalkOk) and isinstance(result[1], WalkFault)


@pytest.mark.parametrize("level", [0, 1, 3])
def test_xd_is_a_reserved_bit_in_both_walkers(world: World, level: int) -> None:
    """The context never enables NXE, so XD (bit 63) in any stage-1 entry --
    a leaf or a table entry -- faults 0x72 in both, with the same detail."""
    iova = _map(world, 0x31_0000_0000, 12 << 20)
    step = world.s1.walk(Iova(iova))[3 - level]
    slot = Gpa(step.table + 8 * step.index)
    world.ram.write_u64(slot, world.ram.read_u64(slot) | 1 << 63)
    result = compare(world, [(world.nested(), OWNER, iova, False)])[0]
    assert isinstance(result, WalkFault) and result.reason is FaultReason.FS_RESERVED


class _SpyView:
    """A bank view that is no buffer (a test's spy): the compiled walker cannot map it."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        return self.view[key]

    def __setitem__(self, key, value) -> None:  # type: ignore[no-untyped-def]
        self.view[key] = value


def test_a_bank_whose_view_is_no_buffer_is_left_to_the_reference(world: World) -> None:
    iova = _map(world, 0x32_0000_0000, 12 << 20)
    bank = world.banks[1]
    nat, ref = native.NativeWalker(world.host), NestedWalker(world.host)
    want = ref.walk(world.nested(), Iova(iova), False, owner_bank=OWNER)
    spy = _SpyView(bank.view)
    bank.view = spy  # type: ignore[assignment]
    try:
        got = nat.walk(world.nested(), Iova(iova), False, owner_bank=OWNER)
        tlb = native.NativeIotlb()
        assert nat.translate(tlb, world.nested(), Iova(iova), 8, False, OWNER, tlb.generation) is None
    finally:
        bank.view = spy.view
    assert got == want and isinstance(got, WalkOk) and nat.fallbacks == 1
