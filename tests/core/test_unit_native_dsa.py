"""The DSA device's warm MEMMOVE fast path (``DsaDevice.fast_memmove`` set to
``dma_device.fastpath.memmove_hook`` of a native unit, as the device service
does) against the device model on a Python unit: the same descriptors and
events -- warm and cold buffers, faults, invalid descriptors, interrupts,
records left due after long copies, batches, invalidations, owner-record and
context changes with and without invalidation, unmaps without flush -- on
two identical systems give the same completion records, bytes, device
counters, interrupts (with their epochs), faults, software errors, unit and
IOTLB counters; and the fast path really runs. Skipped without the build."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dma_device.dsa import DsaDevice
from dma_device.dsa.device import SwError
from dma_device.fastpath import memmove_hook
from pviommu.abi.dsa import DESC_SIZE, CompletionRecord, DescFlags, Descriptor, Opcode, WqCfg
from pviommu.abi.invq import Invalidation
from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry, write_context
from pviommu.iommu.owner import OwnerRecord, write_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.dma import DmaFault, DmaMemory
from pviommu.pt.common import RW
from pviommu.pt.gather import IotlbGather
from pviommu.units import MiB
from tests.kit.core_env import DATA, DID, RO, SLOT, NestedSystem, build_system
from tests.kit.nested import dsa_on

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)

F = DescFlags
PAGES = 32
SRC, DST = 0x7F00_0000, 0x7F40_0000  # 32 scattered / contiguous 4 KiB pages each
BIG, BIG2 = 0x8000_0000, 0x8040_0000  # 2 MiB pages
REC, RO_REC, LIST = 0x7F80_0000, 0x7F90_0000, 0x7FA0_0000
UNMAPPED = 0x9000_0000
LIST_GPA = DATA + 66 * SZ_4K


@dataclass
class Rig:
    """One system with a unit, a device on it and what the device reported."""

    system: NestedSystem
    unit: IommuUnit
    device: DsaDevice
    interrupts: list[tuple[int, int]] = field(default_factory=list)
    faults: list[DmaFault] = field(default_factory=list)
    errors: list[SwError] = field(default_factory=list)
    fast: list[bool] = field(default_factory=list)  # one per fast-path call: did it run the descriptor
    epoch: int = 1
    unmapped: set[int] = field(default_factory=set)

    def observed(self) -> tuple[Any, ...]:
        u = self.unit.stats
        return (self.device.counters.snapshot(), self.interrupts, self.faults, self.errors,
                (u.walks, u.walk_reads, u.context_reads, u.context_hits, u.epoch_changes, u.translations,
                 dict(u.faults)), self.unit.iotlb.stats, len(self.unit.iotlb))

    def close(self) -> None:
        self.device.close()
        self.system.host.close()


def make_rig(directory: Path, *, native_unit: bool) -> Rig:
    s = build_system(directory, p1_ram=24 * MiB, p2_ram=1 * MiB,
                     **({"native": True} if native_unit else {"native": False, "pscache": False}))
    rnd = random.Random(5)
    for i in range(PAGES):  # scattered source pages: several runs per buffer
        s.s1.map(Iova(SRC + i * SZ_4K), Gpa(DATA + (i * 5 % PAGES) * SZ_4K), SZ_4K, RW)
        s.s1.map(Iova(DST + i * SZ_4K), Gpa(DATA + (PAGES + i) * SZ_4K), SZ_4K, RW)
    s.s1.map(Iova(BIG), Gpa(12 * MiB), SZ_2M, RW)
    s.s1.map(Iova(BIG2), Gpa(14 * MiB), SZ_2M, RW)
    s.s1.map(Iova(REC), Gpa(DATA + 2 * PAGES * SZ_4K), SZ_4K, RW)
    s.s1.map(Iova(RO_REC), Gpa(RO[0]), SZ_4K, RW)  # stage 2 maps it read-only
    s.s1.map(Iova(LIST), Gpa(LIST_GPA), SZ_4K, RW)
    s.ram.write(Gpa(DATA), rnd.randbytes(PAGES * SZ_4K))
    s.ram.write(Gpa(12 * MiB), rnd.randbytes(SZ_2M))
    unit = s.unit
    rig = Rig(s, unit, dsa_on(s.host, unit.bind(SLOT)))
    dev = rig.device
    dev.on_interrupt = lambda handle, epoch: rig.interrupts.append((handle, epoch))
    dev.on_fault = rig.faults.append
    dev.on_error = rig.errors.append
    hook = memmove_hook(unit)
    if native_unit:
        assert hook is not None

        def counted(d: Descriptor, lim: Any, dma: DmaMemory) -> Any:
            done = hook(d, lim, dma)
            rig.fast.append(done is not None)
            return done

        dev.fast_memmove = counted
    else:
        assert hook is None  # a Python unit: the model is the only path
    dev.configure_wq(0, WqCfg(wq_size=16, bof=True))
    dev.configure_wq(1, WqCfg(wq_size=16, wq_thresh=16, dedicated=False))
    dev.configure_group(0, [0, 1], [0])
    dev.enable_device()
    dev.enable_wq(0)
    dev.enable_wq(1)
    return rig


# -- operations ------------------------------------------------------------------------------
ADDRS = st.one_of(
    st.integers(0, PAGES * SZ_4K - 1).map(lambda o: SRC + o), st.integers(0, PAGES * SZ_4K - 1).map(lambda o: DST + o),
    st.integers(0, SZ_2M - 1).map(lambda o: BIG + o), st.sampled_from([BIG2, RO_REC, UNMAPPED, SRC, DST, BIG]),
)
SIZES = st.sampled_from([1, 8, 100, SZ_4K, SZ_4K + 8, 5000, 64 * 1024, 96 * 1024, MiB, 0, SZ_2M + 1])
FLAGS = st.sampled_from([F.CRAV | F.RCR, F.CRAV | F.RCR, F.CRAV | F.RCR | F.RCI, F.CRAV, 0, F.RCI,
                         F.CRAV | F.RCR | F.BOF, F.CRAV | F.RCR | F.CC, F.CRAV | F.RCR | F.CR]).map(int)
COMPLETIONS = st.one_of(st.integers(0, 127).map(lambda k: REC + 32 * k), st.sampled_from([REC + 8, RO_REC, UNMAPPED]))
DESCS = st.builds(
    lambda op, flags, comp, src, dst, size, handle, priv: Descriptor(
        opcode=op, flags=flags, completion_addr=comp, src_addr=src, dst_addr=dst, xfer_size=size,
        int_handle=handle, priv=priv),
    st.sampled_from([Opcode.MEMMOVE] * 8 + [Opcode.MEMFILL, Opcode.NOOP]).map(int), FLAGS, COMPLETIONS, ADDRS,
    ADDRS, SIZES, st.sampled_from([0, 1, 8, 9]), st.sampled_from([0, 0, 1]))
#: what a guest mostly sends: valid MEMMOVEs inside the mapped buffers
PLAIN = st.builds(
    lambda pair, off, size, flags, k: Descriptor(
        opcode=Opcode.MEMMOVE, flags=flags, completion_addr=REC + 32 * k, src_addr=pair[0] + off,
        dst_addr=pair[1] + off, xfer_size=max(1, min(size, pair[2] - off)), int_handle=k % 9),
    st.sampled_from([(SRC, DST, PAGES * SZ_4K), (DST, SRC, PAGES * SZ_4K), (BIG, BIG2, SZ_2M),
                     (BIG + 256, BIG, SZ_2M // 2)]),
    st.sampled_from([0, 8, 100, SZ_4K, 3 * SZ_4K + 5]), SIZES,
    st.sampled_from([F.CRAV | F.RCR, F.CRAV | F.RCR | F.RCI, F.CRAV, F.CRAV | F.RCR | F.BOF]).map(int),
    st.integers(0, 63))
WARMS = st.tuples(st.just("warm"), st.sampled_from([(SRC, PAGES * SZ_4K, False), (DST, PAGES * SZ_4K, True),
                                                    (BIG, SZ_2M, False), (BIG, SZ_2M, True), (REC, SZ_4K, True),
                                                    (BIG2, SZ_2M, True)]))
OPS = st.one_of(
    st.tuples(st.just("desc"), st.sampled_from([0, 0, 1]), PLAIN),
    st.tuples(st.just("desc"), st.sampled_from([0, 0, 1]), PLAIN),
    st.tuples(st.just("desc"), st.sampled_from([0, 0, 1]), PLAIN),
    st.tuples(st.just("desc"), st.sampled_from([0, 0, 1]), DESCS),
    st.tuples(st.just("desc"), st.sampled_from([0, 0, 1]), DESCS),
    WARMS, WARMS,
    st.tuples(st.just("batch"), st.lists(DESCS, min_size=2, max_size=2)),
    st.tuples(st.just("inv"), st.sampled_from(["all", "domain", "pages", "context"])),
    st.tuples(st.just("owner"), st.sampled_from([1, 1, 2, 0]), st.booleans()),
    st.tuples(st.just("ctx"), st.sampled_from(["a", "identity", "blocked"]), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, PAGES - 1), st.booleans()),
)


def apply(r: Rig, op: tuple[Any, ...]) -> Any:
    unit, kind = r.unit, op[0]
    if kind == "desc":
        _, wq, desc = op
        return r.device.execute_now(wq, desc, epoch=r.epoch)
    if kind == "warm":
        iova, n, write = op[1]
        return unit.translate(SLOT, Iova(iova), n, write)
    if kind == "batch":
        entries = op[1]
        r.system.ram.write(Gpa(LIST_GPA), b"".join(d.pack() for d in entries))
        batch = Descriptor(opcode=Opcode.BATCH, flags=int(F.CRAV | F.RCR), completion_addr=REC + 64 * 32,
                           src_addr=LIST, xfer_size=len(entries))
        return r.device.execute_now(0, batch, epoch=r.epoch), r.system.ram.read(Gpa(LIST_GPA), DESC_SIZE * 2)
    if kind == "inv":
        which = op[1]
        return {"all": Invalidation.everything(), "domain": Invalidation.domain(DID),
                "pages": Invalidation.pages(DID, Iova(SRC), 2)}.get(which, Invalidation.context(SLOT)).apply(unit)
    if kind == "owner":  # a new epoch (the same owner after a reboot, another one, nobody)
        _, who, flush = op
        r.epoch += 1
        write_owner(r.system.host, SLOT, OwnerRecord(r.epoch, who, who) if who else OwnerRecord(r.epoch))
        if flush:
            unit.invalidate_context(SLOT)
            unit.invalidate_all()
        return None
    if kind == "ctx":
        _, which, flush = op
        s = r.system
        entry = {"a": s.nested_ctx(), "identity": ContextEntry.identity(DID, s.s2.root, 4),
                 "blocked": ContextEntry.blocked()}[which]
        write_context(s.host, SLOT, entry)
        if flush:
            unit.invalidate_context(SLOT)
            unit.invalidate_domain(DID)
        return None
    if kind == "unmap":  # the guest unmaps a source page, flushing it or not (the stale-IOTLB hazard)
        _, page, flush = op
        if page in r.unmapped:
            return None
        r.unmapped.add(page)
        gather: IotlbGather[Gpa] = IotlbGather()
        done = r.system.s1.unmap(Iova(SRC + page * SZ_4K), SZ_4K, gather)
        if flush:
            addr, am = gather.psi()
            unit.invalidate_pages(DID, addr, am)
        return done
    raise AssertionError(op)


def _regions(r: Rig) -> bytes:
    ram = r.system.ram
    return ram.read(Gpa(DATA), 70 * SZ_4K) + ram.read(Gpa(12 * MiB), 2 * SZ_2M)


def run_both(ops: list[tuple[Any, ...]]) -> tuple[Rig, Rig, list[Any]]:
    """``ops`` on the fast-path rig and the model rig, compared after every step
    (the rigs are closed by the caller's ``close_both``)."""
    d1, d2 = tempfile.mkdtemp(), tempfile.mkdtemp()
    fast, model = make_rig(Path(d1), native_unit=True), make_rig(Path(d2), native_unit=False)
    out = []
    try:
        for op in ops:
            got, want = apply(fast, op), apply(model, op)
            assert got == want, (op, got, want)
            assert fast.observed() == model.observed(), op
            assert _regions(fast) == _regions(model), op
            out.append(want)
        for a, b in zip((fast.system.bank0, fast.system.bank1), (model.system.bank0, model.system.bank1),
                        strict=True):
            assert a.read(0, a.size) == b.read(0, b.size), f"bank {a.index} differs"
    except BaseException:
        close_both(fast, model)
        raise
    return fast, model, out


def close_both(*rigs: Rig) -> None:
    for r in rigs:
        r.close()
        for p in r.system.host.directory.iterdir():
            p.unlink()
        r.system.host.directory.rmdir()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.lists(OPS, min_size=3, max_size=30))
