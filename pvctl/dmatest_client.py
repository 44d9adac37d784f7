"""``pviommu dmatest ADDR``: run dmatest in a running guest agent and print
its lines as the Linux module does, then pviommu's labelled aggregate (or a
JSON result).

Ctrl-C is dmatest's ``echo 0 > run``: the agent stops the threads after their
current test, they print their summaries and the run ends normally (exit 0
when tests ran and none failed). A second Ctrl-C abandons the call (130).
The stream is read by a helper thread so Ctrl-C always lands in the main
thread's wait, never inside gRPC."""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from typing import Any

import grpc

from pvctl import exitcodes
from pvctl.local import dmatest_params
from pviommu.rpc.client import connect, print_waiting
from pviommu.v1 import guest_pb2, guest_pb2_grpc

_END = object()


def run_remote_dmatest(args: argparse.Namespace, token: str | None) -> int:
    try:
        channel = connect(args.address, token, what="the guest agent", on_wait=print_waiting)
    except ConnectionError as exc:
        print(f"pviommu dmatest: {exc}", file=sys.stderr)
        return exitcodes.CONNECT
    try:
        return _run(guest_pb2_grpc.GuestAgentStub(channel), dmatest_params(args), args.json)
    finally:
        channel.close()


def _run(stub: guest_pb2_grpc.GuestAgentStub, params: guest_pb2.DmatestParams, as_json: bool) -> int:
    call = stub.RunDmatest(params)
    events: queue.Queue[Any] = queue.Queue()

    def reader() -> None:
        try:
            for ev in call:
                events.put(ev)
        except grpc.RpcError as exc:
            events.put(exc)
        finally:
            events.put(_END)

    threading.Thread(target=reader, name="dmatest-stream", daemon=True).start()
    run_id = 0
    stopping = False
    result: guest_pb2.DmatestResult | None = None
    error: grpc.RpcError | None = None
    while True:
        try:
            item = events.get(timeout=0.5)  # a bounded wait, so a Ctrl-C is seen at once
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if stopping or not run_id:
                call.cancel()
                print("pviommu dmatest: interrupted", file=sys.stderr)
                return 130
            stopping = True
            print("pviommu dmatest: stopping (as echo 0 > run); Ctrl-C again to abandon", file=sys.stderr)
            try:
                stub.StopDmatest(guest_pb2.DmatestStopRequest(run_id=run_id), timeout=10)
            except grpc.RpcError as exc:
                print(f"pviommu dmatest: StopDmatest: {exc.code().name}: {exc.details()}", file=sys.stderr)
                call.cancel()
                return 130
            continue
        if item is _END:
            break
        if isinstance(item, grpc.RpcError):
            error = item
            continue
        kind = item.WhichOneof("event")
        if kind == "run_id":
            run_id = item.run_id
        elif kind == "line" and not as_json:
            print(item.line, flush=True)
        elif kind == "result":
            result = item.result
    if error is not None:
        print(f"pviommu dmatest: {error.code().name}: {error.details()}", file=sys.stderr)
        return exitcodes.for_rpc(error.code())
    if result is None:
        print("pviommu dmatest: the stream ended without a result", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"tests": result.tests, "failures": result.failures, "iops": result.iops,
                          "kb_per_s": result.kb_per_s, "summary": result.summary, "stopped": stopping,
                          "threads": [{"thread": t.thread, "tests": t.tests, "failures": t.failures,
                                       "status": t.status} for t in result.threads]}, indent=2))
    else:
        print(result.summary, flush=True)
    return 0 if result.failures == 0 and result.tests > 0 else 1
