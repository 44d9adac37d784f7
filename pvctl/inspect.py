"""``pviommu inspect ADDR partitions|devices|domains|stats|faults``: the
admin view of a running hypervisor, as tables or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from pviommu.rpc.client import connect
from pviommu.v1 import admin_pb2, admin_pb2_grpc, common_pb2


def _rows(msgs: Any) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(m, always_print_fields_with_no_presence=True) for m in msgs]


def run_inspect(args: argparse.Namespace, token: str | None) -> int:
    try:
        channel = connect(args.address, token)
    except ConnectionError as exc:
        print(f"pviommu inspect: {exc}", file=sys.stderr)
        return 2
    admin = admin_pb2_grpc.AdminStub(channel)
    try:
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
    except grpc.RpcError as exc:
        print(f"pviommu inspect: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
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
