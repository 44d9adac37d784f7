"""A device process unmaps the RAM of a destroyed partition.

Real processes: a hypervisor and a DSA device process; an in-process guest
agent makes the device map its partition's bank by running a copy. Once the
partition is destroyed -- holding the device, or after the device moved on to
another partition -- the bank file is gone from the device's /proc/PID/maps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from guest_agent.agent import Agent, open_bank
from guest_agent.dma.api import Direction
from guest_agent.dsa.driver import wait_completion
from pvctl.local import VirtualSystem
from pviommu.abi.dsa import COMP_SIZE, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.addr import PAGE_SIZE, Gpa
from pviommu.rpc.client import connect
from pviommu.units import MiB
from pviommu.v1 import admin_pb2

pytestmark = pytest.mark.system

PAGE = PAGE_SIZE


class System:
    def __init__(self, vs: VirtualSystem) -> None:
        self.vs = vs
        self.agents: list[Agent] = []
        self.channels: list[grpc.Channel] = []

    def partition(self, name: str) -> tuple[int, str, str]:
        r = self.vs.admin.CreatePartition(admin_pb2.CreatePartitionRequest(name=name, memory_bytes=32 * MiB),
                                          timeout=30)
        assert r.result.status == 0, r.result.message
        return r.partition.partition_id, r.token, r.partition.bank_path

    def assign(self, logical: int, pid: int) -> None:
        r = self.vs.admin.AssignDevice(admin_pb2.AssignDeviceRequest(logical_device_id=logical, partition_id=pid),
                                       timeout=60)
        assert r.result.status == 0, r.result.message

    def destroy(self, pid: int) -> None:
        r = self.vs.admin.DestroyPartition(admin_pb2.PartitionRequest(partition_id=pid), timeout=60)
        assert r.result.status == 0, r.result.message

    def copy_once(self, token: str, bank_path: str, logical: int) -> Agent:
        """Boot a guest agent and run one MEMMOVE through the device (it maps the bank)."""
        assert self.vs.hypervisor is not None
        ch = connect(self.vs.hypervisor.address, token)
        self.channels.append(ch)
        agent = Agent(ch, token, open_bank(bank_path))
        self.agents.append(agent)
        agent.start()
        drv = agent.dsa_driver(logical)
        src, _ = agent.alloc_buffer(PAGE)
        dst, _ = agent.alloc_buffer(PAGE)
        rec, _ = agent.alloc_buffer(PAGE)
        ms, md, mr = (agent.map(logical, 0, g, PAGE, Direction.BIDIRECTIONAL) for g in (src, dst, rec))
        agent.ram.write(Gpa(rec), bytes(COMP_SIZE))
        assert drv.acquire_slot(10)
        try:
            assert drv.submit(Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR),
                                         completion_addr=mr.dma_addr, src_addr=ms.dma_addr, dst_addr=md.dma_addr,
                                         xfer_size=PAGE).pack())
            done = wait_completion(agent.ram, Gpa(rec), 10)
        finally:
            drv.release_slot()
        assert done is not None and done.code == DsaStatus.SUCCESS
        return agent

    def close_agent(self, agent: Agent) -> None:
        agent.close()
        self.agents.remove(agent)

    def close(self) -> None:
        for a in self.agents:
            try:
                a.close()
            except Exception:
                pass
        for ch in self.channels:
            ch.close()


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with VirtualSystem(guests=0, devices_per_guest=0, memory_dir=str(tmp_path / "sys")) as vs:
        s = System(vs)
        try:
            yield s
        finally:
            s.close()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _gone_from(pid: int, bank_path: str, timeout: float = 15.0) -> bool:
    name = Path(bank_path).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name not in _maps(pid):
            return True
        time.sleep(0.05)
    return False


def _start_device(s: System, name: str) -> tuple[int, int]:
    assert s.vs.hypervisor is not None
    proc = s.vs.supervisor.start(name, "dsa", "--hypervisor", s.vs.hypervisor.address, "--name", name)
    return proc.pid, s.vs._device_id(name)


def test_destroying_the_partition_that_holds_a_device_unmaps_its_bank_in_the_device(system: System) -> None:
    dev_pid, dev = _start_device(system, "dsa-holds")
    pid, token, bank = system.partition("A")
    system.assign(dev, pid)
    agent = system.copy_once(token, bank, dev)
    assert Path(bank).name in _maps(dev_pid), "the device never mapped the partition's bank"
    system.close_agent(agent)
    system.destroy(pid)
    assert _gone_from(dev_pid, bank), f"device still maps {bank}:\n" + "\n".join(
        line for line in _maps(dev_pid).splitlines() if "bank-" in line)


def test_a_device_that_moved_on_unmaps_its_previous_owners_bank_when_that_partition_is_destroyed(
        system: System) -> None:
    dev_pid, dev = _start_device(system, "dsa-moved")
    a, token_a, bank_a = system.partition("A")
    b, token_b, bank_b = system.partition("B")
    system.assign(dev, a)
    agent_a = system.copy_once(token_a, bank_a, dev)
    system.close_agent(agent_a)
    r = system.vs.admin.UnassignDevice(admin_pb2.DeviceRequest(logical_device_id=dev), timeout=60)
    assert r.result.status == 0, r.result.message
    system.assign(dev, b)
    system.copy_once(token_b, bank_b, dev)
    assert Path(bank_a).name in _maps(dev_pid)  # A still exists: nothing made the device let go of it yet
    system.destroy(a)
    assert _gone_from(dev_pid, bank_a), f"device still maps {bank_a}"
    assert Path(bank_b).name in _maps(dev_pid)  # B's RAM stays mapped: B is alive and holds the device
