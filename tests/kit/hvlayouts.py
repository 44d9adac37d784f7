"""Hand-written layouts of the Hyper-V guest-IOMMU hypercall inputs for the tests/abi suites.

Expected bytes are written by hand from the offsets in shared/reference/hyperv-guest-iommu.md
(``bytes.fromhex`` or ``struct.pack_into`` at explicit offsets), never with the encoder under test.
"""

from __future__ import annotations

import struct

from pviommu.abi.hv import REP_CALLS, DeviceDomain, DeviceDomainId, HvCallCode
from pviommu.abi.hv_status import HvStatus
from pviommu.errors import HvError

SELF = 0xFFFF_FFFF_FFFF_FFFF


def hand_device_domain(
    partition_id: int = SELF, vtl: int = 0, domain_type: int = 1, domain_id: int = 7, pad: bytes = bytes(7)
) -> bytearray:
    """hv_input_device_domain: u64 partition_id @0, u8 owner_vtl @8, u8 padding[7] @9, u64 domain_id @16."""
    buf = bytearray(24)
    struct.pack_into("<Q", buf, 0, partition_id)
    buf[8] = vtl
    buf[9:16] = pad
    struct.pack_into("<Q", buf, 16, domain_type | domain_id << 32)
    return buf


def hand_input(code: HvCallCode) -> tuple[int, bytearray]:
    """A valid (rep_count, input block) for every call, laid out by hand."""
    dd = hand_device_domain()
    if code is HvCallCode.CREATE_DEVICE_DOMAIN:
        return 0, dd + struct.pack("<I", 0b01)  # 28 B
    if code is HvCallCode.DELETE_DEVICE_DOMAIN:
        return 0, dd
    if code is HvCallCode.ATTACH_DEVICE_DOMAIN:
        return 0, dd + struct.pack("<Q", 0x1234)
    if code is HvCallCode.DETACH_DEVICE_DOMAIN:
        return 0, bytearray(struct.pack("<QQ", SELF, 0x1234))
    if code is HvCallCode.CONFIGURE_DEVICE_DOMAIN:
        return 0, dd + struct.pack("<QQ", 0b001, 0x5000)
    if code is HvCallCode.FLUSH_DEVICE_DOMAIN:
        return 0, dd + bytes(8)
    if code is HvCallCode.GET_IOMMU_CAPABILITIES:
        return 0, bytearray(struct.pack("<QQ", SELF, 0))
    if code is HvCallCode.GET_LOGICAL_DEVICE_PROPERTY:
        return 0, bytearray(struct.pack("<QQII", SELF, 0x1234, 10, 0))
    if code is HvCallCode.FLUSH_DEVICE_DOMAIN_LIST:
        return 2, dd + struct.pack("<II", 1, 0) + struct.pack("<QQ", 0x5000, 0x6003)
    if code is HvCallCode.MAP_DEVICE_GPA_PAGES:
        tail = bytearray(16)
        tail[0] = 0  # target_vtl
        struct.pack_into("<I", tail, 4, 3)  # map_flags @28
        struct.pack_into("<Q", tail, 8, 0x10_0000)  # target_device_va_base @32
        return 3, dd + tail + struct.pack("<3Q", 10, 11, 12)
    assert code is HvCallCode.UNMAP_DEVICE_GPA_PAGES
    return 4, dd + struct.pack("<Q", 0x10_0000)


ALL_CODES = list(HvCallCode)


SIMPLE_CODES = [c for c in HvCallCode if c not in REP_CALLS]


REP_CODES = [c for c in HvCallCode if c in REP_CALLS]


class Refused:
    """``with Refused(status):`` passes only if HvError with exactly that status is raised."""

    def __init__(self, status: HvStatus) -> None:
        self.status = status

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        assert isinstance(exc, HvError), f"expected HvError({self.status.name}), got {exc!r}"
        assert exc.hv_status is self.status, f"expected {self.status.name}, got {exc.hv_status.name}: {exc}"
        return True


DD = DeviceDomain(SELF, DeviceDomainId(type=1, id=7))


#           partition_id (SELF)  vtl  padding[7]      domain_id: type 1 @bit0, id 7 @bit32
DD_HEX = "ffffffffffffffff" + "00" + "00" * 7 + "01000000" + "07000000"
