"""The agent: one guest's driver stack assembled, with one plain method per
API operation (the servicer only decodes and encodes around these).

Owns: the guest's RAM (its bank only), the page allocator, the IOMMU driver,
the DMA API and one DSA driver per device behind the pvIOMMU.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from guest_agent.dma.api import Direction, DmaApi, DmaMapping
from guest_agent.dma.pages import RESERVED_LOW, GuestMemory
from guest_agent.driver.domain import Domain, DomainKind, FlushMode, UnmapResult
from guest_agent.driver.hypercalls import HvClient
from guest_agent.driver.pviommu import DeviceState, PvIommu
from guest_agent.driver.stats import Stats
from guest_agent.dsa.dmatest import Dmatest, DmatestOutcome, DmatestParams, select_devices
from guest_agent.dsa.driver import DsaDriver, check_record_gpa, wait_completion
from guest_agent.errors import DeviceCommandFailed, InvalidRequest, NotFound
from guest_agent.sva import Sva, SvaTestResult, run_sva_test
from pviommu.abi.dsa import COMP_SIZE, CompletionRecord
from pviommu.abi.revision import DEFAULT_REVISION, Revision
from pviommu.abi.shm import FaultRecord
from pviommu.addr import PAGE_SIZE, Gpa, Iova
from pviommu.errors import PviommuError
from pviommu.log import get_logger
from pviommu.mem.bank import Bank, GuestRam
from pviommu.shm.faultring import FaultRingReader, RingClosed
from pviommu.v1 import hypervisor_pb2

log = get_logger("guest.agent")


def open_bank(path: str | Path) -> Bank:
    """Map this guest's own bank file (``bank-NNNNN.mem``; NNNNN = partition id)."""
    p = Path(path)
    m = re.search(r"(\d+)", p.stem)
    index = int(m.group(1)) if m else 0
    return Bank(p, index, p.stat().st_size)


@dataclass(frozen=True)
class SubmitResult:
    accepted: bool
    record: CompletionRecord | None


