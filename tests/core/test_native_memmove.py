"""The compiled warm MEMMOVE against the Python device model: whenever
``NativeWalker.memmove`` runs a descriptor, the DSA model (``DsaDevice``
through ``IommuUnit`` + ``DmaMemory``) completes it with SUCCESS and leaves
the same bytes (data and completion record) and the same IOTLB counters;
whenever it declines, it has touched nothing. A record it leaves due (after
a copy that ran without the GIL) is written the model's way here, and then
the bytes and counters are the model's too. Skipped when not built."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dma_device.dsa import DsaDevice
from dma_device.dsa.checks import allowed_flags
from pviommu.abi.dsa import CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode, WqCfg
from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.dma import DmaMemory, DmaRuns
from pviommu.pt.common import RW, Perm
from tests.kit.native_env import OWNER, World, build_world
from tests.kit.nested import dsa_on

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON)

SLOT = 6
SRC, DST, BIG, REC, RO_PAGE = 0x50_0000_0000, 0x50_4000_0000, 0x50_8000_0000, 0x50_C000_0000, 0x51_0000_0000
SMALL = 16 * SZ_4K  # 4 KiB leaves
F = DescFlags


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, list[bytes]]]:
    world = build_world(Path(tmp_path_factory.mktemp("memmove")), 9, mappings=0, clear_ad=0, odd_tables=0)
    s1 = world.s1
    for i in range(SMALL // SZ_4K):  # 4 KiB leaves over scattered GPAs: several runs per buffer
        s1.map(Iova(SRC + i * SZ_4K), Gpa((12 << 20) + (i * 3 % 16) * SZ_4K), SZ_4K, RW)
        s1.map(Iova(DST + i * SZ_4K), Gpa((13 << 20) + i * SZ_4K), SZ_4K, RW)
    s1.map(Iova(BIG), Gpa(14 << 20), SZ_2M, RW)  # a 2 MiB leaf: long copies, without the GIL
    s1.map(Iova(REC), Gpa(11 << 20), SZ_4K, RW)
    s1.map(Iova(RO_PAGE), Gpa(11 << 20), SZ_4K, Perm.READ)
    world.ram.write(Gpa(12 << 20), random.Random(7).randbytes(SZ_2M * 2))
    world.install(SLOT, world.nested())
    yield world, world.snapshot()
    world.close()


def _limits(device: DsaDevice, cfg: WqCfg) -> native.MoveLimits:
    gc = device.config.gencap
    allowed = allowed_flags(Opcode.MEMMOVE, cfg.bof and gc.block_on_fault, gc.cache_control_mem,
                            gc.cache_control_cache, gc.dest_readback, gc.drain_readback)
    return native.MoveLimits(allowed, min(1 << cfg.max_xfer_shift, gc.max_xfer_size), gc.overlap_copy,
                             not cfg.dedicated, cfg.priv, device.config.num_int_handles)


WARM = [(SRC, SMALL, False), (DST, SMALL, True), (BIG, SZ_2M, False), (BIG, SZ_2M, True), (REC, SZ_4K, True),
        (RO_PAGE, SZ_4K, False)]


def _reference(world: World, desc: Descriptor, cfg: WqCfg, warm: list[tuple[int, int, bool]]) -> tuple[
        CompletionRecord, object]:
    unit = IommuUnit(world.host, pscache=False, native=False)
    for iova, n, write in warm:
        unit.translate(SLOT, Iova(iova), n, write)
    device = dsa_on(world.host, unit.bind(SLOT))
    try:
        device.configure_wq(0, cfg)
        device.configure_group(0, [0], [0])
        device.enable_device()
        device.enable_wq(0)
        return device.execute_now(0, desc), unit.iotlb.stats
    finally:
        device.close()


class _Compiled:
    """``NativeWalker.translate`` as a ``DmaTranslator`` (for the record the caller writes)."""

    def __init__(self, walker: native.NativeWalker, tlb: native.NativeIotlb, ctx: ContextEntry) -> None:
        self.walker, self.tlb, self.ctx = walker, tlb, ctx

    def translate(self, iova: Iova, length: int, write: bool) -> DmaRuns:
        t = self.walker.translate(self.tlb, self.ctx, iova, length, write, OWNER, self.tlb.generation)
        assert t is not None and t.fault is None
        return DmaRuns(t.runs)


def _native(world: World, ctx: ContextEntry, desc: Descriptor, limits: native.MoveLimits,
            warm: list[tuple[int, int, bool]]) -> tuple[native.NativeMemmove | None, object, object]:
    walker, tlb = native.NativeWalker(world.host), native.NativeIotlb()
    for iova, n, write in warm:
        walker.translate(tlb, ctx, Iova(iova), n, write, OWNER, tlb.generation)
    before = tlb.stats
    result = walker.memmove(tlb, ctx, desc.pack(), limits, OWNER, tlb.generation)
    if result is not None and result.record_due:  # what the device does: the model's record write
        done = DmaMemory(world.host, _Compiled(walker, tlb, ctx)).write_record(
            Iova(desc.completion_addr), CompletionRecord(status=int(DsaStatus.SUCCESS)).pack())
        assert done.fault is None
    return result, before, tlb.stats


def check(world: World, pristine: list[bytes], desc: Descriptor, cfg: WqCfg,
          warm: list[tuple[int, int, bool]] = WARM, *, events: bool = False) -> native.NativeMemmove | None:
    """Reference first, then the compiled path from the same bytes; compare."""
    device = dsa_on(world.host, IommuUnit(world.host, native=False).bind(SLOT))
    limits = _limits(device, cfg)
    try:
        rec, ref_stats = _reference(world, desc, cfg, warm)
        after_ref = world.snapshot()
        world.restore(pristine)
        result, stats_before, stats_after = _native(world, world.nested(), desc, limits, warm)
        after_nat = world.snapshot()
        if result is None:  # declined: nothing touched
            assert after_nat == pristine and stats_after == stats_before
            if events:
                event(f"declined ({DsaStatus(rec.code).name})")
        else:
            assert rec.code == DsaStatus.SUCCESS, rec
            record = bool(desc.flags & F.CRAV and desc.flags & F.RCR)
            unlocked = desc.xfer_size >= DETACHED  # copied without the GIL: the record is left due
            assert result.walks == 0 and result.reads == 0
            assert result.record_written == (record and not unlocked)
            assert result.record_due == (record and unlocked)
            assert result.translations == (3 if result.record_written else 2)
            assert stats_after == ref_stats
            for index, (a, b) in enumerate(zip(after_ref, after_nat, strict=True)):
                assert a == b, f"bank {index} differs"
            if events:
                event("ran natively")
        return result
    finally:
        world.restore(pristine)


#: copies at least this long run without the GIL (native/pviommu_native/src/lib.rs DETACH_COPY)
DETACHED = 64 * 1024

FLAG_BITS = [F.CRAV, F.RCR, F.RCI, F.BOF, F.FENCE, F.CC, F.CR, F.ADDR1_TCS, F.DRDBK, F.CRSTS, 0x10000]
ADDRS = [SRC, SRC + 8, SRC + SZ_4K - 100, DST, DST + 64, BIG, BIG + SZ_2M - SZ_4K, REC, RO_PAGE, SRC + SMALL - 8,
         0x60_0000_0000, (1 << 64) - 8]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_native_memmove_runs_only_what_the_model_completes_and_leaves_the_same_bytes(
    rig: tuple[World, list[bytes]], data: st.DataObject,
) -> None:
    world, pristine = rig
    if data.draw(st.booleans(), label="plain"):  # valid, mostly warm: what a guest sends
        src, dst, room = data.draw(st.sampled_from([(SRC, DST, SMALL), (DST, SRC, SMALL), (BIG, BIG + SZ_2M // 2,
                                                     SZ_2M // 2), (BIG + SZ_2M // 2, BIG, SZ_2M // 2)]))
        off = data.draw(st.integers(0, room - 1), label="offset")
        desc = Descriptor(opcode=Opcode.MEMMOVE, completion_addr=REC + 32 * data.draw(st.integers(0, 127)),
                          flags=data.draw(st.sampled_from([F.CRAV | F.RCR, F.CRAV | F.RCR | F.RCI, F.CRAV, 0,
                                                           F.CRAV | F.RCR | F.BOF | F.CC])),
                          src_addr=src + off, dst_addr=dst + data.draw(st.integers(0, room - 1)),
                          xfer_size=data.draw(st.integers(1, room - off)), int_handle=data.draw(st.integers(0, 8)))
    else:
        flags = data.draw(st.sampled_from([int(F.CRAV | F.RCR)] * 3 + [int(F.CRAV | F.RCR | F.RCI), 0, int(F.CRAV)])
                          | st.lists(st.sampled_from(FLAG_BITS)).map(lambda bits: sum(set(bits))), label="flags")
        src = data.draw(st.sampled_from(ADDRS) | st.sampled_from([SRC, DST, BIG]).flatmap(
            lambda a: st.integers(0, SMALL).map(lambda o: a + o)), label="src")
        dst = data.draw(st.sampled_from(ADDRS) | st.just(src + 8) | st.just(src - 8) | st.just(src), label="dst")
        size = data.draw(st.sampled_from([1, 8, 100, SZ_4K, SZ_4K + 8, SMALL // 2, SMALL, SZ_2M // 2, SZ_2M, 0,
                                          SZ_2M + 1]), label="size")
        comp = data.draw(st.sampled_from([REC, REC + 32, REC + 8, RO_PAGE, 0x60_0000_0000, 0]), label="completion")
        desc = Descriptor(opcode=data.draw(st.sampled_from([int(Opcode.MEMMOVE)] * 6 + [int(Opcode.MEMFILL), 0x7F])),
                          flags=flags, completion_addr=comp, src_addr=src % (1 << 64), dst_addr=dst % (1 << 64),
                          xfer_size=size, int_handle=data.draw(st.sampled_from([0, 1, 8, 9, 500])),
                          priv=data.draw(st.sampled_from([0, 0, 1])), rsvd=data.draw(st.sampled_from([0, 0, 0, 4])),
                          op_specific=bytes(23) + bytes([data.draw(st.sampled_from([0, 0, 0, 1]))]))
    cfg = data.draw(st.sampled_from([WqCfg(wq_size=8), WqCfg(wq_size=8, dedicated=False, wq_thresh=8),
                                     WqCfg(wq_size=8, bof=True), WqCfg(wq_size=8, max_xfer_shift=12)]))
    warm = data.draw(st.sampled_from([WARM, WARM, WARM, WARM[:2] + WARM[4:], []]), label="warm")
    check(world, pristine, desc, cfg, warm, events=True)


def test_plain_warm_memmoves_run_natively(rig: tuple[World, list[bytes]]) -> None:
    """The common descriptors -- 4 KiB and 64 KiB over scattered 4 KiB pages,
    1 MiB on a 2 MiB leaf (without the GIL), overlapping ascending -- all take
    the compiled path and match the model; the record is written in the same
    call unless the copy ran without the GIL (then it is left due)."""
    world, pristine = rig
    cfg = WqCfg(wq_size=8)
    base = Descriptor(opcode=Opcode.MEMMOVE, flags=int(F.CRAV | F.RCR), completion_addr=REC)
    for src, dst, size in ((SRC, DST, SZ_4K), (SRC, DST, SMALL), (BIG, BIG + SZ_2M // 2, SZ_2M // 2),
                           (BIG + 64, BIG, SZ_4K * 8), (SRC + 100, DST + 4000, 5000)):
        result = check(world, pristine, base.with_(src_addr=src, dst_addr=dst, xfer_size=size), cfg)
        assert result is not None and result.record_written == (size < DETACHED) and result.record_due == (
            size >= DETACHED)
    no_record = base.with_(flags=int(F.CRAV), src_addr=SRC, dst_addr=DST, xfer_size=SZ_4K)
    result = check(world, pristine, no_record, cfg)
    assert result is not None and not result.record_written and result.translations == 2


def test_descriptors_the_model_would_fault_or_refuse_are_declined(rig: tuple[World, list[bytes]]) -> None:
    world, pristine = rig
    cfg = WqCfg(wq_size=8)
    base = Descriptor(opcode=Opcode.MEMMOVE, flags=int(F.CRAV | F.RCR), completion_addr=REC, src_addr=SRC,
                      dst_addr=DST, xfer_size=SZ_4K)
    for desc in (base.with_(dst_addr=RO_PAGE),  # write fault on a read-only page
                 base.with_(completion_addr=RO_PAGE),  # the record cannot be written
                 base.with_(completion_addr=REC + 8),  # misaligned record
                 base.with_(src_addr=SRC + SMALL - 8, xfer_size=64),  # runs off the mapping
                 base.with_(src_addr=BIG, dst_addr=BIG + 64, xfer_size=SZ_4K),  # overlapping, descending
                 base.with_(xfer_size=0), base.with_(flags=int(F.CRAV | F.RCR | F.CR)), base.with_(rsvd=1),
                 base.with_(flags=int(F.CRAV | F.RCR | F.RCI), int_handle=9),  # no such interrupt handle
                 base.with_(flags=int(F.CRAV | F.RCR | F.BOF)),  # BOF on a WQ without block-on-fault
                 base.with_(op_specific=bytes(23) + b"\x01"), base.with_(opcode=Opcode.MEMFILL)):
        assert check(world, pristine, desc, cfg) is None
    shared = WqCfg(wq_size=8, dedicated=False, wq_thresh=8)
    assert check(world, pristine, base.with_(priv=1), shared) is None  # privileged on an unprivileged shared WQ
    assert check(world, pristine, base.with_(xfer_size=SZ_4K + 1), WqCfg(wq_size=8, max_xfer_shift=12)) is None
    # valid but cold: left to the model, which walks
    assert check(world, pristine, base, cfg, warm=[]) is None
