"""The GuestAgent gRPC API end to end: real agent server, real hypervisor,
the fake DSA device running descriptors through a real IOMMU unit."""

from __future__ import annotations

import argparse
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from guest_agent.agent import Agent
from guest_agent.driver.flushqueue import FQ_SIZE
from guest_agent.main import build
from pviommu.abi.dsa import DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import MSI_WINDOW_START
from pviommu.rpc.client import connect
from pviommu.rpc.server import RunningServer
from pviommu.rpc.status import error_info
from pviommu.v1 import common_pb2, guest_pb2, guest_pb2_grpc
from tests.kit.guest_env import FakeDevice, HvEnv, PartitionInfo

# The aggregate over every thread: a pviommu addition, labelled as such (each thread's own line is dmatest's).
SUMMARY = re.compile(r"^pviommu aggregate of \d+ threads? \(not a dmatest line\): (\d+) tests, (\d+) failures "
                     r"\d+\.\d\d iops \d+ KB/s$")


@dataclass
class Guest:
    stub: guest_pb2_grpc.GuestAgentStub
    agent: Agent
    server: RunningServer
    device: FakeDevice
    partition: PartitionInfo


def start_guest(hv: HvEnv, mode: str = "strict") -> Guest:
    p = hv.partition()
    dev = hv.device(p)
    args = argparse.Namespace(listen="127.0.0.1:0", hypervisor=hv.address, bank_path=p.bank_path, token_file=None,
                              allow_no_iommu=False, flush_mode=mode)
    agent, server = build(args, token=p.token)
    hv.agents.append(agent)
    ch = connect(f"127.0.0.1:{server.port}", p.token)
    hv.channels.append(ch)
    return Guest(guest_pb2_grpc.GuestAgentStub(ch), agent, server, dev, p)


@pytest.fixture
def guest(hv: HvEnv) -> Iterator[Guest]:
    g = start_guest(hv)
    yield g
    g.server.stop(0)


def test_api_refuses_callers_without_the_partition_token(hv: HvEnv, guest: Guest) -> None:
    ch = connect(f"127.0.0.1:{guest.server.port}", "not-the-token")
    with pytest.raises(grpc.RpcError) as err:
        guest_pb2_grpc.GuestAgentStub(ch).GetIommuInfo(common_pb2.Empty())
    ch.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_api_reports_iommu_devices_and_domains(guest: Guest) -> None:
    info = guest.stub.GetIommuInfo(common_pb2.Empty())
    assert info.present and info.iova_width == 48 and info.partition_id == guest.partition.partition_id
    devs = guest.stub.ListDevices(common_pb2.Empty()).devices
    assert [d.logical_device_id for d in devs] == [guest.device.logical_device_id]
    assert devs[0].behind_pviommu and devs[0].domain_kind == "paging"
    kinds = sorted(d.kind for d in guest.stub.ListDomains(common_pb2.Empty()).domains)
    assert kinds == ["blocked", "identity", "paging"]


def test_api_map_unmap_roundtrip_counts_maps_and_flushes(guest: Guest) -> None:
    s, dev = guest.stub, guest.device.logical_device_id
    buf = s.AllocBuffer(guest_pb2.AllocRequest(size=8192))
    s.WriteMemory(guest_pb2.WriteRequest(gpa=buf.gpa, data=b"hello"))
    assert s.ReadMemory(guest_pb2.ReadRequest(gpa=buf.gpa, size=5)).data == b"hello"
    m = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=buf.gpa, size=8192, direction=guest_pb2.TO_DEVICE))
    assert m.iova and m.size == 8192
    u = s.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=m.iova, size=8192))
    assert u.flushed and u.unmapped == 8192
    c = s.GetStats(common_pb2.Empty()).counters
    assert c["maps"] == 1 and c["unmaps"] == 1 and c["flush_list"] == 1 and c["iova_allocated"] == 0
    s.FreeBuffer(buf)


def test_api_refusals_carry_the_hv_status_and_the_agent_keeps_serving(guest: Guest) -> None:
    s, dev = guest.stub, guest.device.logical_device_id
    ram = s.GetIommuInfo(common_pb2.Empty()).ram_bytes
    buf = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    cases = [
        (lambda: s.ReadMemory(guest_pb2.ReadRequest(gpa=ram - 8, size=64)), grpc.StatusCode.INVALID_ARGUMENT, "0x5"),
        (lambda: s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=buf.gpa, size=4096,
                                            iova=MSI_WINDOW_START)), grpc.StatusCode.INVALID_ARGUMENT, "0x5"),
        (lambda: s.AttachDevice(guest_pb2.AttachRequest(domain_id=1, logical_device_id=0xDEAD)),
         grpc.StatusCode.NOT_FOUND, "0x57"),
    ]
    default = next(d for d in s.ListDomains(common_pb2.Empty()).domains if d.kind == "paging")
    cases.append((lambda: s.DeleteDomain(guest_pb2.DomainRequest(domain_id=default.domain_id)),
                  grpc.StatusCode.FAILED_PRECONDITION, "0x58"))
    for call, code, status in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, err.value.details()
        assert error_info(err.value)["hv_status"] == status
    assert s.GetIommuInfo(common_pb2.Empty()).present


