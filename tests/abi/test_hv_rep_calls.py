"""Pins the rep calls' layouts (flush list, map, unmap: header, then elements) and their rep count / rep start rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given

from pviommu.abi.hv import (
    DeviceDomain,
    DeviceDomainId,
    FlushDeviceDomainListHeader,
    FlushDeviceDomainListRequest,
    FlushVa,
    HvCallCode,
    HvInputVtl,
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
from pviommu.addr import Iova
from tests.kit.hvlayouts import DD, DD_HEX, REP_CODES, SELF, Refused, hand_device_domain, hand_input
from tests.kit.hvstrategies import flush_vas


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


@given(flush_vas)
def test_flush_va_round_trips(va: FlushVa) -> None:
    assert FlushVa.unpack(va.pack()) == va


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_rep_call_refuses_any_byte_beyond_its_elements(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    for extra in (1, 8):
        with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
            decode_input(code, reps, 0, bytes(data) + bytes(extra))


@pytest.mark.parametrize("code", [HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, HvCallCode.MAP_DEVICE_GPA_PAGES])
def test_rep_call_needs_exactly_rep_count_elements(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, reps + 1, 0, bytes(data))  # one element missing
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, reps - 1, 0, bytes(data))  # one element too many


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_zero_reps_on_a_rep_call_is_invalid_hypercall_input(code: HvCallCode) -> None:
    dd = hand_device_domain()
    header = {
        HvCallCode.FLUSH_DEVICE_DOMAIN_LIST: dd + bytes(8),
        HvCallCode.MAP_DEVICE_GPA_PAGES: dd + bytes(16),
        HvCallCode.UNMAP_DEVICE_GPA_PAGES: dd + bytes(8),
    }[code]
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        decode_input(code, 0, 0, bytes(header))


@pytest.mark.parametrize("code", REP_CODES, ids=lambda c: c.name)
def test_rep_start_not_below_rep_count_is_invalid_hypercall_input(code: HvCallCode) -> None:
    reps, data = hand_input(code)
    decode_input(code, reps, reps - 1, bytes(data))  # the last element: fine
    for start in (reps, reps + 1):
        with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
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
    with Refused(HvStatus.INVALID_ALIGNMENT):
        decode_input(HvCallCode.FLUSH_DEVICE_DOMAIN_LIST, fits + 1, 0, bytes(header) + bytes(8 * (fits + 1)))


def test_unmap_rep_count_is_only_a_page_count_so_any_count_fits() -> None:
    _, data = hand_input(HvCallCode.UNMAP_DEVICE_GPA_PAGES)
    req = decode_input(HvCallCode.UNMAP_DEVICE_GPA_PAGES, 0xFFF, 0xFFE, bytes(data))
    assert req == UnmapDeviceGpaPagesRequest(
        UnmapDeviceGpaPagesInput(DeviceDomain(SELF, DeviceDomainId(1, 7)), Iova(0x10_0000)), 0xFFF, 0xFFE
    )


def test_decode_call_takes_rep_count_and_start_from_the_input_value() -> None:
    reps, data = hand_input(HvCallCode.FLUSH_DEVICE_DOMAIN_LIST)
    req = decode_call(0xD1 | reps << 32 | 1 << 48, bytes(data))
    assert isinstance(req, FlushDeviceDomainListRequest)
    assert (req.rep_count, req.rep_start) == (2, 1)


def test_building_a_rep_request_with_a_bad_rep_count_or_start_is_the_wire_status() -> None:
    """The rep requests check rep count and start themselves, with the raw decoder's status, so
    no caller (the typed gRPC methods, the guest's client) keeps a copy of the check."""
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        FlushDeviceDomainListRequest(FlushDeviceDomainListHeader(DD), ())
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        FlushDeviceDomainListRequest(FlushDeviceDomainListHeader(DD), (FlushVa(0),) * 4096)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput(DD, Iova(0)), rep_count=2, rep_start=2)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        UnmapDeviceGpaPagesRequest(UnmapDeviceGpaPagesInput(DD, Iova(0)), rep_count=0)
    with Refused(HvStatus.INVALID_HYPERCALL_INPUT):
        MapDeviceGpaPagesRequest(MapDeviceGpaPagesHeader(DD, 3, Iova(0)), ())
