"""The root partition's ``Admin`` service and the devices' ``DeviceHost``
service. Glue only: credentials checked, messages translated, ``Host`` does
the work; refusals come back as an HvResult in the body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.model import Device, Partition
from hypervisor_svc.rpc.hypercall_servicer import fault_message, hv_result
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError
from pviommu.iommu.context import context_hpa
from pviommu.log import get_logger
from pviommu.rpc.auth import require
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import admin_pb2, admin_pb2_grpc, hypervisor_pb2

log = get_logger("admin")


def partition_message(host: Host, p: Partition) -> admin_pb2.Partition:
    return admin_pb2.Partition(
        partition_id=p.partition_id, name=p.name, memory_bytes=p.memory_bytes, bank_index=p.bank.index,
        bank_path=str(p.bank.path), devices=sorted(p.devices), domain_count=len(p.domains),
        stage2_table_pages=host.tables.table_pages(p.stage2),
    )


def device_message(d: Device) -> admin_pb2.Device:
    return admin_pb2.Device(
        logical_device_id=d.logical_device_id, name=d.name, control_address=d.control_address, slot=d.slot,
        partition_id=d.partition_id, domain_id=d.domain_id, reachable=d.reachable,
        pci_vendor_id=d.pci_vendor_id, pci_device_id=d.pci_device_id,
    )


def _ok() -> hypervisor_pb2.HvReply:
    return hypervisor_pb2.HvReply(result=hv_result(HvStatus.SUCCESS))


def _refused(exc: HvError) -> hypervisor_pb2.HvReply:
    return hypervisor_pb2.HvReply(result=hv_result(exc.hv_status, str(exc)))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, host: Host) -> None:
        self.host = host

    @grpc_errors
    def CreatePartition(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            part = self.host.create_partition(
                request.name, request.memory_bytes,
                [(r.gpa, r.size) for r in request.mmio_holes], [(r.gpa, r.size) for r in request.read_only])
        except HvError as exc:
            return admin_pb2.CreatePartitionReply(result=hv_result(exc.hv_status, str(exc)))
        return admin_pb2.CreatePartitionReply(result=hv_result(HvStatus.SUCCESS),
                                              partition=partition_message(self.host, part), token=part.token)

    @grpc_errors
    def DestroyPartition(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            self.host.destroy_partition(request.partition_id)
        except HvError as exc:
            return _refused(exc)
        return _ok()

    @grpc_errors
    def ResetPartition(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            part = self.host.reset_partition(request.partition_id)
        except HvError as exc:
            return admin_pb2.CreatePartitionReply(result=hv_result(exc.hv_status, str(exc)))
        return admin_pb2.CreatePartitionReply(result=hv_result(HvStatus.SUCCESS),
                                              partition=partition_message(self.host, part), token=part.token)

    @grpc_errors
    def ListPartitions(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        with self.host.lock:
            parts = [partition_message(self.host, p) for p in self.host.partitions.values()]
        return admin_pb2.ListPartitionsReply(partitions=parts)

    @grpc_errors
    def RegisterDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        if not request.control_address:
            raise HvError(HvStatus.INVALID_PARAMETER, "control_address is required")
        dev = self.host.register_device(request.name, request.control_address, request.pci_vendor_id,
                                        request.pci_device_id, bytes(request.instance_guid), request.pci_function)
        return admin_pb2.RegisterDeviceReply(
            result=hv_result(HvStatus.SUCCESS), device=device_message(dev), device_token=dev.token,
            memory_dir=str(self.host.memory.directory), context_table_hpa=context_hpa(0))

    @grpc_errors
    def UnregisterDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            self.host.unregister_device(request.logical_device_id)
        except HvError as exc:
            return _refused(exc)
        return _ok()

    @grpc_errors
    def AssignDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            self.host.assign_device(request.logical_device_id, request.partition_id)
        except HvError as exc:
            return _refused(exc)
        return _ok()

    @grpc_errors
    def UnassignDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        try:
            self.host.unassign_device(request.logical_device_id)
        except HvError as exc:
            return _refused(exc)
        return _ok()

    @grpc_errors
    def ListDevices(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        with self.host.lock:
            devs = [device_message(d) for d in self.host.devices.values()]
        return admin_pb2.ListDevicesAdminReply(devices=devs)

    @grpc_errors
    def ListDomains(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        out = []
        with self.host.lock:
            for p in self.host.partitions.values():
                if request.partition_id and p.partition_id != request.partition_id:
                    continue
                for d in p.domains.values():
                    out.append(admin_pb2.DomainInfo(
                        partition_id=p.partition_id, domain_id=d.domain_id, domain_type=d.domain_type, tag=d.tag,
                        configured=d.configured, translation_enabled=d.translation_enabled, blocked=d.blocked,
                        five_level=d.five_level, page_table_root=int(d.root), devices=sorted(d.devices),
                        stage2_root_hpa=self.host.tables.root_of(d.table if d.table is not None else p.stage2)))
        return admin_pb2.ListDomainsReply(domains=out)

    @grpc_errors
    def GetStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        require("admin")
        with self.host.lock:
            counters = dict(self.host.stats)
            counters["partitions"] = len(self.host.partitions)
            counters["devices"] = len(self.host.devices)
            counters["domains"] = sum(len(p.domains) for p in self.host.partitions.values())
            counters["stage2_table_frames"] = self.host.tables.allocated_frames()
        return admin_pb2.Stats(counters=counters)

    @grpc_stream_errors
    def StreamFaults(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        require("admin")
        with self.host.lock:
            parts = [p for p in self.host.partitions.values()
                     if not request.partition_id or p.partition_id == request.partition_id]
        if request.follow and len(parts) == 1 and parts[0].faults is not None:
            yield from (fault_message(e) for e in parts[0].faults.follow(request.after_sequence, context.is_active))
            return
        for p in parts:
            if p.faults is not None:
                for e in p.faults.snapshot(request.after_sequence):
                    yield fault_message(e)


class DeviceHostServicer(admin_pb2_grpc.DeviceHostServicer):
    """What an IOMMU unit tells the hypervisor: faults and page requests."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @grpc_errors
    def ReportFault(self, request: Any, context: grpc.ServicerContext) -> Any:
        principal = require("device")
        with self.host.lock:
            dev = self.host.device(principal.id)
            part = self.host.partitions.get(dev.partition_id)
            if part is None or part.faults is None:
                self.host.count("faults_unowned")
                return _ok()
            part.faults.append(
                partition_id=part.partition_id, logical_device_id=dev.logical_device_id, iova=request.iova,
                write=request.write, reason=request.reason, reason_name=request.reason_name, detail=request.detail,
                domain_id=dev.domain_id, page_request=request.page_request, request_id=request.request_id)
            self.host.count("page_requests" if request.page_request else "faults")
            self.host.count_fault(request.reason_name or f"{request.reason:#x}")
        log.info("fault.reported", partition=part.partition_id, device=dev.logical_device_id, iova=hex(request.iova),
                 write=request.write, reason=request.reason_name, page_request=request.page_request)
        return _ok()

    @grpc_errors
    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        principal = require("device")
        with self.host.lock:
            self.host.device(principal.id).reachable = True
        return _ok()
