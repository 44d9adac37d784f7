"""End to end with real processes: hypervisor, a real DSA device (dma_device)
and the guest agent, started by pvctl's ``VirtualSystem``. Skipped until the
device service (dma_device.main) exists."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("dma_device.main")

from pvctl.local import VirtualSystem, run_dmatest_stream
from pviommu.abi.dsa import DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.v1 import common_pb2, guest_pb2

pytestmark = pytest.mark.system
# The aggregate over every thread: a pviommu addition, labelled as such (each thread's own line is dmatest's).
SUMMARY = re.compile(r"^pviommu aggregate of \d+ threads? \(not a dmatest line\): (\d+) tests, (\d+) failures "
                     r"\d+\.\d\d iops \d+ KB/s$")


@pytest.fixture(scope="module")
def system() -> Iterator[VirtualSystem]:
    with VirtualSystem(guests=1, devices_per_guest=1, hypervisor_args=["--s2-baseline"]) as vs:
        yield vs


@pytest.fixture(scope="module", params=["rfc", "v1", "v2"])
def revised(request: pytest.FixtureRequest) -> Iterator[VirtualSystem]:
    """A system whose hypervisor and agent follow one revision of the series: each flushes its own way
    (RFC a domain flush, v1 the exact blocks, v2 one covering block; docs/revisions.md)."""
    with VirtualSystem(guests=1, devices_per_guest=1, revision=request.param) as vs:
        yield vs


@pytest.mark.parametrize("design", ["nested", "baseline"])
def test_dmatest_4_threads_1000_iterations_reports_zero_failures(system: VirtualSystem, design: str) -> None:
    g = system.guests[0]
    params = guest_pb2.DmatestParams(iterations=1000, threads_per_chan=4, seed=1, design=design)
    r = run_dmatest_stream(g.stub, params, timeout=600)
    assert SUMMARY.match(r.summary), r.summary
    assert (r.tests, r.failures) == (4000, 0), "\n".join(r.lines[-40:])


def _copy(stub: object, dev: int, src: int, dst: int, rec_iova: int, rec_gpa: int) -> guest_pb2.DescriptorReply:
    desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR), completion_addr=rec_iova,
                      src_addr=src, dst_addr=dst, xfer_size=64).pack()
    stub.WriteMemory(guest_pb2.WriteRequest(gpa=rec_gpa, data=bytes(32)))  # type: ignore[attr-defined]
    return stub.SubmitDescriptor(guest_pb2.DescriptorRequest(  # type: ignore[attr-defined,no-any-return]
        logical_device_id=dev, descriptor=desc, wait=True, timeout_ms=5000, completion_gpa=rec_gpa))


def _setup(system: VirtualSystem) -> tuple[object, int, int, int, int, int, int]:
    s = system.guests[0].stub
    dev = system.guests[0].devices[0]
    rec = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    rec_iova = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=rec.gpa, size=4096)).iova
    src = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    dst = s.AllocBuffer(guest_pb2.AllocRequest(size=4096))
    s.WriteMemory(guest_pb2.WriteRequest(gpa=src.gpa, data=b"\x5a" * 64))
    src_iova = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=src.gpa, size=4096,
                                          direction=guest_pb2.TO_DEVICE)).iova
    dst_iova = s.Map(guest_pb2.MapRequest(logical_device_id=dev, gpa=dst.gpa, size=4096,
                                          direction=guest_pb2.FROM_DEVICE)).iova
    return s, dev, rec_iova, rec.gpa, src_iova, dst_iova, dst.gpa


def test_after_unmap_with_flush_the_device_faults_on_the_old_iova(revised: VirtualSystem) -> None:
    s, dev, rec_iova, rec_gpa, src, dst, _ = _setup(revised)
    assert _copy(s, dev, src, dst, rec_iova, rec_gpa).status == DsaStatus.SUCCESS
    before = dict(s.GetStats(common_pb2.Empty()).counters)  # type: ignore[attr-defined]
    s.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=dst, size=4096))  # type: ignore[attr-defined]
    after = dict(s.GetStats(common_pb2.Empty()).counters)  # type: ignore[attr-defined]
    flush_call = "hypercall_FlushDeviceDomain" if revised.revision == "rfc" else "hypercall_FlushDeviceDomainList"
    assert after.get(flush_call, 0) == before.get(flush_call, 0) + 1  # the revision's own flush
    bad = _copy(s, dev, src, dst, rec_iova, rec_gpa)
    assert bad.status & 0x7F == DsaStatus.PAGE_FAULT_NOBOF
    assert struct.unpack_from("<Q", bad.completion_record, 8)[0] == dst
    # The device reports faults to the hypervisor asynchronously (a queue and a
    # sender thread), so the record can be read before the fault arrives.
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while dst not in seen and time.monotonic() < deadline:
        faults = s.StreamFaults(guest_pb2.FaultsRequest(follow=False), timeout=10)  # type: ignore[attr-defined]
        seen += [f.iova for f in faults]
        time.sleep(0.05)
    assert dst in seen


def test_with_skip_flush_the_device_still_reaches_the_old_page_until_flush(revised: VirtualSystem) -> None:
    s, dev, rec_iova, rec_gpa, src, dst, dst_gpa = _setup(revised)
    assert _copy(s, dev, src, dst, rec_iova, rec_gpa).status == DsaStatus.SUCCESS
    u = s.Unmap(guest_pb2.UnmapRequest(logical_device_id=dev, iova=dst, size=4096,  # type: ignore[attr-defined]
                                       skip_flush=True))
    assert not u.flushed
    s.WriteMemory(guest_pb2.WriteRequest(gpa=dst_gpa, data=bytes(64)))  # type: ignore[attr-defined]
    assert _copy(s, dev, src, dst, rec_iova, rec_gpa).status == DsaStatus.SUCCESS
    assert s.ReadMemory(guest_pb2.ReadRequest(gpa=dst_gpa, size=64)).data == b"\x5a" * 64  # type: ignore[attr-defined]
    s.Flush(guest_pb2.FlushRequest(logical_device_id=dev))  # type: ignore[attr-defined]
    assert _copy(s, dev, src, dst, rec_iova, rec_gpa).status & 0x7F == DsaStatus.PAGE_FAULT_NOBOF
    assert s.GetStats(common_pb2.Empty()).counters["pending_unmaps"] == 0  # type: ignore[attr-defined]
