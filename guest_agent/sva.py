"""Shared virtual addressing in the guest: pviommu proposal, not in the series.

Only active with the agent's ``--proposal-sva`` (and a hypervisor that advertises PASID and
PRI). Layouts and statuses: docs/proposal-sva.md.

* ``SvaProcess``: a guest "process", an address space with 4-level x86-64 CPU page tables in
  guest RAM. ``mmap`` only reserves virtual addresses; a page is allocated and mapped when it is
  first touched, by the CPU (``read``/``write``) or by a device's page request.
* ``Sva.bind`` gives a process a PASID on a device, as Linux's ``iommu_sva_bind_device``
  does: an S1 device domain whose stage-1 root is the process's CPU page table, attached to
  (device, PASID) with AttachDevicePasid. The IOMMU then walks the same table as the CPU.
* ``Sva.handle`` is the I/O page-fault handler: an X64IommuPrq message for a bound PASID
  faults the page in (inside a reserved range) and answers with ProcessIommuPrq: success,
  or "invalid" for an address the process never reserved.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from guest_agent.driver.hypercalls import HvClient
from guest_agent.driver.pviommu import PvIommu
from guest_agent.driver.stats import Stats
from guest_agent.dsa.driver import DsaDriver, wait_completion
from guest_agent.errors import InvalidRequest
from pviommu.abi import hv
from pviommu.abi.dsa import COMP_SIZE, Cmd, CmdErr, DescFlags, Descriptor, DsaStatus, GenCap, Opcode
from pviommu.abi.hv.sva import (
    AttachDevicePasidInput,
    DetachDevicePasidInput,
    ProcessIommuPrqInput,
    PrqResponse,
    SvaInput,
    encode_sva_request,
)
from pviommu.abi.hv_status import HvStatus
from pviommu.abi.prq import PageRequestMessage
from pviommu.abi.shm import FaultRecord
from pviommu.addr import PAGE_SIZE, Gpa, Iova
from pviommu.log import get_logger
from pviommu.mem.bank import GuestRam
from pviommu.mem.frames import FrameAllocator
from pviommu.pt.common import Perm
from pviommu.pt.fmt import X86_64Format
from pviommu.pt.walk import PageTable, stage1_table
from pviommu.v1 import common_pb2, dsa_pb2, hypervisor_pb2

log = get_logger("guest.sva")

#: where a process's mmap ranges start (user half of a 48-bit address space)
USER_BASE = 0x7F00_0000_0000
_PAGE_MASK = ~(PAGE_SIZE - 1)
_RW = Perm.READ | Perm.WRITE


class SvaError(InvalidRequest):
    pass


@dataclass
class SvaProcess:
    """One address space: CPU page tables in guest RAM, pages faulted in lazily."""

    ram: GuestRam
    frames: FrameAllocator[Gpa]
    table: PageTable[Iova, Gpa, Gpa] = field(init=False)
    #: reserved ranges: (start, end)
    vmas: list[tuple[int, int]] = field(default_factory=list)
    #: page VA -> backing GPA of every page touched so far
    pages: dict[int, Gpa] = field(default_factory=dict)
    next_va: int = USER_BASE
    faults: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.table = stage1_table(X86_64Format(4), self.ram, self.frames)

    @property
    def cr3(self) -> Gpa:
        return self.table.root

    def mmap(self, size: int) -> int:
        """Reserve ``size`` bytes (page-rounded) of virtual addresses; nothing is mapped."""
        if size <= 0:
            raise SvaError(f"cannot map {size} bytes")
        length = (size + PAGE_SIZE - 1) & _PAGE_MASK
        with self.lock:
            start = self.next_va
            self.next_va += length + PAGE_SIZE  # a guard page between ranges
            self.vmas.append((start, start + length))
        return start

    def reserved(self, va: int) -> bool:
        return any(s <= va < e for s, e in self.vmas)

    def fault_in(self, va: int) -> bool:
        """Make the page holding ``va`` present (allocate, zero, map R/W, user);
        False when ``va`` lies in no reserved range."""
        page = va & _PAGE_MASK
        with self.lock:
            if page in self.pages:
                return True
            if not self.reserved(page):
                return False
            gpa = self.frames.alloc(0, zero=True)
            self.table.map(Iova(page), gpa, PAGE_SIZE, _RW)
            self.pages[page] = gpa
            self.faults += 1
        return True

    def _gpa(self, va: int) -> Gpa:
        if not self.fault_in(va):
            raise SvaError(f"segmentation fault: {va:#x} is not mapped in this process")
        return Gpa(self.pages[va & _PAGE_MASK] + (va & (PAGE_SIZE - 1)))

    def write(self, va: int, data: bytes) -> None:
        """A CPU store: faults the pages in as it goes."""
        done = 0
        while done < len(data):
            at = va + done
            n = min(len(data) - done, PAGE_SIZE - (at & (PAGE_SIZE - 1)))
            self.ram.write(self._gpa(at), data[done:done + n])
            done += n

    def read(self, va: int, size: int) -> bytes:
        """A CPU load (an untouched page reads as zeros once faulted in)."""
        out = bytearray()
        while len(out) < size:
            at = va + len(out)
            n = min(size - len(out), PAGE_SIZE - (at & (PAGE_SIZE - 1)))
            out += self.ram.read(self._gpa(at), n)
        return bytes(out)

    def gpa_of(self, va: int) -> Gpa | None:
        page = self.pages.get(va & _PAGE_MASK)
        return None if page is None else Gpa(page + (va & (PAGE_SIZE - 1)))

    def close(self) -> None:
        with self.lock:
            for gpa in self.pages.values():
                self.frames.free(gpa)
            self.pages.clear()
            self.table.destroy()


@dataclass(frozen=True)
class Binding:
    process: SvaProcess
    logical_device_id: int
    pasid: int
    domain_id: int


class Sva:
    """The guest's SVA layer over the pv-IOMMU driver (one per agent)."""

    def __init__(self, hvc: HvClient, iommu: PvIommu, ram: GuestRam, frames: FrameAllocator[Gpa],
                 stats: Stats) -> None:
        self.hv = hvc
        self.iommu = iommu
        self.ram = ram
        self.frames = frames
        self.stats = stats
        self.width = 0
        self._bindings: dict[tuple[int, int], Binding] = {}
        self._next_pasid = 1
        self._free_pasids: list[int] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """The hypervisor must offer PASID and PRI (``--proposal-sva``), else a clear error."""
        caps = self.hv.get_iommu_capabilities()
        if not caps.has(hv.IommuCap.PASID) or not caps.has(hv.IommuCap.PRI) or not caps.max_pasid_width:
            raise SvaError("the hypervisor offers no PASID/PRI (start it with --proposal-sva)")
        self.width = caps.max_pasid_width

    # -- processes and bindings --------------------------------------------------------
    def new_process(self) -> SvaProcess:
        return SvaProcess(self.ram, self.frames)

    def _alloc_pasid(self) -> int:
        with self._lock:
            if self._free_pasids:
                return self._free_pasids.pop(0)
            if self._next_pasid >> self.width:
                raise SvaError(f"all {(1 << self.width) - 1} PASIDs are in use")
            self._next_pasid += 1
            return self._next_pasid - 1

    def _call(self, request: SvaInput) -> None:
        value, data = encode_sva_request(request)
        a = self.hv.raw_call(value.encode(), data)  # on the hypercall page like the series' calls
        if a.status != HvStatus.SUCCESS:
            raise SvaError(f"{request.CODE.name} refused: {HvStatus.name_of(a.status)}: {a.message}")

    def bind(self, process: SvaProcess, logical_device_id: int) -> Binding:
        if not self.width:
            self.check()
        self.iommu.device(logical_device_id)  # a device of ours
        domain_id = self.iommu._fresh_id(None, hv.DeviceDomainType.S1)
        pasid = 0
        try:
            self.hv.configure_domain(hv.DeviceDomainType.S1, domain_id,
                                     hv.DeviceDomainSettings(translation_enabled=True, page_table_root=process.cr3))
            pasid = self._alloc_pasid()
            dd = hv.DeviceDomain(hv.HV_PARTITION_ID_SELF, hv.DeviceDomainId(hv.DeviceDomainType.S1, domain_id))
            self._call(AttachDevicePasidInput(dd, hv.HvDeviceId.logical(logical_device_id), pasid))
        except Exception:
            if pasid:
                self._free_pasid(pasid)
            self.hv.delete_domain(hv.DeviceDomainType.S1, domain_id)
            self.iommu.ida.free(domain_id)
            raise
        binding = Binding(process, logical_device_id, pasid, domain_id)
        with self._lock:
            self._bindings[(logical_device_id, pasid)] = binding
        log.info("sva.bound", device=logical_device_id, pasid=pasid, domain=domain_id, cr3=hex(process.cr3))
        return binding

    def _free_pasid(self, pasid: int) -> None:
        with self._lock:
            self._free_pasids.append(pasid)

    def unbind(self, b: Binding) -> None:
        with self._lock:
            self._bindings.pop((b.logical_device_id, b.pasid), None)
        self._call(DetachDevicePasidInput(hv.HV_PARTITION_ID_SELF, hv.HvDeviceId.logical(b.logical_device_id),
                                          b.pasid))
        self.hv.delete_domain(hv.DeviceDomainType.S1, b.domain_id)
        self.iommu.ida.free(b.domain_id)
        self._free_pasid(b.pasid)

    # -- the I/O page-fault handler ----------------------------------------------------------
    def handle(self, fault: hypervisor_pb2.Fault) -> bool:
        """One PASID-tagged entry of the hypervisor's gRPC stream (see ``handle_request``)."""
        if not fault.page_request:
            self.stats.add("sva_faults")
            return False
        return self.handle_request(PageRequestMessage.unpack(bytes(fault.synic_message)))

    def handle_record(self, rec: FaultRecord) -> bool:
        """One PASID-tagged record of the partition's fault ring (see ``handle_request``)."""
        if not rec.page_request or rec.pasid is None:
            self.stats.add("sva_faults")
            return False
        return self.handle_request(PageRequestMessage(rec.logical_device_id, rec.request_id, rec.iova, rec.pasid,
                                                      rec.write))

    def handle_request(self, msg: PageRequestMessage) -> bool:
        """The I/O page-fault handler: a page request for a bound PASID is resolved (the page
        faulted in, inside a mapped range) and answered with ProcessIommuPrq; a fault message is
        only counted. True if the page was made present."""
        with self._lock:
            b = self._bindings.get((msg.logical_device_id, msg.pasid))
        ok = b is not None and b.process.fault_in(msg.address)
        self.stats.add("sva_page_requests_ok" if ok else "sva_page_requests_refused")
        response = PrqResponse.SUCCESS if ok else PrqResponse.INVALID
        try:
            self._call(ProcessIommuPrqInput(hv.HV_PARTITION_ID_SELF, hv.HvDeviceId.logical(msg.logical_device_id),
                                            msg.request_id, msg.pasid, response))
        except SvaError as exc:
            log.warning("sva.response_refused", device=msg.logical_device_id, pasid=msg.pasid, error=str(exc))
        return ok


