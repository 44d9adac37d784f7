"""The SVA proposal (pviommu proposal, not in the series): a page request the guest never
answers. A real hypervisor (``--proposal-sva``), a real DSA device (``--page-request-timeout
1.0``) and a real guest agent, in-process; only the agent's page-request handler is replaced by
one that listens and never answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.agent import Agent, open_bank
from guest_agent.dsa.driver import wait_completion
from guest_agent.sva import SvaError, shared_wq
from hypervisor_svc.core.host import Host
from pviommu.abi import hv
from pviommu.abi.dsa import COMP_SIZE, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.abi.hv.sva import ProcessIommuPrqInput, PrqResponse
from pviommu.abi.invq import PageResponse, QueueItem
from pviommu.abi.prq import PageRequestMessage
from pviommu.addr import PAGE_SIZE
from pviommu.rpc.client import connect
from pviommu.units import MiB
from tests.kit.guest_env import FakeDevice, start_hypervisor

PAGE_REQUEST_TIMEOUT = 1.0  # what tests.kit.guest_env gives its devices


@pytest.fixture(params=["shared memory", "grpc only"])
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Agent, FakeDevice, Host]]:
    env = start_hypervisor(tmp_path, False, "--proposal-sva")
    try:
        part = env.partition(64 * MiB)
        dev = env.device(part)
        ch = connect(env.address, part.token)
        env.channels.append(ch)
        agent = Agent(ch, part.token, open_bank(part.bank_path), sva=True,
                      hypercall_page=request.param == "shared memory")
        env.agents.append(agent)
        agent.start()
        yield agent, dev, env.host
    finally:
        env.close()


def test_an_unanswered_sva_page_request_ends_nobof_and_a_late_response_is_refused(
        rig: tuple[Agent, FakeDevice, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    agent, dev, host = rig
    sva = agent.sva
    assert sva is not None
    heard: list[PageRequestMessage] = []
    monkeypatch.setattr(sva, "handle_request", lambda msg: heard.append(msg))  # a guest that never answers
    unit_items: list[QueueItem] = []
    dev.service.observers.append(unit_items.append)

    drv = agent.dsa_driver(dev.logical_device_id)
    wq = shared_wq(drv)
    proc = sva.new_process()
    binding = sva.bind(proc, dev.logical_device_id)
    src, dst, rec = proc.mmap(2 * PAGE_SIZE), proc.mmap(2 * PAGE_SIZE), proc.mmap(PAGE_SIZE)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(2 * PAGE_SIZE))
    proc.write(src, pattern)
    proc.write(rec, bytes(COMP_SIZE))
    proc.write(dst, bytes(PAGE_SIZE))  # the first destination page present, the second never touched
    desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR | DescFlags.BOF),
                      pasid=binding.pasid, completion_addr=rec, src_addr=src, dst_addr=dst, xfer_size=2 * PAGE_SIZE)
    rec_gpa = proc.gpa_of(rec)
    assert rec_gpa is not None
    start = time.monotonic()
    assert drv.submit(desc.pack(), wq_id=wq)
    cr = wait_completion(sva.ram, rec_gpa, 30, check=drv.check_portal)
    waited = time.monotonic() - start

    # the device waited its page-request timeout, then completed as if BOF were off
    assert cr is not None, "no completion record"
    assert cr.code == DsaStatus.PAGE_FAULT_NOBOF, hex(cr.status)
    assert cr.bytes_completed == PAGE_SIZE and cr.fault_addr == dst + PAGE_SIZE
    assert waited >= PAGE_REQUEST_TIMEOUT  # a lower bound only: Event.wait(timeout) never returns early
    outcomes = dev.service.device.counters.snapshot()["page_request_outcomes"]
    assert isinstance(outcomes, dict)
    assert outcomes.get("timeout") == 1 and not outcomes.get("resolved") and not outcomes.get("refused")
    assert proc.read(dst, PAGE_SIZE) == pattern[:PAGE_SIZE]
    # PASID-tagged records come through the fault ring too, or the gRPC stream with --grpc-only
    assert agent.page_request_transport == ("fault ring" if agent.hv.transport == "hypercall page" else "grpc stream")
    assert len(heard) == 1
    msg = heard[0]
    assert msg.pasid == binding.pasid and msg.address == dst + PAGE_SIZE and msg.write
    record = proc.read(rec, COMP_SIZE)

    # the device tells the hypervisor it gave up, so the request is pending no more: the guest's
    # late answer is refused, and nothing reaches the unit
    deadline = time.monotonic() + 10
    while host.counters.stats.get("page_requests_timed_out", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.counters.stats.get("page_requests_timed_out", 0) == 1
    assert proc.fault_in(dst + PAGE_SIZE)
    late = ProcessIommuPrqInput(hv.HV_PARTITION_ID_SELF, hv.HvDeviceId.logical(dev.logical_device_id),
                                msg.request_id, msg.pasid, PrqResponse.SUCCESS)
    with pytest.raises(SvaError, match="PAGE_REQUEST_INVALID"):
        sva._call(late)
    assert not [i for i in unit_items if isinstance(i, PageResponse)]
    time.sleep(0.2)  # give a wrongly resumed engine time to write
    assert proc.read(rec, COMP_SIZE) == record
    assert proc.read(dst + PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)  # faulted in by the guest, never written
    assert dev.service.device.counters.snapshot()["page_request_outcomes"] == outcomes
    assert dev.executed == 1
    sva.unbind(binding)
    proc.close()
