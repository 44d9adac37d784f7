"""The guest-facing ``pviommu.v1.Hypervisor`` service: hypercalls over gRPC.

Glue only: decode the message into the ``pviommu.abi.hv`` input structure,
run ``Hypercalls.dispatch`` for the partition the credential names, encode
the answer. A judged hypercall is always gRPC OK with the HV status in the
body (as a real hypercall always returns a status); a call that cannot be
attributed (no or bad credential, or a non-partition credential) is a gRPC
error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from hypervisor_svc.core.faults import FaultEntry, FaultLog
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import HvAnswer, Hypercalls
from hypervisor_svc.core.model import Partition
from pviommu.abi import hv
from pviommu.abi import shm as L
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from pviommu.errors import HvError, PviommuError
from pviommu.rpc.auth import require
from pviommu.rpc.feeds import AsyncFeed
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc


def hv_result(status: int, message: str = "") -> common_pb2.HvResult:
    return common_pb2.HvResult(status=status, status_name=HvStatus.name_of(status), message=message)


def device_domain(msg: hypervisor_pb2.DeviceDomain) -> hv.DeviceDomain:
    vtl = msg.owner_vtl
    if vtl > 0xFF:
        raise HvError(HvStatus.INVALID_PARAMETER, f"owner_vtl {vtl:#x} does not fit hv_input_vtl")
    return hv.DeviceDomain(
        partition_id=msg.partition_id,
        domain_id=hv.DeviceDomainId(type=msg.domain_type, id=msg.domain_id),
        owner_vtl=hv.HvInputVtl.from_u8(vtl, "owner_vtl"),
    )


async def follow_faults(log: FaultLog, after: int) -> AsyncIterator[FaultEntry]:
    """The log's entries after ``after``, then each new one as it comes, until
    the log closes (the partition was reset or destroyed). Holds no thread."""
    feed: AsyncFeed[FaultEntry] = AsyncFeed()
    backlog = log.subscribe(feed, after)
    last = after
    try:
        for e in backlog:
            last = e.sequence
            yield e
        async for e in feed:
            if e.sequence > last:
                last = e.sequence
                yield e
    finally:
        log.unsubscribe(feed)


def fault_message(e: FaultEntry) -> hypervisor_pb2.Fault:
    m = hypervisor_pb2.Fault(
        sequence=e.sequence, logical_device_id=e.logical_device_id, iova=e.iova, write=e.write, reason=e.reason,
        reason_name=e.reason_name, detail=e.detail, domain_id=e.domain_id, timestamp=e.timestamp,
        page_request=e.page_request, request_id=e.request_id,
    )
    if e.pasid is not None:  # the SVA proposal only
        m.pasid_valid, m.pasid, m.synic_message = True, e.pasid, e.synic_message
    return m


class HypervisorServicer(hypervisor_pb2_grpc.HypervisorServicer):
    def __init__(self, host: Host, calls: Hypercalls | None = None) -> None:
        self.host = host
        self.calls = calls or Hypercalls(host)
        #: the data plane offered (set by main): the session socket and the hypercall pages' quota
        self.session_socket = ""
        self.hcpage_sessions = 0  # 0: no hypercall page offered
        self.fault_rings = False

    def _caller(self) -> Partition:
        principal = require("partition")
        with self.host.lock:
            return self.host.partition(principal.id)

    def _run(self, build: Callable[[], hv.HvRequest]) -> tuple[HvAnswer | None, common_pb2.HvResult, int]:
        """Run a typed hypercall: (answer, HvResult, reps completed)."""
        caller = self._caller()
        try:
            try:
                request = build()
            except ValueError as exc:  # a field out of its C range
                raise HvError(HvStatus.INVALID_PARAMETER, str(exc)) from exc
            answer = self.calls.dispatch(caller, request)
        except HvError as exc:
            self.host.counters.count(f"hv_status_{int(exc.hv_status):#x}")
            return None, hv_result(exc.hv_status, str(exc)), exc.reps_completed
        except PviommuError as exc:
            return None, hv_result(exc.hv_status, str(exc)), 0
        return answer, hv_result(HvStatus.SUCCESS), answer.reps_completed

    def _reply(self, build: Callable[[], hv.HvRequest]) -> hypervisor_pb2.HvReply:
        _, result, reps = self._run(build)
        return hypervisor_pb2.HvReply(result=result, reps_completed=reps)

    # -- hypercalls ----------------------------------------------------------
    @grpc_errors
    def GetIommuCapabilities(self, request: hypervisor_pb2.GetIommuCapabilitiesRequest,
                             context: grpc.ServicerContext,
                             ) -> hypervisor_pb2.GetIommuCapabilitiesReply:
        answer, result, _ = self._run(lambda: hv.GetIommuCapabilitiesInput(request.partition_id))
        reply = hypervisor_pb2.GetIommuCapabilitiesReply(result=result)
        if answer is not None and isinstance(answer.output, hv.GetIommuCapabilitiesOutput):
            out = answer.output
            reply.size, reply.max_iova_width, reply.max_pasid_width = out.size, out.max_iova_width, out.max_pasid_width
            reply.iommu_cap, reply.pgsize_bitmap = out.iommu_cap, out.pgsize_bitmap
        return reply

    @grpc_errors
    def GetLogicalDeviceProperty(self, request: hypervisor_pb2.GetLogicalDevicePropertyRequest,
                                 context: grpc.ServicerContext,
                                 ) -> hypervisor_pb2.GetLogicalDevicePropertyReply:
        answer, result, _ = self._run(lambda: hv.GetLogicalDevicePropertyInput(
            request.partition_id, request.logical_device_id, request.code))
        reply = hypervisor_pb2.GetLogicalDevicePropertyReply(result=result)
        if answer is not None and isinstance(answer.output, hv.GetLogicalDevicePropertyOutput):
            reply.device_iommu = answer.output.device_iommu
        return reply

    @grpc_errors
    def CreateDeviceDomain(self, request: hypervisor_pb2.CreateDeviceDomainRequest,
                           context: grpc.ServicerContext,
                           ) -> hypervisor_pb2.HvReply:
        def build() -> hv.HvRequest:
            if request.flags & ~0x3:
                raise HvError(HvStatus.INVALID_PARAMETER, f"create flags {request.flags:#x} has undefined bits")
            return hv.CreateDeviceDomainInput(device_domain(request.device_domain),
                                              bool(request.flags & 1), bool(request.flags & 2))
        return self._reply(build)

    @grpc_errors
    def DeleteDeviceDomain(self, request: hypervisor_pb2.DeleteDeviceDomainRequest,
                           context: grpc.ServicerContext,
                           ) -> hypervisor_pb2.HvReply:
        return self._reply(lambda: hv.DeleteDeviceDomainInput(device_domain(request.device_domain)))

    @grpc_errors
    def AttachDeviceDomain(self, request: hypervisor_pb2.AttachDeviceDomainRequest,
                           context: grpc.ServicerContext,
                           ) -> hypervisor_pb2.HvReply:
        return self._reply(lambda: hv.AttachDeviceDomainInput(
            device_domain(request.device_domain), hv.HvDeviceId.from_u64(request.device_id)))

    @grpc_errors
    def DetachDeviceDomain(self, request: hypervisor_pb2.DetachDeviceDomainRequest,
                           context: grpc.ServicerContext,
                           ) -> hypervisor_pb2.HvReply:
        return self._reply(lambda: hv.DetachDeviceDomainInput(
            request.partition_id, hv.HvDeviceId.from_u64(request.device_id)))

    @grpc_errors
    def ConfigureDeviceDomain(self, request: hypervisor_pb2.ConfigureDeviceDomainRequest,
                              context: grpc.ServicerContext,
                              ) -> hypervisor_pb2.HvReply:
        s = request.settings
        return self._reply(lambda: hv.ConfigureDeviceDomainInput(
            device_domain(request.device_domain),
            hv.DeviceDomainSettings(s.translation_enabled, s.blocked, int(s.first_stage_paging_mode),
                                    Gpa(s.page_table_root))))

    @grpc_errors
    def FlushDeviceDomain(self, request: hypervisor_pb2.FlushDeviceDomainRequest,
                          context: grpc.ServicerContext,
                          ) -> hypervisor_pb2.HvReply:
        def build() -> hv.HvRequest:
            if request.flags:
                raise HvError(HvStatus.INVALID_PARAMETER, f"flush flags {request.flags:#x}: no flag is defined")
            return hv.FlushDeviceDomainInput(device_domain(request.device_domain))
        return self._reply(build)

    @grpc_errors
    def FlushDeviceDomainList(self, request: hypervisor_pb2.FlushDeviceDomainListRequest,
                              context: grpc.ServicerContext,
                              ) -> hypervisor_pb2.HvReply:
        def build() -> hv.HvRequest:
            if request.flags & ~hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT:
                raise HvError(HvStatus.INVALID_PARAMETER, f"flush-list flags {request.flags:#x} has undefined bits")
            if not 1 <= len(request.list) <= hv.HV_MAX_REP_COUNT:
                raise HvError(HvStatus.INVALID_HYPERCALL_INPUT, f"{len(request.list)} elements: 1..4095 allowed")
            header = hv.FlushDeviceDomainListHeader(device_domain(request.device_domain),
                                                    bool(request.flags & hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT))
            vas = tuple(hv.FlushVa(e.page_number, e.page_mask_shift) for e in request.list)
            return hv.FlushDeviceDomainListRequest(header, vas)
        return self._reply(build)

    @grpc_errors
    def MapDeviceGpaPages(self, request: hypervisor_pb2.MapDeviceGpaPagesRequest,
                          context: grpc.ServicerContext,
                          ) -> hypervisor_pb2.HvReply:
        def build() -> hv.HvRequest:
            if request.map_flags & ~int(hv.MapFlags.READABLE | hv.MapFlags.WRITABLE):
                raise HvError(HvStatus.INVALID_PARAMETER, f"map_flags {request.map_flags:#x} has undefined bits")
            if not 1 <= len(request.gpa_page_list) <= hv.HV_MAX_REP_COUNT:
                raise HvError(HvStatus.INVALID_HYPERCALL_INPUT,
                              f"{len(request.gpa_page_list)} pages: 1..4095 per call")
            header = hv.MapDeviceGpaPagesHeader(device_domain(request.device_domain),
                                                hv.MapFlags(request.map_flags), Iova(request.target_device_va_base))
            return hv.MapDeviceGpaPagesRequest(header, tuple(request.gpa_page_list))
        return self._reply(build)

    @grpc_errors
    def UnmapDeviceGpaPages(self, request: hypervisor_pb2.UnmapDeviceGpaPagesRequest,
                            context: grpc.ServicerContext,
                            ) -> hypervisor_pb2.HvReply:
        def build() -> hv.HvRequest:
            if not 1 <= request.page_count <= hv.HV_MAX_REP_COUNT:
                raise HvError(HvStatus.INVALID_HYPERCALL_INPUT, f"page_count {request.page_count}: 1..4095 allowed")
            return hv.UnmapDeviceGpaPagesRequest(
                hv.UnmapDeviceGpaPagesInput(device_domain(request.device_domain),
                                            Iova(request.target_device_va_base)), request.page_count)
        return self._reply(build)

    @grpc_errors
    def HvCall(self, request: hypervisor_pb2.HvCallRequest,
               context: grpc.ServicerContext,
               ) -> hypervisor_pb2.HvCallReply:
        answer = self.calls.raw_call(self._caller(), request.input_value, bytes(request.input))
        return hypervisor_pb2.HvCallReply(result_value=answer.result_value, output=answer.output,
                                          message=answer.message)

    # -- the guest's view of its hardware --------------------------------------
    @grpc_errors
    def ListDevices(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> hypervisor_pb2.ListDevicesReply:
        caller = self._caller()
        with self.host.lock:
            devs = [self.host.devices[d] for d in sorted(caller.devices) if d in self.host.devices]
        return hypervisor_pb2.ListDevicesReply(devices=[
            hypervisor_pb2.GuestDevice(logical_device_id=d.logical_device_id, name=d.name,
                                       control_address=d.control_address, pci_vendor_id=d.pci_vendor_id,
                                       pci_device_id=d.pci_device_id, behind_pviommu=True)
            for d in devs])

    @grpc_stream_errors
    async def StreamFaults(self, request: hypervisor_pb2.StreamFaultsRequest,
                           context: grpc.aio.ServicerContext[hypervisor_pb2.StreamFaultsRequest, hypervisor_pb2.Fault],
                           ) -> AsyncIterator[hypervisor_pb2.Fault]:
        caller = self._caller()
        log = caller.faults
        assert log is not None
        if not request.follow:
            for e in log.snapshot(request.after_sequence):
                yield fault_message(e)
            return
        async for e in follow_faults(log, request.after_sequence):
            yield fault_message(e)

    @grpc_errors
    def PageResponse(self, request: hypervisor_pb2.PageResponseRequest,
                     context: grpc.ServicerContext,
                     ) -> hypervisor_pb2.HvReply:
        caller = self._caller()
        try:
            self.host.answer_page_request(caller, request.logical_device_id, request.request_id, request.success)
        except HvError as exc:
            return hypervisor_pb2.HvReply(result=hv_result(exc.hv_status, str(exc)))
        return hypervisor_pb2.HvReply(result=hv_result(HvStatus.SUCCESS))

    @grpc_errors
    def GetTransports(self, request: common_pb2.Empty,
                      context: grpc.ServicerContext) -> hypervisor_pb2.TransportsReply:
        self._caller()
        return hypervisor_pb2.TransportsReply(
            session_socket=self.session_socket,
            hypercall_page_version=L.HCPAGE_VERSION if self.hcpage_sessions else 0,
            sessions_per_partition=self.hcpage_sessions,
            fault_ring_slots=L.FAULT_RING_SLOTS if self.fault_rings else 0)

    @grpc_errors
    def Ping(self, request: common_pb2.Empty, context: grpc.ServicerContext) -> common_pb2.Empty:
        return common_pb2.Empty()


