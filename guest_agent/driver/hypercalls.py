"""A thin typed client of the ``Hypervisor`` service: one method per hypercall.

Like Linux's ``hv_do_hypercall`` + ``hv_result_to_errno`` wrappers: the body
of every answer carries an ``HvResult``; a non-zero status becomes
``HypercallFailed`` here, so the driver above only sees success or an
exception that already names the call and the HV status. The partition is
always ``HV_PARTITION_ID_SELF``: the hypervisor takes the caller from the
bearer token, never from a field.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from guest_agent.errors import HypercallFailed
from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import ServiceUnavailable
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc

SELF = hv.HV_PARTITION_ID_SELF
#: Rep hypercalls take at most this many elements per call (rep count is 12 bits).
MAX_REPS = 4095


@dataclass(frozen=True)
class IommuCaps:
    """``hv_output_get_iommu_capabilities`` as the driver reads it."""

    max_iova_width: int
    max_pasid_width: int
    iommu_cap: int
    pgsize_bitmap: int

    def has(self, bit: hv.IommuCap) -> bool:
        return bool(self.iommu_cap & bit)


@dataclass(frozen=True)
class DomainSettings:
    """``hv_device_domain_settings``."""

    translation_enabled: bool
    blocked: bool = False
    five_level: bool = False
    page_table_root: int = 0


@dataclass(frozen=True)
class GuestDeviceInfo:
    """A device VMBus would offer the guest."""

    logical_device_id: int
    name: str
    control_address: str


class _Guarded:
    """A stub whose calls raise ``ServiceUnavailable`` (gRPC UNAVAILABLE to our
    own callers, naming the hypervisor) when the hypervisor does not answer,
    instead of leaking a raw RpcError that would surface as UNKNOWN."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except grpc.RpcError as exc:
                code = exc.code()
                raise ServiceUnavailable(
                    f"the hypervisor did not answer {name}: {code.name if code else '?'}: {exc.details()}"
                ) from exc

        return call


