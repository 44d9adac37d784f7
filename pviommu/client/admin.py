"""The root partition's view (``pviommu.v1.Admin``, admin credential):
partitions, devices and assignment, domains, statistics, faults, and the
inspection calls (stage-1/stage-2 dumps, the explained nested walk).

A refusal answered in band (a non-SUCCESS ``HvResult``) raises
``HvCallError`` with the status by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pviommu.client.errors import ClientError, HvCallError
from pviommu.client.fmt import hex_repr
from pviommu.client.inspect import dump_text, explain_text
from pviommu.client.rpc import Endpoint
from pviommu.client.types import AdminDomain, DeviceInfo, Fault, NewPartition, PartitionInfo
from pviommu.units import parse_size
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2


@dataclass(frozen=True, repr=False)
class TableDump:
    """A stage-1 or stage-2 table as a tree (``text()``) and its mapped ranges."""

    title: str
    format: str
    root: int
    ranges: tuple[tuple[int, int, int, str], ...]  # (va, oa, size, perm)
    raw: Any = field(repr=False)

    def text(self) -> str:
        return dump_text(self.raw, self.title)

    def __repr__(self) -> str:
        return f"TableDump({self.title!r}, {self.format}, root={self.root:#x}, ranges={len(self.ranges)})"


@dataclass(frozen=True, repr=False)
class Explanation:
    """Every step of the nested walk of one IOVA, by the IOMMU unit's own code."""

    iova: int
    write: bool
    ok: bool
    hpa: int
    size_lg2: int
    fault_reason: int
    fault_reason_name: str
    fault_detail: str
    reads: int
    raw: Any = field(repr=False)

    def text(self) -> str:
        return explain_text(self.raw, self.iova, self.write)

    def __repr__(self) -> str:
        return hex_repr(self, ("size_lg2", "reads"))


