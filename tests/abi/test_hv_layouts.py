"""Byte-for-byte tests of the Hyper-V guest-IOMMU hypercall ABI (pviommu.abi.hv).

Expected bytes are written by hand from the offsets in shared/reference/hyperv-guest-iommu.md
(``bytes.fromhex`` or ``struct.pack_into`` at explicit offsets), never with the encoder under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.abi import hv
from pviommu.abi.hv import (
    CALLS,
    REP_CALLS,
    AttachDeviceDomainInput,
    ConfigureDeviceDomainInput,
    CreateDeviceDomainInput,
    DeleteDeviceDomainInput,
    DetachDeviceDomainInput,
    DeviceDomain,
    DeviceDomainId,
    DeviceDomainSettings,
    FlushDeviceDomainInput,
    FlushDeviceDomainListHeader,
    FlushDeviceDomainListRequest,
    FlushVa,
    GetIommuCapabilitiesInput,
    GetIommuCapabilitiesOutput,
    GetLogicalDevicePropertyInput,
    GetLogicalDevicePropertyOutput,
    HvCallCode,
    HvDeviceId,
    HvDeviceType,
    HvInputVtl,
    HvRequest,
    HypercallInput,
    HypercallResult,
    IommuCap,
    MapDeviceGpaPagesHeader,
    MapDeviceGpaPagesRequest,
    MapFlags,
    PciDeviceId,
    UnmapDeviceGpaPagesInput,
    UnmapDeviceGpaPagesRequest,
    build_logical_device_id,
    decode_call,
    decode_input,
    decode_output,
    encode_output,
    encode_request,
)
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from pviommu.errors import HvError
from tests.kit.hvstrategies import device_domains, flush_vas, hv_requests, settings, u64

SELF = 0xFFFF_FFFF_FFFF_FFFF

# --------------------------------------------------------------------------------------------
# Hand-written layouts (offsets from the reference, not from the encoder)
# --------------------------------------------------------------------------------------------


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


class _Refused:
    """``with _Refused(status):`` passes only if HvError with exactly that status is raised."""

    def __init__(self, status: HvStatus) -> None:
        self.status = status

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        assert isinstance(exc, HvError), f"expected HvError({self.status.name}), got {exc!r}"
        assert exc.hv_status is self.status, f"expected {self.status.name}, got {exc.hv_status.name}: {exc}"
        return True


# --------------------------------------------------------------------------------------------
# Codes and constants
# --------------------------------------------------------------------------------------------


def test_call_codes_are_the_reference_values() -> None:
    assert {c.name: c.value for c in HvCallCode} == {
        "CREATE_DEVICE_DOMAIN": 0xB1,
        "ATTACH_DEVICE_DOMAIN": 0xB2,
        "MAP_DEVICE_GPA_PAGES": 0xB3,
        "UNMAP_DEVICE_GPA_PAGES": 0xB4,
        "DETACH_DEVICE_DOMAIN": 0xC4,
        "DELETE_DEVICE_DOMAIN": 0xC5,
        "CONFIGURE_DEVICE_DOMAIN": 0xCE,
        "FLUSH_DEVICE_DOMAIN": 0xD0,
        "FLUSH_DEVICE_DOMAIN_LIST": 0xD1,
        "GET_IOMMU_CAPABILITIES": 0x125,
        "GET_LOGICAL_DEVICE_PROPERTY": 0x127,
    }


def test_rep_calls_are_exactly_flush_list_map_and_unmap() -> None:
    assert {int(c) for c in REP_CALLS} == {0xD1, 0xB3, 0xB4}


def test_constants_are_the_reference_values() -> None:
    assert hv.HV_PARTITION_ID_SELF == SELF
    assert [int(t) for t in hv.DeviceDomainType] == [0, 1, 2]
    assert int(hv.DeviceDomainType.S1) == 1
    assert hv.HV_DEVICE_DOMAIN_ID_DEFAULT == 0
    assert hv.HV_DEVICE_DOMAIN_ID_NULL == 0xFFFFFFFF
    assert [int(c) for c in IommuCap] == [1 << i for i in range(7)]
    assert [c.name for c in IommuCap] == ["PRESENT", "S2", "S1", "S1_5LVL", "PASID", "ATS", "PRI"]
    assert hv.HV_LOGICAL_DEVICE_PROPERTY_PVIOMMU == 10
    assert hv.HV_DEVICE_IOMMU_ENABLED == 1
    assert (int(MapFlags.READABLE), int(MapFlags.WRITABLE)) == (1, 2)
    assert hv.HV_FLUSH_DEVICE_DOMAIN_LIST_IOMMU_FORMAT == 1
    assert {t.name: int(t) for t in HvDeviceType} == {"LOGICAL": 0, "PCI": 1, "IOAPIC": 2, "ACPI": 3}


def test_structure_sizes_are_the_reference_sizes() -> None:
    assert DeviceDomain.SIZE == 24
    assert CreateDeviceDomainInput.SIZE == 28
    assert DeleteDeviceDomainInput.SIZE == 24
    assert AttachDeviceDomainInput.SIZE == 32
    assert DetachDeviceDomainInput.SIZE == 16
    assert DeviceDomainSettings.SIZE == 16
    assert ConfigureDeviceDomainInput.SIZE == 40
    assert GetIommuCapabilitiesInput.SIZE == 16
    assert GetIommuCapabilitiesOutput.SIZE == 24
    assert GetLogicalDevicePropertyInput.SIZE == 24
    assert GetLogicalDevicePropertyOutput.SIZE == 16
    assert FlushDeviceDomainInput.SIZE == 32
    assert FlushDeviceDomainListHeader.SIZE == 32
    assert FlushVa.SIZE == 8
    assert MapDeviceGpaPagesHeader.SIZE == 40
    assert UnmapDeviceGpaPagesInput.SIZE == 32


def test_every_code_has_a_registry_row_with_its_rep_class_and_output() -> None:
    assert set(CALLS) == set(HvCallCode)
    for code, spec in CALLS.items():
        assert spec.code is code
        assert spec.is_rep == (code in REP_CALLS)
        assert spec.request_type.CODE is code
    assert CALLS[HvCallCode.GET_IOMMU_CAPABILITIES].output_type is GetIommuCapabilitiesOutput
    assert CALLS[HvCallCode.GET_LOGICAL_DEVICE_PROPERTY].output_type is GetLogicalDevicePropertyOutput
    assert {c for c, s in CALLS.items() if s.output_type is not None} == {
        HvCallCode.GET_IOMMU_CAPABILITIES,
        HvCallCode.GET_LOGICAL_DEVICE_PROPERTY,
    }
    assert CALLS[HvCallCode.FLUSH_DEVICE_DOMAIN_LIST].rep_element_size == 8
    assert CALLS[HvCallCode.MAP_DEVICE_GPA_PAGES].rep_element_size == 8
    assert CALLS[HvCallCode.UNMAP_DEVICE_GPA_PAGES].rep_element_size == 0


# --------------------------------------------------------------------------------------------
# Layouts, byte for byte
# --------------------------------------------------------------------------------------------

DD = DeviceDomain(SELF, DeviceDomainId(type=1, id=7))
#           partition_id (SELF)  vtl  padding[7]      domain_id: type 1 @bit0, id 7 @bit32
DD_HEX = "ffffffffffffffff" + "00" + "00" * 7 + "01000000" + "07000000"


def test_device_domain_is_partition_vtl_padding_then_domain_id() -> None:
    assert DD.pack() == bytes.fromhex(DD_HEX)
    vtl = DeviceDomain(0x11, DeviceDomainId(type=2, id=0xFFFFFFFE), HvInputVtl(target_vtl=2, use_target_vtl=True))
    assert vtl.pack() == bytes.fromhex("1100000000000000" + "12" + "00" * 7 + "02000000" + "feffffff")
    assert DeviceDomain.unpack(bytes.fromhex(DD_HEX)) == DD


def test_create_flags_are_a_u32_at_offset_24() -> None:
    req = CreateDeviceDomainInput(DD, forward_progress_required=True, inherit_owning_vtl=True)
    assert req.pack() == bytes.fromhex(DD_HEX + "03000000")
    only_inherit = bytes.fromhex(DD_HEX + "02000000")
    assert CreateDeviceDomainInput.unpack(only_inherit) == CreateDeviceDomainInput(DD, inherit_owning_vtl=True)


def test_delete_is_the_device_domain_alone() -> None:
    assert DeleteDeviceDomainInput(DD).pack() == bytes.fromhex(DD_HEX)


def test_attach_puts_the_device_id_at_offset_24() -> None:
    req = AttachDeviceDomainInput(DD, HvDeviceId.logical(0xAABBCC03))
    assert req.pack() == bytes.fromhex(DD_HEX + "03ccbbaa00000000")


def test_detach_is_partition_id_then_device_id() -> None:
    req = DetachDeviceDomainInput(SELF, HvDeviceId(HvDeviceType.PCI, 0x0100))
    #                                        rid 0x0100, type PCI in bits 62-63 -> top byte 0x40
    assert req.pack() == bytes.fromhex("ffffffffffffffff" + "0001000000000040")


def test_configure_puts_settings_flags_at_24_and_root_at_32() -> None:
    settings = DeviceDomainSettings(
        translation_enabled=True, blocked=False, first_stage_paging_mode=1, page_table_root=Gpa(0x12345000)
    )
    expected = bytes.fromhex(DD_HEX + "0500000000000000" + "0050341200000000")
    assert ConfigureDeviceDomainInput(DD, settings).pack() == expected
    blocked = bytes.fromhex(DD_HEX + "0300000000000000" + "0000000000000000")
    assert ConfigureDeviceDomainInput.unpack(blocked).settings == DeviceDomainSettings(True, True, 0, Gpa(0))


def test_flush_is_device_domain_then_zero_flags_and_reserved() -> None:
    assert FlushDeviceDomainInput(DD).pack() == bytes.fromhex(DD_HEX + "00000000" + "00000000")


def test_get_iommu_capabilities_input_is_partition_then_reserved() -> None:
    assert GetIommuCapabilitiesInput().pack() == bytes.fromhex("ffffffffffffffff" + "00" * 8)


def test_get_iommu_capabilities_output_field_offsets() -> None:
    out = GetIommuCapabilitiesOutput(
        max_iova_width=48, max_pasid_width=20, iommu_cap=0b0100101, pgsize_bitmap=0x4020_1000
    )
    buf = bytearray(24)
    struct.pack_into("<I", buf, 0, 24)
    struct.pack_into("<H", buf, 4, 0)
    buf[6] = 48
    buf[7] = 20
    struct.pack_into("<Q", buf, 8, 0b0100101)
    struct.pack_into("<Q", buf, 16, 0x4020_1000)
    assert out.pack() == bytes(buf)
    assert GetIommuCapabilitiesOutput.unpack(bytes(buf)) == out


def test_get_logical_device_property_input_and_output_offsets() -> None:
    req = GetLogicalDevicePropertyInput(SELF, 0x0102_0304, code=10)
    assert req.pack() == bytes.fromhex("ffffffffffffffff" + "0403020100000000" + "0a000000" + "00000000")
    out = GetLogicalDevicePropertyOutput(device_iommu=1)
    assert out.pack() == bytes.fromhex("0100000000000000" + "00" * 8)
    assert out.iommu_enabled
    assert not GetLogicalDevicePropertyOutput(0).iommu_enabled


def test_flush_va_packs_mask_shift_low_and_page_number_from_bit_12() -> None:
    assert FlushVa(page_number=0x12345, page_mask_shift=3).pack() == struct.pack("<Q", 0x12345 << 12 | 3)
    assert FlushVa.unpack(bytes.fromhex("ff0f000000000000")) == FlushVa(page_number=0, page_mask_shift=0xFFF)
    assert FlushVa.unpack(bytes.fromhex("00f0ffffffffffff")) == FlushVa(page_number=(1 << 52) - 1)


def test_flush_list_is_a_32_byte_header_then_u64_elements() -> None:
    req = FlushDeviceDomainListRequest(
        FlushDeviceDomainListHeader(DD, iommu_format=True), (FlushVa(5, 0), FlushVa(6, 3))
    )
    expected = bytes.fromhex(DD_HEX + "01000000" + "00000000" + "0050000000000000" + "0360000000000000")
    value, data = encode_request(req)
    assert data == expected
    assert value.encode() == 0x0000_0002_0000_00D1


def test_map_header_offsets_then_gpa_page_list() -> None:
    header = MapDeviceGpaPagesHeader(
        DD,
        map_flags=MapFlags.READABLE | MapFlags.WRITABLE,
        target_device_va_base=Iova(0x7000_0000),
        target_vtl=HvInputVtl(target_vtl=1, use_target_vtl=True),
    )
    expected = bytes.fromhex(
        DD_HEX + "11" + "000000" + "03000000" + "0000007000000000" + "0a00000000000000" + "0b00000000000000"
    )
    assert MapDeviceGpaPagesRequest(header, (10, 11)).pack() == expected


def test_unmap_is_device_domain_then_va_base() -> None:
    req = UnmapDeviceGpaPagesInput(DD, Iova(0x7000_0000))
    assert req.pack() == bytes.fromhex(DD_HEX + "0000007000000000")


def test_hand_built_inputs_decode_to_the_expected_requests() -> None:
    dd = DeviceDomain(SELF, DeviceDomainId(1, 7))
    expected: dict[HvCallCode, HvRequest] = {
        HvCallCode.CREATE_DEVICE_DOMAIN: CreateDeviceDomainInput(dd, forward_progress_required=True),
        HvCallCode.DELETE_DEVICE_DOMAIN: DeleteDeviceDomainInput(dd),
        HvCallCode.ATTACH_DEVICE_DOMAIN: AttachDeviceDomainInput(dd, HvDeviceId.logical(0x1234)),
        HvCallCode.DETACH_DEVICE_DOMAIN: DetachDeviceDomainInput(SELF, HvDeviceId.logical(0x1234)),
        HvCallCode.CONFIGURE_DEVICE_DOMAIN: ConfigureDeviceDomainInput(
            dd, DeviceDomainSettings(translation_enabled=True, page_table_root=Gpa(0x5000))
        ),
        HvCallCode.FLUSH_DEVICE_DOMAIN: FlushDeviceDomainInput(dd),
        HvCallCode.GET_IOMMU_CAPABILITIES: GetIommuCapabilitiesInput(SELF),
        HvCallCode.GET_LOGICAL_DEVICE_PROPERTY: GetLogicalDevicePropertyInput(SELF, 0x1234, 10),
        HvCallCode.FLUSH_DEVICE_DOMAIN_LIST: FlushDeviceDomainListRequest(
            FlushDeviceDomainListHeader(dd, iommu_format=True), (FlushVa(5, 0), FlushVa(6, 3))
        ),
        HvCallCode.MAP_DEVICE_GPA_PAGES: MapDeviceGpaPagesRequest(
            MapDeviceGpaPagesHeader(dd, MapFlags(3), Iova(0x10_0000)), (10, 11, 12)
        ),
        HvCallCode.UNMAP_DEVICE_GPA_PAGES: UnmapDeviceGpaPagesRequest(
            UnmapDeviceGpaPagesInput(dd, Iova(0x10_0000)), rep_count=4
        ),
    }
    for code in ALL_CODES:
        reps, data = hand_input(code)
        assert decode_input(code, reps, 0, bytes(data)) == expected[code], code.name


# --------------------------------------------------------------------------------------------
# Device ids
# --------------------------------------------------------------------------------------------


def test_logical_device_id_takes_guid_bytes_5_4_7_6_and_the_pci_function() -> None:
    guid = bytes(range(0x10, 0x20))  # b[4]=0x14, b[5]=0x15, b[6]=0x16, b[7]=0x17
    # (b[5]<<24)|(b[4]<<16)|(b[7]<<8)|(b[6]&0xf8)|func  with func 5: 0x16 & 0xf8 = 0x10, | 5 = 0x15
    assert build_logical_device_id(guid, 5) == 0x1514_1715
    assert build_logical_device_id(bytes(6) + b"\xff" + bytes(9), 7) == 0xFF


def test_logical_device_id_is_a_logical_hv_device_id() -> None:
    raw = build_logical_device_id(bytes(range(16)), 3)
    dev = HvDeviceId.from_u64(raw)
    assert dev.type is HvDeviceType.LOGICAL
    assert dev.to_u64() == raw


def test_logical_device_id_refuses_a_short_guid_and_a_function_above_7() -> None:
    with pytest.raises(ValueError):
        build_logical_device_id(bytes(15), 0)
    with pytest.raises(ValueError):
        build_logical_device_id(bytes(16), 8)


def test_device_id_type_lives_in_bits_62_and_63() -> None:
    assert HvDeviceId(HvDeviceType.ACPI, 1).to_u64() == 0xC000_0000_0000_0001
    assert HvDeviceId.from_u64(0x8000_0000_0000_0002) == HvDeviceId(HvDeviceType.IOAPIC, 2)


def test_pci_device_id_bit_positions() -> None:
    pci = PciDeviceId(rid=0x0108, segment=0x0002, shadow_bus_range=0x0304, phantom=2, source_shadow=True)
    assert pci.to_device_id().to_u64() == (1 << 62) | (1 << 50) | (2 << 48) | (0x0304 << 32) | (2 << 16) | 0x0108
    assert PciDeviceId.from_device_id(pci.to_device_id()) == pci


def test_pci_device_id_with_reserved_bits_is_an_invalid_parameter() -> None:
    with _Refused(HvStatus.INVALID_PARAMETER):
        PciDeviceId.from_device_id(HvDeviceId(HvDeviceType.PCI, 1 << 51))


@given(st.integers(0, (1 << 64) - 1))
def test_every_u64_device_id_round_trips(raw: int) -> None:
    assert HvDeviceId.from_u64(raw).to_u64() == raw


# --------------------------------------------------------------------------------------------
# Input and result values
# --------------------------------------------------------------------------------------------


def test_hypercall_input_field_bit_positions() -> None:
    value = HypercallInput(0x0125, rep_count=0xABC, rep_start=0x123, fast=True, variable_header_size=0x3FF, nested=True)
    assert value.encode() == 0x0125 | 1 << 16 | 0x3FF << 17 | 1 << 31 | 0xABC << 32 | 0x123 << 48
    assert HypercallInput(0xD1, rep_count=1).encode() == 0x0000_0001_0000_00D1


def test_hypercall_input_decoding_reports_reserved_bits_in_place() -> None:
    for bit in [*range(27, 31), *range(44, 48), *range(60, 64)]:
        assert HypercallInput.decode(1 << bit | 0xB1).reserved == 1 << bit
    for bit in [*range(0, 27), 31, *range(32, 44), *range(48, 60)]:
        assert HypercallInput.decode(1 << bit).reserved == 0


@given(st.integers(0, (1 << 64) - 1))
def test_every_u64_input_value_round_trips(value: int) -> None:
    assert HypercallInput.decode(value).encode() == value


def test_hypercall_result_field_bit_positions() -> None:
    assert HypercallResult(HvStatus.INVALID_PARAMETER, reps_completed=0xFFF).encode() == 0x0000_0FFF_0000_0005
    assert HypercallResult.decode(0xFFFF_F000_FFFF_0000 | 3 << 32 | 0x66) == HypercallResult(0x66, 3)
    assert HypercallResult(0).ok and not HypercallResult(5).ok


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFF))
def test_result_value_round_trips(status: int, reps: int) -> None:
    result = HypercallResult(status, reps)
    assert HypercallResult.decode(result.encode()) == result


# --------------------------------------------------------------------------------------------
# Round trips (hypothesis)
# --------------------------------------------------------------------------------------------

requests = hv_requests()


@given(requests)
def test_every_request_round_trips_through_the_raw_abi(request: HvRequest) -> None:
    value, data = encode_request(request)
    assert decode_call(value.encode(), data) == request
    assert decode_call(value.encode(), data, strict_padding=True) == request


@given(device_domains)
def test_device_domain_round_trips(dd: DeviceDomain) -> None:
    assert DeviceDomain.unpack(dd.pack()) == dd


@given(settings)
def test_settings_round_trip(s: DeviceDomainSettings) -> None:
    assert DeviceDomainSettings.unpack(s.pack()) == s


@given(flush_vas)
def test_flush_va_round_trips(va: FlushVa) -> None:
    assert FlushVa.unpack(va.pack()) == va


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 255), st.integers(0, 255), u64, u64)
def test_capabilities_output_round_trips(size: int, iova: int, pasid: int, cap: int, pgsizes: int) -> None:
    out = GetIommuCapabilitiesOutput(iova, pasid, cap, pgsizes, size)
    data = encode_output(HvCallCode.GET_IOMMU_CAPABILITIES, out)
    assert decode_output(HvCallCode.GET_IOMMU_CAPABILITIES, data) == out


@given(u64)
def test_logical_device_property_output_round_trips(device_iommu: int) -> None:
    out = GetLogicalDevicePropertyOutput(device_iommu)
    data = encode_output(HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, out)
    assert decode_output(HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, data) == out


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

KNOWN = {int(c) for c in HvCallCode}


@given(st.integers(0, 0xFFFF).filter(lambda c: c not in KNOWN), st.integers(0, 0xFFF), st.binary(max_size=64))
def test_unknown_code_is_invalid_hypercall_code(code: int, reps: int, data: bytes) -> None:
    with _Refused(HvStatus.INVALID_HYPERCALL_CODE):
        decode_input(code, reps, 0, data)


def test_unknown_code_wins_over_every_other_fault_of_the_input_value() -> None:
    everything_wrong = 0xFFFF_FFFF_FFFF_0000 | 0x0126
    with _Refused(HvStatus.INVALID_HYPERCALL_CODE):
        decode_call(everything_wrong, b"")


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_every_truncation_is_invalid_hypercall_input(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    for length in range(len(data)):
        with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
            decode_input(code, reps, 0, bytes(data[:length]))


@pytest.mark.parametrize("code", SIMPLE_CODES, ids=lambda c: c.name)
def test_simple_call_accepts_padding_to_8_bytes_and_refuses_more(code: HvCallCode) -> None:
    _, data = hand_input(code)
    padded = -(-len(data) // 8) * 8
    decode_input(code, 0, 0, bytes(data) + bytes(padded - len(data)))
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 0, bytes(data) + bytes(padded - len(data) + 1))


def test_create_trailing_padding_is_ignored_unless_strict() -> None:
    _, data = hand_input(HvCallCode.CREATE_DEVICE_DOMAIN)
    junk = bytes(data) + b"\xaa\xbb\xcc\xdd"
    assert decode_input(HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, junk) == decode_input(
        HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, bytes(data)
    )
    with _Refused(HvStatus.INVALID_PARAMETER):
        decode_input(HvCallCode.CREATE_DEVICE_DOMAIN, 0, 0, junk, strict_padding=True)


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_rep_call_refuses_any_byte_beyond_its_elements(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    for extra in (1, 8):
        with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
            decode_input(code, reps, 0, bytes(data) + bytes(extra))


@pytest.mark.parametrize("code", [HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, HvCallCode.MAP_DEVICE_GPA_PAGES])
def test_rep_call_needs_exactly_rep_count_elements(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, reps + 1, 0, bytes(data))  # one element missing
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, reps - 1, 0, bytes(data))  # one element too many


@pytest.mark.parametrize("code", SIMPLE_CODES, ids=lambda c: c.name)
def test_rep_count_or_rep_start_on_a_simple_call_is_invalid_hypercall_input(code: HvCallCode) -> None:
    _, data = hand_input(code)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 1, 0, bytes(data))
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 1, bytes(data))


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_zero_reps_on_a_rep_call_is_invalid_hypercall_input(code: HvCallCode) -> None:
    dd = hand_device_domain()
    header = {
        HvCallCode.FLUSH_DEVICE_DOMAIN_LIST: dd + bytes(8),
        HvCallCode.MAP_DEVICE_GPA_PAGES: dd + bytes(16),
        HvCallCode.UNMAP_DEVICE_GPA_PAGES: dd + bytes(8),
    }[code]
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 0, bytes(header))


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_rep_start_not_below_rep_count_is_invalid_hypercall_input(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    decode_input(code, reps, reps - 1, bytes(data))  # the last element: fine
    for start in (reps, reps + 1):
        with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
            decode_input(code, reps, start, bytes(data))


def test_rep_start_is_kept_and_all_elements_are_still_decoded() -> None:
    reps, data = hand_input(HvCallCode.MAP_DEVICE_GPA_PAGES)
    req = decode_input(HvCallCode.MAP_DEVICE_GPA_PAGES, reps, 2, bytes(data))
    assert isinstance(req, MapDeviceGpaPagesRequest)
    assert (req.rep_start, req.rep_count, req.gpa_page_list) == (2, 3, (10, 11, 12))


def test_a_list_that_spans_the_input_page_is_invalid_alignment() -> None:
    header = hand_device_domain() + bytes(8)
    fits = (4096 - 32) // 8
    decode_input(HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, fits, 0, bytes(header) + bytes(8 * fits))
    with _Refused(HvStatus.INVALID_ALIGNMENT):
        decode_input(HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, fits + 1, 0, bytes(header) + bytes(8 * (fits + 1)))


def test_unmap_rep_count_is_only_a_page_count_so_any_count_fits() -> None:
    _, data = hand_input(HvCallCode.UNMAP_DEVICE_GPA_PAGES)
    req = decode_input(HvCallCode.UNMAP_DEVICE_GPA_PAGES, 0xFFF, 0xFFE, bytes(data))
    assert req == UnmapDeviceGpaPagesRequest(
        UnmapDeviceGpaPagesInput(DeviceDomain(SELF, DeviceDomainId(1, 7)), Iova(0x10_0000)), 0xFFF, 0xFFE
    )


# (code, byte offset, byte value): one set reserved bit of an input structure, laid out by hand.
RESERVED_CASES = [
    (HvCallCode.DELETE_DEVICE_DOMAIN, 8, 0x20),  # owner_vtl.reserved_z bit 5
    (HvCallCode.DELETE_DEVICE_DOMAIN, 8, 0x80),  # owner_vtl.reserved_z bit 7
    (HvCallCode.DELETE_DEVICE_DOMAIN, 16, 0x11),  # domain_id bit 4 (reserved 4-31)
    (HvCallCode.DELETE_DEVICE_DOMAIN, 19, 0x80),  # domain_id bit 31
    (HvCallCode.CREATE_DEVICE_DOMAIN, 24, 0x04),  # create.flags bit 2
    (HvCallCode.CREATE_DEVICE_DOMAIN, 27, 0x80),  # create.flags bit 31
    (HvCallCode.CONFIGURE_DEVICE_DOMAIN, 24, 0x08),  # settings.flags bit 3
    (HvCallCode.CONFIGURE_DEVICE_DOMAIN, 31, 0x80),  # settings.flags bit 63
    (HvCallCode.FLUSH_DEVICE_DOMAIN, 24, 0x01),  # flush.flags (no bit defined)
    (HvCallCode.FLUSH_DEVICE_DOMAIN, 28, 0x01),  # flush.reserved
    (HvCallCode.GET_IOMMU_CAPABILITIES, 8, 0x01),  # u64 reserved
    (HvCallCode.GET_IOMMU_CAPABILITIES, 15, 0x80),
    (HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, 20, 0x01),  # u32 reserved
    (HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, 24, 0x03),  # flags bit 1 (bit 0 = IOMMU_FORMAT)
    (HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, 31, 0x01),  # u32 reserved
    (HvCallCode.MAP_DEVICE_GPA_PAGES, 24, 0x40),  # target_vtl.reserved_z
    (HvCallCode.MAP_DEVICE_GPA_PAGES, 28, 0x07),  # map_flags bit 2
    (HvCallCode.UNMAP_DEVICE_GPA_PAGES, 8, 0xE0),  # owner_vtl.reserved_z
]


@pytest.mark.parametrize(
    ("code", "offset", "byte"), RESERVED_CASES, ids=[f"{c.name}@{o}={b:#04x}" for c, o, b in RESERVED_CASES]
)
def test_a_set_reserved_bit_is_invalid_parameter(code: HvCallCode, offset: int, byte: int) -> None:
    reps, data = hand_input(code)
    data[offset] = byte
    with _Refused(HvStatus.INVALID_PARAMETER):
        decode_input(code, reps, 0, bytes(data))


# (code, byte offset): a padding byte, not a reserved field.
PADDING_CASES = [
    *((HvCallCode.DELETE_DEVICE_DOMAIN, off) for off in range(9, 16)),  # hv_input_device_domain.padding[7]
    (HvCallCode.ATTACH_DEVICE_DOMAIN, 15),
    *((HvCallCode.MAP_DEVICE_GPA_PAGES, off) for off in range(25, 28)),  # map.padding[3]
]


@pytest.mark.parametrize(("code", "offset"), PADDING_CASES, ids=[f"{c.name}@{o}" for c, o in PADDING_CASES])
def test_padding_is_ignored_by_default_and_an_invalid_parameter_when_strict(code: HvCallCode, offset: int) -> None:
    reps, clean = hand_input(code)
    dirty = bytearray(clean)
    dirty[offset] = 0x5A
    assert decode_input(code, reps, 0, bytes(dirty)) == decode_input(code, reps, 0, bytes(clean))
    with _Refused(HvStatus.INVALID_PARAMETER):
        decode_input(code, reps, 0, bytes(dirty), strict_padding=True)


def test_undefined_domain_types_and_unknown_properties_are_left_to_the_handler() -> None:
    data = hand_device_domain(domain_type=0xF, domain_id=0xFFFFFFFF)
    req = decode_input(HvCallCode.DELETE_DEVICE_DOMAIN, 0, 0, bytes(data))
    assert isinstance(req, DeleteDeviceDomainInput)
    assert req.device_domain.domain_id == DeviceDomainId(0xF, 0xFFFFFFFF)
    assert req.device_domain.domain_id.domain_type is None
    prop = decode_input(HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, 0, 0, struct.pack("<QQII", SELF, 1, 0xFFFFFFFF, 0))
    assert prop == GetLogicalDevicePropertyInput(SELF, 1, 0xFFFFFFFF)


@pytest.mark.parametrize("bit", [*range(27, 31), *range(44, 48), *range(60, 64)])
def test_a_reserved_bit_of_the_input_value_is_invalid_hypercall_input(bit: int) -> None:
    _, data = hand_input(HvCallCode.DELETE_DEVICE_DOMAIN)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_call(0xC5 | 1 << bit, bytes(data))


@pytest.mark.parametrize(
    "extra", [1 << 16, 1 << 17, 0x3FF << 17, 1 << 31], ids=["fast", "varhead-1", "varhead-max", "nested"]
)
def test_fast_varhead_and_nested_are_invalid_hypercall_input(extra: int) -> None:
    _, data = hand_input(HvCallCode.DELETE_DEVICE_DOMAIN)
    decode_call(0xC5, bytes(data))
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_call(0xC5 | extra, bytes(data))


def test_decode_call_takes_rep_count_and_start_from_the_input_value() -> None:
    reps, data = hand_input(HvCallCode.FLUSH_DEVICE_DOMAIN_LIST)
    req = decode_call(0xD1 | reps << 32 | 1 << 48, bytes(data))
    assert isinstance(req, FlushDeviceDomainListRequest)
    assert (req.rep_count, req.rep_start) == (2, 1)


def test_unpack_of_a_single_structure_refuses_a_wrong_length() -> None:
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        DeviceDomain.unpack(bytes(23))
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        DeviceDomain.unpack(bytes(25))


def test_encode_output_refuses_the_wrong_output_type_and_calls_without_output_give_no_bytes() -> None:
    assert encode_output(HvCallCode.ATTACH_DEVICE_DOMAIN, None) == b""
    assert decode_output(HvCallCode.ATTACH_DEVICE_DOMAIN, b"") is None
    with pytest.raises(ValueError):
        encode_output(HvCallCode.GET_IOMMU_CAPABILITIES, GetLogicalDevicePropertyOutput(1))
    with pytest.raises(ValueError):
        encode_output(HvCallCode.ATTACH_DEVICE_DOMAIN, GetLogicalDevicePropertyOutput(1))
    with pytest.raises(ValueError):
        decode_output(HvCallCode.GET_IOMMU_CAPABILITIES, bytes(23))


def test_output_reserved_fields_are_ignored_on_decode() -> None:
    buf = bytearray(GetLogicalDevicePropertyOutput(1).pack())
    buf[8:16] = b"\xff" * 8
    assert decode_output(HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, bytes(buf)) == GetLogicalDevicePropertyOutput(1)


def test_building_out_of_range_fields_is_a_value_error_not_a_status() -> None:
    with pytest.raises(ValueError):
        DeviceDomainId(type=16, id=0)
    with pytest.raises(ValueError):
        HvInputVtl(target_vtl=16)
    with pytest.raises(ValueError):
        HypercallInput(0x1_0000)


def test_building_a_rep_request_with_a_bad_rep_count_or_start_is_the_wire_status() -> None:
    """The rep requests check rep count and start themselves, with the raw decoder's status, so
    no caller (the typed gRPC methods, the guest's client) keeps a copy of the check."""
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        FlushDeviceDomainListRequest(FlushDeviceDomainListHeader(DD), ())
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        FlushDeviceDomainListRequest(FlushDeviceDomainListHeader(DD), (FlushVa(0),) * 4096)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput(DD, Iova(0)), rep_count=2, rep_start=2)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput(DD, Iova(0)), rep_count=0)
    with _Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        MapDeviceGpaPagesRequest(MapDeviceGpaPagesHeader(DD, 3, Iova(0)), ())


def test_the_flags_words_are_checked_by_the_constructors_with_the_wire_status() -> None:
    """Undefined flag bits and a too-wide owner VTL are INVALID_PARAMETER however the input is built."""
    with _Refused(HvStatus.INVALID_PARAMETER):
        CreateDeviceDomainInput.from_flags(DD, 4)
    with _Refused(HvStatus.INVALID_PARAMETER):
        FlushDeviceDomainInput.from_flags(DD, 1)
    with _Refused(HvStatus.INVALID_PARAMETER):
        FlushDeviceDomainListHeader.from_flags(DD, 2)
    with _Refused(HvStatus.INVALID_PARAMETER):
        MapDeviceGpaPagesHeader(DD, 4, Iova(0))
    with _Refused(HvStatus.INVALID_PARAMETER):
        HvInputVtl.from_u8(0x100)
    assert CreateDeviceDomainInput.from_flags(DD, 3).flags == 3
    assert FlushDeviceDomainListHeader.from_flags(DD, 1).flags == 1
    assert FlushDeviceDomainInput.from_flags(DD, 0) == FlushDeviceDomainInput(DD)
