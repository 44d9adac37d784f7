"""The guest driver's hypercalls over the hypercall page (docs/transports.md):
used when the hypervisor offers one, gRPC when it does not, when the page
closes, or when the agent is told ``--grpc-only``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from guest_agent.agent import Agent, open_bank
from guest_agent.dma.api import Direction
from guest_agent.errors import HypercallFailed
from hypervisor_svc.hcpage import HcPages
from pviommu.abi import hv as hvabi
from pviommu.abi.hv_status import HvStatus
from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2
from tests.kit.guest_env import HvEnv, start_hypervisor

S1 = int(hvabi.DeviceDomainType.S1)


class _Spy:
    """Records the gRPC methods a stub is asked for."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.used: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.used.append(name)
        return getattr(self._stub, name)


def _agent(env: HvEnv, *, page: bool = True) -> tuple[Agent, _Spy]:
    p = env.partition()
    env.device(p)
    ch = connect(env.address, p.token)
    env.channels.append(ch)
    agent = Agent(ch, p.token, open_bank(p.bank_path), hypercall_page=page)
    env.agents.append(agent)
    spy = _Spy(agent.hv.stub._stub)
    agent.hv.stub._stub = spy
    agent.start()
    return agent, spy


def _map_unmap(agent: Agent) -> None:
    dev = next(iter(agent.iommu.devices.values()))
    m = agent.dma.map_single(dev, int(agent.memory.alloc(4096)), 4096, Direction.BIDIRECTIONAL)
    agent.dma.unmap(m)  # strict: one flush hypercall


def _pages(env: HvEnv) -> HcPages:
    return next(f.__self__ for f in env.host.on_close if isinstance(getattr(f, "__self__", None), HcPages))


FLUSHES = {"FlushDeviceDomain", "FlushDeviceDomainList"}
HOT = {"CreateDeviceDomain", "ConfigureDeviceDomain", "AttachDeviceDomain", "FlushDeviceDomain",
       "FlushDeviceDomainList", "DeleteDeviceDomain", "DetachDeviceDomain"}


def test_driver_makes_its_flushes_and_domain_calls_on_the_page(hv: HvEnv) -> None:
    agent, spy = _agent(hv)
    before = hv.host.counters.stats.get("hcpage_calls", 0)
    _map_unmap(agent)
    assert agent.hv.transport == "hypercall page"
    assert hv.host.counters.stats.get("hcpage_calls", 0) > before
    assert hv.host.counters.stats["hcpage_calls"] >= 4  # init's domain calls and the flush
    assert not HOT & set(spy.used), spy.used  # none of them went over gRPC
    assert "GetTransports" in spy.used


def test_page_refusals_raise_what_grpc_refusals_raise(tmp_path: Path) -> None:
    env = start_hypervisor(tmp_path, False, "--s2-baseline")
    try:
        paged, _ = _agent(env)
        grpc_only, _ = _agent(env, page=False)
        for client in (paged.hv, grpc_only.hv):
            with pytest.raises(HypercallFailed) as refused:
                client.flush_domain(S1, 0x999)
            assert refused.value.hv_status is HvStatus.INVALID_PARAMETER
            assert refused.value.call == "FlushDeviceDomain" and "no device domain" in str(refused.value)
        assert paged.hv.transport == "hypercall page" and grpc_only.hv.transport == "grpc"
    finally:
        env.close()


def test_a_request_its_constructor_refuses_raises_the_hypervisors_status_on_both_transports(
        tmp_path: Path) -> None:
    env = start_hypervisor(tmp_path, False, "--s2-baseline")
    try:
        paged, _ = _agent(env)
        grpc_only, _ = _agent(env, page=False)
        for client in (paged.hv, grpc_only.hv):
            client.create_domain(S1, 0x55)
            client.create_domain(int(hvabi.DeviceDomainType.S2), 0x56)
            for call, status, refuse in (
                    ("CreateDeviceDomain", HvStatus.INVALID_PARAMETER, lambda c: c.create_domain(S1, 0x57, flags=4)),
                    ("FlushDeviceDomainList", HvStatus.INVALID_HYPERCALL_INPUT,
                     lambda c: c.flush_domain_list(S1, 0x55, [])),
                    ("FlushDeviceDomainList", HvStatus.INVALID_PARAMETER,
                     lambda c: c.flush_domain_list(S1, 0x55, [(0, 0)], flags=2)),
                    ("MapDeviceGpaPages", HvStatus.INVALID_PARAMETER, lambda c: c.map_gpa_pages(0x56, 4, 0, [0x10]))):
                before = client.counts["refused"]
                with pytest.raises(HypercallFailed) as refused:
                    refuse(client)
                assert (refused.value.hv_status, refused.value.call) == (status, call)
                assert client.counts["refused"] == before + 1
            client.delete_domain(S1, 0x55)
    finally:
        env.close()


