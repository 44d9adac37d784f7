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
from google.protobuf import json_format

from pviommu.rpc.client import connect
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
    p.add_argument("--svg", help="explain: also draw the walk into this SVG file")


def _dict(m: Any) -> dict[str, Any]:
    return json_format.MessageToDict(m, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)


def _rows(msgs: Any) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(m, always_print_fields_with_no_presence=True) for m in msgs]


def _usage(msg: str) -> int:
    print(f"pviommu inspect: {msg}", file=sys.stderr)
    return 2


def run_inspect(args: argparse.Namespace, token: str | None) -> int:
    what = args.what
    if what in ("stage2", "stage1", "explain") and not args.partition:
        return _usage(f"{what} needs --partition N")
    if what == "stage1" and not args.domain:
        return _usage("stage1 needs --domain D")
    if what == "explain" and (args.iova is None or bool(args.device) == bool(args.domain)):
        return _usage("explain needs --iova X and exactly one of --device ID / --domain D")
    try:
        channel = connect(args.address, token)
    except ConnectionError as exc:
        print(f"pviommu inspect: {exc}", file=sys.stderr)
        return 2
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
            write=args.write), timeout=30)
        return _print_explain(reply, args)
    except grpc.RpcError as exc:
        print(f"pviommu inspect: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=args.what)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    for k in keys:
        table.add_column(k)
    for row in rows:
        table.add_row(*[str(row.get(k, "")) for k in keys])
    Console().print(table)
    return 0


def _refused(result: Any) -> int:
    print(f"pviommu inspect: {result.status_name}: {result.message}", file=sys.stderr)
    return 1


def _size(lg2: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if lg2 >= shift:
            return f"{1 << (lg2 - shift)}{unit}"
    return str(1 << lg2)


def dump_text(dump: admin_pb2.TableDump, title: str) -> str:
    """The tree, one present entry a line, indented by depth; then the ranges."""
    lines = [f"{title}: {dump.format}, {dump.input_space} -> {dump.output_space}, root {dump.table_space} "
             f"{dump.root:#x}, {dump.tables_read} table pages"]
    top = max((e.level for e in dump.entries), default=0)
    entries = list(dump.entries)
    i = 0
    while i < len(entries):
        e = entries[i]
        pad = "  " * (top - e.level)
        if e.type == "TABLE":
            tail = f"table {dump.table_space} {e.oa:#x}" + (f"  UNREADABLE: {e.error}" if e.error else "")
            lines.append(f"{pad}L{e.level}[{e.index:3d}] {dump.input_space} {e.va:#x}: {tail}")
            i += 1
            continue
        # a run of leaves of one table with contiguous VA and OA and equal rights: one line
        j, step = i + 1, 1 << e.size_lg2
        while (j < len(entries) and entries[j].type == "OA" and entries[j].table == e.table
               and entries[j].va == e.va + (j - i) * step and entries[j].oa == e.oa + (j - i) * step
               and entries[j].perm == e.perm):
            j += 1
        n = j - i
        where = f"[{e.index:3d}]" if n == 1 else f"[{e.index}..{entries[j - 1].index}]"
        what = f"{_size(e.size_lg2)} leaf" if n == 1 else f"{n} x {_size(e.size_lg2)} leaves"
        lines.append(f"{pad}L{e.level}{where} {dump.input_space} {e.va:#x}: {what} -> {dump.output_space} "
                     f"{e.oa:#x} {e.perm}")
        i = j
    if dump.truncated:
        lines.append("... truncated: too many table pages")
    lines.append(f"mapped ranges ({len(dump.ranges)}):")
    for r in dump.ranges:
        lines.append(f"  {dump.input_space} {r.va:#x}..{r.va + r.size - 1:#x} -> {dump.output_space} {r.oa:#x} "
                     f"({r.size:#x} bytes) {r.perm}")
    return "\n".join(lines)


def _print_dump(dump: admin_pb2.TableDump, title: str, as_json: bool) -> int:
    if dump.result.status:
        return _refused(dump.result)
    print(json.dumps(_dict(dump), indent=2) if as_json else dump_text(dump, title))
    return 0


def _step_text(s: admin_pb2.WalkStep) -> str:
    if s.stage == "S2":
        return f"S2 L{s.level}[{s.index:3d}] of HPA {s.table:#x} = {s.entry:#018x}  {s.note}"
    return f"S1 L{s.level}[{s.index:3d}] of GPA {s.table:#x} (HPA {s.table_hpa:#x}) = {s.entry:#018x}  {s.note}"


def explain_text(reply: admin_pb2.ExplainIovaReply, iova: int, write: bool) -> str:
    lines = [f"{'write' if write else 'read'} of IOVA {iova:#x}: context {reply.pgtt or 'unreadable'} "
             f"DID {reply.did} (slot {reply.slot})", f"  {reply.context}"]
    for lv in reply.levels:
        lines.append(f"stage-1 level {lv.level}: table at GPA {lv.table_gpa:#x}")
        lines += [f"    {_step_text(s)}" for s in lv.stage2]
        if lv.has_stage1:
            lines.append(f"  {_step_text(lv.stage1)}")
    if reply.final_stage2:
        lines.append(f"stage 2 of {'the output GPA' if reply.levels else 'the IOVA as GPA'} "
                     f"{reply.final_stage2[0].va:#x}:")
        lines += [f"    {_step_text(s)}" for s in reply.final_stage2]
    if reply.ok:
        lines.append(f"result: HPA {reply.hpa:#x} (2^{reply.size_lg2} page, {'write' if write else 'read'} "
                     f"allowed), {reply.reads} entry reads")
    else:
        lines.append(f"result: fault {reply.fault_reason_name} ({reply.fault_reason:#x}): {reply.fault_detail}")
    return "\n".join(lines)


def _print_explain(reply: admin_pb2.ExplainIovaReply, args: argparse.Namespace) -> int:
    if reply.result.status:
        return _refused(reply.result)
    if args.svg:
        from pvctl.walk_svg import walk_svg

        with open(args.svg, "w", encoding="utf-8") as fh:
            fh.write(walk_svg(reply, args.iova, args.write))
    print(json.dumps(_dict(reply), indent=2) if args.json else explain_text(reply, args.iova, args.write))
    return 0