def test_fast_memmove_equals_the_device_model_over_sequences(ops: list[tuple[Any, ...]]) -> None:
    warm = [("warm", (iova, n, True)) for iova, n in ((SRC, PAGES * SZ_4K), (DST, PAGES * SZ_4K), (BIG, SZ_2M),
                                                       (BIG2, SZ_2M), (REC, SZ_4K))]  # what a guest's traffic leaves
    fast, model, _ = run_both(warm + ops)
    try:
        event(f"fast path ran {sum(fast.fast)} of {len(fast.fast)}")
    finally:
        close_both(fast, model)


def _memmove(src: int, dst: int, size: int, flags: int = int(F.CRAV | F.RCR), comp: int = REC,
             handle: int = 0) -> tuple[str, int, Descriptor]:
    return ("desc", 0, Descriptor(opcode=Opcode.MEMMOVE, flags=flags, completion_addr=comp, src_addr=src,
                                  dst_addr=dst, xfer_size=size, int_handle=handle))


WARM_ALL = [("warm", w) for w in ((SRC, PAGES * SZ_4K, False), (DST, PAGES * SZ_4K, True), (BIG, SZ_2M, False),
                                  (BIG, SZ_2M, True), (REC, SZ_4K, True))]


def test_warm_memmoves_take_the_fast_path_with_the_models_records_counters_and_interrupts() -> None:
    ops: list[tuple[Any, ...]] = [
        *WARM_ALL,
        _memmove(SRC, DST, SZ_4K),  # the 4 KiB descriptor
        _memmove(SRC + 100, DST + 4000, 5000, int(F.CRAV | F.RCR | F.RCI), REC + 32, 3),  # interrupt after record
        _memmove(SRC, DST, PAGES * SZ_4K),  # 128 KiB: copied without the GIL, the record left due
        _memmove(BIG, BIG + MiB, MiB, int(F.CRAV | F.RCR | F.RCI), REC + 64, 1),
        _memmove(BIG + 64, BIG, 8 * SZ_4K),  # overlapping, ascending
        _memmove(SRC, DST, SZ_4K, int(F.CRAV)),  # no record asked
        _memmove(SRC, DST, SZ_4K, int(F.RCI), handle=2),  # interrupt without a record
    ]
    fast, model, out = run_both(ops)
    try:
        assert fast.fast == [True] * 7, fast.fast
        assert fast.interrupts == [(3, 1), (1, 1), (2, 1)]
        assert all(isinstance(r, CompletionRecord) and r.code == 1 for r in out[len(WARM_ALL):])
        assert fast.unit.stats.walks == model.unit.stats.walks  # none after the warm-up
    finally:
        close_both(fast, model)


