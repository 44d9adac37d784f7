"""Raw hypercall inputs packed by hand at the reference's offsets
(shared/reference/hyperv-guest-iommu.md), shared by the HvCall and the
hypercall-page suites. Nothing here uses ``pviommu.abi.hv``'s encoder."""

from __future__ import annotations

import struct

from tests.kit.hvkit import S1, S2, SELF, Guest


def value(code: int, reps: int = 0, start: int = 0) -> int:
    """The hypercall input value: code bits 0-15, rep count 32-43, rep start 48-59."""
    assert code < 1 << 16 and reps < 1 << 12 and start < 1 << 12
    return code | reps << 32 | start << 48


def put(buf: bytearray, offset: int, fmt: str, v: int) -> None:
    struct.pack_into("<" + fmt, buf, offset, v)


def device_domain(dom_id: int, dtype: int = S1, pid: int = SELF, vtl: int = 0, rsvd: int = 0,
                  size: int = 24) -> bytearray:
    """hv_input_device_domain (24 B): u64 partition_id @0, u8 owner_vtl @8, u8 padding[7] @9,
    u64 domain_id @16 (type bits 0-3, reserved 4-31, id 32-63)."""
    b = bytearray(size)
    put(b, 0, "Q", pid)
    put(b, 8, "B", vtl)
    put(b, 16, "Q", dtype | rsvd << 4 | dom_id << 32)
    return b


def create_in(dom_id: int, dtype: int = S1, flags: int = 0, **kw: int) -> bytes:
    b = device_domain(dom_id, dtype, size=28, **kw)  # 28 B, u32 flags @24
    put(b, 24, "I", flags)
    return bytes(b)


def delete_in(dom_id: int, dtype: int = S1, **kw: int) -> bytes:
    return bytes(device_domain(dom_id, dtype, **kw))


def attach_in(dom_id: int, dev: int, dtype: int = S1, **kw: int) -> bytes:
    b = device_domain(dom_id, dtype, size=32, **kw)  # u64 device_id @24
    put(b, 24, "Q", dev)
    return bytes(b)


def detach_in(dev: int, pid: int = SELF) -> bytes:
    b = bytearray(16)  # u64 partition_id @0, u64 device_id @8
    put(b, 0, "Q", pid)
    put(b, 8, "Q", dev)
    return bytes(b)


def configure_in(dom_id: int, root: int, flags: int = 1, **kw: int) -> bytes:
    b = device_domain(dom_id, size=40, **kw)  # settings: u64 flags @24, u64 page_table_root @32
    put(b, 24, "Q", flags)
    put(b, 32, "Q", root)
    return bytes(b)


def flush_in(dom_id: int, flags: int = 0, reserved: int = 0, **kw: int) -> bytes:
    b = device_domain(dom_id, size=32, **kw)  # u32 flags @24, u32 reserved @28
    put(b, 24, "I", flags)
    put(b, 28, "I", reserved)
    return bytes(b)


def flush_list_in(dom_id: int, elems: list[tuple[int, int]], flags: int = 0, reserved: int = 0) -> bytes:
    b = device_domain(dom_id, size=32 + 8 * len(elems))
    put(b, 24, "I", flags)
    put(b, 28, "I", reserved)
    for i, (page_number, mask_shift) in enumerate(elems):  # page_mask_shift:12, page_number:52
        put(b, 32 + 8 * i, "Q", mask_shift | page_number << 12)
    return bytes(b)


def caps_in(pid: int = SELF, reserved: int = 0) -> bytes:
    b = bytearray(16)  # u64 partition_id @0, u64 reserved @8
    put(b, 0, "Q", pid)
    put(b, 8, "Q", reserved)
    return bytes(b)


def prop_in(dev: int, code: int = 10, pid: int = SELF, reserved: int = 0) -> bytes:
    b = bytearray(24)  # u64 partition_id @0, u64 logical_device_id @8, u32 code @16, u32 reserved @20
    put(b, 0, "Q", pid)
    put(b, 8, "Q", dev)
    put(b, 16, "I", code)
    put(b, 20, "I", reserved)
    return bytes(b)


def map_in(dom_id: int, va: int, pfns: list[int], flags: int = 3, vtl: int = 0) -> bytes:
    # device_domain @0, u8 target_vtl @24, u8 padding[3] @25, u32 map_flags @28,
    # u64 target_device_va_base @32, then u64 gpa_page_list[]
    b = device_domain(dom_id, S2, size=40 + 8 * len(pfns))
    put(b, 24, "B", vtl)
    put(b, 28, "I", flags)
    put(b, 32, "Q", va)
    for i, pfn in enumerate(pfns):
        put(b, 40 + 8 * i, "Q", pfn)
    return bytes(b)


def unmap_in(dom_id: int, va: int) -> bytes:
    b = device_domain(dom_id, S2, size=32)  # u64 target_device_va_base @24
    put(b, 24, "Q", va)
    return bytes(b)


def call(g: Guest, input_value: int, data: bytes) -> tuple[int, int, bytes]:
    return g.raw(input_value, data)
