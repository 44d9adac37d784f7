"""Pins the call codes, constants, sizes and CALLS registry, and the input rules every call shares."""

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
    HvRequest,
    IommuCap,
    MapDeviceGpaPagesHeader,
    MapDeviceGpaPagesRequest,
    MapFlags,
    UnmapDeviceGpaPagesInput,
    UnmapDeviceGpaPagesRequest,
    decode_call,
    decode_input,
    encode_request,
)
from pviommu.abi.hv_status import HvStatus
from pviommu.addr import Gpa, Iova
from tests.kit.hvlayouts import ALL_CODES, SELF, Refused, hand_device_domain, hand_input
from tests.kit.hvstrategies import hv_requests


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


requests = hv_requests()


@given(requests)
def test_every_request_round_trips_through_the_raw_abi(request: HvRequest) -> None:
    value, data = encode_request(request)
    assert decode_call(value.encode(), data) == request
    assert decode_call(value.encode(), data, strict_padding=True) == request


KNOWN = {int(c) for c in HvCallCode}


@given(st.integers(0, 0xFFFF).filter(lambda c: c not in KNOWN), st.integers(0, 0xFFF), st.binary(max_size=64))
def test_unknown_code_is_invalid_hypercall_code(code: int, reps: int, data: bytes) -> None:
    with Refused(HvStatus.INVALID_HYPERCALL_CODE):
        decode_input(code, reps, 0, data)


def test_unknown_code_wins_over_every_other_fault_of_the_input_value() -> None:
    everything_wrong = 0xFFFF_FFFF_FFFF_0000 | 0x0126
    with Refused(HvStatus.INVALID_HYPERCALL_CODE):
        decode_call(everything_wrong, b"")


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_every_truncation_is_invalid_hypercall_input(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    for length in range(len(data)):
        with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
            decode_input(code, reps, 0, bytes(data[:length]))


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
    with Refused(HvStatus.INVALID_PARAMETER):
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
    with Refused(HvStatus.INVALID_PARAMETER):
        decode_input(code, reps, 0, bytes(dirty), strict_padding=True)


def test_undefined_domain_types_and_unknown_properties_are_left_to_the_handler() -> None:
    data = hand_device_domain(domain_type=0xF, domain_id=0xFFFFFFFF)
    req = decode_input(HvCallCode.DELETE_DEVICE_DOMAIN, 0, 0, bytes(data))
    assert isinstance(req, DeleteDeviceDomainInput)
    assert req.device_domain.domain_id == DeviceDomainId(0xF, 0xFFFFFFFF)
    assert req.device_domain.domain_id.domain_type is None
    prop = decode_input(HvCallCode.GET_LOGICAL_DEVICE_PROPERTY, 0, 0, struct.pack("<QQII", SELF, 1, 0xFFFFFFFF, 0))
    assert prop == GetLogicalDevicePropertyInput(SELF, 1, 0xFFFFFFFF)
