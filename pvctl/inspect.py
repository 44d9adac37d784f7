"""``pviommu inspect ADDR WHAT``: the admin view of a running hypervisor.

    partitions | devices | domains | stats | faults     tables (or --json)
    stage2  --partition N                             a partition's GPA -> HPA table as a tree
    stage1  --partition N --domain D                  a domain's IOVA -> GPA table as a tree
    explain --partition N (--device ID | --domain D) --iova X [--write] [--svg FILE]
                                                      every step of the nested walk of one IOVA

Everything comes from Admin RPCs (admin credential): the hypervisor is the
one place that reads bank 0 and every partition's RAM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from pvctl import exitcodes
from pvctl.console import make_console
from pviommu.client.fmt import message_to_json
from pviommu.client.inspect import dump_text, explain_text
from pviommu.rpc.client import connect, print_waiting
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2

LISTS = ("partitions", "devices", "domains", "stats", "faults")
WHATS = (*LISTS, "stage2", "stage1", "explain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHATS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--partition", type=lambda s: int(s, 0), default=0, help="partition id (stage2/stage1/explain)")
    p.add_argument("--domain", type=lambda s: int(s, 0), default=0, help="guest domain id (stage1/explain)")
    p.add_argument("--device", type=lambda s: int(s, 0), default=0, help="logical device id (explain)")
    p.add_argument("--iova", type=lambda s: int(s, 0), help="the IOVA to explain")
    p.add_argument("--write", action="store_true", help="explain a write (default: a read)")
    p.add_argument("--pasid", type=lambda s: int(s, 0), default=0,
                   help="explain: a request with this PASID (SVA proposal, not in the series; with --device)")
    p.add_argument("--svg", help="explain: also draw the walk into this SVG file")
    p.add_argument("--fail-on-status", action="store_true",
                   help="explain: exit 1 when the walk faults (a refused request always exits 1)")


def _dict(m: Any) -> dict[str, Any]:
    return message_to_json(m, proto_names=True)


def _rows(msgs: Any) -> list[dict[str, Any]]:
    return [message_to_json(m) for m in msgs]


def _usage(msg: str) -> int:
    print(f"pviommu inspect: {msg}", file=sys.stderr)
    return exitcodes.USAGE


def run_inspect(args: argparse.Namespace, token: str | None) -> int:
    what = args.what
    if what in ("stage2", "stage1", "explain") and not args.partition:
        return _usage(f"{what} needs --partition N")
    if what == "stage1" and not args.domain:
        return _usage("stage1 needs --domain D")
    if what == "explain" and (args.iova is None or bool(args.device) == bool(args.domain)):
        return _usage("explain needs --iova X and exactly one of --device ID / --domain D")
    try:
        channel = connect(args.address, token, what="the hypervisor", on_wait=print_waiting)
    except ConnectionError as exc:
        print(f"pviommu inspect: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    admin = admin_pb2_grpc.AdminStub(channel)
    try:
        if what in LISTS:
            return _lists(admin, args)
        if what == "stage2":
            dump = admin.DumpStage2(admin_pb2.DumpStage2Request(partition_id=args.partition), timeout=30)
            return _print_dump(dump, f"stage 2 of partition {args.partition}", args.json)
        if what == "stage1":
            dump = admin.DumpStage1(admin_pb2.DumpStage1Request(partition_id=args.partition, domain_id=args.domain),
                                    timeout=30)
            return _print_dump(dump, f"stage 1 of domain {args.domain} in partition {args.partition}", args.json)
        reply = admin.ExplainIova(admin_pb2.ExplainIovaRequest(
            partition_id=args.partition, logical_device_id=args.device, domain_id=args.domain, iova=args.iova,
            write=args.write, pasid=getattr(args, "pasid", 0)), timeout=30)
        return _print_explain(reply, args)
    except grpc.RpcError as exc:
        print(f"pviommu inspect: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return exitcodes.for_rpc(exc.code())
    finally:
        channel.close()


def _lists(admin: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    if args.what == "partitions":
        rows = _rows(admin.ListPartitions(common_pb2.Empty(), timeout=10).partitions)
    elif args.what == "devices":
        rows = _rows(admin.ListDevices(common_pb2.Empty(), timeout=10).devices)
    elif args.what == "domains":
        rows = _rows(admin.ListDomains(admin_pb2.ListDomainsRequest(), timeout=10).domains)
    elif args.what == "stats":
        counters = admin.GetStats(common_pb2.Empty(), timeout=10).counters
        rows = [{"counter": k, "value": v} for k, v in sorted(counters.items())]
    else:
        rows = _rows(admin.StreamFaults(admin_pb2.StreamFaultsAdminRequest(follow=False), timeout=10))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=args.what)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    for k in keys:
        table.add_column(k)
    for row in rows:
        table.add_row(*[str(row.get(k, "")) for k in keys])
    make_console().print(table)
    return exitcodes.OK


def _refused(result: Any) -> int:
    print(f"pviommu inspect: {result.status_name}: {result.message}", file=sys.stderr)
    return exitcodes.FAILED


def _print_dump(dump: admin_pb2.TableDump, title: str, as_json: bool) -> int:
    if dump.result.status:
        return _refused(dump.result)
    print(json.dumps(_dict(dump), indent=2) if as_json else dump_text(dump, title))
    return 0


def _print_explain(reply: admin_pb2.ExplainIovaReply, args: argparse.Namespace) -> int:
    if reply.result.status:
        return _refused(reply.result)
    if args.svg:
        from pvctl.walk_svg import walk_svg

        with open(args.svg, "w", encoding="utf-8") as fh:
            fh.write(walk_svg(reply, args.iova, args.write))
    if reply.pasid_steps and not args.json:  # the SVA proposal: the PASID level first
        print(f"PASID {reply.pasid:#x}:")
        for s in reply.pasid_steps:
            print(f"  {s.note:<40} at {s.table:#x} [{s.index}] = {s.entry:#018x}")
    print(json.dumps(_dict(reply), indent=2) if args.json else explain_text(reply, args.iova, args.write))
    if args.fail_on_status and not reply.ok:
        print(f"pviommu inspect: the walk faults: {reply.fault_reason_name}", file=sys.stderr)
        return exitcodes.FAILED
    return exitcodes.OK
