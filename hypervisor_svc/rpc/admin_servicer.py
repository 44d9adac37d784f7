"""The root partition's ``Admin`` service and the devices' ``DeviceHost``
service. Glue only: credentials checked, messages translated, ``Host`` does
the work; refusals come back as an HvResult in the body."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from hypervisor_svc.core.host import Host
from hypervisor_svc.core.inspect import Dump, Explainer, dump_stage1, dump_stage2, perm_text
from hypervisor_svc.core.model import Device, Partition
from hypervisor_svc.core.trace import who
from hypervisor_svc.rpc.hypercall_servicer import fault_message, follow_faults
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError
from pviommu.iommu.context import ContextEntry, Pgtt, context_hpa
from pviommu.iommu.nested import ExplainStep, WalkOk
from pviommu.iommu.unit import Explanation
from pviommu.log import get_logger
from pviommu.rpc.auth import require
from pviommu.rpc.hvproto import hv_result
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hypervisor_pb2

log = get_logger("admin")


def partition_message(host: Host, p: Partition) -> admin_pb2.Partition:
    return admin_pb2.Partition(
        partition_id=p.partition_id, name=p.name, memory_bytes=p.memory_bytes, bank_index=p.bank.index,
        bank_path=str(p.bank.path), devices=sorted(p.devices), domain_count=len(p.domains),
        stage2_table_pages=host.tables.table_pages(p.stage2),
        table_frames_used=p.table_frames.used, table_frames_quota=p.table_frames.quota,
    )


def device_message(d: Device) -> admin_pb2.Device:
    return admin_pb2.Device(
        logical_device_id=d.logical_device_id, name=d.name, control_address=d.control_address, slot=d.slot,
        partition_id=d.partition_id, domain_id=d.domain_id, reachable=d.reachable,
        pci_vendor_id=d.pci_vendor_id, pci_device_id=d.pci_device_id, sync=d.sync.value, epoch=d.epoch,
    )


def _ok() -> hypervisor_pb2.HvReply:
    return hypervisor_pb2.HvReply(result=hv_result(HvStatus.SUCCESS))


def _refused(exc: HvError) -> hypervisor_pb2.HvReply:
    return hypervisor_pb2.HvReply(result=hv_result(exc.hv_status, str(exc)))


def _dev(d: Device) -> dict[str, Any]:
    return {"id": d.logical_device_id, "name": d.name}


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, host: Host) -> None:
        self.host = host
        self.explainer = Explainer(host)

    # -- the trace (hypervisor_svc/core/trace.py) of admin changes ------------------
    def _trace(self, op: str, status: int, **fields: Any) -> None:
        if self.host.trace is not None:
            self.host.trace.admin(op, status, **fields)

    def _dev_ref(self, logical: int) -> dict[str, Any]:
        d = self.host.devices.get(logical)
        return _dev(d) if d is not None else {"id": logical, "name": ""}

    def _change(self, op: str, fn: Callable[..., object], *args: int, **fields: Any) -> hypervisor_pb2.HvReply:
        """Run one state change of ``Host`` and trace it with its status."""
        with self.host.admin_lock:
            try:
                fn(*args)
            except HvError as exc:
                self._trace(op, exc.hv_status, **fields)
                return _refused(exc)
            self._trace(op, HvStatus.SUCCESS, **fields)
        return _ok()

    @grpc_errors
    def CreatePartition(self, request: admin_pb2.CreatePartitionRequest,
                        context: grpc.ServicerContext,
                        ) -> admin_pb2.CreatePartitionReply:
        require("admin")
        holes = [(r.gpa, r.size) for r in request.mmio_holes]
        read_only = [(r.gpa, r.size) for r in request.read_only]
        args = {"name": request.name, "memory_bytes": request.memory_bytes, "mmio_holes": holes,
                "read_only": read_only}
        with self.host.admin_lock:  # the trace line and the change in one step (lines in execution order)
            try:
                part = self.host.create_partition(request.name, request.memory_bytes, holes, read_only)
            except HvError as exc:
                self._trace("create_partition", exc.hv_status, **args)
                return admin_pb2.CreatePartitionReply(result=hv_result(exc.hv_status, str(exc)))
            self._trace("create_partition", HvStatus.SUCCESS, partition=who(part), **args)
        return admin_pb2.CreatePartitionReply(result=hv_result(HvStatus.SUCCESS),
                                              partition=partition_message(self.host, part), token=part.token)

    @grpc_errors
    def DestroyPartition(self, request: admin_pb2.PartitionRequest,
                         context: grpc.ServicerContext,
                         ) -> hypervisor_pb2.HvReply:
        require("admin")
        return self._change("destroy_partition", self.host.destroy_partition, request.partition_id,
                            partition=who(self.host.partitions.get(request.partition_id), request.partition_id))

    @grpc_errors
    def ResetPartition(self, request: admin_pb2.PartitionRequest,
                       context: grpc.ServicerContext,
                       ) -> admin_pb2.CreatePartitionReply:
        require("admin")
        with self.host.admin_lock:
            try:
                part = self.host.reset_partition(request.partition_id)
            except HvError as exc:
                self._trace("reset_partition", exc.hv_status, partition=who(None, request.partition_id))
                return admin_pb2.CreatePartitionReply(result=hv_result(exc.hv_status, str(exc)))
            self._trace("reset_partition", HvStatus.SUCCESS, partition=who(part))
        return admin_pb2.CreatePartitionReply(result=hv_result(HvStatus.SUCCESS),
                                              partition=partition_message(self.host, part), token=part.token)

    @grpc_errors
    def ListPartitions(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> admin_pb2.ListPartitionsReply:
        require("admin")
        with self.host.lock:
            parts = [partition_message(self.host, p) for p in self.host.partitions.values()]
        return admin_pb2.ListPartitionsReply(partitions=parts)

    @grpc_errors
    def RegisterDevice(self, request: admin_pb2.RegisterDeviceRequest,
                       context: grpc.ServicerContext,
                       ) -> admin_pb2.RegisterDeviceReply:
        require("admin")
        if not request.control_address:
            raise HvError(HvStatus.INVALID_PARAMETER, "control_address is required")
        with self.host.admin_lock:
            dev = self.host.register_device(request.name, request.control_address, request.pci_vendor_id,
                                            request.pci_device_id, bytes(request.instance_guid),
                                            request.pci_function)
            self._trace("register_device", HvStatus.SUCCESS, device=_dev(dev), slot=dev.slot,
                        control_address=request.control_address, pci_vendor_id=request.pci_vendor_id,
                        pci_device_id=request.pci_device_id, instance_guid=bytes(request.instance_guid).hex(),
                        pci_function=request.pci_function)
        return admin_pb2.RegisterDeviceReply(
            result=hv_result(HvStatus.SUCCESS), device=device_message(dev), device_token=dev.token,
            memory_dir=str(self.host.memory.directory), context_table_hpa=context_hpa(0))

    @grpc_errors
    def UnregisterDevice(self, request: admin_pb2.DeviceRequest,
                         context: grpc.ServicerContext,
                         ) -> hypervisor_pb2.HvReply:
        require("admin")
        return self._change("unregister_device", self.host.unregister_device, request.logical_device_id,
                            device=self._dev_ref(request.logical_device_id))

    @grpc_errors
    def AssignDevice(self, request: admin_pb2.AssignDeviceRequest,
                     context: grpc.ServicerContext,
                     ) -> hypervisor_pb2.HvReply:
        require("admin")
        return self._change("assign_device", self.host.assign_device, request.logical_device_id,
                            request.partition_id, device=self._dev_ref(request.logical_device_id),
                            partition=who(self.host.partitions.get(request.partition_id), request.partition_id))

    @grpc_errors
    def UnassignDevice(self, request: admin_pb2.DeviceRequest, context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        require("admin")
        return self._change("unassign_device", self.host.unassign_device, request.logical_device_id,
                            device=self._dev_ref(request.logical_device_id))

    @grpc_errors
    def ResyncDevice(self, request: admin_pb2.DeviceRequest, context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        require("admin")
        return self._change("resync_device", self.host.resync_device, request.logical_device_id,
                            device=self._dev_ref(request.logical_device_id))

    @grpc_errors
    def ListDevices(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> admin_pb2.ListDevicesAdminReply:
        require("admin")
        with self.host.lock:
            devs = [device_message(d) for d in self.host.devices.values()]
        return admin_pb2.ListDevicesAdminReply(devices=devs)

    @grpc_errors
    def ListDomains(self, request: admin_pb2.ListDomainsRequest,
                    context: grpc.ServicerContext,
                    ) -> admin_pb2.ListDomainsReply:
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
    def GetStats(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> admin_pb2.Stats:
        require("admin")
        with self.host.lock:
            counters = dict(self.host.counters.stats)
            counters["partitions"] = len(self.host.partitions)
            counters["devices"] = len(self.host.devices)
            counters["domains"] = sum(len(p.domains) for p in self.host.partitions.values())
            counters["stage2_table_frames"] = self.host.tables.allocated_frames()
        return admin_pb2.Stats(counters=counters)

    @grpc_stream_errors
    async def StreamFaults(self, request: admin_pb2.StreamFaultsAdminRequest,
                           context: grpc.aio.ServicerContext[admin_pb2.StreamFaultsAdminRequest, hypervisor_pb2.Fault],
                           ) -> AsyncIterator[hypervisor_pb2.Fault]:
        require("admin")
        with self.host.lock:
            parts = [p for p in self.host.partitions.values()
                     if not request.partition_id or p.partition_id == request.partition_id]
        if request.follow and len(parts) == 1 and parts[0].faults is not None:
            async for e in follow_faults(parts[0].faults, request.after_sequence):
                yield fault_message(e)
            return
        for p in parts:
            if p.faults is not None:
                for e in p.faults.snapshot(request.after_sequence):
                    yield fault_message(e)

    # -- inspection ------------------------------------------------------------------
    @grpc_errors
    def DumpStage2(self, request: admin_pb2.DumpStage2Request, context: grpc.ServicerContext) -> admin_pb2.TableDump:
        require("admin")
        try:
            return dump_message(dump_stage2(self.host, request.partition_id))
        except HvError as exc:
            return admin_pb2.TableDump(result=hv_result(exc.hv_status, str(exc)))

    @grpc_errors
    def DumpStage1(self, request: admin_pb2.DumpStage1Request, context: grpc.ServicerContext) -> admin_pb2.TableDump:
        require("admin")
        try:
            return dump_message(dump_stage1(self.host, request.partition_id, request.domain_id))
        except HvError as exc:
            return admin_pb2.TableDump(result=hv_result(exc.hv_status, str(exc)))

    @grpc_errors
    def ExplainIova(self, request: admin_pb2.ExplainIovaRequest,
                    context: grpc.ServicerContext,
                    ) -> admin_pb2.ExplainIovaReply:
        require("admin")
        try:
            exp = self.explainer.explain(request.partition_id, request.iova, request.write,
                                         logical_device_id=request.logical_device_id, domain_id=request.domain_id,
                                         pasid=request.pasid)
        except HvError as exc:
            return admin_pb2.ExplainIovaReply(result=hv_result(exc.hv_status, str(exc)))
        return explanation_message(exp)


def dump_message(d: Dump) -> admin_pb2.TableDump:
    return admin_pb2.TableDump(
        result=hv_result(HvStatus.SUCCESS), format=d.format, input_space=d.input_space,
        output_space=d.output_space, table_space=d.table_space, root=d.root, truncated=d.truncated,
        tables_read=d.tables_read,
        entries=[admin_pb2.TableEntry(level=i.level, va=i.va, table=i.table, index=i.index, entry=i.entry,
                                      type=i.type.name, oa=i.oa, size_lg2=i.size_lg2, perm=perm_text(i.perm),
                                      error=i.error) for i in d.items],
        ranges=[admin_pb2.MappedRange(va=r.va, oa=r.oa, size=r.size, perm=perm_text(r.perm)) for r in d.ranges])


def _step(s: ExplainStep) -> admin_pb2.WalkStep:
    return admin_pb2.WalkStep(stage=s.stage, level=s.level, va=s.va, table=s.table, table_hpa=s.table_hpa,
                              index=s.index, entry=s.entry, note=s.note)


def _context_text(ctx: ContextEntry | None) -> str:
    if ctx is None:
        return "(unreadable)"
    if not ctx.present:
        return "present=0 (blocked or unassigned)"
    pgtt = Pgtt(ctx.pgtt).name if ctx.pgtt in Pgtt._value2member_map_ else str(ctx.pgtt)
    text = (f"present=1 pgtt={pgtt} did={ctx.did} aw={ctx.aw} ({ctx.s2_levels}-level S2) "
            f"ssptptr={int(ctx.ssptptr):#x} fpd={int(ctx.fpd)}")
    if ctx.pgtt == Pgtt.NESTED:
        text += f" fspm={ctx.fspm} ({ctx.fs_levels}-level S1) fsptptr={int(ctx.fsptptr):#x}"
    return text + (" RESERVED BITS SET" if ctx.reserved_bits else "")


def explanation_message(exp: Explanation) -> admin_pb2.ExplainIovaReply:
    ctx = exp.context
    levels, final = exp.levels()
    reply = admin_pb2.ExplainIovaReply(
        result=hv_result(HvStatus.SUCCESS), slot=max(exp.slot, 0), context=_context_text(ctx),
        did=ctx.did if ctx is not None else 0,
        pgtt=Pgtt(ctx.pgtt).name if ctx is not None and ctx.pgtt in Pgtt._value2member_map_ else "",
        steps=[_step(s) for s in exp.steps], final_stage2=[_step(s) for s in final],
        levels=[admin_pb2.WalkLevel(level=lv.level, table_gpa=lv.table_gpa, stage2=[_step(s) for s in lv.s2],
                                    stage1=_step(lv.s1) if lv.s1 is not None else None, has_stage1=lv.s1 is not None)
                for lv in levels],
        reads=exp.result.reads)
    if exp.pasid is not None:  # the SVA proposal only
        reply.pasid = exp.pasid
        reply.pasid_steps.extend(admin_pb2.WalkStep(stage="PASID", level=-1, table=s.hpa, table_hpa=s.hpa,
                                                    index=s.index, entry=s.value, note=f"{s.what} {s.note}".strip())
                                 for s in exp.pasid_steps)
    if isinstance(exp.result, WalkOk):
        r = exp.result
        reply.ok, reply.size_lg2, reply.readable, reply.writable = True, r.size_lg2, r.read, r.write
        reply.hpa = int(r.hpa) + (int(exp.iova) - r.iova)
    else:
        reply.fault_reason, reply.fault_reason_name = int(exp.result.reason), exp.result.reason.name
        reply.fault_detail = exp.result.detail
    return reply


class DeviceHostServicer(admin_pb2_grpc.DeviceHostServicer):
    """What an IOMMU unit tells the hypervisor: faults and page requests."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @grpc_errors
    def ReportFault(self, request: admin_pb2.ReportFaultRequest,
                    context: grpc.ServicerContext,
                    ) -> hypervisor_pb2.HvReply:
        principal = require("device")
        dev = self.host.device(principal.id)
        part = self.host.fault_owner(dev, request.epoch, request.page_request, request.request_id)
        if part is None or part.faults is None:  # unowned, or a previous owner's: counted, delivered to nobody
            return _ok()
        sva: dict[str, Any] = {}
        if request.pasid_valid and self.host.sva is not None:  # the SVA proposal only
            sva = self.host.sva.report(dev, request.request_id, request.pasid, request.page_request, request.iova,
                                       request.write, request.reason)
        with self.host.lock:
            part.faults.append(
                partition_id=part.partition_id, logical_device_id=dev.logical_device_id, iova=request.iova,
                write=request.write, reason=request.reason, reason_name=request.reason_name, detail=request.detail,
                domain_id=dev.domain_id, page_request=request.page_request, request_id=request.request_id, **sva)
            self.host.counters.count("page_requests" if request.page_request else "faults")
            self.host.counters.count_fault(request.reason_name or f"{request.reason:#x}")
            if self.host.trace is not None:
                self.host.trace.fault(partition=who(part), device=_dev(dev), iova=request.iova, write=request.write,
                                      reason=request.reason, reason_name=request.reason_name,
                                      domain_id=dev.domain_id, page_request=request.page_request)
        log.info("fault.reported", partition=part.partition_id, device=dev.logical_device_id, iova=hex(request.iova),
                 write=request.write, reason=request.reason_name, page_request=request.page_request)
        return _ok()

    @grpc_errors
    def PageRequestTimedOut(self, request: admin_pb2.PageRequestTimedOutRequest,
                            context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        principal = require("device")
        dev = self.host.device(principal.id)
        if self.host.page_request_timed_out(dev, request.request_id, request.epoch):
            log.info("page_request.timed_out", device=dev.logical_device_id, request_id=request.request_id)
        return _ok()

    @grpc_errors
    def Heartbeat(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        principal = require("device")
        self.host.heartbeat(principal.id)
        return _ok()
