"""The pvIOMMU driver against a real hypervisor: detection, domains, stage-1
tables, flush ordering, lazy batching, the baseline design and refusals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from guest_agent.agent import Agent
from guest_agent.dma.api import Direction
from guest_agent.driver.domain import DomainKind, FlushMode, PagingDomain
from guest_agent.driver.flushqueue import FQ_TIMEOUT_S
from guest_agent.driver.pviommu import decide
from guest_agent.errors import HypercallFailed, InvalidRequest, IommuAbsent
from pviommu.abi import hv as hvabi
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import MSI_WINDOW_START, SZ_2M, Gpa, Iova
from pviommu.mem.bank import Bank
from pviommu.pt.common import Perm
from pviommu.rpc.auth import Principal
from pviommu.rpc.client import connect
from pviommu.rpc.server import Service, create_server
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc
from tests.kit.guest_env import HvEnv

CAP_OK = int(hvabi.IommuCap.PRESENT | hvabi.IommuCap.S1)
PGSIZES = (1 << 12) | (1 << 21) | (1 << 30)


# -- detection ------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [0, int(hvabi.IommuCap.PRESENT), int(hvabi.IommuCap.S1)])
def test_init_refuses_without_present_and_s1(cap: int) -> None:
    with pytest.raises(IommuAbsent):
        decide(hvabi.GetIommuCapabilitiesOutput(48, 0, cap, PGSIZES))
    assert decide(hvabi.GetIommuCapabilitiesOutput(48, 0, cap, PGSIZES), allow_no_iommu=True) is None


def test_iova_width_is_clamped_to_48_without_5_level_and_kept_with_it() -> None:
    g = decide(hvabi.GetIommuCapabilitiesOutput(57, 0, CAP_OK, PGSIZES))
    assert g is not None and g.iova_width == 48 and g.levels == 4 and g.max_iova_width == 57
    g5 = decide(hvabi.GetIommuCapabilitiesOutput(57, 0, CAP_OK | int(hvabi.IommuCap.S1_5LVL), PGSIZES))
    assert g5 is not None and g5.iova_width == 57 and g5.levels == 5


class _NoIommuHypervisor(hypervisor_pb2_grpc.HypervisorServicer):
    def GetIommuCapabilities(self, request: Any, context: Any) -> Any:
        return hypervisor_pb2.GetIommuCapabilitiesReply(result=common_pb2.HvResult(status=0), iommu_cap=0)

    def ListDevices(self, request: Any, context: Any) -> Any:
        return hypervisor_pb2.ListDevicesReply()


def test_agent_refuses_to_start_when_the_hypervisor_offers_no_iommu(tmp_path: Path) -> None:
    svc = Service(_NoIommuHypervisor(), hypervisor_pb2_grpc.add_HypervisorServicer_to_server, "pviommu.v1.Hypervisor")
    server = create_server("127.0.0.1:0", [svc], resolve=lambda t: Principal("partition", 1))
    bank = Bank.create(tmp_path, 1, 4 << 20)
    ch = connect(f"127.0.0.1:{server.port}", "tok")
    try:
        with pytest.raises(IommuAbsent, match="PRESENT"):
            Agent(ch, "tok", bank).start()
        relaxed = Agent(ch, "tok", bank, allow_no_iommu=True)
        relaxed.start()
        assert relaxed.iommu.geometry is None
    finally:
        ch.close()
        server.stop(0)


def test_init_creates_static_identity_and_blocked_domains_and_a_paging_default_domain(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    assert agent.iommu.identity is not None and agent.iommu.blocked is not None
    ident = hv.domain_view(p.partition_id, agent.iommu.identity.domain_id)
    blocked = hv.domain_view(p.partition_id, agent.iommu.blocked.domain_id)
    assert ident.configured and not ident.translation_enabled
    assert blocked.configured and blocked.translation_enabled and blocked.blocked
    state = agent.iommu.device(dev.logical_device_id)
    assert state.behind_pviommu and state.domain is state.default_domain
    assert isinstance(state.domain, PagingDomain)
    view = hv.domain_view(p.partition_id, state.domain.domain_id)
    assert view.root == state.domain.table.root and dev.logical_device_id in view.devices


# -- map / unmap --------------------------------------------------------------------------------
def test_map_writes_stage1_leaves_with_rights_from_the_direction(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.iommu.device(dev.logical_device_id).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(3 * 4096)
    for direction, perm in ((Direction.TO_DEVICE, Perm.READ), (Direction.BIDIRECTIONAL, Perm.READ | Perm.WRITE)):
        m = agent.map(dev.logical_device_id, 0, gpa + 0x10, 3 * 4096 - 0x10, direction)
        assert m.dma_addr & 0xFFF == 0x10
        for page in range(3):
            t = dom.table.lookup(Iova(m.base + page * 4096))
            assert t is not None and t.oa == gpa + page * 4096 and t.size_lg2 == 12
            assert t.perm.rw == perm
        agent.unmap(dev.logical_device_id, 0, m.dma_addr, m.size, False)
        assert dom.table.lookup(Iova(m.base)) is None


def test_map_uses_2m_leaves_where_iova_and_gpa_are_aligned(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.iommu.device(dev.logical_device_id).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(SZ_2M)
    m = agent.map(dev.logical_device_id, 0, gpa, SZ_2M, Direction.BIDIRECTIONAL)
    t = dom.table.lookup(Iova(m.base))
    assert m.base % SZ_2M == 0 and t is not None and t.size_lg2 == 21 and t.oa == gpa


def test_unmap_flushes_one_page_selective_range_before_returning(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    gpa, _ = agent.alloc_buffer(4 * 4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 4 * 4096, Direction.BIDIRECTIONAL)
    dev.servicer.invalidations.clear()
    r = agent.unmap(dev.logical_device_id, 0, m.dma_addr, m.size, False)
    assert r.flushed and r.unmapped == 4 * 4096
    assert dev.servicer.invalidations == [("PAGES", hv.domain_view(p.partition_id, m.domain.domain_id).tag,
                                           m.base, 2)]
    assert agent.stats.get("flush_list") == 1


def test_table_pages_and_iova_are_not_reused_before_a_flush_succeeded(
        hv: HvEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.iommu.device(dev.logical_device_id).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    tables_before = agent.memory.frames.allocated_frames

    def refuse(*a: Any, **k: Any) -> None:
        raise HypercallFailed(HvStatus.TIME_OUT, "injected: flush timed out")

    monkeypatch.setattr(agent.hv, "flush_domain_list", refuse)
    monkeypatch.setattr(agent.hv, "flush_domain", refuse)
    with pytest.raises(HypercallFailed):
        agent.unmap(dev.logical_device_id, 0, m.dma_addr, 4096, False)
    # the leaf is gone, but its 3 emptied table pages and the IOVA stay owned
    assert dom.table.lookup(Iova(m.base)) is None
    assert agent.memory.frames.allocated_frames == tables_before
    assert not dom.iovad.is_free(m.base, m.base + 4095)
    again = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    assert again.base != m.base
    monkeypatch.undo()
    agent.flush(dev.logical_device_id, 0)
    assert dom.pending() == 0
    assert dom.iovad.size_of(m.base) in (0, 4096)  # released (possibly held by the rcache)
    agent.unmap(dev.logical_device_id, 0, again.dma_addr, 4096, False)
    assert agent.memory.frames.allocated_frames == tables_before - 3


def test_skip_flush_quarantines_iova_and_tables_until_flush(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.iommu.device(dev.logical_device_id).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    frames = agent.memory.frames.allocated_frames
    r = agent.unmap(dev.logical_device_id, 0, m.dma_addr, 4096, True)
    assert not r.flushed and dom.pending() == 1
    assert agent.memory.frames.allocated_frames == frames
    assert not any(i[0] == "PAGES" for i in dev.servicer.invalidations[-1:])
    other = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    assert other.base != m.base
    agent.flush(dev.logical_device_id, 0)
    assert dom.pending() == 0 and dev.servicer.invalidations[-1][0] == "DOMAIN"


def test_lazy_mode_batches_flushes_and_releases_only_after_the_batch_flush(hv: HvEnv,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a flush-queue timeout far above the loop's run time even on a loaded machine: one batch, one flush
    monkeypatch.setattr("guest_agent.driver.flushqueue.FQ_TIMEOUT_S", 1.0)
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p, mode=FlushMode.LAZY)
    dom = agent.iommu.device(dev.logical_device_id).domain
    assert isinstance(dom, PagingDomain)
    gpa, _ = agent.alloc_buffer(4096)
    bases = []
    for _ in range(20):
        m = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.TO_DEVICE)
        r = agent.unmap(dev.logical_device_id, 0, m.dma_addr, 4096, False)
        assert not r.flushed
        bases.append(m.base)
    assert len(set(bases)) == len(bases), "an IOVA was reused before its flush"
    assert agent.hv.counts["FlushDeviceDomain"] == 0 and dom.pending() == 20  # nothing released yet
    deadline = time.monotonic() + 5
    while dom.pending() and time.monotonic() < deadline:
        time.sleep(FQ_TIMEOUT_S)
    assert dom.pending() == 0
    assert agent.hv.counts["FlushDeviceDomainList"] == 0
    assert agent.hv.counts["FlushDeviceDomain"] == 1
    assert agent.stats.get("fq_batches") >= 1


# -- baseline --------------------------------------------------------------------------------
def test_baseline_domain_maps_and_unmaps_by_hypercall_one_rep_per_page(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.create_domain("baseline")
    assert dom.kind is DomainKind.BASELINE
    assert hv.domain_view(p.partition_id, dom.domain_id).domain_type == hv_type_s2()
    agent.attach(dom.domain_id, dev.logical_device_id)
    gpa, _ = agent.alloc_buffer(5 * 4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 5 * 4096, Direction.FROM_DEVICE)
    assert hv.domain_view(p.partition_id, dom.domain_id).mapped_pages == 5
    assert agent.stats.get("baseline_map_reps") == 5
    assert dom.translate(Iova(m.base + 4096)) == Gpa(gpa + 4096)
    r = agent.unmap(dev.logical_device_id, 0, m.dma_addr, m.size, False)
    assert r.flushed and hv.domain_view(p.partition_id, dom.domain_id).mapped_pages == 0
    agent.detach(dev.logical_device_id)
    agent.delete_domain(dom.domain_id)
    assert hv.domain_view(p.partition_id, dom.domain_id) is None


def hv_type_s2() -> int:
    return int(hvabi.DeviceDomainType.S2)


# -- refusals ----------------------------------------------------------------------------------
def test_bogus_stage1_root_is_refused_with_the_hv_status_and_the_agent_keeps_working(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    dom = agent.create_domain("paging")
    with pytest.raises(HypercallFailed) as err:
        agent.hv.configure_domain(hvabi.DeviceDomainType.S1, dom.domain_id,
                                  hvabi.DeviceDomainSettings(translation_enabled=True,
                                                             page_table_root=Gpa(agent.ram.size + 4096)))
    assert err.value.hv_status == HvStatus.INVALID_PARAMETER
    gpa, _ = agent.alloc_buffer(4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    assert agent.unmap(dev.logical_device_id, 0, m.dma_addr, 4096, False).flushed


def test_another_partitions_device_is_refused_with_access_denied(hv: HvEnv) -> None:
    p1, p2 = hv.partition(name="a"), hv.partition(name="b")
    hv.device(p1, "dsa-a")
    theirs = hv.device(p2, "dsa-b")
    agent = hv.agent(p1)
    dom = agent.create_domain("paging")
    with pytest.raises(HypercallFailed) as err:
        agent.hv.attach(hvabi.DeviceDomainType.S1, dom.domain_id, theirs.logical_device_id)
    assert err.value.hv_status == HvStatus.ACCESS_DENIED
    assert theirs.logical_device_id not in agent.iommu.devices
    assert agent.counters()["domains"] == 4


def test_map_at_an_iova_in_the_msi_window_is_refused(hv: HvEnv) -> None:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    gpa, _ = agent.alloc_buffer(4096)
    with pytest.raises(InvalidRequest, match="MSI"):
        agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL, MSI_WINDOW_START + 0x1000)
