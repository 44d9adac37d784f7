"""The device's shared-memory data plane, driven as a guest driver does
(a real hypervisor and a real device service in-process): portal sessions are
handed only to the owner's token, bounded per partition and ended with their
socket; a producer that breaks its ring loses that ring only; a shared WQ
answers accepted or retry per slot; interrupt pages count per vector; and 20
dmatest runs in a row plus a 64-thread one leave no session behind."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from dma_device.portals import PORTAL_SLOTS, SESSIONS_PER_PARTITION
from guest_agent.agent import Agent
from guest_agent.dma.api import Direction
from guest_agent.dsa.dmatest import DmatestParams
from guest_agent.dsa.driver import wait_completion
from guest_agent.dsa.portal import PortalClosed, ShmInterrupts, ShmPortal
from pviommu.abi import shm as L
from pviommu.abi.dsa import COMP_SIZE, Cmd, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import Gpa
from pviommu.shm.sessions import SessionError, open_session
from pviommu.v1 import dsa_pb2
from tests.kit.guest_env import FakeDevice, HvEnv, PartitionInfo

FLAGS = int(DescFlags.CRAV | DescFlags.RCR)


@pytest.fixture
def rig(hv: HvEnv) -> Iterator[tuple[PartitionInfo, FakeDevice, Agent]]:
    p = hv.partition()
    dev = hv.device(p)
    agent = hv.agent(p)
    yield p, dev, agent


def _path(dev: FakeDevice) -> str:
    return dev.service.info.session_socket


def _record_page(agent: Agent, dev: FakeDevice) -> tuple[int, int]:
    gpa, _ = agent.alloc_buffer(4096)
    m = agent.map(dev.logical_device_id, 0, gpa, 4096, Direction.BIDIRECTIONAL)
    return gpa, m.dma_addr


def test_a_session_is_handed_only_to_the_current_owners_token(rig: tuple[PartitionInfo, FakeDevice, Agent],
                                                              hv: HvEnv) -> None:
    p, dev, _ = rig
    other = hv.partition(name="other")
    for token in (other.token, "not-a-token", ""):
        with pytest.raises(SessionError) as err:
            open_session(_path(dev), {"token": token, "kind": "portal", "wq": 0})
        assert err.value.code == "UNAUTHENTICATED"
    with pytest.raises(SessionError) as err:
        open_session(_path(dev), {"token": p.token, "kind": "portal", "wq": 99})
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SessionError) as err:
        open_session(_path(dev), {"token": p.token, "kind": "tea"})
    assert err.value.code == "INVALID_ARGUMENT"
    # garbage and silence on the socket are refused or timed out, and the service keeps serving
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(_path(dev))
    s.sendall(b"{not json\n")
    assert b'"ok": false' in s.recv(4096)
    s.close()
    portal = ShmPortal(_path(dev), p.token, 0)
    assert portal.dedicated and portal.ring.slots == PORTAL_SLOTS
    portal.close()


def test_sessions_are_bounded_per_partition_and_end_with_their_socket(rig: tuple[PartitionInfo, FakeDevice, Agent]
                                                                       ) -> None:
    p, dev, _agent = rig
    held = dev.service.portals.counts()["portal_sessions"] + dev.service.portals.counts()["interrupt_sessions"]
    portals = [ShmPortal(_path(dev), p.token, 0) for _ in range(SESSIONS_PER_PARTITION - held)]
    with pytest.raises(SessionError) as err:
        ShmPortal(_path(dev), p.token, 0)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    for portal in portals:
        portal.close()
    deadline = time.monotonic() + 5
    while dev.service.portals.counts()["portal_sessions"] > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dev.service.portals.counts()["portal_sessions"] == 0  # nothing outlived its socket
    ShmPortal(_path(dev), p.token, 0).close()


def test_a_producer_that_breaks_its_ring_loses_only_that_ring(rig: tuple[PartitionInfo, FakeDevice, Agent]) -> None:
    p, dev, agent = rig
    drv = agent.dsa_driver(dev.logical_device_id)
    bad = ShmPortal(_path(dev), p.token, 0)
    bad.region.set_u64(L.R_TAIL, bad.ring.head + PORTAL_SLOTS + 5)  # more than the ring holds
    bad.doorbell.ring()
    deadline = time.monotonic() + 5
    while not bad.ring.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bad.ring.closed and bad.ring.close_reason is L.CloseReason.PROTOCOL_ERROR
    with pytest.raises(PortalClosed):
        bad.post(bytes(64))
    bad.close()
    # the driver's own sessions go on
    rec_gpa, rec_iova = _record_page(agent, dev)
    agent.ram.write(Gpa(rec_gpa), bytes(COMP_SIZE))
    assert drv.acquire_slot(5)
    drv.submit(Descriptor(opcode=Opcode.NOOP, flags=FLAGS, completion_addr=rec_iova).pack())
    rec = wait_completion(agent.ram, Gpa(rec_gpa), 5, drv.check_portal)
    drv.release_slot()
    assert rec is not None and rec.code == DsaStatus.SUCCESS
    assert dev.service.portals.stats.protocol_errors == 1


def test_a_shared_wq_answers_each_slot_accepted_or_retry(rig: tuple[PartitionInfo, FakeDevice, Agent]) -> None:
    p, dev, agent = rig
    stub = agent.dsa_driver(dev.logical_device_id).stub
    assert stub is not None
    cfg = dsa_pb2.WqConfig(wq_id=1, dedicated=False, size=2, threshold=0, priority=1, max_xfer_shift=21,
                           max_batch_shift=5)
    assert not stub.ConfigureWq(cfg, timeout=5).error
    assert not stub.Command(dsa_pb2.DeviceCommand(command=Cmd.ENABLE_WQ, operand=1), timeout=5).error
    portal = ShmPortal(_path(dev), p.token, 1)
    assert not portal.dedicated
    rec_gpa, rec_iova = _record_page(agent, dev)
    # a DRAIN-free burst of NOOPs at a WQ of size 2: some are accepted, any beyond its room answered retry
    answers = [portal.write(Descriptor(opcode=Opcode.NOOP, flags=FLAGS, completion_addr=rec_iova + 32 * i).pack())
               for i in range(8)]
    assert answers.count(True) >= 2 and all(isinstance(a, bool) for a in answers)
    portal.close()
    assert rec_gpa


def test_interrupt_pages_count_per_vector_and_wake_the_waiter(rig: tuple[PartitionInfo, FakeDevice, Agent]) -> None:
    p, dev, agent = rig
    irq = ShmInterrupts(_path(dev), p.token)
    drv = agent.dsa_driver(dev.logical_device_id)
    rec_gpa, rec_iova = _record_page(agent, dev)
    before = irq.vector_count(3)
    agent.ram.write(Gpa(rec_gpa), bytes(COMP_SIZE))
    assert drv.acquire_slot(5)
    drv.submit(Descriptor(opcode=Opcode.NOOP, flags=FLAGS | int(DescFlags.RCI), int_handle=3,
                          completion_addr=rec_iova).pack())
    deadline = time.monotonic() + 5
    # the page's count is written before the doorbell, which the waiter thread then counts
    while (irq.vector_count(3) == before or irq.count < 1) and time.monotonic() < deadline:
        irq.wait(0.1)
    drv.release_slot()
    assert irq.vector_count(3) == before + 1 and irq.count >= 1 and irq.vector_count(4) == 0
    irq.close()


def test_20_dmatest_runs_in_a_row_and_a_64_thread_run_leave_no_session_behind(
        rig: tuple[PartitionInfo, FakeDevice, Agent]) -> None:
    _, dev, agent = rig
    for run in range(20):
        out = agent.run_dmatest(DmatestParams(iterations=10, threads_per_chan=4, seed=run))
        assert (out.tests, out.failures) == (40, 0), out.summary
    out = agent.run_dmatest(DmatestParams(iterations=3, threads_per_chan=64, seed=99))
    assert (out.tests, out.failures) == (192, 0), out.summary
    counts = dev.service.portals.counts()
    assert counts["portal_sessions"] <= 16  # the driver's pool, shared by every run's threads
    assert counts["sessions_refused"] == 0
