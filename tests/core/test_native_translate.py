"""The compiled translation loop and DMA copy against the reference: the
same operation sequence (translations, copies, invalidations, context
invalidations) through the Python ``IommuUnit`` (paging-structure caches off)
+ ``DmaMemory`` and through ``NativeWalker`` + ``NativeIotlb`` (owner bank and
generation passed as the unit passes them) gives the same runs, faults, walk
counts, IOTLB counters and bytes. Skipped when the compiled core is not built."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.dma import DmaMemory
from pviommu.pt.common import RW
from tests.kit.native_env import OWNER, Kept, World, build_world, scribble

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)

SLOT = 4
TOP = 1 << 64
CONFIGS = [(4, 4), (3, 5), (5, 4)]
Op = tuple[Any, ...]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    out = Kept()
    for s2, fs in CONFIGS:
        w = build_world(Path(tmp_path_factory.mktemp(f"t{s2}{fs}")), 21, s2_levels=s2, fs_levels=fs, mappings=20)
        out[(s2, fs)] = (w, w.snapshot())
    yield out
    out.close()


#: what a stage-2-only (identity) context maps: GPA ranges of the world
IDENTITY = [(2 << 20, SZ_2M), (12 << 20, 4 << 20), (4 << 20, 64 * SZ_4K), (8 << 20, SZ_2M)]


def _range(rnd: random.Random, world: World, mapped: list[tuple[int, int]]) -> tuple[int, int]:
    """A DMA range: inside, across the end of, or around what is mapped."""
    iova, size = rnd.choice(mapped[-2:] if rnd.random() < 0.6 else mapped)  # mostly the dense part
    start = iova + rnd.choice([0, rnd.randrange(size), size - SZ_4K, size - 8, max(0, size - SZ_4K) // 2])
    length = rnd.choice([1, 8, 64, SZ_4K, SZ_4K + 1, 3 * SZ_4K, 20 * SZ_4K, SZ_2M, rnd.randrange(1, 4 * SZ_4K)])
    if rnd.random() < 0.6:  # mostly inside the mapping
        length = max(1, min(length, iova + size - start))
    return start % TOP, max(1, min(length, TOP - start % TOP))


def ops(rnd: random.Random, world: World, n: int, *, identity: bool = False) -> list[Op]:
    out: list[Op] = []
    mapped = IDENTITY if identity else world.mapped
    for _ in range(n):
        kind = rnd.choice(["tr", "tr", "tr", "tr", "copy", "copy", "all", "domain", "pages", "context"])
        if kind == "tr":
            out.append(("tr", *_range(rnd, world, mapped), rnd.random() < 0.4))
        elif kind == "copy":
            src, n1 = _range(rnd, world, mapped)
            dst, n2 = _range(rnd, world, mapped)
            length = min(n1, n2, TOP - src, TOP - dst)
            if rnd.random() < 0.3:  # overlapping, both directions
                dst = (src + rnd.choice([-SZ_4K, -8, 8, SZ_4K, 100])) % TOP
                length = min(length, TOP - dst)
            out.append(("copy", src, dst, max(1, length)))
        elif kind == "pages":
            out.append(("pages", rnd.choice(mapped)[0] + rnd.randrange(4) * SZ_4K, rnd.choice([0, 0, 1, 9, 30])))
        else:
            out.append((kind,))
    return out


def run_reference(world: World, ctx: ContextEntry, seq: list[Op], *, swap: bool = False) -> tuple[list[Any], Any]:
    """The sequence through the Python unit; with ``swap``, the same unit (its
    own loop) with the compiled IOTLB and walker put in its place."""
    unit = IommuUnit(world.host, pscache=False, native=False)
    if swap:
        unit.iotlb = native.NativeIotlb()
        unit.walker = native.NativeWalker(world.host)
    dma = DmaMemory(world.host, unit.bind(SLOT))
    out: list[Any] = []
    for op in seq:
        walks, reads = unit.stats.walks, unit.stats.walk_reads
        if op[0] == "tr":
            r = unit.translate(SLOT, Iova(op[1]), op[2], op[3])
            f = r.fault
            out.append(("tr", r.runs, None if f is None else (int(f.iova), f.reason, f.detail),
                        unit.stats.walks - walks, unit.stats.walk_reads - reads))
        elif op[0] == "copy":
            res = dma.copy(Iova(op[1]), Iova(op[2]), op[3])
            f = res.fault
            records = [(int(x.iova), x.write, int(x.reason), x.detail) for x in unit.drain_faults()]
            out.append(("copy", res.done, None if f is None else (int(f.iova), f.write, f.reason, f.detail), records,
                        unit.stats.walks - walks, unit.stats.walk_reads - reads))
        elif op[0] == "all":
            out.append(unit.invalidate_all())
        elif op[0] == "domain":
            out.append(unit.invalidate_domain(ctx.did))
        elif op[0] == "context":
            out.append(unit.invalidate_context(SLOT))
        else:
            out.append(unit.invalidate_pages(ctx.did, op[1], op[2]))
        unit.drain_faults()
    return out, unit.iotlb.stats


def run_native(world: World, ctx: ContextEntry, owner_bank: int, seq: list[Op]) -> tuple[list[Any], Any]:
    """The sequence through the compiled calls alone, each handed the owner
    bank and the IOTLB generation read first, as the unit hands them."""
    walker, iotlb = native.NativeWalker(world.host), native.NativeIotlb()
    out: list[Any] = []
    for op in seq:
        generation = iotlb.generation
        if op[0] == "tr":
            t = walker.translate(iotlb, ctx, Iova(op[1]), op[2], op[3], owner_bank, generation)
            assert t is not None
            f = t.fault
            out.append(("tr", t.runs, None if f is None else (int(t.fault_iova), int(f.reason), f.detail),
                        t.walks, t.reads))
        elif op[0] == "copy":
            c = walker.copy(iotlb, ctx, Iova(op[1]), Iova(op[2]), op[3], owner_bank, generation)
            assert c is not None
            side = c.stopped_by if c.done < op[3] else None
            reported = None
            if side is not None and side.fault is not None:
                reported = (int(side.fault_iova), side is c.dst, int(side.fault.reason), side.fault.detail)
            records = [(int(t.fault_iova), t is c.dst, int(t.fault.reason), t.fault.detail)
                       for t in (c.src, c.dst) if t.fault is not None]
            out.append(("copy", c.done, reported, records, c.src.walks + c.dst.walks, c.src.reads + c.dst.reads))
        elif op[0] == "all":
            out.append(iotlb.invalidate_all())
        elif op[0] == "domain":
            out.append(iotlb.invalidate_domain(ctx.did))
        elif op[0] == "context":  # the unit's context invalidation, as the IOTLB sees it
            out.append(iotlb.bump_generation())
        else:
            out.append(iotlb.invalidate_pages(ctx.did, op[1], op[2]))
    return out, iotlb.stats


def compare(world: World, ctx: ContextEntry, seq: list[Op], owner_bank: int = OWNER) -> list[Any]:
    world.install(SLOT, ctx, owner_bank)  # the unit reads both (the compiled loop is handed them)
    before = world.snapshot()
    ref, ref_stats = run_reference(world, ctx, seq)
    after_ref = world.snapshot()
    world.restore(before)
    got, nat_stats = run_native(world, ctx, owner_bank, seq)
    after_nat = world.snapshot()
    world.restore(before)
    for op, r, g in zip(seq, ref, got, strict=True):
        assert g == r, f"after {op}"
    assert nat_stats == ref_stats
    for index, (a, b) in enumerate(zip(after_ref, after_nat, strict=True)):
        assert a == b, f"bank {index} differs"
    return ref


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=st.sampled_from(CONFIGS), pick=st.integers(0, 2**32), hostile=st.integers(0, 8),
       which=st.sampled_from(["nested", "nested", "nested", "s2", "s2", "root", "other"]))
def test_native_translate_and_copy_equal_reference_over_sequences(
    worlds: Kept, config: tuple[int, int], pick: int, hostile: int,
    which: str,
) -> None:
    world, pristine = worlds[config]
    rnd = random.Random(pick)
    try:
        scribble(rnd, world, hostile, stage2=False)
        ctx = {"nested": world.nested(), "s2": world.s2_only(), "other": world.nested(),
               "root": world.nested(fsptptr=rnd.choice(world.s1_tables))}[which]
        owner_bank = 2 if which == "other" else OWNER  # "other": the tables are not the owner's (the fence)
        result = compare(world, ctx, ops(rnd, world, 24, identity=which == "s2"), owner_bank)
        for r in result:
            if isinstance(r, tuple):
                event(f"{r[0]} {'fault' if r[2] is not None else 'ok'}")
    finally:
        world.restore(pristine)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=st.sampled_from(CONFIGS), pick=st.integers(0, 2**32), hostile=st.integers(0, 8),
       which=st.sampled_from(["nested", "nested", "s2", "root"]))
def test_python_unit_with_the_compiled_iotlb_and_walker_swapped_in_equals_reference(
    worlds: Kept, config: tuple[int, int], pick: int, hostile: int, which: str,
) -> None:
    """The drop-in route: ``IommuUnit`` keeps its own loop, fault records and
    counters, with ``NativeIotlb`` and ``NativeWalker`` in place of its IOTLB
    and walker; every answer, counter and byte is the reference's."""
    world, pristine = worlds[config]
    rnd = random.Random(pick)
    try:
        scribble(rnd, world, hostile, stage2=False)
        ctx = {"nested": world.nested(), "s2": world.s2_only(),
               "root": world.nested(fsptptr=rnd.choice(world.s1_tables))}[which]
        seq = ops(rnd, world, 20, identity=which == "s2")
        world.install(SLOT, ctx)
        before = world.snapshot()
        ref, ref_stats = run_reference(world, ctx, seq)
        after_ref = world.snapshot()
        world.restore(before)
        got, got_stats = run_reference(world, ctx, seq, swap=True)
        after = world.snapshot()
        world.restore(before)
        for op, r, g in zip(seq, ref, got, strict=True):
            assert g == r, f"after {op}"
        assert got_stats == ref_stats and after == after_ref
    finally:
        world.restore(pristine)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(tmp_path, 5, mappings=0, clear_ad=0, odd_tables=0)
    yield w
    w.close()


