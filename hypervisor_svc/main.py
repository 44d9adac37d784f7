"""``pviommu serve hypervisor``: run the hypervisor service."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.model import Partition
from hypervisor_svc.core.trace import TraceWriter
from hypervisor_svc.rpc.admin_servicer import AdminServicer, DeviceHostServicer
from hypervisor_svc.rpc.device_client import GrpcInvalidator
from hypervisor_svc.rpc.hypercall_servicer import HypervisorServicer
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError
from pviommu.exitcodes import CANNOT_BIND
from pviommu.iommu.invq import QueueHost
from pviommu.log import bind_identity, configure, get_logger
from pviommu.mem.placement import filesystem_of, make_bank_folder
from pviommu.rpc.auth import admin_token_from
from pviommu.rpc.bind import BindError, bind_problem
from pviommu.rpc.metrics import CounterCollector, RpcMetricsInterceptor, serve_metrics
from pviommu.rpc.server import RunningServer, Service, create_server
from pviommu.v1 import admin_pb2_grpc, hypervisor_pb2_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on (port 0 picks one)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--memory-dir", help="folder of the memory banks (default: a new folder on /dev/shm, a tmpfs, "
                                        "when it has room; else in the temporary folder)")
    p.add_argument("--admin-token-file", help="file holding the admin token (default: $PVIOMMU_ADMIN_TOKEN)")
    p.add_argument("--five-level", action="store_true", help="offer 5-level stage-1 paging (57-bit IOVA)")
    p.add_argument("--max-domains", type=int, default=64, help="device domains per partition")
    p.add_argument("--bank0-size", type=int, default=1 << 30, help="bytes of hypervisor memory (sparse)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus metrics on this port (0 picks one; default: off)")
    p.add_argument("--flush-timeout", type=float, default=5.0, help="seconds a unit has to acknowledge a flush")
    p.add_argument("--trace", help="append every hypercall, admin change and fault report to this file as JSON "
                                   "lines (replay it with `pviommu replay`)")


def admin_token(args: argparse.Namespace) -> str:
    return admin_token_from(args.admin_token_file, "pviommu serve hypervisor")


def build(args: argparse.Namespace, listen: str | None = None) -> tuple[Host, RunningServer, GrpcInvalidator]:
    """Create the host and its server (used by ``run`` and by tests). A
    server that cannot listen raises BindError and leaves nothing behind."""
    problem = bind_problem(listen or args.listen)
    if problem:
        raise BindError(problem)
    token = admin_token(args)
    config = HypervisorConfig(five_level=args.five_level, max_domains_per_partition=args.max_domains,
                              bank0_bytes=args.bank0_size, flush_timeout_s=args.flush_timeout,
                              max_iova_width=57 if args.five_level else 48)
    invalidator = GrpcInvalidator(token, config.flush_timeout_s)
    own_dir = not args.memory_dir
    folder = make_bank_folder("pviommu-banks-", need_bytes=args.bank0_size) if own_dir else None
    memory_dir = folder.path if folder is not None else Path(args.memory_dir)
    memory_dir.mkdir(parents=True, exist_ok=True)
    host = Host(memory_dir, token, config, invalidator)
    host.owns_memory_dir = own_dir
    host.bank_note = folder.note if folder is not None else ""
    invalidator.use_queues(QueueHost(host.memory))
    if getattr(args, "trace", None):
        host.trace = TraceWriter(args.trace, config)

    def page_responder(caller: Partition, logical: int, request_id: int, success: bool) -> None:
        with host.lock:
            dev = host.devices.get(logical)
            if dev is None or dev.partition_id != caller.partition_id:
                raise HvError(HvStatus.ACCESS_DENIED, f"device {logical:#x} is not the caller's")
        try:
            invalidator.resolve_page_request(dev, request_id, success)
        except Exception as exc:
            raise HvError(HvStatus.PAGE_REQUEST_INVALID, str(exc)) from exc

    registry = CollectorRegistry()
    registry.register(CounterCollector("hypervisor", host.metrics, labels={
        "hypercalls": ("call", "status"), "faults_by_reason": ("reason",)},
        gauges=frozenset({"partitions", "devices", "domains", "stage2_table_frames"})))
    host.metrics_registry = registry
    try:
        server = create_server(listen or args.listen, [
            Service(HypervisorServicer(host, page_responder), hypervisor_pb2_grpc.add_HypervisorServicer_to_server,
                    "pviommu.v1.Hypervisor"),
            Service(AdminServicer(host), admin_pb2_grpc.add_AdminServicer_to_server, "pviommu.v1.Admin"),
            Service(DeviceHostServicer(host), admin_pb2_grpc.add_DeviceHostServicer_to_server,
                    "pviommu.v1.DeviceHost"),
        ], resolve=host.resolve, max_workers=32, interceptors=[RpcMetricsInterceptor(registry, "hypervisor")])
    except (RuntimeError, OSError) as exc:  # no bank file, socket or folder may outlive a failed start
        _discard(host, invalidator)
        raise BindError(f"cannot listen on {listen or args.listen}: {exc}") from exc
    return host, server, invalidator


def _discard(host: Host, invalidator: GrpcInvalidator) -> None:
    host.close()
    invalidator.close()
    if host.trace is not None:
        host.trace.close()
    if host.owns_memory_dir:
        shutil.rmtree(host.memory.directory, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    configure()
    bind_identity(service="hypervisor")
    log = get_logger()
    try:
        host, server, invalidator = build(args)
    except BindError as exc:
        log.error("hypervisor.bind_failed", error=str(exc))
        print(f"pviommu serve hypervisor: {exc}", file=sys.stderr)
        return CANNOT_BIND
    fs = filesystem_of(host.memory.directory)
    log.info("hypervisor.serving", port=server.port, memory_dir=str(host.memory.directory),
             five_level=host.config.five_level, banks_fs=fs.fs_type, banks_in_memory=fs.memory_backed,
             banks_free_bytes=fs.free_bytes)
    if host.bank_note:
        log.warning("hypervisor.banks_fallback", detail=host.bank_note)
    if not fs.memory_backed:
        log.warning("hypervisor.banks_on_disk", memory_dir=str(host.memory.directory), fs_type=fs.fs_type,
                    detail="every DMA byte goes through the page cache of a disk file; use a tmpfs (/dev/shm)")
    if args.metrics_port >= 0:
        try:
            port = serve_metrics(args.metrics_port, host.metrics_registry)
        except OSError as exc:
            print(f"pviommu serve hypervisor: cannot serve metrics on port {args.metrics_port}: {exc.strerror}",
                  file=sys.stderr)
            server.stop(0)
            _discard(host, invalidator)
            return CANNOT_BIND
        log.info("hypervisor.metrics", port=port)
    server.write_port_file(args.port_file)

    def shutdown() -> None:
        log.info("hypervisor.stopping")
        server.health.enter_graceful_shutdown()
        host.close()
        invalidator.close()
        if host.trace is not None:
            host.trace.close()
        if host.owns_memory_dir:
            shutil.rmtree(host.memory.directory, ignore_errors=True)

    server.wait_for_signal(on_stop=shutdown)
    return 0
