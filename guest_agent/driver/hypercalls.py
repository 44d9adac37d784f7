"""A thin typed client of the ``Hypervisor`` service: one method per hypercall.

Like Linux's ``hv_do_hypercall`` + ``hv_result_to_errno`` wrappers: the body
of every answer carries an ``HvResult``; a non-zero status becomes
``HypercallFailed`` here, so the driver above only sees success or an
exception that already names the call and the HV status. The partition is
always ``HV_PARTITION_ID_SELF``: the hypervisor takes the caller from the
bearer token, never from a field.

When the hypervisor advertises a hypercall page (``GetTransports``) and the
client holds the partition's token, every hypercall goes through the page:
the same raw ABI as ``HvCall``, in shared memory (docs/transports.md). A
page that cannot be opened, or that closes, falls back to the typed gRPC
methods; ``hypercall_page=False`` (the agent's ``--grpc-only``) never uses one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from guest_agent.errors import HypercallFailed
from pviommu.abi import hv
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Iova
from pviommu.errors import HvError, ServiceUnavailable
from pviommu.log import get_logger
from pviommu.rpc import hvproto
from pviommu.shm.faultring import FaultRingReader, RingClosed
from pviommu.shm.hcpage import HypercallPage, PageAnswer, PageClosed
from pviommu.shm.sessions import SessionError
from pviommu.v1 import common_pb2, hypervisor_pb2, hypervisor_pb2_grpc

log = get_logger("guest.hypercalls")

SELF = hv.HV_PARTITION_ID_SELF
#: Rep hypercalls take at most this many elements per call (rep count is 12 bits).
MAX_REPS = hv.HV_MAX_REP_COUNT
#: MapDeviceGpaPages reps whose input fits one 4 KiB input page (40-byte header, 8 bytes a page)
PAGE_MAP_REPS = (4096 - 40) // 8


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

    def __init__(self, channel: grpc.Channel, *, timeout: float = 10.0, token: str = "",
                 hypercall_page: bool = True) -> None:
        self.stub = _Guarded(hypervisor_pb2_grpc.HypervisorStub(channel))
        self.timeout = timeout
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._token = token
        self._want_page = hypercall_page and bool(token)
        self._shm_allowed = hypercall_page
        self._transports: hypervisor_pb2.TransportsReply | None = None
        self._page: HypercallPage | None = None
        self._page_lock = threading.Lock()
        #: why no page is used ("" while one is, or before the first call)
        self.page_note = "" if self._want_page else "gRPC only"

    # -- the hypercall page ------------------------------------------------------
    @property
    def transport(self) -> str:
        """``hypercall page`` or ``grpc`` (what the next call uses, as far as known)."""
        return "hypercall page" if self._page is not None and not self._page.closed else "grpc"

    def page(self) -> HypercallPage | None:
        """The hypercall page, opened on first use when advertised; None: use gRPC."""
        if not self._want_page:
            return None
        with self._page_lock:
            if self._page is not None and not self._page.closed:
                return self._page
            if self._page is not None:  # it closed: gRPC from now on (a reset guest gets a new token anyway)
                self._drop_page("closed by the hypervisor")
                return None
            self._want_page = False  # one attempt
            try:
                t = self.transports()
                if not t.session_socket or t.hypercall_page_version != 1:
                    self.page_note = "the hypervisor offers no hypercall page"
                    return None
                self._page = HypercallPage(t.session_socket, self._token, timeout=self.timeout)
                self._want_page = True
                self.page_note = ""
                log.info("hypercall_page.opened", socket=t.session_socket, session=self._page.session)
                return self._page
            except (ServiceUnavailable, SessionError, PageClosed, OSError) as exc:
                self.page_note = f"no hypercall page: {exc}"
                log.warning("hypercall_page.unavailable", error=str(exc))
                return None

    def transports(self) -> hypervisor_pb2.TransportsReply:
        """What the hypervisor offers beside gRPC (asked once)."""
        if self._transports is None:
            self._transports = self.stub.GetTransports(common_pb2.Empty(), timeout=self.timeout)
        return self._transports

    def open_fault_ring(self, after: int = 0) -> FaultRingReader | None:
        """This partition's fault ring when the hypervisor offers one (and this client may use
        shared memory); None: read the gRPC fault stream."""
        if not self._shm_allowed or not self._token:
            return None
        try:
            t = self.transports()
            if not t.session_socket or not t.fault_ring_slots:
                return None
            return FaultRingReader(t.session_socket, self._token, after=after, timeout=self.timeout)
        except (ServiceUnavailable, SessionError, RingClosed, OSError) as exc:
            log.warning("fault_ring.unavailable", error=str(exc))
            return None

    def _drop_page(self, why: str) -> None:
        page, self._page = self._page, None
        self._want_page = False
        self.page_note = f"hypercall page {why}"
        if page is not None:
            page.close()
        log.warning("hypercall_page.dropped", reason=why)

    def _raw(self, request: hv.HvRequest) -> PageAnswer | None:
        """Run ``request`` through the page; None when there is none (use gRPC)."""
        value, data = hv.encode_request(request)
        if len(data) > hv.HV_HYP_PAGE_SIZE:  # more reps than one input page holds: the typed method takes them
            return None
        return self._on_page(value.encode(), data)

    def _on_page(self, input_value: int, data: bytes) -> PageAnswer | None:
        page = self.page()
        if page is None:
            return None
        try:
            return page.call(input_value, data)
        except PageClosed as exc:  # the call did not run, or (a timeout) may have: both sides are idempotent
            with self._page_lock:
                if self._page is page:
                    self._drop_page(str(exc))
            return None

    def raw_call(self, input_value: int, data: bytes) -> PageAnswer:
        """One hypercall as the raw ABI has it (the input value and input block as given, checked by
        nobody here): on the page, else by gRPC ``HvCall``."""
        a = self._on_page(input_value, data)
        if a is not None:
            return a
        r = self.stub.HvCall(hypervisor_pb2.HvCallRequest(input_value=input_value, input=data), timeout=self.timeout)
        return PageAnswer(r.result_value, bytes(r.output), r.message)

    def close(self) -> None:
        with self._page_lock:
            page, self._page = self._page, None
            self._want_page = False
        if page is not None:
            page.close()

    # -- plumbing --------------------------------------------------------------
    def _call(self, request: hv.HvRequest) -> hvproto.Answer:
        """Run ``request`` on the hypercall page, or by its typed gRPC method (the same request,
        converted by ``pviommu.rpc.hvproto``) when there is no page or the input overflows it."""
        a = self._raw(request)
        if a is None:
            method = getattr(self.stub, hvproto.METHOD[request.CODE])
            return hvproto.answer_from_proto(method(hvproto.request_to_proto(request), timeout=self.timeout))
        output = hv.decode_output(request.CODE, a.output) if a.status == HvStatus.SUCCESS else None
        return hvproto.Answer(a.status, a.message, a.reps_completed, output)

    def _checked(self, request: hv.HvRequest) -> hvproto.Answer:
        """``_call``, raising ``HypercallFailed`` unless the answer is SUCCESS."""
        answer = self._call(request)
        self._count(hvproto.METHOD[request.CODE], answer.status, answer.message, answer.reps_completed)
        return answer

    def _count(self, call: str, status: int, message: str, reps: int = 0) -> None:
        with self._lock:
            self.counts[call] += 1
        if status != HvStatus.SUCCESS:
            self._refuse(call, status, message, reps)

    def _refuse(self, call: str, status: int, message: str, reps: int = 0) -> NoReturn:
        with self._lock:
            self.counts["refused"] += 1
        raise HypercallFailed(status, f"{call} refused: {HvStatus.name_of(status)}: {message}",
                              call=call, reps_completed=reps)

    @contextmanager
    def _building(self, request_type: type[hv.HvRequest]) -> Iterator[None]:
        """A request its own constructor refuses (an undefined flag bit, a rep count outside
        1..4095) is refused as the hypervisor would refuse it, with the same status."""
        try:
            yield
        except HvError as exc:
            call = hvproto.METHOD[request_type.CODE]
            with self._lock:
                self.counts[call] += 1
            self._refuse(call, exc.hv_status, str(exc))

    @staticmethod
    def _dd(domain_type: int, domain_id: int) -> hv.DeviceDomain:
        return hv.DeviceDomain(SELF, hv.DeviceDomainId(domain_type, domain_id))

    # -- detection -------------------------------------------------------------
    def get_iommu_capabilities(self) -> hv.GetIommuCapabilitiesOutput:
        out = self._checked(hv.GetIommuCapabilitiesInput(SELF)).output
        assert isinstance(out, hv.GetIommuCapabilitiesOutput)
        return out

    def get_logical_device_property(self, logical_device_id: int,
                                    code: int = hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU) -> int:
        out = self._checked(hv.GetLogicalDevicePropertyInput(SELF, logical_device_id, code)).output
        assert isinstance(out, hv.GetLogicalDevicePropertyOutput)
        return out.device_iommu

    def list_devices(self) -> list[GuestDeviceInfo]:
        r = self.stub.ListDevices(common_pb2.Empty(), timeout=self.timeout)
        return [GuestDeviceInfo(d.logical_device_id, d.name, d.control_address) for d in r.devices]

    # -- domains ---------------------------------------------------------------
    def create_domain(self, domain_type: int, domain_id: int, flags: int = 0) -> None:
        with self._building(hv.CreateDeviceDomainInput):
            request = hv.CreateDeviceDomainInput.from_flags(self._dd(domain_type, domain_id), flags)
        self._checked(request)

    def delete_domain(self, domain_type: int, domain_id: int) -> None:
        self._checked(hv.DeleteDeviceDomainInput(self._dd(domain_type, domain_id)))

    def configure_domain(self, domain_type: int, domain_id: int, settings: hv.DeviceDomainSettings) -> None:
        self._checked(hv.ConfigureDeviceDomainInput(self._dd(domain_type, domain_id), settings))

    def attach(self, domain_type: int, domain_id: int, device_id: int,
               accept: frozenset[HvStatus] = frozenset({HvStatus.SUCCESS})) -> HvStatus:
        """ATTACH; returns the status when it is one of ``accept`` (a revision's driver decides
        which count as attached), raises ``HypercallFailed`` otherwise."""
        a = self._call(hv.AttachDeviceDomainInput(self._dd(domain_type, domain_id), hv.HvDeviceId.from_u64(device_id)))
        if a.status != HvStatus.SUCCESS and a.status in accept:
            self._count("AttachDeviceDomain", HvStatus.SUCCESS, "")
            return HvStatus(a.status)
        self._count("AttachDeviceDomain", a.status, a.message)
        return HvStatus.SUCCESS

    def detach(self, device_id: int) -> None:
        self._checked(hv.DetachDeviceDomainInput(SELF, hv.HvDeviceId.from_u64(device_id)))

    # -- IOTLB -------------------------------------------------------------------
    def flush_domain(self, domain_type: int, domain_id: int) -> None:
        self._checked(hv.FlushDeviceDomainInput(self._dd(domain_type, domain_id)))

    def flush_domain_list(self, domain_type: int, domain_id: int, ranges: Sequence[tuple[int, int]], *,
                          flags: int = hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT) -> int:
        """One rep call: ``ranges`` are the (page_number, page_mask_shift) rep elements (the rep
        count is their number, the start index 0); returns the reps completed."""
        if not ranges:  # v1's PAGE_ALIGN corner case sends an empty list: the hypervisor judges rep count 0
            with self._building(hv.FlushDeviceDomainListRequest):
                header = hv.FlushDeviceDomainListHeader.from_flags(self._dd(domain_type, domain_id), flags)
            value = hv.HypercallInput(hv.HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, rep_count=0)
            a = self.raw_call(value.encode(), header.pack())
            self._count(hvproto.METHOD[hv.HvCallCode.FLUSH_DEVICE_DOMAIN_LIST], a.status, a.message, a.reps_completed)
            return a.reps_completed
        with self._building(hv.FlushDeviceDomainListRequest):
            request = hv.FlushDeviceDomainListRequest(
                hv.FlushDeviceDomainListHeader.from_flags(self._dd(domain_type, domain_id), flags),
                tuple(hv.FlushVa(p, sh) for p, sh in ranges))
        return self._checked(request).reps_completed

    # -- baseline (map by hypercall) -------------------------------------------
    def map_gpa_pages(self, domain_id: int, map_flags: int, va_base: int, gpa_pages: Sequence[int]) -> None:
        """MapDeviceGpaPages in chunks of at most 4095 reps (on the page: as many as its input page holds)."""
        step = PAGE_MAP_REPS if self.page() is not None else MAX_REPS
        for i in range(0, len(gpa_pages), step):
            with self._building(hv.MapDeviceGpaPagesRequest):
                request = hv.MapDeviceGpaPagesRequest(hv.MapDeviceGpaPagesHeader(
                    self._dd(hv.DeviceDomainType.S2, domain_id), map_flags, Iova(va_base + (i << 12))),
                    tuple(gpa_pages[i:i + step]))
            self._checked(request)

    def unmap_gpa_pages(self, domain_id: int, va_base: int, page_count: int) -> None:
        for done in range(0, page_count, MAX_REPS):
            self._checked(hv.UnmapDeviceGpaPagesRequest(hv.UnmapDeviceGpaPagesInput(
                self._dd(hv.DeviceDomainType.S2, domain_id), Iova(va_base + (done << 12))),
                min(MAX_REPS, page_count - done)))

    def page_response(self, logical_device_id: int, request_id: int, success: bool) -> None:
        r = self.stub.PageResponse(hypervisor_pb2.PageResponseRequest(
            logical_device_id=logical_device_id, request_id=request_id, success=success), timeout=self.timeout)
        self._count("PageResponse", r.result.status, r.result.message)

    # -- faults ------------------------------------------------------------------
    def stream_faults(self, follow: bool, after: int = 0) -> Iterator[hypervisor_pb2.Fault]:
        """The hypervisor's fault log of this partition (a gRPC stream; cancel to stop)."""
        stream: Iterator[hypervisor_pb2.Fault] = self.stub.StreamFaults(
            hypervisor_pb2.StreamFaultsRequest(after_sequence=after, follow=follow))
        return stream
