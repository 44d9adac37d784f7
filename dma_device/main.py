"""``pviommu serve dsa``: one DSA device with its IOMMU unit, as a process.

Start-up: serve gRPC, register with the hypervisor (admin credential; a
stable instance GUID derived from the name, so a restarted device gets its
logical id back), map the banks the hypervisor names, bind the device's DMA
to the IOMMU unit at its slot, and -- in launcher setups such as
docker-compose -- ask for assignment to a named partition. Faults and page
requests go to the hypervisor from a background thread so engines never
block on the network.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from dma_device.counters import GAUGES, LABELS, device_counters
from dma_device.dsa.device import DsaDevice, DsaDeviceConfig
from dma_device.fastpath import memmove_hook
from dma_device.ownership import Ownership
from dma_device.portals import Portals
from dma_device.rpc.servicer import DeviceInfo, DsaDeviceServicer, configure_groups
from pviommu.abi.dsa import GenCap
from pviommu.abi.invq import Invalidation, OwnerFence, PasidInvalidation, QueueItem
from pviommu.exitcodes import CANNOT_BIND, CONNECT
from pviommu.iommu.pasid import scalable_mode
from pviommu.iommu.unit import IommuUnit
from pviommu.log import bind_identity, configure, get_logger
from pviommu.mem.bank import HostMemory
from pviommu.mem.dma import DmaFault, DmaMemory
from pviommu.rpc.auth import Principal, admin_token_from, tokens_equal
from pviommu.rpc.bind import BindError, bind_problem
from pviommu.rpc.client import connect, print_waiting
from pviommu.rpc.metrics import CounterCollector, RpcMetricsInterceptor, serve_metrics
from pviommu.rpc.server import RunningServer, Service, create_server
from pviommu.shm.invq import QueueConsumer, socket_path
from pviommu.shm.sessions import SessionServer
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2, dsa_pb2_grpc

log = get_logger("dma_device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50071", help="address to serve on (port 0 picks one)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--hypervisor", required=False, default="127.0.0.1:50051", help="hypervisor address")
    p.add_argument("--name", default="", help="device name (default: dsa-<hostname>-<pid>)")
    p.add_argument("--advertise", help="address the hypervisor and guests use to reach this device "
                                       "(default: the listen address with the bound port)")
    p.add_argument("--admin-token-file", help="file with the host credential (default: $PVIOMMU_ADMIN_TOKEN)")
    p.add_argument("--assign", help="ask the hypervisor to assign this device to the partition of this name")
    p.add_argument("--engines", type=int, default=2, help="engines (worker threads)")
    p.add_argument("--max-xfer-shift", type=int, default=31, help="GENCAP max transfer size = 2^shift")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus metrics on this port (0 picks one; default: off)")
    p.add_argument("--page-request-timeout", type=float, default=2.0, help="seconds a BOF page request waits")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the hypervisor to answer (a 'waiting for' line every few seconds)")


def _admin_token(args: argparse.Namespace) -> str:
    return admin_token_from(args.admin_token_file, "pviommu serve dsa")


def pasid_memory(memory: HostMemory, unit: IommuUnit, slot: int) -> Callable[[int | None], DmaMemory]:
    """The device's memory per PASID: one view for requests without PASID (and
    always, unless the hypervisor turned scalable mode on: the series), one per
    PASID >= 1 under the SVA proposal (pviommu proposal, not in the series)."""
    plain = DmaMemory(memory, unit.bind(slot))
    views: dict[int, DmaMemory] = {}

    def memory_for(pasid: int | None) -> DmaMemory:
        if not pasid or not scalable_mode(memory):
            return plain
        view = views.get(pasid)
        if view is None:
            view = DmaMemory(memory, unit.bind(slot, pasid))
            if len(views) < 4096:  # bounded: a hostile guest cycling PASIDs gets fresh views
                views[pasid] = view
        return view

    return memory_for


class HypervisorLink:
    """Faults and page requests to the hypervisor, off the engine threads;
    and a heartbeat, which lets the hypervisor resynchronise this unit after
    it failed to confirm something in time."""

    def __init__(self, channel: grpc.Channel, own: Ownership, timeout: float, heartbeat_s: float = 2.0) -> None:
        self._stub = admin_pb2_grpc.DeviceHostStub(channel)
        self._own = own
        self._timeout = timeout
        self._queue: queue.SimpleQueue[admin_pb2.ReportFaultRequest | admin_pb2.PageRequestTimedOutRequest | None] = \
            queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="fault-reporter", daemon=True)
        self._thread.start()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), name="heartbeat", daemon=True)
        self._beat.start()
        self.dropped = 0

    def _pump(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, admin_pb2.PageRequestTimedOutRequest):
                    self._stub.PageRequestTimedOut(item, timeout=5)
                else:
                    self._stub.ReportFault(item, timeout=5)
            except grpc.RpcError as exc:
                self.dropped += 1
                log.warning("fault.report_failed", error=exc.code().name)

    def _heartbeat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._stub.Heartbeat(common_pb2.Empty(), timeout=10)
            except grpc.RpcError as exc:
                log.debug("heartbeat.failed", error=exc.code().name)

    @staticmethod
    def _request(fault: DmaFault, page_request: bool = False, request_id: int = 0) -> admin_pb2.ReportFaultRequest:
        req = admin_pb2.ReportFaultRequest(iova=fault.iova, write=fault.write, reason=fault.reason,
                                           reason_name=fault.reason_name, detail=fault.detail,
                                           page_request=page_request, request_id=request_id, epoch=fault.epoch)
        if fault.pasid is not None:  # the SVA proposal only
            req.pasid_valid, req.pasid = True, fault.pasid
        return req

    def on_fault(self, fault: DmaFault) -> None:
        self._queue.put(self._request(fault))

    def on_page_request(self, fault: DmaFault) -> bool | None:
        """BOF: report a page request and block this engine until the guest
        answers through the hypervisor, the deadline passes or the owner
        changes (None: no answer)."""
        rid, pending = self._own.new_page_request(fault.epoch)
        try:
            self._stub.ReportFault(self._request(fault, True, rid), timeout=5)
            if not pending.answered.wait(self._timeout):  # given up: tell the hypervisor, off this engine
                self._queue.put(admin_pb2.PageRequestTimedOutRequest(request_id=rid, epoch=fault.epoch))
                return None
            return pending.answer
        except grpc.RpcError:
            return None
        finally:
            self._own.finish_page_request(rid)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)


@dataclass
class DeviceService:
    """One running DSA device: its server, model, IOMMU unit and queue."""

    server: RunningServer
    device: DsaDevice
    info: DeviceInfo
    unit: IommuUnit
    own: Ownership
    queue: QueueConsumer
    link: HypervisorLink
    admin: admin_pb2_grpc.AdminStub
    registry: CollectorRegistry
    portals: Portals
    sessions: SessionServer
    #: called with every item the hypervisor sent through the queue, after it was handled (tests)
    observers: list[Callable[[QueueItem], None]] = field(default_factory=list)

    def shutdown(self) -> None:
        """Unregister, stop the engines, the queue and the links (the server stays)."""
        self.server.health.enter_graceful_shutdown()
        try:
            self.admin.UnregisterDevice(admin_pb2.DeviceRequest(logical_device_id=self.info.logical_device_id),
                                        timeout=3)
        except grpc.RpcError:
            pass
        self.sessions.close()
        self.portals.close()
        self.device.close()
        self.queue.close()
        self.link.close()

    def close(self) -> None:
        self.shutdown()
        self.server.stop(0.5)


def build(args: argparse.Namespace, listen: str | None = None) -> DeviceService:
    """Serve, register with the hypervisor, map the banks and start the unit
    and its queue (used by ``run`` and by the test kits). BindError when it
    cannot listen, ConnectionError when the hypervisor never answers; nothing
    is left running either way."""
    name = args.name or f"dsa-{socket.gethostname()}-{os.getpid()}"
    bind_identity(service="dsa", device_name=name)
    token = _admin_token(args)
    problem = bind_problem(listen or args.listen)
    if problem:
        raise BindError(problem)
    config = DsaDeviceConfig(gencap=GenCap(max_xfer_shift=args.max_xfer_shift), num_engines=args.engines,
                             num_groups=min(4, args.engines), page_request_timeout=args.page_request_timeout)
    device = DsaDevice(None, config)
    configure_groups(device)
    info = DeviceInfo(name)
    box: dict[str, Any] = {}

    def resolve(tok: str) -> Principal | None:
        if tokens_equal(tok, token):
            return Principal("host")
        own: Ownership | None = box.get("own")
        return own.authorize(tok) if own is not None else None

    # The servicer needs the unit, which needs the memory folder the hypervisor names.
    class _Deferred(DsaDeviceServicer):
        def __init__(self) -> None:
            self.device, self.info = device, info

        @property
        def unit(self) -> IommuUnit:  # type: ignore[override]
            return box["unit"]  # type: ignore[no-any-return]

        @property
        def own(self) -> Ownership:  # type: ignore[override]
            return box["own"]  # type: ignore[no-any-return]

    registry = CollectorRegistry()
    registry.register(CounterCollector("dsa", lambda: device_counters(device, box.get("unit")), labels=LABELS,
                                       gauges=GAUGES))
    try:
        server = create_server(listen or args.listen, [Service(_Deferred(),
                                                               dsa_pb2_grpc.add_DsaDeviceServicer_to_server,
                                                               "pviommu.v1.DsaDevice")], resolve=resolve,
                               interceptors=[RpcMetricsInterceptor(registry, "dsa")])
    except (RuntimeError, OSError) as exc:
        device.close()
        raise BindError(f"cannot listen on {listen or args.listen}: {exc}") from exc
    # Not ready until registered (and assigned, when asked): probes must wait.
    for svc in ("", "pviommu.v1.DsaDevice"):
        server.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    host_part = (listen or args.listen).rsplit(":", 1)[0]
    if host_part in ("0.0.0.0", "[::]", ""):
        host_part = socket.gethostname()
    advertise = args.advertise or f"{host_part}:{server.port}"

    try:
        hv = connect(args.hypervisor, token, ready_timeout=getattr(args, "connect_timeout", 30.0),
                     what="the hypervisor", on_wait=_waiting)
    except ConnectionError:
        server.stop(0)
        device.close()
        raise
    admin = admin_pb2_grpc.AdminStub(hv)
    guid = uuid.uuid5(uuid.NAMESPACE_URL, f"pviommu-dsa:{name}").bytes
    reg = admin.RegisterDevice(admin_pb2.RegisterDeviceRequest(
        name=name, control_address=advertise, pci_vendor_id=0x8086, pci_device_id=0x0B25,
        instance_guid=guid, pci_function=0), timeout=30)
    if reg.result.status != 0:
        raise SystemExit(f"registration refused: {reg.result.status_name}: {reg.result.message}")
    info.slot, info.logical_device_id = reg.device.slot, reg.device.logical_device_id
    bind_identity(device=f"{info.logical_device_id:#x}", slot=info.slot)
    memory = HostMemory(Path(reg.memory_dir))
    unit = IommuUnit(memory)
    def power_on_reset() -> None:
        device.reset_device()
        configure_groups(device)

    own = Ownership(memory, info.slot, device, reset=power_on_reset)
    box["unit"], box["own"] = unit, own
    device_channel = connect(args.hypervisor, reg.device_token, ready_timeout=getattr(args, "connect_timeout", 30.0),
                             what="the hypervisor", on_wait=_waiting)
    link = HypervisorLink(device_channel, own, args.page_request_timeout)

    observers: list[Callable[[QueueItem], None]] = []

    def handle(item: QueueItem) -> None:
        """Everything the hypervisor sends the unit comes through its queue."""
        if isinstance(item, Invalidation | PasidInvalidation):
            item.apply(unit)
        elif isinstance(item, OwnerFence):
            own.fence(item.epoch)
        else:
            own.answer(item.request_id, item.code)
        for observe in observers:
            observe(item)

    queue_consumer = QueueConsumer(memory, info.slot, handle)
    portals = Portals(device, own)
    own.on_fence.append(portals.end_epochs_except)
    sessions = SessionServer(socket_path(memory.directory, f"dsa-{info.slot:03d}-{os.getpid()}.sock"), portals.open)
    info.session_socket = sessions.path

    def interrupt(handle: int, epoch: int) -> None:
        portals.publish_interrupt(handle, epoch)  # the interrupt pages (the drivers)
        own.publish_interrupt(handle, epoch)  # the gRPC interrupt streams (scripts)

    device.on_fault = link.on_fault
    device.on_page_request = link.on_page_request
    device.on_interrupt = interrupt
    device.bind(pasid_memory(memory, unit, info.slot))
    device.fast_memmove = memmove_hook(unit)  # warm MEMMOVEs in one compiled call (None: the model alone)
    log.info("dsa.serving", port=server.port, advertise=advertise, slot=info.slot, memory_dir=reg.memory_dir)

    if getattr(args, "assign", None):
        _assign_when_ready(admin, info.logical_device_id, args.assign)
    for svc in ("", "pviommu.v1.DsaDevice"):
        server.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return DeviceService(server, device, info, unit, own, queue_consumer, link, admin, registry, portals, sessions,
                         observers)


def run(args: argparse.Namespace) -> int:
    configure()
    try:
        svc = build(args)
    except BindError as exc:
        print(f"pviommu serve dsa: {exc}", file=sys.stderr)
        return CANNOT_BIND
    except ConnectionError as exc:
        print(f"pviommu serve dsa: {exc}", file=sys.stderr)
        return CONNECT
    if args.metrics_port >= 0:
        log.info("dsa.metrics", port=serve_metrics(args.metrics_port, svc.registry))
    svc.server.write_port_file(args.port_file)

    def shutdown() -> None:
        log.info("dsa.stopping")
        svc.shutdown()

    svc.server.wait_for_signal(on_stop=shutdown)
    return 0


def _waiting(message: str) -> None:
    log.info("dsa.waiting", detail=message)
    print_waiting(message)


def _assign_when_ready(admin: admin_pb2_grpc.AdminStub, logical: int, partition_name: str,
                       timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in admin.ListPartitions(common_pb2.Empty(), timeout=10).partitions:
            if p.name == partition_name:
                r = admin.AssignDevice(admin_pb2.AssignDeviceRequest(logical_device_id=logical,
                                                                     partition_id=p.partition_id), timeout=30)
                if r.result.status != 0:
                    raise SystemExit(f"assignment refused: {r.result.status_name}: {r.result.message}")
                log.info("dsa.assigned", partition=p.partition_id, partition_name=partition_name)
                return
        time.sleep(0.5)
    raise SystemExit(f"no partition named {partition_name!r} appeared within {timeout}s")