def test_native_copy_of_a_long_buffer_moves_the_same_bytes_without_the_gil(world: World) -> None:
    """A 1 MiB copy over 4 KiB pages (copied with the GIL released) while
    another thread keeps translating: the same bytes as the reference, and
    the other thread ran meanwhile."""
    src, dst = 0x70_0000_0000, 0x70_4000_0000
    world.s1.map(Iova(src), Gpa(10 << 20), 1 << 20, RW)
    world.s1.map(Iova(dst), Gpa(12 << 20), 1 << 20, RW)
    world.ram.write(Gpa(10 << 20), random.Random(1).randbytes(1 << 20))
    ctx = world.nested()
    walker, iotlb = native.NativeWalker(world.host), native.NativeIotlb()
    stop, spins = threading.Event(), [0]

    def translate_meanwhile() -> None:
        while not stop.is_set():
            walker.translate(iotlb, ctx, Iova(src), SZ_4K, False, OWNER, iotlb.generation)
            spins[0] += 1

    t = threading.Thread(target=translate_meanwhile)
    t.start()
    try:
        for _ in range(20):
            c = walker.copy(iotlb, ctx, Iova(src), Iova(dst), 1 << 20, OWNER, iotlb.generation)
            assert c is not None and c.done == 1 << 20 and c.stopped_by is None
    finally:
        stop.set()
        t.join()
    assert world.ram.read(Gpa(12 << 20), 1 << 20) == world.ram.read(Gpa(10 << 20), 1 << 20)
    assert spins[0] > 0
    seq = [("copy", src, dst, 1 << 20), ("copy", src + 8, src, 1 << 19), ("copy", src, src + 100, 1 << 19)]
    compare(world, ctx, seq)


