"""``pviommu serve hypervisor``: run the hypervisor service."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from hypervisor_svc.core.config import HypervisorConfig
from hypervisor_svc.core.host import Host
from hypervisor_svc.core.hypercalls import Hypercalls
from hypervisor_svc.core.trace import TraceWriter
from hypervisor_svc.faultring import FaultRings
from hypervisor_svc.hcpage import SESSIONS_PER_PARTITION, HcPages, session_opener
from hypervisor_svc.rpc.admin_servicer import AdminServicer, DeviceHostServicer
from hypervisor_svc.rpc.device_client import QueueLink
from hypervisor_svc.rpc.hypercall_servicer import HypervisorServicer
from pviommu.abi.revision import (
    DEFAULT_REVISION,
    REVISION_NAMES,
    BlockedWithoutTranslation,
    Revision,
    SameDomainAttach,
)
from pviommu.addr import SZ_1G, SZ_2M, SZ_4K
from pviommu.exitcodes import CANNOT_BIND
from pviommu.log import bind_identity, configure, get_logger
from pviommu.mem.placement import filesystem_of, make_bank_folder
from pviommu.rpc.auth import admin_token_from
from pviommu.rpc.bind import BindError, bind_problem
from pviommu.rpc.metrics import CounterCollector, RpcMetricsInterceptor, serve_metrics
from pviommu.rpc.server import RunningServer, Service, create_server
from pviommu.shm.invq import socket_path
from pviommu.shm.sessions import Opener, SessionServer
from pviommu.v1 import admin_pb2_grpc, hypervisor_pb2_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50051", help="address to serve on (port 0 picks one)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--memory-dir", help="folder of the memory banks (default: a new folder on /dev/shm, a tmpfs, "
                                        "when it has room; else in the temporary folder)")
    p.add_argument("--admin-token-file", help="file holding the admin token (default: $PVIOMMU_ADMIN_TOKEN)")
    p.add_argument("--revision", choices=REVISION_NAMES, default=DEFAULT_REVISION.value,
                   help="enforce this revision's semantics of the pv-IOMMU series (default: the latest, "
                        f"{DEFAULT_REVISION.value}); see docs/revisions.md")
    p.add_argument("--s2-baseline", action="store_true",
                   help="offer guests stage-2 (type 0) domains and Map/UnmapDeviceGpaPages -- the map-by-hypercall "
                        "baseline design -- and advertise HV_IOMMU_CAP_S2 (default: off, as the real interface)")
    p.add_argument("--same-domain-attach", choices=[c.value for c in SameDomainAttach],
                   default=SameDomainAttach.ALREADY_IN_DOMAIN.value,
                   help="answer to ATTACH of a device to the domain it is already in (the series is silent; "
                        "default: HV_STATUS_DEVICE_ALREADY_IN_DOMAIN)")
    p.add_argument("--blocked-without-translation", choices=[c.value for c in BlockedWithoutTranslation],
                   default=BlockedWithoutTranslation.REFUSE.value,
                   help="ConfigureDeviceDomain with blocked=1 and translation_enabled=0: refuse with "
                        "HV_STATUS_INVALID_PARAMETER (default) or accept it as blocked")
    p.add_argument("--pgsize-bitmap", type=lambda t: int(t, 0), default=SZ_4K | SZ_2M | SZ_1G,
                   help="pgsize_bitmap reported by GetIommuCapabilities (default 0x40201000: 4K|2M|1G)")
    p.add_argument("--max-iova-width", type=int, default=0,
                   help="max_iova_width reported by GetIommuCapabilities (default: 57 with --five-level, else 48)")
    p.add_argument("--five-level", action="store_true", help="offer 5-level stage-1 paging (57-bit IOVA)")
    p.add_argument("--max-domains", type=int, default=64, help="device domains per partition")
    p.add_argument("--table-quota", type=int, default=4096, metavar="FRAMES",
                   help="bank-0 table frames (4 KiB) one partition may hold; beyond: INSUFFICIENT_MEMORY")
    p.add_argument("--bank0-size", type=int, default=1 << 30, help="bytes of hypervisor memory (sparse)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus metrics on this port (0 picks one; default: off)")
    p.add_argument("--flush-timeout", type=float, default=5.0, help="seconds a unit has to acknowledge a flush")
    p.add_argument("--session-socket",
                   help="Unix socket of the data-plane sessions: hypercall pages and fault rings (default: "
                        "hypervisor.sock beside the banks, so on the shared banks volume under compose/k8s; "
                        "under /tmp when that path is too long for AF_UNIX)")
    p.add_argument("--no-hypercall-page", action="store_true",
                   help="offer no hypercall page: guests make every hypercall over gRPC")
    p.add_argument("--no-fault-rings", action="store_true",
                   help="offer no fault rings: guests read faults and page requests from the gRPC stream only")
    p.add_argument("--hypercall-page-sessions", type=int, default=SESSIONS_PER_PARTITION,
                   help=f"hypercall pages one partition may hold at once (default {SESSIONS_PER_PARTITION})")
    p.add_argument("--proposal-sva", action="store_true",
                   help="pviommu proposal, not in the series (docs/proposal-sva.md): PASID attach/detach, SVA and "
                        "page-group responses; advertises PASID and PRI and a PASID width")
    p.add_argument("--trace", help="append every hypercall, admin change and fault report to this file as JSON "
                                   "lines (replay it with `pviommu replay`)")


def sva_options(on: bool) -> dict[str, Any]:
    """HypervisorConfig fields of ``--proposal-sva`` (none when off: the series' defaults)."""
    if not on:
        return {}
    from hypervisor_svc.core.sva import PASID_WIDTH
    return {"proposal_sva": True, "pasid": True, "pri": True, "max_pasid_width": PASID_WIDTH}


def admin_token(args: argparse.Namespace) -> str:
    return admin_token_from(args.admin_token_file, "pviommu serve hypervisor")


def build(args: argparse.Namespace, listen: str | None = None) -> tuple[Host, RunningServer, QueueLink]:
    """Create the host and its server (used by ``run`` and by tests). A
    server that cannot listen raises BindError and leaves nothing behind."""
    problem = bind_problem(listen or args.listen)
    if problem:
        raise BindError(problem)
    token = admin_token(args)
    config = HypervisorConfig(
        five_level=args.five_level, max_domains_per_partition=args.max_domains, bank0_bytes=args.bank0_size,
        flush_timeout_s=args.flush_timeout, table_quota_frames=getattr(args, "table_quota", 4096),
        max_iova_width=getattr(args, "max_iova_width", 0) or (57 if args.five_level else 48),
        revision=Revision.parse(getattr(args, "revision", DEFAULT_REVISION)),
        s2_baseline=bool(getattr(args, "s2_baseline", False)),
        same_domain_attach=SameDomainAttach(getattr(args, "same_domain_attach", SameDomainAttach.ALREADY_IN_DOMAIN)),
        blocked_without_translation=BlockedWithoutTranslation(
            getattr(args, "blocked_without_translation", BlockedWithoutTranslation.REFUSE)),
        pgsize_bitmap=getattr(args, "pgsize_bitmap", SZ_4K | SZ_2M | SZ_1G),
        **sva_options(bool(getattr(args, "proposal_sva", False))))
    own_dir = not args.memory_dir
    folder = make_bank_folder("pviommu-banks-", need_bytes=args.bank0_size) if own_dir else None
    memory_dir = folder.path if folder is not None else Path(args.memory_dir)
    memory_dir.mkdir(parents=True, exist_ok=True)
    host = Host(memory_dir, token, config)
    link = QueueLink(host.memory, config.flush_timeout_s)
    host.units.link = link
    host.owns_memory_dir = own_dir
    host.bank_note = folder.note if folder is not None else ""
    if getattr(args, "trace", None):
        host.trace = TraceWriter(args.trace, config)

    registry = CollectorRegistry()
    registry.register(CounterCollector("hypervisor", host.metrics, labels={
        "hypercalls": ("call", "status"), "faults_by_reason": ("reason",)},
        gauges=frozenset({"partitions", "devices", "domains", "stage2_table_frames"})))
    # an info metric: pviommu_hypervisor_revision{revision="v2",s2_baseline="0"} 1
    info = {"revision": {(config.revision.value, str(int(config.s2_baseline))): 1}}
    registry.register(CounterCollector("hypervisor", lambda: info, labels={"revision": ("revision", "s2_baseline")},
                                       gauges=frozenset({"revision"})))
    host.metrics_registry = registry
    calls = Hypercalls(host)
    hv_servicer = HypervisorServicer(host, calls)
    openers: dict[str, Opener] = {}
    if not getattr(args, "no_hypercall_page", False):
        pages = HcPages(host, calls, per_partition=getattr(args, "hypercall_page_sessions", SESSIONS_PER_PARTITION))
        openers["hypercall_page"] = pages.open
        host.on_close.append(pages.close)
        hv_servicer.hcpage_sessions = pages.per_partition
    if not getattr(args, "no_fault_rings", False):
        rings = FaultRings(host)
        openers["faults"] = rings.open
        host.on_close.append(rings.close)
        hv_servicer.fault_rings = True
    if openers:
        sessions = SessionServer(getattr(args, "session_socket", None)
                                 or socket_path(memory_dir, "hypervisor.sock"), session_opener(openers))
        host.on_close.insert(0, sessions.close)
        hv_servicer.session_socket = sessions.path
    try:
        server = create_server(listen or args.listen, [
            Service(hv_servicer, hypervisor_pb2_grpc.add_HypervisorServicer_to_server,
                    "pviommu.v1.Hypervisor"),
            Service(AdminServicer(host), admin_pb2_grpc.add_AdminServicer_to_server, "pviommu.v1.Admin"),
            Service(DeviceHostServicer(host), admin_pb2_grpc.add_DeviceHostServicer_to_server,
                    "pviommu.v1.DeviceHost"),
        ], resolve=host.resolve, max_workers=32, interceptors=[RpcMetricsInterceptor(registry, "hypervisor")])
    except (RuntimeError, OSError) as exc:  # no bank file, socket or folder may outlive a failed start
        _discard(host, link)
        raise BindError(f"cannot listen on {listen or args.listen}: {exc}") from exc
    return host, server, link


def _discard(host: Host, link: QueueLink) -> None:
    host.close()
    link.close()
    if host.trace is not None:
        host.trace.close()
    if host.owns_memory_dir:
        shutil.rmtree(host.memory.directory, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    configure()
    bind_identity(service="hypervisor")
    log = get_logger()
    try:
        host, server, link = build(args)
    except BindError as exc:
        log.error("hypervisor.bind_failed", error=str(exc))
        print(f"pviommu serve hypervisor: {exc}", file=sys.stderr)
        return CANNOT_BIND
    fs = filesystem_of(host.memory.directory)
    log.info("hypervisor.serving", port=server.port, memory_dir=str(host.memory.directory),
             five_level=host.config.five_level, revision=host.config.revision.value,
             s2_baseline=host.config.s2_baseline, banks_fs=fs.fs_type, banks_in_memory=fs.memory_backed,
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
            _discard(host, link)
            return CANNOT_BIND
        log.info("hypervisor.metrics", port=port)
    server.write_port_file(args.port_file)

    def shutdown() -> None:
        log.info("hypervisor.stopping")
        server.health.enter_graceful_shutdown()
        host.close()
        link.close()
        if host.trace is not None:
            host.trace.close()
        if host.owns_memory_dir:
            shutil.rmtree(host.memory.directory, ignore_errors=True)

    server.wait_for_signal(on_stop=shutdown)
    return 0
