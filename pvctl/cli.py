"""The ``pviommu`` command: one entry point, one subcommand per job.

    pviommu run                      local virtual system + dmatest (the main job)
    pviommu serve hypervisor|guest|dsa   run one service
    pviommu dmatest ADDR             run dmatest in a running guest agent
    pviommu bench                    the benchmark suite
    pviommu inspect ...              look at domains, tables and walks
    pviommu replay TRACE --hypervisor ADDR   replay a hypervisor trace against a fresh one
    pviommu grpc list|describe|call|health   reflection-based gRPC client
    pviommu compose endpoints        endpoints and tokens of a docker-compose stack

Each service package exposes ``main.add_arguments(parser)`` and
``main.run(args) -> int``; this module only dispatches. Exit codes:
``pviommu.exitcodes`` (docs/cli.md).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

SERVICES = {"hypervisor": "hypervisor_svc.main", "guest": "guest_agent.main", "dsa": "dma_device.main"}


def _token_from(args: argparse.Namespace) -> str | None:
    token: str | None = getattr(args, "token", None)
    if token:
        return token
    path = getattr(args, "token_file", None)
    if path:
        from pviommu.exitcodes import read_secret

        return read_secret(path, f"pviommu {args.command}" if getattr(args, "command", None) else "pviommu", "token")
    return os.environ.get("PVIOMMU_TOKEN") or None


def _add_token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="bearer token (default: $PVIOMMU_TOKEN)")
    p.add_argument("--token-file", help="read the bearer token from this file")


def cmd_grpc(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from pvctl import exitcodes
    from pvctl.grpc_client import ReflectionClient
    from pviommu.rpc.client import connect

    metadata = [tuple(h.split(":", 1)) for h in args.header]
    metadata = [(k.strip().lower(), v.strip()) for k, v in metadata]
    token = _token_from(args)
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    try:
        channel = connect(args.address, ready_timeout=args.connect_timeout)
    except ConnectionError as exc:
        print(f"pviommu grpc: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    client = ReflectionClient(channel, metadata)
    try:
        if args.grpc_cmd == "health":
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            except grpc.RpcError as exc:
                print(f"pviommu grpc health: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return exitcodes.HEALTH_RPC_FAILED
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            print(status)
            return exitcodes.OK if reply.status == health_pb2.HealthCheckResponse.SERVING else exitcodes.UNHEALTHY
        if args.grpc_cmd == "list":
            if args.service:
                svc = client.service(args.service)
                for m in svc.methods:
                    print(f"{svc.full_name}/{m.name}")
            else:
                for name in client.services():
                    print(name)
        elif args.grpc_cmd == "describe":
            print(client.describe(args.symbol))
        else:
            data = args.data
            if data == "@-":
                data = sys.stdin.read()
            elif data.startswith("@"):
                try:
                    data = Path(data[1:]).read_text()
                except OSError as exc:
                    print(f"pviommu grpc call: cannot read {data[1:]}: {exc.strerror}", file=sys.stderr)
                    return exitcodes.USAGE
            refused = []
            for reply in client.call(args.method, data, timeout=args.timeout):
                print(json.dumps(reply, indent=None if args.compact else 2))
                sys.stdout.flush()
                result = reply.get("result")
                if isinstance(result, dict) and result.get("status"):
                    refused.append(f"{result.get('statusName') or result['status']}: {result.get('message', '')}")
            if refused and args.fail_on_status:
                print(f"pviommu grpc call: answered {refused[0]}".rstrip(": "), file=sys.stderr)
                return exitcodes.FAILED
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        print(f"pviommu grpc call: the request is not valid for {args.method}: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return exitcodes.USAGE
    except (LookupError, ValueError) as exc:
        print(f"pviommu grpc: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except grpc.RpcError as exc:
        from pviommu.rpc.status import error_info

        info = error_info(exc)
        print(f"pviommu grpc: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if info:
            print(json.dumps({"error": exc.code().name, "details": exc.details(), **info}), file=sys.stderr)
        return exitcodes.for_rpc(exc.code())
    finally:
        channel.close()
    return exitcodes.OK


def cmd_serve(args: argparse.Namespace) -> int:
    from pviommu.client.procs import exit_with_supervisor

    exit_with_supervisor()  # launched by `pviommu run` or the client: end with it, even after its SIGKILL
    module = importlib.import_module(SERVICES[args.service])
    rc: int = module.run(args)
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    from pvctl.local import run_local

    return run_local(args)


def cmd_dmatest(args: argparse.Namespace) -> int:
    from pvctl.dmatest_client import run_remote_dmatest

    return run_remote_dmatest(args, _token_from(args))


def cmd_guest(args: argparse.Namespace) -> int:
    from pvctl.guest_cli import run_guest_cli

    return run_guest_cli(args, _token_from(args))


def cmd_scenario(args: argparse.Namespace) -> int:
    from pvctl.scenario import run_cli

    return run_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from pvctl.bench import run_bench

    return run_bench(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pvctl.inspect import run_inspect

    return run_inspect(args, _token_from(args))


def cmd_replay(args: argparse.Namespace) -> int:
    from pvctl.replay import run_replay

    return run_replay(args, _token_from(args))


def cmd_compose(args: argparse.Namespace) -> int:
    from pvctl.compose import run_compose

    return run_compose(args)


def size_arg(text: str) -> int:
    """argparse type for sizes: ``256M``, ``1G``, ``0x4000``."""
    from pviommu.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def guest_memory_arg(text: str) -> int:
    """A guest's RAM: a multiple of 2 MiB below 1 TiB (one bank window)."""
    n = size_arg(text)
    if n <= 0 or n % (2 << 20) or n >= 1 << 40:
        raise argparse.ArgumentTypeError(f"{text}: a guest's RAM is a multiple of 2 MiB below 1 TiB")
    return n


