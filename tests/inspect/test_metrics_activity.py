"""The Prometheus endpoints (``--metrics-port`` of ``serve hypervisor`` and
``serve dsa``) move by exactly what really happened: hypercalls by call and
status, the RPC latency histogram, descriptors and completions by kind, IOTLB
misses on a first DMA and hits on a repeat, faults by reason after a DMA to
an unmapped IOVA. Real processes (hypervisor, one DSA device, one guest agent)
on loopback; this test is the guest's script and the scraper."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvctl.procs import Supervisor
from pviommu.abi.dsa import CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.rpc.auth import new_token
from pviommu.rpc.client import connect
from pviommu.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    guest_pb2,
    guest_pb2_grpc,
    hypervisor_pb2,
    hypervisor_pb2_grpc,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SELF = 0xFFFF_FFFF_FFFF_FFFF
UNMAPPED_IOVA = 0x7000_0000  # far below the agent's top-down IOVA allocator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class System:
    hv_metrics: int
    dsa_metrics: int
    hyper: hypervisor_pb2_grpc.HypervisorStub
    agent: guest_pb2_grpc.GuestAgentStub
    dev: int

    def copy(self, src: int, dst: int, rec_iova: int, rec_gpa: int) -> CompletionRecord:
        desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR), completion_addr=rec_iova,
                          src_addr=src, dst_addr=dst, xfer_size=64).pack()
        self.agent.WriteMemory(guest_pb2.WriteRequest(gpa=rec_gpa, data=bytes(32)), timeout=10)
        reply = self.agent.SubmitDescriptor(guest_pb2.DescriptorRequest(
            logical_device_id=self.dev, descriptor=desc, wait=True, timeout_ms=10000, completion_gpa=rec_gpa),
            timeout=30)
        assert reply.accepted
        return CompletionRecord.unpack(reply.completion_record)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    work: Path = tmp_path_factory.mktemp("metrics")
    admin_token = new_token()
    hv_port, dsa_port = _free_port(), _free_port()
    with Supervisor(work, env={"PVIOMMU_ADMIN_TOKEN": admin_token}) as sup:
        hv = sup.start("hypervisor", "hypervisor", "--memory-dir", str(work / "banks"),
                       "--metrics-port", str(hv_port))
        channels = [connect(hv.address, admin_token)]
        admin = admin_pb2_grpc.AdminStub(channels[0])
        part = admin.CreatePartition(admin_pb2.CreatePartitionRequest(name="guest0", memory_bytes=64 << 20))
        sup.start("dsa0", "dsa", "--hypervisor", hv.address, "--name", "dsa0", "--metrics-port", str(dsa_port))
        dev = next(d.logical_device_id for d in admin.ListDevices(common_pb2.Empty()).devices if d.name == "dsa0")
        assert admin.AssignDevice(admin_pb2.AssignDeviceRequest(
            logical_device_id=dev, partition_id=part.partition.partition_id)).result.status == 0
        guest = sup.start("guest0", "guest", "--hypervisor", hv.address, "--bank-path", part.partition.bank_path,
                          env={"PVIOMMU_TOKEN": part.token})
        channels += [connect(hv.address, part.token), connect(guest.address, part.token)]
        agent = guest_pb2_grpc.GuestAgentStub(channels[2])
        agent.GetIommuInfo(common_pb2.Empty(), timeout=30)  # the driver has probed: no hypercall in flight
        try:
            yield System(hv_port, dsa_port, hypervisor_pb2_grpc.HypervisorStub(channels[1]), agent, dev)
        finally:
            for ch in channels:
                ch.close()


def test_hypercall_counters_and_latency_histogram_move_by_the_calls_made(system: System) -> None:
    before = scrape(system.hv_metrics)
    for _ in range(3):
        r = system.hyper.GetIommuCapabilities(hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=SELF))
        assert r.result.status == 0
    for _ in range(2):  # refused: no such domain
        r2 = system.hyper.DeleteDeviceDomain(hypervisor_pb2.DeleteDeviceDomainRequest(
            device_domain=hypervisor_pb2.DeviceDomain(partition_id=SELF, domain_type=1, domain_id=4242)))
        assert r2.result.status_name == "HV_STATUS_INVALID_PARAMETER"
    after = scrape(system.hv_metrics)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    calls = "pviommu_hypervisor_hypercalls_total"
    assert delta(calls, call="GET_IOMMU_CAPABILITIES", status="HV_STATUS_SUCCESS") == 3
    assert delta(calls, call="DELETE_DEVICE_DOMAIN", status="HV_STATUS_INVALID_PARAMETER") == 2
    assert delta(calls, call="DELETE_DEVICE_DOMAIN", status="HV_STATUS_SUCCESS") == 0
    hist = "pviommu_rpc_latency_seconds_count"
    assert delta(hist, service="hypervisor", method="GetIommuCapabilities", code="OK") == 3
    assert delta(hist, service="hypervisor", method="DeleteDeviceDomain", code="OK") == 2
    assert value(after, "pviommu_hypervisor_partitions") == 1  # a gauge


def test_the_hypervisor_exports_the_revision_it_enforces_the_default_v2(system: System) -> None:
    """Issue #15: the revision is shown in metrics (docs/revisions.md); v2 is the default."""
    samples = scrape(system.hv_metrics)
    assert value(samples, "pviommu_hypervisor_revision", revision="v2", s2_baseline="0") == 1
    shown = {dict(labels)["revision"] for (name, labels), v in samples.items()
             if name == "pviommu_hypervisor_revision" and v}
    assert shown == {"v2"}