class HvClient:
    """Hypercalls of this partition. Thread-safe (gRPC stubs are)."""

    def __init__(self, channel: grpc.Channel, *, timeout: float = 10.0) -> None:
        self.stub = _Guarded(hypervisor_pb2_grpc.HypervisorStub(channel))
        self.timeout = timeout
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------
    def _check(self, call: str, result: common_pb2.HvResult, reps: int = 0) -> None:
        with self._lock:
            self.counts[call] += 1
        if result.status != HvStatus.SUCCESS:
            with self._lock:
                self.counts["refused"] += 1
            raise HypercallFailed(
                result.status,
                f"{call} refused: {result.status_name or HvStatus.name_of(result.status)}: {result.message}",
                call=call, reps_completed=reps,
            )

    @staticmethod
    def _dd(domain_type: int, domain_id: int) -> hypervisor_pb2.DeviceDomain:
        return hypervisor_pb2.DeviceDomain(partition_id=SELF, owner_vtl=0, domain_type=domain_type,
                                           domain_id=domain_id)

    # -- detection -------------------------------------------------------------
    def get_iommu_capabilities(self) -> IommuCaps:
        r = self.stub.GetIommuCapabilities(hypervisor_pb2.GetIommuCapabilitiesRequest(partition_id=SELF),
                                           timeout=self.timeout)
        self._check("GetIommuCapabilities", r.result)
        return IommuCaps(r.max_iova_width, r.max_pasid_width, r.iommu_cap, r.pgsize_bitmap)

    def get_logical_device_property(self, logical_device_id: int,
                                    code: int = hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU) -> int:
        r = self.stub.GetLogicalDeviceProperty(hypervisor_pb2.GetLogicalDevicePropertyRequest(
            partition_id=SELF, logical_device_id=logical_device_id, code=code), timeout=self.timeout)
        self._check("GetLogicalDeviceProperty", r.result)
        return int(r.device_iommu)

    def list_devices(self) -> list[GuestDeviceInfo]:
        r = self.stub.ListDevices(common_pb2.Empty(), timeout=self.timeout)
        return [GuestDeviceInfo(d.logical_device_id, d.name, d.control_address) for d in r.devices]

    # -- domains ---------------------------------------------------------------
    def create_domain(self, domain_type: int, domain_id: int, flags: int = 0) -> None:
        r = self.stub.CreateDeviceDomain(hypervisor_pb2.CreateDeviceDomainRequest(
            device_domain=self._dd(domain_type, domain_id), flags=flags), timeout=self.timeout)
        self._check("CreateDeviceDomain", r.result)

    def delete_domain(self, domain_type: int, domain_id: int) -> None:
        r = self.stub.DeleteDeviceDomain(hypervisor_pb2.DeleteDeviceDomainRequest(
            device_domain=self._dd(domain_type, domain_id)), timeout=self.timeout)
        self._check("DeleteDeviceDomain", r.result)

    def configure_domain(self, domain_type: int, domain_id: int, settings: DomainSettings) -> None:
        s = hypervisor_pb2.DeviceDomainSettings(
            translation_enabled=settings.translation_enabled, blocked=settings.blocked,
            first_stage_paging_mode=settings.five_level, page_table_root=settings.page_table_root)
        r = self.stub.ConfigureDeviceDomain(hypervisor_pb2.ConfigureDeviceDomainRequest(
            device_domain=self._dd(domain_type, domain_id), settings=s), timeout=self.timeout)
        self._check("ConfigureDeviceDomain", r.result)

    def attach(self, domain_type: int, domain_id: int, device_id: int,
               accept: frozenset[HvStatus] = frozenset({HvStatus.SUCCESS})) -> HvStatus:
        """ATTACH; returns the status when it is one of ``accept`` (a revision's driver decides
        which count as attached), raises ``HypercallFailed`` otherwise."""
        r = self.stub.AttachDeviceDomain(hypervisor_pb2.AttachDeviceDomainRequest(
            device_domain=self._dd(domain_type, domain_id), device_id=device_id), timeout=self.timeout)
        if r.result.status != HvStatus.SUCCESS and r.result.status in accept:
            with self._lock:
                self.counts["AttachDeviceDomain"] += 1
            return HvStatus(r.result.status)
        self._check("AttachDeviceDomain", r.result)
        return HvStatus.SUCCESS

    def detach(self, device_id: int) -> None:
        r = self.stub.DetachDeviceDomain(hypervisor_pb2.DetachDeviceDomainRequest(
            partition_id=SELF, device_id=device_id), timeout=self.timeout)
        self._check("DetachDeviceDomain", r.result)

    # -- IOTLB -------------------------------------------------------------------
    def flush_domain(self, domain_type: int, domain_id: int) -> None:
        r = self.stub.FlushDeviceDomain(hypervisor_pb2.FlushDeviceDomainRequest(
            device_domain=self._dd(domain_type, domain_id), flags=0), timeout=self.timeout)
        self._check("FlushDeviceDomain", r.result)

    def flush_domain_list(self, domain_type: int, domain_id: int, ranges: Sequence[tuple[int, int]], *,
                          flags: int = hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT) -> int:
        """One rep call: ``ranges`` are the (page_number, page_mask_shift) rep elements (the rep
        count is their number, the start index 0); returns the reps completed."""
        r = self.stub.FlushDeviceDomainList(hypervisor_pb2.FlushDeviceDomainListRequest(
            device_domain=self._dd(domain_type, domain_id), flags=flags,
            list=[hypervisor_pb2.FlushVa(page_number=p, page_mask_shift=s) for p, s in ranges]),
            timeout=self.timeout)
        self._check("FlushDeviceDomainList", r.result, r.reps_completed)
        return int(r.reps_completed)

    # -- baseline (map by hypercall) -------------------------------------------
    def map_gpa_pages(self, domain_id: int, map_flags: int, va_base: int, gpa_pages: Sequence[int]) -> None:
        """MapDeviceGpaPages in chunks of at most 4095 reps."""
        for i in range(0, len(gpa_pages), MAX_REPS):
            chunk = gpa_pages[i:i + MAX_REPS]
            r = self.stub.MapDeviceGpaPages(hypervisor_pb2.MapDeviceGpaPagesRequest(
                device_domain=self._dd(hv.DeviceDomainType.S2, domain_id), map_flags=map_flags,
                target_device_va_base=va_base + (i << 12), gpa_page_list=list(chunk)), timeout=self.timeout)
            self._check("MapDeviceGpaPages", r.result, r.reps_completed)

    def unmap_gpa_pages(self, domain_id: int, va_base: int, page_count: int) -> None:
        done = 0
        while done < page_count:
            n = min(MAX_REPS, page_count - done)
            r = self.stub.UnmapDeviceGpaPages(hypervisor_pb2.UnmapDeviceGpaPagesRequest(
                device_domain=self._dd(hv.DeviceDomainType.S2, domain_id),
                target_device_va_base=va_base + (done << 12), page_count=n), timeout=self.timeout)
            self._check("UnmapDeviceGpaPages", r.result, r.reps_completed)
            done += n

    def page_response(self, logical_device_id: int, request_id: int, success: bool) -> None:
        r = self.stub.PageResponse(hypervisor_pb2.PageResponseRequest(
            logical_device_id=logical_device_id, request_id=request_id, success=success), timeout=self.timeout)
        self._check("PageResponse", r.result)

    # -- faults ------------------------------------------------------------------
    def stream_faults(self, follow: bool, after: int = 0) -> Iterator[hypervisor_pb2.Fault]:
        """The hypervisor's fault log of this partition (a gRPC stream; cancel to stop)."""
        stream: Iterator[hypervisor_pb2.Fault] = self.stub.StreamFaults(
            hypervisor_pb2.StreamFaultsRequest(after_sequence=after, follow=follow))
        return stream