def test_api_vfio_style_domain_lifecycle(guest: Guest) -> None:
    s, dev = guest.stub, guest.device.logical_device_id
    d = s.CreateDomain(guest_pb2.CreateDomainRequest(kind="paging"))
    assert d.root_gpa and d.table_pages == 1
    s.AttachDevice(guest_pb2.AttachRequest(domain_id=d.domain_id, logical_device_id=dev))
    assert s.ListDevices(common_pb2.Empty()).devices[0].domain_id == d.domain_id
    with pytest.raises(grpc.RpcError) as err:
        s.DeleteDomain(guest_pb2.DomainRequest(domain_id=d.domain_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    s.DetachDevice(guest_pb2.DeviceRef(logical_device_id=dev))
    assert s.ListDevices(common_pb2.Empty()).devices[0].domain_kind == "paging"
    s.DeleteDomain(guest_pb2.DomainRequest(domain_id=d.domain_id))
    assert d.domain_id not in [x.domain_id for x in s.ListDomains(common_pb2.Empty()).domains]


# -- the stale-IOTLB hazard, shown with raw descriptors --------------------------------------
def _copy(s: guest_pb2_grpc.GuestAgentStub, dev: int, src: int, dst: int, rec_iova: int, rec_gpa: int,
          n: int = 64) -> guest_pb2.DescriptorReply:
    desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR), completion_addr=rec_iova,
                      src_addr=src, dst_addr=dst, xfer_size=n).pack()
    s.WriteMemory(guest_pb2.WriteRequest(gpa=rec_gpa, data=bytes(32)))
    return s.SubmitDescriptor(guest_pb2.DescriptorRequest(logical_device_id=dev, descriptor=desc, wait=True,
                                                          timeout_ms=3000, completion_gpa=rec_gpa))


def _setup_copy(guest: Guest) -> tuple[int, int, int, int, int, int]:
    s, dev = guest.stub, guest.device.logical_device_id
    rec = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    rec_map = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=rec.gpa, size=4096))
    src = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    dst = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    s.WriteMemory(guest_pb2.WriteRequest(gpa=src.gpa, data=b"\xab" * 64))
    src_map = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=src.gpa, size=4096,
                                         direction=guest_pb2.TO_DEVICE))
    dst_map = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=dst.gpa, size=4096,
                                         direction=guest_pb2.FROM_DEVICE))
    return rec_map.iova, rec.gpa, src_map.iova, dst_map.iova, dst.gpa, dev


def test_device_faults_on_the_old_iova_after_unmap_with_flush(guest: Guest) -> None:
    s = guest.stub
    rec_iova, rec_gpa, src, dst, dst_gpa, dev = _setup_copy(guest)
    ok = _copy(s, dev, src, dst, rec_iova, rec_gpa)
    assert ok.status == DsaStatus.SUCCESS and ok.status_name == "DSA_COMP_SUCCESS"
    assert s.ReadMemory(guest_pb2.ReadRequest(gpa=dst_gpa, size=64)).data == b"\xab" * 64
    assert s.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=dst, size=4096)).flushed
    bad = _copy(s, dev, src, dst, rec_iova, rec_gpa)
    assert bad.status & 0x7F == DsaStatus.PAGE_FAULT_NOBOF and bad.status & 0x80  # a write fault
    fault_addr = struct.unpack_from("<Q", bad.completion_record, 8)[0]
    assert fault_addr == dst


def test_with_skip_flush_the_device_reaches_the_old_page_until_flush(guest: Guest) -> None:
    s = guest.stub
    rec_iova, rec_gpa, src, dst, dst_gpa, dev = _setup_copy(guest)
    assert _copy(s, dev, src, dst, rec_iova, rec_gpa).status == DsaStatus.SUCCESS  # warms the IOTLB
    u = s.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=dst, size=4096, skip_flush=True))
    assert not u.flushed
    s.WriteMemory(guest_pb2.WriteRequest(gpa=dst_gpa, data=bytes(64)))
    stale = _copy(s, dev, src, dst, rec_iova, rec_gpa)
    assert stale.status == DsaStatus.SUCCESS, "the stale IOTLB entry still translates"
    assert s.ReadMemory(guest_pb2.ReadRequest(gpa=dst_gpa, size=64)).data == b"\xab" * 64
    assert s.GetStats(common_pb2.Empty()).counters["pending_unmaps"] == 1
    s.Flush(guest_pb2.FlushRequest(logical_device_id=dev))
    after = _copy(s, dev, src, dst, rec_iova, rec_gpa)
    assert after.status & 0x7F == DsaStatus.PAGE_FAULT_NOBOF
    assert s.GetStats(common_pb2.Empty()).counters["pending_unmaps"] == 0


