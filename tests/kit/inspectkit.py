"""A guest with its own stage-1 table and one device behind a real IOMMU
unit, for the inspection tests. Memory plan of the 16 MiB partition:
stage-1 table pages in [1 MiB, 2 MiB), data pages from 4 MiB; stage 2 has a
hole at ``HOLE`` and a read-only range at ``RO``."""

from __future__ import annotations

from dataclasses import dataclass

from pviommu.addr import Gpa, Iova
from pviommu.mem.frames import FrameAllocator, guest_frames
from pviommu.pt.fmt import X86_64Format
from pviommu.pt.gather import IotlbGather
from pviommu.pt.walk import PageTable, stage1_table
from pviommu.v1 import admin_pb2
from tests.kit.hvkit import FakeDevice, Guest, HvEnv, MiB

DOM = 7
HOLE = (8 * MiB, 64 << 10)
RO = (12 * MiB, 2 * MiB)
DATA_START = 4 * MiB
RAM = 16 * MiB


@dataclass
class Nested:
    env: HvEnv
    guest: Guest
    fake: FakeDevice
    dev: int
    slot: int
    s1: PageTable[Iova, Gpa, Gpa]
    frames: FrameAllocator[Gpa]

    def unmap_all(self, ranges: list[tuple[int, int]]) -> None:
        """Unmap ``(iova, size)`` ranges, free the emptied table pages and make the unit forget."""
        gather: IotlbGather[Gpa] = IotlbGather()
        for iova, size in ranges:
            self.s1.unmap(Iova(iova), size, gather)
        for table in gather.freelist:
            self.frames.free_table(table)
        self.fake.unit.invalidate_all()

    def explain(self, iova: int, write: bool = False, *, by_domain: bool = False) -> admin_pb2.ExplainIovaReply:
        req = admin_pb2.ExplainIovaRequest(partition_id=self.guest.pid, iova=iova, write=write)
        if by_domain:
            req.domain_id = DOM
        else:
            req.logical_device_id = self.dev
        reply = self.env.admin.ExplainIova(req, timeout=10)
        assert reply.result.status == 0, reply.result.message
        return reply


def nested(env: HvEnv, name: str = "g") -> Nested:
    g = env.partition(name, RAM, holes=[HOLE], read_only=[RO])
    fake = env.fake_device()
    dev, _, _ = env.device(f"dsa-{name}", g, fake=fake)
    slot = env.admin_devices()[dev].slot
    ram = g.ram(env.host_memory())
    frames = guest_frames(ram, 1 * MiB, 1 * MiB)
    s1 = stage1_table(X86_64Format(4), ram, frames)
    assert g.create(DOM) == 0
    assert g.configure(DOM, int(s1.root)) == 0
    assert g.attach(DOM, dev) == 0
    return Nested(env, g, fake, dev, slot, s1, frames)
