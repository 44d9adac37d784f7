"""``pviommu guest ADDR OPERATION [field=value ...]``: drive a guest agent
from a shell (the operations of its gRPC API, plus a few conveniences).

    pviommu guest 127.0.0.1:50061 info
    pviommu guest 127.0.0.1:50061 alloc-map device=0x2a43c750 size=16K direction=TO_DEVICE fill=0x5a
    pviommu guest 127.0.0.1:50061 submit op=memmove device=0x2a43c750 src=0x7ffffffff000 dst=0x7fffffffe000 size=4K
    pviommu guest 127.0.0.1:50061 unmap logical_device_id=0x2a43c750 iova=0x7ffffffff000 size=4096 skip_flush=true
    pviommu guest 127.0.0.1:50061 read gpa=0x200000 size=64 --hex
    pviommu guest 127.0.0.1:50061 map --help        # every field of one operation

Numbers take any Python base prefix (0x, 0o, 0b) and sizes a unit (4K,
2M); enums their names (any case); ``data=@file`` reads bytes from a file,
``data=hex:0011ff`` takes hex. Answers are JSON (one object per line for
streams) with ids, addresses and bitmaps as hex strings.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory

from pvctl import exitcodes
from pviommu.client import dsa as named
from pviommu.client.device import Device
from pviommu.client.dsa import Completion
from pviommu.client.errors import ClientError, Unreachable
from pviommu.client.fmt import message_to_json
from pviommu.client.guest import Guest
from pviommu.client.types import Direction
from pviommu.units import parse_size
from pviommu.v1 import guest_pb2

_FD = descriptor.FieldDescriptor


@dataclass(frozen=True)
class Operation:
    name: str
    method: str  # GuestAgent method ("" = done by the client)
    summary: str


#: operation -> GuestAgent method and what it does
OPERATION_LIST = (
    Operation("info", "GetIommuInfo", "the pv-IOMMU the guest's driver found"),
    Operation("devices", "ListDevices", "the guest's devices and their domains"),
    Operation("domains", "ListDomains", "the guest's domains"),
    Operation("alloc", "AllocBuffer", "allocate a contiguous buffer of guest RAM"),
    Operation("alloc-map", "", "allocate a buffer, fill it and map it for a device, in one step"),
    Operation("free", "FreeBuffer", "free a buffer"),
    Operation("read", "ReadMemory", "read guest RAM (--hex for a dump, --out FILE for the raw bytes)"),
    Operation("write", "WriteMemory", "write guest RAM"),
    Operation("map", "Map", "map a GPA range for a device (or in a domain)"),
    Operation("unmap", "Unmap", "unmap an IOVA range (skip_flush=true leaves the IOTLB stale)"),
    Operation("flush", "Flush", "flush the IOTLB of a device's domain (or of a domain)"),
    Operation("create-domain", "CreateDomain", "create a paging or baseline domain"),
    Operation("delete-domain", "DeleteDomain", "delete a domain"),
    Operation("attach", "AttachDevice", "attach a device to a domain"),
    Operation("detach", "DetachDevice", "detach a device (back to its default domain)"),
    Operation("submit", "SubmitDescriptor",
              "submit a DSA descriptor: named (op=memmove ...) or raw (descriptor=hex:...)"),
    Operation("dmatest", "RunDmatest", "run dmatest"),
    Operation("faults", "StreamFaults", "the guest's DMA faults"),
    Operation("stats", "GetStats", "the agent's counters"),
)
OPERATIONS = {op.name: op.method for op in OPERATION_LIST}
_BY_NAME = {op.name: op for op in OPERATION_LIST}

#: What a field means (the proto comments, which protobuf does not keep at run time).
FIELD_DOCS = {
    "logical_device_id": "the device (its current domain)", "domain_id": "a domain (when no device is named)",
    "gpa": "guest-physical address", "size": "bytes (4096, 0x1000, 4K, 2M)", "iova": "IO virtual address "
    "(map: 0 = let the driver choose)", "direction": "who may access: the device reads TO_DEVICE, writes "
    "FROM_DEVICE", "on_demand": "reserve the range, map pages when the device faults on them (BOF page "
    "requests)", "skip_flush": "leave the IOTLB stale (show the hazard)", "kind": "paging (guest stage-1 tables) "
    "or baseline (map by hypercall)", "data": "bytes: text, @FILE or hex:00ff..", "descriptor": "64 bytes "
    "(hex:...); its completion address is an IOVA", "wait": "wait for the completion record",
    "timeout_ms": "how long to wait for the record", "completion_gpa": "where the agent polls the record "
    "(GPA)", "wq_id": "work queue (0 = the driver's choice)", "follow": "keep streaming new faults",
    "design": "nested or baseline", "iterations": "tests per thread", "threads_per_chan": "threads per device",
}
_SIZE_FIELDS = {"size", "test_buf_size", "transfer_size"}

_TYPE_NAMES = {_FD.TYPE_UINT64: "uint64", _FD.TYPE_UINT32: "uint32", _FD.TYPE_INT32: "int32",
               _FD.TYPE_INT64: "int64", _FD.TYPE_BOOL: "bool", _FD.TYPE_BYTES: "bytes", _FD.TYPE_STRING: "string",
               _FD.TYPE_DOUBLE: "double", _FD.TYPE_FLOAT: "float"}


def _method(op: str) -> descriptor.MethodDescriptor | None:
    name = OPERATIONS[op]
    if not name:
        return None
    return guest_pb2.DESCRIPTOR.services_by_name["GuestAgent"].methods_by_name[name]


def _field_line(name: str, kind: str, doc: str) -> str:
    return f"  {name:<20} {kind:<10} {doc}"


def _proto_fields(method: descriptor.MethodDescriptor) -> list[str]:
    lines = []
    for f in method.input_type.fields:
        if f.enum_type is not None:
            kind, doc = "enum", "one of " + ", ".join(v.name for v in f.enum_type.values)
            if f.name in FIELD_DOCS:
                doc = f"{FIELD_DOCS[f.name]}; {doc}"
        else:
            kind, doc = _TYPE_NAMES.get(f.type, "?"), FIELD_DOCS.get(f.name, "")
        lines.append(_field_line(f.name, kind, doc))
    return lines


def operation_help(op: str) -> str:
    """The fields of one operation, for ``--help``."""
    lines = ["fields (field=value):"]
    method = _method(op)
    if op == "alloc-map":
        lines += [_field_line("device", "uint64", "the device (default: the first one)"),
                  _field_line("size", "uint64", FIELD_DOCS["size"]),
                  _field_line("direction", "enum", "BIDIRECTIONAL (default), TO_DEVICE, FROM_DEVICE"),
                  _field_line("fill", "uint8", "fill the buffer with this byte"),
                  _field_line("data", "bytes", FIELD_DOCS["data"])]
    elif method is not None:
        lines += _proto_fields(method) or ["  (none)"]
    if op == "submit":
        lines += ["", "named operations (op=NAME, then its fields; device= names the device, default the first; "
                  "a decoded completion record is printed):"]
        for spec in named.OPERATIONS.values():
            lines.append(f"  op={spec.name:<16} {spec.summary}")
            lines.append("      " + " ".join(f"{f}=" for f, _ in spec.fields))
        lines.append("  op=NAME takes the names of idxd.h too: " + ", ".join(sorted(named.ALIASES)))
    return "\n".join(lines)


# -- values ---------------------------------------------------------------------------------
def parse_number(name: str, text: str) -> int:
    try:
        return parse_size(text) if name in _SIZE_FIELDS else int(text, 0)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None


def parse_bytes(name: str, text: str) -> bytes:
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise ValueError(f"{name}: cannot read {text[1:]}: {exc.strerror}") from None
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            raise ValueError(f"{name}: {text[4:]!r} is not hex") from None
    return text.encode()


def parse_bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: {text!r} is not a boolean (true or false)")


def _value(field: descriptor.FieldDescriptor, text: str) -> Any:
    if field.type == _FD.TYPE_BYTES:
        return parse_bytes(field.name, text)
    if field.type == _FD.TYPE_BOOL:
        return parse_bool(field.name, text)
    if field.enum_type is not None:
        names = [v.name for v in field.enum_type.values]
        key = text.strip().upper().replace("-", "_")
        if key in field.enum_type.values_by_name:
            return field.enum_type.values_by_name[key].number
        if text.isdigit() and int(text) in field.enum_type.values_by_number:
            return int(text)
        raise ValueError(f"{field.name}: {text!r} is not one of {', '.join(names)}")
    if field.type in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{field.name}: {text!r} is not a number") from None
    if field.type == _FD.TYPE_STRING:
        return text
    return parse_number(field.name, text)


def split_pairs(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected field=value, got {pair!r}")
        out[key] = text
    return out


def build_request(method: descriptor.MethodDescriptor, pairs: list[str]) -> Any:
    msg = message_factory.GetMessageClass(method.input_type)()
    for key, text in split_pairs(pairs).items():
        field = method.input_type.fields_by_name.get(key)
        if field is None:
            names = ", ".join(f.name for f in method.input_type.fields) or "none"
            raise ValueError(f"{method.name} has no field {key!r} (fields: {names})")
        setattr(msg, key, _value(field, text))
    return msg


def _named_fields(spec: named.OpSpec, raw: dict[str, str]) -> dict[str, Any]:
    known = {f for f, _ in spec.fields}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in known:
            raise ValueError(f"op={spec.name} has no field {key!r} (fields: {', '.join(sorted(known))})")
        if key == "pattern" and text.startswith(("hex:", "@")):
            out[key] = parse_bytes(key, text)
        else:
            out[key] = parse_number(key, text)
    return out


# -- output --------------------------------------------------------------------------------
def hexdump(data: bytes, base: int) -> str:
    """``GPA: 16 bytes in hex  |ascii|`` lines, like ``xxd``."""
    printable = set(string.printable) - set("\t\n\r\x0b\x0c")
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if chr(b) in printable else "." for b in chunk)
        lines.append(f"{base + off:#014x}: {hexes:<47}  |{text}|")
    return "\n".join(lines)


def exit_code(exc: ClientError) -> int:
    """2 when nothing answered, 64 + the gRPC code for a failed call, else 1."""
    if isinstance(exc, Unreachable) and exc.code is None:
        return exitcodes.CONNECT
    return exitcodes.for_rpc(exc.code) if exc.code is not None else exitcodes.FAILED


def _emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


# -- the command --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, add_token_args: Any) -> None:
    p.add_argument("address", help="guest agent address host:port")
    sub = p.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    for op in OPERATION_LIST:
        sp = sub.add_parser(op.name, help=op.summary, description=op.summary, epilog=operation_help(op.name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("fields", nargs="*", metavar="field=value")
        add_token_args(sp)
        sp.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
        sp.add_argument("--fail-on-status", action="store_true",
                        help="exit 1 when a descriptor completes with a status other than SUCCESS")
        if op.name == "read":
            out = sp.add_mutually_exclusive_group()
            out.add_argument("--hex", action="store_true", help="print a hex dump instead of JSON")
            out.add_argument("--out", metavar="FILE", help="write the raw bytes to FILE (and print a summary)")


def run_guest_cli(args: argparse.Namespace, token: str | None) -> int:
    op = args.operation
    try:
        raw = split_pairs(args.fields)
        method = _method(op)
        request = None
        if method is not None and not (op == "submit" and "op" in raw):
            request = build_request(method, args.fields)
    except ValueError as exc:
        print(f"pviommu guest {op}: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    guest = Guest(args.address, token or "", name=args.address, timeout=args.timeout)
    try:
        if op == "alloc-map":
            return _alloc_map(guest, raw)
        if op == "submit" and "op" in raw:
            return _submit_named(guest, raw, args.fail_on_status)
        assert method is not None and request is not None
        call = getattr(guest.stub, method.name)
        replies = call(request, timeout=args.timeout)
        if not method.server_streaming:
            replies = [replies]
        for reply in replies:
            if op == "read" and (args.hex or args.out):
                return _print_read(reply.data, request, args)
            out = message_to_json(reply)
            if op == "submit":
                rec = Completion.decode(request.descriptor[7] if len(request.descriptor) == 64 else 0,
                                        reply.completion_record, accepted=reply.accepted,
                                        timed_out=reply.accepted and request.wait and not reply.completion_record)
                out["record"] = rec.as_dict() if reply.completion_record else None
                _emit(out)
                if args.fail_on_status and not rec.ok:
                    print(f"pviommu guest submit: {reply.status_name or 'no record'}", file=sys.stderr)
                    return exitcodes.FAILED
                continue
            _emit(out)
    except ValueError as exc:
        print(f"pviommu guest {op}: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except ClientError as exc:
        print(f"pviommu guest {op}: {exc}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details), file=sys.stderr)
        return exit_code(exc)
    except grpc.RpcError as exc:
        from pviommu.rpc.status import error_info

        print(f"pviommu guest {op}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        info = error_info(exc)
        if info:
            print(json.dumps(info), file=sys.stderr)
        return exitcodes.for_rpc(exc.code())
    finally:
        guest.close()
    return exitcodes.OK


def _print_read(data: bytes, request: Any, args: argparse.Namespace) -> int:
    if args.out:
        Path(args.out).write_bytes(data)
        print(json.dumps({"gpa": f"{request.gpa:#x}", "size": len(data), "out": args.out}))
    else:
        print(hexdump(bytes(data), request.gpa))
    return exitcodes.OK


def _device(guest: Guest, raw: dict[str, str]) -> Device:
    text = raw.pop("device", None) or raw.pop("logical_device_id", None)
    if text is None:
        return guest.device(0)
    return Device(guest, parse_number("device", text))


def _alloc_map(guest: Guest, raw: dict[str, str]) -> int:
    known = {"device", "logical_device_id", "size", "direction", "fill", "data"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"alloc-map has no field {', '.join(unknown)} (fields: device, size, direction, fill, data)")
    data = parse_bytes("data", raw["data"]) if "data" in raw else None
    size = parse_number("size", raw["size"]) if "size" in raw else (len(data) if data else 0)
    if not size:
        raise ValueError("alloc-map needs size= (or data=)")
    direction = Direction.parse(raw.get("direction", "BIDIRECTIONAL"))
    fill = parse_number("fill", raw["fill"]) if "fill" in raw else None
    dev = _device(guest, raw)
    m = dev.alloc_map(size, direction, data=data, fill=fill)
    _emit({"gpa": f"{m.gpa:#x}", "iova": f"{m.iova:#x}", "size": m.size, "direction": m.direction.name,
           "logicalDeviceId": f"{dev.id:#x}"})
    return exitcodes.OK


def _submit_named(guest: Guest, raw: dict[str, str], fail_on_status: bool) -> int:
    spec = named.operation(raw.pop("op"))
    timeout_ms = parse_number("timeout_ms", raw.pop("timeout_ms")) if "timeout_ms" in raw else 5000
    dev = _device(guest, raw)
    fields = _named_fields(spec, raw)
    rec = dev.submit(named.build(spec.name, **fields), timeout_ms=timeout_ms)
    _emit({"op": spec.name, "logicalDeviceId": f"{dev.id:#x}", **rec.as_dict()})
    if fail_on_status and not rec.ok:
        print(f"pviommu guest submit: op={spec.name} completed {rec.status_name}", file=sys.stderr)
        return exitcodes.FAILED
    return exitcodes.OK
