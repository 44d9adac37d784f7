"""Hex where a number names a place or a thing.

Addresses, bitmaps, capability words and ids read best in hex (a device id
``0x2a43c750`` is recognisable, ``709084992`` is not), and a JSON number
loses the meaning -- and, past 2^53, the value. One list of such field
names serves the client's reprs, the CLI's JSON and the logs.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

#: Field names (proto and Python) printed in hex.
HEX_FIELDS = frozenset({
    "partition_id", "domain_id", "logical_device_id", "device_id", "devices", "request_id", "id", "device",
    "gpa", "iova", "hpa", "va", "oa", "root", "root_gpa", "page_table_root", "stage2_root_hpa", "context_table_hpa",
    "table", "table_gpa", "table_hpa", "entry", "iommu_cap", "pgsize_bitmap", "completion_gpa", "input_value",
    "result_value", "target_device_va_base", "gpa_page_list", "page_number", "address", "address_mask", "gencap",
    "engcap", "grpcap", "wqcap", "device_iommu", "flags", "map_flags", "pci_vendor_id", "pci_device_id",
    "call_code", "fault_addr", "src", "dst", "dst2", "src2", "pattern", "delta_addr", "crc", "crc_seed",
    "desc_list_addr", "completion_addr", "src_addr", "dst_addr", "cap", "bitmap", "int_handle", "fault_info",
    "reason", "fault_reason",
})
_INT_TYPES = frozenset({
    descriptor.FieldDescriptor.TYPE_UINT64, descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_FIXED64, descriptor.FieldDescriptor.TYPE_FIXED32,
    descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_INT32,
})
_CAMEL = re.compile(r"_([a-z])")


def is_hex_field(name: str) -> bool:
    return name in HEX_FIELDS


def hexify(value: Any) -> Any:
    """``int`` -> ``"0x..."``; lists element-wise; anything else unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, str) and value.isdigit():
        return f"{int(value):#x}"
    if isinstance(value, list):
        return [hexify(v) for v in value]
    return value


def message_to_json(msg: Message, *, proto_names: bool = False) -> dict[str, Any]:
    """``json_format.MessageToDict`` (every field printed) with ids,
    addresses and bitmaps as hex strings."""
    out: dict[str, Any] = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True,
                                                    preserving_proto_field_name=proto_names)
    _hex_in_place(msg.DESCRIPTOR, out, proto_names)
    return out


def _hex_in_place(desc: Any, out: dict[str, Any], proto_names: bool) -> None:
    for field in desc.fields:
        key = field.name if proto_names else field.json_name
        if key not in out:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue
            value = out[key]
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _hex_in_place(field.message_type, item, proto_names)
        elif field.type in _INT_TYPES and is_hex_field(field.name):
            out[key] = hexify(out[key])


def hex_repr(obj: Any, decimal: Iterable[str] = ()) -> str:
    """``Name(field=0x1000, size=4096, ...)`` for a dataclass: hex fields in
    hex, the ``decimal`` ones and everything else as ``repr``."""
    keep = set(decimal)
    parts = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, enum.Enum):
            text = value.name
        elif f.name not in keep and isinstance(value, int) and not isinstance(value, bool) and (
                is_hex_field(f.name) or f.name.endswith(("_addr", "_id", "_gpa", "_iova"))):
            text = f"{value:#x}"
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value) \
                and is_hex_field(f.name):
            text = "[" + ", ".join(f"{v:#x}" for v in value) + "]"
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def camel(name: str) -> str:
    """``logical_device_id`` -> ``logicalDeviceId`` (protobuf's JSON names)."""
    return _CAMEL.sub(lambda m: m.group(1).upper(), name)
