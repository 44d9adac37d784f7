"""``pviommu dmatest ADDR``: run dmatest in a running guest agent and print
its lines and summary as the Linux module does (or a JSON result)."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from pvctl import exitcodes
from pvctl.local import dmatest_params, run_dmatest_stream
from pviommu.rpc.client import connect, print_waiting
from pviommu.v1 import guest_pb2, guest_pb2_grpc


def run_remote_dmatest(args: argparse.Namespace, token: str | None) -> int:
    try:
        channel = connect(args.address, token, what="the guest agent", on_wait=print_waiting)
    except ConnectionError as exc:
        print(f"pviommu dmatest: {exc}", file=sys.stderr)
        return exitcodes.CONNECT

    def on_event(ev: guest_pb2.DmatestEvent) -> None:
        if ev.HasField("line") and not args.json:
            print(ev.line, flush=True)

    try:
        result = run_dmatest_stream(guest_pb2_grpc.GuestAgentStub(channel), dmatest_params(args), on_event)
    except grpc.RpcError as exc:
        print(f"pviommu dmatest: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return exitcodes.for_rpc(exc.code())
    finally:
        channel.close()
    if args.json:
        print(json.dumps({"tests": result.tests, "failures": result.failures, "iops": result.iops,
                          "kb_per_s": result.kb_per_s, "summary": result.summary,
                          "threads": [{"thread": t.thread, "tests": t.tests, "failures": t.failures}
                                      for t in result.threads]}, indent=2))
    return 0 if result.failures == 0 and result.tests > 0 else 1
