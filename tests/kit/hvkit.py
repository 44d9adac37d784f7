"""Test kit for the hypervisor service: a real server on 127.0.0.1:0, real
channels, a fake DSA device whose IOMMU unit is the real ``IommuUnit`` over the
same bank folder, and small guest/admin helpers.

Constants are written here from shared/reference/hyperv-guest-iommu.md, not
imported from the code under test, so a wrong table in pviommu fails tests.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from hypervisor_svc.core.host import Host
from hypervisor_svc.main import add_arguments, build
from pviommu.abi.invq import Invalidation, OwnerFence, QueueItem
from pviommu.addr import PAGE_SIZE, Gpa, Iova
from pviommu.iommu.owner import read_owner
from pviommu.iommu.unit import IommuUnit
from pviommu.mem.bank import GuestRam, HostMemory
from pviommu.pt.walk import PageTable
from pviommu.rpc.client import connect
from pviommu.rpc.server import RunningServer
from pviommu.shm.invq import QueueConsumer
from pviommu.units import MiB
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2, hypervisor_pb2_grpc
from tests.kit.nested import GuestTables, guest_tables, unit_side

ADMIN_TOKEN = "hv-tests-admin-" + os.urandom(8).hex()
SELF = 0xFFFF_FFFF_FFFF_FFFF
S2, S1 = 0, 1
PAGE = PAGE_SIZE
PV_PROPERTY = 10  # HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU
#: gRPC deadline of every call the kit makes: a hung server fails a test, never hangs it
CALL_TIMEOUT = 10.0

# HV_STATUS_* (reference section 4)
SUCCESS = 0x0
INVALID_HYPERCALL_CODE = 0x2
INVALID_HYPERCALL_INPUT = 0x3
INVALID_ALIGNMENT = 0x4
INVALID_PARAMETER = 0x5
ACCESS_DENIED = 0x6
UNKNOWN_PROPERTY = 0x9
INSUFFICIENT_DEVICE_DOMAINS = 0x38
INVALID_DEVICE_ID = 0x57
INVALID_DEVICE_STATE = 0x58
DEVICE_ALREADY_IN_DOMAIN = 0x66
TIME_OUT = 0x78

# HV_IOMMU_CAP_* (reference section 1)
CAP_PRESENT, CAP_S2, CAP_S1, CAP_S1_5LVL = 1 << 0, 1 << 1, 1 << 2, 1 << 3

# call codes (reference section 1 / section 4 root side)
CREATE, ATTACH, MAP, UNMAP = 0x00B1, 0x00B2, 0x00B3, 0x00B4
DETACH, DELETE, CONFIGURE = 0x00C4, 0x00C5, 0x00CE
FLUSH, FLUSH_LIST = 0x00D0, 0x00D1
GET_CAPS, GET_PROPERTY = 0x0125, 0x0127

def hv_args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(extra))


# ------------------------------------------------------------------------------------------
# A fake DSA device: a real IOMMU unit serving the real invalidation queue of each slot
# registered with it, recording what arrives
# ------------------------------------------------------------------------------------------
class UnitRecorder:
    """What the hypervisor sent the unit, and knobs to make the unit slow or
    stuck. The unit is a real ``IommuUnit``; the queue is the real one."""

    def __init__(self, memory_dir: Path) -> None:
        side = unit_side(memory_dir)
        self.memory, self.unit = side.memory, side.unit
        self.invalidations: list[tuple[str, int, int, int, int]] = []
        #: one per ownership fence: (slot, owner partition id, owner token digest) as the record says
        self.assigns: list[tuple[int, int, bytes]] = []
        #: seconds each invalidation waits before doing its work (a slow unit)
        self.delay = 0.0
        #: when set, the unit blocks on the next item until ``release`` is set (a unit that never answers)
        self.hang = threading.Event()
        self.release = threading.Event()
        self.done_at: list[float] = []
        self._lock = threading.Lock()

    def handle(self, slot: int, item: QueueItem) -> None:
        if self.hang.is_set():
            self.release.wait(10)
        if isinstance(item, Invalidation):
            with self._lock:
                self.invalidations.append((item.scope.name.lower(), item.did, item.addr, item.am,
                                           slot if item.slot is None else item.slot))
            if self.delay:
                time.sleep(self.delay)
            item.apply(self.unit)
            with self._lock:
                self.done_at.append(time.monotonic())
        elif isinstance(item, OwnerFence):
            rec = read_owner(self.memory, slot)
            with self._lock:
                self.assigns.append((slot, rec.partition_id, rec.token_sha256))

    def scopes(self) -> list[str]:
        with self._lock:
            return [c[0] for c in self.invalidations]


class FakeDevice:
    """Stands in for a DSA's IOMMU side: one queue consumer per slot it serves."""

    def __init__(self, memory_dir: Path) -> None:
        self.servicer = UnitRecorder(memory_dir)
        self.consumers: dict[int, QueueConsumer] = {}
        self.address = "127.0.0.1:1"  # nothing dials it: the hypervisor reaches units through their queues
        self.stopped = False

    @property
    def unit(self) -> IommuUnit:
        return self.servicer.unit

    def serve(self, slot: int) -> None:
        old = self.consumers.pop(slot, None)
        if old is not None:
            old.close()
        self.consumers[slot] = QueueConsumer(self.servicer.memory, slot,
                                             lambda item, s=slot: self.servicer.handle(s, item))

    def stop(self) -> None:
        """The device's process is gone: nobody serves its queues any more."""
        if not self.stopped:
            self.stopped = True
            self.servicer.release.set()
            for c in self.consumers.values():
                c.close()
            self.servicer.memory.close()


