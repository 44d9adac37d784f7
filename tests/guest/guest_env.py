"""A real hypervisor (in-process, real gRPC on 127.0.0.1:0) plus a small fake
DSA device for the guest-agent tests.

The fake device is just enough DSA to drive the agent without dma_device: it
answers the hypervisor's Assign/Invalidate, reports one dedicated WQ, and runs
MEMMOVE descriptors from its portal through a *real* ``IommuUnit`` reading the
context entries the hypervisor wrote in bank 0 -- the same nested walk and
IOTLB a real device uses, so a missing flush really leaves a stale entry.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from guest_agent.agent import Agent, open_bank
from guest_agent.driver.domain import FlushMode
from hypervisor_svc.main import add_arguments as add_hypervisor_arguments
from hypervisor_svc.main import build as build_hypervisor
from pviommu.abi.dsa import CompletionRecord, Descriptor, DsaStatus, GenCap, Opcode
from pviommu.addr import Iova
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import HostMemory
from pviommu.mem.dma import DmaMemory
from pviommu.rpc.auth import Principal, new_token
from pviommu.rpc.client import connect
from pviommu.rpc.server import RunningServer, Service, create_server
from pviommu.v1 import admin_pb2, admin_pb2_grpc, dsa_pb2, dsa_pb2_grpc

MiB = 1 << 20


class FakeDsa(dsa_pb2_grpc.DsaDeviceServicer):
    """One dedicated WQ of size 16, MEMMOVE and NOOP, records through the IOMMU unit."""

    def __init__(self, memory_dir: Path) -> None:
        self.host = HostMemory(memory_dir)
        self.unit = IommuUnit(self.host)
        self.slot = -1
        self.invalidations: list[tuple[str, int, int, int]] = []
        self.wq_enabled = True
        self.commands: list[tuple[int, int]] = []
        self.executed = 0
        self._lock = threading.Lock()

    # host side
    def Invalidate(self, request: Any, context: Any) -> Any:
        scope = dsa_pb2.IommuInvalidation.Scope.Name(request.scope)
        with self._lock:
            self.invalidations.append((scope, request.tag, request.address, request.address_mask))
        if scope == "GLOBAL":
            self.unit.invalidate_all()
        elif scope == "DOMAIN":
            self.unit.invalidate_domain(request.tag)
        elif scope == "PAGES":
            self.unit.invalidate_pages(request.tag, request.address, request.address_mask)
        else:
            self.unit.invalidate_context(request.slot)
        return dsa_pb2.CommandStatus()

    def Assign(self, request: Any, context: Any) -> Any:
        self.unit.invalidate_context()
        return dsa_pb2.CommandStatus()

    # guest side
    def GetCapabilities(self, request: Any, context: Any) -> Any:
        return dsa_pb2.DsaCapabilities(version=0x100, gencap=GenCap().encode(), max_transfer_size=1 << 21,
                                       max_batch_size=32, num_wqs=1, num_engines=1, num_groups=1, total_wq_size=16)

    def ListWqs(self, request: Any, context: Any) -> Any:
        return dsa_pb2.WqList(wqs=[dsa_pb2.WqConfig(wq_id=0, dedicated=True, size=16, enabled=self.wq_enabled)])

    def ConfigureWq(self, request: Any, context: Any) -> Any:
        return dsa_pb2.CommandStatus()

    def Command(self, request: Any, context: Any) -> Any:
        self.commands.append((request.command, request.operand))
        if request.command == 6:
            self.wq_enabled = True
        return dsa_pb2.CommandStatus()

    def execute(self, raw: bytes) -> None:
        d = Descriptor.unpack(raw)
        dma = DmaMemory(self.host, self.unit.bind(self.slot))
        rec = CompletionRecord(status=DsaStatus.SUCCESS)
        if d.opcode == Opcode.MEMMOVE:
            r = dma.copy(Iova(d.src_addr), Iova(d.dst_addr), d.xfer_size)
            if r.fault is not None:
                rec = CompletionRecord(status=DsaStatus.PAGE_FAULT_NOBOF | (0x80 if r.fault.write else 0),
                                       bytes_completed=r.done, fault_addr=r.fault.iova)
        elif d.opcode != Opcode.NOOP:
            rec = CompletionRecord(status=DsaStatus.BAD_OPCODE)
        body = rec.pack()
        dma.write(Iova(d.completion_addr + 1), body[1:])  # status byte last, as the device does
        dma.write(Iova(d.completion_addr), body[:1])
        with self._lock:
            self.executed += 1

    def Portal(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for sub in request_iterator:
            if not sub.posted:
                yield dsa_pb2.SubmissionAck(tag=sub.tag, accepted=True)
            threading.Thread(target=self.execute, args=(bytes(sub.descriptor),), daemon=True).start()

    def GetCounters(self, request: Any, context: Any) -> Any:
        return dsa_pb2.DeviceCounters(counters={"executed": self.executed})


@dataclass
class FakeDevice:
    servicer: FakeDsa
    server: RunningServer
    logical_device_id: int
    name: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@dataclass
class PartitionInfo:
    partition_id: int
    token: str
    bank_path: str


@dataclass
class HvEnv:
    """A running hypervisor and what the tests made in it."""

    host: Any
    server: RunningServer
    invalidator: Any
    admin_token: str
    memory_dir: Path
    devices: list[FakeDevice] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        ch = connect(self.address, self.admin_token)
        self.channels.append(ch)
        return admin_pb2_grpc.AdminStub(ch)

    def partition(self, memory: int = 64 * MiB, name: str = "guest") -> PartitionInfo:
        r = self.admin.CreatePartition(admin_pb2.CreatePartitionRequest(name=name, memory_bytes=memory))
        assert r.result.status == 0, r.result.message
        return PartitionInfo(r.partition.partition_id, r.token, r.partition.bank_path)

    def device(self, partition: PartitionInfo | None, name: str = "dsa0") -> FakeDevice:
        fake = FakeDsa(self.memory_dir)
        server = create_server("127.0.0.1:0", [Service(fake, dsa_pb2_grpc.add_DsaDeviceServicer_to_server,
                                                       "pviommu.v1.DsaDevice")],
                               resolve=lambda token: Principal("any"))
        reg = self.admin.RegisterDevice(admin_pb2.RegisterDeviceRequest(
            name=name, control_address=f"127.0.0.1:{server.port}"))
        assert reg.result.status == 0, reg.result.message
        fake.slot = reg.device.slot
        dev = FakeDevice(fake, server, reg.device.logical_device_id, name)
        self.devices.append(dev)
        if partition is not None:
            r = self.admin.AssignDevice(admin_pb2.AssignDeviceRequest(
                logical_device_id=dev.logical_device_id, partition_id=partition.partition_id))
            assert r.result.status == 0, r.result.message
        return dev

    def agent(self, p: PartitionInfo, mode: FlushMode = FlushMode.STRICT, start: bool = True,
              revision: str = "v2") -> Agent:
        ch = connect(self.address, p.token)
        self.channels.append(ch)
        agent = Agent(ch, p.token, open_bank(p.bank_path), mode=mode, revision=revision)
        self.agents.append(agent)
        if start:
            agent.start()
        return agent

    def domain_view(self, partition_id: int, domain_id: int) -> Any:
        """The hypervisor's record of a domain (white-box, for assertions)."""
        with self.host.lock:
            return self.host.partitions[partition_id].domains.get(domain_id)

    def close(self) -> None:
        for a in self.agents:
            try:
                a.close()
            except Exception:
                pass
        for ch in self.channels:
            ch.close()
        self.server.stop(0)
        self.host.close()
        self.invalidator.close()
        for d in self.devices:
            d.server.stop(0)


def start_hypervisor(tmp: Path, five_level: bool = False, *extra: str) -> HvEnv:
    """A hypervisor built by ``main.build`` from its own argument parser; ``extra`` are more
    options (``--revision v1``, ``--s2-baseline``, ...)."""
    token = new_token()
    tokfile = tmp / "admin.token"
    tokfile.write_text(token)
    memory_dir = tmp / "banks"
    parser = argparse.ArgumentParser()
    add_hypervisor_arguments(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--memory-dir", str(memory_dir), "--admin-token-file",
                              str(tokfile), "--bank0-size", str(256 * MiB),
                              *(["--five-level"] if five_level else []), *extra])
    host, server, invalidator = build_hypervisor(args)
    return HvEnv(host, server, invalidator, token, memory_dir)