def test_cold_faulting_and_invalid_memmoves_go_to_the_model() -> None:
    ops: list[tuple[Any, ...]] = [
        _memmove(SRC, DST, SZ_4K),  # cold: the model walks
        _memmove(SRC, RO_REC, SZ_4K),  # write fault
        _memmove(SRC, DST, SZ_4K, comp=RO_REC),  # the record cannot be written (CRA_XLAT)
        _memmove(SRC, DST, SZ_4K, comp=REC + 8),  # misaligned record
        _memmove(SRC, DST, 0),  # XFER_ERANGE
        _memmove(BIG, BIG + 64, SZ_4K),  # overlapping, descending
        _memmove(SRC, DST, SZ_4K, int(F.CRAV | F.RCR | F.RCI), handle=9),  # no such handle
        _memmove(SRC + PAGES * SZ_4K - 8, DST, 64),  # runs off the mapping (partial completion)
    ]
    fast, model, _ = run_both(ops)
    try:
        assert not any(fast.fast), fast.fast
        assert fast.faults and fast.errors  # the model reported them, alike in both
    finally:
        close_both(fast, model)


@pytest.mark.parametrize("flush", [False, True], ids=["no invalidation", "invalidated"])
def test_an_epoch_that_moved_sends_the_descriptor_to_the_model(flush: bool) -> None:
    """A new ownership epoch (the owner rebooted, or the slot moved and came
    back) with or without an invalidation: the warm IOTLB and the cached
    context are not used by the fast path; the model's translation sees the
    epoch, drops every cache and walks; once its walks are cached again the
    fast path runs again. The translation that found the epoch moved caches
    nothing (it read the IOTLB generation before it dropped the caches), so the
    next descriptor walks its source again; an invalidation before it changes
    nothing of that: the unit remembers the epoch it last read the slot under."""
    ops: list[tuple[Any, ...]] = [*WARM_ALL, _memmove(SRC, DST, SZ_4K), ("owner", 1, flush),
                                  _memmove(SRC, DST, SZ_4K), _memmove(SRC, DST, SZ_4K), _memmove(SRC, DST, SZ_4K),
                                  ("owner", 2, False), _memmove(SRC, DST, SZ_4K), ("owner", 0, False),
                                  _memmove(SRC, DST, SZ_4K)]
    fast, model, out = run_both(ops)
    try:
        assert fast.fast == [True, False, False, True, False, False], fast.fast
        assert fast.unit.stats.epoch_changes == model.unit.stats.epoch_changes == 3
        codes = [r.code for r in out if isinstance(r, CompletionRecord)]
        assert codes[:4] == [1, 1, 1, 1] and codes[4] != 1  # partition 2 does not own partition 1's tables
    finally:
        close_both(fast, model)