# -- a dsa_test-style run ------------------------------------------------------------------------
@dataclass
class SvaTestResult:
    passed: bool = False
    pasid: int = 0
    wq_id: int = 0
    completed: int = 0
    page_requests: int = 0
    mismatches: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        refused = f", {self.refused} refused" if self.refused else ""
        return (f"sva_test: {self.completed} memmove(s) on shared WQ {self.wq_id} with PASID {self.pasid}, "
                f"{self.page_requests} page request(s) resolved{refused}, {self.mismatches} mismatch(es): {verdict}")


SHARED_WQ = 1
SHARED_WQ_SIZE = 16


def shared_wq(drv: DsaDriver) -> int:
    """An enabled shared WQ with block-on-fault (WQ 1 configured and enabled if none is)."""
    stub = drv.stub
    assert stub is not None
    for w in stub.ListWqs(common_pb2.Empty(), timeout=10).wqs:
        if w.enabled and w.size and not w.dedicated and w.bof:
            return int(w.wq_id)
    gencap = GenCap.decode(drv.caps.gencap if drv.caps else 0)
    st = stub.ConfigureWq(dsa_pb2.WqConfig(wq_id=SHARED_WQ, dedicated=False, size=SHARED_WQ_SIZE, threshold=0,
                                           priority=10, bof=True, max_xfer_shift=gencap.max_xfer_shift,
                                           max_batch_shift=gencap.max_batch_shift), timeout=10)
    if st.error:
        raise SvaError(f"{drv.name}: ConfigureWq({SHARED_WQ}) as shared failed: {st.message}")
    err = drv._command(Cmd.ENABLE_WQ, SHARED_WQ)
    if err not in (CmdErr.SUCCESS, CmdErr.WQ_ENABLED):
        raise SvaError(f"{drv.name}: ENABLE_WQ({SHARED_WQ}) failed: {CmdErr(err).name}")
    return SHARED_WQ


