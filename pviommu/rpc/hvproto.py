"""The one translation between the typed ``pviommu.v1.Hypervisor`` messages and ``pviommu.abi.hv``.

Both ways, for every typed hypercall: the servicer turns a request message into the hv request the
raw decoder would give and an answer into the reply; the guest's client turns its hv request into the
message of its gRPC fallback and the reply back into an answer. Nothing here checks a field: the hv
constructors do (one validator per field, the raw decoder's), so a typed call and ``HvCall`` answer
one status for one bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from pviommu.errors import HvError
from pviommu.v1 import common_pb2
from pviommu.v1 import hypervisor_pb2 as pb

Code = hv.HvCallCode

TypedRequest = (
    pb.GetIommuCapabilitiesRequest
    | pb.GetLogicalDevicePropertyRequest
    | pb.CreateDeviceDomainRequest
    | pb.DeleteDeviceDomainRequest
    | pb.AttachDeviceDomainRequest
    | pb.DetachDeviceDomainRequest
    | pb.ConfigureDeviceDomainRequest
    | pb.FlushDeviceDomainRequest
    | pb.FlushDeviceDomainListRequest
    | pb.MapDeviceGpaPagesRequest
    | pb.UnmapDeviceGpaPagesRequest
)
TypedReply = pb.GetIommuCapabilitiesReply | pb.GetLogicalDevicePropertyReply | pb.HvReply

#: the typed gRPC method of each call (also the call's name in the guest's counters and errors)
METHOD: Mapping[hv.HvCallCode, str] = MappingProxyType({
    Code.GET_IOMMU_CAPABILITIES: "GetIommuCapabilities",
    Code.GET_LOGICAL_DEVICE_PROPERTY: "GetLogicalDeviceProperty",
    Code.CREATE_DEVICE_DOMAIN: "CreateDeviceDomain",
    Code.DELETE_DEVICE_DOMAIN: "DeleteDeviceDomain",
    Code.ATTACH_DEVICE_DOMAIN: "AttachDeviceDomain",
    Code.DETACH_DEVICE_DOMAIN: "DetachDeviceDomain",
    Code.CONFIGURE_DEVICE_DOMAIN: "ConfigureDeviceDomain",
    Code.FLUSH_DEVICE_DOMAIN: "FlushDeviceDomain",
    Code.FLUSH_DEVICE_DOMAIN_LIST: "FlushDeviceDomainList",
    Code.MAP_DEVICE_GPA_PAGES: "MapDeviceGpaPages",
    Code.UNMAP_DEVICE_GPA_PAGES: "UnmapDeviceGpaPages",
})


@dataclass(frozen=True)
class Answer:
    """A judged hypercall, whichever transport carried it: the HV status, why (refusals), the
    reps completed, and the output (calls that have one, on success only)."""

    status: int
    message: str = ""
    reps_completed: int = 0
    output: hv.HvOutput | None = None

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS


def hv_result(status: int, message: str = "") -> common_pb2.HvResult:
    return common_pb2.HvResult(status=status, status_name=HvStatus.name_of(status), message=message)


# -- building blocks -----------------------------------------------------------------------------
def device_domain_from_proto(m: pb.DeviceDomain) -> hv.DeviceDomain:
    return hv.DeviceDomain(partition_id=m.partition_id, domain_id=hv.DeviceDomainId(m.domain_type, m.domain_id),
                           owner_vtl=hv.HvInputVtl.from_u8(m.owner_vtl, "owner_vtl"))


def device_domain_to_proto(dd: hv.DeviceDomain) -> pb.DeviceDomain:
    return pb.DeviceDomain(partition_id=dd.partition_id, owner_vtl=dd.owner_vtl.to_u8(),
                           domain_type=dd.domain_id.type, domain_id=dd.domain_id.id)


def _dd(m: Any) -> hv.DeviceDomain:
    return device_domain_from_proto(m.device_domain)


# -- proto request -> hv request (the servicer) ---------------------------------------------------
def _flush_list(m: pb.FlushDeviceDomainListRequest) -> hv.HvRequest:
    hv.check_reps(Code.FLUSH_DEVICE_DOMAIN_LIST.name, len(m.list))  # first, as the raw decoder reads it first
    header = hv.FlushDeviceDomainListHeader.from_flags(_dd(m), m.flags)
    return hv.FlushDeviceDomainListRequest(header, tuple(hv.FlushVa(e.page_number, e.page_mask_shift)
                                                         for e in m.list))


def _map(m: pb.MapDeviceGpaPagesRequest) -> hv.HvRequest:
    hv.check_reps(Code.MAP_DEVICE_GPA_PAGES.name, len(m.gpa_page_list))
    header = hv.MapDeviceGpaPagesHeader(_dd(m), m.map_flags, Iova(m.target_device_va_base))
    return hv.MapDeviceGpaPagesRequest(header, tuple(m.gpa_page_list))


def _unmap(m: pb.UnmapDeviceGpaPagesRequest) -> hv.HvRequest:
    hv.check_reps(Code.UNMAP_DEVICE_GPA_PAGES.name, m.page_count)
    return hv.UnmapDeviceGpaPagesRequest(hv.UnmapDeviceGpaPagesInput(_dd(m), Iova(m.target_device_va_base)),
                                         m.page_count)


def _configure(m: pb.ConfigureDeviceDomainRequest) -> hv.HvRequest:
    s = m.settings
    return hv.ConfigureDeviceDomainInput(_dd(m), hv.DeviceDomainSettings(
        s.translation_enabled, s.blocked, int(s.first_stage_paging_mode), Gpa(s.page_table_root)))


_FROM_PROTO: Mapping[type[Any], tuple[hv.HvCallCode, Callable[[Any], hv.HvRequest]]] = MappingProxyType({
    pb.GetIommuCapabilitiesRequest: (Code.GET_IOMMU_CAPABILITIES,
                                     lambda m: hv.GetIommuCapabilitiesInput(m.partition_id)),
    pb.GetLogicalDevicePropertyRequest: (Code.GET_LOGICAL_DEVICE_PROPERTY, lambda m: hv.GetLogicalDevicePropertyInput(
        m.partition_id, m.logical_device_id, m.code)),
    pb.CreateDeviceDomainRequest: (Code.CREATE_DEVICE_DOMAIN,
                                   lambda m: hv.CreateDeviceDomainInput.from_flags(_dd(m), m.flags)),
    pb.DeleteDeviceDomainRequest: (Code.DELETE_DEVICE_DOMAIN, lambda m: hv.DeleteDeviceDomainInput(_dd(m))),
    pb.AttachDeviceDomainRequest: (Code.ATTACH_DEVICE_DOMAIN, lambda m: hv.AttachDeviceDomainInput(
        _dd(m), hv.HvDeviceId.from_u64(m.device_id))),
    pb.DetachDeviceDomainRequest: (Code.DETACH_DEVICE_DOMAIN, lambda m: hv.DetachDeviceDomainInput(
        m.partition_id, hv.HvDeviceId.from_u64(m.device_id))),
    pb.ConfigureDeviceDomainRequest: (Code.CONFIGURE_DEVICE_DOMAIN, _configure),
    pb.FlushDeviceDomainRequest: (Code.FLUSH_DEVICE_DOMAIN,
                                  lambda m: hv.FlushDeviceDomainInput.from_flags(_dd(m), m.flags)),
    pb.FlushDeviceDomainListRequest: (Code.FLUSH_DEVICE_DOMAIN_LIST, _flush_list),
    pb.MapDeviceGpaPagesRequest: (Code.MAP_DEVICE_GPA_PAGES, _map),
    pb.UnmapDeviceGpaPagesRequest: (Code.UNMAP_DEVICE_GPA_PAGES, _unmap),
})


def code_of(m: TypedRequest) -> hv.HvCallCode:
    return _FROM_PROTO[type(m)][0]


def request_from_proto(m: TypedRequest) -> hv.HvRequest:
    """The hv request a typed message stands for, or HvError with the status the raw path gives
    (a value wider than its C field, such as a domain type above 15, is INVALID_PARAMETER)."""
    try:
        return _FROM_PROTO[type(m)][1](m)
    except ValueError as exc:
        raise HvError(HvStatus.INVALID_PARAMETER, str(exc)) from exc


# -- hv request -> proto request (the guest's gRPC fallback) --------------------------------------
def request_to_proto(r: hv.HvRequest) -> TypedRequest:
    """The typed message of ``r``; ValueError for what no typed message carries (a rep start, a
    target VTL): such a request goes by ``HvCall`` only."""
    if isinstance(r, hv.HvRepRequest) and r.rep_start:
        raise ValueError(f"{r.CODE.name}: the typed message has no rep start (got {r.rep_start})")
    match r:
        case hv.GetIommuCapabilitiesInput():
            return pb.GetIommuCapabilitiesRequest(partition_id=r.partition_id)
        case hv.GetLogicalDevicePropertyInput():
            return pb.GetLogicalDevicePropertyRequest(partition_id=r.partition_id,
                                                      logical_device_id=r.logical_device_id, code=r.code)
        case hv.CreateDeviceDomainInput():
            return pb.CreateDeviceDomainRequest(device_domain=device_domain_to_proto(r.device_domain), flags=r.flags)
        case hv.DeleteDeviceDomainInput():
            return pb.DeleteDeviceDomainRequest(device_domain=device_domain_to_proto(r.device_domain))
        case hv.AttachDeviceDomainInput():
            return pb.AttachDeviceDomainRequest(device_domain=device_domain_to_proto(r.device_domain),
                                                device_id=r.device_id.to_u64())
        case hv.DetachDeviceDomainInput():
            return pb.DetachDeviceDomainRequest(partition_id=r.partition_id, device_id=r.device_id.to_u64())
        case hv.ConfigureDeviceDomainInput():
            s = r.settings
            return pb.ConfigureDeviceDomainRequest(
                device_domain=device_domain_to_proto(r.device_domain),
                settings=pb.DeviceDomainSettings(translation_enabled=s.translation_enabled, blocked=s.blocked,
                                                 first_stage_paging_mode=bool(s.first_stage_paging_mode),
                                                 page_table_root=s.page_table_root))
        case hv.FlushDeviceDomainInput():
            return pb.FlushDeviceDomainRequest(device_domain=device_domain_to_proto(r.device_domain), flags=0)
        case hv.FlushDeviceDomainListRequest():
            return pb.FlushDeviceDomainListRequest(
                device_domain=device_domain_to_proto(r.header.device_domain), flags=r.header.flags,
                list=[pb.FlushVa(page_number=va.page_number, page_mask_shift=va.page_mask_shift)
                      for va in r.flush_vas])
        case hv.MapDeviceGpaPagesRequest():
            h = r.header
            if h.target_vtl != hv.HvInputVtl():
                raise ValueError("MAP_DEVICE_GPA_PAGES: the typed message has no target_vtl")
            return pb.MapDeviceGpaPagesRequest(
                device_domain=device_domain_to_proto(h.device_domain), map_flags=h.map_flags,
                target_device_va_base=h.target_device_va_base, gpa_page_list=list(r.gpa_page_list))
        case hv.UnmapDeviceGpaPagesRequest():
            return pb.UnmapDeviceGpaPagesRequest(device_domain=device_domain_to_proto(r.input.device_domain),
                                                 target_device_va_base=r.input.target_device_va_base,
                                                 page_count=r.rep_count)
    raise TypeError(f"not a typed hypercall: {type(r).__name__}")


# -- answers and replies --------------------------------------------------------------------------
def reply_to_proto(code: hv.HvCallCode, a: Answer) -> TypedReply:
    """The typed reply of call ``code`` (the servicer): the result, and the output fields on success."""
    result = hv_result(a.status, a.message)
    out = a.output
    if code == Code.GET_IOMMU_CAPABILITIES:
        caps = pb.GetIommuCapabilitiesReply(result=result)
        if isinstance(out, hv.GetIommuCapabilitiesOutput):
            caps.size, caps.max_iova_width, caps.max_pasid_width = out.size, out.max_iova_width, out.max_pasid_width
            caps.iommu_cap, caps.pgsize_bitmap = out.iommu_cap, out.pgsize_bitmap
        return caps
    if code == Code.GET_LOGICAL_DEVICE_PROPERTY:
        prop = pb.GetLogicalDevicePropertyReply(result=result)
        if isinstance(out, hv.GetLogicalDevicePropertyOutput):
            prop.device_iommu = out.device_iommu
        return prop
    return pb.HvReply(result=result, reps_completed=a.reps_completed)


def answer_from_proto(reply: TypedReply) -> Answer:
    """The answer a typed reply carries (the guest's client); the output only on success."""
    status, message = int(reply.result.status), reply.result.message
    if isinstance(reply, pb.HvReply):
        return Answer(status, message, int(reply.reps_completed))
    if status != HvStatus.SUCCESS:
        return Answer(status, message)
    if isinstance(reply, pb.GetIommuCapabilitiesReply):
        return Answer(status, message, output=hv.GetIommuCapabilitiesOutput(
            reply.max_iova_width, reply.max_pasid_width, reply.iommu_cap, reply.pgsize_bitmap, size=reply.size))
    return Answer(status, message, output=hv.GetLogicalDevicePropertyOutput(reply.device_iommu))
