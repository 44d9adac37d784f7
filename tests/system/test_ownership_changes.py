"""Isolation while devices change owner, with real processes: a hypervisor and
DSA device processes on loopback, and in-process guest agents (their DSA
drivers open real portal and interrupt streams to the device process).

* a device moved from A to B ends every session A held: its open portal
  stream (a descriptor posted on it afterwards never runs, in B's domain or
  anywhere), its interrupt stream, its pending page request; A's token is
  refused everywhere; B's RAM stays byte for byte what B wrote;
* a device stopped with SIGSTOP (alive, not answering) is not written off:
  the move times out, nothing changes, nobody gets it, a bystander
  partition's hypercalls go on meanwhile, and after SIGCONT its heartbeat
  resynchronises it and the move succeeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from guest_agent.agent import Agent, open_bank
from guest_agent.dma.api import Direction
from guest_agent.dsa.driver import DsaDriver, wait_completion
from guest_agent.dsa.portal import PortalClosed
from guest_agent.errors import HypercallFailed
from pvctl.local import VirtualSystem
from pvctl.procs import ServiceProcess
from pviommu.abi.dsa import COMP_SIZE, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.shm import CloseReason
from pviommu.addr import PAGE_SIZE, Gpa
from pviommu.mem.bank import Bank
from pviommu.rpc.client import connect
from pviommu.units import MiB
from pviommu.v1 import admin_pb2, common_pb2, dsa_pb2, dsa_pb2_grpc

pytestmark = pytest.mark.system

PAGE = PAGE_SIZE
FLAGS = int(DescFlags.CRAV | DescFlags.RCR)


@dataclass
class Part:
    pid: int
    token: str
    bank_path: str
    agent: Agent | None = None
    channel: grpc.Channel | None = None


class Host:
    """The running system and helpers to drive it as an admin and as guests."""

    def __init__(self, vs: VirtualSystem) -> None:
        self.vs = vs
        self.parts: list[Part] = []

    def partition(self, name: str) -> Part:
        r = self.vs.admin.CreatePartition(admin_pb2.CreatePartitionRequest(name=name, memory_bytes=64 * MiB),
                                          timeout=30)
        assert r.result.status == 0, r.result.message
        p = Part(r.partition.partition_id, r.token, r.partition.bank_path)
        self.parts.append(p)
        return p

    def device(self, name: str, *extra: str) -> tuple[ServiceProcess, int]:
        assert self.vs.hypervisor is not None
        proc = self.vs.supervisor.start(name, "dsa", "--hypervisor", self.vs.hypervisor.address, "--name", name,
                                        *extra)
        return proc, self.vs._device_id(name)

    def assign(self, logical: int, p: Part) -> int:
        return int(self.vs.admin.AssignDevice(admin_pb2.AssignDeviceRequest(
            logical_device_id=logical, partition_id=p.pid), timeout=60).result.status)

    def unassign(self, logical: int) -> int:
        return int(self.vs.admin.UnassignDevice(admin_pb2.DeviceRequest(logical_device_id=logical),
                                                timeout=60).result.status)

    def info(self, logical: int) -> admin_pb2.Device:
        return next(d for d in self.vs.admin.ListDevices(common_pb2.Empty(), timeout=10).devices
                    if d.logical_device_id == logical)

    def boot(self, p: Part) -> Agent:
        assert self.vs.hypervisor is not None
        p.channel = connect(self.vs.hypervisor.address, p.token)
        p.agent = Agent(p.channel, p.token, open_bank(p.bank_path))
        p.agent.start()
        return p.agent

    def close(self) -> None:
        for p in self.parts:
            if p.agent is not None:
                try:
                    p.agent.close()
                except Exception:
                    pass
            if p.channel is not None:
                p.channel.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    vs = VirtualSystem(guests=0, devices_per_guest=0, memory_dir=str(tmp_path / "sys"))
    with vs:
        h = Host(vs)
        try:
            yield h
        finally:
            h.close()


@dataclass
class Buffers:
    src: int
    dst: int
    rec: int
    src_gpa: int
    dst_gpa: int
    rec_gpa: int


def buffers(agent: Agent, logical: int, size: int = 4 * PAGE) -> Buffers:
    src, _ = agent.alloc_buffer(size)
    dst, _ = agent.alloc_buffer(size)
    rec, _ = agent.alloc_buffer(PAGE)
    ms = agent.map(logical, 0, src, size, Direction.BIDIRECTIONAL)
    md = agent.map(logical, 0, dst, size, Direction.BIDIRECTIONAL)
    mr = agent.map(logical, 0, rec, PAGE, Direction.BIDIRECTIONAL)
    return Buffers(ms.dma_addr, md.dma_addr, mr.dma_addr, src, dst, rec)


def memmove(b: Buffers, size: int, flags: int = FLAGS) -> bytes:
    return Descriptor(opcode=Opcode.MEMMOVE, flags=flags, completion_addr=b.rec, src_addr=b.src, dst_addr=b.dst,
                      xfer_size=size).pack()


def copy_and_wait(agent: Agent, drv: DsaDriver, b: Buffers, size: int) -> int:
    agent.ram.write(Gpa(b.rec_gpa), bytes(COMP_SIZE))
    assert drv.acquire_slot(10)
    try:
        assert drv.submit(memmove(b, size))
        rec = wait_completion(agent.ram, Gpa(b.rec_gpa), 10)
    finally:
        drv.release_slot()
    assert rec is not None
    return rec.code


def test_a_moved_device_ends_every_session_of_its_old_owner_and_the_new_owners_ram_is_untouched(host: Host) -> None:
    dev_proc, dev = host.device("dsa-moved", "--page-request-timeout", "30")
    a, b = host.partition("A"), host.partition("B")
    assert host.assign(dev, a) == 0
    agent_a = host.boot(a)
    drv_a = agent_a.dsa_driver(dev)
    bufs_a = buffers(agent_a, dev)
    agent_a.memory.write(bufs_a.src_gpa, b"A" * PAGE)
    assert copy_and_wait(agent_a, drv_a, bufs_a, PAGE) == DsaStatus.SUCCESS  # A's portal stream is open
    assert drv_a.interrupts is not None and drv_a.interrupts.alive
    assert drv_a.shm, "the driver did not get the shared-memory portals"
    # a script-style gRPC portal stream too (the control path keeps one)
    stream_a = drv_a.session()
    agent_a.ram.write(Gpa(bufs_a.rec_gpa), bytes(COMP_SIZE))
    assert drv_a.acquire_slot(10)
    stream_a.post(0, memmove(bufs_a, PAGE))
    assert wait_completion(agent_a.ram, Gpa(bufs_a.rec_gpa), 10) is not None
    drv_a.release_slot()
    # A's page-request session: A stops answering, and a BOF descriptor on an unmapped IOVA waits for it
    stream = getattr(agent_a, "_prq_stream", None)
    if stream is not None:
        stream.cancel()
    hole = Descriptor(opcode=Opcode.MEMMOVE, flags=FLAGS | int(DescFlags.BOF), completion_addr=bufs_a.rec,
                      src_addr=bufs_a.src, dst_addr=0x7F00_0000_0000, xfer_size=PAGE).pack()
    assert drv_a.acquire_slot(10) and drv_a.submit(hole)
    deadline = time.monotonic() + 10
    pending: list[int] = []
    while not pending and time.monotonic() < deadline:
        pending = [f.request_id for f in agent_a.hv.stream_faults(follow=False) if f.page_request]
        time.sleep(0.05)
    assert pending, "the BOF descriptor raised no page request"

    t0 = time.monotonic()
    assert host.unassign(dev) == 0
    assert host.assign(dev, b) == 0
    assert time.monotonic() - t0 < 10  # the pending page request did not hold the move up to its 30 s timeout

    # B boots on the device (reset by the move: its driver configures it afresh) and writes its RAM
    agent_b = host.boot(b)
    drv_b = agent_b.dsa_driver(dev)
    bufs_b = buffers(agent_b, dev)
    agent_b.memory.write(bufs_b.src_gpa, b"B" * (4 * PAGE))
    assert copy_and_wait(agent_b, drv_b, bufs_b, 4 * PAGE) == DsaStatus.SUCCESS
    bank_b = Bank(Path(b.bank_path), b.pid, 64 * MiB)
    ram_b_before = bank_b.read(0, 64 * MiB)

    # A, on its old portal stream, aims descriptors at B's IOVAs (B's source into B's destination)
    attack = memmove(bufs_b, 4 * PAGE)
    refused = None
    for _ in range(20):
        try:
            drv_a.submit(attack)
            drv_a.check_portal()
        except (grpc.RpcError, Exception) as exc:
            refused = exc
            break
        time.sleep(0.05)
    assert refused is not None, "A's old portal session still accepts descriptors"
    assert isinstance(refused, PortalClosed) and refused.reason is CloseReason.OWNER_CHANGED, refused
    # the gRPC portal stream ends at its next submission
    with pytest.raises(grpc.RpcError) as ended:
        for _ in range(50):
            stream_a.post(0, attack)
            stream_a.check()
            time.sleep(0.05)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A's old interrupt stream ended; A's token opens nothing on the device any more
    deadline = time.monotonic() + 5
    while drv_a.interrupts.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not drv_a.interrupts.alive
    with connect(drv_a.address, a.token) as ch:
        with pytest.raises(grpc.RpcError) as err:
            dsa_pb2_grpc.DsaDeviceStub(ch).GetCapabilities(common_pb2.Empty(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        sub = dsa_pb2.SubmitBatch(submissions=[dsa_pb2.Submission(wq_id=0, descriptor=attack, tag=1)])
        with pytest.raises(grpc.RpcError):
            dsa_pb2_grpc.DsaDeviceStub(ch).Submit(sub, timeout=10)
    # A's answer to its old page request is refused
    with pytest.raises(HypercallFailed) as refused_answer:
        agent_a.hv.page_response(dev, pending[0], True)
    assert refused_answer.value.hv_status == HvStatus.ACCESS_DENIED
    time.sleep(0.5)  # anything A's descriptors could have done, they did by now
    assert bank_b.read(0, 64 * MiB) == ram_b_before, "a descriptor of A's changed B's RAM"
    # B's own work goes on
    assert copy_and_wait(agent_b, drv_b, bufs_b, PAGE) == DsaStatus.SUCCESS
    assert dev_proc.alive()
    bank_b.close()


def test_a_stopped_device_is_not_written_off_and_a_bystander_keeps_going(host: Host) -> None:
    dev_proc, dev = host.device("dsa-stopped")
    _, other = host.device("dsa-bystander")
    a, b, c = host.partition("A"), host.partition("B"), host.partition("C")
    assert host.assign(dev, a) == 0 and host.assign(other, c) == 0
    agent_a, agent_c = host.boot(a), host.boot(c)
    context_before = host.info(dev)
    os.kill(dev_proc.proc.pid, signal.SIGSTOP)
    try:
        answer: list[int] = []
        mover = threading.Thread(target=lambda: answer.append(host.unassign(dev)))
        mover.start()
        time.sleep(0.3)
        dom_c = agent_c.iommu.device(other).domain
        assert dom_c is not None
        t0 = time.monotonic()
        for _ in range(20):  # C's flushes need C's own device only
            dom_c.flush()
        bystander_s = time.monotonic() - t0
        # C's flushes were done while A's move still waited for the stopped unit (its 5 s timeout)
        assert mover.is_alive(), f"the move returned before the stopped unit confirmed it: {answer} {bystander_s}"
        mover.join(30)
        assert answer == [HvStatus.TIME_OUT]
        info = host.info(dev)
        assert (info.partition_id, info.domain_id, info.sync) == (a.pid, context_before.domain_id, "unsynced")
        assert host.assign(dev, b) == HvStatus.INVALID_DEVICE_STATE  # still A's: nobody else gets it
    finally:
        os.kill(dev_proc.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while host.info(dev).sync != "synced" and time.monotonic() < deadline:
        time.sleep(0.1)  # the device's heartbeat makes the hypervisor resynchronise it
    assert host.info(dev).sync == "synced"
    assert host.unassign(dev) == 0 and host.assign(dev, b) == 0
    agent_b = host.boot(b)
    drv_b = agent_b.dsa_driver(dev)
    bufs_b = buffers(agent_b, dev)
    assert copy_and_wait(agent_b, drv_b, bufs_b, PAGE) == DsaStatus.SUCCESS
    assert agent_a is not None