# -- dmatest over the API ---------------------------------------------------------------------
def _dmatest(s: guest_pb2_grpc.GuestAgentStub, **kw: object) -> tuple[guest_pb2.DmatestResult, list[str], int]:
    lines, progress, result = [], 0, None
    for ev in s.RunDmatest(guest_pb2.DmatestParams(**kw), timeout=120):  # type: ignore[arg-type]
        if ev.HasField("line"):
            lines.append(ev.line)
        elif ev.HasField("progress"):
            progress = max(progress, ev.progress)
        else:
            result = ev.result
    assert result is not None
    return result, lines, progress


@pytest.mark.parametrize("design", ["nested", "baseline"])
def test_dmatest_reports_zero_failures_in_both_designs(guest: Guest, design: str) -> None:
    r, lines, progress = _dmatest(guest.stub, iterations=100, threads_per_chan=2, seed=7, design=design)
    assert SUMMARY.match(r.summary), r.summary
    assert (r.tests, r.failures) == (200, 0) and progress == 200
    assert "dmatest: Added 2 threads using dma0chan0" in lines
    assert {t.thread for t in r.threads} == {"dma0chan0-copy0", "dma0chan0-copy1"}
    assert sum(1 for x in lines if re.match(r"^dmatest: dma0chan0-copy\d: summary 100 tests, 0 failures ", x)) == 2
    kinds = sorted(d.kind for d in guest.stub.ListDomains(common_pb2.Empty()).domains)
    assert kinds == ["blocked", "identity", "paging"], "the baseline test domain is gone afterwards"
    counters = guest.stub.GetStats(common_pb2.Empty()).counters
    if design == "baseline":
        assert counters["baseline_map_reps"] >= 200 * 2 * 4
    else:
        assert counters["maps"] >= 400 and counters["flush_list"] >= 400


def test_dmatest_in_lazy_mode_flushes_once_per_full_queue(hv: HvEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    # the queue's timer out of reach, so only a full queue flushes: a count, not a race with the clock
    monkeypatch.setattr("guest_agent.driver.flushqueue.FQ_TIMEOUT_S", 3600.0)
    g = start_guest(hv, mode="lazy")
    try:
        before = g.stub.GetStats(common_pb2.Empty()).counters
        r, _, _ = _dmatest(g.stub, iterations=100, threads_per_chan=2, seed=3)
        assert (r.tests, r.failures) == (200, 0)
        c = g.stub.GetStats(common_pb2.Empty()).counters
        unmaps, flushes = c["unmaps"] - before["unmaps"], c["flushes"] - before["flushes"]
        assert c["flush_list"] == 0 and unmaps >= 400
        assert flushes == unmaps // FQ_SIZE  # one domain-wide flush per FQ_SIZE unmaps, none per unmap
        # the rest wait for the next flush (the flush may also have taken the other thread's next unmap)
        assert unmaps - flushes * FQ_SIZE - c["pending_unmaps"] in (0, 1)
    finally:
        g.server.stop(0)


def test_dmatest_is_deterministic_for_a_seed(guest: Guest) -> None:
    def total_lens(seed: int) -> list[int]:
        out = guest.agent.run_dmatest(_params(seed))
        return [t.total_len for t in out.threads]

    assert total_lens(5) == total_lens(5)
    assert total_lens(5) != total_lens(6)


def _params(seed: int) -> object:
    from guest_agent.dsa.dmatest import DmatestParams

    return DmatestParams(iterations=20, threads_per_chan=2, seed=seed, noverify=True)


def test_dmatest_reports_a_transfer_size_not_below_the_buffer_size_as_dmatest_does(guest: Guest) -> None:
    r, lines, _ = _dmatest(guest.stub, iterations=5, test_buf_size=4096, transfer_size=4096)
    assert "dmatest: 4096-byte transfer size must be lower than 4096-buffer size" in lines
    # dmatest counts the test it was about to run, then the thread ends with its summary
    assert any(x.startswith("dmatest: dma0chan0-copy0: summary 1 tests, 0 failures ") for x in lines), lines
    assert (r.tests, r.failures) == (1, 0)


def test_stream_faults_relays_the_hypervisor_log_without_error(guest: Guest) -> None:
    faults = list(guest.stub.StreamFaults(guest_pb2.FaultsRequest(follow=False), timeout=10))
    assert all(f.logical_device_id for f in faults)
