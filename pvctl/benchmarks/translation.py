"""Translation benchmark: what the nested IOMMU costs a device.

Prints, measured in one process over real shared-memory banks:

* translations/s with everything cold (a global invalidation before every
  request, so each is a full 2-D walk with empty paging-structure caches) vs
  a warm IOTLB;
* average entry reads per cold walk (24 for 4-level stage 1 over 4-level
  stage 2, 4 KiB leaves on both);
* the same over 256 neighbouring pages after one global invalidation per
  pass (IOTLB misses, as fresh IOVAs are): the first walk is full, the next
  ones start from the paging-structure caches (``pviommu.iommu.pscache``);
  walks/s and average reads per walk;
* copy bandwidth of 1 MiB through ``DmaMemory`` + the unit (warm IOTLB) on
  4 KiB and on 2 MiB stage-1 mappings, next to a plain memoryview memmove of
  the same size, as ratios. Physically contiguous pages are coalesced into
  one run, so a 4 KiB-mapped contiguous buffer still copies as one slice;
  what remains is the per-page IOTLB lookup.

Run: ``python -m pvctl.benchmarks.translation [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pvctl.benchmarks.report import Report, Row, rate
from pvctl.benchmarks.world import nested_world, scratch_host
from pviommu.addr import SZ_2M, SZ_4K, Gpa, Iova
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import HostMemory
from pviommu.mem.dma import DmaMemory
from pviommu.pt.common import RW
from pviommu.units import MiB

SLOT, DID = 1, 1
IOVA_4K_SRC, IOVA_4K_DST = Iova(0x10_0000_0000), Iova(0x10_4000_0000)
IOVA_2M_SRC, IOVA_2M_DST = Iova(0x20_0000_0000), Iova(0x20_4000_0000)


def run(quick: bool = False) -> dict[str, Any]:
    with scratch_host("pviommu-bench-") as host:
        return _run(host, 0.15 if quick else 1.0)


def _run(host: HostMemory, min_time: float) -> dict[str, Any]:
    # 4K stage-2 leaves for the first 8 MiB (full-depth nested walks), 2M leaves above
    world = nested_world(host, ram_bytes=64 * MiB, s2_4k_bytes=8 * MiB)
    world.s1.map(IOVA_4K_SRC, Gpa(4 * MiB), MiB, RW)
    world.s1.map(IOVA_4K_DST, Gpa(6 * MiB), MiB, RW)
    world.s1.map(IOVA_2M_SRC, Gpa(16 * MiB), SZ_2M, RW)
    world.s1.map(IOVA_2M_DST, Gpa(20 * MiB), SZ_2M, RW)
    world.ram.write(Gpa(4 * MiB), bytes(range(256)) * (MiB // 256))
    world.ram.write(Gpa(16 * MiB), bytes(range(256)) * (MiB // 256))
    world.own(SLOT, DID)
    bank1 = world.bank
    unit = IommuUnit(host, pscache=True)  # the Python unit: its paging-structure caches are measured here
    pages = [Iova(IOVA_4K_SRC + i * SZ_4K) for i in range(256)]

    def cold() -> int:  # every walk full: caches emptied before each
        for iova in pages:
            unit.invalidate_all()
            unit.translate(SLOT, iova, 8, False)
        return len(pages)

    def neighbours() -> int:  # IOTLB misses, paging-structure caches warm after the first walk
        unit.invalidate_all()
        for iova in pages:
            unit.translate(SLOT, iova, 8, False)
        return len(pages)

    def warm() -> int:
        for iova in pages:
            unit.translate(SLOT, iova, 8, False)
        return len(pages)

    walks0, reads0 = unit.stats.walks, unit.stats.walk_reads
    cold_rate = rate(cold, min_time)
    reads_per_walk = (unit.stats.walk_reads - reads0) / (unit.stats.walks - walks0)
    walks0, reads0 = unit.stats.walks, unit.stats.walk_reads
    ps_rate = rate(neighbours, min_time)
    ps_reads_per_walk = (unit.stats.walk_reads - reads0) / (unit.stats.walks - walks0)
    warm()
    tr0, reads0 = unit.stats.translations, unit.stats.walk_reads
    warm_rate = rate(warm, min_time)
    warm_reads = (unit.stats.walk_reads - reads0) / max(1, unit.stats.translations - tr0)

    dma = DmaMemory(host, unit.bind(SLOT))
    src_view, dst_view = bank1.view[4 * MiB : 5 * MiB], bank1.view[6 * MiB : 7 * MiB]

    def memmove() -> int:
        dst_view[:] = src_view
        return MiB

    def copy(src: Iova, dst: Iova) -> Callable[[], int]:
        def one() -> int:
            result = dma.copy(src, dst, MiB)
            if result.fault is not None:
                raise RuntimeError(f"benchmark copy faulted: {result.fault}")
            return MiB

        return one

    results: dict[str, Any] = {
        "cold_translations_per_s": cold_rate,
        "warm_translations_per_s": warm_rate,
        "warm_over_cold": warm_rate / cold_rate,
        "reads_per_cold_walk": reads_per_walk,
        "pscache_translations_per_s": ps_rate,
        "reads_per_walk_pscache": ps_reads_per_walk,
        "reads_per_warm_translation": warm_reads,  # IOTLB hits: no table read
    }
    base_bw = rate(memmove, min_time)
    results["memmove_MiB_per_s"] = base_bw / MiB
    for name, src, dst in (("4k", IOVA_4K_SRC, IOVA_4K_DST), ("2m", IOVA_2M_SRC, IOVA_2M_DST)):
        fn = copy(src, dst)
        fn()  # warm the IOTLB
        runs = len(unit.translate(SLOT, src, MiB, False).runs)
        bw = rate(fn, min_time)
        results[f"copy_{name}_MiB_per_s"] = bw / MiB
        results[f"copy_{name}_over_memmove"] = bw / base_bw
        results[f"copy_{name}_runs_per_MiB"] = runs
    if bytes(bank1.view[20 * MiB : 21 * MiB]) != bytes(bank1.view[16 * MiB : 17 * MiB]):
        raise RuntimeError("benchmark copy produced wrong bytes")
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    r = run(quick="--quick" in args)
    print("pviommu translation benchmark (4-level stage 1 over 4-level stage 2)")
    print(f"  cold-walk translations/s   {r['cold_translations_per_s']:>12,.0f}")
    print(f"  warm-IOTLB translations/s  {r['warm_translations_per_s']:>12,.0f}  ({r['warm_over_cold']:.1f}x cold)")
    print(f"  reads per cold walk        {r['reads_per_cold_walk']:>12.1f}")
    print(f"  walks/s, PS caches warm    {r['pscache_translations_per_s']:>12,.0f}"
          f"  ({r['pscache_translations_per_s'] / r['cold_translations_per_s']:.1f}x cold; IOTLB misses, "
          "paging-structure caches warm)")
    print(f"  reads per walk, PS warm    {r['reads_per_walk_pscache']:>12.2f}")
    print(f"  memmove 1 MiB              {r['memmove_MiB_per_s']:>12,.0f} MiB/s")
    for name in ("4k", "2m"):
        print(
            f"  DMA copy 1 MiB, {name.upper()} pages   {r[f'copy_{name}_MiB_per_s']:>12,.0f} MiB/s"
            f"  ({r[f'copy_{name}_over_memmove']:.2f}x memmove, {r[f'copy_{name}_runs_per_MiB']} run(s))"
        )
    return 0



# -- rows of `pviommu bench` ------------------------------------------------------------------
def bench_translation(report: Report, quick: bool) -> None:
    from pvctl.benchmarks import native as native_bench

    r = run(quick=quick)
    report.add("translation", Row("warm IOTLB translations/s", r["warm_translations_per_s"], "walks/s",
                                  "cold walks/s", r["cold_translations_per_s"]))
    report.add("translation", Row("cold (full 2-D) walks/s", r["cold_translations_per_s"], "walks/s",
                                  "warm translations/s", r["warm_translations_per_s"]))
    row = report.add("translation", Row("reads per cold walk", r["reads_per_cold_walk"], "reads",
                                        "2-D walk count (4+1)*(4+1)-1", 24.0))
    row.target, row.met = "= 24", r["reads_per_cold_walk"] == 24.0
    report.add("translation", Row("IOTLB-miss walks/s, paging-structure caches warm",
                                  r["pscache_translations_per_s"], "walks/s",
                                  "cold walks/s", r["cold_translations_per_s"]))
    report.add("translation", Row("reads per walk, paging-structure caches warm", r["reads_per_walk_pscache"],
                                  "reads", "full 2-D walk", r["reads_per_cold_walk"]))
    note = ("4-level stage 1 over 4-level stage 2, 4 KiB leaves in both (full-depth walks), "
            "256 pages, one process; cold = a global invalidation before every walk (empty "
            "IOTLB and paging-structure caches); paging-structure caches warm = the 256 "
            "neighbouring pages after one global invalidation (each an IOTLB miss, the first "
            "walk full); the rows above are the Python unit (IommuUnit(native=False))")
    u = native_bench.unit_rates(quick=quick)
    if "native_unit_cold_walks_per_s" in u:
        report.add("translation", Row("cold (full 2-D) walks/s, compiled unit", u["native_unit_cold_walks_per_s"],
                                      "walks/s", "Python unit", u["py_unit_cold_walks_per_s"]))
        report.add("translation", Row("warm IOTLB translations/s, compiled unit",
                                      u["native_unit_warm_translations_per_s"], "walks/s", "Python unit",
                                      u["py_unit_warm_translations_per_s"]))
        note += ("; compiled unit = IommuUnit(native=True) (no paging-structure caches) against the Python unit "
                 "(with them), the same 256 pages, interleaved in the same run (pvctl.benchmarks.native.unit_rates)")
    report.notes["translation"] = note


if __name__ == "__main__":
    raise SystemExit(main())