class Admin:
    """The ``pviommu.v1.Admin`` service with the admin credential."""

    def __init__(self, address: str, token: str, *, timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self.address = address
        self.endpoint = Endpoint(address, token, what=f"hypervisor admin {address}", timeout=timeout,
                                 connect_timeout=connect_timeout)

    def __repr__(self) -> str:
        return f"Admin(address={self.address!r})"

    @property
    def stub(self) -> admin_pb2_grpc.AdminStub:
        return self.endpoint.stub(admin_pb2_grpc.AdminStub)

    def close(self) -> None:
        self.endpoint.close()

    def _call(self, method: str, request: Any, what: str | None = None) -> Any:
        reply = self.endpoint.call(getattr(self.stub, method), request, what or method)
        result = getattr(reply, "result", None)
        if result is not None and result.status:
            raise HvCallError(f"{what or method}: {result.message or result.status_name}", hv_status=result.status,
                              call=method)
        return reply

    # -- partitions ------------------------------------------------------------------------
    def partitions(self) -> list[PartitionInfo]:
        return [PartitionInfo.from_proto(p) for p in self._call("ListPartitions", common_pb2.Empty()).partitions]

    def partition(self, which: int | str) -> PartitionInfo:
        """A partition by id or name."""
        for p in self.partitions():
            if p.partition_id == which or p.name == which:
                return p
        raise ClientError(f"no partition {which!r}")

    def create_partition(self, name: str, memory: int | str = "256M", *,
                         mmio_holes: Iterable[tuple[int, int]] = (),
                         read_only: Iterable[tuple[int, int]] = ()) -> NewPartition:
        """A partition with ``memory`` bytes of RAM (``"256M"`` or an int; a
        multiple of 2 MiB); ``mmio_holes`` and ``read_only`` are (gpa, size)."""
        size = parse_size(memory) if isinstance(memory, str) else memory
        reply = self._call("CreatePartition", admin_pb2.CreatePartitionRequest(
            name=name, memory_bytes=size, mmio_holes=[admin_pb2.GpaRange(gpa=g, size=n) for g, n in mmio_holes],
            read_only=[admin_pb2.GpaRange(gpa=g, size=n) for g, n in read_only]), f"create partition {name!r}")
        p = reply.partition
        return NewPartition(p.partition_id, p.name, p.memory_bytes, p.bank_path, reply.token)

    def destroy_partition(self, partition_id: int) -> None:
        self._call("DestroyPartition", admin_pb2.PartitionRequest(partition_id=partition_id),
                   f"destroy partition {partition_id:#x}")

    def reset_partition(self, partition_id: int) -> NewPartition:
        """A reboot: domains and attachments reclaimed, RAM zeroed, a new token."""
        reply = self._call("ResetPartition", admin_pb2.PartitionRequest(partition_id=partition_id),
                           f"reset partition {partition_id:#x}")
        p = reply.partition
        return NewPartition(p.partition_id, p.name, p.memory_bytes, p.bank_path, reply.token)

    # -- devices --------------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo.from_proto(d) for d in self._call("ListDevices", common_pb2.Empty()).devices]

    def device(self, which: int | str) -> DeviceInfo:
        """A device by logical id or name."""
        for d in self.devices():
            if d.logical_device_id == which or d.name == which:
                return d
        raise ClientError(f"no device {which!r}")

    def assign(self, device_id: int, partition_id: int) -> None:
        self._call("AssignDevice", admin_pb2.AssignDeviceRequest(logical_device_id=device_id,
                                                                 partition_id=partition_id),
                   f"assign device {device_id:#x} to partition {partition_id:#x}")

    def unassign(self, device_id: int) -> None:
        self._call("UnassignDevice", admin_pb2.DeviceRequest(logical_device_id=device_id),
                   f"unassign device {device_id:#x}")

    def unregister(self, device_id: int) -> None:
        self._call("UnregisterDevice", admin_pb2.DeviceRequest(logical_device_id=device_id),
                   f"unregister device {device_id:#x}")

    # -- state -------------------------------------------------------------------------------------
    def domains(self, partition_id: int = 0) -> list[AdminDomain]:
        """Every domain (of one partition, or all with 0)."""
        return [AdminDomain.from_proto(d) for d in
                self._call("ListDomains", admin_pb2.ListDomainsRequest(partition_id=partition_id)).domains]

    def stats(self) -> dict[str, int]:
        return dict(self._call("GetStats", common_pb2.Empty()).counters)

    def faults(self, partition_id: int = 0, after: int = 0) -> list[Fault]:
        return [Fault.from_proto(f) for f in self.endpoint.stream(
            self.stub.StreamFaults, admin_pb2.StreamFaultsAdminRequest(partition_id=partition_id, follow=False,
                                                                       after_sequence=after), "faults")]

    def is_fresh(self) -> bool:
        """No partition and no device yet (what ``pviommu replay`` needs)."""
        return not self.partitions() and not self.devices()

    # -- inspection ---------------------------------------------------------------------------------
    @staticmethod
    def _dump(reply: Any, title: str) -> TableDump:
        return TableDump(title, reply.format, reply.root, tuple((r.va, r.oa, r.size, r.perm) for r in reply.ranges),
                         reply)

    def dump_stage2(self, partition_id: int) -> TableDump:
        """A partition's GPA -> HPA table."""
        reply = self._call("DumpStage2", admin_pb2.DumpStage2Request(partition_id=partition_id),
                           f"stage 2 of partition {partition_id:#x}")
        return self._dump(reply, f"stage 2 of partition {partition_id}")

    def dump_stage1(self, partition_id: int, domain_id: int) -> TableDump:
        """A domain's IOVA -> GPA table as the guest wrote it."""
        reply = self._call("DumpStage1", admin_pb2.DumpStage1Request(partition_id=partition_id, domain_id=domain_id),
                           f"stage 1 of domain {domain_id:#x}")
        return self._dump(reply, f"stage 1 of domain {domain_id} in partition {partition_id}")

    def explain(self, partition_id: int, iova: int, *, device: int = 0, domain: int = 0,
                write: bool = False) -> Explanation:
        """The nested walk of ``iova`` through a device's live context (or a domain's would-be one)."""
        if bool(device) == bool(domain):
            raise ValueError("name exactly one of device= or domain=")
        reply = self._call("ExplainIova", admin_pb2.ExplainIovaRequest(
            partition_id=partition_id, logical_device_id=device, domain_id=domain, iova=iova, write=write),
            f"explain IOVA {iova:#x}")
        return Explanation(iova, write, reply.ok, reply.hpa, reply.size_lg2, reply.fault_reason,
                           reply.fault_reason_name, reply.fault_detail, reply.reads, reply)
