"""``pviommu bench``: the benchmark suite (issue #8, design "Measuring it"); one
module per benchmark under ``pvctl/benchmarks/``.

Every figure is printed next to a reference measured in the same run, as a
ratio, because absolute times on shared machines are noisy. Sections:

1. ``map_unmap``: 4 KiB pages mapped+unmapped per second by the nested design
   (the guest writes its stage-1 table, one FlushDeviceDomain per batch of
   unmaps) vs the map-by-hypercall baseline (MapDeviceGpaPages and
   UnmapDeviceGpaPages per mapping), for 4 KiB, 64 KiB and 2 MiB buffers.
   Measured with the guest driver in this process (``Agent`` on a partition
   of its own) against the real hypervisor and a real DSA process attached to
   the domain, so every flush reaches a device.
2. ``dma``: MEMMOVE bandwidth on 4 KiB and 2 MiB stage-1 mappings, warm and
   cold IOTLB, against a plain memmove of the same size in the same process,
   at two layers:
   * ``engine``: the DSA model running the descriptor on this thread
     (``DsaDevice.execute_now``: validation, ``DmaMemory`` through a real
     ``IommuUnit`` nested walk over real banks, completion record write);
   * ``e2e``: guest driver -> shared-memory portal ring (doorbell only when
     the device sleeps) -> device process -> completion record polled in
     guest RAM, through the real services.
   The memmove targets apply to ``engine``: that is the cost of translating and
   copying, which is what a hardware device pays. The ``e2e vs engine`` rows
   are what the transport adds (issue #14's >= 0.5x at 4 KiB, >= 0.9x at
   16 MiB on 2 MiB mappings, warm).
3. ``translation``: walks per second cold (full 2-D walk) and warm (IOTLB
   hit), and memory reads per cold walk vs the 2-D walk count (24 for 4 over
   4 levels); reuses ``pvctl.benchmarks.translation``.
4. ``hypercall``: p50/p99 round trip of GetIommuCapabilities and
   FlushDeviceDomain vs the hypervisor's empty ``Ping`` on the same channel.
5. ``hypercall_page``: FlushDeviceDomain (and FlushDeviceDomainList,
   GetIommuCapabilities) through the hypercall page in shared memory vs the
   gRPC Ping, interleaved (issue #14: flush p50 <= 0.2x Ping p50).
6. ``dmatest``: iops and KB/s for 1, 2 and 4 threads, nested vs baseline,
   16 KiB buffers, in a strict guest and in a lazy (DMA_FQ) guest agent
   process (the real ``RunDmatest``).
7. ``load``: another partition's FlushDeviceDomain p50 while one partition
   holds 100 idle streams, vs without; 16 guests x 2 devices running dmatest
   together, aggregate iops vs one of them alone (``pvctl.benchmarks.load``).

``--quick`` shortens every loop (the smoke test); a full run takes about
three minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pvctl.benchmarks import dma, dmatest, hypercall_page, hypercalls, load, map_unmap, translation
from pvctl.benchmarks.report import Report, kept_analysis, machine_facts, num, render_markdown, table
from pvctl.benchmarks.system import local_agent, virtual_system


def run_suite(quick: bool, command: str, progress: Callable[[str], None] | None = None) -> Report:
    say = progress or (lambda msg: None)
    report = Report(quick=quick, command=command, machine=machine_facts())
    start = time.perf_counter()
    say("translation")
    translation.bench_translation(report, quick)
    say("DMA engine")
    dma.bench_dma_engine(report, quick)
    with virtual_system(quick) as system:
        with local_agent(system, "bench") as agent:
            say("map/unmap")
            map_unmap.bench_map_unmap(report, agent, quick)
            say("DMA end to end")
            dma.bench_dma_e2e(report, agent, quick)
            say("hypercalls")
            hypercalls.bench_hypercalls(report, agent, quick)
            say("hypercall page")
            hypercall_page.bench_hypercall_page(report, agent, quick)
        say("dmatest")
        dmatest.bench_dmatest(report, system, quick)
        say("load: idle streams")
        load.bench_idle_streams(report, system, quick)
    say("load: many guests")
    load.bench_many_guests(report, quick)
    report.seconds = time.perf_counter() - start
    return report


def run_banks(quick: bool, as_json: bool, output: str) -> int:
    """``pviommu bench --banks``: tmpfs against a disk folder (pvctl.benchmarks.banks)."""
    from pvctl.benchmarks import banks

    command = "pviommu bench --banks" + (" --quick" if quick else "")
    machine = machine_facts()
    result = banks.run(quick)
    if as_json:
        print(json.dumps({"command": command, "machine": machine, **result}, indent=2))
    else:
        for name, t, d, unit in banks.rows(result):
            print(f"{name}: tmpfs {num(t)} {unit}, disk {num(d)} {unit}")
    if output:
        path = Path(output)
        old = path.read_text() if path.exists() else ""
        path.write_text(banks.replace_block(old, banks.markdown(result, command, machine)))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    quick = bool(getattr(args, "quick", False))
    as_json = bool(getattr(args, "json", False))
    output = getattr(args, "output", "docs/benchmarks.md")
    if getattr(args, "banks", False):
        return run_banks(quick, as_json, output)
    command = "pviommu bench" + (" --quick" if quick else "") + (" --json" if as_json else "")
    report = run_suite(quick, command, None if as_json else (lambda m: print(f"bench: {m} ...", file=sys.stderr)))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(table(report))
        print(f"\n{report.seconds:.0f} s")
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(report, kept_analysis(path)))
    sys.stdout.flush()
    return 0
