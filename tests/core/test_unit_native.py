"""``IommuUnit(native=True)`` against ``IommuUnit(native=False)``: the same
operation sequences -- translations, copies, invalidations of every scope,
context rewrites and owner-record changes, each with and without the
invalidation the hypervisor sends, guest unmaps with and without a flush --
on two identical systems give the same runs, faults, fault records, unit and
IOTLB counters and bytes, and no run ever lies outside the slot's current
owner bank. The raced invalidation (a context invalidated while a
translation that looked it up runs) inserts nothing in either. Skipped
where the compiled core is not built (except the constructor's rules)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pviommu.abi.invq import Invalidation
from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.errors import PageTableError
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.fault import FaultReason
from pviommu.iommu.owner import FLAG_QUARANTINED, OwnerRecord, write_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import bank_base, bank_index_of
from pviommu.mem.dma import DmaMemory, DmaRuns
from pviommu.pt.common import RW
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable
from pviommu.units import MiB
from tests.kit.core_env import DATA, DID, HOLE, RO, SLOT, NestedSystem, build_system

needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)
ROOT = Path(__file__).resolve().parents[2]

#: IOVAs both partitions map (partition 2 reuses partition 1's DID and IOVAs: the dangerous case)
SMALL = Iova(0x7F00_0000)  # 16 4 KiB pages
PAGES = 16
LARGE = Iova(0x8000_0000)  # one 2 MiB page
RO_PAGE = Iova(0x7F80_0000)  # partition 1: read-only in stage 2
HOLED = Iova(0x7F90_0000)  # partition 1: a GPA stage 2 does not map
UNMAPPED = Iova(0x9000_0000)
B_GPA = 2 * MiB  # partition 2's data GPAs


@dataclass
class Twin:
    """One of the two identical systems: partition 1 (bank 1) and 2 (bank 2)
    with their tables, the slot's owner, the unit under test."""

    system: NestedSystem
    s1_b: PageTable[Iova, Gpa, Gpa]
    s2_b: PageTable[Gpa, Any, Any]
    unit: IommuUnit
    dma: DmaMemory
    owner: int = 1  # the owner record's partition (= bank); 0 none, -1 quarantined
    epoch: int = 1
    unmapped: set[int] = field(default_factory=set)

    @property
    def host(self) -> Any:
        return self.system.host

    def contexts(self) -> dict[str, ContextEntry]:
        s = self.system
        return {"a": s.nested_ctx(), "b": ContextEntry.nested(DID, self.s1_b.root, 4, self.s2_b.root, 4),
                "b-tag": ContextEntry.nested(DID + 1, self.s1_b.root, 4, self.s2_b.root, 4),
                "a-identity": ContextEntry.identity(DID, s.s2.root, 4), "blocked": ContextEntry.blocked()}

    def owner_bank(self) -> int:
        return self.owner if self.owner > 0 else 0


