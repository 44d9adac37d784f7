"""Device page faults across real processes: partial completion stops at the
faulting page, and with BOF the device's page request travels to the guest
(through the hypervisor), the guest maps the page, and the copy completes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pvctl.local import VirtualSystem
from pviommu.abi.dsa import CompletionRecord, DescFlags, Descriptor, DsaStatus, Opcode
from pviommu.units import MiB
from pviommu.v1 import common_pb2, guest_pb2

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]
HALF = 512 << 10


@pytest.fixture(scope="module")
def system() -> Any:
    with VirtualSystem(guests=1, devices_per_guest=1, memory_bytes=128 << 20) as vs:
        yield vs


class Rig:
    def __init__(self, system: VirtualSystem) -> None:
        g = system.guests[0]
        self.agent = g.stub
        self.dev = g.devices[0]
        self.pattern = bytes((i * 31 + 7) & 0xFF for i in range(MiB))
        self.src = self.alloc(MiB)
        self.agent.WriteMemory(guest_pb2.WriteRequest(gpa=self.src.gpa, data=self.pattern), timeout=30)
        self.src_map = self.map(self.src.gpa, MiB, guest_pb2.TO_DEVICE)
        self.rec = self.alloc(4096)
        self.rec_map = self.map(self.rec.gpa, 4096, guest_pb2.BIDIRECTIONAL)

    def alloc(self, size: int) -> Any:
        return self.agent.AllocBuffer(guest_pb2.AllocRequest(size=size), timeout=30)

    def map(self, gpa: int, size: int, direction: int, on_demand: bool = False, iova: int = 0) -> Any:
        return self.agent.Map(guest_pb2.MapRequest(logical_device_id=self.dev, gpa=gpa, size=size,
                                                   direction=direction, on_demand=on_demand, iova=iova), timeout=30)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.agent.ReadMemory(guest_pb2.ReadRequest(gpa=gpa, size=size), timeout=30).data)

    def memmove(self, dst_iova: int, size: int, bof: bool) -> CompletionRecord:
        self.agent.WriteMemory(guest_pb2.WriteRequest(gpa=self.rec.gpa, data=bytes(32)), timeout=30)
        flags = DescFlags.CRAV | DescFlags.RCR | (DescFlags.BOF if bof else DescFlags(0))
        desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(flags), completion_addr=self.rec_map.iova,
                          src_addr=self.src_map.iova, dst_addr=dst_iova, xfer_size=size)
        reply = self.agent.SubmitDescriptor(guest_pb2.DescriptorRequest(
            logical_device_id=self.dev, descriptor=desc.pack(), wait=True, timeout_ms=60000,
            completion_gpa=self.rec.gpa), timeout=120)
        assert reply.accepted
        return CompletionRecord.unpack(reply.completion_record)

    def stats(self) -> dict[str, int]:
        return dict(self.agent.GetStats(common_pb2.Empty(), timeout=30).counters)


def test_unmapping_half_of_a_1mib_destination_stops_memmove_exactly_at_that_page(system: VirtualSystem) -> None:
    rig = Rig(system)
    dst = rig.alloc(MiB)
    # a 1 MiB IOVA window placed by hand (far below the top-down allocator's
    # range): both halves mapped, then the high half unmapped (and flushed)
    window = 0x4000_0000
    win = rig.map(dst.gpa, HALF, guest_pb2.FROM_DEVICE, iova=window)
    high = rig.map(dst.gpa + HALF, HALF, guest_pb2.FROM_DEVICE, iova=window + HALF)
    assert (win.iova, high.iova) == (window, window + HALF)
    assert rig.memmove(window, MiB, bof=False).code == DsaStatus.SUCCESS
    rig.agent.WriteMemory(guest_pb2.WriteRequest(gpa=dst.gpa, data=b"\xee" * MiB), timeout=30)
    rig.agent.Unmap(guest_pb2.UnmapRequest(logical_device_id=rig.dev, iova=high.iova, size=HALF), timeout=30)
    rec = rig.memmove(win.iova, MiB, bof=False)
    assert rec.code == DsaStatus.PAGE_FAULT_NOBOF
    assert rec.bytes_completed == HALF
    assert rec.fault_addr == win.iova + HALF and rec.fault_was_write
    out = rig.read(dst.gpa, MiB)
    assert out[:HALF] == rig.pattern[:HALF]
    assert out[HALF:] == b"\xee" * HALF, "the device wrote beyond the faulting page"


def test_bof_page_requests_are_resolved_by_the_guest_and_the_copy_completes(system: VirtualSystem) -> None:
    rig = Rig(system)
    dst = rig.alloc(MiB)
    before = rig.stats().get("page_requests_ok", 0)
    lazy = rig.map(dst.gpa, MiB, guest_pb2.FROM_DEVICE, on_demand=True)
    started = time.monotonic()
    rec = rig.memmove(lazy.iova, MiB, bof=True)
    assert rec.code == DsaStatus.SUCCESS, hex(rec.status)
    assert rig.read(dst.gpa, MiB) == rig.pattern
    resolved = rig.stats().get("page_requests_ok", 0) - before
    assert resolved >= 1, "no page request reached the guest"
    assert time.monotonic() - started < 100


def test_without_bof_an_on_demand_page_faults_with_partial_completion(system: VirtualSystem) -> None:
    rig = Rig(system)
    dst = rig.alloc(64 << 10)
    lazy = rig.map(dst.gpa, 64 << 10, guest_pb2.FROM_DEVICE, on_demand=True)
    rec = rig.memmove(lazy.iova, 64 << 10, bof=False)
    assert rec.code == DsaStatus.PAGE_FAULT_NOBOF
    assert rec.bytes_completed == 0 and rec.fault_addr == lazy.iova
