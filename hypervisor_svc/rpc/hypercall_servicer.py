"""The guest-facing ``pviommu.v1.Hypervisor`` service: hypercalls over gRPC.

Glue only: turn the message into the ``pviommu.abi.hv`` request
(``pviommu.rpc.hvproto``, the one conversion, whose constructors check what
the raw decoder checks), run ``Hypercalls.dispatch`` for the partition the
credential names, turn the answer into the reply. A judged hypercall is
always gRPC OK with the HV status in the body (as a real hypercall always
returns a status); a call that cannot be attributed (no or bad credential,
or a non-partition credential) is a gRPC error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from hypervisor_svc.core.faults import FaultEntry, FaultLog
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from hypervisor_svc.core.model import Partition
from pviommu.abi import shm as L
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError, PviommuError
from pviommu.rpc import hvproto
from pviommu.rpc.auth import require
from pviommu.rpc.feeds import AsyncFeed
from pviommu.rpc.hvproto import hv_result
from pviommu.rpc.status import grpc_errors, grpc_stream_errors
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc

R = TypeVar("R", bound=hvproto.TypedReply)


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

    def _answer(self, request: hvproto.TypedRequest) -> hvproto.Answer:
        """Run a typed hypercall: the message becomes the hv request the raw decoder would give
        (the hv constructors check every field), then the handler runs."""
        caller = self._caller()
        try:
            answer = self.calls.dispatch(caller, hvproto.request_from_proto(request))
        except HvError as exc:
            self.host.counters.count(f"hv_status_{int(exc.hv_status):#x}")
            return hvproto.Answer(exc.hv_status, str(exc), exc.reps_completed)
        except PviommuError as exc:
            return hvproto.Answer(exc.hv_status, str(exc))
        return hvproto.Answer(HvStatus.SUCCESS, reps_completed=answer.reps_completed, output=answer.output)

    def _typed(self, request: hvproto.TypedRequest, reply_type: type[R]) -> R:
        reply = hvproto.reply_to_proto(hvproto.code_of(request), self._answer(request))
        assert isinstance(reply, reply_type)
        return reply

    # -- hypercalls ----------------------------------------------------------
    @grpc_errors
    def GetIommuCapabilities(self, request: hypervisor_pb2.GetIommuCapabilitiesRequest,
                             context: grpc.ServicerContext) -> hypervisor_pb2.GetIommuCapabilitiesReply:
        return self._typed(request, hypervisor_pb2.GetIommuCapabilitiesReply)

    @grpc_errors
    def GetLogicalDeviceProperty(self, request: hypervisor_pb2.GetLogicalDevicePropertyRequest,
                                 context: grpc.ServicerContext) -> hypervisor_pb2.GetLogicalDevicePropertyReply:
        return self._typed(request, hypervisor_pb2.GetLogicalDevicePropertyReply)

    @grpc_errors
    def CreateDeviceDomain(self, request: hypervisor_pb2.CreateDeviceDomainRequest,
                           context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def DeleteDeviceDomain(self, request: hypervisor_pb2.DeleteDeviceDomainRequest,
                           context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def AttachDeviceDomain(self, request: hypervisor_pb2.AttachDeviceDomainRequest,
                           context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def DetachDeviceDomain(self, request: hypervisor_pb2.DetachDeviceDomainRequest,
                           context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def ConfigureDeviceDomain(self, request: hypervisor_pb2.ConfigureDeviceDomainRequest,
                              context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def FlushDeviceDomain(self, request: hypervisor_pb2.FlushDeviceDomainRequest,
                          context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def FlushDeviceDomainList(self, request: hypervisor_pb2.FlushDeviceDomainListRequest,
                              context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def MapDeviceGpaPages(self, request: hypervisor_pb2.MapDeviceGpaPagesRequest,
                          context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

    @grpc_errors
    def UnmapDeviceGpaPages(self, request: hypervisor_pb2.UnmapDeviceGpaPagesRequest,
                            context: grpc.ServicerContext) -> hypervisor_pb2.HvReply:
        return self._typed(request, hypervisor_pb2.HvReply)

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