def test_native_translate_leaves_unfenced_contexts_to_the_reference(world: World) -> None:
    walker, iotlb = native.NativeWalker(world.host), native.NativeIotlb()
    ctx, gen = world.nested(), iotlb.generation
    assert walker.translate(iotlb, ctx, Iova(0x40_0000_0000), SZ_4K, False, 0, gen) is None
    assert walker.copy(iotlb, ctx, Iova(0x40_0000_0000), Iova(0x40_0000_1000), 8, 0, gen) is None
    with pytest.raises(ValueError, match="bad range"):
        walker.translate(iotlb, ctx, Iova(TOP - 8), 16, False, OWNER, gen)


def test_native_translate_with_a_stale_generation_inserts_nothing(world: World) -> None:
    """A translation handed a generation older than the IOTLB's (a context
    invalidation after the unit read it) walks and answers, but caches no entry
    and no extent: the next translation walks again."""
    iova = 0x41_0000_0000
    world.s1.map(Iova(iova), Gpa(12 << 20), 8 * SZ_4K, RW)
    walker, iotlb = native.NativeWalker(world.host), native.NativeIotlb()
    gen = iotlb.generation
    iotlb.bump_generation()
    t = walker.translate(iotlb, world.nested(), Iova(iova), 8 * SZ_4K, False, OWNER, gen)
    assert t is not None and t.fault is None and t.done == 8 * SZ_4K and t.walks == 8
    assert len(iotlb) == 0 and iotlb.stats.late_inserts_dropped == 8
    again = walker.translate(iotlb, world.nested(), Iova(iova), 8 * SZ_4K, False, OWNER, iotlb.generation)
    assert again is not None and again.walks == 8 and len(iotlb) == 8