def test_stale_translations_after_an_unmap_without_flush_are_used_alike() -> None:
    """The hazard a driver must avoid is the model's too: the fast path uses
    the stale entry exactly where the model does, and neither after the flush."""
    ops: list[tuple[Any, ...]] = [*WARM_ALL, ("unmap", 0, False), _memmove(SRC, DST, SZ_4K),
                                  ("inv", "pages"), _memmove(SRC, DST, SZ_4K)]
    fast, model, out = run_both(ops)
    try:
        assert fast.fast == [True, False], fast.fast
        assert out[-3].code == 1 and out[-1].code != 1
    finally:
        close_both(fast, model)


def test_engine_threads_and_stale_epochs_count_alike() -> None:
    """Submissions through the portal, run by the engine threads, with a
    current-epoch hook: descriptors of a previous owner are thrown away (no
    record) by both; the others complete identically."""
    d1, d2 = tempfile.mkdtemp(), tempfile.mkdtemp()
    fast, model = make_rig(Path(d1), native_unit=True), make_rig(Path(d2), native_unit=False)
    try:
        for r in (fast, model):
            for op in WARM_ALL:
                apply(r, op)
            r.device.current_epoch = lambda r=r: r.epoch  # type: ignore[misc]
            for i in range(12):
                desc = _memmove(SRC + i * 64, DST + i * 256, 2000, int(F.CRAV | F.RCR | F.RCI), REC + 32 * i, 1)[2]
                r.device.submit(0, desc, epoch=r.epoch if i % 4 else r.epoch - 1)
            assert r.device.drain_wq(0) == 0
        assert fast.observed() == model.observed()
        assert _regions(fast) == _regions(model)
        assert fast.device.counters.aborted_epoch == 3 and sum(fast.fast) == 9
    finally:
        close_both(fast, model)


def test_the_hook_declines_memory_of_another_unit_or_translator() -> None:
    d1 = tempfile.mkdtemp()
    r = make_rig(Path(d1), native_unit=True)
    try:
        for op in WARM_ALL:
            apply(r, op)
        hook = memmove_hook(r.unit)
        assert hook is not None
        desc = _memmove(SRC, DST, SZ_4K)[2]
        lim = r.device._limits(r.device._wqs[0])
        other = IommuUnit(r.system.host, native=True)
        assert hook(desc, lim, DmaMemory(r.system.host, other.bind(SLOT))) is None
        assert hook(desc, lim, DmaMemory(r.system.host, r.unit.bind(SLOT + 1))) is None  # not cached: declined
        assert hook(desc, lim, DmaMemory(r.system.host, r.unit.bind(SLOT))) is not None
    finally:
        close_both(r)
