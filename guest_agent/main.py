"""``pviommu serve guest``: run one guest's agent.

Maps only this guest's bank file, authenticates to the hypervisor (and to its
devices) with the partition token, brings the IOMMU driver up (refusing to
start without an IOMMU unless ``--allow-no-iommu``), then serves the
``GuestAgent`` API to callers holding the same token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from guest_agent.agent import Agent, open_bank
from guest_agent.driver.domain import FlushMode
from guest_agent.errors import IommuAbsent
from guest_agent.rpc.servicer import GuestAgentServicer
from pviommu.abi.revision import DEFAULT_REVISION, REVISION_NAMES
from pviommu.errors import PviommuError
from pviommu.exitcodes import CANNOT_BIND, read_secret, usage_exit
from pviommu.log import bind_identity, configure, get_logger
from pviommu.rpc.auth import Principal, admin_token_from, tokens_equal
from pviommu.rpc.bind import BindError, bind_problem
from pviommu.rpc.client import connect, print_waiting
from pviommu.rpc.metrics import CounterCollector, RpcMetricsInterceptor, serve_metrics
from pviommu.rpc.server import RunningServer, Service, create_server
from pviommu.units import parse_size
from pviommu.v1 import guest_pb2_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50061", help="address to serve on (port 0 picks one)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--hypervisor", required=True, help="address of the hypervisor service (host:port)")
    p.add_argument("--bank-path", help="this guest's RAM bank file (from CreatePartition)")
    p.add_argument("--token-file", help="file holding the partition token (default: $PVIOMMU_TOKEN)")
    launcher = p.add_argument_group(
        "launcher mode", "boot as a VM launcher would (docker-compose, Kubernetes): create this guest's partition "
        "with the admin credential -- or, if it exists, reset it (a reboot) -- instead of taking a token and bank")
    launcher.add_argument("--provision", metavar="NAME", help="partition name to create or reset")
    launcher.add_argument("--memory", default="256M", help="RAM of a created partition (e.g. 256M, 1G)")
    launcher.add_argument("--token-out", help="write the partition token here (for scripts and the scenario)")
    launcher.add_argument("--admin-token-file", help="admin credential (default: $PVIOMMU_ADMIN_TOKEN)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus metrics on this port (0 picks one; default: off)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for the hypervisor to answer (a 'waiting for' line every few seconds)")
    p.add_argument("--allow-no-iommu", action="store_true",
                   help="run with untranslated DMA when no para-virtual IOMMU is offered (default: refuse)")
    p.add_argument("--revision", choices=REVISION_NAMES, default=DEFAULT_REVISION.value,
                   help="behave as this revision's driver of the pv-IOMMU series (default: the latest, "
                        f"{DEFAULT_REVISION.value}); see docs/revisions.md")
    p.add_argument("--grpc-only", action="store_true",
                   help="make every hypercall over gRPC and read page requests from the gRPC fault stream, "
                        "even when the hypervisor offers a hypercall page and fault rings (docs/transports.md)")
    p.add_argument("--proposal-sva", action="store_true",
                   help="pviommu proposal, not in the series (docs/proposal-sva.md): SVA processes bound to PASIDs "
                        "and their page requests; needs a hypervisor started with --proposal-sva")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="flush_mode", action="store_const", const="strict",
                      help="flush the IOTLB on every unmap (default)")
    mode.add_argument("--lazy", dest="flush_mode", action="store_const", const="lazy",
                      help="batch IOTLB flushes (Linux DMA_FQ): IOVAs are reused only after the batch flush")
    p.set_defaults(flush_mode="strict")


def partition_token(args: argparse.Namespace) -> str:
    if args.token_file:
        return read_secret(args.token_file, "pviommu serve guest", "token")
    token = os.environ.get("PVIOMMU_TOKEN", "")
    if not token:
        usage_exit("pviommu serve guest: set PVIOMMU_TOKEN or --token-file (there is no default credential)")
    return token


def provision(args: argparse.Namespace) -> tuple[str, str]:
    """Create (or reset, if it exists) the partition named ``--provision``;
    return its token and bank path. A reset reclaims everything a previous
    boot set up (domains, attachments, faults) and zeroes the RAM."""
    from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2

    try:
        memory = parse_size(args.memory)
    except ValueError as exc:
        raise SystemExit(f"pviommu serve guest: --memory {exc}") from None
    admin_token = admin_token_from(args.admin_token_file, "pviommu serve guest --provision")
    channel = connect(args.hypervisor, admin_token, ready_timeout=args.connect_timeout, what="the hypervisor",
                      on_wait=_waiting)
    try:
        admin = admin_pb2_grpc.AdminStub(channel)
        existing = [p for p in admin.ListPartitions(common_pb2.Empty(), timeout=30).partitions
                    if p.name == args.provision]
        if existing:
            reply = admin.ResetPartition(admin_pb2.PartitionRequest(partition_id=existing[0].partition_id), timeout=60)
        else:
            reply = admin.CreatePartition(admin_pb2.CreatePartitionRequest(
                name=args.provision, memory_bytes=memory), timeout=60)
        if reply.result.status != 0:
            raise SystemExit(f"provisioning {args.provision} refused: {reply.result.status_name}: "
                             f"{reply.result.message}")
    finally:
        channel.close()
    if args.token_out:
        out = Path(args.token_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(reply.token)
        tmp.chmod(0o600)
        tmp.rename(out)
    return reply.token, reply.partition.bank_path


def build(args: argparse.Namespace, token: str | None = None, listen: str | None = None) -> tuple[Agent, RunningServer]:
    """Start the driver and its server (used by ``run`` and by tests)."""
    token = token or partition_token(args)
    channel = connect(args.hypervisor, token, ready_timeout=getattr(args, "connect_timeout", 10.0),
                      what="the hypervisor", on_wait=_waiting)
    bank = open_bank(args.bank_path)
    agent = Agent(channel, token, bank, mode=FlushMode(args.flush_mode), allow_no_iommu=args.allow_no_iommu,
                  revision=getattr(args, "revision", DEFAULT_REVISION),
                  hypercall_page=not getattr(args, "grpc_only", False),
                  sva=bool(getattr(args, "proposal_sva", False)))
    bind_identity(partition=agent.partition_id)
    try:
        agent.start()
    except BaseException:
        channel.close()
        bank.close()
        raise

    def resolve(candidate: str) -> Principal | None:
        return Principal("partition", agent.partition_id) if tokens_equal(candidate, token) else None

    registry = CollectorRegistry()
    registry.register(CounterCollector("guest", agent.counters, gauges=frozenset(
        {"table_frames", "iova_allocated", "frames_allocated", "buffers", "domains", "pending_unmaps"})))
    agent.metrics_registry = registry
    try:
        server = create_server(listen or args.listen, [
            Service(GuestAgentServicer(agent), guest_pb2_grpc.add_GuestAgentServicer_to_server,
                    "pviommu.v1.GuestAgent"),
        ], resolve=resolve, max_workers=32, interceptors=[RpcMetricsInterceptor(registry, "guest")])
    except (RuntimeError, OSError) as exc:  # the driver detaches its domains on the way out
        agent.close()
        channel.close()
        bank.close()
        raise BindError(f"cannot listen on {listen or args.listen}: {exc}") from exc
    return agent, server


def _waiting(message: str) -> None:
    get_logger().info("guest.waiting", detail=message)
    print_waiting(message)


def run(args: argparse.Namespace) -> int:
    configure()
    bind_identity(service="guest")
    log = get_logger()
    token = None
    problem = bind_problem(args.listen)
    if problem:
        print(f"pviommu serve guest: {problem}", file=sys.stderr)
        return CANNOT_BIND
    try:
        if args.provision:
            token, args.bank_path = provision(args)
        elif not args.bank_path:
            print("pviommu serve guest: --bank-path (or --provision NAME) is required", file=sys.stderr)
            return 2
        agent, server = build(args, token)
    except BindError as exc:
        log.error("guest.bind_failed", error=str(exc))
        print(f"pviommu serve guest: {exc}", file=sys.stderr)
        return CANNOT_BIND
    except IommuAbsent as exc:
        log.error("guest.no_iommu", error=str(exc))
        print(f"pviommu serve guest: {exc}", file=sys.stderr)
        return 3
    except (PviommuError, ConnectionError, FileNotFoundError) as exc:
        log.error("guest.start_failed", error=str(exc))
        print(f"pviommu serve guest: {exc}", file=sys.stderr)
        return 2
    log.info("guest.serving", port=server.port, partition=agent.partition_id, mode=args.flush_mode,
             revision=agent.iommu.revision.value, devices=len(agent.iommu.devices))
    if args.metrics_port >= 0:
        try:
            log.info("guest.metrics", port=serve_metrics(args.metrics_port, agent.metrics_registry))
        except OSError as exc:
            print(f"pviommu serve guest: cannot serve metrics on port {args.metrics_port}: {exc.strerror}",
                  file=sys.stderr)
            server.stop(0)
            agent.close()
            return CANNOT_BIND
    server.write_port_file(args.port_file)

    def shutdown() -> None:
        log.info("guest.stopping")
        server.health.enter_graceful_shutdown()
        try:
            agent.close()
        except Exception as exc:  # keep shutting down
            log.warning("guest.close_failed", error=str(exc))

    server.wait_for_signal(on_stop=shutdown)
    return 0
