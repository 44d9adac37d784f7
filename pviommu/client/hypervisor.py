"""The guest IOMMU hypercalls as a partition makes them.

Typed methods call the hypervisor's typed gRPC methods (one per hypercall)
and raise ``HvCallError`` when the answer is not HV_STATUS_SUCCESS (pass
``check=False`` to get the ``HvResult`` instead). ``call(request)`` sends a
``pviommu.abi.hv`` input structure through the raw ``HvCall`` ABI (packed
with the ABI's own encoders) and ``hvcall(input_value, data)`` sends bytes as
they are: both return the decoded result value and output and never raise
on an HV status, since the status is what raw tests look at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.client.errors import HvCallError
from pviommu.client.fmt import hex_repr
from pviommu.client.rpc import Endpoint
from pviommu.client.types import Capabilities, Fault, HvResult, OfferedDevice
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc

SELF = hv.HV_PARTITION_ID_SELF


@dataclass(frozen=True, repr=False)
class HvCallResult:
    """A raw hypercall's answer: the result value decoded, the output bytes
    and (for calls with output) the output structure decoded."""

    call_code: int
    status: int
    reps_completed: int
    output: bytes
    decoded: Any
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS

    @property
    def status_name(self) -> str:
        return HvStatus.name_of(self.status)

    def __repr__(self) -> str:
        return hex_repr(self, ("status", "reps_completed"))


class Hypervisor:
    """The ``pviommu.v1.Hypervisor`` service with a partition credential."""

    def __init__(self, address: str, token: str, *, name: str = "", partition_id: int = SELF,
                 timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self.address = address
        #: The partition_id every typed call names (HV_PARTITION_ID_SELF by default).
        self.partition_id = partition_id
        self.endpoint = Endpoint(address, token, what=name or f"hypervisor {address}", timeout=timeout,
                                 connect_timeout=connect_timeout)

    def __repr__(self) -> str:
        return f"Hypervisor(address={self.address!r}, partition_id={self.partition_id:#x})"

    @property
    def stub(self) -> hypervisor_pb2_grpc.HypervisorStub:
        return self.endpoint.stub(hypervisor_pb2_grpc.HypervisorStub)

    def close(self) -> None:
        self.endpoint.close()

    def _hv(self, method: str, request: Any, check: bool, what: str) -> HvResult:
        reply = self.endpoint.call(getattr(self.stub, method), request, what)
        result = HvResult.from_proto(reply.result, getattr(reply, "reps_completed", 0))
        if check and not result.ok:
            raise HvCallError(f"{what}: {result.message or result.status_name}", hv_status=result.status,
                              reps_completed=result.reps_completed, call=method)
        return result

    def _domain(self, domain_id: int, domain_type: int) -> hypervisor_pb2.DeviceDomain:
        return hypervisor_pb2.DeviceDomain(partition_id=self.partition_id, domain_type=domain_type,
                                           domain_id=domain_id)

    # -- typed hypercalls -----------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        reply = self.endpoint.call(self.stub.GetIommuCapabilities,
                                   hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=self.partition_id),
                                   "GetIommuCapabilities")
        if reply.result.status:
            raise HvCallError(f"GetIommuCapabilities: {reply.result.message or reply.result.status_name}",
                              hv_status=reply.result.status, call="GetIommuCapabilities")
        return Capabilities(reply.size, reply.max_iova_width, reply.max_pasid_width, reply.iommu_cap,
                            reply.pgsize_bitmap)

    def device_property(self, device_id: int, code: int = hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU) -> int:
        """GetLogicalDeviceProperty (default: the pv-IOMMU property, bit 0 = enabled)."""
        reply = self.endpoint.call(self.stub.GetLogicalDeviceProperty, hypervisor_pb2.GetLogicalDevicePropertyRequest(
            partition_id=self.partition_id, logical_device_id=device_id, code=code),
            f"GetLogicalDeviceProperty {device_id:#x}")
        if reply.result.status:
            raise HvCallError(f"GetLogicalDeviceProperty {device_id:#x}: "
                              f"{reply.result.message or reply.result.status_name}",
                              hv_status=reply.result.status, call="GetLogicalDeviceProperty")
        return int(reply.device_iommu)

    def create_domain(self, domain_id: int, *, domain_type: int = hv.DeviceDomainType.S1, flags: int = 0,
                      check: bool = True) -> HvResult:
        return self._hv("CreateDeviceDomain", hypervisor_pb2.CreateDeviceDomainRequest(
            device_domain=self._domain(domain_id, domain_type), flags=flags), check,
            f"CreateDeviceDomain {domain_id:#x}")

    def delete_domain(self, domain_id: int, *, domain_type: int = hv.DeviceDomainType.S1,
                      check: bool = True) -> HvResult:
        return self._hv("DeleteDeviceDomain", hypervisor_pb2.DeleteDeviceDomainRequest(
            device_domain=self._domain(domain_id, domain_type)), check, f"DeleteDeviceDomain {domain_id:#x}")

    def attach(self, domain_id: int, device_id: int, *, domain_type: int = hv.DeviceDomainType.S1,
               check: bool = True) -> HvResult:
        return self._hv("AttachDeviceDomain", hypervisor_pb2.AttachDeviceDomainRequest(
            device_domain=self._domain(domain_id, domain_type), device_id=device_id), check,
            f"AttachDeviceDomain {domain_id:#x} device {device_id:#x}")

    def detach(self, device_id: int, *, check: bool = True) -> HvResult:
        return self._hv("DetachDeviceDomain", hypervisor_pb2.DetachDeviceDomainRequest(
            partition_id=self.partition_id, device_id=device_id), check, f"DetachDeviceDomain {device_id:#x}")

    def configure(self, domain_id: int, *, translation_enabled: bool = True, blocked: bool = False,
                  five_level: bool = False, root: int = 0, domain_type: int = hv.DeviceDomainType.S1,
                  check: bool = True) -> HvResult:
        """ConfigureDeviceDomain: ``root`` is the GPA of the stage-1 root table."""
        settings = hypervisor_pb2.DeviceDomainSettings(translation_enabled=translation_enabled, blocked=blocked,
                                                       first_stage_paging_mode=five_level, page_table_root=root)
        return self._hv("ConfigureDeviceDomain", hypervisor_pb2.ConfigureDeviceDomainRequest(
            device_domain=self._domain(domain_id, domain_type), settings=settings), check,
            f"ConfigureDeviceDomain {domain_id:#x}")

    def flush(self, domain_id: int, *, domain_type: int = hv.DeviceDomainType.S1, check: bool = True) -> HvResult:
        return self._hv("FlushDeviceDomain", hypervisor_pb2.FlushDeviceDomainRequest(
            device_domain=self._domain(domain_id, domain_type)), check, f"FlushDeviceDomain {domain_id:#x}")

    def flush_list(self, domain_id: int, pages: Iterable[tuple[int, int] | int], *, iommu_format: bool = True,
                   domain_type: int = hv.DeviceDomainType.S1, check: bool = True) -> HvResult:
        """FlushDeviceDomainList over ``(page_number, page_mask_shift)`` pairs (or bare page numbers)."""
        items = [p if isinstance(p, tuple) else (p, 0) for p in pages]
        return self._hv("FlushDeviceDomainList", hypervisor_pb2.FlushDeviceDomainListRequest(
            device_domain=self._domain(domain_id, domain_type),
            flags=hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT if iommu_format else 0,
            list=[hypervisor_pb2.FlushVa(page_number=n, page_mask_shift=s) for n, s in items]), check,
            f"FlushDeviceDomainList {domain_id:#x}")

    def map_gpa_pages(self, domain_id: int, iova_base: int, gpa_pages: Iterable[int], *,
                      flags: int = hv.MapFlags.READABLE | hv.MapFlags.WRITABLE, check: bool = True) -> HvResult:
        """The baseline design's MapDeviceGpaPages (an S2 domain)."""
        return self._hv("MapDeviceGpaPages", hypervisor_pb2.MapDeviceGpaPagesRequest(
            device_domain=self._domain(domain_id, hv.DeviceDomainType.S2), map_flags=int(flags),
            target_device_va_base=iova_base, gpa_page_list=list(gpa_pages)), check,
            f"MapDeviceGpaPages {domain_id:#x}")

    def unmap_gpa_pages(self, domain_id: int, iova_base: int, count: int, *, check: bool = True) -> HvResult:
        return self._hv("UnmapDeviceGpaPages", hypervisor_pb2.UnmapDeviceGpaPagesRequest(
            device_domain=self._domain(domain_id, hv.DeviceDomainType.S2), target_device_va_base=iova_base,
            page_count=count), check, f"UnmapDeviceGpaPages {domain_id:#x}")

    # -- raw ABI --------------------------------------------------------------------------
    def hvcall(self, input_value: int, data: bytes = b"") -> HvCallResult:
        """``HvCall`` with the TLFS input value and packed input bytes as given."""
        reply = self.endpoint.call(self.stub.HvCall, hypervisor_pb2.HvCallRequest(input_value=input_value,
                                                                                  input=data),
                                   f"HvCall {input_value:#x}")
        result = hv.HypercallResult.decode(reply.result_value)
        code = input_value & 0xFFFF
        decoded = None
        if result.ok and reply.output:
            try:
                decoded = hv.decode_output(code, bytes(reply.output))
            except Exception:  # unknown code or a layout mismatch: the bytes are still there
                decoded = None
        return HvCallResult(code, result.status, result.reps_completed, bytes(reply.output), decoded, reply.message)

    def call(self, request: hv.HvRequest) -> HvCallResult:
        """A ``pviommu.abi.hv`` input structure (e.g. ``hv.GetIommuCapabilitiesInput()``)
        packed by the ABI's encoder and sent through ``HvCall``."""
        value, data = hv.encode_request(request)
        return self.hvcall(value.encode(), data)

    # -- the rest of the service ------------------------------------------------------------
    def devices(self) -> list[OfferedDevice]:
        """The devices offered to this partition (what VMBus would show)."""
        return [OfferedDevice.from_proto(d) for d in
                self.endpoint.call(self.stub.ListDevices, common_pb2.Empty(), "ListDevices").devices]

    def faults(self, after: int = 0) -> list[Fault]:
        return [Fault.from_proto(f) for f in self.endpoint.stream(
            self.stub.StreamFaults, hypervisor_pb2.StreamFaultsRequest(after_sequence=after, follow=False), "faults")]

    def ping(self) -> None:
        self.endpoint.call(self.stub.Ping, common_pb2.Empty(), "Ping")