# ------------------------------------------------------------------------------------------
# The guest's side: typed hypercalls returning HV statuses, and the raw ABI
# ------------------------------------------------------------------------------------------
def dd(domain_id: int, dtype: int = S1, partition_id: int = SELF, vtl: int = 0) -> hypervisor_pb2.DeviceDomain:
    return hypervisor_pb2.DeviceDomain(partition_id=partition_id, owner_vtl=vtl, domain_type=dtype,
                                       domain_id=domain_id)


@dataclass
class Guest:
    pid: int
    token: str
    stub: hypervisor_pb2_grpc.HypervisorStub
    bank_path: Path
    memory_bytes: int

    # -- typed hypercalls (each returns the HV status, rep calls also reps completed)
    def caps(self, partition_id: int = SELF) -> hypervisor_pb2.GetIommuCapabilitiesReply:
        return self.stub.GetIommuCapabilities(hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=partition_id),
                                            timeout=CALL_TIMEOUT)

    def prop(self, device: int, code: int = PV_PROPERTY, partition_id: int = SELF
             ) -> hypervisor_pb2.GetLogicalDevicePropertyReply:
        return self.stub.GetLogicalDeviceProperty(hypervisor_pb2.GetLogicalDevicePropertyRequest(
            partition_id=partition_id, logical_device_id=device, code=code), timeout=CALL_TIMEOUT)

    def create(self, dom: int, dtype: int = S1, flags: int = 0, **kw: int) -> int:
        r = self.stub.CreateDeviceDomain(hypervisor_pb2.CreateDeviceDomainRequest(
            device_domain=dd(dom, dtype, **kw), flags=flags), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def delete(self, dom: int, dtype: int = S1, **kw: int) -> int:
        r = self.stub.DeleteDeviceDomain(hypervisor_pb2.DeleteDeviceDomainRequest(
            device_domain=dd(dom, dtype, **kw)), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def attach(self, dom: int, device: int, dtype: int = S1, **kw: int) -> int:
        r = self.stub.AttachDeviceDomain(hypervisor_pb2.AttachDeviceDomainRequest(
            device_domain=dd(dom, dtype, **kw), device_id=device), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def detach(self, device: int, partition_id: int = SELF) -> int:
        r = self.stub.DetachDeviceDomain(hypervisor_pb2.DetachDeviceDomainRequest(
            partition_id=partition_id, device_id=device), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def configure(self, dom: int, root: int = 0, *, translation: bool = True, blocked: bool = False,
                  five: bool = False, dtype: int = S1, **kw: int) -> int:
        r = self.stub.ConfigureDeviceDomain(hypervisor_pb2.ConfigureDeviceDomainRequest(
            device_domain=dd(dom, dtype, **kw),
            settings=hypervisor_pb2.DeviceDomainSettings(
                translation_enabled=translation, blocked=blocked, first_stage_paging_mode=five,
                page_table_root=root)), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def flush(self, dom: int, flags: int = 0, dtype: int = S1, **kw: int) -> int:
        r = self.stub.FlushDeviceDomain(hypervisor_pb2.FlushDeviceDomainRequest(
            device_domain=dd(dom, dtype, **kw), flags=flags), timeout=CALL_TIMEOUT)
        return int(r.result.status)

    def flush_list(self, dom: int, items: Iterable[tuple[int, int]], flags: int = 0, dtype: int = S1,
                   **kw: int) -> tuple[int, int]:
        r = self.stub.FlushDeviceDomainList(hypervisor_pb2.FlushDeviceDomainListRequest(
            device_domain=dd(dom, dtype, **kw), flags=flags,
            list=[hypervisor_pb2.FlushVa(page_number=pn, page_mask_shift=sh) for pn, sh in items]),
            timeout=CALL_TIMEOUT)
        return int(r.result.status), int(r.reps_completed)

    def map(self, dom: int, base: int, pfns: Iterable[int], flags: int = 3, dtype: int = S2,
            **kw: int) -> tuple[int, int]:
        r = self.stub.MapDeviceGpaPages(hypervisor_pb2.MapDeviceGpaPagesRequest(
            device_domain=dd(dom, dtype, **kw), map_flags=flags, target_device_va_base=base,
            gpa_page_list=list(pfns)), timeout=CALL_TIMEOUT)
        return int(r.result.status), int(r.reps_completed)

    def unmap(self, dom: int, base: int, count: int, dtype: int = S2, **kw: int) -> tuple[int, int]:
        r = self.stub.UnmapDeviceGpaPages(hypervisor_pb2.UnmapDeviceGpaPagesRequest(
            device_domain=dd(dom, dtype, **kw), target_device_va_base=base, page_count=count), timeout=CALL_TIMEOUT)
        return int(r.result.status), int(r.reps_completed)

    def raw(self, input_value: int, data: bytes) -> tuple[int, int, bytes]:
        """HvCall: (status bits 0-15, reps completed bits 32-43, output bytes)."""
        r = self.stub.HvCall(hypervisor_pb2.HvCallRequest(input_value=input_value, input=data), timeout=CALL_TIMEOUT)
        rv = r.result_value
        return rv & 0xFFFF, (rv >> 32) & 0xFFF, bytes(r.output)

    def faults(self, after: int = 0) -> list[hypervisor_pb2.Fault]:
        return list(self.stub.StreamFaults(hypervisor_pb2.StreamFaultsRequest(after_sequence=after, follow=False),
                                           timeout=5))

    def ram(self, memory: HostMemory) -> GuestRam:
        """The guest's CPU view of its RAM (its own bank only)."""
        return GuestRam(memory.bank(self.pid))


# ------------------------------------------------------------------------------------------
# One running hypervisor
# ------------------------------------------------------------------------------------------
@dataclass
class HvEnv:
    memory_dir: Path
    host: Host
    server: RunningServer
    link: Any
    admin: admin_pb2_grpc.AdminStub
    channels: list[grpc.Channel] = field(default_factory=list)
    fakes: list[FakeDevice] = field(default_factory=list)
    memories: list[HostMemory] = field(default_factory=list)
    _fake: FakeDevice | None = None

    @classmethod
    def start(cls, tmp: Path, *extra: str) -> HvEnv:
        memory_dir = tmp / "banks"
        host, server, link = build(hv_args("--memory-dir", str(memory_dir), *extra), "127.0.0.1:0")
        ch = connect(f"127.0.0.1:{server.port}", ADMIN_TOKEN)
        env = cls(memory_dir, host, server, link, admin_pb2_grpc.AdminStub(ch))
        env.channels.append(ch)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def channel(self, token: str | None) -> grpc.Channel:
        ch = connect(self.address, token)
        self.channels.append(ch)
        return ch

    def host_memory(self) -> HostMemory:
        m = HostMemory(self.memory_dir)
        self.memories.append(m)
        return m

    # -- admin helpers ----------------------------------------------------------------
    def partition(self, name: str = "", memory: int = 16 * MiB, holes: Iterable[tuple[int, int]] = (),
                  read_only: Iterable[tuple[int, int]] = ()) -> Guest:
        r = self.admin.CreatePartition(admin_pb2.CreatePartitionRequest(
            name=name, memory_bytes=memory,
            mmio_holes=[admin_pb2.GpaRange(gpa=g, size=s) for g, s in holes],
            read_only=[admin_pb2.GpaRange(gpa=g, size=s) for g, s in read_only]))
        assert r.result.status == SUCCESS, r.result.message
        stub = hypervisor_pb2_grpc.HypervisorStub(self.channel(r.token))
        return Guest(r.partition.partition_id, r.token, stub, Path(r.partition.bank_path), memory)

    def fake_device(self) -> FakeDevice:
        fake = FakeDevice(self.memory_dir)
        self.fakes.append(fake)
        return fake

    def device(self, name: str, guest: Guest | None = None, fake: FakeDevice | None = None,
               function: int = 0, guid: bytes | None = None) -> tuple[int, str, FakeDevice]:
        """Register a device whose unit is ``fake`` (a shared one by default),
        optionally assign it; returns (logical id, device token, fake)."""
        if fake is None:
            if self._fake is None:
                self._fake = self.fake_device()
            fake = self._fake
        r = self.admin.RegisterDevice(admin_pb2.RegisterDeviceRequest(
            name=name, control_address=fake.address, instance_guid=guid or os.urandom(16), pci_function=function))
        assert r.result.status == SUCCESS, r.result.message
        logical = r.device.logical_device_id
        fake.serve(r.device.slot)
        if guest is not None:
            a = self.admin.AssignDevice(admin_pb2.AssignDeviceRequest(logical_device_id=logical,
                                                                      partition_id=guest.pid))
            assert a.result.status == SUCCESS, a.result.message
        return logical, r.device_token, fake

    def domains(self, pid: int = 0) -> dict[tuple[int, int], admin_pb2.DomainInfo]:
        r = self.admin.ListDomains(admin_pb2.ListDomainsRequest(partition_id=pid))
        return {(d.partition_id, d.domain_id): d for d in r.domains}

    def admin_devices(self) -> dict[int, admin_pb2.Device]:
        return {d.logical_device_id: d for d in self.admin.ListDevices(common_pb2.Empty()).devices}

    def guest_device(self, name: str = "g", memory: int = 16 * MiB, *, device: str = "dsa0",
                     holes: Iterable[tuple[int, int]] = (), read_only: Iterable[tuple[int, int]] = (),
                     tables: tuple[int, int] = (1 * MiB, 2 * MiB), dom: int | None = None) -> GuestDevice:
        """The nested system over the service: a partition with one ``device``
        behind its own fake unit and a stage-1 table in its RAM (frames at GPAs
        ``tables``); with ``dom``, that domain created, pointed at the table and
        the device attached to it (stage 2 and contexts are the hypervisor's)."""
        g = self.partition(name, memory, holes=holes, read_only=read_only)
        fake = self.fake_device()
        dev, _, _ = self.device(device, g, fake=fake)
        guest = guest_tables(g.ram(self.host_memory()), tables)
        if dom is not None:
            assert g.create(dom) == SUCCESS
            assert g.configure(dom, int(guest.s1.root)) == SUCCESS
            assert g.attach(dom, dev) == SUCCESS
        return GuestDevice(self, g, fake, dev, self.admin_devices()[dev].slot, guest)

    def unchanged(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``call(*args, **kwargs)`` and check the host's state is exactly as before."""
        before = self.host.snapshot()
        result = call(*args, **kwargs)
        assert self.host.snapshot() == before
        return result

    def close(self) -> None:
        # Servers first: closing a channel to a live server waits ~0.2 s in grpc.
        self.server.stop(0)
        self.host.close()
        if self.host.trace is not None:
            self.host.trace.close()
        for fake in self.fakes:
            fake.stop()
        self.link.close()
        for ch in self.channels:
            ch.close()
        for m in self.memories:
            m.close()


@dataclass
class GuestDevice:
    """What ``HvEnv.guest_device`` built."""

    env: HvEnv
    guest: Guest
    fake: FakeDevice
    dev: int
    slot: int
    tables: GuestTables

    @property
    def unit(self) -> IommuUnit:
        return self.fake.unit

    @property
    def s1(self) -> PageTable[Iova, Gpa, Gpa]:
        return self.tables.s1


@pytest.fixture
def make_hv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., HvEnv]]:
    """``make_hv(*extra_args)`` starts a hypervisor built by ``main.build``; all
    are stopped in teardown. Shared by the hypervisor and inspection tests."""
    monkeypatch.setenv("PVIOMMU_ADMIN_TOKEN", ADMIN_TOKEN)
    envs: list[HvEnv] = []

    def make(*extra: str) -> HvEnv:
        env = HvEnv.start(tmp_path / f"hv{len(envs)}", *extra)
        envs.append(env)
        return env

    yield make
    for env in reversed(envs):
        env.close()
