"""Pins the hypercall input value and result words and the output blocks (capabilities, logical device property)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pviommu.abi.hv import (
    GetIommuCapabilitiesOutput,
    GetLogicalDevicePropertyInput,
    GetLogicalDevicePropertyOutput,
    HvCallCode,
    HypercallInput,
    HypercallResult,
    decode_call,
    decode_output,
    encode_output,
)
from pviommu.abi.hv_status import HvStatus
from tests.kit.hvlayouts import SELF, Refused, hand_input
from tests.kit.hvstrategies import u64


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


@pytest.mark.parametrize("bit", [*range(27, 31), *range(44, 48), *range(60, 64)])
def test_a_reserved_bit_of_the_input_value_is_invalid_hypercall_input(bit: int) -> None:
    _, data = hand_input(HvCallCode.DELETE_DEVICE_DOMAIN)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_call(0xC5 | 1 << bit, bytes(data))


@pytest.mark.parametrize(
    "extra", [1 << 16, 1 << 17, 0x3FF << 17, 1 << 31], ids=["fast", "varhead-1", "varhead-max", "nested"]
)
def test_fast_varhead_and_nested_are_invalid_hypercall_input(extra: int) -> None:
    _, data = hand_input(HvCallCode.DELETE_DEVICE_DOMAIN)
    decode_call(0xC5, bytes(data))
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_call(0xC5 | extra, bytes(data))


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