def run_sva_test(sva: Sva, drv: DsaDriver, logical_device_id: int, *, size: int = 64 << 10, iterations: int = 4,
                 touch_destination: bool = False, unreserved_destination: bool = False,
                 timeout_s: float = 60.0) -> SvaTestResult:
    """accel-config's dsa_test, SVA flavour: a process fills a source buffer
    through the CPU, hands the device its own virtual addresses on a shared WQ
    under its PASID, and the destination (never touched) is faulted in by the
    device's page requests; the copy is then checked through the CPU."""
    result = SvaTestResult()
    if not 0 < size <= 1 << 21 or not 0 < iterations <= 1024:
        raise SvaError(f"size {size} must be 1..2 MiB and iterations {iterations} 1..1024")
    result.wq_id = shared_wq(drv)
    proc = sva.new_process()
    before = sva.stats.get("sva_page_requests_ok")
    refused_before = sva.stats.get("sva_page_requests_refused")
    expect = DsaStatus.PAGE_FAULT_IR if unreserved_destination else DsaStatus.SUCCESS
    binding: Binding | None = None
    try:
        binding = sva.bind(proc, logical_device_id)
        result.pasid = binding.pasid
        for it in range(iterations):
            src, dst, rec = proc.mmap(size), proc.mmap(size), proc.mmap(PAGE_SIZE)
            if unreserved_destination:  # past every range: no mmap covers it
                dst = proc.next_va + (1 << 30)
            pattern = bytes(((i * 7 + it * 13) & 0xFF) for i in range(size))
            proc.write(src, pattern)
            proc.write(rec, bytes(COMP_SIZE))  # the record must be present: its write does not page-fault
            if touch_destination and not unreserved_destination:
                proc.write(dst, bytes(size))
            desc = Descriptor(opcode=Opcode.MEMMOVE, flags=int(DescFlags.CRAV | DescFlags.RCR | DescFlags.BOF),
                              pasid=binding.pasid, completion_addr=rec, src_addr=src, dst_addr=dst, xfer_size=size)
            if not drv.submit(desc.pack(), wq_id=result.wq_id):
                result.errors.append(f"iteration {it}: the shared WQ kept answering retry")
                continue
            rec_gpa = proc.gpa_of(rec)
            assert rec_gpa is not None
            cr = wait_completion(sva.ram, rec_gpa, timeout_s, check=drv.check_portal)
            if cr is None:
                result.errors.append(f"iteration {it}: no completion within {timeout_s} s")
                continue
            if cr.code != expect:
                result.errors.append(f"iteration {it}: completion status {cr.status:#x} at {cr.fault_addr:#x}, "
                                     f"expected {expect.name}")
                continue
            result.completed += 1
            if expect is DsaStatus.SUCCESS and proc.read(dst, size) != pattern:
                result.mismatches += 1
    finally:
        if binding is not None:
            try:
                sva.unbind(binding)
            except SvaError as exc:
                result.errors.append(f"unbind: {exc}")
        proc.close()
    result.page_requests = sva.stats.get("sva_page_requests_ok") - before
    result.refused = sva.stats.get("sva_page_requests_refused") - refused_before
    result.passed = not result.errors and not result.mismatches and result.completed == iterations
    return result
