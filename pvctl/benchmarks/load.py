"""``load`` rows (issue #14's load targets), against the real services:

* idle streams: one partition opens 100 ``StreamFaults(follow=True)`` streams
  and leaves them idle; another partition's FlushDeviceDomain p50 then, vs
  its p50 with no streams open (measured before and after, pooled), target
  <= 2x. The server keeps at most its per-principal quota of them open and
  refuses the rest (RESOURCE_EXHAUSTED); the note says how many stayed open.
* many guests: 16 guests (guest agent processes, strict) with 2 DSA device
  processes each run dmatest together; the sum of their iops vs one of them
  running alone on the same host just before, target >= 1x (and 0 failures).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pvctl.benchmarks.report import Report, Row, percentile

IDLE_STREAMS = 100


def bench_idle_streams(report: Report, system: Any, quick: bool) -> None:
    import grpc

    from pviommu.abi import hv
    from pviommu.rpc.client import connect
    from pviommu.v1 import admin_pb2, hypervisor_pb2, hypervisor_pb2_grpc

    n = 150 if quick else 1500
    hog = system.add_partition(91, name="bench-hog", start_devices=False)
    quiet = system.add_partition(92, name="bench-quiet", start_devices=False)
    hog_channel = connect(system.hypervisor.address, hog.token)
    quiet_channel = connect(system.hypervisor.address, quiet.token)
    streams: list[Any] = []
    try:
        stub = hypervisor_pb2_grpc.HypervisorStub(quiet_channel)
        hog_stub = hypervisor_pb2_grpc.HypervisorStub(hog_channel)
        dd = hypervisor_pb2.DeviceDomain(partition_id=hv.HV_PARTITION_ID_SELF, domain_type=hv.DeviceDomainType.S1,
                                         domain_id=1)
        r = stub.CreateDeviceDomain(hypervisor_pb2.CreateDeviceDomainRequest(device_domain=dd), timeout=10)
        if r.result.status:
            raise RuntimeError(f"CreateDeviceDomain failed: {r.result.status_name}")
        flush = hypervisor_pb2.FlushDeviceDomainRequest(device_domain=dd)

        def sample(count: int) -> list[float]:
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                reply = stub.FlushDeviceDomain(flush, timeout=10)
                out.append(time.perf_counter() - t0)
                if reply.result.status:
                    raise RuntimeError(f"FlushDeviceDomain failed: {reply.result.status_name}")
            return out

        sample(20)
        before = sample(n // 2)
        streams = [hog_stub.StreamFaults(hypervisor_pb2.StreamFaultsRequest(follow=True)) for _ in range(IDLE_STREAMS)]
        time.sleep(0.5)  # the server accepts (or refuses) every one of them
        open_streams = sum(not s.done() for s in streams)
        refused = sum(s.done() and s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for s in streams)
        loaded = sample(n)
        still_open = sum(not s.done() for s in streams)
        for s in streams:
            s.cancel()
        streams = []
        time.sleep(0.3)
        after = sample(n // 2)
    finally:
        for s in streams:
            s.cancel()
        hog_channel.close()
        quiet_channel.close()
        for part in (hog, quiet):
            system.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=part.partition_id), timeout=60)
    unloaded = percentile(before + after, 0.5) * 1e6
    row = report.add("load", Row(f"FlushDeviceDomain p50, another partition holding {IDLE_STREAMS} idle streams",
                                 percentile(loaded, 0.5) * 1e6, "us", "same call, no streams open", unloaded))
    row.target, row.met = "<= 2x (issue #14)", row.ratio <= 2.0
    report.note("load",
                f"{n} FlushDeviceDomain calls (no device attached) of one partition with another partition's "
                f"{IDLE_STREAMS} StreamFaults(follow) streams open, against {n} without (half before, half after, "
                f"pooled); the server kept {open_streams} of them open (its per-partition quota) and refused "
                f"{refused} with RESOURCE_EXHAUSTED; {still_open} were still open after the loaded calls")


def bench_many_guests(report: Report, quick: bool) -> None:
    import grpc

    from pvctl.local import VirtualSystem, run_dmatest_stream
    from pviommu.v1 import guest_pb2

    guests = 2 if quick else 16
    duration = 0.6 if quick else 4.0
    params = guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=1, iterations=0, duration_s=duration,
                                     timeout=3000, seed=1)
    with VirtualSystem(guests=guests, devices_per_guest=2, memory_bytes=64 << 20) as system:
        warm = guest_pb2.DmatestParams(test_buf_size=16384, threads_per_chan=1, iterations=20, timeout=3000)
        for g in system.guests:  # every guest's driver probed and its devices configured before timing
            run_dmatest_stream(g.stub, warm, timeout=120)
        alone = run_dmatest_stream(system.guests[0].stub, params, timeout=120)
        results: dict[int, Any] = {}
        start = threading.Barrier(guests)

        def run(g: Any) -> None:
            start.wait(30)
            try:
                results[g.index] = run_dmatest_stream(g.stub, params, timeout=300)
            except grpc.RpcError as exc:
                results[g.index] = exc

        threads = [threading.Thread(target=run, args=(g,), daemon=True) for g in system.guests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    errors = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    done = [r for r in results.values() if not isinstance(r, grpc.RpcError)]
    failures = sum(r.failures for r in done) + alone.failures
    total = sum(r.iops for r in done)
    row = report.add("load", Row(f"{guests} guests x 2 devices dmatest together, aggregate iops", total, "iops",
                                 "1 guest x 2 devices alone", alone.iops))
    ok = not errors and len(done) == guests and failures == 0
    row.target, row.met = ">= 1x and 0 failures (issue #14)", ok and row.ratio >= 1.0
    report.note("load",
                f"{guests} strict guest agent processes, 2 DSA device processes each, dmatest 16 KiB, 1 thread per "
                f"channel (2 channels per guest), {duration:g} s, started together; aggregate = the sum of each "
                f"guest's iops; {sum(r.tests for r in done)} tests, {failures} failures, {len(errors)} runs lost")


__all__ = ["bench_idle_streams", "bench_many_guests"]
