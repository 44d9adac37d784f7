"""A real hypervisor and real DSA devices, in-process (real gRPC on
127.0.0.1:0, the real invalidation queues in bank 0), for the guest-agent
tests. Devices are ``dma_device.main.build`` -- the service ``pviommu serve
dsa`` runs -- so the agent talks to exactly what it meets in production: a
missing flush really leaves a stale IOTLB entry in the device's unit.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dma_device.main import DeviceService
from dma_device.main import add_arguments as device_arguments
from dma_device.main import build as build_device
from guest_agent.agent import Agent, open_bank
from guest_agent.driver.domain import FlushMode
from hypervisor_svc.main import add_arguments as add_hypervisor_arguments
from hypervisor_svc.main import build as build_hypervisor
from pviommu.abi.dsa import CompletionRecord, Descriptor
from pviommu.abi.invq import Invalidation, QueueItem
from pviommu.iommu.unit import IommuUnit
from pviommu.rpc.auth import new_token
from pviommu.rpc.client import connect
from pviommu.rpc.server import RunningServer
from pviommu.units import MiB
from pviommu.v1 import admin_pb2, admin_pb2_grpc


class QueueLog:
    """What the hypervisor sent a device's unit, as (SCOPE, tag, address, mask)."""

    def __init__(self) -> None:
        self.invalidations: list[tuple[str, int, int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, item: QueueItem) -> None:
        if isinstance(item, Invalidation):
            with self._lock:
                self.invalidations.append((item.scope.name, item.did, item.addr, item.am))


@dataclass
class FakeDevice:
    """A real device service (the name is historical) and its queue log."""

    service: DeviceService
    servicer: QueueLog
    logical_device_id: int
    name: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.server.port}"

    @property
    def unit(self) -> IommuUnit:
        return self.service.unit

    @property
    def server(self) -> RunningServer:
        return self.service.server

    def kill(self) -> None:
        """The device's process dies: its server, portals, sessions, engines and queue stop at once
        (nothing unregisters: the hypervisor finds the unit gone)."""
        svc = self.service
        svc.server.stop(0)
        svc.sessions.close()
        svc.portals.close()
        svc.queue.close()
        svc.device.close()

    @property
    def executed(self) -> int:
        """Descriptors the device completed (any status)."""
        return sum(self.service.device.counters.snapshot()["completions"].values())

    def never_complete(self, monkeypatch: Any) -> None:
        """The device runs descriptors but never writes a record or raises an interrupt."""
        monkeypatch.setattr(self.service.device, "_complete", lambda *args: None)

    def complete_every_descriptor_with(self, monkeypatch: Any, status: int) -> None:
        """Every descriptor completes with ``status`` (fault address = its destination) and moves nothing."""
        def execute(d: Descriptor, ctx: Any, *, in_batch: bool) -> CompletionRecord:
            return CompletionRecord(status=status, fault_addr=d.dst_addr)
        monkeypatch.setattr("dma_device.dsa.engine.execute", execute)  # the engine runs the ops


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
    link: Any
    admin_token: str
    admin_token_file: Path
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
        p = argparse.ArgumentParser()
        device_arguments(p)
        args = p.parse_args(["--listen", "127.0.0.1:0", "--hypervisor", self.address, "--name", name,
                             "--admin-token-file", str(self.admin_token_file), "--engines", "2",
                             "--page-request-timeout", "1.0"])
        service = build_device(args)
        log = QueueLog()
        service.observers.append(log)
        dev = FakeDevice(service, log, service.info.logical_device_id, name)
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
        for d in self.devices:
            d.service.close()
        for ch in self.channels:
            ch.close()
        self.server.stop(0)
        self.host.close()
        self.link.close()


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
    host, server, link = build_hypervisor(args)
    return HvEnv(host, server, link, token, tokfile, memory_dir)
