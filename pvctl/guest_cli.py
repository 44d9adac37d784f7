"""``pviommu guest ADDR OPERATION [field=value ...]``: drive a guest agent
from a shell (the same operations as its gRPC API, with friendly names).

    pviommu guest 127.0.0.1:50061 info
    pviommu guest 127.0.0.1:50061 alloc size=0x4000
    pviommu guest 127.0.0.1:50061 map logical_device_id=0x2a43c750 gpa=0x200000 size=4096 direction=TO_DEVICE
    pviommu guest 127.0.0.1:50061 unmap logical_device_id=0x2a43c750 iova=0x7ffffffff000 size=4096 skip_flush=true
    pviommu guest 127.0.0.1:50061 faults

Numbers take any Python base prefix (0x, 0o, 0b); enums their names;
``data=@file`` reads bytes from a file, ``data=hex:0011ff`` takes hex.
Answers are printed as JSON (one object per line for streams).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, json_format, message_factory

from pviommu.rpc.client import connect
from pviommu.v1 import guest_pb2, guest_pb2_grpc

#: operation -> GuestAgent method
OPERATIONS = {
    "info": "GetIommuInfo", "devices": "ListDevices", "domains": "ListDomains", "alloc": "AllocBuffer",
    "free": "FreeBuffer", "read": "ReadMemory", "write": "WriteMemory", "map": "Map", "unmap": "Unmap",
    "flush": "Flush", "create-domain": "CreateDomain", "delete-domain": "DeleteDomain", "attach": "AttachDevice",
    "detach": "DetachDevice", "submit": "SubmitDescriptor", "dmatest": "RunDmatest", "faults": "StreamFaults",
    "stats": "GetStats",
}


def _value(field: descriptor.FieldDescriptor, text: str) -> Any:
    if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
        if text.startswith("@"):
            return Path(text[1:]).read_bytes()
        if text.startswith("hex:"):
            return bytes.fromhex(text[4:])
        return text.encode()
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        return text.lower() in ("1", "true", "yes", "on")
    if field.enum_type is not None:
        return field.enum_type.values_by_name[text.upper()].number if not text.isdigit() else int(text)
    if field.type in (descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT):
        return float(text)
    if field.type == descriptor.FieldDescriptor.TYPE_STRING:
        return text
    return int(text, 0)


def build_request(method: descriptor.MethodDescriptor, pairs: list[str]) -> Any:
    msg = message_factory.GetMessageClass(method.input_type)()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"expected field=value, got {pair!r}")
        field = method.input_type.fields_by_name.get(key)
        if field is None:
            names = ", ".join(f.name for f in method.input_type.fields) or "none"
            raise ValueError(f"{method.name} has no field {key!r} (fields: {names})")
        setattr(msg, key, _value(field, text))
    return msg


def run_guest_cli(args: argparse.Namespace, token: str | None) -> int:
    method = guest_pb2.DESCRIPTOR.services_by_name["GuestAgent"].methods_by_name[OPERATIONS[args.operation]]
    try:
        request = build_request(method, args.fields)
    except (ValueError, KeyError, OSError) as exc:
        print(f"pviommu guest: {exc}", file=sys.stderr)
        return 2
    try:
        channel = connect(args.address, token)
    except ConnectionError as exc:
        print(f"pviommu guest: {exc}", file=sys.stderr)
        return 2
    stub = guest_pb2_grpc.GuestAgentStub(channel)
    call = getattr(stub, method.name)
    try:
        replies = call(request, timeout=args.timeout)
        if not method.server_streaming:
            replies = [replies]
        for reply in replies:
            print(json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)), flush=True)
    except grpc.RpcError as exc:
        from pviommu.rpc.status import error_info

        print(f"pviommu guest: {exc.code().name}: {exc.details()}", file=sys.stderr)
        info = error_info(exc)
        if info:
            print(json.dumps(info), file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0
