"""A small reflection-based gRPC client (``pviommu grpc list|describe|call``).

grpcurl cannot be installed on the machines pviommu targets and scripts need
a client anyway, so this one ships with the project. It learns every service
from the server's reflection service (no .proto files needed), so it works
against any pviommu service -- or any gRPC server with reflection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


class ReflectionClient:
    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> None:
        self.channel = channel
        self.metadata = tuple(metadata or [])
        self._db = ProtoReflectionDescriptorDatabase(channel)
        self._pool = descriptor_pool.DescriptorPool(self._db)

    def services(self) -> list[str]:
        return sorted(self._db.get_services())

    def service(self, name: str) -> descriptor.ServiceDescriptor:
        try:
            return self._pool.FindServiceByName(name)
        except KeyError as exc:
            raise LookupError(f"service {name!r} not offered; offered: {', '.join(self.services())}") from exc

    def method(self, path: str) -> descriptor.MethodDescriptor:
        """``pkg.Service/Method`` or ``pkg.Service.Method``."""
        svc_name, _, method_name = path.replace("/", ".").rpartition(".")
        svc = self.service(svc_name.lstrip("."))
        m = svc.methods_by_name.get(method_name)
        if m is None:
            raise LookupError(f"{svc.full_name} has no method {method_name!r}; it has "
                              f"{', '.join(sorted(svc.methods_by_name))}")
        return m

    def describe(self, symbol: str) -> str:
        symbol = symbol.replace("/", ".")
        for finder, render in (
            (self._pool.FindServiceByName, _render_service),
            (self._pool.FindMessageTypeByName, _render_message),
            (self._pool.FindEnumTypeByName, _render_enum),
        ):
            try:
                return render(finder(symbol))  # type: ignore[arg-type]
            except KeyError:
                continue
        return _render_method(self.method(symbol))

    def call(self, path: str, request_json: str, timeout: float | None = 30.0) -> Iterator[dict[str, Any]]:
        """Invoke a unary or server-streaming method with a JSON request."""
        m = self.method(path)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        request = json_format.Parse(request_json or "{}", req_cls())
        full = f"/{m.containing_service.full_name}/{m.name}"
        ser, de = req_cls.SerializeToString, resp_cls.FromString
        if m.client_streaming:
            raise ValueError(f"{full} is client-streaming; only unary and server-streaming are supported")
        if m.server_streaming:
            stream = self.channel.unary_stream(full, request_serializer=ser, response_deserializer=de)
            for reply in stream(request, timeout=timeout, metadata=self.metadata):
                yield _to_dict(reply)
        else:
            unary = self.channel.unary_unary(full, request_serializer=ser, response_deserializer=de)
            yield _to_dict(unary(request, timeout=timeout, metadata=self.metadata))


def _to_dict(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)
    return out


def _render_method(m: descriptor.MethodDescriptor) -> str:
    req = f"stream {m.input_type.full_name}" if m.client_streaming else m.input_type.full_name
    resp = f"stream {m.output_type.full_name}" if m.server_streaming else m.output_type.full_name
    return f"rpc {m.name}({req}) returns ({resp});"


def _render_service(s: descriptor.ServiceDescriptor) -> str:
    lines = [f"service {s.full_name} {{"]
    lines += [f"  {_render_method(m)}" for m in s.methods]
    return "\n".join([*lines, "}"])


_TYPE_NAMES = {v: k[len("TYPE_"):].lower() for k, v in descriptor.FieldDescriptor.__dict__.items()
               if k.startswith("TYPE_") and isinstance(v, int)}


def _render_message(d: descriptor.Descriptor) -> str:
    lines = [f"message {d.full_name} {{"]
    for f in d.fields:
        if f.message_type is not None:
            tname = f.message_type.full_name
        elif f.enum_type is not None:
            tname = f.enum_type.full_name
        else:
            tname = _TYPE_NAMES.get(f.type, str(f.type))
        rep = "repeated " if f.is_repeated else ""
        lines.append(f"  {rep}{tname} {f.name} = {f.number};")
    return "\n".join([*lines, "}"])


def _render_enum(e: descriptor.EnumDescriptor) -> str:
    return "\n".join([f"enum {e.full_name} {{", *[f"  {v.name} = {v.number};" for v in e.values], "}"])


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False)