def add_dmatest_options(p: argparse.ArgumentParser) -> None:
    """The Linux dmatest module parameters (names kept)."""
    p.add_argument("--test-buf-size", type=int, default=16384)
    p.add_argument("--threads-per-chan", type=int, default=1)
    p.add_argument("--max-channels", type=int, default=0)
    p.add_argument("--channel", default="", help="the channel to test, e.g. dma0chan0 (default: any)")
    p.add_argument("--device", default="", help="the DSA device to test, by name (default: any)")
    p.add_argument("--iterations", type=int, default=100, help="tests per thread (0: until stopped, Ctrl-C)")
    p.add_argument("--timeout", type=int, default=3000, help="ms per transfer (-1: infinite, 0: no wait)")
    p.add_argument("--verbose", action="store_true", help="print a 'test passed' result line per passing test")
    p.add_argument("--noverify", action="store_true")
    p.add_argument("--norandom", action="store_true")
    p.add_argument("--alignment", type=int, default=-1)
    p.add_argument("--transfer-size", type=int, default=0)
    p.add_argument("--polled", action="store_true",
                   help="poll completion records (default: descriptors raise completion interrupts and the "
                        "wait wakes on them, as dmaengine's DMA_PREP_INTERRUPT)")
    p.add_argument("--design", choices=["nested", "baseline"], default="nested",
                   help="nested: guest stage-1 tables; baseline: map-by-hypercall stage-2 domain")
    p.add_argument("--seed", type=int, default=0)


