"""The SVA proposal (pviommu proposal, not in the series) across real processes: a guest
process's DSA memmove over never-touched memory completes through page requests, dmatest
keeps working beside it, and a PASID-tagged request on another guest's device reaches only
that guest, as an IommuFault message."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pvctl.local import VirtualSystem, run_dmatest_stream
from pviommu.abi.dsa import DescFlags, Descriptor, Opcode
from pviommu.v1 import common_pb2, guest_pb2

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]
SVA = ["--proposal-sva"]


@pytest.fixture(scope="module")
def system() -> Any:
    with VirtualSystem(guests=2, devices_per_guest=1, memory_bytes=64 << 20, guest_args=SVA,
                       hypervisor_args=SVA) as vs:
        yield vs


def counters(g: Any) -> dict[str, int]:
    return dict(g.stub.GetStats(common_pb2.Empty(), timeout=30).counters)


def test_a_process_memmove_over_untouched_memory_completes_through_page_requests(system: VirtualSystem) -> None:
    g = system.guests[0]
    size, iterations = 32 << 10, 3
    r = g.stub.RunSvaTest(guest_pb2.SvaTestRequest(size=size, iterations=iterations), timeout=240)
    assert r.passed, (r.summary, list(r.errors))
    assert r.completed == iterations and r.mismatches == 0 and r.pasid >= 1
    assert r.page_requests == iterations * size // 4096  # every destination page, once
    # faulted in beforehand, the same run needs no page request for the destination
    again = g.stub.RunSvaTest(guest_pb2.SvaTestRequest(size=size, iterations=1, touch_destination=True), timeout=240)
    assert again.passed and again.page_requests == 0


def test_dmatest_keeps_working_beside_sva(system: VirtualSystem) -> None:
    g = system.guests[0]
    res = run_dmatest_stream(g.stub, guest_pb2.DmatestParams(iterations=4, threads_per_chan=1), timeout=120)
    assert res.tests == 4 and res.failures == 0


def test_a_pasid_request_on_a_device_without_that_binding_faults_to_its_own_guest_only(
        system: VirtualSystem) -> None:
    a, b = system.guests
    first = b.stub.RunSvaTest(guest_pb2.SvaTestRequest(size=4096, iterations=1), timeout=240)  # sets up WQ 1
    assert first.passed, first.summary
    before_a, before_b = counters(a).get("sva_faults", 0), counters(b).get("sva_faults", 0)
    # PASID 1 is bound nowhere now (and never on b's device while a holds it): the device faults
    desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR), pasid=1,
                      completion_addr=0x7F00_0000_0000, src_addr=0x7F00_0001_0000, dst_addr=0x7F00_0002_0000,
                      xfer_size=4096)
    b.stub.SubmitDescriptor(guest_pb2.DescriptorRequest(logical_device_id=b.devices[0], wq_id=first.wq_id,
                                                        descriptor=desc.pack(), wait=False), timeout=30)
    deadline = time.monotonic() + 30
    while counters(b).get("sva_faults", 0) == before_b and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counters(b).get("sva_faults", 0) > before_b, "the IommuFault message never reached the guest"
    assert counters(a).get("sva_faults", 0) == before_a


def test_a_page_request_outside_every_reserved_range_is_refused_and_the_record_says_so(
        system: VirtualSystem) -> None:
    g = system.guests[1]
    r = g.stub.RunSvaTest(guest_pb2.SvaTestRequest(size=8192, iterations=2, unreserved_destination=True),
                          timeout=240)
    assert r.passed, (r.summary, list(r.errors))  # passed = each record said PAGE_FAULT_IR
    assert r.refused == 2 and r.page_requests == 0
