"""A guest through its agent's gRPC API (``pviommu.v1.GuestAgent``): memory,
mappings, domains, flushes, faults, descriptors and dmatest.

Everything a ``Guest`` creates (buffers, mappings, domains) is remembered
until it is undone, so ``cleanup()`` can put the guest back as it was -- the
per-test isolation the pytest plugin relies on when a system is shared.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pviommu.addr import Gpa, Iova
from pviommu.client.device import Device
from pviommu.client.errors import ClientError
from pviommu.client.memory import Buffer, Mapping
from pviommu.client.rpc import Endpoint
from pviommu.client.types import Direction, DmatestResult, DomainInfo, GuestFault, IommuInfo, UnmapResult
from pviommu.v1 import common_pb2, guest_pb2, guest_pb2_grpc

if TYPE_CHECKING:
    from pviommu.client.hypervisor import Hypervisor

Target = Device | int


class Guest:
    """One guest agent at ``address``, called with the partition's ``token``."""

    def __init__(self, address: str, token: str, *, name: str = "", hypervisor_address: str | None = None,
                 timeout: float = 30.0, connect_timeout: float = 10.0, design: str = "nested") -> None:
        self.name = name or address
        self.address = address
        self.token = token
        self.hypervisor_address = hypervisor_address
        #: The dmatest design ``dmatest()`` uses unless told otherwise.
        self.design = design
        self.endpoint = Endpoint(address, token, what=f"guest {self.name}", timeout=timeout,
                                 connect_timeout=connect_timeout)
        self._devices: dict[int, Device] = {}
        self._hv: Hypervisor | None = None
        self._lock = threading.Lock()
        self._buffers: dict[int, Buffer] = {}
        self._mappings: list[Mapping] = []
        self._domains: list[int] = []
        self._fault_mark = 0
        self._partition_id: int | None = None

    def __repr__(self) -> str:
        return f"Guest(name={self.name!r}, address={self.address!r})"

    @property
    def stub(self) -> guest_pb2_grpc.GuestAgentStub:
        """The generated stub, for anything the client does not wrap."""
        return self.endpoint.stub(guest_pb2_grpc.GuestAgentStub)

    def _call(self, method: str, request: Any, what: str | None = None, timeout: float | None = None) -> Any:
        return self.endpoint.call(getattr(self.stub, method), request, what or method, timeout)

    def close(self) -> None:
        self.endpoint.close()
        if self._hv is not None:
            self._hv.close()

    # -- identity and inventory -------------------------------------------------------------
    def info(self) -> IommuInfo:
        return IommuInfo.from_proto(self._call("GetIommuInfo", common_pb2.Empty()))

    @property
    def partition_id(self) -> int:
        if self._partition_id is None:
            self._partition_id = self.info().partition_id
        return self._partition_id

    @property
    def devices(self) -> list[Device]:
        """The guest's devices (asks the agent each time: devices come and go)."""
        out = []
        for d in self._call("ListDevices", common_pb2.Empty()).devices:
            dev = self._devices.get(d.logical_device_id)
            if dev is None:
                dev = Device(self, d.logical_device_id, d.name, d.control_address)
                self._devices[d.logical_device_id] = dev
            out.append(dev)
        return out

    def device(self, which: int | str = 0) -> Device:
        """A device by position (0, 1, ...), logical id or name."""
        devices = self.devices
        for dev in devices:
            if (isinstance(which, str) and dev.name == which) or (isinstance(which, int) and dev.id == which):
                return dev
        if isinstance(which, int) and 0 <= which < len(devices):
            return devices[which]
        raise ClientError(f"guest {self.name} has no device {which!r} (devices: "
                          f"{', '.join(f'{d.name} {d.id:#x}' for d in devices) or 'none'})")

    def wait_devices(self, count: int = 1, timeout: float = 30.0) -> list[Device]:
        """Wait until at least ``count`` devices are assigned (hot-plug after boot)."""
        deadline = time.monotonic() + timeout
        while True:
            devices = self.devices
            if len(devices) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(devices) < count:
            raise ClientError(f"guest {self.name}: {len(devices)} devices after {timeout:g}s, {count} expected")
        return devices

    def domains(self) -> list[DomainInfo]:
        return [DomainInfo.from_proto(d) for d in self._call("ListDomains", common_pb2.Empty()).domains]

    def stats(self) -> dict[str, int]:
        return dict(self._call("GetStats", common_pb2.Empty()).counters)

    @property
    def hypervisor(self) -> Hypervisor:
        """The hypervisor's hypercall interface with this guest's credential."""
        if self._hv is None:
            if not self.hypervisor_address:
                raise ClientError(f"guest {self.name}: the hypervisor's address is not known "
                                  "(give hypervisor_address=, or use a System)")
            from pviommu.client.hypervisor import Hypervisor

            self._hv = Hypervisor(self.hypervisor_address, self.token, name=f"{self.name}'s hypervisor")
        return self._hv

    # -- memory -------------------------------------------------------------------------------
    def alloc(self, size: int, *, data: bytes | None = None, fill: int | None = None, track: bool = True) -> Buffer:
        """A contiguous buffer of guest RAM (zeroed, or ``data``, or ``fill`` bytes)."""
        reply = self._call("AllocBuffer", guest_pb2.AllocRequest(size=size), f"alloc {size:#x}")
        buf = Buffer(Gpa(reply.gpa), reply.size, self)
        if track:
            with self._lock:
                self._buffers[buf.gpa] = buf
        try:
            if data is not None:
                buf.write(data)
            elif fill is not None:
                buf.fill(fill)
        except BaseException:
            self.free(buf)
            raise
        return buf

    def free(self, buffer: Buffer | int) -> None:
        gpa = buffer.gpa if isinstance(buffer, Buffer) else buffer
        size = buffer.size if isinstance(buffer, Buffer) else 0
        self._call("FreeBuffer", guest_pb2.Buffer(gpa=gpa, size=size), f"free GPA {gpa:#x}")
        with self._lock:
            self._buffers.pop(gpa, None)
        if isinstance(buffer, Buffer):
            buffer.freed = True

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self._call("ReadMemory", guest_pb2.ReadRequest(gpa=gpa, size=size),
                                f"read {size:#x} at GPA {gpa:#x}").data)

    def write(self, gpa: int, data: bytes) -> None:
        self._call("WriteMemory", guest_pb2.WriteRequest(gpa=gpa, data=data), f"write {len(data):#x} at GPA {gpa:#x}")

    # -- mappings -------------------------------------------------------------------------------
    @staticmethod
    def _target(device: Target | None, domain: DomainInfo | int | None) -> tuple[int, int]:
        if (device is None) == (domain is None):
            raise ValueError("name exactly one of device= or domain=")
        dev_id = device.id if isinstance(device, Device) else (device or 0)
        dom_id = domain.domain_id if isinstance(domain, DomainInfo) else (domain or 0)
        return dev_id, dom_id

    def map(self, buffer: Buffer | int, direction: Direction | str | int = Direction.BIDIRECTIONAL, *,
            device: Target | None = None, domain: DomainInfo | int | None = None, size: int | None = None,
            iova: int = 0, on_demand: bool = False, track: bool = True) -> Mapping:
        """Map a buffer (or ``size`` bytes at a GPA) in a device's current
        domain or in a named domain; ``iova=0`` lets the driver choose."""
        dev_id, dom_id = self._target(device, domain)
        direction = Direction.parse(direction)
        gpa = buffer.gpa if isinstance(buffer, Buffer) else buffer
        if size is None:
            if not isinstance(buffer, Buffer):
                raise ValueError("size= is required when mapping a plain GPA")
            size = buffer.size
        request = guest_pb2.MapRequest(logical_device_id=dev_id, domain_id=dom_id, gpa=gpa, size=size,
                                       direction=guest_pb2.Direction.ValueType(int(direction)), iova=iova,
                                       on_demand=on_demand)
        reply = self._call("Map", request, f"map {size:#x} at GPA {gpa:#x}")
        m = Mapping(Iova(reply.iova), reply.size, Gpa(gpa), direction, self, dev_id, dom_id,
                    buffer if isinstance(buffer, Buffer) else None)
        if track:
            with self._lock:
                self._mappings.append(m)
        return m

    def unmap(self, mapping: Mapping, *, skip_flush: bool = False) -> UnmapResult:
        """Remove a mapping; ``skip_flush=True`` leaves the IOTLB stale (the hazard)."""
        if mapping.unmapped:
            raise ClientError(f"{mapping!r} is already unmapped")
        reply = self._call("Unmap", guest_pb2.UnmapRequest(
            logical_device_id=mapping.device_id, domain_id=mapping.domain_id, iova=mapping.iova, size=mapping.size,
            skip_flush=skip_flush), f"unmap IOVA {mapping.iova:#x}")
        mapping.unmapped = True
        with self._lock:
            if mapping in self._mappings:
                self._mappings.remove(mapping)
        return UnmapResult(reply.unmapped, reply.flushed)

    def flush(self, *, device: Target | None = None, domain: DomainInfo | int | None = None) -> None:
        """FlushDeviceDomain for a device's domain or a named domain."""
        dev_id, dom_id = self._target(device, domain)
        self._call("Flush", guest_pb2.FlushRequest(logical_device_id=dev_id, domain_id=dom_id), "flush")

    # -- domains ---------------------------------------------------------------------------------
    def create_domain(self, kind: str = "paging") -> DomainInfo:
        """A new domain: ``paging`` (guest stage-1 tables) or ``baseline`` (map by hypercall)."""
        dom = DomainInfo.from_proto(self._call("CreateDomain", guest_pb2.CreateDomainRequest(kind=kind),
                                               f"create a {kind} domain"))
        with self._lock:
            self._domains.append(dom.domain_id)
        return dom

    def delete_domain(self, domain: DomainInfo | int) -> None:
        dom_id = domain.domain_id if isinstance(domain, DomainInfo) else domain
        self._call("DeleteDomain", guest_pb2.DomainRequest(domain_id=dom_id), f"delete domain {dom_id:#x}")
        with self._lock:
            if dom_id in self._domains:
                self._domains.remove(dom_id)
            self._mappings = [m for m in self._mappings if m.domain_id != dom_id]

    def attach(self, domain: DomainInfo | int, device: Target) -> None:
        dom_id = domain.domain_id if isinstance(domain, DomainInfo) else domain
        dev_id = device.id if isinstance(device, Device) else device
        self._call("AttachDevice", guest_pb2.AttachRequest(domain_id=dom_id, logical_device_id=dev_id),
                   f"attach device {dev_id:#x} to domain {dom_id:#x}")

    def detach(self, device: Target) -> None:
        """Back to the device's default domain."""
        dev_id = device.id if isinstance(device, Device) else device
        self._call("DetachDevice", guest_pb2.DeviceRef(logical_device_id=dev_id), f"detach device {dev_id:#x}")

    # -- descriptors, dmatest, faults ------------------------------------------------------------------
    def submit_raw(self, device: Target, descriptor: bytes, *, completion_gpa: int = 0, wait: bool = True,
                   timeout_ms: int = 5000, wq_id: int = 0) -> Any:
        """SubmitDescriptor as it is: 64 bytes whose completion address is an
        IOVA, the record polled at ``completion_gpa``; the DescriptorReply."""
        dev_id = device.id if isinstance(device, Device) else device
        return self._call("SubmitDescriptor", guest_pb2.DescriptorRequest(
            logical_device_id=dev_id, wq_id=wq_id, descriptor=descriptor, wait=wait, timeout_ms=timeout_ms,
            completion_gpa=completion_gpa), "submit", timeout=max(30.0, timeout_ms / 1000 + 10))

    def dmatest(self, *, on_line: Callable[[str], None] | None = None,
                on_progress: Callable[[int], None] | None = None, timeout: float | None = 600.0,
                **params: Any) -> DmatestResult:
        """Linux dmatest in the guest; ``params`` are its module parameters
        (``iterations``, ``threads_per_chan``, ``test_buf_size``, ``design``, ...)."""
        params.setdefault("design", self.design)
        try:
            request = guest_pb2.DmatestParams(**params)
        except ValueError as exc:
            fields = ", ".join(f.name for f in guest_pb2.DmatestParams.DESCRIPTOR.fields)
            raise ValueError(f"dmatest: {exc} (parameters: {fields})") from None
        result = None
        for ev in self.endpoint.stream(self.stub.RunDmatest, request, "dmatest", timeout):
            if ev.HasField("line") and on_line is not None:
                on_line(ev.line)
            elif ev.HasField("progress") and on_progress is not None:
                on_progress(ev.progress)
            elif ev.HasField("result"):
                result = ev.result
        if result is None:
            raise ClientError(f"guest {self.name}: dmatest ended without a result")
        return DmatestResult.from_proto(result)

    def faults(self, *, all: bool = False) -> list[GuestFault]:
        """The guest's DMA faults since the last ``mark_faults``/``cleanup`` (``all=True``: every one)."""
        got = [GuestFault.from_proto(f) for f in self.endpoint.stream(
            self.stub.StreamFaults, guest_pb2.FaultsRequest(follow=False), "faults")]
        return got if all else [f for f in got if f.sequence > self._fault_mark]

    def follow_faults(self, timeout: float | None = None) -> Iterator[GuestFault]:
        """Faults as they happen (a stream; stop iterating to end it)."""
        for f in self.endpoint.stream(self.stub.StreamFaults, guest_pb2.FaultsRequest(follow=True), "faults",
                                      timeout or 3600.0):
            yield GuestFault.from_proto(f)

    def wait_fault(self, iova: int | Mapping | None = None, *, write: bool | None = None,
                   device: Target | None = None, timeout: float = 10.0) -> GuestFault:
        """The first new fault matching ``iova`` (within its page), ``write`` and
        ``device``; devices report faults asynchronously, so this waits."""
        want = iova.iova if isinstance(iova, Mapping) else iova
        dev_id = device.id if isinstance(device, Device) else device
        deadline = time.monotonic() + timeout
        while True:
            for f in self.faults():
                if ((want is None or f.iova >> 12 == want >> 12) and (write is None or f.write == write)
                        and (dev_id is None or f.logical_device_id == dev_id)):
                    return f
            if time.monotonic() > deadline:
                where = f" at IOVA {want:#x}" if want is not None else ""
                raise ClientError(f"guest {self.name}: no fault{where} within {timeout:g}s")
            time.sleep(0.05)

    def mark_faults(self) -> None:
        """Forget the faults so far: ``faults()`` returns only newer ones."""
        seqs = [f.sequence for f in self.faults(all=True)]
        self._fault_mark = max(seqs, default=self._fault_mark)

    # -- isolation ---------------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Undo what this object created: unmap its mappings (with flush),
        delete its domains (devices go back to their default domain first),
        free its buffers and record pages, forget earlier faults. Returns
        what could not be undone (empty when all went well)."""
        problems: list[str] = []
        with self._lock:
            mappings, self._mappings = list(self._mappings), []
            domains, self._domains = list(self._domains), []
            buffers = list(self._buffers.values())
            self._buffers = {}
        for dev in list(self._devices.values()):
            dev.release_records()
        for m in reversed(mappings):
            if not m.unmapped and m.domain_id not in domains:
                try:
                    self.unmap(m)
                except ClientError as exc:
                    problems.append(f"unmap {m.iova:#x}: {exc}")
        if domains:
            try:
                attached = {dev for d in self.domains() if d.domain_id in domains for dev in d.devices}
            except ClientError as exc:
                attached, problems = set(), [*problems, f"list domains: {exc}"]
            for dev_id in sorted(attached):
                try:
                    self.detach(dev_id)
                except ClientError as exc:
                    problems.append(f"detach {dev_id:#x}: {exc}")
            for dom_id in domains:
                try:
                    self.delete_domain(dom_id)
                except ClientError as exc:
                    problems.append(f"delete domain {dom_id:#x}: {exc}")
        for b in buffers:
            if not b.freed:
                try:
                    self.free(b)
                except ClientError as exc:
                    problems.append(f"free {b.gpa:#x}: {exc}")
        try:
            self.mark_faults()
        except ClientError as exc:
            problems.append(f"faults: {exc}")
        return problems