class Parser(argparse.ArgumentParser):
    """A command-line mistake is one line and exit code 2, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(serve_only: str | None = None, command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``serve_only`` only ``serve <that service>``
    is built (a service process then imports no other service's code), with
    ``command`` the other commands' options that need imports are left out
    (a health probe, run every second in every container, stays light)."""

    from pviommu.abi.revision import DEFAULT_REVISION, REVISION_NAMES

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = Parser(
        prog="pviommu",
        description="Software twin of Hyper-V's para-virtualized IOMMU for guest partitions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="start a local virtual system and run dmatest")
    p.add_argument("--guests", type=int, default=1)
    p.add_argument("--devices", type=int, default=1, help="DSA devices per guest")
    p.add_argument("--memory", type=guest_memory_arg, default="256M", help="RAM per guest (e.g. 256M, 1G)")
    p.add_argument("--memory-dir", help="where to put the memory banks (default: a new folder on /dev/shm, a tmpfs, "
                                        "when it has room; else the temporary folder)")
    p.add_argument("--keep", action="store_true",
                   help="after the result, keep the services running until Ctrl-C/SIGTERM and write an endpoints "
                        "file (addresses, tokens, metrics ports, bank folder)")
    p.add_argument("--endpoints", metavar="FILE", help="with --keep: write the endpoints here (default: in the "
                                                       "run's folder, printed)")
    p.add_argument("--metrics", action="store_true", help="every service serves Prometheus metrics (on with --keep)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result")
    p.add_argument("--junit-xml", metavar="FILE", help="also write the result as a JUnit XML report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (terminal) or lines (otherwise)")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="off a terminal: a progress line this often (0: none)")
    p.add_argument("--lazy", action="store_true",
                   help="guests batch IOTLB flushes (Linux DMA_FQ) instead of flushing on every unmap")
    p.add_argument("--revision", choices=REVISION_NAMES, default=DEFAULT_REVISION.value,
                   help="revision of the pv-IOMMU series the hypervisor enforces and the guests' driver follows "
                        "(default: the latest, v2; docs/revisions.md)")
    p.add_argument("--guest-revision", choices=REVISION_NAMES,
                   help="run the guests' driver as another revision than the hypervisor (e.g. a v1 driver on a "
                        "v2 hypervisor); default: --revision")
    p.add_argument("--sva", action="store_true",
                   help="pviommu proposal, not in the series (docs/proposal-sva.md): start the hypervisor and the "
                        "guests with --proposal-sva and, after dmatest, run a dsa_test-style SVA test in each guest "
                        "(a process's own addresses on a shared WQ under its PASID, the destination faulted in "
                        "by page requests)")
    p.add_argument("--sva-size", type=int, default=64 << 10, help="bytes per SVA memmove (with --sva)")
    p.add_argument("--sva-iterations", type=int, default=4, help="SVA memmoves per guest (with --sva)")
    add_dmatest_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="run one service")
    ssub = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, modname in SERVICES.items():
        if serve_only is not None and name != serve_only:
            continue
        sp = ssub.add_parser(name, help=f"run the {name} service")
        sp.set_defaults(func=cmd_serve)
        if serve_only is None:  # only `serve <that service>` pays for importing a service (health probes
            continue  # run this command every second in every container)
        try:
            importlib.import_module(modname).add_arguments(sp)
        except ImportError as exc:  # a partial checkout: say what is missing when used
            sp.set_defaults(missing=str(exc))

    if serve_only is not None:
        return parser

    p = sub.add_parser("dmatest", help="run dmatest in a running guest agent")
    p.add_argument("address", help="guest agent address host:port")
    _add_token_args(p)
    p.add_argument("--json", action="store_true")
    add_dmatest_options(p)
    p.set_defaults(func=cmd_dmatest)

    p = sub.add_parser("guest", help="drive a running guest agent (map, unmap, alloc, submit, ...)",
                       description="Operations of the GuestAgent API from a shell; fields as field=value. "
                                   "`pviommu guest ADDR OPERATION --help` lists an operation's fields.")
    if wanted("guest"):
        from pvctl.guest_cli import add_arguments as add_guest_arguments

        add_guest_arguments(p, _add_token_args)
    p.set_defaults(func=cmd_guest)

    p = sub.add_parser("scenario", help="run the scripted scenario against a running system")
    if wanted("scenario"):
        from pvctl.scenario import add_arguments as add_scenario_arguments

        add_scenario_arguments(p)
    p.set_defaults(func=cmd_scenario)

    p = sub.add_parser("bench", help="run the benchmark suite (ratios against same-run references)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    p.add_argument("--banks", action="store_true",
                   help="only compare memory banks on a tmpfs with banks in a disk folder (its block of the report)")
    p.add_argument("--output", default="docs/benchmarks.md", help="where to write the report ('' = none)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="inspect a running hypervisor: partitions, devices, domains, walks")
    p.add_argument("address", help="hypervisor address host:port")
    _add_token_args(p)
    if wanted("inspect"):
        from pvctl.inspect import add_arguments as add_inspect_arguments

        add_inspect_arguments(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("replay", help="replay a hypervisor trace (serve hypervisor --trace) against a fresh one")
    p.add_argument("trace", help="the JSON-lines trace file")
    p.add_argument("--hypervisor", required=True, help="address of the (fresh) hypervisor host:port")
    _add_token_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true",
                   help="replay even when the hypervisor already has partitions or devices (ids will differ)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("compose", help="a docker-compose stack: its endpoints and tokens for host scripts")
    csub = p.add_subparsers(dest="compose_cmd", required=True, metavar="ACTION")
    cp = csub.add_parser("endpoints", help="write (or print) the endpoints file of a running stack")
    cp.add_argument("-p", "--project-name", default=os.environ.get("COMPOSE_PROJECT_NAME", ""),
                    help="the compose project (default: $COMPOSE_PROJECT_NAME, else the current folder's name)")
    cp.add_argument("-o", "--output", metavar="FILE", help="write the endpoints here (default: print them)")
    cp.add_argument("--container-ips", action="store_true",
                    help="use container addresses even where ports are published")
    cp.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="how long to wait for a booting stack's guests to write their tokens")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("grpc", help="reflection-based gRPC client (like grpcurl)")
    gsub = p.add_subparsers(dest="grpc_cmd", required=True, metavar="ACTION")
    common = Parser(add_help=False)
    common.add_argument("address", help="server address host:port")
    _add_token_args(common)
    common.add_argument("-H", "--header", action="append", default=[], help="extra metadata 'key: value'")
    common.add_argument("--connect-timeout", type=float, default=5.0)
    gp = gsub.add_parser("list", parents=[common], help="list services, or the methods of one")
    gp.add_argument("service", nargs="?")
    gp = gsub.add_parser("health", parents=[common], help="standard gRPC health check; exit 0 if SERVING")
    gp.add_argument("service", nargs="?", default="", help="service name ('' = the whole server)")
    gp.add_argument("--timeout", type=float, default=5.0)
    gp = gsub.add_parser("describe", parents=[common], help="describe a service, method, message or enum")
    gp.add_argument("symbol")
    gp = gsub.add_parser("call", parents=[common], help="call a method with a JSON request; prints JSON")
    gp.add_argument("method", help="package.Service/Method")
    gp.add_argument("-d", "--data", default="{}", help="JSON request ('@-' reads stdin, '@FILE' a file)")
    gp.add_argument("--timeout", type=float, default=30.0)
    gp.add_argument("--compact", action="store_true", help="one JSON object per line")
    gp.add_argument("--fail-on-status", action="store_true",
                    help="exit 1 when an answer carries an HV status other than SUCCESS (result.status)")
    p.set_defaults(func=cmd_grpc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["guest"] and len(argv) >= 2 and ("-h" in argv or "--help" in argv):
        from pvctl.guest_cli import OPERATIONS

        if argv[1] in OPERATIONS:
            argv.insert(1, "ADDR")  # `pviommu guest OPERATION --help`: the operation's help, no address needed
    serving = argv[1] if len(argv) > 1 and argv[0] == "serve" and argv[1] in SERVICES else None
    command = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(serving, command).parse_args(argv)
    if getattr(args, "missing", None):
        print(f"pviommu: this service is not available in this installation: {args.missing}", file=sys.stderr)
        return 2
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pviommu ... | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