def test_driver_uses_grpc_when_the_hypervisor_offers_no_page(tmp_path: Path) -> None:
    env = start_hypervisor(tmp_path, False, "--s2-baseline", "--no-hypercall-page")
    try:
        agent, spy = _agent(env)
        _map_unmap(agent)
        assert agent.hv.transport == "grpc" and "offers no hypercall page" in agent.hv.page_note
        assert "CreateDeviceDomain" in spy.used and FLUSHES & set(spy.used)
        assert env.host.counters.stats.get("hcpage_calls", 0) == 0
    finally:
        env.close()


def test_grpc_only_agent_opens_no_page(hv: HvEnv) -> None:
    agent, spy = _agent(hv, page=False)
    _map_unmap(agent)
    assert "GetTransports" not in spy.used and FLUSHES & set(spy.used)
    assert _pages(hv).opened == 0 and agent.hv.page_note == "gRPC only"


def test_driver_falls_back_to_grpc_when_its_page_closes(hv: HvEnv) -> None:
    agent, spy = _agent(hv)
    assert agent.hv.transport == "hypercall page"
    _pages(hv).close()  # the hypervisor ends every page (as when it stops serving them)
    _map_unmap(agent)  # still works
    assert agent.hv.transport == "grpc" and FLUSHES & set(spy.used)


def test_reset_partition_ends_the_agents_page(hv: HvEnv) -> None:
    agent, _ = _agent(hv)
    assert _pages(hv).held(agent.partition_id) == 1
    r = hv.admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=agent.partition_id))
    assert r.result.status == 0
    page = agent.hv._page
    assert page is not None
    deadline = time.monotonic() + 5
    while not page.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert page.closed and _pages(hv).held(agent.partition_id) == 0


def test_agent_takes_page_requests_from_the_fault_ring_or_the_stream_with_grpc_only(hv: HvEnv) -> None:
    from hypervisor_svc.faultring import FaultRings

    rings = next(f.__self__ for f in hv.host.on_close if isinstance(getattr(f, "__self__", None), FaultRings))
    paged, _ = _agent(hv)
    grpc_only, _ = _agent(hv, page=False)
    deadline = time.monotonic() + 5
    while not (paged.page_request_transport and grpc_only.page_request_transport) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (paged.page_request_transport, grpc_only.page_request_transport) == ("fault ring", "grpc stream")
    assert rings.held(paged.partition_id) == 1 and rings.held(grpc_only.partition_id) == 0
    paged.close()
    assert rings.held(paged.partition_id) == 0 or _eventually(lambda: rings.held(paged.partition_id) == 0)


def _eventually(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_rep_calls_longer_than_the_input_page_are_split_or_sent_over_grpc(hv: HvEnv) -> None:
    agent, spy = _agent(hv)
    s2 = int(hvabi.DeviceDomainType.S2)
    agent.hv.create_domain(s2, 77)
    agent.hv.map_gpa_pages(77, 3, 0x4000_0000, list(range(0x100, 0x100 + 600)))  # 600 pages: two page calls
    assert hv.domain_view(agent.partition_id, 77).mapped_pages == 600
    assert "MapDeviceGpaPages" not in spy.used
    agent.hv.create_domain(S1, 78)
    assert agent.hv.flush_domain_list(S1, 78, [(i, 0) for i in range(600)]) == 600  # 4,832 bytes: gRPC
    assert "FlushDeviceDomainList" in spy.used and agent.hv.transport == "hypercall page"


def test_an_empty_v1_block_list_reaches_the_hypervisor_as_rep_count_zero_on_both_transports(
        tmp_path: Path) -> None:
    """docs/revisions.md choice 8: v1 sends its empty list, and the hypervisor (not the guest) refuses it."""
    env = start_hypervisor(tmp_path, False)
    try:
        paged, _ = _agent(env)
        grpc_only, _ = _agent(env, page=False)
        for client in (paged.hv, grpc_only.hv):
            client.create_domain(S1, 0x58)
            judged = env.host.counters.stats.get("hv_status_0x3", 0)
            with pytest.raises(HypercallFailed) as refused:
                client.flush_domain_list(S1, 0x58, [])
            assert (refused.value.hv_status, refused.value.call) == (HvStatus.INVALID_HYPERCALL_INPUT,
                                                                     "FlushDeviceDomainList")
            assert "rep count 0" in str(refused.value)  # the hypervisor's own words
            assert env.host.counters.stats.get("hv_status_0x3", 0) == judged + 1
            client.delete_domain(S1, 0x58)
        assert paged.hv.transport == "hypercall page" and grpc_only.hv.transport == "grpc"
    finally:
        env.close()