def test_a_first_dma_misses_the_iotlb_and_walks_and_a_repeat_only_hits(system: System) -> None:
    a = system.agent
    rec, src, dst = (a.AllocBuffer(guest_pb2.AllocRequest(size=4096), timeout=10) for _ in range(3))
    rec_iova, src_iova, dst_iova = (
        a.Map(guest_pb2.MapRequest(logical_device_id=system.dev, gpa=b.gpa, size=4096), timeout=10).iova
        for b in (rec, src, dst))
    s0 = scrape(system.dsa_metrics)
    assert system.copy(src_iova, dst_iova, rec_iova, rec.gpa).code == DsaStatus.SUCCESS
    s1 = scrape(system.dsa_metrics)
    assert system.copy(src_iova, dst_iova, rec_iova, rec.gpa).code == DsaStatus.SUCCESS
    s2 = scrape(system.dsa_metrics)

    def d(x: Samples, y: Samples, name: str, **labels: str) -> float:
        return value(y, name, **labels) - value(x, name, **labels)

    p = "pviommu_dsa_"
    assert d(s0, s2, p + "descriptors_total", opcode="MEMMOVE") == 2
    assert d(s0, s2, p + "completions_total", status="SUCCESS") == 2
    assert d(s0, s1, p + "iotlb_misses_total") >= 3  # source, destination, completion record: never walked yet
    assert d(s0, s1, p + "iommu_walks_total") == d(s0, s1, p + "iotlb_misses_total")  # a miss is one walk
    assert d(s1, s2, p + "iotlb_misses_total") == 0 and d(s1, s2, p + "iommu_walks_total") == 0
    assert d(s1, s2, p + "iotlb_hits_total") >= 3


def test_a_dma_to_an_unmapped_iova_counts_one_fault_by_reason_on_both_sides(system: System) -> None:
    a = system.agent
    rec, dst = (a.AllocBuffer(guest_pb2.AllocRequest(size=4096), timeout=10) for _ in range(2))
    rec_iova, dst_iova = (a.Map(guest_pb2.MapRequest(logical_device_id=system.dev, gpa=b.gpa, size=4096),
                                timeout=10).iova for b in (rec, dst))
    hv0, dsa0 = scrape(system.hv_metrics), scrape(system.dsa_metrics)
    record = system.copy(UNMAPPED_IOVA, dst_iova, rec_iova, rec.gpa)
    assert record.code == DsaStatus.PAGE_FAULT_NOBOF and record.fault_addr == UNMAPPED_IOVA
    dsa1 = scrape(system.dsa_metrics)
    assert value(dsa1, "pviommu_dsa_iommu_faults_total", reason="0x71") \
        - value(dsa0, "pviommu_dsa_iommu_faults_total", reason="0x71") == 1  # FS_NOT_PRESENT
    assert value(dsa1, "pviommu_dsa_completions_total", status="PAGE_FAULT_NOBOF") \
        - value(dsa0, "pviommu_dsa_completions_total", status="PAGE_FAULT_NOBOF") == 1
    name = "pviommu_hypervisor_faults_by_reason_total"
    deadline = time.monotonic() + 10  # the device reports faults from a background thread
    while True:
        hv1 = scrape(system.hv_metrics)
        moved = value(hv1, name, reason="FS_NOT_PRESENT") - value(hv0, name, reason="FS_NOT_PRESENT")
        if moved or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert moved == 1
    assert value(hv1, "pviommu_hypervisor_faults_total") - value(hv0, "pviommu_hypervisor_faults_total") == 1