class Agent:
    """A guest's IOMMU driver, DMA layer and DSA drivers."""

    def __init__(self, hv_channel: grpc.Channel, token: str, bank: Bank, *, mode: FlushMode = FlushMode.STRICT,
                 allow_no_iommu: bool = False, reserved_low: int = RESERVED_LOW,
                 revision: Revision | str = DEFAULT_REVISION, hypercall_page: bool = True,
                 sva: bool = False) -> None:
        self.token = token
        self.bank = bank
        self.partition_id = bank.index
        self.ram = GuestRam(bank)
        self.memory = GuestMemory(self.ram, reserved_low=reserved_low)
        self.stats = Stats()
        self.hv = HvClient(hv_channel, token=token, hypercall_page=hypercall_page)
        self.iommu = PvIommu(self.hv, self.ram, self.memory.frames, self.stats, mode=mode,
                             allow_no_iommu=allow_no_iommu, revision=revision)
        self.dma = DmaApi(self.iommu, self.memory)
        #: the SVA proposal (``--proposal-sva``; None: the series' driver only)
        self.sva: Sva | None = Sva(self.hv, self.iommu, self.ram, self.memory.frames, self.stats) if sva else None
        self.dsa: dict[int, DsaDriver] = {}
        self._dsa_lock = threading.Lock()
        self._mappings: dict[tuple[int, int], DmaMapping] = {}  # (domain id, bus address) -> mapping
        #: the Prometheus registry of the service (main registers its collectors; empty in tests)
        self.metrics_registry = CollectorRegistry()
        self._map_lock = threading.Lock()
        self._closing = False
        self._fault_ring: FaultRingReader | None = None
        #: how page requests reach this agent: "fault ring", "grpc stream" ("" before start)
        self.page_request_transport = ""

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.iommu.init()
        if self.sva is not None and self.iommu.geometry is not None:
            self.sva.check()  # a clear error when the hypervisor does not offer the proposal
        if self.iommu.geometry is not None:
            self._prq = threading.Thread(target=self._page_requests, name="page-requests", daemon=True)
            self._prq.start()

    def _page_requests(self) -> None:
        """Serve the devices' BOF page requests (the guest's IOPF handler):
        map the faulting page when it lies in an on-demand range of the
        device's domain, then answer through the hypervisor. Reads the fault
        ring in shared memory when the hypervisor offers one, else the gRPC
        fault stream; runs until either ends (shutdown, reset, hypervisor gone).
        PASID-tagged records (the SVA proposal) go to the SVA handler."""
        ring = self.hv.open_fault_ring()
        if ring is not None:
            self._fault_ring = ring
            self.page_request_transport = "fault ring"
            try:
                while not self._closing:
                    for rec in ring.read(0.5):
                        if rec.pasid is not None:
                            if self.sva is not None:
                                self._sva_record(rec)
                        elif rec.page_request:
                            self._page_request(rec.logical_device_id, rec.request_id, rec.iova)
            except RingClosed as exc:
                if not self._closing:
                    log.warning("page_request.ring_ended", reason=exc.reason.name)
            except (ValueError, OSError):  # closed under us by close()
                pass
            return
        self.page_request_transport = "grpc stream"
        try:
            stream = self.hv.stream_faults(follow=True)
            self._prq_stream = stream
            for fault in stream:
                if fault.pasid_valid and self.sva is not None:  # the SVA proposal: answered by ProcessIommuPrq
                    self._sva_fault(fault)
                    continue
                if fault.page_request:
                    self._page_request(fault.logical_device_id, fault.request_id, fault.iova)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("page_request.stream_ended", error=exc.code().name)

    def _page_request(self, logical_device_id: int, request_id: int, iova: int) -> None:
        ok = False
        try:
            dev = self.iommu.device(logical_device_id)
            dom = dev.domain
            resolve = getattr(dom, "resolve_page_request", None)
            ok = bool(resolve(iova)) if resolve is not None else False
        except PviommuError as exc:
            log.warning("page_request.failed", device=logical_device_id, error=str(exc))
        self.stats.add("page_requests_ok" if ok else "page_requests_refused")
        try:
            self.hv.page_response(logical_device_id, request_id, ok)
        except PviommuError as exc:
            log.warning("page_request.response_failed", device=logical_device_id, error=str(exc))

    def _sva_fault(self, fault: hypervisor_pb2.Fault) -> None:
        self._to_sva(lambda sva: sva.handle(fault), fault.logical_device_id)

    def _sva_record(self, rec: FaultRecord) -> None:
        self._to_sva(lambda sva: sva.handle_record(rec), rec.logical_device_id)

    def _to_sva(self, deliver: Callable[[Sva], object], device: int) -> None:
        """A PASID-tagged fault or page request to the SVA handler (dropped with SVA off)."""
        if self.sva is None:
            return
        try:
            deliver(self.sva)
        except (PviommuError, ValueError) as exc:
            log.warning("sva.page_request_failed", device=device, error=str(exc))

    def run_sva_test(self, logical_device_id: int, size: int, iterations: int,
                     touch_destination: bool, unreserved_destination: bool = False) -> SvaTestResult:
        """The SVA proposal's dsa_test (``guest_agent.sva.run_sva_test``)."""
        if self.sva is None:
            raise InvalidRequest("SVA is off: start the agent with --proposal-sva")
        devices = sorted(self.iommu.devices)
        if not logical_device_id:
            if not devices:
                raise NotFound("no device behind the pv-IOMMU")
            logical_device_id = devices[0]
        drv = self.dsa_driver(logical_device_id)
        return run_sva_test(self.sva, drv, logical_device_id, size=size or 64 << 10, iterations=iterations or 4,
                            touch_destination=touch_destination, unreserved_destination=unreserved_destination)

    def close(self) -> None:
        self._closing = True
        stream = getattr(self, "_prq_stream", None)
        if stream is not None:
            stream.cancel()
        prq = getattr(self, "_prq", None)
        if prq is not None and self._fault_ring is not None:
            self._fault_ring.stop()
            prq.join(2)
            self._fault_ring.close()
        for drv in list(self.dsa.values()):
            drv.close()
        self.iommu.shutdown()
        self.hv.close()

    # -- devices ---------------------------------------------------------------------------
    def dsa_driver(self, logical_device_id: int) -> DsaDriver:
        """The device's DSA driver, probed on first use (the device service
        may come up after the agent)."""
        dev = self.iommu.device(logical_device_id)
        with self._dsa_lock:
            drv = self.dsa.get(logical_device_id)
            if drv is None:
                drv = DsaDriver(dev.logical_device_id, dev.name, dev.control_address, self.token, self.ram, dev.index)
                try:
                    drv.probe()
                except (grpc.RpcError, ConnectionError) as exc:
                    drv.close()
                    raise DeviceCommandFailed(f"device {dev.name} at {dev.control_address} did not answer: "
                                              f"{exc}") from exc
                self.dsa[logical_device_id] = drv
            return drv

    def channels(self) -> list[tuple[DsaDriver, DeviceState]]:
        out = []
        for dev in sorted(self.iommu.devices.values(), key=lambda d: d.index):
            if not dev.behind_pviommu and self.iommu.geometry is not None:
                continue
            out.append((self.dsa_driver(dev.logical_device_id), dev))
        return out

    def target_domain(self, logical_device_id: int, domain_id: int) -> Domain:
        if logical_device_id:
            dev = self.iommu.device(logical_device_id)
            return self.dma.domain_of(dev)
        if domain_id:
            return self.iommu.domain(domain_id)
        raise InvalidRequest("name a device (logical_device_id) or a domain (domain_id)")

    # -- memory ----------------------------------------------------------------------------
    def alloc_buffer(self, size: int) -> tuple[Gpa, int]:
        gpa = self.memory.alloc(size)
        return gpa, size

    def free_buffer(self, gpa: int) -> None:
        self.memory.free(Gpa(gpa))

    # -- map / unmap / flush ------------------------------------------------------------------
    def map(self, logical_device_id: int, domain_id: int, gpa: int, size: int, direction: Direction,
            iova: int = 0, on_demand: bool = False) -> DmaMapping:
        dom = self.target_domain(logical_device_id, domain_id)
        if on_demand:
            m = self.dma.map_on_demand(dom, gpa, size, direction, Iova(iova) if iova else None)
        else:
            m = self.dma.map_in(dom, gpa, size, direction, Iova(iova) if iova else None)
        with self._map_lock:
            self._mappings[(dom.domain_id, m.dma_addr)] = m
        return m

    def unmap(self, logical_device_id: int, domain_id: int, iova: int, size: int, skip_flush: bool) -> UnmapResult:
        dom = self.target_domain(logical_device_id, domain_id)
        with self._map_lock:
            m = self._mappings.pop((dom.domain_id, iova), None)
        if m is not None:
            return self.dma.unmap(m, skip_flush=skip_flush)
        if iova % PAGE_SIZE:
            raise NotFound(f"no mapping at IOVA {iova:#x} in domain {dom.domain_id}")
        return dom.dma_unmap(Iova(iova), size, skip_flush=skip_flush)

    def flush(self, logical_device_id: int, domain_id: int) -> None:
        self.target_domain(logical_device_id, domain_id).flush()

    # -- domains ----------------------------------------------------------------------------
    def create_domain(self, kind: str) -> Domain:
        try:
            k = DomainKind(kind or "paging")
        except ValueError as exc:
            raise InvalidRequest(f"domain kind {kind!r}: 'paging' or 'baseline'") from exc
        return self.iommu.new_domain(k)

    def delete_domain(self, domain_id: int) -> None:
        dom = self.iommu.domain(domain_id)
        self.iommu.delete_domain(dom)
        with self._map_lock:
            for key in [k for k in self._mappings if k[0] == domain_id]:
                del self._mappings[key]

    def attach(self, domain_id: int, logical_device_id: int) -> None:
        self.iommu.attach(self.iommu.device(logical_device_id), self.iommu.domain(domain_id))

    def detach(self, logical_device_id: int) -> None:
        self.iommu.detach(self.iommu.device(logical_device_id))

    # -- descriptors --------------------------------------------------------------------------
    def submit_descriptor(self, logical_device_id: int, wq_id: int | None, descriptor: bytes, wait: bool,
                          timeout_ms: int, completion_gpa: int) -> SubmitResult:
        drv = self.dsa_driver(logical_device_id)
        if wait:
            check_record_gpa(completion_gpa)
            self.memory.check(completion_gpa, COMP_SIZE)
            # a driver clears the record before submitting: status 0 = "not yet written"
            self.ram.write(Gpa(completion_gpa), bytes(COMP_SIZE))
        accepted = drv.submit(descriptor, wq_id)
        if not accepted or not wait:
            return SubmitResult(accepted, None)
        rec = wait_completion(self.ram, Gpa(completion_gpa), (timeout_ms or 3000) / 1000, drv.check_portal)
        return SubmitResult(True, rec)

    # -- dmatest --------------------------------------------------------------------------------
    def run_dmatest(self, params: DmatestParams, emit: Callable[[str], None] | None = None,
                    progress: Callable[[int], None] | None = None,
                    started: Callable[[Dmatest], None] | None = None) -> DmatestOutcome:
        """dmatest over the channels its ``channel``/``device`` parameters select;
        only those devices are probed (a dead device that was not asked for
        does not stop the run)."""
        self.iommu.rescan()
        devices = [d for d in sorted(self.iommu.devices.values(), key=lambda d: d.index)
                   if d.behind_pviommu or self.iommu.geometry is None]  # the devices channels() offers
        selected = select_devices(devices, params)
        channels = [(self.dsa_driver(d.logical_device_id), d) for d in selected]
        test = Dmatest(self.iommu, self.dma, self.memory, channels, params, emit, progress,
                       misconfigured=bool(params.channel) and not selected)
        if started is not None:
            started(test)
        outcome = test.run()
        log.info("dmatest.done", summary=outcome.summary, design=params.design, tests=outcome.tests,
                 failures=outcome.failures, stopped=test.stopped)
        return outcome

    # -- stats ------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        c = self.stats.snapshot()
        for call, n in self.hv.counts.items():
            c[f"hypercall_{call}"] = n
        c["hypercalls"] = sum(n for k, n in self.hv.counts.items() if k != "refused")
        c["table_frames"] = self.iommu.table_frames()
        c["iova_allocated"] = self.iommu.iova_allocated()
        c["frames_allocated"] = self.memory.frames.allocated_frames
        c["buffers"] = self.memory.buffers
        c["domains"] = len(self.iommu.domains)
        # completion interrupts the DSA drivers received (an interrupt wakes every waiter of its device)
        c["dsa_interrupts"] = sum(d.interrupts.count for d in list(self.dsa.values()) if d.interrupts is not None)
        c["pending_unmaps"] = sum(getattr(d, "pending", lambda: 0)() for d in self.iommu.domains.values())
        for key in ("maps", "unmaps", "flushes", "flush_list"):
            c.setdefault(key, 0)
        c[f"revision_{self.iommu.revision.value}"] = 1  # the revision whose driver this is (info metric)
        return c