def make_twin(directory: Path, *, native_unit: bool, pscache: bool = False) -> Twin:
    unit_options = {"native": True} if native_unit else {"native": False, "pscache": pscache}
    s = build_system(directory, p1_ram=16 * MiB, p2_ram=16 * MiB, **unit_options)
    s.s1.map(SMALL, Gpa(DATA), PAGES * SZ_4K, RW)
    s.s1.map(LARGE, Gpa(12 * MiB), SZ_2M, RW)
    s.s1.map(RO_PAGE, Gpa(RO[0]), SZ_4K, RW)
    s.s1.map(HOLED, Gpa(HOLE[0]), SZ_4K, RW)
    s.ram.write(Gpa(DATA), bytes(range(256)) * (PAGES * SZ_4K // 256))
    guest_b, s2_b = s.domain(2, (0, MiB))
    s1_b = guest_b.s1
    s1_b.map(SMALL, Gpa(B_GPA), PAGES * SZ_4K, RW)
    s1_b.map(LARGE, Gpa(4 * MiB), SZ_2M, RW)
    return Twin(s, s1_b, s2_b, s.unit, DmaMemory(s.host, s.unit.bind(SLOT)))


# -- operations -------------------------------------------------------------------------------
IOVAS = st.one_of(
    st.integers(0, PAGES - 1).map(lambda i: SMALL + i * SZ_4K),
    st.integers(0, PAGES * SZ_4K - 1).map(lambda o: SMALL + o),
    st.sampled_from([LARGE, LARGE + SZ_2M - SZ_4K, LARGE + 12345, RO_PAGE, HOLED, UNMAPPED, SMALL - SZ_4K]),
)
LENGTHS = st.sampled_from([1, 8, 64, SZ_4K, SZ_4K + 1, 3 * SZ_4K, PAGES * SZ_4K, SZ_2M, 100_000])
OPS = st.one_of(
    st.tuples(st.just("tr"), IOVAS, LENGTHS, st.booleans()),
    st.tuples(st.just("tr"), IOVAS, LENGTHS, st.booleans()),
    st.tuples(st.just("copy"), IOVAS, IOVAS, LENGTHS),
    st.tuples(st.just("inv"), st.sampled_from(["all", "domain", "other-domain", "pages", "pages-wide", "context",
                                               "every-context"])),
    st.tuples(st.just("ctx"), st.sampled_from(["a", "b", "b-tag", "a-identity", "blocked"]), st.booleans()),
    st.tuples(st.just("owner"), st.sampled_from([1, 2, 2, 0, -1]), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(st.just("remap"), st.integers(0, PAGES - 1)),
)


def apply(t: Twin, op: tuple[Any, ...]) -> Any:
    """Run ``op`` on ``t``; what it answered, in comparable form."""
    unit, kind = t.unit, op[0]
    if kind == "tr":
        _, iova, length, write = op
        runs = unit.translate(SLOT, Iova(iova), length, write)
        check_fence(t, runs)
        return runs, unit.drain_faults()
    if kind == "copy":
        _, src, dst, length = op
        res = t.dma.copy(Iova(src), Iova(dst), length)
        return res, unit.drain_faults()
    if kind == "inv":
        which = op[1]
        return {"all": Invalidation.everything(), "domain": Invalidation.domain(DID),
                "other-domain": Invalidation.domain(DID + 1),
                "pages": Invalidation.pages(DID, Iova(SMALL + 3 * SZ_4K), 0),
                "pages-wide": Invalidation.pages(DID, Iova(SMALL + 3 * SZ_4K), 9),
                "context": Invalidation.context(SLOT)}.get(which, Invalidation.context(None)).apply(unit)
    if kind == "ctx":  # the hypervisor rewrites the live entry (with or without telling the unit)
        _, which, flush = op
        write_context(t.host, SLOT, t.contexts()[which])
        if flush:
            unit.invalidate_context(SLOT)
            unit.invalidate_domain(DID)
            unit.invalidate_domain(DID + 1)
        return None
    if kind == "owner":  # a change of owner opens a new epoch (or a quarantine, or nobody)
        _, who, flush = op
        t.owner, t.epoch = who, t.epoch + 1
        record = (OwnerRecord(t.epoch, who, who) if who > 0 else
                  OwnerRecord(t.epoch, 1, 1, FLAG_QUARANTINED) if who < 0 else OwnerRecord(t.epoch))
        write_owner(t.host, SLOT, record)
        if flush:
            unit.invalidate_context(SLOT)
            unit.invalidate_all()
        return None
    if kind == "unmap":  # the guest of partition 1 unmaps a page (flushed at once, or not at all)
        _, page, flush = op
        if page in t.unmapped:
            return None
        gather: IotlbGather[Gpa] = IotlbGather()
        done = t.system.s1.unmap(Iova(SMALL + page * SZ_4K), SZ_4K, gather)
        t.unmapped.add(page)
        if flush:
            addr, am = gather.psi()
            return done, unit.invalidate_pages(DID, addr, am)
        return done
    if kind == "remap":
        page = op[1]
        if page not in t.unmapped:
            return None
        t.unmapped.discard(page)
        try:
            t.system.s1.map(Iova(SMALL + page * SZ_4K), Gpa(DATA + page * SZ_4K), SZ_4K, RW)
        except PageTableError as exc:
            return str(exc)
        return "mapped"
    raise AssertionError(op)


def check_fence(t: Twin, runs: DmaRuns) -> None:
    """Every run lies in the slot's current owner's bank, whatever the unit cached."""
    bank = t.owner_bank()
    if bank == 0:
        assert not runs.runs, f"{runs} with no owner"
    for run in runs.runs:
        assert bank_index_of(run.hpa) == bank, f"run {run} outside the owner bank {bank}"
        assert run.hpa + run.length <= bank_base(bank) + (16 * MiB)


def stats(t: Twin, *, reads: bool) -> tuple[Any, ...]:
    u = t.unit.stats
    return (u.walks, u.walk_reads if reads else None, u.context_reads, u.context_hits, u.epoch_changes,
            u.translations, dict(u.faults), t.unit.iotlb.stats, len(t.unit.iotlb))


def run_twins(ops: list[tuple[Any, ...]], *, pscache: bool = False) -> list[Any]:
    """``ops`` on a native and a Python twin, compared after every step."""
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        nat = make_twin(Path(d1), native_unit=True)
        ref = make_twin(Path(d2), native_unit=False, pscache=pscache)
        try:
            assert nat.unit.native is not None and nat.unit.pscache is None
            assert ref.unit.native is None and (ref.unit.pscache is not None) == pscache
            out = []
            for op in ops:
                got, want = apply(nat, op), apply(ref, op)
                assert got == want, (op, got, want)
                assert stats(nat, reads=not pscache) == stats(ref, reads=not pscache), op
                out.append(want)
            for a, b in ((nat.system.bank0, ref.system.bank0), (nat.system.bank1, ref.system.bank1),
                         (nat.system.bank2, ref.system.bank2)):
                assert a.read(0, a.size) == b.read(0, b.size), f"bank {a.index} differs (A/D bits, copies)"
            return out
        finally:
            nat.host.close()
            ref.host.close()


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.lists(OPS, min_size=4, max_size=40))
def test_native_unit_equals_python_unit_over_operation_sequences(ops: list[tuple[Any, ...]]) -> None:
    run_twins(ops)


@needs_native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.lists(OPS, min_size=4, max_size=30))
def test_native_unit_gives_the_answers_of_the_python_unit_with_paging_structure_caches(
    ops: list[tuple[Any, ...]],
) -> None:
    """The compiled unit has no paging-structure caches; it still answers
    (runs, faults, records, walks, bytes) as the cached Python unit does."""
    run_twins(ops, pscache=True)


SCENARIOS: dict[str, list[tuple[Any, ...]]] = {
    # partition 2 takes the slot with the same DID and IOVAs, no invalidation reaches the unit
    "new owner, no invalidation": [("tr", SMALL, 3 * SZ_4K, True), ("tr", LARGE, SZ_2M, False),
                                   ("ctx", "blocked", False), ("owner", 2, False), ("ctx", "b", False),
                                   ("tr", SMALL, 3 * SZ_4K, True), ("tr", LARGE, SZ_2M, False)],
    "new owner, old context still written": [("tr", SMALL, SZ_4K, False), ("owner", 2, False),
                                             ("tr", SMALL, SZ_4K, False), ("tr", LARGE, 8, True)],
    "owner gone": [("tr", SMALL, SZ_4K, False), ("owner", 0, False), ("tr", SMALL, SZ_4K, False),
                   ("owner", -1, True), ("tr", SMALL, SZ_4K, False), ("owner", 1, False), ("tr", SMALL, 8, False)],
    "context rewritten without invalidation": [("tr", SMALL, PAGES * SZ_4K, False), ("ctx", "a-identity", False),
                                               ("tr", SMALL, SZ_4K, False), ("inv", "context"),
                                               ("tr", SMALL, SZ_4K, False), ("tr", Iova(DATA), SZ_4K, True)],
    "stale IOTLB after an unmap without flush": [("tr", SMALL, PAGES * SZ_4K, False), ("unmap", 2, False),
                                                 ("tr", SMALL + 2 * SZ_4K, 8, False), ("inv", "pages"),
                                                 ("tr", SMALL + 2 * SZ_4K, 8, False), ("remap", 2),
                                                 ("tr", SMALL, PAGES * SZ_4K, True)],
}


@needs_native
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_native_unit_equals_python_unit_in_ownership_scenarios(name: str) -> None:
    out = run_twins(SCENARIOS[name])
    runs = [r[0] for r in out if isinstance(r, tuple) and isinstance(r[0], DmaRuns)]
    assert runs, "the scenario translated nothing"


@needs_native
def test_a_new_owner_reusing_the_tag_gets_its_own_ram_from_the_native_unit(tmp_path: Path) -> None:
    """Without any invalidation, the next owner's DMA lands in its own bank:
    the compiled unit drops what it cached when the epoch moved."""
    t = make_twin(tmp_path, native_unit=True)
    try:
        for op in SCENARIOS["new owner, no invalidation"][:2]:
            apply(t, op)
        first = t.unit.translate(SLOT, SMALL, 8, True)
        assert first.runs[0].hpa == t.system.bank1.hpa_of(DATA)
        for op in SCENARIOS["new owner, no invalidation"][2:5]:
            apply(t, op)
        after = t.unit.translate(SLOT, SMALL, 8, True)
        assert after.fault is None and after.runs[0].hpa == t.system.bank2.hpa_of(B_GPA)
        assert t.unit.stats.epoch_changes == 1
    finally:
        t.host.close()


# -- the raced invalidation --------------------------------------------------------------------
def _race_after_context(t: Twin, action: Callable[[], object]) -> None:
    """Run ``action`` once, right after the unit's next context lookup: the
    window in which a translation has its context but has not walked yet
    (the compiled loop runs holding the GIL, so no other thread can come later)."""
    unit = t.unit
    real = unit._context
    fired: list[bool] = []

    def racing(slot: int) -> Any:
        bound = real(slot)
        if not fired:
            fired.append(True)
            action()
        return bound

    unit._context = racing  # type: ignore[method-assign]


@needs_native
@pytest.mark.parametrize("native_unit", [True, False], ids=["native", "python"])
def test_a_translation_that_raced_a_context_invalidation_inserts_nothing(tmp_path: Path, native_unit: bool) -> None:
    """The hypervisor detaches the domain after the translation looked its
    context up: the translation completes (it began before), but none of its
    pages or extents is cached, in either unit, and the next one faults."""
    t = make_twin(tmp_path, native_unit=native_unit)
    try:
        def detach() -> None:
            write_context(t.host, SLOT, ContextEntry.blocked())
            t.unit.invalidate_context(SLOT)
            t.unit.invalidate_domain(DID)

        _race_after_context(t, detach)
        runs = t.unit.translate(SLOT, SMALL, PAGES * SZ_4K, False)
        assert runs.fault is None and runs.done == PAGES * SZ_4K
        cached = [i for i in range(PAGES)
                  if t.unit.iotlb.lookup(DID, int(SMALL) + i * SZ_4K, count=False) is not None]
        assert cached == [], f"pages {cached} were cached after the context was invalidated"
        assert len(t.unit.iotlb) == 0 and t.unit.iotlb.stats.late_inserts_dropped == PAGES
        after = t.unit.translate(SLOT, SMALL, 8, False)
        assert after.fault is not None and after.fault.reason == FaultReason.PASID_ENTRY_NOT_PRESENT
    finally:
        t.host.close()


@needs_native
def test_raced_invalidations_give_the_same_answers_in_both_units() -> None:
    """The same race (a context rewrite, an owner change, a flush of each
    scope right after the context lookup) in both units: same answers,
    counters and, for the next translations, the same state."""
    races: list[tuple[Any, ...]] = [("inv", "context"), ("inv", "all"), ("inv", "domain"), ("inv", "pages"),
                                    ("owner", 2, False), ("ctx", "b", True), ("unmap", 0, True)]
    for race in races:
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            twins = [make_twin(Path(d1), native_unit=True), make_twin(Path(d2), native_unit=False)]
            try:
                answers = []
                for t in twins:
                    apply(t, ("tr", SMALL + 8 * SZ_4K, 8 * SZ_4K, False))  # half of it cached
                    _race_after_context(t, functools.partial(apply, t, race))
                    first = t.unit.translate(SLOT, SMALL, PAGES * SZ_4K, True)
                    rest = [apply(t, ("tr", SMALL, PAGES * SZ_4K, w)) for w in (False, True)]
                    answers.append((first, t.unit.drain_faults(), rest, stats(t, reads=True)))
                assert answers[0] == answers[1], race
            finally:
                for t in twins:
                    t.host.close()


@needs_native
def test_concurrent_owner_changes_never_give_a_run_outside_an_owner_of_the_translation(tmp_path: Path) -> None:
    """One thread translates while another moves the slot between the two
    partitions (block, new owner record, new context; no invalidation at all):
    every run lies in the bank of a partition that owned the slot at some
    point during that translation, and the translating thread saw both."""
    t = make_twin(tmp_path, native_unit=True)
    owners: list[int] = [1]  # owner after each change (appended once it is written)
    stop, seen, bad = threading.Event(), set(), []

    def device() -> None:
        while not stop.is_set():
            before = len(owners)
            runs = t.unit.translate(SLOT, SMALL, 4 * SZ_4K, True)
            after = len(owners)
            allowed = set(owners[max(0, before - 1): after + 1])
            for run in runs.runs:
                bank = bank_index_of(run.hpa)
                seen.add(bank)
                if bank not in allowed:
                    bad.append((run, before, after))

    worker = threading.Thread(target=device)
    worker.start()
    try:
        for i in range(1, 400):
            who = 2 if i % 2 else 1
            write_context(t.host, SLOT, ContextEntry.blocked())
            write_owner(t.host, SLOT, OwnerRecord(i + 1, who, who))
            write_context(t.host, SLOT, t.contexts()["b" if who == 2 else "a"])
            owners.append(who)
            if i % 50 == 0 and seen >= {1, 2}:
                break
            threading.Event().wait(0.0005)
    finally:
        stop.set()
        worker.join()
        t.host.close()
    assert not bad, bad[:3]
    assert seen >= {1, 2}, seen


# -- the constructor ---------------------------------------------------------------------------------
@needs_native
def test_native_is_the_default_when_built_and_has_no_paging_structure_caches(tmp_path: Path) -> None:
    s = build_system(tmp_path)
    try:
        unit = IommuUnit(s.host)
        assert isinstance(unit.iotlb, native.NativeIotlb) and unit.native is not None and unit.pscache is None
        cached = IommuUnit(s.host, pscache=True)  # asked for the caches: the Python walk, which has them
        assert cached.native is None and cached.pscache is not None
        assert IommuUnit(s.host, native=False).pscache is not None
        assert IommuUnit(s.host, native=True, pscache=False).pscache is None
        with pytest.raises(ValueError, match="paging-structure"):
            IommuUnit(s.host, native=True, pscache=True)
    finally:
        s.host.close()


def test_env_switch_makes_the_default_unit_python_and_native_true_an_error() -> None:
    code = (
        "import tempfile\n"
        "from pathlib import Path\n"
        "from pviommu.iommu import native\n"
        "from pviommu.iommu.unit import IommuUnit\n"
        "from pviommu.mem.bank import HostMemory\n"
        "host = HostMemory(Path(tempfile.mkdtemp()))\n"
        "u = IommuUnit(host)\n"
        "print(u.native is None, u.pscache is not None, type(u.iotlb).__name__)\n"
        "try:\n"
        "    IommuUnit(host, native=True)\n"
        "except native.NativeUnavailable as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PVIOMMU_NATIVE": "0"},
                          capture_output=True, text=True, timeout=120, check=True)
    first, refused = done.stdout.strip().split("\n")
    assert first == "True True Iotlb"
    assert refused.startswith("refused:") and "PVIOMMU_NATIVE=0" in refused
