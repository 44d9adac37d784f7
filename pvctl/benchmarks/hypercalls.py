"""``hypercall`` rows: p50/p99 round trips of the hot hypercalls against the
hypervisor's empty ``Ping`` on the same channel."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pvctl.benchmarks.report import Report, Row, percentile


def bench_hypercalls(report: Report, agent: Any, quick: bool) -> None:
    from guest_agent.driver.domain import DomainKind
    from pviommu.abi import hv
    from pviommu.v1 import common_pb2, hypervisor_pb2

    n = 150 if quick else 1500
    stub = agent.hv.stub
    dev = next(iter(agent.iommu.devices.values()))
    dom = agent.iommu.new_domain(DomainKind.PAGING)
    spare = agent.iommu.new_domain(DomainKind.PAGING)
    agent.iommu.attach(dev, dom)
    pid = hv.HV_PARTITION_ID_SELF
    dd = hypervisor_pb2.DeviceDomain(partition_id=pid, domain_type=hv.DeviceDomainType.S1, domain_id=dom.domain_id)
    dd_spare = hypervisor_pb2.DeviceDomain(partition_id=pid, domain_type=hv.DeviceDomainType.S1,
                                           domain_id=spare.domain_id)
    calls: dict[str, Callable[[], Any]] = {
        "Ping": lambda: stub.Ping(common_pb2.Empty(), timeout=10),
        "GetIommuCapabilities": lambda: stub.GetIommuCapabilities(
            hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=pid), timeout=10),
        "FlushDeviceDomain": lambda: stub.FlushDeviceDomain(
            hypervisor_pb2.FlushDeviceDomainRequest(device_domain=dd), timeout=10),
        "FlushDeviceDomain (no device attached)": lambda: stub.FlushDeviceDomain(
            hypervisor_pb2.FlushDeviceDomainRequest(device_domain=dd_spare), timeout=10),
    }
    samples: dict[str, list[float]] = {k: [] for k in calls}
    try:
        for fn in calls.values():
            for _ in range(20):
                fn()
        for _ in range(n):  # interleaved, so drift hits every call alike
            for name, fn in calls.items():
                t0 = time.perf_counter()
                reply = fn()
                samples[name].append(time.perf_counter() - t0)
                result = getattr(reply, "result", None)
                if result is not None and result.status != 0:
                    raise RuntimeError(f"{name} failed: {result.status_name}")
    finally:
        agent.iommu.attach(dev, dev.default_domain)
        agent.iommu.delete_domain(dom)
        agent.iommu.delete_domain(spare)
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ref = percentile(samples["Ping"], q) * 1e6
        for name in calls:
            if name == "Ping":
                continue
            row = report.add("hypercall", Row(f"{name} {label}", percentile(samples[name], q) * 1e6, "us",
                                              f"Ping {label}", ref))
            if label == "p50" and "no device" not in name:
                row.target, row.met = "<= 1.5x empty call", row.ratio <= 1.5
    report.notes["hypercall"] = (f"{n} calls of each, interleaved, one channel, from this process; Ping is an "
                                 "authenticated empty method of the same server")
