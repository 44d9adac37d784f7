"""Compiled core vs Python reference, measured in one process and one run.

Over real shared-memory banks (4-level stage 1 over 4-level stage 2, 4 KiB
leaves on both, so a cold walk reads 24 entries), each figure for the Python
implementation and for ``pviommu.iommu.native`` side by side:

* cold nested walks/s: ``NestedWalker.walk`` vs ``NativeWalker.walk`` (one
  Python call per walk), and walks/s inside one compiled translation of 256
  cold pages (the walk without a Python call around it);
* IOTLB lookups/s on a warm entry: ``lookup_span`` (the DMA fast path) and
  ``lookup`` (which returns an ``IotlbEntry``);
* translations of 1 MiB over 4 KiB pages, warm IOTLB: ``IommuUnit.translate``
  vs ``NativeWalker.translate``; and cold (global invalidation first);
* 1 MiB DMA copies, warm: ``DmaMemory.copy`` through the unit vs
  ``NativeWalker.copy``, next to a plain memmove of the same size;
* one 4 KiB MEMMOVE descriptor (completion record requested), warm: the DSA
  model's ``execute_now`` vs ``NativeWalker.memmove`` (the compiled path
  without the device's own counters), and vs ``execute_now`` of a device on
  ``IommuUnit(native=True)`` with the warm MEMMOVE fast path
  (``dma_device.fastpath``, as ``pviommu serve dsa`` runs it), next to a 4 KiB
  memmove;
* the unit itself (``unit_rates``, also used by ``pviommu bench``):
  ``IommuUnit(native=True)`` vs ``IommuUnit(native=False)`` (with its
  paging-structure caches), cold walks/s and warm 4 KiB translations/s.

The Python figures are ``IommuUnit(native=False, pscache=False)`` unless said
otherwise, so that both sides walk the same way.

Run: ``python -m pvctl.benchmarks.native [--quick] [--json]``. Without the
compiled core it says why and prints the Python figures only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from dma_device.dsa import DsaDevice
from dma_device.dsa.checks import allowed_flags
from dma_device.fastpath import memmove_hook
from pvctl.benchmarks.report import rate
from pvctl.benchmarks.world import nested_world, scratch_host
from pviommu.abi.dsa import DescFlags, Descriptor, DsaStatus, Opcode, WqCfg
from pviommu.addr import SZ_4K, Gpa, Iova
from pviommu.iommu import native
from pviommu.iommu.context import ContextEntry
from pviommu.iommu.iotlb import Iotlb
from pviommu.iommu.nested import NestedWalker, WalkOk
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import Bank, HostMemory
from pviommu.mem.dma import DmaMemory
from pviommu.pt.common import RW
from pviommu.units import MiB

SLOT, DID, BANK = 1, 1, 1
SRC, DST, REC = Iova(0x10_0000_0000), Iova(0x10_4000_0000), Iova(0x10_8000_0000)
PAGES = 256


def _best(pairs: dict[str, Callable[[], int]], min_time: float, rounds: int = 5) -> dict[str, float]:
    """Each function's best rate over ``rounds`` short runs, the functions
    interleaved round by round, so that a burst of load on a shared machine
    hits both sides of a ratio alike instead of one."""
    best = dict.fromkeys(pairs, 0.0)
    for _ in range(rounds):
        for name, fn in pairs.items():
            best[name] = max(best[name], rate(fn, min_time / rounds))
    return best


def run(quick: bool = False) -> dict[str, Any]:
    with scratch_host("pviommu-bench-native-") as host:
        return _run(host, 0.2 if quick else 1.0)


def _world(host: HostMemory) -> tuple[ContextEntry, Bank]:
    """Partition 1 (bank 1) owning slot ``SLOT``: 4 KiB leaves on both stages
    (a cold walk reads 24 entries), SRC/DST 1 MiB buffers and a record page."""
    world = nested_world(host, s2_4k_bytes=16 * MiB)  # 4 KiB stage-2 leaves: full-depth walks everywhere
    world.s1.map(SRC, Gpa(4 * MiB), MiB, RW)
    world.s1.map(DST, Gpa(6 * MiB), MiB, RW)
    world.s1.map(REC, Gpa(8 * MiB), SZ_4K, RW)
    world.ram.write(Gpa(4 * MiB), bytes(range(256)) * (MiB // 256))
    return world.own(SLOT, DID), world.bank


def _run(host: HostMemory, min_time: float) -> dict[str, Any]:
    ctx, bank1 = _world(host)
    pages = [Iova(SRC + i * SZ_4K) for i in range(PAGES)]
    out: dict[str, Any] = {"native_available": native.AVAILABLE, "native_unavailable_reason": native.UNAVAILABLE_REASON}
    fns: dict[str, Callable[[], int]] = {}

    # -- the Python reference ---------------------------------------------------------------
    ref = NestedWalker(host)
    first = ref.walk(ctx, pages[0], False, owner_bank=BANK)
    assert isinstance(first, WalkOk) and first.reads == 24, first

    def py_walks() -> int:
        for iova in pages:
            ref.walk(ctx, iova, False, owner_bank=BANK)
        return PAGES

    unit = IommuUnit(host, pscache=False, native=False)
    unit.translate(SLOT, SRC, MiB, False)
    unit.translate(SLOT, DST, MiB, True)
    cold_unit = IommuUnit(host, pscache=False, native=False)

    def py_cold() -> int:
        cold_unit.invalidate_all()
        return _one(cold_unit.translate(SLOT, SRC, MiB, False).done == MiB)

    dma = DmaMemory(host, unit.bind(SLOT))
    fns["py_walks_per_s"] = py_walks
    fns.update(_lookups("py", unit.iotlb))
    fns["py_translate_warm_per_s"] = lambda: _one(unit.translate(SLOT, SRC, MiB, False).done == MiB)
    fns["py_translate_cold_per_s"] = py_cold
    fns["py_copy_MiB_per_s"] = lambda: _one(dma.copy(SRC, DST, MiB).done == MiB)
    src_view, dst_view = bank1.view[4 * MiB : 5 * MiB], bank1.view[6 * MiB : 7 * MiB]

    def memmove() -> int:
        dst_view[:] = src_view
        return 1

    fns["memmove_MiB_per_s"] = memmove
    small_src, small_dst = bank1.view[4 * MiB : 4 * MiB + SZ_4K], bank1.view[6 * MiB : 6 * MiB + SZ_4K]

    def memmove_4k() -> int:
        small_dst[:] = small_src
        return 1

    fns["memmove_4k_per_s"] = memmove_4k
    device = _device(unit)
    cfg = device.wqcfg(0)
    desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR), completion_addr=REC,
                      src_addr=SRC, dst_addr=DST, xfer_size=SZ_4K)
    packed = desc.pack()
    unit.translate(SLOT, REC, SZ_4K, True)
    fns["py_memmove_desc_per_s"] = lambda: _one(device.execute_now(0, desc).code == DsaStatus.SUCCESS)

    # -- the compiled core --------------------------------------------------------------------
    fast_device: DsaDevice | None = None
    if native.AVAILABLE:
        nat = native.NativeWalker(host)
        assert nat.walk(ctx, pages[0], False, owner_bank=BANK) == first

        def nat_walks() -> int:
            for iova in pages:
                nat.walk(ctx, iova, False, owner_bank=BANK)
            return PAGES

        tlb, cold_tlb = native.NativeIotlb(), native.NativeIotlb()

        def nat_loop_walks() -> int:  # one compiled call, PAGES cold walks inside
            cold_tlb.invalidate_all()
            t = nat.translate(cold_tlb, ctx, SRC, MiB, False, BANK, cold_tlb.generation)
            assert t is not None and t.walks == PAGES and t.reads == 24 * PAGES
            return PAGES

        def nat_warm() -> int:
            t = nat.translate(tlb, ctx, SRC, MiB, False, BANK, tlb.generation)
            return _one(t is not None and t.done == MiB)

        def nat_cold() -> int:
            cold_tlb.invalidate_all()
            t = nat.translate(cold_tlb, ctx, SRC, MiB, False, BANK, cold_tlb.generation)
            return _one(t is not None and t.done == MiB)

        def nat_copy() -> int:
            c = nat.copy(tlb, ctx, SRC, DST, MiB, BANK, tlb.generation)
            return _one(c is not None and c.done == MiB)

        nat.translate(tlb, ctx, SRC, MiB, False, BANK, tlb.generation)
        nat.translate(tlb, ctx, DST, MiB, True, BANK, tlb.generation)
        fns["native_walks_per_s"] = nat_walks
        fns["native_loop_walks_per_s"] = nat_loop_walks
        fns.update(_lookups("native", tlb))
        fns["native_translate_warm_per_s"] = nat_warm
        fns["native_translate_cold_per_s"] = nat_cold
        fns["native_copy_MiB_per_s"] = nat_copy
        gc = device.config.gencap
        limits = native.MoveLimits(
            allowed_flags(Opcode.MEMMOVE, cfg.bof and gc.block_on_fault, gc.cache_control_mem, gc.cache_control_cache,
                          gc.dest_readback, gc.drain_readback),
            min(1 << cfg.max_xfer_shift, gc.max_xfer_size), gc.overlap_copy, not cfg.dedicated, cfg.priv,
            device.config.num_int_handles)
        nat.translate(tlb, ctx, REC, SZ_4K, True, BANK, tlb.generation)

        def nat_desc() -> int:
            done = nat.memmove(tlb, ctx, packed, limits, BANK, tlb.generation)
            return _one(done is not None and done.record_written)

        fns["native_memmove_desc_per_s"] = nat_desc
        fast_unit = IommuUnit(host, native=True)
        for iova, write in ((SRC, False), (DST, True), (REC, True)):
            fast_unit.translate(SLOT, iova, MiB if iova != REC else SZ_4K, write)
        fast_device = _device(fast_unit)
        fast_device.fast_memmove = memmove_hook(fast_unit)
        run_fast = fast_device.execute_now
        fns["native_engine_desc_per_s"] = lambda: _one(run_fast(0, desc).code == DsaStatus.SUCCESS)
    try:
        out.update(_best(fns, min_time))
    finally:
        device.close()
        if fast_device is not None:
            fast_device.close()
        for view in (src_view, dst_view, small_src, small_dst):
            view.release()
    if bytes(bank1.view[6 * MiB : 7 * MiB]) != bytes(bank1.view[4 * MiB : 5 * MiB]):
        raise RuntimeError("benchmark copy produced wrong bytes")
    out["py_copy_over_memmove"] = out["py_copy_MiB_per_s"] / out["memmove_MiB_per_s"]
    out["py_memmove_desc_over_memmove_4k"] = out["py_memmove_desc_per_s"] / out["memmove_4k_per_s"]
    if native.AVAILABLE:
        out["native_memmove_desc_over_memmove_4k"] = out["native_memmove_desc_per_s"] / out["memmove_4k_per_s"]
        out["native_engine_desc_over_memmove_4k"] = out["native_engine_desc_per_s"] / out["memmove_4k_per_s"]
        out["native_engine_over_py_memmove_desc"] = out["native_engine_desc_per_s"] / out["py_memmove_desc_per_s"]
        for name in ("walks", "lookup_span", "lookup", "translate_warm", "translate_cold", "copy_MiB", "memmove_desc"):
            out[f"native_over_py_{name}"] = out[f"native_{name}_per_s"] / out[f"py_{name}_per_s"]
        out["native_loop_over_py_walks"] = out["native_loop_walks_per_s"] / out["py_walks_per_s"]
        out["native_copy_over_memmove"] = out["native_copy_MiB_per_s"] / out["memmove_MiB_per_s"]
    return out


def _device(unit: IommuUnit) -> DsaDevice:
    """A DSA device on ``unit`` at ``SLOT``, one dedicated WQ enabled."""
    device = DsaDevice(DmaMemory(unit.host, unit.bind(SLOT)))
    device.configure_wq(0, WqCfg(wq_size=16))
    device.configure_group(0, [0], [0])
    device.enable_device()
    device.enable_wq(0)
    return device


def unit_rates(quick: bool = False) -> dict[str, Any]:
    """The unit as a device uses it, compiled vs Python (with its paging-
    structure caches), interleaved: cold walks/s (a global invalidation before
    each 8-byte translation of one of 256 pages: full 2-D walks) and warm
    translations/s (the 256 pages in the IOTLB), and reads per cold walk.
    Only the Python figures without the compiled core."""
    min_time = 0.2 if quick else 1.0
    with scratch_host("pviommu-bench-unit-") as host:
        _world(host)
        pages = [Iova(SRC + i * SZ_4K) for i in range(PAGES)]
        units = {"py": IommuUnit(host, native=False)}
        if native.AVAILABLE:
            units["native"] = IommuUnit(host, native=True)
        fns: dict[str, Callable[[], int]] = {}
        for name, unit in units.items():
            def cold(unit: IommuUnit = unit) -> int:
                for iova in pages:
                    unit.invalidate_all()
                    unit.translate(SLOT, iova, 8, False)
                return PAGES

            def warm(unit: IommuUnit = unit) -> int:
                for iova in pages:
                    unit.translate(SLOT, iova, 8, False)
                return PAGES

            walks, reads = unit.stats.walks, unit.stats.walk_reads
            cold()
            if (unit.stats.walk_reads - reads) != 24 * (unit.stats.walks - walks):
                raise RuntimeError(f"{name} unit: a cold walk did not read 24 entries")
            fns[f"{name}_unit_cold_walks_per_s"] = cold
            fns[f"{name}_unit_warm_translations_per_s"] = warm
        warm_up = [fn for key, fn in fns.items() if "warm" in key]
        for fn in warm_up:
            fn()
        out: dict[str, Any] = _best(fns, min_time)
        out["reads_per_cold_walk"] = 24.0
        return out


def _one(ok: bool) -> int:
    if not ok:
        raise RuntimeError("benchmark operation did not complete")
    return 1


def _lookups(prefix: str, tlb: Iotlb | native.NativeIotlb) -> dict[str, Callable[[], int]]:
    """Warm lookups: ``lookup_span`` (an int back) and ``lookup`` (an entry back)."""
    lookup_span, lookup = tlb.lookup_span, tlb.lookup
    starts = [int(SRC) + i * SZ_4K + 64 for i in range(PAGES)]

    def spans() -> int:
        for s in starts:
            lookup_span(DID, s, s + 512, False)
        return PAGES

    def entries() -> int:
        for s in starts:
            lookup(DID, s, False)
        return PAGES

    if lookup_span(DID, starts[0], starts[0] + 512, False) is None or lookup(DID, starts[0], False) is None:
        raise RuntimeError("benchmark IOTLB is not warm")
    return {f"{prefix}_lookup_span_per_s": spans, f"{prefix}_lookup_per_s": entries}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    r = run(quick="--quick" in args)
    if "--json" in args:
        print(json.dumps(r, indent=2))
        return 0
    print("pviommu compiled core vs Python (4-level stage 1 over 4-level stage 2, 4 KiB leaves)")
    if not r["native_available"]:
        print(f"  compiled core unavailable: {r['native_unavailable_reason']}")
    rows = [
        ("cold nested walks/s", "walks", ""),
        ("IOTLB lookup_span/s (warm)", "lookup_span", ""),
        ("IOTLB lookup/s (warm)", "lookup", ""),
        ("translate 1 MiB/s, warm", "translate_warm", ""),
        ("translate 1 MiB/s, cold", "translate_cold", ""),
        ("DMA copy MiB/s, warm", "copy_MiB", ""),
        ("MEMMOVE 4 KiB descriptors/s, warm", "memmove_desc", ""),
    ]
    print(f"  {'':32} {'python':>14} {'native':>14} {'ratio':>9}")
    for label, key, _ in rows:
        py = r[f"py_{key}_per_s"]
        nat = r.get(f"native_{key}_per_s")
        ratio = f"{nat / py:8.1f}x" if nat is not None else ""
        print(f"  {label:32} {py:>14,.0f} {nat if nat is None else f'{nat:,.0f}':>14} {ratio:>9}")
    if r["native_available"]:
        print(f"  {'walks/s inside one compiled translation':48} {r['native_loop_walks_per_s']:>14,.0f}"
              f"  ({r['native_loop_over_py_walks']:.0f}x the Python walker)")
        print(f"  memmove 1 MiB {r['memmove_MiB_per_s']:,.0f} MiB/s; copy/memmove: python "
              f"{r['py_copy_over_memmove']:.2f}x, native {r['native_copy_over_memmove']:.2f}x")
        print(f"  memmove 4 KiB {r['memmove_4k_per_s']:,.0f}/s; descriptor/memmove: python "
              f"{r['py_memmove_desc_over_memmove_4k']:.4f}x, native call "
              f"{r['native_memmove_desc_over_memmove_4k']:.3f}x, native device (execute_now + fast path) "
              f"{r['native_engine_desc_over_memmove_4k']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
