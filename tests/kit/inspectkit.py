"""A guest with its own stage-1 table and one device behind a real IOMMU
unit, for the inspection tests. Memory plan of the 16 MiB partition:
stage-1 table pages in [1 MiB, 2 MiB), data pages from 4 MiB; stage 2 has a
hole at ``HOLE`` and a read-only range at ``RO``."""

from __future__ import annotations

from dataclasses import dataclass

from pviommu.addr import Gpa, Iova
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.gather import IotlbGather
from pviommu.v1 import admin_pb2
from tests.kit.hvkit import GuestDevice, HvEnv, MiB

DOM = 7
HOLE = (8 * MiB, 64 << 10)
RO = (12 * MiB, 2 * MiB)
DATA_START = 4 * MiB
RAM = 16 * MiB


@dataclass
class Nested(GuestDevice):
    @property
    def frames(self) -> FrameAllocator[Gpa]:
        return self.tables.frames

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
    side = env.guest_device(name, RAM, device=f"dsa-{name}", holes=[HOLE], read_only=[RO], dom=DOM)
    return Nested(side.env, side.guest, side.fake, side.dev, side.slot, side.tables)
